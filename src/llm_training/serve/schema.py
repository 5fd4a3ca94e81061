"""Request bodies of the HTTP API (pydantic models; FastAPI validates against them and answers 422)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class Sampled(BaseModel):
    model_config = ConfigDict(extra="forbid")
    temperature: float = Field(1.0, ge=0, le=10)
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = Field(0, ge=0)
    repetition_penalty: float = Field(1.0, gt=0)
    stop: str | list[str] | None = None
    seed: int | None = None


class PredictBody(Sampled):
    prompt: str | list[str]
    max_new_tokens: int = Field(64, ge=0)
    temperature: float = Field(0.0, ge=0, le=10)  # /predict defaults to greedy


class CompletionBody(Sampled):
    model_config = ConfigDict(extra="ignore")  # OpenAI clients send fields we do not use (user, ...)
    model: str | None = None
    prompt: str | list[str]
    max_tokens: int = Field(16, ge=0)
    n: int = Field(1, ge=1, le=16)
    stream: bool = False
    echo: bool = False
    logprobs: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    best_of: int | None = None
