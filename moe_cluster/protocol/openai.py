"""The OpenAI text API on the wire (numpy and pydantic only): requests, responses, chunks, errors.

    POST /v1/completions        CompletionRequest      -> completion_body | completion_chunk ... (SSE)
    POST /v1/chat/completions   ChatCompletionRequest  -> chat_body | chat_chunk ... (SSE)
    GET  /v1/models             models_body

`parse_request` turns a JSON body into a request model or raises `WireError(400, ..., param=...)`
naming the offending field; `error_body` is OpenAI's error object
`{"error": {"message", "type", "param", "code"}}`. Streaming answers are server-sent events:
`sse(chunk)` per chunk, then `SSE_DONE`. Fields OpenAI has but this server does not implement
(logit_bias, tools, suffix, ...) are refused by name unless they carry their neutral value
(`logit_bias: null`, `tools: []`, ...), which some clients always send.

What vLLM adds to OpenAI's fields is taken with vLLM's meaning: a completion's `prompt` may be a
list of prompts (text or token ids: one choice per prompt and `n`, in order), `echo` with
`max_tokens: 0` scores a prompt without generating, `top_k`, `min_p`, `repetition_penalty`,
`min_tokens`, `ignore_eos`, `stop_token_ids`. A sampling value the request leaves out is the
model's (`sampling_values(defaults)`: its generation_config.json), else OpenAI's.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictInt, ValidationError, field_validator

from .bodies import JSON, media_type, parse_json
from .errors import WireError
from .openai_logprobs import MAX_LOGPROBS

__all__ = ["CompletionRequest", "ChatCompletionRequest", "ChatMessage", "SamplingFields", "parse_request",
           "error_body", "error_type", "completion_choice", "completion_body", "completion_chunk", "chat_choice",
           "chat_body", "chat_delta", "chat_chunk", "models_body", "usage", "sse", "SSE_DONE", "FinishReason", "new_id",
           "SAMPLING_DEFAULTS", "MAX_CHOICES", "validation_error"]

FinishReason = Literal["stop", "length"]
SSE_DONE = b"data: [DONE]\n\n"
MAX_STOP_CHARS = 256  # a stop string is checked against the text at every token, in the thread all requests share
MAX_STOPS = 16  # OpenAI allows 4; evaluation harnesses send more (a task's `until` and the EOS text)
MAX_CHOICES = 1024  # prompts x n of one request: each is a sequence of the decode loop
# The sampling values of a request that says nothing, unless the model's generation config sets them (vLLM's rule)
SAMPLING_DEFAULTS = {"temperature": 1.0, "top_p": 1.0, "top_k": 0, "min_p": 0.0, "repetition_penalty": 1.0,
                     "presence_penalty": 0.0, "frequency_penalty": 0.0}
# Fields of OpenAI's API that are accepted only with their neutral value (what it means: the default).
_NEUTRAL = {"best_of": (None, 1), "logit_bias": (None, {}),
            "suffix": (None, ""), "tools": (None, []), "tool_choice": (None, "none"), "functions": (None, []),
            "function_call": (None, "none"), "response_format": (None, {"type": "text"}),
            "parallel_tool_calls": (None, False, True), "service_tier": (None, "auto", "default"),
            "store": (None, False), "metadata": (None, {}), "modalities": (None, ["text"]),
            "reasoning_effort": (None,), "prediction": (None,), "audio": (None,), "web_search_options": (None,)}
_IGNORED = {"user"}  # accepted and ignored: it only labels the caller


class SamplingFields(BaseModel):
    """What the completion and chat requests share. temperature 0 is greedy decoding."""

    model_config = ConfigDict(extra="forbid")

    # Neutral fields of the other kind of request, accepted here too (some clients send them to both)
    OTHER_KIND: ClassVar[dict[str, tuple]] = {}

    model: str = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1)
    n: int = Field(default=1, ge=1, le=128, description="choices per prompt")
    # None: the model's generation config, else SAMPLING_DEFAULTS
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    top_k: int | None = Field(default=None, ge=-1, description="0 or -1: no top-k cut")
    min_p: float | None = Field(default=None, ge=0.0, le=1.0)
    repetition_penalty: float | None = Field(default=None, gt=0.0, le=10.0)
    presence_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    seed: int | None = Field(default=None, ge=0, lt=2**63)
    stop: str | list[str] | None = None
    stop_token_ids: list[StrictInt] | None = Field(default=None, max_length=MAX_STOPS * 4)
    ignore_eos: bool = False
    min_tokens: int = Field(default=0, ge=0, description="tokens before EOS, a stop id or a stop string may end")
    stream: bool = False
    stream_options: dict[str, bool] | None = None

    @field_validator("stop")
    @classmethod
    def _stop_strings(cls, value: str | list[str] | None) -> list[str]:
        stops = [value] if isinstance(value, str) else list(value or [])
        if len(stops) > MAX_STOPS or any(not s or len(s) > MAX_STOP_CHARS for s in stops):
            raise ValueError(f"stop takes at most {MAX_STOPS} non-empty strings of at most {MAX_STOP_CHARS} "
                             "characters")
        return stops

    @field_validator("stream_options")
    @classmethod
    def _stream_options(cls, value: dict[str, bool] | None) -> dict[str, bool] | None:
        if value and set(value) - {"include_usage"}:
            raise ValueError(f"stream_options supports only include_usage, got {sorted(value)}")
        return value

    @property
    def stop_strings(self) -> list[str]:
        return list(self.stop or [])

    def sampling_values(self, defaults: dict[str, Any]) -> dict[str, Any]:
        """The values of engine/sampling.py's SamplingParams: the request's, else the model's `defaults`
        (its generation config), else SAMPLING_DEFAULTS; `seed` is the first choice's (choice j: seed + j)."""
        values = {name: value if (value := getattr(self, name)) is not None else defaults.get(name, neutral)
                  for name, neutral in SAMPLING_DEFAULTS.items()}
        return {**values, "seed": self.seed, "min_tokens": self.min_tokens, "ignore_eos": self.ignore_eos,
                "stop_token_ids": frozenset(self.stop_token_ids or ())}

    def check(self) -> None:
        """What one field's validation cannot see: WireError 400 naming the field."""

    @property
    def include_usage(self) -> bool:
        return bool(self.stream and self.stream_options and self.stream_options.get("include_usage"))


class CompletionRequest(SamplingFields):
    OTHER_KIND: ClassVar[dict[str, tuple]] = {"top_logprobs": (None, 0)}

    # StrictInt: `true` and 2.0 are no token ids (lax mode would make them 1 and 2), as on /v1/generate
    prompt: str | list[str] | list[StrictInt] | list[list[StrictInt]] = Field(
        description="text, token ids, or a list of either: one choice per prompt (and n), in order")
    max_tokens: int | None = Field(default=16, ge=0)  # OpenAI's default for completions; 0: echo only
    echo: bool = False
    logprobs: int | None = Field(default=None, ge=0, le=MAX_LOGPROBS,
                                 description="each token's logprob and its k most likely; with echo, the prompt's")

    @field_validator("prompt", mode="wrap")
    @classmethod
    def _prompt(cls, value: Any, handler) -> str | list[str] | list[int] | list[list[int]]:
        try:
            value = handler(value)
        except ValidationError:  # one message, not one per member of the union
            raise ValueError("prompt must be text, a list of token ids, or a list of either") from None
        if isinstance(value, list) and (not value or any(not p for p in value if isinstance(p, (str, list)))):
            raise ValueError("prompt must not be empty, nor hold an empty prompt")
        if isinstance(value, list) and isinstance(value[0], (str, list)) and len(value) > MAX_CHOICES:
            raise ValueError(f"prompt holds {len(value)} prompts; at most {MAX_CHOICES} per request")
        return value

    @property
    def prompts(self) -> list[str | list[int]]:
        """Each prompt: text or token ids."""
        if isinstance(self.prompt, str) or isinstance(self.prompt[0], int):
            return [self.prompt]
        return list(self.prompt)

    def check(self) -> None:
        super().check()
        if self.max_tokens == 0 and not self.echo:
            raise WireError(400, "max_tokens 0 scores the prompt without generating: it needs echo: true",
                            param="max_tokens", code="invalid_value")
        if len(self.prompts) * self.n > MAX_CHOICES:
            raise WireError(400, f"{len(self.prompts)} prompts x n {self.n} is over {MAX_CHOICES} choices per "
                                 "request: send fewer at once", param="n", code="invalid_value")


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")

    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[dict[str, Any]]
    name: str | None = None

    def text(self) -> str:
        """The content as text: a list of parts must be text parts only."""
        if isinstance(self.content, str):
            return self.content
        if any(part.get("type") != "text" or not isinstance(part.get("text"), str) for part in self.content):
            raise WireError(400, "only text content parts ({\"type\": \"text\", \"text\": ...}) are supported",
                            param="messages")
        return "".join(part["text"] for part in self.content)


class ChatCompletionRequest(SamplingFields):
    OTHER_KIND: ClassVar[dict[str, tuple]] = {"echo": (False,)}

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1, description="the newer name of max_tokens")
    logprobs: bool = Field(default=False, description="each generated token's logprob")
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_LOGPROBS, description="and its k most likely")

    @property
    def max_new_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    @property
    def logprobs_k(self) -> int | None:
        """k most likely per generated token (0: the token's own logprob only); None: no logprobs."""
        return (self.top_logprobs or 0) if self.logprobs else None

    def check(self) -> None:
        super().check()
        if self.top_logprobs and not self.logprobs:
            raise WireError(400, "top_logprobs needs logprobs: true", param="top_logprobs", code="invalid_value")


def parse_request(body: bytes, content_type: str | None, kind: type[SamplingFields]) -> SamplingFields:
    """The request of a POST body, or WireError 400 (415 for a non-JSON content type) naming the field."""
    if content_type is not None and media_type(content_type) != JSON:
        raise WireError(415, f"Content-Type must be application/json, got {content_type!r}")
    payload = parse_json(body)
    if not isinstance(payload, dict):
        raise WireError(400, "the body must be a JSON object")
    neutral = {**_NEUTRAL, **kind.OTHER_KIND}
    for name in sorted(set(payload) & set(neutral)):
        if not _is_neutral(payload.pop(name), neutral[name]):
            raise WireError(400, f"{name} is not supported by this server (only {neutral[name][0]!r})",
                            param=name, code="unsupported_parameter")
    for name in _IGNORED:
        payload.pop(name, None)
    try:
        request = kind.model_validate(payload)
    except ValidationError as exc:
        raise validation_error(exc) from None
    request.check()
    return request


def _is_neutral(value: Any, neutral: tuple) -> bool:
    return any(type(value) is type(n) and value == n or (value is None and n is None) for n in neutral)


def validation_error(exc: ValidationError) -> WireError:
    """OpenAI's 400 for the first failed check, `param` the field's dotted path ("tokens.2", "messages.0.role")."""
    first = exc.errors()[0]
    param = ".".join(str(p) for p in first["loc"]) or None
    if first["type"] == "extra_forbidden":
        return WireError(400, f"unknown or unsupported field {param!r}", param=param, code="unsupported_parameter")
    if first["type"] == "missing":
        return WireError(400, f"{param} is required", param=param, code="missing_required_parameter")
    return WireError(400, f"{param}: {first['msg']} (got {first.get('input')!r})"[:500], param=param,
                     code="invalid_value")


# --- errors --------------------------------------------------------------------------------

def error_type(status: int) -> str:
    """OpenAI's error `type` for an HTTP status."""
    return {401: "authentication_error", 403: "permission_error", 404: "not_found_error",
            429: "rate_limit_error"}.get(status, "invalid_request_error" if status < 500 else "server_error")


def error_body(status: int, message: str, param: str | None = None, code: str | None = None) -> bytes:
    """OpenAI's error object: {"error": {"message", "type", "param", "code"}}."""
    return json.dumps({"error": {"message": message, "type": error_type(status), "param": param,
                                 "code": code}}).encode()


# --- answers -------------------------------------------------------------------------------

def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def _envelope(obj: str, rid: str, model: str, created: int | None) -> dict[str, Any]:
    return {"id": rid, "object": obj, "created": created or int(time.time()), "model": model}


def completion_choice(index: int, text: str, finish: FinishReason | None,
                      logprobs: dict[str, Any] | None = None) -> dict[str, Any]:
    """A completion's choice, or a streamed chunk's (its new text; logprobs: openai_logprobs.py)."""
    return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish}


def completion_body(rid: str, model: str, choices: list[dict[str, Any]], use: dict[str, int]) -> dict[str, Any]:
    return {**_envelope("text_completion", rid, model, None), "choices": choices, "usage": use}


def completion_chunk(rid: str, model: str, created: int, choice: dict[str, Any] | None = None,
                     use: dict[str, int] | None = None) -> dict[str, Any]:
    """One streamed chunk of one choice; with `use` (stream_options.include_usage), the final usage-only chunk."""
    return {**_envelope("text_completion", rid, model, created), "choices": [choice] if choice else [],
            **({"usage": use} if use else {})}


def chat_choice(index: int, text: str, finish: FinishReason | None,
                logprobs: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"index": index, "message": {"role": "assistant", "content": text}, "logprobs": logprobs,
            "finish_reason": finish}


def chat_body(rid: str, model: str, choices: list[dict[str, Any]], use: dict[str, int]) -> dict[str, Any]:
    return {**_envelope("chat.completion", rid, model, None), "choices": choices, "usage": use}


def chat_delta(index: int, delta: dict[str, str], finish: FinishReason | None = None,
               logprobs: dict[str, Any] | None = None) -> dict[str, Any]:
    """A streamed chat choice: delta {"role": "assistant", "content": ""} first, then {"content": ...}."""
    return {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish}


def chat_chunk(rid: str, model: str, created: int, choice: dict[str, Any] | None = None,
               use: dict[str, int] | None = None) -> dict[str, Any]:
    """One streamed chunk of one choice (chat_delta); `use`: the usage-only chunk."""
    return {**_envelope("chat.completion.chunk", rid, model, created), "choices": [choice] if choice else [],
            **({"usage": use} if use else {})}


def models_body(names: list[str], created: int) -> dict[str, Any]:
    return {"object": "list", "data": [{"id": name, "object": "model", "created": created,
                                        "owned_by": "moe-cluster"} for name in names]}


def sse(payload: dict[str, Any]) -> bytes:
    """One server-sent event: `data: {...}` and a blank line."""
    return b"data: " + json.dumps(payload).encode() + b"\n\n"
