"""Chat test data scored as ``llm-finetune`` trains it: each conversation rendered with the model's chat template
and tokenized by ``data/chat.py``'s encoder (transformers' ids), the loss counted on the assistant's tokens
and their end-of-turn markup only, one example a row (never packed with another). Examples longer than the
model's context are cut to it, as fine-tuning cuts them; one left with no assistant token is skipped. On the
examples of a fine-tuning's validation split the loss is the run's validation loss; bits per byte count the
bytes of the scored replies, as the run's do.

The template is the model's own (``export.runtime.LoadedModel.chat_template``: the one a fine-tuning
recorded in its checkpoint, a Hugging Face folder's, a GGUF file's); ``--chat-template`` names another (a
built-in name, a ``.jinja`` file or a model folder).
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F

from llm_training.data.chat import IGNORE_INDEX, ChatEncoder, encode_sft
from llm_training.data.chat_prepare import pad_examples, trained_bytes
from llm_training.data.chat_template import ChatTemplate, load_chat_template
from llm_training.errors import DataError, UserError
from llm_training.eval.metrics import class_counts, f1_from_counts
from llm_training.model.transformer import device_of

log = logging.getLogger("llm_training.evaluate")


def model_template(loaded, spec: str | None = None) -> ChatTemplate:
    """The template to render chat records for ``loaded`` (an ``export.runtime.LoadedModel``): ``spec`` when
    given, else the model's own; its markup tokens must be in the model's tokenizer."""
    if spec:
        template = load_chat_template(spec)
    elif loaded.chat_template is not None:  # a checkpoint's recorded one, a Hugging Face folder's, GGUF's
        template = loaded.chat_template
    else:
        raise UserError(f"{loaded.path}: the model has no chat template (not fine-tuned on chat data) to render "
                        "chat records with; pass --chat-template (chatml, a .jinja file or a model folder)")  # fmt: skip
    missing = [t for t in template.tokens if loaded.tokenizer.backend.token_to_id(t) is None]
    if missing:
        raise UserError(f"{loaded.path}: its tokenizer has no {', '.join(missing)}, which the {template.name} "
                        "template writes; fine-tune it with that template first (llm-finetune --chat-template)")  # fmt: skip
    return template


@torch.no_grad()
def chat_scores(
    model, tokenizer, template: ChatTemplate, examples: list, batch_size: int, autocast, units: bool = False
) -> dict:
    """Sums over the assistant tokens of ``examples`` (``ChatExample``): negative log-likelihood (nats),
    tokens, top-1 hits, next-token macro F1, bytes of the scored text, and how many examples were scored,
    cut and skipped; ``units``: the same sums per example (``llm-compare``'s noise estimate)."""
    context = model.cfg.max_seq_length
    encoded, report = encode_sft(examples, ChatEncoder(tokenizer, template), max_length=context)
    if not encoded:
        raise DataError(f"none of the {report.examples:,} chat records has an assistant reply to score")
    if report.truncated or report.dropped_untrainable:
        log.warning("%d of %d conversations are longer than the model's context (%d tokens) and were cut; "
                    "%d had no assistant token left and were skipped", report.truncated, report.examples,
                    context, report.dropped_untrainable)  # fmt: skip
    device = device_of(model)
    counts = torch.zeros(3, model.cfg.vocab_size, dtype=torch.long, device=device)
    per = {"nll": [], "tokens": [], "hits": [], "bytes": []}  # one entry an example
    for first in range(0, len(encoded), batch_size):
        chunk = encoded[first : first + batch_size]
        width = max(len(e.input_ids) for e in chunk) - 1  # padding after an example changes nothing
        ids, labels = pad_examples([(e.input_ids, e.labels) for e in chunk], width, 0)
        ids, labels = torch.from_numpy(ids).to(device), torch.from_numpy(labels).to(device)
        with autocast():
            logits = model(ids).float()
        mask = labels != IGNORE_INDEX
        nll = F.cross_entropy(logits.transpose(1, 2), labels, ignore_index=IGNORE_INDEX, reduction="none")
        guesses = logits.argmax(-1)
        counts += class_counts(labels[mask], guesses[mask], counts.size(1))
        per["nll"] += nll.sum(1).double().tolist()
        per["tokens"] += mask.sum(1).tolist()
        per["hits"] += ((guesses == labels) & mask).sum(1).tolist()
        per["bytes"] += [trained_bytes(e.labels, tokenizer) for e in chunk]  # as fine-tuning counts them
    scores = {"nll": sum(per["nll"]), "tokens": sum(per["tokens"]), "correct": sum(per["hits"]),
              "f1": f1_from_counts(counts), "bytes": sum(per["bytes"]), "examples": len(encoded),
              "truncated": report.truncated, "skipped": report.dropped_untrainable}  # fmt: skip
    if units:
        scores["units"] = per
    return scores
