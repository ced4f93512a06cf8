"""The OpenAI text API on the wire (numpy and pydantic only): requests, responses, chunks, errors.

    POST /v1/completions        CompletionRequest      -> completion_body | completion_chunk ... (SSE)
    POST /v1/chat/completions   ChatCompletionRequest  -> chat_body | chat_chunk ... (SSE)
    GET  /v1/models             models_body

`parse_request` turns a JSON body into a request model or raises `WireError(400, ..., param=...)`
naming the offending field; `error_body` is OpenAI's error object
`{"error": {"message", "type", "param", "code"}}`. Streaming answers are server-sent events:
`sse(chunk)` per chunk, then `SSE_DONE`. Fields OpenAI has but this server does not implement
(n > 1, logprobs, penalties, tools, ...) are refused by name unless they carry their neutral
value (`n: 1`, `presence_penalty: 0`, `logprobs: null`, ...), which some clients always send.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from .bodies import JSON, media_type, parse_json
from .errors import WireError

__all__ = ["CompletionRequest", "ChatCompletionRequest", "ChatMessage", "SamplingFields", "parse_request",
           "error_body", "error_type", "completion_body", "completion_chunk", "chat_body", "chat_chunk",
           "models_body", "usage", "sse", "SSE_DONE", "FinishReason", "new_id"]

FinishReason = Literal["stop", "length"]
SSE_DONE = b"data: [DONE]\n\n"
MAX_STOP_CHARS = 256  # a stop string is checked against the text at every token, in the thread all requests share
# Fields of OpenAI's API that are accepted only with their neutral value (what it means: the default).
_NEUTRAL = {"n": (1,), "best_of": (1,), "echo": (False,), "logprobs": (None, False), "top_logprobs": (None, 0),
            "presence_penalty": (0, 0.0), "frequency_penalty": (0, 0.0), "logit_bias": (None, {}),
            "suffix": (None, ""), "tools": (None, []), "tool_choice": (None, "none"), "functions": (None, []),
            "function_call": (None, "none"), "response_format": (None, {"type": "text"}),
            "parallel_tool_calls": (None, False, True), "service_tier": (None, "auto", "default"),
            "store": (None, False), "metadata": (None, {}), "modalities": (None, ["text"]),
            "reasoning_effort": (None,), "prediction": (None,), "audio": (None,), "web_search_options": (None,)}
_IGNORED = {"user"}  # accepted and ignored: it only labels the caller


class SamplingFields(BaseModel):
    """What the completion and chat requests share. temperature 0 is greedy decoding."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    top_k: int = Field(default=0, ge=0, description="0: no top-k cut")
    seed: int | None = Field(default=None, ge=0, lt=2**63)
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: dict[str, bool] | None = None

    @field_validator("stop")
    @classmethod
    def _stop_strings(cls, value: str | list[str] | None) -> list[str]:
        stops = [value] if isinstance(value, str) else list(value or [])
        if len(stops) > 4 or any(not s or len(s) > MAX_STOP_CHARS for s in stops):
            raise ValueError(f"stop takes at most 4 non-empty strings of at most {MAX_STOP_CHARS} characters")
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

    @property
    def include_usage(self) -> bool:
        return bool(self.stream and self.stream_options and self.stream_options.get("include_usage"))


class CompletionRequest(SamplingFields):
    prompt: str | list[int] = Field(description="text, or token ids")
    max_tokens: int | None = Field(default=16, ge=1)  # OpenAI's default for completions

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, value: str | list[int]) -> str | list[int]:
        if isinstance(value, list) and not value:
            raise ValueError("prompt must not be an empty list of token ids")
        return value


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
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1, description="the newer name of max_tokens")

    @property
    def max_new_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


def parse_request(body: bytes, content_type: str | None, kind: type[SamplingFields]) -> SamplingFields:
    """The request of a POST body, or WireError 400 (415 for a non-JSON content type) naming the field."""
    if content_type is not None and media_type(content_type) != JSON:
        raise WireError(415, f"Content-Type must be application/json, got {content_type!r}")
    payload = parse_json(body)
    if not isinstance(payload, dict):
        raise WireError(400, "the body must be a JSON object")
    for name in sorted(set(payload) & set(_NEUTRAL)):
        if not _is_neutral(payload.pop(name), _NEUTRAL[name]):
            raise WireError(400, f"{name} is not supported by this server (only {_NEUTRAL[name][0]!r})",
                            param=name, code="unsupported_parameter")
    for name in _IGNORED:
        payload.pop(name, None)
    try:
        return kind.model_validate(payload)
    except ValidationError as exc:
        raise _validation_error(exc) from None


def _is_neutral(value: Any, neutral: tuple) -> bool:
    return any(type(value) is type(n) and value == n or (value is None and n is None) for n in neutral)


def _validation_error(exc: ValidationError) -> WireError:
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


def completion_body(rid: str, model: str, text: str, finish: FinishReason, use: dict[str, int]) -> dict[str, Any]:
    choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
    return {**_envelope("text_completion", rid, model, None), "choices": [choice], "usage": use}


def completion_chunk(rid: str, model: str, created: int, text: str, finish: FinishReason | None = None,
                     use: dict[str, int] | None = None) -> dict[str, Any]:
    """One streamed chunk; with `use` (stream_options.include_usage), the final usage-only chunk."""
    choices = [] if use else [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish}]
    return {**_envelope("text_completion", rid, model, created), "choices": choices,
            **({"usage": use} if use else {})}


def chat_body(rid: str, model: str, text: str, finish: FinishReason, use: dict[str, int]) -> dict[str, Any]:
    choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
              "finish_reason": finish}
    return {**_envelope("chat.completion", rid, model, None), "choices": [choice], "usage": use}


def chat_chunk(rid: str, model: str, created: int, delta: dict[str, str], finish: FinishReason | None = None,
               use: dict[str, int] | None = None) -> dict[str, Any]:
    """One streamed chunk: delta {"role": "assistant"} first, then {"content": ...}; `use`: the usage chunk."""
    choices = [] if use else [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]
    return {**_envelope("chat.completion.chunk", rid, model, created), "choices": choices,
            **({"usage": use} if use else {})}


def models_body(names: list[str], created: int) -> dict[str, Any]:
    return {"object": "list", "data": [{"id": name, "object": "model", "created": created,
                                        "owned_by": "moe-cluster"} for name in names]}


def sse(payload: dict[str, Any]) -> bytes:
    """One server-sent event: `data: {...}` and a blank line."""
    return b"data: " + json.dumps(payload).encode() + b"\n\n"
