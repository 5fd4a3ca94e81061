"""The serving engine: one model, one worker thread that owns it, and a queue of requests that the worker
takes in batches.

Concurrent requests are gathered for up to ``batch_wait`` seconds (or until ``max_batch_size`` are waiting)
and generated together: one batched generation per group of requests with the same sampling settings,
each row with its own ``max_new_tokens``. Generations run interleaved, a few steps each in turn, and a
row is answered when it ends: requests that arrive meanwhile start at once instead of waiting for the
longest row of the batch before them. With ``batching=False`` the worker takes one request at a time (the
baseline of the load benchmark). ``submit`` is thread-safe and returns a
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
    stop_ids: tuple[tuple[int, ...], ...] = ()  # ids that end a row, left out (a chat's end of turn)

    def group(self) -> tuple:
        """Requests generated together must share these."""
        return (self.temperature, self.top_k, self.top_p, self.repetition_penalty, self.seed, self.stop,
                self.stop_ids)  # fmt: skip


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
    aborted: bool = False  # set by Engine.cancel: the row stops at its next token
    text: _Streamed | None = None  # a streamed row's text so far (set by the engine)


class Engine:
    def __init__(self, model_path: str, device: str = "auto", max_batch_size: int = 32, batch_wait: float = 0.005,
                 batching: bool = True, max_pending: int = 256, truncate: bool = True,
                 compile: bool = False, model_format: str = "auto") -> None:  # fmt: skip
        self.model_path, self.device_name, self.model_format = model_path, device, model_format
        self.model_id = Path(model_path).name
        self.max_batch_size = max_batch_size if batching else 1
        self.batch_wait = batch_wait if batching else 0.0
        self.max_pending, self.truncate, self.compile = max_pending, truncate, compile
        self.max_active = 8  # generations interleaved at most; later requests wait for one to end
        self.queue: queue.Queue[Job | None] = queue.Queue()
        self.pending = 0  # submitted, not finished
        self.lock = threading.Lock()
        self.stopping = False
        self.loaded = None
        self.chat = None  # ChatPrompts of a model with a chat template
        self.on_batch: Callable[[int], None] | None = None  # told each batch's size (the metrics)
        self.thread = threading.Thread(target=self._work, name="llm-serve-engine", daemon=True)

    # -------------------------------------------------------------------------------------------- control

    def load(self) -> None:
        """Load the model (in the caller's thread, so a bad path fails the start) and start the worker."""
        from llm_training.data.chat_reply import ChatPrompts
        from llm_training.export.runtime import load_for_generation

        self.loaded = load_for_generation(self.model_path, self.device_name, self.model_format)
        if self.loaded.chat_template is not None:
            self.chat = ChatPrompts(self.loaded.tokenizer, self.loaded.chat_template)
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
            if job.on_text is not None:
                job.text = _Streamed(self.loaded.tokenizer)
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

    def _take_batch(self, wait: bool) -> list[Job] | None:
        """The jobs waiting (at most ``max_batch_size``); with ``wait``, the first is waited for and more for
        ``batch_wait`` seconds. None: the stop signal."""
        try:
            first = self.queue.get() if wait else self.queue.get_nowait()
        except queue.Empty:
            return []
        if first is None:
            return None
        batch = [first]
        deadline = time.monotonic() + (self.batch_wait if wait else 0.0)
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
        """Generations run interleaved, a few decoding steps each in turn (``generate_steps``): requests that
        arrive while others generate start at once in a batch of their own, and each row's answer is sent
        as soon as that row ends. A long request thus costs a later short one a share of the steps, never
        the wait for its end. Without batching, one generation at a time (the load benchmark's baseline)."""
        active: list[_Generation] = []
        stopping = False
        while True:
            room = not stopping and len(active) < (self.max_active if self.max_batch_size > 1 else 1)
            batch = self._take_batch(wait=not active) if room else []
            if batch is None:
                stopping = True  # finish what runs, take nothing more (close: nothing more is submitted)
                batch = []
            live = [job for job in batch if job.future.set_running_or_notify_cancel()]
            groups: dict[tuple, list[Job]] = {}
            for job in live:
                groups.setdefault(job.request.group(), []).append(job)
            if live and self.on_batch is not None:
                self.on_batch(len(live))
            for jobs in groups.values():
                try:
                    active.append(_Generation(self, jobs))
                except Exception as exc:  # a failure answers these requests, never kills the worker
                    _fail(jobs, exc)
            if not active and stopping:
                return
            for generation in list(active):
                if not generation.advance():
                    active.remove(generation)


class _Generation:
    """One batch of jobs with the same sampling settings, generated a few steps per ``advance``."""

    def __init__(self, engine: Engine, jobs: list[Job]) -> None:
        from llm_training.model.generate import Sampling, generate_steps, stop_text_check

        self.jobs, self.tok = jobs, engine.loaded.tokenizer
        first = jobs[0].request
        self.stops = first.stop  # shared by the group
        sampling = Sampling(max(j.request.max_new_tokens for j in jobs), first.temperature, first.top_k, first.top_p,
                            first.repetition_penalty, first.seed)  # fmt: skip
        self.prompts = [j.request.ids if j.request.ids is not None else self.tok.encode(j.request.prompt)
                        for j in jobs]  # fmt: skip
        for i, job in enumerate(jobs):
            if job.request.max_new_tokens <= 0:  # no token to wait for
                self._finish(i, [])
        self.steps = generate_steps(engine.loaded.module, self.prompts, sampling, eos_id=self.tok.eot_id,
                                    stop_ids=first.stop_ids, truncate=engine.truncate,
                                    limits=[j.request.max_new_tokens for j in jobs],
                                    stop_check=stop_text_check(self.tok, self.stops), on_update=self._update,
                                    cancelled=lambda i: jobs[i].aborted, compile=engine.compile)  # fmt: skip

    def advance(self) -> bool:
        """A few more decoding steps; False once every row has ended (or the generation failed)."""
        try:
            next(self.steps)
            return True
        except StopIteration as end:
            for i, tokens in enumerate(end.value):  # rows that ended without an update (none expected)
                self._finish(i, tokens)
        except Exception as exc:  # a failure answers these requests, never kills the worker
            _fail(self.jobs, exc)
        return False

    def _update(self, i: int, tokens: list[int], finished: bool) -> None:
        job = self.jobs[i]
        if finished:
            self._finish(i, tokens)
        elif job.on_text is not None:
            job.text.update(tokens)
            safe = job.text.take(self.stops)
            if safe:
                job.on_text(safe)

    def _finish(self, i: int, tokens: list[int]) -> None:
        from llm_training.model.generate import completion_text

        job = self.jobs[i]
        if job.future.done():
            return
        text = completion_text(self.tok, tokens, self.stops)  # the whole text once, at the end
        if job.on_text is not None and len(text) > job.text.sent:  # streamed: the rest, then the answer
            job.on_text(text[job.text.sent :])
        reason = "length" if len(tokens) >= job.request.max_new_tokens else "stop"
        job.future.set_result(Completion(text, len(self.prompts[i]), len(tokens), reason))


def _fail(jobs: list[Job], exc: Exception) -> None:
    if not isinstance(exc, ValueError):  # ValueError: the generator's own checks of a prompt (a 400)
        log.exception("generation failed")
    for job in jobs:
        if not job.future.done():
            job.future.set_exception(exc)


class _Streamed:
    """A streamed row's text, decoded as it grows: only the tokens after the last whole character are
    decoded again (a character may span tokens), so each step costs the new text, not all of it."""

    def __init__(self, tokenizer) -> None:
        self.tok = tokenizer
        self.decoded = 0  # tokens whose text is in ``unsent`` or was sent
        self.unsent = ""  # decoded, not yet streamed (a possible start of a stop text is held back)
        self.sent = 0  # characters streamed

    def update(self, tokens: list[int]) -> None:
        piece = self.tok.decode(tokens[self.decoded :])
        # a trailing U+FFFD is a character cut between tokens: decoded again with the next token (a run of
        # them past a few tokens is the model's own text)
        if piece and (not piece.endswith("\ufffd") or len(tokens) - self.decoded >= 8):
            self.unsent += piece
            self.decoded = len(tokens)

    def take(self, stops: tuple[str, ...]) -> str:
        """What may be sent now: not the start of a stop text."""
        hold = 0
        for stop in stops:
            for k in range(min(len(stop) - 1, len(self.unsent)), 0, -1):
                if self.unsent.endswith(stop[:k]):
                    hold = max(hold, k)
                    break
        out, self.unsent = self.unsent[: len(self.unsent) - hold], self.unsent[len(self.unsent) - hold :]
        self.sent += len(out)
        return out
