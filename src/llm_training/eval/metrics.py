"""Metrics of a model on test data (the definitions are also printed by ``llm-evaluate --help``).

Plain text: every document is tokenized and followed by end-of-text, the stream is cut into non-overlapping
windows of the model's context, and each next token is scored. Labelled data: each choice is scored by the
sum of the log-probabilities of its tokens after the prompt; the highest-scoring choice is the prediction.
"""

from __future__ import annotations

import contextlib
import logging
import math

import torch
import torch.nn.functional as F

from llm_training.errors import ConfigError
from llm_training.eval.data import ChatSet, ChoiceSet, TextSet
from llm_training.model.transformer import device_of

log = logging.getLogger("llm_training.evaluate")

METRICS = {
    "loss": "mean next-token cross-entropy, nats per token (labelled data: over the prompt + correct answer; "
    "chat data: over the assistant's tokens)",
    "perplexity": "exp(loss)",
    "bits_per_byte": "total negative log-likelihood in bits / UTF-8 bytes of the scored text",
    "accuracy": "plain text: share of next tokens that are the model's top prediction; labelled data: share "
    "of items whose highest-scoring choice is the answer",
    "f1": "macro F1, the unweighted mean of 2PR/(P+R) over classes that occur as answer or prediction; "
    "labelled data: the answer classes; plain text: next-token prediction, each vocabulary token a class",
}


def parse_metrics(spec: str | list[str] | None) -> list[str]:
    names = (
        spec.split(",")
        if isinstance(spec, str)
        else list(spec or ["loss", "perplexity", "bits_per_byte", "accuracy"])
    )
    names = [n.strip().lower().replace("-", "_") for n in names if n.strip()]
    unknown = [n for n in names if n not in METRICS]
    if unknown or not names:
        raise ConfigError(
            f"--metrics: unknown {', '.join(unknown) or '(none given)'}; valid: {', '.join(METRICS)}"
        )
    return list(dict.fromkeys(names))


@torch.no_grad()
def score_tokens(
    model, stream: list[int], batch_size: int = 16, autocast=None, per_token: bool = False
) -> dict:
    """Next-token scores of a token stream cut into non-overlapping windows of the model's context:
    summed negative log-likelihood (nats), tokens scored, how many were the top prediction, and the
    next-token macro F1 (each vocabulary token a class); ``per_token``: also each scored token's
    negative log-likelihood and whether it was the top prediction (``token_nll``, ``token_hit``)."""
    if len(stream) < 2:
        raise ConfigError("the test text is too short to score (fewer than 2 tokens)")
    autocast = autocast or contextlib.nullcontext
    device = device_of(model)
    context = model.cfg.max_seq_length
    tokens = torch.as_tensor(stream, dtype=torch.long)  # a list or a numpy array of ids
    starts = list(range(0, len(stream) - 1, context))
    nll = 0.0
    counts = torch.zeros(3, model.cfg.vocab_size, dtype=torch.long, device=device)  # hits, answers, guesses
    kept = []
    for b in range(0, len(starts), batch_size):
        rows = [tokens[s : s + context + 1] for s in starts[b : b + batch_size]]
        width = max(len(r) for r in rows)
        ids = torch.zeros(len(rows), width - 1, dtype=torch.long)
        labels = torch.full((len(rows), width - 1), -100, dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, : len(r) - 1], labels[i, : len(r) - 1] = r[:-1], r[1:]
        ids, labels = ids.to(device), labels.to(device)
        with autocast():
            logits = model(ids).float()
        mask = labels != -100
        losses = F.cross_entropy(logits[mask], labels[mask], reduction="none")
        nll += float(losses.sum())
        guesses = logits.argmax(-1)[mask]
        counts += class_counts(labels[mask], guesses, counts.size(1))
        if per_token:  # rows are windows in order: the masked tokens are the stream's, in order
            kept.append((losses.cpu(), (guesses == labels[mask]).cpu()))
    hits, targets, _ = counts.sum(1).tolist()  # every hit is a correct top prediction; every answer a token
    scores = {"nll": nll, "tokens": targets, "correct": hits, "f1": f1_from_counts(counts)}
    if per_token:
        scores["token_nll"], scores["token_hit"] = (torch.cat(x).numpy() for x in zip(*kept, strict=True))
    return scores


def class_counts(truth: torch.Tensor, guess: torch.Tensor, classes: int) -> torch.Tensor:
    """(3, classes): per class, the correct predictions, the answers and the predictions."""
    count = lambda x: torch.bincount(x, minlength=classes)  # noqa: E731
    return torch.stack([count(truth[guess == truth]), count(truth), count(guess)])


def f1_from_counts(counts: torch.Tensor) -> float:
    """Macro F1 from ``class_counts``: 2TP / (2TP + FP + FN), averaged over the classes that occur as an
    answer or a prediction."""
    hits, targets, guesses = counts
    present = (targets + guesses) > 0
    if not bool(present.any()):
        return 0.0
    return float((2 * hits[present] / (targets[present] + guesses[present])).mean())


def text_metrics(scores: dict, num_bytes: float) -> dict:
    """loss, perplexity, bits per byte and accuracy from ``score_tokens``' sums (see ``METRICS``)."""
    loss = scores["nll"] / max(1, scores["tokens"])
    return {"loss": loss, "perplexity": math.exp(min(loss, 50.0)),
            "bits_per_byte": scores["nll"] / math.log(2) / max(1, num_bytes),
            "accuracy": scores["correct"] / max(1, scores["tokens"]), "f1": scores["f1"]}  # fmt: skip


def token_stream(tokenizer, documents: list[str], limit: int | None = None, chunk: int = 32) -> list[int]:
    """The documents' tokens, each followed by end-of-text; with ``limit``, its first ``limit`` tokens
    (documents are encoded a chunk at a time, so those past the limit are never encoded)."""
    stream: list[int] = []
    for first in range(0, len(documents), chunk):
        for ids in tokenizer.encode_batch(documents[first : first + chunk]):
            stream += ids + [tokenizer.eot_id]
        if limit is not None and len(stream) >= limit:
            return stream[:limit]
    return stream


def _text_scores(
    model, tokenizer, documents: list[str], batch_size: int, autocast, units: bool = False
) -> dict:
    """``units``: also the scores per block of the text (``noise.text_units``), for ``llm-compare``."""
    stream = token_stream(tokenizer, documents)
    scores = score_tokens(model, stream, batch_size, autocast, per_token=units)
    scores["bytes"] = sum(len(d.encode()) for d in documents)
    if units:
        from llm_training.eval.noise import text_units

        token_scores = scores.pop("token_nll"), scores.pop("token_hit")
        scores["units"] = text_units(tokenizer, stream, *token_scores, scores["bytes"])
    return scores


@torch.no_grad()
def _choice_logprobs(model, tokenizer, items, batch_size: int, autocast) -> list[list[float]]:
    """Sum of log-probabilities of each choice's tokens after its prompt (the prompt cut from the left)."""
    device = device_of(model)
    context = model.cfg.max_seq_length
    pairs, cut = [], 0
    for item in items:
        prompt = tokenizer.encode(item.prompt) or [tokenizer.eot_id]
        for choice in item.choices:
            tail = tokenizer.encode(choice if item.prompt[-1:].isspace() else " " + choice)
            kept = (prompt[-(context + 1 - min(len(tail), context - 1)) :], tail[: context - 1])
            cut += len(kept[0]) + len(kept[1]) < len(prompt) + len(tail)
            pairs.append(kept)
    if cut:
        log.warning("%d of %d prompt + choice pairs are longer than the context (%d tokens): the prompt was "
                    "cut from the left (and the choice from the right) to fit", cut, len(pairs), context)  # fmt: skip
    scores = []
    for b in range(0, len(pairs), batch_size):
        chunk = pairs[b : b + batch_size]
        width = max(len(p) + len(t) for p, t in chunk) - 1
        ids = torch.zeros(len(chunk), width, dtype=torch.long)
        labels = torch.full((len(chunk), width), -100, dtype=torch.long)
        for i, (p, t) in enumerate(chunk):
            seq = torch.tensor(p + t)
            ids[i, : len(seq) - 1] = seq[:-1]
            labels[i, len(p) - 1 : len(seq) - 1] = seq[len(p) :]
        ids, labels = ids.to(device), labels.to(device)
        with autocast():
            logp = torch.log_softmax(model(ids).float(), dim=-1)
        picked = logp.gather(-1, labels.clamp(min=0)[..., None]).squeeze(-1) * (labels != -100)
        scores += picked.sum(-1).tolist()
    out, k = [], 0
    for item in items:
        out.append(scores[k : k + len(item.choices)])
        k += len(item.choices)
    return out


def macro_f1(truth: list[int], predicted: list[int], classes: int) -> float:
    return f1_from_counts(class_counts(torch.tensor(truth), torch.tensor(predicted), classes))


def evaluate_model(
    model,
    tokenizer,
    data: TextSet | ChoiceSet | ChatSet,
    metrics: list[str],
    batch_size: int = 16,
    autocast=None,
    units: bool = False,
    template=None,
) -> dict:
    """The requested metrics (and counts) of ``model`` on ``data``, as a flat dict; ``units``: with the
    scores per block of text, per item or per conversation under ``"units"`` (what ``noise.compare_metric``
    resamples); ``template``: the chat template of chat data (``eval.chat.model_template``)."""
    autocast = autocast or contextlib.nullcontext
    was_training = model.training
    model.eval()
    try:
        if isinstance(data, TextSet):
            s = _text_scores(model, tokenizer, data.documents, batch_size, autocast, units)
            results = {"data_kind": "text", "documents": len(data.documents), "tokens": s["tokens"]}
            values, per_unit = {}, s.get("units")
        elif isinstance(data, ChatSet):  # the assistant's tokens only, as fine-tuning counts them
            from llm_training.eval.chat import chat_scores

            if template is None:
                raise ConfigError("chat test data needs the model's chat template")
            s = chat_scores(model, tokenizer, template, data.examples, batch_size, autocast, units)
            results = {"data_kind": "chat", "format": data.format, "examples": s["examples"],
                       "truncated": s["truncated"], "skipped": s["skipped"], "tokens": s["tokens"]}  # fmt: skip
            values, per_unit = {}, s.get("units")
        else:
            scores = _choice_logprobs(model, tokenizer, data.items, batch_size, autocast)
            predicted = [max(range(len(row)), key=row.__getitem__) for row in scores]
            truth = [item.answer for item in data.items]
            classes = max(len(item.choices) for item in data.items)
            values = {"accuracy": sum(p == t for p, t in zip(predicted, truth, strict=True)) / len(truth),
                      "f1": macro_f1(truth, predicted, classes)}  # fmt: skip
            results = {"data_kind": data.kind, "items": len(truth)}
            per_unit = {"items": {"truth": truth, "predicted": predicted}}
            if data.labels:
                results["labels"] = data.labels
            s = None
            if any(m in ("loss", "perplexity", "bits_per_byte") for m in metrics):  # over prompt + answer
                gold = [item.prompt + ("" if item.prompt[-1:].isspace() else " ") + item.choices[item.answer]
                        for item in data.items]  # fmt: skip
                s = _text_scores(model, tokenizer, gold, batch_size, autocast, units)
                results["tokens"] = s["tokens"]
                per_unit.update(s.get("units", {}))
        if s is not None:  # labelled data keeps its own accuracy
            values = {**text_metrics(s, s["bytes"]), **values}
        if units:
            results["units"] = {**per_unit, "tokenizer": getattr(tokenizer, "fingerprint", None)}
        return {**results, **{m: values[m] for m in metrics}}
    finally:
        model.train(was_training)
