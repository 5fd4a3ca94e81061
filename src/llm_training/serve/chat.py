"""``POST /v1/chat/completions``: OpenAI's chat API on the server's one engine (the same batching, limits,
timeout, streaming and metrics as ``/v1/completions``).

The prompt is the conversation rendered with the model's own chat template and its generation prompt
(``data.chat_reply``: the ids fine-tuning trained on); a reply ends at the template's end-of-turn token
(``<|im_end|>``) or the end-of-text, neither of which is in the returned content. A model without a
template (a plain pretrained run, or an export format that carries none) is answered 400 with how to get
one: a base model has never seen chat markup, so no fallback template would give it meaningful replies.
"""

from __future__ import annotations

import asyncio
import time
import uuid

from llm_training.data.chat_reply import HOW_TO_GET_ONE
from llm_training.errors import UserError
from llm_training.serve.engine import Completion, Request
from llm_training.serve.handling import ApiError, Handling
from llm_training.serve.schema import ChatCompletionBody

CARRIES_TEMPLATE = ("checkpoint", "hf", "gguf")  # the formats whose files hold a chat template


def no_template(model_id: str, kind: str) -> ApiError:
    if kind in CARRIES_TEMPLATE:
        why = "it is a plain language model"
    else:  # onnx, torchscript, safetensors
        why = f"a {kind} export carries none: serve the checkpoint, its Hugging Face export or its GGUF"
    return ApiError(400, f"model {model_id!r} has no chat template ({why}); {HOW_TO_GET_ONE} to "
                         "/v1/completions", code="no_chat_template")  # fmt: skip


def check_options(body: ChatCompletionBody) -> None:
    unsupported = [name for name, value in (("logprobs", body.logprobs), ("top_logprobs", body.top_logprobs),
                                            ("tools", body.tools)) if value]  # fmt: skip
    if body.response_format not in (None, {"type": "text"}):
        unsupported.append("response_format")
    if unsupported:
        raise ApiError(400, f"{', '.join(unsupported)} not supported by this server", code="unsupported")
    if body.presence_penalty or body.frequency_penalty:
        raise ApiError(400, "presence_penalty and frequency_penalty are not supported; use "
                            "repetition_penalty", code="unsupported")  # fmt: skip


def add_chat_route(app, shared: Handling) -> None:
    engine, metrics = shared.engine, shared.metrics

    def rows(body: ChatCompletionBody) -> list[Request]:
        """The request's rows (the conversation n times), rendered and tokenised here: called in a thread."""
        chat = engine.chat
        if chat is None:
            raise no_template(engine.model_id, engine.loaded.kind)
        max_new = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        if max_new is not None:
            shared.check_max_tokens(max_new)
        shared.check_count(1, body.n)
        try:
            ids = chat.ids([m.as_dict() for m in body.messages], where="messages")
        except UserError as exc:  # the template refuses the conversation (its raise_exception), ...
            raise ApiError(400, str(exc), code="invalid_messages") from None
        if max_new is None:  # a reply may take the rest of the context, up to the server's limit
            max_new = min(shared.options.max_tokens_limit, max(1, engine.context - len(ids)))
        return [shared.request("", ids, max_new, body, chat.stop_ids)] * body.n

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionBody):
        shared.check_model(body.model)
        check_options(body)
        requests = await asyncio.to_thread(rows, body)
        ident, created, model_id = "chatcmpl-" + uuid.uuid4().hex[:24], int(time.time()), engine.model_id
        usage_too = body.stream_options is not None and body.stream_options.include_usage

        def usage(done: list[Completion]) -> dict:
            prompt, completion = done[0].prompt_tokens if done else 0, sum(c.completion_tokens for c in done)
            return {
                "prompt_tokens": prompt,
                "completion_tokens": completion,
                "total_tokens": prompt + completion,
            }

        def chunk(index: int, delta: dict, reason: str | None = None) -> dict:
            choice = {"index": index, "delta": delta, "logprobs": None, "finish_reason": reason}
            return {"id": ident, "object": "chat.completion.chunk", "created": created, "model": model_id,
                    "system_fingerprint": None, "choices": [choice], **({"usage": None} if usage_too else {})}  # fmt: skip

        if body.stream:
            opening = [chunk(i, {"role": "assistant", "content": ""}) for i in range(len(requests))]
            # with include_usage, OpenAI's closing chunk: no choices, the whole request's usage
            last = (lambda done: {**chunk(0, {}), "choices": [], "usage": usage(done)}) if usage_too else None
            return shared.stream(requests, lambda i, text: chunk(i, {"content": text}),
                                 lambda i, done: chunk(i, {}, done.finish_reason), opening, last)  # fmt: skip
        done = await shared.wait(engine.submit_many(requests))
        counts = usage(done)
        metrics.tokens(counts["prompt_tokens"], counts["completion_tokens"])
        choices = [{"index": i, "message": {"role": "assistant", "content": c.text}, "logprobs": None,
                    "finish_reason": c.finish_reason} for i, c in enumerate(done)]  # fmt: skip
        return {"id": ident, "object": "chat.completion", "created": created, "model": model_id,
                "system_fingerprint": None, "choices": choices, "usage": counts}  # fmt: skip
