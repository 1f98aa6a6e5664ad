"""The OpenAI API as `twotower serve` speaks it: request and response schemas (pydantic), and the
OpenAI-style error body every failure gets.

Requests carry the fields OpenAI's have for chat and completions; fields OpenAI has that
twotower cannot honour (n > 1, logprobs, echo, tools) are refused with a 400 that names them,
and any other unknown field is ignored, as OpenAI-compatible servers do. twotower's own fields
(mode, threshold, block_size, draft) choose how the reply is made; responses carry usage and
finish_reason as OpenAI's do, and twotower's statistics in an extra `twotower` field.
"""

from __future__ import annotations

import time
import uuid
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, create_model, field_validator, model_validator

from twotower.settings import MODES, check_value, request_knobs

MAX_STOPS = 4


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["text"] = "text"
    text: str


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "user", "assistant", "developer"]
    content: str | list[ContentPart]

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")
    include_usage: bool = False


def _knob_field(f):
    """A request field from a settings knob (twotower/settings.py): its type, None by default
    (the server's setting), its help as the description; its check runs in `Sampling`."""
    choices = f.metadata.get("choices")
    kind = Literal[choices] if choices else int if "int" in str(f.type) else float if "float" in str(f.type) else str
    if str(f.type).startswith("Mapping"):  # logit_bias: JSON keys are strings
        kind = dict[str, float]
    return kind | None, Field(None, description=f.metadata.get("help"))


# twotower's own fields besides `mode`: every knob of GenerationSettings / VerifyOptions marked request=True
Knobs = create_model("Knobs", __config__=ConfigDict(extra="ignore"), **{n: _knob_field(f) for n, f in request_knobs().items()})


class Sampling(Knobs):
    """Fields shared by chat and completions requests."""

    model_config = ConfigDict(extra="ignore")
    model: str | None = None
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    seed: int | None = Field(None, ge=-(2**63), lt=2**63)
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = Field(1, ge=1, le=1, description="twotower writes one choice per prompt")
    user: str | None = None
    logprobs: bool | int | None = Field(None, description="not supported: null or false")
    # twotower's own fields
    mode: Literal[MODES] | None = Field(None, description="ar, mock-ar, diffusion or verify (default: the server's)")

    @field_validator("stop")
    @classmethod
    def _stops(cls, value):
        stops = [value] if isinstance(value, str) else list(value or [])
        if len(stops) > MAX_STOPS or any(not s for s in stops):
            raise ValueError(f"stop takes at most {MAX_STOPS} non-empty strings")
        return stops

    @model_validator(mode="after")
    def _knobs(self):
        for name, f in request_knobs().items():
            check_value(name, f.metadata, getattr(self, name))
        return self

    @field_validator("logprobs")
    @classmethod
    def _no_logprobs(cls, value):
        if value:
            raise ValueError("logprobs are not supported")
        return value


class ChatRequest(Sampling):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)

    @property
    def limit(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


class CompletionRequest(Sampling):
    prompt: str | list[str] = Field(description="a prompt, or a list of prompts (one choice each)")
    echo: bool = Field(False, description="not supported: false")

    @field_validator("prompt")
    @classmethod
    def _prompts(cls, value):
        if isinstance(value, list) and not value:
            raise ValueError("prompt must not be an empty list")
        return value

    @field_validator("echo")
    @classmethod
    def _no_echo(cls, value):
        if value:
            raise ValueError("echo is not supported")
        return value

    @property
    def prompts(self) -> list[str]:
        return [self.prompt] if isinstance(self.prompt, str) else list(self.prompt)

    @property
    def limit(self) -> int | None:
        return self.max_tokens


def error_body(message: str, kind: str = "invalid_request_error", param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def now() -> int:
    return int(time.time())


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }
