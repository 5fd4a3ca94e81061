"""What the generating routes share (``/predict``, ``/v1/completions``, ``/v1/chat/completions``): the JSON
error of every answer, a request's rows for the engine (limits and the context checked before anything is
queued), waiting for them within the timeout, and streaming them as server-sent events."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from llm_training.serve.engine import Completion, Engine, Job, Request

if TYPE_CHECKING:
    from llm_training.serve.app import ServeOptions
    from llm_training.serve.metrics import ServeMetrics
    from llm_training.serve.schema import Sampled


class ApiError(Exception):
    def __init__(
        self, status: int, message: str, kind: str = "invalid_request_error", code: str | None = None
    ):
        super().__init__(message)
        self.status, self.message, self.kind, self.code = status, message, kind, code

    def body(self) -> dict:
        return error_body(self.message, self.kind, self.code)


def error_body(message: str, kind: str, code: str | None = None) -> dict:
    """The JSON of every error, answered or streamed (OpenAI's shape). A message quoting a request's text
    keeps it encodable (a lone surrogate is written as its escape)."""
    message = message.encode("utf-8", "backslashreplace").decode("utf-8")
    return {"error": {"message": message, "type": kind, "code": code}}


def sse(data: dict | str) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n"


class Handling:
    """The shared steps of a generating route, for one engine under one server's options."""

    def __init__(self, engine: Engine, options: ServeOptions, metrics: ServeMetrics) -> None:
        self.engine, self.options, self.metrics = engine, options, metrics

    def check_model(self, name: str | None) -> None:
        if name not in (None, "", self.engine.model_id):
            raise ApiError(404, f"model {name!r} is not served here (this server serves {self.engine.model_id!r})",
                           code="model_not_found")  # fmt: skip

    def check_count(self, prompts: int, n: int) -> None:
        if not prompts:
            raise ApiError(400, "no prompt given", code="empty_prompt")
        if prompts * n > self.engine.max_pending:  # could never be admitted: not a "retry later"
            raise ApiError(400, f"{prompts} prompts x n={n} completions are over this server's limit of "
                                f"{self.engine.max_pending} at once", code="too_many_completions")  # fmt: skip

    def check_max_tokens(self, max_new: int) -> None:
        if max_new > self.options.max_tokens_limit:
            raise ApiError(400, f"max tokens {max_new} is over this server's limit of {self.options.max_tokens_limit}",
                           code="max_tokens_over_limit")  # fmt: skip

    def request(self, prompt: str, ids: list[int], max_new: int, body: Sampled,
                stop_ids: tuple[tuple[int, ...], ...] = ()) -> Request:  # fmt: skip
        """One row: the prompt's ``ids`` must fit the context with its new tokens (unless ``truncate``)."""
        context = self.engine.context
        # at least one new token's room: generation keeps a prompt of at most context - 1 tokens
        if not self.options.truncate and len(ids) + max(max_new, 1) > context:
            raise ApiError(400, f"prompt of {len(ids)} tokens + {max_new} new tokens exceeds the context of "
                                f"{context} tokens", code="context_length_exceeded")  # fmt: skip
        stops = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
        return Request(prompt, max_new, body.temperature, body.top_k, body.top_p, body.repetition_penalty,
                       tuple(s for s in stops if s), body.seed, ids, stop_ids)  # fmt: skip

    def requests_of(self, prompts: list[str], max_new: int, body: Sampled, n: int = 1) -> list[Request]:
        """The rows of a text request (each prompt n times), prompts tokenised here once: called in a
        thread, since a long prompt would hold the event loop."""
        self.check_max_tokens(max_new)
        self.check_count(len(prompts), n)
        out = []
        for prompt in prompts:  # the same request object n times: the engine only reads it
            out += [self.request(prompt, self.engine.encode(prompt), max_new, body)] * n
        return out

    def timed_out(self) -> ApiError:
        return ApiError(503, f"the request ran past the server's timeout of {self.options.timeout:g} s",
                        "server_error", "timeout")  # fmt: skip

    @staticmethod
    def prompt_error(exc: ValueError) -> ApiError:  # the generator's own checks (a prompt that cannot fit)
        return ApiError(400, str(exc), code="invalid_prompt")

    async def wait(self, jobs: list[Job]) -> list[Completion]:
        try:
            try:
                futures = (asyncio.wrap_future(j.future) for j in jobs)
                return await asyncio.wait_for(asyncio.gather(*futures), timeout=self.options.timeout)
            except BaseException:  # the client gets an error: none of its rows may go on generating
                for job in jobs:
                    self.engine.cancel(job)
                raise
        except asyncio.TimeoutError:
            raise self.timed_out() from None
        except ValueError as exc:
            raise self.prompt_error(exc) from None

    def stream(
        self,
        requests: Sequence[Request],
        piece: Callable[[int, str], dict],
        end: Callable[[int, Completion], dict],
        opening: Sequence[dict] = (),
        closing: Callable[[list[Completion]], dict | None] | None = None,
    ):
        """Server-sent events of ``requests``' rows as they generate: the ``opening`` events, then
        ``piece(row, text)`` for each new text, ``end(row, completion)`` when a row ends, ``closing(all
        completions)`` (unless None), and ``data: [DONE]``. A failure or the timeout ends the stream with an
        error event; a client that leaves stops the rows."""
        from fastapi.responses import StreamingResponse

        engine, metrics = self.engine, self.metrics
        loop = asyncio.get_running_loop()
        pieces: asyncio.Queue = asyncio.Queue()  # (index, text), then (index, None) when that row ends

        def streamer(index: int):
            def on_text(text: str) -> None:  # called in the engine's thread
                loop.call_soon_threadsafe(pieces.put_nowait, (index, text))

            return on_text

        jobs = engine.submit_many(list(requests), [streamer(i) for i in range(len(requests))])
        for index, job in enumerate(jobs):
            # scheduled after the job's last text (the engine streams, then resolves), so it arrives last
            job.future.add_done_callback(
                lambda _f, index=index: loop.call_soon_threadsafe(pieces.put_nowait, (index, None))
            )

        async def events():
            open_jobs, done = len(jobs), {}
            deadline = time.monotonic() + self.options.timeout
            try:
                if opening:
                    yield "".join(sse(event) for event in opening)
                while open_jobs:
                    try:
                        index, text = await asyncio.wait_for(
                            pieces.get(), timeout=max(0.0, deadline - time.monotonic())
                        )
                    except asyncio.TimeoutError:
                        yield sse(self.timed_out().body())
                        return
                    if text is not None:
                        yield sse(piece(index, text))
                        continue
                    open_jobs -= 1
                    exc = jobs[index].future.exception()
                    if isinstance(exc, ValueError):  # the generator's own checks: a message for the user
                        yield sse(self.prompt_error(exc).body())
                    elif exc is not None:  # a bug: the engine logged it with its traceback
                        failure = ApiError(500, "internal error (see the server log)", "server_error",
                                           "internal_error")  # fmt: skip
                        yield sse(failure.body())
                    else:
                        done[index] = result = jobs[index].future.result()
                        metrics.tokens(result.prompt_tokens, result.completion_tokens)
                        yield sse(end(index, result))
                last = closing([done[i] for i in sorted(done)]) if closing is not None else None
                yield (sse(last) if last is not None else "") + sse("[DONE]")
            finally:  # timed out, or the client left (this generator is cancelled or closed): stop generating
                for job in jobs:
                    engine.cancel(job)

        return StreamingResponse(events(), media_type="text/event-stream")
