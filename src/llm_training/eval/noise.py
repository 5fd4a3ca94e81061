"""How sure a comparison of models on the same test data is (``llm-compare``): a paired bootstrap.

Plain text is cut into blocks of its bytes (about ``BLOCK_BYTES`` each, at most ``MAX_BLOCKS``); each scored
token counts in the block where its bytes start, so models with different tokenizers are compared on the same
blocks. Labelled data: each item is a unit (its accuracy and F1); chat data: each conversation. The units are
resampled with replacement ``RESAMPLES`` times, the same draw for every model, and each model's metric is
computed again from the drawn units; the spread of those values is the standard error of its score. A
difference smaller than 1.96 standard errors of the difference of two scores is within noise: the models are
indistinguishable. (The paired interval, the same draws for both models, is reported too; it is narrower, and
a consistent but tiny difference, such as weights nudged in their fourth digit, passes it while being far
below what the test data can measure.)
"""

from __future__ import annotations

import math

import numpy as np

BLOCK_BYTES = 1024
MAX_BLOCKS = 200
MIN_UNITS = 8  # fewer blocks or items than this: no estimate
RESAMPLES = 2000
LOWER_IS_BETTER = {"loss", "perplexity", "bits_per_byte"}
PER_TOKEN = {"loss", "perplexity"}  # their values depend on the tokenizer (bits per byte does not)


def token_bytes(tokenizer) -> np.ndarray:
    """How many bytes of text each token id stands for (special tokens: none)."""
    from llm_training.data.tokenizer import _byte_to_unicode

    to_byte = {c: b for b, c in _byte_to_unicode().items()}
    special = {i for i, t in tokenizer.backend.get_added_tokens_decoder().items() if t.special}
    sizes = np.zeros(tokenizer.vocab_size, dtype=np.int64)
    for i in range(tokenizer.vocab_size):
        piece = tokenizer.backend.id_to_token(i)
        if i in special or piece is None:
            continue
        byte_level = all(c in to_byte for c in piece)  # a byte-level BPE piece: one character a byte
        sizes[i] = len(piece) if byte_level else len(tokenizer.decode([i]).encode())
    return sizes


def text_units(tokenizer, stream, token_nll, token_hit, total_bytes: int) -> dict:
    """Per block of the text's bytes: the summed negative log-likelihood, tokens scored, top-1 hits, bytes.
    ``token_nll``/``token_hit``: of each scored token, ``stream[1:]``, in order."""
    ids = np.asarray(stream, dtype=np.int64)
    sizes = token_bytes(tokenizer)[np.clip(ids, 0, tokenizer.vocab_size - 1)]
    starts = np.cumsum(sizes) - sizes  # the byte each token starts at
    blocks = int(min(MAX_BLOCKS, max(1, total_bytes // BLOCK_BYTES)))
    block = np.minimum(starts * blocks // max(1, total_bytes), blocks - 1)
    scored = block[1:]
    count = lambda where, weights=None: np.bincount(where, weights, minlength=blocks).tolist()  # noqa: E731
    return {"nll": count(scored, np.asarray(token_nll, dtype=np.float64)), "tokens": count(scored),
            "hits": count(scored, np.asarray(token_hit, dtype=np.float64)), "bytes": count(block, sizes)}  # fmt: skip


def _value(metric: str, sums: dict, items: dict | None):
    """The metric from units summed with weights (arrays: one value a resample)."""
    if items is not None and metric in ("accuracy", "f1"):
        return _item_value(metric, sums)
    loss = sums["nll"] / np.maximum(sums["tokens"], 1)
    if metric == "loss":
        return loss
    if metric == "perplexity":
        return np.exp(np.minimum(loss, 50.0))
    if metric == "bits_per_byte":
        return sums["nll"] / math.log(2) / np.maximum(sums["bytes"], 1)
    return sums["hits"] / np.maximum(sums["tokens"], 1)  # accuracy on plain text


def _item_value(metric: str, sums: dict):
    if metric == "accuracy":
        return sums["correct"] / np.maximum(sums["items"], 1)
    hits, answers, guesses = sums["class_hits"], sums["class_answers"], sums["class_guesses"]
    present = (answers + guesses) > 0
    f1 = np.where(present, 2 * hits / np.maximum(answers + guesses, 1e-12), 0.0)
    return f1.sum(-1) / np.maximum(present.sum(-1), 1)


def _unit_table(units: dict, metric: str) -> dict[str, np.ndarray] | None:
    """Per-unit columns for ``metric`` (to be summed with bootstrap weights); None: not decomposable."""
    items = units.get("items")
    if items is not None and metric in ("accuracy", "f1"):
        truth, guess = np.asarray(items["truth"]), np.asarray(items["predicted"])
        classes = np.arange(max(truth.max(), guess.max()) + 1)
        one_truth, one_guess = truth[:, None] == classes, guess[:, None] == classes
        return {"correct": (truth == guess).astype(float), "items": np.ones(len(truth)),
                "class_hits": (one_truth & one_guess).astype(float), "class_answers": one_truth.astype(float),
                "class_guesses": one_guess.astype(float)}  # fmt: skip
    if metric == "f1" or "nll" not in units:  # next-token macro F1 over the vocabulary: not per block
        return None
    return {k: np.asarray(units[k], dtype=np.float64) for k in ("nll", "tokens", "hits", "bytes")}


def _summed(table: dict[str, np.ndarray], weights: np.ndarray) -> dict:
    return {k: np.tensordot(weights, v, axes=(-1, 0)) for k, v in table.items()}


def compare_metric(metric: str, results: list[dict], units: list[dict], seed: int = 0) -> dict:
    """The verdict on ``metric`` for models evaluated on the same data: its best model(s), and each other
    model's difference from the best with its noise margin and paired 95% interval; ``best`` holds every
    model within noise of the top one. ``comparable`` False (with ``reason``) when the metric does not
    compare these models."""
    names = [r["model"] for r in results]
    lower = metric in LOWER_IS_BETTER
    verdict = {"metric": metric, "better": "lower" if lower else "higher", "comparable": True}
    kinds = {r.get("data_kind") for r in results}
    per_token = metric in PER_TOKEN or (metric in ("accuracy", "f1") and kinds <= {"text", "chat"})
    if per_token and len({u.get("tokenizer") for u in units}) > 1:
        return {**verdict, "comparable": False, "reason": "the models tokenize the test data differently; "
                "compare bits_per_byte" + ("" if kinds == {"text"} else " or accuracy")}  # fmt: skip
    values = [r[metric] for r in results]
    order = sorted(range(len(values)), key=lambda i: values[i] if lower else -values[i])
    top = order[0]
    verdict.update(order=[names[i] for i in order], best=[names[top]], differences=[])
    tables = [_unit_table(u, metric) for u in units]
    count = None if any(t is None for t in tables) else {len(next(iter(t.values()))) for t in tables}
    if count is None or len(count) != 1 or min(count) < MIN_UNITS:
        verdict["noise"] = (
            "not estimated: " + ("not decomposable into units" if count is None
                                 else f"{min(count or [0])} units of test data (fewer than {MIN_UNITS})")
        )  # fmt: skip
        return verdict
    (n,) = count
    unit = "items" if "correct" in tables[0] else f"blocks of about {BLOCK_BYTES} bytes"
    unit = "conversations" if kinds == {"chat"} else unit  # chat data: one unit a conversation (eval/chat.py)
    weights = np.random.default_rng(seed).multinomial(n, np.full(n, 1 / n), size=RESAMPLES).astype(float)
    drawn = [_value(metric, _summed(t, weights), units[0].get("items")) for t in tables]
    spread = [float(np.std(d, ddof=1)) for d in drawn]
    verdict.update(noise=f"bootstrap over {n} {unit}, {RESAMPLES} resamples", units=n,
                   standard_error=dict(zip(names, spread, strict=True)))  # fmt: skip
    for i in order[1:]:
        low, high = np.percentile(drawn[i] - drawn[top], [2.5, 97.5])
        margin = 1.96 * math.hypot(spread[i], spread[top])
        within = bool(abs(values[i] - values[top]) <= margin or low <= 0 <= high)
        verdict["differences"].append({"model": names[i], "difference": values[i] - values[top], "margin": margin,
                                       "paired_low": float(low), "paired_high": float(high),
                                       "within_noise": within})  # fmt: skip
        if within:
            verdict["best"].append(names[i])
    return verdict


def ranking_metric(results: list[dict], metrics: list[str]) -> str | None:
    """What models are ranked by: accuracy on labelled data, else bits per byte (the same order as loss
    with one tokenizer, and still meaningful across tokenizers); else the first metric."""
    labelled = any(r.get("data_kind") in ("choices", "labels") for r in results)
    for name in ("accuracy", "bits_per_byte") if labelled else ("bits_per_byte", "loss", "perplexity"):
        if name in metrics:
            return name
    return metrics[0] if metrics else None
