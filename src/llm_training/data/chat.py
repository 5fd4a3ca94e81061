"""Fine-tuning examples as token ids with loss labels: chat SFT, continued pretraining, preference pairs.

Ids equal transformers' ``tokenizer.apply_chat_template(messages, tokenize=True)`` for the same tokenizer
and template: the template's markup (``<|im_start|>``, ``<|eot_id|>``, ``</s>``) becomes its token ids,
through a private copy of the tokenizer's backend that matches added tokens. The project's
:class:`~llm_training.data.tokenizer.Tokenizer` encodes special-token text as text so that a document can
never forge a boundary, and the same holds here for message contents: a ``<|im_end|>`` typed inside a
message is encoded as text, as transformers does with ``sanitize_control_tokens=True`` (with clean
contents both agree).

Labels are aligned with the ids (Hugging Face's convention: the loss predicts ``labels[1:]`` from
``input_ids[:-1]``): the token id where trained, :data:`IGNORE_INDEX` elsewhere. By default only assistant
messages are trained, each with the end-of-turn markup the template writes after it (``<|im_end|>``,
``<|eot_id|>``, ``</s>``), so the model learns to stop; whitespace after that markup is not trained. The
spans come from rendering the conversation prefix by prefix (``messages[:i]`` with the generation prompt
before assistant message ``i``, ``messages[:i+1]`` after it) and a token is trained when its characters
overlap a span (transformers' rule for its assistant masks). A template whose rendering of a prefix is not
a prefix of the whole is refused: masking could not be exact.

Use::

    data = read_chat_file("sft.jsonl")                      # chat_formats: records -> ChatExamples
    template = load_chat_template("model_folder")           # or load_chat_template("chatml") for a base model
    added = add_template_tokens(tokenizer, template)        # ChatML's tokens for a base model (grow embeddings)
    examples, report = encode_sft(data.examples, ChatEncoder(tokenizer, template), max_length=2048)
    windows = pack_examples([e.input_ids for e in examples], [e.labels for e in examples], 2048, pad_id)

Truncation (:func:`encode_sft`, :func:`encode_pairs`): ``"truncate"`` (default) keeps the first
``max_length`` tokens when at least one trained token remains, so long conversations still teach their first
turns; ``"drop"`` drops every example longer than ``max_length``. Both count what they did in an
:class:`EncodeReport`; examples left with nothing to train are dropped and counted.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass

import numpy as np

from llm_training.data.chat_formats import ChatExample, Message
from llm_training.data.chat_template import ChatTemplate
from llm_training.data.tokenizer import Tokenizer
from llm_training.errors import DataError, quoted

IGNORE_INDEX = -100  # PyTorch's cross_entropy ignore_index
TRUNCATION = ("truncate", "drop")
# private-use characters around control-token text found in contents (transformers' markers)
_START, _END = "\U000f0000", "\U000f0001"


@dataclass
class EncodedChat:
    input_ids: np.ndarray  # int64 [length]
    labels: np.ndarray  # int64 [length]: the id where trained, else IGNORE_INDEX (aligned, not shifted)
    source: str = ""


@dataclass
class EncodedPair:
    """A preference pair: the shared prompt and each continuation; ``prompt_ids + chosen_ids`` are the ids of
    the whole chosen conversation (likewise rejected). Labels mark the continuation's assistant tokens."""

    prompt_ids: np.ndarray
    chosen_ids: np.ndarray
    chosen_labels: np.ndarray
    rejected_ids: np.ndarray
    rejected_labels: np.ndarray
    source: str = ""


@dataclass
class EncodeReport:
    """What encoding did to a dataset (tokens and trained tokens count what was kept)."""

    examples: int = 0
    kept: int = 0
    truncated: int = 0  # kept, cut to max_length
    dropped_too_long: int = 0  # truncation="drop"
    dropped_untrainable: int = 0  # no trained token left within max_length (or none at all)
    tokens: int = 0
    trained_tokens: int = 0  # labels that a loss uses (not the first position, which nothing predicts)

    def to_dict(self) -> dict:
        return asdict(self)


class ChatEncoder:
    """Renders and tokenizes examples for one tokenizer and chat template.

    Add a built-in template's markup tokens (:func:`add_template_tokens`) before building the encoder: it
    keeps its own copy of the tokenizer's backend. ``template`` may be None for plain-text records only.
    """

    def __init__(
        self, tokenizer: Tokenizer, template: ChatTemplate | None = None, train_on_prompt: bool = False
    ):
        from tokenizers import Tokenizer as HFTokenizer

        self.tokenizer, self.template, self.train_on_prompt = tokenizer, template, train_on_prompt
        self._backend = HFTokenizer.from_str(tokenizer.backend.to_str())
        self._backend.encode_special_tokens = False  # the template's markup text becomes its token ids
        # control tokens as transformers counts them: special ones, and added ones the template writes
        literal = template.literal_text() if template is not None else ""
        added = self._backend.get_added_tokens_decoder().values()
        control = [
            t.content for t in added if t.special or (t.content in literal and not t.content.isspace())
        ]
        self._control = re.compile("|".join(map(re.escape, sorted(control, key=len, reverse=True))) or "(?!)")
        self._markers = re.compile(f"{_START}({self._control.pattern}){_END}|[{_START}{_END}]")
        self._newline = self._backend.encode("\n", add_special_tokens=False).ids
        eos = template.special_tokens.get("eos_token") if template is not None else None
        eos_id = self._backend.token_to_id(eos) if eos else None
        self.eos_id: int | None = tokenizer.eot_id if eos_id is None else eos_id  # ends a plain-text example

    # ---- public ----------------------------------------------------------------------------------------------

    def render(
        self, messages: Sequence[Message | dict], add_generation_prompt: bool = False, where: str = ""
    ) -> str:
        return self._need_template(where).render(messages, add_generation_prompt, where)

    def encode_messages(
        self, messages: Sequence[Message | dict], add_generation_prompt: bool = False, where: str = ""
    ) -> list[int]:
        """Ids of the rendered conversation (what a server feeds the model for a reply, with the prompt)."""
        marked, any_marked = self._mark(messages)
        text = self._need_template(where).render(marked, add_generation_prompt, where)
        return self._encode(text, any_marked, where)[0]

    def decode(self, ids: Sequence[int]) -> str:
        """Text of ``ids`` with the markup tokens in it (to see what a label mask trains)."""
        return self._backend.decode([int(i) for i in ids], skip_special_tokens=False)

    def encode(self, example: ChatExample) -> EncodedChat:
        """A text or chat example as ids and labels (all tokens trained under ``train_on_prompt``)."""
        if example.kind == "text":
            end = [] if self.eos_id is None else [self.eos_id]
            ids = np.asarray(self.tokenizer.encode(example.messages[0].content) + end, np.int64)
            return EncodedChat(ids, ids.copy(), example.source)
        if example.kind == "pair":
            raise DataError(f"{example.source}: a preference pair where chat examples are expected; "
                            "encode pairs with encode_pairs")  # fmt: skip
        ids, labels = self._conversation(example.messages, 0, self.train_on_prompt, example.source)
        return EncodedChat(ids, labels, example.source)

    def encode_pair(self, example: ChatExample) -> EncodedPair:
        """A preference pair: labels on the continuations' assistant messages only (never the prompt)."""
        if example.kind != "pair":
            raise DataError(f"{example.source}: a {example.kind} example where preference pairs are expected")
        first = len(example.messages)
        chosen, chosen_labels = self._conversation(
            example.messages + example.chosen, first, False, example.source
        )
        rejected, rejected_labels = self._conversation(
            example.messages + example.rejected, first, False, example.source
        )
        # the prompt: the tokens both conversations share before either's first trained token
        limit = min(_first_trained(chosen_labels), _first_trained(rejected_labels))
        same = chosen[:limit] == rejected[:limit]
        shared = limit if same.all() else int(np.argmin(same))
        return EncodedPair(
            chosen[:shared],
            chosen[shared:],
            chosen_labels[shared:],
            rejected[shared:],
            rejected_labels[shared:],
            example.source,
        )

    # ---- conversation -> ids and labels ----------------------------------------------------------------------

    def _need_template(self, where: str) -> ChatTemplate:
        if self.template is None:
            raise DataError(f"{where or 'chat records'}: chat records need a chat template: the model's own, or "
                            "the built-in 'chatml' for a base model")  # fmt: skip
        return self.template

    def _conversation(self, messages: Sequence[Message], first: int, everything: bool, where: str):
        """Ids of the whole conversation and labels on assistant messages from index ``first`` on."""
        template = self._need_template(where)
        marked, any_marked = self._mark(messages)
        full = template.render(marked, False, where)
        ids_list, offsets = self._encode(full, any_marked, where)
        ids = np.asarray(ids_list, np.int64)
        if everything:
            return ids, ids.copy()
        starts = np.asarray([s for s, _ in offsets], np.int64).reshape(-1)
        ends = np.asarray([e for _, e in offsets], np.int64).reshape(-1)
        trained = np.zeros(len(ids), bool)
        for index in range(first, len(marked)):
            if marked[index]["role"] != "assistant":
                continue
            before = template.render(marked[:index], True, where)
            after = template.render(marked[: index + 1], False, where)
            if not (after.startswith(before) and full.startswith(after)):
                raise DataError(
                    f"{where}: the chat template {template.name} renders the conversation up to message "
                    f"{index + 1} other than as the start of the whole, so the loss cannot be limited to the "
                    "assistant's tokens exactly; use another template, or train_on_prompt"
                )
            end = len(after)
            found = [m.end() for m in self._control.finditer(after, len(before))]
            if found and not after[found[-1] :].strip():  # keep the end-of-turn markup, not the newline after
                end = found[-1]
            trained |= (ends > len(before)) & (starts < end)
        return ids, np.where(trained, ids, IGNORE_INDEX)

    def _mark(self, messages: Sequence[Message | dict]) -> tuple[list[dict], bool]:
        """Messages as dicts, control-token text in contents wrapped in markers (then encoded as text)."""
        out, any_marked = [], False
        for message in messages:
            if isinstance(message, dict):
                role, content = message["role"], message["content"]
            else:
                role, content = message.role, message.content
            if self._control.search(content):
                content = content.replace(_START, "").replace(_END, "")
                content = self._control.sub(lambda m: _START + m.group() + _END, content)
                any_marked = True
            out.append({"role": role, "content": content})
        return out, any_marked

    def _encode(self, text: str, marked: bool, where: str) -> tuple[list[int], list[tuple[int, int]]]:
        """Ids and character offsets of rendered text; with markers, as transformers' ``encode_marked_chat``:
        pieces between markers encoded apart, marked control-token text as plain text."""
        if not marked:
            encoding = self._backend.encode(text, add_special_tokens=False)
            return encoding.ids, encoding.offsets
        pieces, position = [], 0  # (start, text, as plain text)
        for match in self._markers.finditer(text):
            pieces.append((position, text[position : match.start()], False))
            if match.group(1):
                pieces.append((match.start(1), match.group(1), True))
            position = match.end()
        pieces.append((position, text[position:], False))
        encoding = self._backend.encode(pieces[0][1], add_special_tokens=False)
        ids, offsets = list(encoding.ids), list(encoding.offsets)
        for start, piece, plain in pieces[1:]:
            if not piece:
                continue
            piece_ids, piece_offsets = self._piece(piece, plain)
            if plain and self._backend.token_to_id(piece) in piece_ids:
                raise DataError(f"{where}: {quoted(piece)} in a message cannot be kept as text: this "
                                "tokenizer makes that token from plain text too")  # fmt: skip
            ids += piece_ids
            offsets += [(start + a, start + b) for a, b in piece_offsets]
        return ids, offsets

    def _piece(self, piece: str, plain: bool) -> tuple[list[int], list[tuple[int, int]]]:
        """A piece from the middle of a chat, after a newline that is then taken off (so that SentencePiece
        does not add the space it adds at the start of a text), as transformers does."""
        ids, offsets = self._plain(piece, "\n") if plain else self._added("\n" + piece)
        width = len(self._newline)
        if ids[:width] == self._newline:
            return ids[width:], [(max(0, a - 1), max(0, b - 1)) for a, b in offsets[width:]]
        return self._plain(piece, "") if plain else self._added(piece)

    def _added(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        encoding = self._backend.encode(text, add_special_tokens=False)
        return encoding.ids, encoding.offsets

    def _plain(self, piece: str, prefix: str) -> tuple[list[int], list[tuple[int, int]]]:
        """``prefix + piece`` through normalizer, pre-tokenizer and model, no added tokens matched; every
        token's offsets are the whole piece's (it lies inside one message)."""
        text, backend = prefix + piece, self._backend
        if backend.normalizer is not None:
            text = backend.normalizer.normalize_str(text)
        splits = (
            [s for s, _ in backend.pre_tokenizer.pre_tokenize_str(text)] if backend.pre_tokenizer else [text]
        )
        ids = [token.id for split in splits for token in backend.model.tokenize(split)]
        span = (len(prefix), len(prefix) + len(piece))
        return ids, [span] * len(ids)


def add_template_tokens(tokenizer: Tokenizer, template: ChatTemplate) -> list[str]:
    """Register the markup tokens a built-in template needs (ChatML's) as special tokens of ``tokenizer``;
    returns those that got new ids (the model's embeddings must grow to ``tokenizer.vocab_size``)."""
    from tokenizers import AddedToken

    special = {t.content for t in tokenizer.backend.get_added_tokens_decoder().values() if t.special}
    missing = [token for token in template.tokens if token not in special]
    before = tokenizer.vocab_size
    tokenizer.backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in missing])
    return [token for token in missing if tokenizer.backend.token_to_id(token) >= before]


# ---- datasets --------------------------------------------------------------------------------------------------


def encode_sft(
    examples: Iterable[ChatExample], encoder: ChatEncoder, max_length: int, truncation: str = "truncate"
) -> tuple[list[EncodedChat], EncodeReport]:
    """Text and chat examples as :class:`EncodedChat` of at most ``max_length`` tokens, and the report."""
    _check(max_length, truncation)
    out, report = [], EncodeReport()
    for example in examples:
        report.examples += 1
        encoded = encoder.encode(example)
        longer = len(encoded.input_ids) > max_length
        if longer and truncation == "drop":
            report.dropped_too_long += 1
            continue
        if longer:
            encoded = EncodedChat(encoded.input_ids[:max_length], encoded.labels[:max_length], encoded.source)
        trained = _trained(encoded.labels)
        if trained == 0:
            report.dropped_untrainable += 1
            continue
        out.append(encoded)
        report.kept += 1
        report.truncated += longer
        report.tokens += len(encoded.input_ids)
        report.trained_tokens += trained
    return out, report


def encode_pairs(
    examples: Iterable[ChatExample], encoder: ChatEncoder, max_length: int, truncation: str = "truncate"
) -> tuple[list[EncodedPair], EncodeReport]:
    """Preference pairs whose prompt + continuation fit ``max_length`` on both sides; ``"truncate"`` cuts the
    continuations' ends (the prompt is kept whole), and needs a trained token left on both sides."""
    _check(max_length, truncation)
    out, report = [], EncodeReport()
    for example in examples:
        report.examples += 1
        pair = encoder.encode_pair(example)
        room = max_length - len(pair.prompt_ids)
        longer = max(len(pair.chosen_ids), len(pair.rejected_ids)) > room
        if longer and truncation == "drop":
            report.dropped_too_long += 1
            continue
        if longer:
            pair = EncodedPair(
                pair.prompt_ids,
                pair.chosen_ids[: max(room, 0)],
                pair.chosen_labels[: max(room, 0)],
                pair.rejected_ids[: max(room, 0)],
                pair.rejected_labels[: max(room, 0)],
                pair.source,
            )
        trained = [
            int((labels != IGNORE_INDEX).sum()) for labels in (pair.chosen_labels, pair.rejected_labels)
        ]
        if min(trained) == 0 or len(pair.prompt_ids) == 0:  # the first token has nothing before it
            report.dropped_untrainable += 1
            continue
        out.append(pair)
        report.kept += 1
        report.truncated += longer
        report.tokens += 2 * len(pair.prompt_ids) + len(pair.chosen_ids) + len(pair.rejected_ids)
        report.trained_tokens += sum(trained)
    return out, report


def _check(max_length: int, truncation: str) -> None:
    if truncation not in TRUNCATION:
        raise DataError(f"truncation must be one of {', '.join(TRUNCATION)}, got {quoted(truncation)}")
    if not isinstance(max_length, int) or max_length < 2:
        raise DataError(f"max_length must be an integer of at least 2, got {quoted(max_length)}")


def _trained(labels: np.ndarray) -> int:
    return int((labels[1:] != IGNORE_INDEX).sum())


def _first_trained(labels: np.ndarray) -> int:
    where = np.flatnonzero(labels != IGNORE_INDEX)
    return int(where[0]) if len(where) else len(labels)
