"""Wire formats of the native endpoint: JSON and msgpack tensors (numpy only, nothing unpickled).

A msgpack tensor is a map `{"dtype": "float32"|"bfloat16"|"float16", "shape": [T, D],
"data": <raw little-endian bytes>}`. A request is a map (msgpack) or object (JSON):

    {"hidden_states": <tensor | nested list of numbers>, "layer": 0, "return_expert_counts": false}

`layer` is required when the model has more than one MoE layer; the decoder gives None when
it is absent and the caller resolves it (`ModelConfig.resolve_layer`). JSON numbers are
computed as float32; a msgpack tensor keeps its dtype (float64 is refused: 400).

The decoder gives hidden_states as a numpy array [T, D] of the dtype sent (bf16 as
`ml_dtypes.bfloat16`); the encoder takes one. Decoders raise `WireError(status, message)`
(protocol/errors.py); the message says what is wrong and what to send instead. They check
every size before allocating anything.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import msgpack
import numpy as np

from ..dtypes import BY_NAME, FLOAT64_NOT_SUPPORTED, dtype_of_array
from .bodies import JSON, media_type, parse_json
from .errors import WireError
from .limits import Limits
from .tensors import array_from_bytes, array_from_numbers, array_to_bytes, array_to_numbers

__all__ = ["ForwardRequest", "decode_forward_request", "encode_forward_response", "tensor_map", "MSGPACK", "JSON"]

MSGPACK = "application/msgpack"
_MSGPACK_TYPES = (MSGPACK, "application/x-msgpack", "application/vnd.msgpack")
_REQUEST_FIELDS = {"hidden_states", "layer", "return_expert_counts"}


@dataclass(frozen=True)
class ForwardRequest:
    hidden_states: np.ndarray  # [T, D], dtype as sent (bf16: ml_dtypes.bfloat16); writable
    layer: int | None  # None when not sent: the caller resolves it (ModelConfig.resolve_layer)
    return_expert_counts: bool
    wire_format: str  # MSGPACK or JSON: the response uses the same


# --- requests -------------------------------------------------------------------------------

def decode_forward_request(body: bytes, content_type: str | None, limits: Limits) -> ForwardRequest:
    """Parse and validate a /v1/forward body. Raises WireError with a 4xx status."""
    media = media_type(content_type)
    if media in _MSGPACK_TYPES:
        fields, wire = _unpack_msgpack(body), MSGPACK
    elif media in (JSON, "text/json", ""):
        fields, wire = parse_json(body), JSON
    else:
        raise WireError(415, f"unsupported Content-Type {media!r}: send application/json or application/msgpack")
    if not isinstance(fields, dict):
        raise WireError(400, "the body must be an object/map with a 'hidden_states' field")
    unknown = sorted(str(k) for k in set(fields) - _REQUEST_FIELDS)
    if unknown:
        raise WireError(400, f"unknown fields {unknown}; allowed: {sorted(_REQUEST_FIELDS)}")
    if "hidden_states" not in fields:
        raise WireError(400, "missing field 'hidden_states' (a [T, D] tensor)")
    raw = fields["hidden_states"]
    x_TD = _tensor_from_map(raw, limits) if isinstance(raw, dict) else _tensor_from_lists(raw, limits)
    limits.check_values(x_TD)
    layer = _layer_field(fields["layer"]) if "layer" in fields else None
    return ForwardRequest(x_TD, layer,
                          _bool_field(fields.get("return_expert_counts", False), "return_expert_counts"), wire)


def _unpack_msgpack(body: bytes) -> Any:
    try:
        # No ext types, no non-string keys; sizes are bounded by the body itself.
        return msgpack.unpackb(body, raw=False, strict_map_key=True, use_list=True,
                               ext_hook=_reject_ext)
    except WireError:
        raise
    except (msgpack.ExtraData, msgpack.FormatError, msgpack.StackError, ValueError, TypeError) as exc:
        raise WireError(400, f"malformed msgpack body: {exc}") from None


def _reject_ext(code: int, data: bytes) -> None:
    raise WireError(400, f"msgpack extension types are not accepted (got ext type {code})")


def _tensor_from_map(raw: dict, limits: Limits) -> np.ndarray:
    extra = sorted(str(k) for k in set(raw) - {"dtype", "shape", "data"})
    if extra:
        raise WireError(400, f"hidden_states: unknown tensor fields {extra}; expected dtype, shape, data")
    dtype, shape, data = raw.get("dtype"), raw.get("shape"), raw.get("data")
    if dtype == "float64":
        raise WireError(400, f"hidden_states.dtype: {FLOAT64_NOT_SUPPORTED}")
    if not isinstance(dtype, str) or dtype not in BY_NAME:  # a list or map here is unhashable
        raise WireError(400, f"hidden_states.dtype must be one of {sorted(BY_NAME)}, got {dtype!r}")
    if not (isinstance(shape, list) and len(shape) == 2
            and all(isinstance(n, int) and not isinstance(n, bool) for n in shape)):
        raise WireError(400, f"hidden_states.shape must be [T, D] (two integers), got {shape!r}")
    _check_shape(shape[0], shape[1], limits)
    if not isinstance(data, (bytes, bytearray)):
        raise WireError(400, "hidden_states.data must be msgpack bin (raw little-endian bytes)")
    expected = shape[0] * shape[1] * BY_NAME[dtype].itemsize
    if len(data) != expected:
        raise WireError(400, f"hidden_states.data has {len(data)} bytes but shape {shape} of {dtype} "
                             f"needs {expected}")
    return array_from_bytes(data, dtype, (shape[0], shape[1]))


def _tensor_from_lists(raw: Any, limits: Limits) -> np.ndarray:
    if not isinstance(raw, list) or not all(isinstance(row, list) for row in raw):
        raise WireError(400, "hidden_states must be a list of rows (a [T, D] nested list of numbers) "
                             "or a tensor map {dtype, shape, data}")
    tokens = len(raw)
    width = len(raw[0]) if raw else limits.d_model
    _check_shape(tokens, width, limits)
    if any(len(row) != width for row in raw):
        raise WireError(400, "hidden_states rows have different lengths; every row must have "
                             f"{limits.d_model} numbers")
    return array_from_numbers(raw, "float32", (tokens, width), "hidden_states", nested=True)


def _check_shape(tokens: int, width: int, limits: Limits) -> None:
    if tokens < 0 or width < 0:
        raise WireError(400, f"hidden_states shape must be non-negative, got [{tokens}, {width}]")
    if width != limits.d_model:
        raise WireError(400, f"hidden_states must be [T, {limits.d_model}] (d_model={limits.d_model}), "
                             f"got [{tokens}, {width}]")
    limits.check_tokens(tokens)


def _layer_field(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise WireError(400, f"layer must be an integer, got {value!r}")
    return value


def _bool_field(value: Any, name: str) -> bool:
    if not isinstance(value, bool):
        raise WireError(400, f"{name} must be true or false, got {value!r}")
    return value


# --- responses ------------------------------------------------------------------------------

def tensor_map(x: np.ndarray) -> dict[str, Any]:
    """The msgpack tensor of `x` [T, D] (float32, float16 or ml_dtypes.bfloat16): request or response."""
    return {"dtype": dtype_of_array(x).name, "shape": list(x.shape), "data": array_to_bytes(x)}


def encode_forward_response(y_TD: np.ndarray, wire_format: str,
                            expert_counts: list[int] | None = None) -> bytes:
    """The response body, in the request's format (msgpack tensor map, or JSON nested lists)."""
    if wire_format == MSGPACK:
        out: dict[str, Any] = {"output": tensor_map(y_TD)}
        if expert_counts is not None:
            out["expert_counts"] = expert_counts
        return msgpack.packb(out, use_bin_type=True)
    out = {"output": array_to_numbers(y_TD)}
    if expert_counts is not None:
        out["expert_counts"] = expert_counts
    return json.dumps(out).encode()
