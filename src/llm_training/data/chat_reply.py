"""A chat model's prompts for generation: a conversation rendered with the model's own template and its
generation prompt, as ids, and the token that ends the assistant's turn (where a reply stops).

The server's ``/v1/chat/completions``, ``llm-infer``'s ``messages`` lines and the GGUF export use it, so a
reply is prompted exactly as fine-tuning trained it (``ChatEncoder``'s ids, equal to transformers'
``apply_chat_template(..., add_generation_prompt=True)``).

The end of a turn is found the way preparation finds it (``chat_prepare``: the last trained token of a
reply): a one-turn probe conversation is encoded with its labels, and its last trained token is the
end-of-turn when it is a markup token of the tokenizer (``<|im_end|>``, ``<|eot_id|>``, ``</s>``). A
template that ends a turn with plain text (a newline) has none: its replies end at the end-of-text token.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from llm_training.data.chat import IGNORE_INDEX, ChatEncoder
from llm_training.data.chat_formats import ChatExample, Message
from llm_training.data.chat_template import TEMPLATE_FILE, ChatTemplate, load_chat_template
from llm_training.data.tokenizer import Tokenizer
from llm_training.errors import DataError

# what a user is told where a model has no template (the server's 400, llm-infer's error)
HOW_TO_GET_ONE = ("fine-tune it on chat data with llm-finetune --chat-template chatml (a base model), or send "
                  "the conversation as plain text")  # fmt: skip


def template_for(source: str, tokenizer: Tokenizer, name: str) -> ChatTemplate:
    """A template recorded as text (in a checkpoint's config, in a GGUF file), rendered with the special
    tokens of the tokenizer it was trained with (``bos_token``, ``eos_token``, ``pad_token``)."""
    special = tokenizer.special
    names = {"eos_token": special.eos, "bos_token": special.bos, "pad_token": special.pad or special.eos}
    return ChatTemplate(source, name, {k: v for k, v in names.items() if v})


def folder_template(folder: Path) -> ChatTemplate | None:
    """A Hugging Face folder's own template (``chat_template.jinja`` or ``tokenizer_config.json``), or None."""
    config = folder / "tokenizer_config.json"
    has = (folder / TEMPLATE_FILE).is_file() or (config.is_file() and '"chat_template"' in config.read_text())
    return load_chat_template(folder) if has else None


def end_of_turn_id(encoder: ChatEncoder) -> int | None:
    """The markup token that ends an assistant's turn under ``encoder``'s template, or None (see above)."""
    probe = ChatExample(
        (Message("user", "Hello."), Message("assistant", "Hi.")), source="a probe conversation"
    )
    try:
        encoded = encoder.encode(probe)
    except DataError:  # a template that refuses this conversation (one that needs a system message, ...)
        return None
    trained = np.flatnonzero(encoded.labels != IGNORE_INDEX)
    if not len(trained):
        return None
    last = int(encoded.input_ids[trained[-1]])
    markup = encoder.tokenizer.backend.get_added_tokens_decoder()
    return last if last in markup else None


class ChatPrompts:
    """Prompts for replies of one model: ``ids(messages)`` and the ``stop_ids`` that end a reply besides the
    end-of-text (which generation stops at anyway)."""

    def __init__(self, tokenizer: Tokenizer, template: ChatTemplate) -> None:
        self.tokenizer = tokenizer
        self.encoder = ChatEncoder(tokenizer, template)
        self.end_of_turn = end_of_turn_id(self.encoder)

    @property
    def stop_ids(self) -> tuple[tuple[int, ...], ...]:
        if self.end_of_turn is None or self.end_of_turn == self.tokenizer.eot_id:
            return ()
        return ((self.end_of_turn,),)

    def ids(self, messages: Sequence[Message | dict], where: str = "") -> list[int]:
        """The conversation's ids with the generation prompt: what the model continues with its reply. A
        template that refuses the conversation is a one-line ``DataError`` starting with ``where``."""
        return self.encoder.encode_messages(messages, add_generation_prompt=True, where=where)
