"""Request bodies of the HTTP API (pydantic models; FastAPI validates against them and answers 422).

Every number is bounded, so that a value out of range is a 422 naming the field, never an error deep in
generation (a seed past 64 bits, an infinite penalty)."""

from __future__ import annotations

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
