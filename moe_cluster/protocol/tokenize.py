"""vLLM's tokenizer endpoints on the wire (pydantic only): requests, answers, their checks.

    POST /tokenize    {"model"?, "prompt": "text", "add_special_tokens"?: true, "return_token_strs"?: false}
                   or {"model"?, "messages": [...], "add_generation_prompt"?: true,
                       "continue_final_message"?: false, "add_special_tokens"?: false, "return_token_strs"?}
                   -> {"count": 3, "max_model_len": 4352, "tokens": [ids], "token_strs": null | [strings]}
    POST /detokenize  {"model"?, "tokens": [ids]}  ->  {"prompt": "text"}

The shapes are vLLM's (`TokenizeCompletionRequest`, `TokenizeChatRequest`, `TokenizeResponse`,
`DetokenizeRequest`, `DetokenizeResponse` of vllm/entrypoints/openai/protocol.py), so a client made
for vLLM (lm-evaluation-harness' remote tokenizer, a token counter) works unchanged. A body with
`messages` is a chat request, else a text one. `parse_tokenize` / `parse_detokenize` raise
`WireError(400, ..., param=...)` naming the field (415 for a non-JSON content type); fields of vLLM
that this server does not implement (`chat_template`, `tools`, ...) are refused by name unless null.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr, ValidationError

from .bodies import JSON, media_type, parse_json
from .errors import WireError
from .openai import ChatMessage, validation_error

__all__ = ["TokenizeCompletionRequest", "TokenizeChatRequest", "DetokenizeRequest", "parse_tokenize",
           "parse_detokenize", "tokenize_body", "detokenize_body"]

# vLLM's fields that this server accepts only as null: a request template or tools would change the prompt.
_NULL_ONLY = ("chat_template", "chat_template_kwargs", "tools", "mm_processor_kwargs")


class TokenizeCompletionRequest(BaseModel):
    """Text -> ids, as the tokenizer encodes a completion prompt (with its BOS etc. unless told not to)."""

    model_config = ConfigDict(extra="forbid")

    model: StrictStr | None = None
    prompt: StrictStr
    add_special_tokens: StrictBool = True
    return_token_strs: StrictBool = False


class TokenizeChatRequest(BaseModel):
    """Chat messages -> the ids of the prompt the chat template makes (as /v1/chat/completions runs it)."""

    model_config = ConfigDict(extra="forbid")

    model: StrictStr | None = None
    messages: list[ChatMessage] = Field(min_length=1)
    add_generation_prompt: StrictBool = True
    continue_final_message: StrictBool = False
    add_special_tokens: StrictBool = False  # the template adds them; True adds the tokenizer's on top
    return_token_strs: StrictBool = False


class DetokenizeRequest(BaseModel):
    """Ids -> text, as the tokenizer decodes them (special tokens kept, as vLLM does)."""

    model_config = ConfigDict(extra="forbid")

    model: StrictStr | None = None
    tokens: list[StrictInt]


def parse_tokenize(body: bytes, content_type: str | None) -> TokenizeCompletionRequest | TokenizeChatRequest:
    """The request of a POST /tokenize body (chat when it has `messages`), or WireError naming the field."""
    payload = _json_object(body, content_type)
    if "messages" in payload and "prompt" in payload:
        raise WireError(400, "give one of prompt (text) and messages (a chat), not both", param="prompt",
                        code="invalid_value")
    if "messages" not in payload:
        if "prompt" not in payload:
            raise WireError(400, "prompt (text) or messages (a chat) is required", param="prompt",
                            code="missing_required_parameter")
        return _validate(TokenizeCompletionRequest, payload)
    request = _validate(TokenizeChatRequest, payload)
    if request.add_generation_prompt and request.continue_final_message:
        raise WireError(400, "continue_final_message and add_generation_prompt cannot both be true: set "
                             "add_generation_prompt to false to continue the last message",
                        param="continue_final_message", code="invalid_value")
    return request


def parse_detokenize(body: bytes, content_type: str | None) -> DetokenizeRequest:
    """The request of a POST /detokenize body, or WireError naming the field."""
    return _validate(DetokenizeRequest, _json_object(body, content_type))


def tokenize_body(tokens: list[int], max_model_len: int, token_strs: list[str] | None = None) -> dict[str, Any]:
    """vLLM's TokenizeResponse: {"count", "max_model_len", "tokens", "token_strs"} (null unless asked)."""
    return {"count": len(tokens), "max_model_len": max_model_len, "tokens": tokens, "token_strs": token_strs}


def detokenize_body(text: str) -> dict[str, str]:
    """vLLM's DetokenizeResponse: {"prompt": text}."""
    return {"prompt": text}


def _json_object(body: bytes, content_type: str | None) -> dict[str, Any]:
    if content_type is not None and media_type(content_type) != JSON:
        raise WireError(415, f"Content-Type must be application/json, got {content_type!r}")
    payload = parse_json(body)
    if not isinstance(payload, dict):
        raise WireError(400, "the body must be a JSON object, e.g. {\"prompt\": \"Hello\"} or {\"tokens\": [1, 2]}")
    for name in _NULL_ONLY:
        if payload.get(name) is not None:
            raise WireError(400, f"{name} is not supported by this server: the prompt is made by the served model's "
                                 "own chat template; leave it out", param=name, code="unsupported_parameter")
        payload.pop(name, None)
    return payload


def _validate(kind: type[BaseModel], payload: dict[str, Any]):
    try:
        return kind.model_validate(payload)
    except ValidationError as exc:
        raise validation_error(exc) from None
