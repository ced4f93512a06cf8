"""JSON request bodies, parsed in one place: the native endpoint, OIP v2's header, /v1/generate.

`parse_json` raises WireError 400 for anything that is not JSON (truncated, not UTF-8,
nested too deeply, an integer of over 4300 digits). JSON has no NaN/Infinity; Python's json
accepts them as an extension: they are kept as floats, so that the non-finite policy (422
unless allowed, `Limits.check_values`) decides, with one message for every format.
"""

from __future__ import annotations

import json
from typing import Any

from .errors import WireError

__all__ = ["JSON", "media_type", "parse_json", "decode_generate_request"]

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
