"""The serving engine: one model, one worker thread that owns it, and a queue of requests that the worker
takes in batches.

Concurrent requests are gathered for up to ``batch_wait`` seconds (or until ``max_batch_size`` are waiting)
and generated together: one batched ``generate_tokens`` per group of requests with the same sampling
settings, each row with its own ``max_new_tokens`` and stop texts. With ``batching=False`` the worker takes
one request at a time (the baseline of the load benchmark). ``submit`` is thread-safe and returns a
``Job`` whose ``future`` resolves to the completion; ``on_text`` streams text as it is generated;
``cancel`` drops a job that waits and ends the row of one that is being generated (a request that timed out
or whose client left).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path

from llm_training.errors import UserError

log = logging.getLogger("llm_training.serve")


class Overloaded(UserError):
    """More requests are waiting than ``max_pending`` allows (HTTP 429)."""


class Unavailable(UserError):
    """The engine is not running: loading, or shutting down (HTTP 503)."""


@dataclass
class Request:
    prompt: str
    max_new_tokens: int = 64
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None
    ids: list[int] | None = None  # the prompt's tokens when the caller already has them

    def group(self) -> tuple:
        """Requests generated together must share these."""
        return (self.temperature, self.top_k, self.top_p, self.repetition_penalty, self.seed, self.stop)


@dataclass
class Completion:
    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str  # "stop" (end of text or a stop text) or "length"


@dataclass
class Job:
    request: Request
    future: Future = field(default_factory=Future)
    on_text: Callable[[str], None] | None = None  # receives each new piece of text (streaming)
    sent: int = 0  # characters streamed so far
    aborted: bool = False  # set by Engine.cancel: the row stops at its next token


class Engine:
    def __init__(self, model_path: str, device: str = "auto", max_batch_size: int = 32, batch_wait: float = 0.005,
                 batching: bool = True, max_pending: int = 256, truncate: bool = True,
                 compile: bool = False, model_format: str = "auto") -> None:  # fmt: skip
        self.model_path, self.device_name, self.model_format = model_path, device, model_format
        self.model_id = Path(model_path).name
        self.max_batch_size = max_batch_size if batching else 1
        self.batch_wait = batch_wait if batching else 0.0
        self.max_pending, self.truncate, self.compile = max_pending, truncate, compile
        self.queue: queue.Queue[Job | None] = queue.Queue()
        self.pending = 0  # submitted, not finished
        self.lock = threading.Lock()
        self.stopping = False
        self.loaded = None
        self.on_batch: Callable[[int], None] | None = None  # told each batch's size (the metrics)
        self.thread = threading.Thread(target=self._work, name="llm-serve-engine", daemon=True)

    # -------------------------------------------------------------------------------------------- control

    def load(self) -> None:
        """Load the model (in the caller's thread, so a bad path fails the start) and start the worker."""
        from llm_training.export.runtime import load_for_generation

        self.loaded = load_for_generation(self.model_path, self.device_name, self.model_format)
        self.thread.start()

    @property
    def context(self) -> int:
        return self.loaded.cfg.max_seq_length

    def encode(self, text: str) -> list[int]:
        return self.loaded.tokenizer.encode(text)

    def submit(self, request: Request, on_text: Callable[[str], None] | None = None) -> Job:
        return self.submit_many([request], [on_text])[0]

    def submit_many(
        self, requests: list[Request], on_texts: list[Callable[[str], None] | None] | None = None
    ) -> list[Job]:
        """All of ``requests`` or none: an HTTP request's rows (prompts x n) are admitted together, so a 429
        never leaves some of them generating for a client that was told to retry."""
        if self.stopping or self.loaded is None:
            raise Unavailable("the model is not serving (starting or shutting down)")
        with self.lock:
            if self.pending + len(requests) > self.max_pending:
                raise Overloaded(f"{self.pending} requests are waiting and this one adds {len(requests)} "
                                 f"(limit {self.max_pending}); retry later")  # fmt: skip
            self.pending += len(requests)
        jobs = [Job(r, on_text=f) for r, f in zip(requests, on_texts or [None] * len(requests), strict=True)]
        for job in jobs:
            job.future.add_done_callback(self._finished)
            self.queue.put(job)
        return jobs

    def cancel(self, job: Job) -> None:
        """Drop a job that waits; end the row of one being generated (its result is then discarded)."""
        if not job.future.cancel():  # running or done
            job.aborted = True

    def _finished(self, _future) -> None:
        with self.lock:
            self.pending -= 1

    def close(self, timeout: float = 30.0) -> None:
        """Stop taking requests and finish those already submitted."""
        self.stopping = True
        self.queue.put(None)
        if self.thread.is_alive():
            self.thread.join(timeout)

    # --------------------------------------------------------------------------------------------- worker

    def _take_batch(self) -> list[Job] | None:
        first = self.queue.get()
        if first is None:
            return None
        batch = [first]
        deadline = time.monotonic() + self.batch_wait
        while len(batch) < self.max_batch_size:
            remaining = deadline - time.monotonic()
            try:
                job = self.queue.get(timeout=remaining) if remaining > 0 else self.queue.get_nowait()
            except queue.Empty:
                break
            if job is None:
                self.queue.put(None)  # keep the stop signal for the loop
                break
            batch.append(job)
        return batch

    def _work(self) -> None:
        while True:
            batch = self._take_batch()
            if batch is None:
                return
            live = [job for job in batch if job.future.set_running_or_notify_cancel()]
            groups: dict[tuple, list[Job]] = {}
            for job in live:
                groups.setdefault(job.request.group(), []).append(job)
            if self.on_batch is not None:
                self.on_batch(len(live))
            for jobs in groups.values():
                try:
                    self._generate(jobs)
                except Exception as exc:  # a failure answers these requests, never kills the worker
                    log.exception("generation failed")
                    for job in jobs:
                        if not job.future.done():
                            job.future.set_exception(exc)

    def _generate(self, jobs: list[Job]) -> None:
        from llm_training.model.generate import Sampling, completion_text, generate_tokens, stop_text_check

        tok = self.loaded.tokenizer
        first = jobs[0].request
        stops = first.stop  # shared by the group
        sampling = Sampling(max(j.request.max_new_tokens for j in jobs), first.temperature, first.top_k, first.top_p,
                            first.repetition_penalty, first.seed)  # fmt: skip
        prompts = [j.request.ids if j.request.ids is not None else tok.encode(j.request.prompt) for j in jobs]

        def on_update(i: int, tokens: list[int], finished: bool) -> None:
            job = jobs[i]
            if job.on_text is None:
                return
            safe = completion_text(tok, tokens, stops) if finished else _streamable(tok.decode(tokens), stops)
            if len(safe) > job.sent:
                job.on_text(safe[job.sent :])
                job.sent = len(safe)

        streaming = any(j.on_text is not None for j in jobs)
        new = generate_tokens(self.loaded.module, prompts, sampling, eos_id=tok.eot_id, truncate=self.truncate,
                              limits=[j.request.max_new_tokens for j in jobs],
                              stop_check=stop_text_check(tok, stops), on_update=on_update if streaming else None,
                              cancelled=lambda i: jobs[i].aborted, compile=self.compile)  # fmt: skip
        for i, job in enumerate(jobs):  # streamed rows got their last text as they finished
            reason = "length" if len(new[i]) >= job.request.max_new_tokens else "stop"
            job.future.set_result(
                Completion(completion_text(tok, new[i], stops), len(prompts[i]), len(new[i]), reason)
            )


def _streamable(text: str, stops: tuple[str, ...]) -> str:
    """What may be sent now: not a trailing partial character, nor the start of a stop text."""
    text = text.rstrip("\ufffd")
    hold = 0
    for stop in stops:
        for k in range(min(len(stop) - 1, len(text)), 0, -1):
            if text.endswith(stop[:k]):
                hold = max(hold, k)
                break
    return text[: len(text) - hold] if hold else text
