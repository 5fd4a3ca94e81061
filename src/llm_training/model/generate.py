"""Generating tokens: a KV cache, batched prompts of different lengths, and the usual sampling controls.

``generate_tokens`` is the core: prompts (lists of ids, any lengths) are left-padded into one batch; the
first forward pass fills the cache with every prompt token, then each step feeds one new token per row.
Sampling, per row: repetition penalty (CTRL / Hugging Face convention: a seen token's logit is divided by
the penalty when positive, multiplied when negative), then greedy (temperature 0) or temperature, top-k and
top-p (nucleus) sampling from a seeded generator. A row ends at the end-of-text id or a stop sequence
(neither is returned). ``use_cache=False`` recomputes the whole sequence every step (the baseline of the
benchmark).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass

import torch

from llm_training.model.transformer import KVCache, Transformer, device_of

log = logging.getLogger("llm_training.generate")

LOOKAHEAD = 8  # decoding steps queued on the device before their tokens are read back


@dataclass
class Sampling:
    max_new_tokens: int = 64
    temperature: float = 0.8  # 0: greedy
    top_k: int = 0  # 0: off
    top_p: float = 1.0  # 1: off
    repetition_penalty: float = 1.0  # 1: off
    seed: int | None = None

    def check(self) -> None:
        if self.max_new_tokens < 0 or self.temperature < 0 or self.top_k < 0:
            raise ValueError("max_new_tokens, temperature and top_k cannot be negative")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if not 0 < self.repetition_penalty < math.inf:
            raise ValueError(f"repetition_penalty must be positive and finite, got {self.repetition_penalty}")
        if not self.temperature < math.inf:  # also NaN
            raise ValueError(f"temperature must be finite, got {self.temperature}")
        if self.seed is not None and not -(2**63) <= self.seed < 2**63:  # torch's seeds are 64-bit
            raise ValueError(f"seed must fit in 64 bits, got {self.seed}")


def fit_prompt(prompt: list[int], max_new: int, context: int, truncate: bool = True) -> list[int]:
    """Keep the end of a prompt that leaves room for ``max_new`` tokens; raise instead when not truncating."""
    room = max(1, context - max_new)
    if len(prompt) <= room:
        return prompt
    if not truncate:
        raise ValueError(
            f"prompt of {len(prompt)} tokens + {max_new} new tokens exceeds the context of {context} tokens"
        )
    log.warning(
        "prompt of %d tokens cut to its last %d (context %d, %d new)", len(prompt), room, context, max_new
    )
    return prompt[-room:]


def pick_next(logits: torch.Tensor, seen: torch.Tensor, s: Sampling, generator) -> torch.Tensor:
    """One token id per row from ``logits`` (B, V) float; ``seen`` (B, V) bool marks tokens so far."""
    if s.repetition_penalty != 1.0:
        penalised = torch.where(logits > 0, logits / s.repetition_penalty, logits * s.repetition_penalty)
        logits = torch.where(seen, penalised, logits)
    if s.temperature <= 0:
        return logits.argmax(dim=-1)
    logits = logits / s.temperature
    if s.top_k:
        kth = torch.topk(logits, min(s.top_k, logits.size(-1))).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if s.top_p < 1.0:
        ordered, order = torch.sort(logits, descending=True)
        before = torch.softmax(ordered, dim=-1).cumsum(dim=-1) - torch.softmax(ordered, dim=-1)
        ordered = ordered.masked_fill(before >= s.top_p, float("-inf"))  # the first token always stays
        logits = torch.full_like(logits, float("-inf")).scatter(1, order, ordered)
    return torch.multinomial(torch.softmax(logits, dim=-1), 1, generator=generator).squeeze(1)


def _ends_with(seq: list[int], stops: Sequence[Sequence[int]]) -> int:
    for stop in stops:
        if stop and len(seq) >= len(stop) and seq[-len(stop) :] == list(stop):
            return len(stop)
    return 0


def completion_text(tokenizer, ids: Sequence[int], stops: Sequence[str]) -> str:
    """The new tokens as text, cut at the first stop text."""
    text = tokenizer.decode(ids)
    for stop in stops:
        text = text.split(stop)[0]
    return text


def stop_text_check(tokenizer, stops: Sequence[str]) -> Callable[[list[int]], int] | None:
    """A ``stop_check`` for stop texts: when one appears in the decoded end of the new tokens, how many
    trailing tokens to drop so that none remains (0: go on). None without stop texts.

    Called after every new token, it decodes only a tail window (about as many tokens as the longest stop
    has characters, enough for that many characters before the last token's text): the cost of a step does
    not grow with the text generated so far."""
    if not stops:
        return None
    longest = max(map(len, stops))

    def check(new: list[int]) -> int:
        width = longest + 2
        while True:  # a token is at least a byte, usually a character or more: rarely more than one pass
            text = tokenizer.decode(new[-width:])
            # one character more than needed: the window's first one may be a partial character
            if width >= len(new) or len(text) > longest + len(tokenizer.decode(new[-1:])):
                break
            width *= 2
        if not any(stop in text for stop in stops):
            return 0
        window = new[-width:]
        return next(
            k for k in range(1, len(window) + 1) if not any(s in tokenizer.decode(window[:-k]) for s in stops)
        )

    return check


def generate_tokens(
    model,
    prompts: Sequence[Sequence[int]],
    sampling: Sampling | None = None,
    *,
    eos_id: int | None = None,
    stop_ids: Sequence[Sequence[int]] = (),
    stop_check: Callable[[list[int]], int] | None = None,
    autocast=None,
    use_cache: bool = True,
    truncate: bool = True,
    cuda_graphs: bool = True,
    limits: Sequence[int] | None = None,
    on_update: Callable[[int, list[int], bool], None] | None = None,
    cancelled: Callable[[int], bool] | None = None,
    compile: bool = False,
) -> list[list[int]]:
    """The new tokens of each prompt (without a final end-of-text or stop sequence).

    ``stop_check(new_tokens)`` may return how many trailing tokens to drop to end that row (0: go on); the
    text layer uses it for stop strings. ``autocast``: a context manager factory for mixed precision (on
    CUDA, prefer casting the model: decoding steps are then replayed as CUDA graphs, ``cuda_graphs``).
    ``limits``: a ``max_new_tokens`` per row (instead of the sampling's). ``on_update(row, new_tokens,
    finished)`` is called whenever a row gains a token or ends (streaming). ``cancelled(row)`` True ends
    that row at once, keeping its tokens so far (a request that timed out, a client that left).
    ``compile``: on CUDA, the decoding step is also compiled by ``torch.compile`` before it is recorded,
    fusing its small kernels (about 10 s the first time for a 124M model and for a new batch shape;
    1.4 to 1.7x the tokens/s after that); ignored where there are no CUDA graphs.
    """
    steps = generate_steps(model, prompts, sampling, eos_id=eos_id, stop_ids=stop_ids, stop_check=stop_check,
                           autocast=autocast, use_cache=use_cache, truncate=truncate, cuda_graphs=cuda_graphs,
                           limits=limits, on_update=on_update, cancelled=cancelled, compile=compile)  # fmt: skip
    while True:
        try:
            next(steps)
        except StopIteration as end:
            return end.value


@torch.no_grad()
def generate_steps(
    model,
    prompts: Sequence[Sequence[int]],
    sampling: Sampling | None = None,
    *,
    eos_id: int | None = None,
    stop_ids: Sequence[Sequence[int]] = (),
    stop_check: Callable[[list[int]], int] | None = None,
    autocast=None,
    use_cache: bool = True,
    truncate: bool = True,
    cuda_graphs: bool = True,
    limits: Sequence[int] | None = None,
    on_update: Callable[[int, list[int], bool], None] | None = None,
    cancelled: Callable[[int], bool] | None = None,
    compile: bool = False,
) -> Generator[None, None, list[list[int]]]:
    """``generate_tokens`` one read-back at a time: a generator that yields after every few decoding steps
    (``LOOKAHEAD``) and returns the new tokens. The server interleaves several generations this way, so
    that a long one does not hold a short one that came later. Arguments: those of ``generate_tokens``.
    """
    s = sampling or Sampling()
    s.check()
    if not prompts:
        return []
    device = device_of(model)
    context = model.cfg.max_seq_length
    max_new = s.max_new_tokens
    # a prompt keeps at most context - 1 tokens (room for one new); past the context, generation slides
    history = [fit_prompt(list(p) or [eos_id or 0], 1, context, truncate) for p in prompts]
    generator = torch.Generator(device=device).manual_seed(s.seed) if s.seed is not None else None
    seen = torch.zeros(len(history), model.cfg.vocab_size, dtype=torch.bool, device=device)
    for i, row in enumerate(history):
        seen[i, torch.tensor(row, device=device)] = True
    was_training = model.training
    model.eval()
    out: list[list[int]] = [[] for _ in history]
    limit = list(limits) if limits is not None else [max_new] * len(history)
    done = [n <= 0 for n in limit]
    cache, next_ids, decode = None, None, None
    # decoding steps as CUDA graphs: one launch a token instead of hundreds (batch 1 is launch-bound)
    graphs = (
        cuda_graphs
        and use_cache
        and device.type == "cuda"
        and autocast is None
        and isinstance(model, Transformer)
    )
    # tokens are read back to the host every ``ahead`` steps, not at every step: the device then decodes
    # while the host reads and checks (a row that ended meanwhile wastes a few steps, never changes output)
    pending: list[torch.Tensor] = []
    ahead = 1  # the first token at once (streaming), then up to LOOKAHEAD at a time

    def take(tokens: list[int], i: int) -> None:
        history[i].append(tokens[i])
        if done[i]:
            return
        if tokens[i] == eos_id or cancelled is not None and cancelled(i):
            done[i] = True
        else:
            out[i].append(tokens[i])
            cut = _ends_with(out[i], stop_ids) or (stop_check(out[i]) if stop_check else 0)
            if cut:
                del out[i][len(out[i]) - cut :]
            done[i] = bool(cut) or len(out[i]) >= limit[i]
        if on_update is not None:
            on_update(i, out[i], done[i])

    def read_back() -> None:
        nonlocal ahead
        for tokens in torch.stack(pending).tolist():  # one device-to-host copy for every pending step
            for i in range(len(history)):
                take(tokens, i)
        pending.clear()
        ahead = LOOKAHEAD if use_cache else 1  # recomputing reads every row's history at every step

    try:
        while not all(done):
            with (autocast or contextlib.nullcontext)():
                if not use_cache:  # recompute the last context tokens of every row
                    rows = [h[-context:] for h in history]
                    if len({len(r) for r in rows}) == 1:  # no padding: the plain causal forward pass
                        logits = model(torch.tensor(rows, device=device))[:, -1, :].float()
                    else:
                        logits = _prefill(model, rows, context, device)[1]
                elif cache is None or cache.full:  # first step, or the cache is full:
                    keep = context if cache is None else context // 2  # start again from the recent half
                    cache, logits = _prefill(model, [h[-keep:] for h in history], context, device)
                else:
                    if decode is None or decode.cache is not cache:
                        decode = _DecodeStep(model, cache, graphs, compile)
                    logits = decode(next_ids)
            next_ids = pick_next(logits, seen, s, generator)
            seen.scatter_(1, next_ids[:, None], True)
            pending.append(next_ids)
            # read back when ``ahead`` steps are pending, when some row may reach its limit, and before the
            # cache is refilled from the host's history
            left = min(limit[i] - len(out[i]) for i in range(len(history)) if not done[i])
            if len(pending) >= min(ahead, left) or cache is not None and cache.full:
                read_back()
                yield
    finally:
        model.train(was_training)
    return out


def _decode_step(model: Transformer, ids: torch.Tensor, cache: KVCache, ones: torch.Tensor) -> torch.Tensor:
    """One token per row through the model and into the cache: device work only (no host-side reads), so
    it can be compiled and recorded."""
    cache.prepare(ones)
    logits = model(ids, cache=cache)[:, -1, :].float()
    cache.cursor += 1
    return logits


@functools.cache
def compiled_decode_step():
    """``_decode_step`` compiled once per process (shapes: a second batch size makes the batch dynamic)."""
    return torch.compile(_decode_step)


class _DecodeStep:
    """One decoding step (a token per row) over ``cache``. With ``graphs``: run eagerly (or compiled) the
    first time, which also warms up the kernels, recorded as a CUDA graph the second time, replayed after
    that. Everything the step reads and writes is a device tensor of fixed shape (the cache's buffers,
    cursor and positions), so a replay is exactly the first step's computation. Without: run every time."""

    def __init__(self, model, cache: KVCache, graphs: bool, compile: bool = False) -> None:
        self.model, self.cache, self.graphs = model, cache, graphs
        self.step = compiled_decode_step() if compile and graphs else _decode_step
        batch = cache.valid.size(0)
        self.ids = torch.zeros(batch, 1, dtype=torch.long, device=cache.valid.device)
        self.ones = torch.ones(batch, 1, dtype=torch.bool, device=cache.valid.device)
        self.graph: torch.cuda.CUDAGraph | None = None
        self.logits: torch.Tensor | None = None
        self.calls = 0

    def _body(self) -> torch.Tensor:
        self.cache.check_room(1)  # the caller refills a full cache first
        return self.step(self.model, self.ids, self.cache, self.ones)

    def __call__(self, next_ids: torch.Tensor) -> torch.Tensor:
        self.ids.copy_(next_ids[:, None])
        self.calls += 1
        if not self.graphs or self.calls == 1:
            logits = self._body()
        else:
            if self.graph is None:
                torch.cuda.synchronize()
                self.graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(self.graph):
                    self.logits = self._body()
            self.graph.replay()
            logits = self.logits.clone()
        self.cache.length += 1
        return logits


def _prefill(model, rows: list[list[int]], context: int, device) -> tuple[KVCache, torch.Tensor]:
    """A new cache holding ``rows`` (left-padded), and the logits after each row's last token."""
    width = max(map(len, rows))
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    valid = torch.zeros(len(rows), width, dtype=torch.bool)
    for i, row in enumerate(rows):
        ids[i, width - len(row) :] = torch.tensor(row)
        valid[i, width - len(row) :] = True
    cache = KVCache(model, len(rows), context, device)
    cache.step(valid.to(device))
    logits = model(ids.to(device), cache=cache)[:, -1, :].float()
    cache.advance()
    return cache, logits


@torch.no_grad()
def generate(
    model,
    input_ids: torch.Tensor,
    max_new_tokens: int,
    *,
    temperature: float = 0.8,
    top_k: int = 50,
    top_p: float = 1.0,
    repetition_penalty: float = 1.0,
    eos_id: int | None = None,
    generator: torch.Generator | None = None,
    seed: int | None = None,
) -> torch.Tensor:
    """``input_ids`` (B, T) followed by the new tokens, as one tensor (rows that ended early are padded with
    ``eos_id`` or 0). A ``generator`` is used for its seed."""
    if generator is not None and seed is None:
        seed = generator.initial_seed()
    sampling = Sampling(max_new_tokens, temperature, top_k, top_p, repetition_penalty, seed)
    new = generate_tokens(model, input_ids.tolist(), sampling, eos_id=eos_id)
    longest = max((len(n) for n in new), default=0)
    pad = eos_id if eos_id is not None else 0
    tail = torch.full((input_ids.size(0), longest), pad, dtype=input_ids.dtype)
    for i, n in enumerate(new):
        tail[i, : len(n)] = torch.tensor(n, dtype=input_ids.dtype)
    return torch.cat([input_ids, tail.to(input_ids.device)], dim=1)
