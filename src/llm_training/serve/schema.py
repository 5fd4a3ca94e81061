"""Request bodies of the HTTP API (pydantic models; FastAPI validates against them and answers 422).

Every number is bounded, so that a value out of range is a 422 naming the field, never an error deep in
generation (a seed past 64 bits, an infinite penalty)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

MAX_STOPS, MAX_STOP_CHARS = 4, 256  # OpenAI's limit of stop texts; a length that keeps each check cheap


class Sampled(BaseModel):
    model_config = ConfigDict(extra="forbid")
    temperature: float = Field(1.0, ge=0, le=10)
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = Field(0, ge=0, le=1_000_000)  # past the vocabulary it changes nothing
    repetition_penalty: float = Field(1.0, gt=0, le=10)
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=0, lt=2**63)  # torch.Generator takes a signed 64-bit seed

    @field_validator("stop")
    @classmethod
    def _few_short_stops(cls, stop):
        stops = [stop] if isinstance(stop, str) else stop or []
        if len(stops) > MAX_STOPS or any(len(s) > MAX_STOP_CHARS for s in stops):
            raise ValueError(f"at most {MAX_STOPS} stop texts of at most {MAX_STOP_CHARS} characters each")
        return stop


class PredictBody(Sampled):
    prompt: str | list[str]
    max_new_tokens: int = Field(
        64, ge=0, le=1 << 30
    )  # a sanity bound: --max-tokens-limit (400) is the real one
    temperature: float = Field(0.0, ge=0, le=10)  # /predict defaults to greedy


class CompletionBody(Sampled):
    model_config = ConfigDict(extra="ignore")  # OpenAI clients send fields we do not use (user, ...)
    model: str | None = None
    prompt: str | list[str]
    max_tokens: int = Field(16, ge=0, le=1 << 30)
    n: int = Field(1, ge=1, le=16)
    stream: bool = False
    echo: bool = False
    # accepted for OpenAI clients, answered 400 unless off (0, None, 1)
    logprobs: int | None = Field(None, ge=0, le=20)
    presence_penalty: float = Field(0.0, ge=-2, le=2)
    frequency_penalty: float = Field(0.0, ge=-2, le=2)
    best_of: int | None = Field(None, ge=1, le=16)


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")
    include_usage: bool = False  # a last chunk with the usage and no choices


class ContentPart(BaseModel):
    """A part of a message's content in OpenAI's list form; only text parts are read."""

    model_config = ConfigDict(extra="ignore")
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")  # name, ...
    # "developer" is OpenAI's newer name of the system role
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[ContentPart]

    def as_dict(self) -> dict:
        content = self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)
        return {"role": "system" if self.role == "developer" else self.role, "content": content}


class ChatCompletionBody(Sampled):
    model_config = ConfigDict(extra="ignore")  # OpenAI clients send fields we do not use (user, store, ...)
    model: str | None = None
    messages: list[ChatMessage] = Field(min_length=1, max_length=4096)
    # None: up to the context (and --max-tokens-limit); max_completion_tokens is OpenAI's newer name
    max_tokens: int | None = Field(None, ge=0, le=1 << 30)
    max_completion_tokens: int | None = Field(None, ge=0, le=1 << 30)
    n: int = Field(1, ge=1, le=16)
    stream: bool = False
    stream_options: StreamOptions | None = None
    # accepted for OpenAI clients, answered 400 unless off
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=20)
    presence_penalty: float = Field(0.0, ge=-2, le=2)
    frequency_penalty: float = Field(0.0, ge=-2, le=2)
    tools: list | None = None
    response_format: dict | None = None
