"""The OpenAI API as `twotower serve` speaks it: request and response schemas (pydantic), and the
OpenAI-style error body every failure gets.

Requests carry the fields OpenAI's have for chat and completions. A field twotower does not
implement is refused with a 400 that names it, never ignored: tools, functions, a
`response_format` other than text, `best_of`, `suffix`, and any unknown field (OpenAI's
"Unrecognized request argument supplied"). Only the harmless fields of IGNORED are accepted and
ignored. The request knobs of twotower/settings.py are fields too: sampling ones (top_k,
min_p, the penalties, logit_bias) and twotower's own (mode, threshold, block_size, draft,
max_draft), which choose how the reply is made. Responses carry usage, finish_reason and
logprobs as OpenAI's do, and twotower's statistics in an extra `twotower` field.
"""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, create_model, field_validator, model_validator

from twotower.settings import MODES, check_value, request_knobs

MAX_STOPS = 4
MAX_CHOICES = 16  # n: the most choices per prompt
MAX_TOP_LOGPROBS = 20  # chat's top_logprobs; completions' logprobs take at most 5, as OpenAI's
IGNORED = ("user", "metadata", "store", "service_tier")  # accepted and ignored: they change no reply


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
    model_config = ConfigDict(extra="forbid")
    include_usage: bool = False


def _knob_field(f):
    """A request field from a settings knob (twotower/settings.py): its type, None by default
    (the server's setting), its help as the description; its check runs in `Sampling`."""
    choices = f.metadata.get("choices")
    named = str(f.type)
    kind = (
        Literal[choices]
        if choices
        else bool
        if named == "bool"
        else int
        if "int" in named
        else float
        if "float" in named
        else str
    )
    if named.startswith("Mapping"):  # logit_bias: JSON keys are strings
        kind = dict[str, float]
    return kind | None, Field(None, description=f.metadata.get("help"))


# twotower's own fields besides `mode`: every knob of GenerationSettings / VerifyOptions marked request=True
Knobs = create_model("Knobs", __config__=ConfigDict(extra="forbid"), **{n: _knob_field(f) for n, f in request_knobs().items()})


class Sampling(Knobs):
    """Fields shared by chat and completions requests."""

    model_config = ConfigDict(extra="forbid")
    model: str | None = Field(None, description="the served model (GET /v1/models); may be left out")
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    seed: int | None = Field(None, ge=-(2**63), lt=2**63 - MAX_CHOICES, description="choice i of n samples with seed + i")
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = Field(1, ge=1, le=MAX_CHOICES, description="choices per prompt")
    # accepted and ignored (IGNORED)
    user: str | None = None
    metadata: dict[str, str] | None = None
    store: bool | None = None
    service_tier: str | None = None
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


def refuse(field: str, reason: str):
    """A field the request set that twotower does not implement: a validation error naming it
    (raised from the field's own validator, so that the error's `param` is the field)."""
    raise ValueError(f"{field} is not supported: {reason}")


class ChatRequest(Sampling):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool | None = Field(None, description="the logprob of each reply token")
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS, description="with logprobs: alternatives per token")
    # refused when set: twotower writes text only
    tools: list[dict[str, Any]] | None = Field(None, description="not supported: null or []")
    tool_choice: str | dict[str, Any] | None = Field(None, description='not supported: null or "none"')
    functions: list[dict[str, Any]] | None = Field(None, description="not supported: null or []")
    function_call: str | dict[str, Any] | None = Field(None, description='not supported: null or "none"')
    response_format: dict[str, Any] | None = Field(None, description='only {"type": "text"}')

    @field_validator("tools", "functions", "tool_choice", "function_call")
    @classmethod
    def _no_tools(cls, value, info: ValidationInfo):
        if value not in (None, [], "none"):
            refuse(info.field_name, "twotower does not call tools")
        return value

    @field_validator("response_format")
    @classmethod
    def _text_only(cls, value):
        if value not in (None, {"type": "text"}):
            refuse("response_format", 'twotower writes free text: only {"type": "text"}')
        return value

    @field_validator("top_logprobs")
    @classmethod
    def _with_logprobs(cls, value, info: ValidationInfo):
        if value is not None and not info.data.get("logprobs"):
            raise ValueError("top_logprobs needs logprobs: true")
        return value

    @property
    def limit(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    @property
    def top(self) -> int | None:
        """Alternatives per reply token, None for no logprobs."""
        return (self.top_logprobs or 0) if self.logprobs else None


TokenIds = list[int]


class CompletionRequest(Sampling):
    prompt: str | list[str] | TokenIds | list[TokenIds] = Field(
        description="a prompt, a list of prompts, token ids, or a list of token-id lists (n choices each)"
    )
    max_tokens: int | None = Field(None, ge=0, description="0 with echo: score the prompt, write nothing")
    echo: bool = Field(
        False, validate_default=True, description="the prompt before the reply (and its tokens' logprobs with logprobs)"
    )
    logprobs: int | None = Field(None, ge=0, le=5, description="the logprob of each token and its k best alternatives")
    best_of: int | None = Field(None, ge=1, description="only 1 (or n): twotower does not rank choices")
    suffix: str | None = Field(None, description="not supported: null or empty")

    @field_validator("prompt")
    @classmethod
    def _prompts(cls, value):
        if isinstance(value, list) and (not value or any(isinstance(p, list) and not p for p in value)):
            raise ValueError("prompt must not be empty")
        if isinstance(value, list) and any(
            i < 0 for p in value for i in (p if isinstance(p, list) else [p]) if isinstance(i, int)
        ):
            raise ValueError("token ids are >= 0")
        return value

    @field_validator("echo")
    @classmethod
    def _scores(cls, value, info: ValidationInfo):
        if info.data.get("max_tokens") == 0 and not value:
            raise ValueError("max_tokens 0 writes nothing: use it with echo to score the prompt")
        return value

    @field_validator("best_of")
    @classmethod
    def _one_of(cls, value, info: ValidationInfo):
        if value is not None and (value > 1 or value != info.data.get("n")):
            refuse("best_of", "twotower does not rank choices; use n")
        return value

    @field_validator("suffix")
    @classmethod
    def _no_suffix(cls, value):
        if value:
            refuse("suffix", "twotower writes after the prompt only")
        return value

    @property
    def prompts(self) -> list[str | list[int]]:
        """Each prompt: a string or a list of token ids."""
        if isinstance(self.prompt, str) or (self.prompt and isinstance(self.prompt[0], int)):
            return [self.prompt]
        return list(self.prompt)

    @property
    def limit(self) -> int | None:
        return self.max_tokens

    @property
    def top(self) -> int | None:
        return self.logprobs


class TokenizeRequest(BaseModel):
    """POST /tokenize (vLLM's): a prompt, or chat messages under the template."""

    model_config = ConfigDict(extra="forbid")
    model: str | None = None
    prompt: str | None = None
    messages: list[Message] | None = Field(None, min_length=1)
    add_special_tokens: bool = Field(
        True, description="with prompt: the tokenizer's special tokens (BOS); messages take the template's"
    )

    @model_validator(mode="after")
    def _one(self):
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give prompt or messages")
        return self


class DetokenizeRequest(BaseModel):
    """POST /detokenize (vLLM's): token ids back to text."""

    model_config = ConfigDict(extra="forbid")
    model: str | None = None
    tokens: TokenIds


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


# ------------------------------------------------------------------ logprobs in responses
# An entry is one token as the engine scores it: (token id, its logprob or None for a prompt's
# first token, [(alternative id, logprob), ...] best first, or None).


def completion_logprobs(entries: list, text_of, offset: int = 0) -> dict:
    """A completions choice's `logprobs`: tokens, token_logprobs, top_logprobs, text_offset."""
    tokens = [text_of(t) for t, _, _ in entries]
    offsets = [offset + sum(len(t) for t in tokens[:i]) for i in range(len(tokens))]
    top = [None if alts is None else {text_of(a): lp for a, lp in alts} for _, _, alts in entries]
    return {"tokens": tokens, "token_logprobs": [lp for _, lp, _ in entries], "top_logprobs": top, "text_offset": offsets}


def chat_logprobs(entries: list, text_of) -> dict:
    """A chat choice's `logprobs`: {"content": [{token, logprob, bytes, top_logprobs}, ...]}."""

    def one(token: int, logprob: float) -> dict:
        text = text_of(token)
        return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8", "surrogatepass"))}

    return {"content": [{**one(t, lp), "top_logprobs": [one(a, alp) for a, alp in alts or []]} for t, lp, alts in entries]}
