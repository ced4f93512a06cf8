"""JSON request bodies, parsed in one place: the native endpoint, OIP v2's header, /v1/generate.

`decode_generate_request` reads a /v1/generate body; `check_generate_request` checks its values (the
token ids and limits: limits.py's TextLimits, the OpenAI routes' check too), for HTTP and handle callers.

`parse_json` raises WireError 400 for anything that is not JSON (truncated, not UTF-8,
nested too deeply, an integer of over 4300 digits). JSON has no NaN/Infinity; Python's json
accepts them as an extension: they are kept as floats, so that the non-finite policy (422
unless allowed, `Limits.check_values`) decides, with one message for every format.
"""

from __future__ import annotations

import json
from typing import Any

from .errors import WireError
from .limits import TextLimits, check_token_ids

__all__ = ["JSON", "media_type", "parse_json", "decode_generate_request", "check_generate_request"]

JSON = "application/json"
_GENERATE_EXAMPLE = '{"input_ids": [[1, 2, 3]], "max_new_tokens": 8}'
_GENERATE_FIELDS = {"input_ids", "max_new_tokens"}


def media_type(content_type: str | None) -> str:
    """The media type of a Content-Type header, lower case, without parameters ("" when absent)."""
    return (content_type or "").split(";")[0].strip().lower()


def parse_json(body: bytes, what: str = "body", hint: str = "") -> Any:
    """The JSON value of `body`; WireError(400, "malformed JSON {what}: ...{hint}") if it is not JSON
    (no hint when it is JSON, nested too deeply)."""
    try:
        return json.loads(body, parse_constant=float)
    except RecursionError:
        raise WireError(400, f"malformed JSON {what}: nested too deeply") from None
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError, an integer of over 4300 digits
        raise WireError(400, f"malformed JSON {what}: {exc}{hint}") from None


def decode_generate_request(body: bytes, content_type: str | None) -> tuple[object, object]:
    """(input_ids, max_new_tokens) of a POST /v1/generate body; the runner checks their values."""
    if content_type is not None and media_type(content_type) != JSON:
        raise WireError(415, f"Content-Type must be application/json, got {content_type!r}")
    payload = parse_json(body, hint=f"; send {_GENERATE_EXAMPLE}")
    if not isinstance(payload, dict) or "input_ids" not in payload:
        raise WireError(400, f"the body must be a JSON object with input_ids, e.g. {_GENERATE_EXAMPLE}")
    unknown = sorted(str(k) for k in set(payload) - _GENERATE_FIELDS)
    if unknown:
        raise WireError(400, f"unknown fields {unknown}: only input_ids and max_new_tokens (greedy decoding)")
    return payload["input_ids"], payload.get("max_new_tokens", 16)


def check_generate_request(input_ids: object, max_new_tokens: object, vocab_size: int,
                           limits: TextLimits) -> tuple[list[list[int]], int]:
    """(input_ids [B][S], max_new_tokens) of a /v1/generate request, or WireError 400 saying what is wrong:
    the shape (no padding), the ids (integers in the vocabulary), the limits (TextLimits.new_tokens)."""
    if not isinstance(input_ids, list) or not input_ids or not all(isinstance(r, list) and r for r in input_ids):
        raise WireError(400, "input_ids must be a non-empty list of non-empty lists of token ids, "
                             "e.g. [[1, 2, 3]] for one sequence", param="input_ids")
    if len({len(row) for row in input_ids}) != 1:
        raise WireError(400, "every sequence of input_ids must have the same length (no padding support); "
                             "send sequences of different lengths in separate requests", param="input_ids")
    if not all(type(t) is int for row in input_ids for t in row):  # bool and float are not token ids
        raise WireError(400, "input_ids must hold integers only", param="input_ids")
    for b, row in enumerate(input_ids):
        check_token_ids(row, vocab_size, f"input_ids[{b}]")
    if type(max_new_tokens) is not int or max_new_tokens < 1:
        raise WireError(400, f"max_new_tokens must be a positive integer, got {max_new_tokens!r}",
                        param="max_new_tokens")
    limits.new_tokens(len(input_ids[0]), max_new_tokens, len(input_ids), "input_ids", "max_new_tokens")
    return input_ids, max_new_tokens
