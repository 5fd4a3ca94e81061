"""The HTTP API (FastAPI): ``/predict``, OpenAI-compatible ``/v1/completions`` and ``/v1/chat/completions``
(``serve.chat``; both with server-sent-event streaming) and ``/v1/models``, ``/health`` and Prometheus
``/metrics``.

Errors are JSON in OpenAI's shape, ``{"error": {"message", "type", "code"}}``, with the status that says what
happened: 400 (a request the model cannot serve: prompt too long, an unsupported option), 401 (missing or
wrong API key), 404 (another model named), 413 (body over ``max_request_bytes``), 422 (malformed JSON or
wrong types), 429 (too many requests waiting), 503 (starting, shutting down, or a request that ran past
``timeout``), 500 (a bug: logged with its traceback, answered without one); unknown paths and methods (404,
405) too. Nothing in a request names a file: the model is fixed when the server starts. A request that times
out or whose streaming client leaves stops generating. The OpenAPI pages (/docs, /redoc, /openapi.json) are
off: a production server shows no more than its API.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import re
import time
import uuid
from dataclasses import dataclass, field

from llm_training.serve.chat import add_chat_route
from llm_training.serve.engine import Engine, Overloaded, Unavailable
from llm_training.serve.handling import ApiError, Handling, error_body
from llm_training.serve.schema import CompletionBody, PredictBody

log = logging.getLogger("llm_training.serve")


@dataclass
class ServeOptions:
    model_path: str = ""
    device: str = "auto"
    api_keys: list[str] = field(default_factory=list)  # empty: no authentication
    max_batch_size: int = 32
    batch_wait: float = 0.005  # seconds a batch waits for more requests
    batching: bool = True
    max_pending: int = 256  # requests waiting or running; more get 429
    max_tokens_limit: int = 1024  # largest max_tokens a request may ask for
    max_request_bytes: int = 1 << 20
    timeout: float = 120.0  # seconds a request may take, waiting included
    truncate: bool = False  # prompts longer than the context: 400 (False) or cut from the left (True)
    compile: bool = False  # on CUDA: decoding steps compiled by torch.compile (a slower first request)
    model_format: str = "auto"  # by the model's name; "torchscript" to run a TorchScript archive you trust
    protect_all: bool = False  # /health and /metrics need the API key too
    header_timeout: float = 10.0  # seconds for a request's line and headers (slow clients are closed)
    body_timeout: float = 30.0  # seconds for a request's body (408, connection closed)
    keep_alive_timeout: float = 5.0  # seconds an idle connection stays open between requests

    def to_env(self) -> str:
        """The options as the JSON a child process or uvicorn worker reads from ``OPTIONS_ENV``."""
        import dataclasses

        return json.dumps(dataclasses.asdict(self))

    @classmethod
    def from_env(cls) -> ServeOptions:
        import os

        return cls(**json.loads(os.environ[OPTIONS_ENV]))


# a lone surrogate can only come as a JSON \u escape or as its raw (invalid) UTF-8 bytes, which Python's
# json accepts (or in a UTF-16 or UTF-32 body); only bodies that may hold one are parsed here
_MAYBE_SURROGATE = re.compile(rb"\\u[dD][89a-fA-F]|\xed[\xa0-\xbf]")


def unencodable_text(body: bytes) -> bool:
    """Whether a JSON body holds a string (a key or a value, at any depth) that is not valid Unicode: text
    that no tokenizer can read and no JSON answer can quote."""
    if json.detect_encoding(body) in ("utf-8", "utf-8-sig") and not _MAYBE_SURROGATE.search(body):
        return False
    try:
        todo = [json.loads(body)]
    except (ValueError, RecursionError):  # not JSON: the app answers 422
        return False
    while todo:
        value = todo.pop()
        if isinstance(value, dict):
            todo += [*value.keys(), *value.values()]
        elif isinstance(value, list):
            todo += value
        elif isinstance(value, str):
            try:
                value.encode("utf-8")
            except UnicodeEncodeError:
                return True
    return False


def make_engine(options: ServeOptions) -> Engine:
    return Engine(options.model_path, options.device, options.max_batch_size, options.batch_wait, options.batching,
                  options.max_pending, options.truncate, options.compile, options.model_format)  # fmt: skip


def error_response(
    status: int, message: str, kind: str, code: str | None = None, headers: dict | None = None
):
    from fastapi.responses import JSONResponse

    if status == 401:
        headers = {**(headers or {}), "WWW-Authenticate": "Bearer"}
    return JSONResponse(error_body(message, kind, code), status_code=status, headers=headers)


class Guard:
    """ASGI middleware around every request: API keys, the body size limit, 500 for a bug, and the metrics
    of every answer (those of the checks and bugs included).

    The body is read here, counted as it arrives and handed on whole: a chunked body (no Content-Length)
    stops at ``max_request_bytes`` like a declared one. Bodies are small (1 MiB by default)."""

    def __init__(self, app, options: ServeOptions, metrics) -> None:
        self.app, self.options, self.metrics = app, options, metrics
        self.keys = [key.encode() for key in options.api_keys]  # compared as bytes, see below

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        begin, path = time.perf_counter(), scope["path"]
        status, started = None, False

        async def send_and_note(message) -> None:
            nonlocal status, started
            if message["type"] == "http.response.start":
                status, started = message["status"], True
            await send(message)

        async def answer(*args) -> None:
            await error_response(*args)(scope, receive, send_and_note)

        try:
            headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
            keys = self.keys
            if keys and (self.options.protect_all or path not in ("/health", "/metrics")):
                given = headers.get("authorization", "")
                token = given[7:] if given.lower().startswith("bearer ") else ""
                # bytes: compare_digest refuses non-ASCII str, and a header is whatever a client sends
                if not any(hmac.compare_digest(token.encode("latin-1", "replace"), key) for key in keys):
                    return await answer(401, "missing or wrong API key (Authorization: Bearer <key>)",
                                        "authentication_error")  # fmt: skip
            limit = self.options.max_request_bytes
            too_big = (413, f"request body over {limit} bytes", "invalid_request_error", "request_too_large")
            length = headers.get("content-length", "")
            if length.isdigit() and int(length) > limit:
                return await answer(*too_big)
            chunks, size, more = [], 0, True
            deadline = time.monotonic() + self.options.body_timeout  # the whole body: a trickle is slow too
            while more:
                try:
                    message = await asyncio.wait_for(receive(), max(0.0, deadline - time.monotonic()))
                except asyncio.TimeoutError:  # "Connection: close": uvicorn closes it after the answer
                    return await answer(408, f"request body not received within {self.options.body_timeout:g} s",
                                        "invalid_request_error", "request_timeout", {"Connection": "close"})  # fmt: skip
                if message["type"] == "http.disconnect":
                    return  # the client left while sending: nobody to answer
                chunks.append(message.get("body", b""))
                size += len(chunks[-1])
                if size > limit:  # stop reading: uvicorn closes the connection after the answer
                    return await answer(*too_big)
                more = message.get("more_body", False)
            body = {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            if unencodable_text(body["body"]):
                return await answer(400, "the request holds text that is not valid Unicode (a lone surrogate "
                                         "such as \\ud800)", "invalid_request_error", "invalid_text")  # fmt: skip

            async def replay():
                nonlocal body
                if body is None:
                    return await receive()  # later calls: http.disconnect when the client leaves
                message, body = body, None
                return message

            await self.app(scope, replay, send_and_note)
        except Exception:
            if started:  # part of the answer is out: nothing to replace it with; uvicorn logs and closes
                raise
            log.exception("unhandled error")
            await answer(500, "internal error (see the server log)", "server_error")
        finally:
            if status is not None:  # None: the client left before an answer
                self.metrics.observe(path, status, time.perf_counter() - begin)


def create_app(options: ServeOptions, engine: Engine | None = None):
    from fastapi import FastAPI
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import PlainTextResponse
    from starlette.exceptions import HTTPException

    from llm_training.serve.metrics import ServeMetrics

    engine = engine or make_engine(options)
    metrics = ServeMetrics(engine)
    started = time.time()

    async def lifespan(app):
        if engine.loaded is None:
            await asyncio.to_thread(engine.load)
        log.info(
            "serving %s (%s) on %s, %s",
            engine.model_path,
            engine.loaded.kind,
            engine.loaded.module.__class__.__name__,
            "with a chat template" if engine.chat is not None else "without a chat template",
        )
        yield
        log.info("shutting down: finishing requests in flight")
        # uvicorn has waited for the requests in flight (each ends within options.timeout); the engine's
        # thread then has only finished or aborted rows left
        await asyncio.to_thread(engine.close, options.timeout)

    app = FastAPI(title="llm_training model server", lifespan=lifespan, docs_url=None, redoc_url=None,
                  openapi_url=None)  # fmt: skip
    app.state.engine, app.state.metrics = engine, metrics
    app.add_middleware(Guard, options=options, metrics=metrics)

    @app.exception_handler(HTTPException)  # Starlette's own 404 (unknown path) and 405 (wrong method)
    async def http_error(_request, exc: HTTPException):
        kind = "server_error" if exc.status_code >= 500 else "invalid_request_error"
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        return error_response(exc.status_code, str(exc.detail), kind, code, exc.headers)

    @app.exception_handler(ApiError)
    async def api_error(_request, exc: ApiError):
        return error_response(exc.status, exc.message, exc.kind, exc.code)

    @app.exception_handler(Overloaded)  # engine.submit: too many requests waiting
    async def overloaded(_request, exc: Overloaded):
        return error_response(429, str(exc), "rate_limit_error", "overloaded")

    @app.exception_handler(Unavailable)  # engine.submit: starting or shutting down
    async def unavailable(_request, exc: Unavailable):
        return error_response(503, str(exc), "server_error", "unavailable")

    @app.exception_handler(RequestValidationError)
    async def invalid(_request, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {}
        if first.get("type") == "json_invalid":
            return error_response(422, "the body is not valid JSON", "invalid_request_error")
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
        return error_response(
            422, f"{where or 'body'}: {first.get('msg', 'invalid request')}", "invalid_request_error"
        )

    shared = Handling(engine, options, metrics)
    check_model, wait = shared.check_model, shared.wait

    @app.get("/health")
    async def health():
        if engine.loaded is None or engine.stopping:
            return error_response(503, "starting or shutting down", "server_error", "unavailable")
        return {"status": "ok", "model": engine.model_id, "format": engine.loaded.kind, "pending": engine.pending,
                "chat": engine.chat is not None, "uptime_seconds": round(time.time() - started, 1)}  # fmt: skip

    @app.get("/metrics")
    async def prometheus():
        return PlainTextResponse(metrics.render(), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": engine.model_id, "object": "model", "created": int(started),
                                            "owned_by": "llm_training"}]}  # fmt: skip

    @app.post("/predict")
    async def predict(body: PredictBody):
        begin = time.perf_counter()
        prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
        rows = await asyncio.to_thread(shared.requests_of, prompts, body.max_new_tokens, body)
        done = await wait(engine.submit_many(rows))
        metrics.tokens(sum(c.prompt_tokens for c in done), sum(c.completion_tokens for c in done))
        return {"model": engine.model_id,
                "predictions": [{"prompt": p, "completion": c.text, "new_tokens": c.completion_tokens,
                                 "finish_reason": c.finish_reason} for p, c in zip(prompts, done, strict=True)],
                "latency_ms": round(1000 * (time.perf_counter() - begin), 1)}  # fmt: skip

    @app.post("/v1/completions")
    async def completions(body: CompletionBody):
        check_model(body.model)
        if body.logprobs or body.echo or (body.best_of or 1) > 1:
            raise ApiError(
                400, "logprobs, echo and best_of are not supported by this server", code="unsupported"
            )
        if body.presence_penalty or body.frequency_penalty:
            raise ApiError(400, "presence_penalty and frequency_penalty are not supported; use "
                                "repetition_penalty", code="unsupported")  # fmt: skip
        prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
        requests = await asyncio.to_thread(shared.requests_of, prompts, body.max_tokens, body, body.n)
        ident, created = "cmpl-" + uuid.uuid4().hex[:24], int(time.time())
        model_id = engine.model_id

        def chunk(index: int, text: str, reason: str | None) -> dict:
            return {"id": ident, "object": "text_completion", "created": created, "model": model_id,
                    "choices": [{"text": text, "index": index, "logprobs": None, "finish_reason": reason}]}  # fmt: skip

        if body.stream:
            return shared.stream(requests, lambda i, text: chunk(i, text, None),
                                 lambda i, done: chunk(i, "", done.finish_reason))  # fmt: skip
        done = await wait(engine.submit_many(requests))
        usage = {"prompt_tokens": sum(c.prompt_tokens for c in done[:: body.n]),
                 "completion_tokens": sum(c.completion_tokens for c in done)}  # fmt: skip
        metrics.tokens(usage["prompt_tokens"], usage["completion_tokens"])
        return {"id": ident, "object": "text_completion", "created": created, "model": model_id,
                "choices": [{"text": c.text, "index": i, "logprobs": None, "finish_reason": c.finish_reason}
                            for i, c in enumerate(done)],
                "usage": {**usage, "total_tokens": usage["prompt_tokens"] + usage["completion_tokens"]}}  # fmt: skip

    add_chat_route(app, shared)
    return app


OPTIONS_ENV = "LLM_SERVE_OPTIONS"


def app_from_env():
    """The app for uvicorn's worker processes (``--workers N``): options come as JSON in an environment
    variable, since each worker imports the app anew."""

    return create_app(ServeOptions.from_env())
