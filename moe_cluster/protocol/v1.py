"""Wire formats of the native endpoint: JSON and msgpack tensors (no Ray, nothing unpickled).

A msgpack tensor is a map `{"dtype": "float32"|"bfloat16"|"float16", "shape": [T, D],
"data": <raw little-endian bytes>}`. A request is a map (msgpack) or object (JSON):

    {"hidden_states": <tensor | nested list of numbers>, "layer": 0, "return_expert_counts": false}

`layer` is required when the model has more than one MoE layer; the decoder gives None when
it is absent and the caller resolves it (`ModelConfig.resolve_layer`). JSON numbers are
computed as float32; a msgpack tensor keeps its dtype (float64 is refused: 400).

Decoders raise `WireError(status, message)`; the message says what is wrong and what to
send instead. They check every size before allocating anything.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import msgpack
import numpy as np
import torch

from ..core.config import DTYPES, FLOAT64_NOT_SUPPORTED

__all__ = ["WireError", "ForwardRequest", "Limits", "decode_forward_request", "encode_forward_response",
           "tensor_to_bytes", "tensor_from_bytes", "to_numpy", "from_numpy", "MSGPACK", "JSON",
           "encode_error"]

MSGPACK = "application/msgpack"
JSON = "application/json"
_MSGPACK_TYPES = (MSGPACK, "application/x-msgpack", "application/vnd.msgpack")
_ITEMSIZE = {"float32": 4, "bfloat16": 2, "float16": 2}
_REQUEST_FIELDS = {"hidden_states", "layer", "return_expert_counts"}


class WireError(ValueError):
    """A client error: HTTP `status` and a message for the JSON error body."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message

    def __reduce__(self):
        # Ray pickles exceptions raised in a replica back to the caller of a handle.
        return (WireError, (self.status, self.message))


@dataclass(frozen=True)
class Limits:
    """What one request may carry."""

    d_model: int
    max_tokens: int  # 413 above this many tokens
    allow_non_finite: bool = False  # NaN/Inf in hidden_states: 422 unless allowed


@dataclass(frozen=True)
class ForwardRequest:
    hidden_states: torch.Tensor  # [T, D], dtype as sent
    layer: int | None  # None when not sent: the caller resolves it (ModelConfig.resolve_layer)
    return_expert_counts: bool
    wire_format: str  # MSGPACK or JSON: the response uses the same


# --- tensors <-> bytes / numpy ----------------------------------------------------------------

def tensor_to_bytes(t: torch.Tensor) -> bytes:
    """Raw little-endian bytes of a contiguous CPU tensor (bf16 as its 16-bit pattern)."""
    array, _ = to_numpy(t.detach().cpu().contiguous())
    return array.astype(array.dtype.newbyteorder("<"), copy=False).tobytes()


def tensor_from_bytes(data: bytes, dtype: str, shape: tuple[int, ...]) -> torch.Tensor:
    """A writable tensor from raw little-endian bytes; sizes must already be checked."""
    np_dtype = np.dtype("<u2") if dtype == "bfloat16" else np.dtype(dtype).newbyteorder("<")
    array = np.frombuffer(data, dtype=np_dtype).reshape(shape)
    return from_numpy(array.astype(array.dtype.newbyteorder("="), copy=True), dtype)


def to_numpy(t: torch.Tensor) -> tuple[np.ndarray, str]:
    """(array, dtype name); bf16 travels as its uint16 bit pattern, since numpy has no bf16."""
    name = _dtype_name(t.dtype)
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(np.uint16), name
    return t.numpy(), name


def from_numpy(array: np.ndarray, dtype: str) -> torch.Tensor:
    """Inverse of to_numpy. Shares memory with `array` (copy it first if it is read-only)."""
    if dtype == "bfloat16":
        return torch.from_numpy(array.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(array)


def _dtype_name(dtype: torch.dtype) -> str:
    for name, value in DTYPES.items():
        if value == dtype:
            return name
    raise ValueError(f"dtype {dtype} is not one of {tuple(DTYPES)}")


# --- requests -------------------------------------------------------------------------------

def decode_forward_request(body: bytes, content_type: str | None, limits: Limits) -> ForwardRequest:
    """Parse and validate a /v1/forward body. Raises WireError with a 4xx status."""
    media = (content_type or JSON).split(";")[0].strip().lower()
    if media in _MSGPACK_TYPES:
        fields, wire = _unpack_msgpack(body), MSGPACK
    elif media in (JSON, "text/json") or media == "":
        fields, wire = _parse_json(body), JSON
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
    check_values(x_TD, limits)
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


def _parse_json(body: bytes) -> Any:
    try:
        return json.loads(body, parse_constant=_reject_constant)
    except RecursionError:
        raise WireError(400, "malformed JSON body: nested too deeply") from None
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError, an integer of over 4300 digits
        raise WireError(400, f"malformed JSON body: {exc}") from None


def _reject_constant(name: str) -> float:
    # JSON has no NaN/Infinity; Python's json accepts them as an extension. Keep them as
    # floats so the non-finite policy below decides, with one message for both formats.
    return float(name)


def _tensor_from_map(raw: dict, limits: Limits) -> torch.Tensor:
    extra = sorted(str(k) for k in set(raw) - {"dtype", "shape", "data"})
    if extra:
        raise WireError(400, f"hidden_states: unknown tensor fields {extra}; expected dtype, shape, data")
    dtype, shape, data = raw.get("dtype"), raw.get("shape"), raw.get("data")
    if dtype == "float64":
        raise WireError(400, f"hidden_states.dtype: {FLOAT64_NOT_SUPPORTED}")
    if not isinstance(dtype, str) or dtype not in _ITEMSIZE:  # a list or map here is unhashable
        raise WireError(400, f"hidden_states.dtype must be one of {sorted(_ITEMSIZE)}, got {dtype!r}")
    if not (isinstance(shape, list) and len(shape) == 2
            and all(isinstance(n, int) and not isinstance(n, bool) for n in shape)):
        raise WireError(400, f"hidden_states.shape must be [T, D] (two integers), got {shape!r}")
    _check_shape(shape[0], shape[1], limits)
    if not isinstance(data, (bytes, bytearray)):
        raise WireError(400, "hidden_states.data must be msgpack bin (raw little-endian bytes)")
    expected = shape[0] * shape[1] * _ITEMSIZE[dtype]
    if len(data) != expected:
        raise WireError(400, f"hidden_states.data has {len(data)} bytes but shape {shape} of {dtype} "
                             f"needs {expected}")
    return tensor_from_bytes(data, dtype, (shape[0], shape[1]))


def _tensor_from_lists(raw: Any, limits: Limits) -> torch.Tensor:
    if not isinstance(raw, list) or not all(isinstance(row, list) for row in raw):
        raise WireError(400, "hidden_states must be a list of rows (a [T, D] nested list of numbers) "
                             "or a tensor map {dtype, shape, data}")
    tokens = len(raw)
    width = len(raw[0]) if raw else limits.d_model
    _check_shape(tokens, width, limits)
    if any(len(row) != width for row in raw):
        raise WireError(400, "hidden_states rows have different lengths; every row must have "
                             f"{limits.d_model} numbers")
    for row in raw:
        for value in row:
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise WireError(400, f"hidden_states must hold only numbers, found {type(value).__name__}")
    try:
        return torch.tensor(raw, dtype=torch.float32).reshape(tokens, width)
    except (OverflowError, RuntimeError) as exc:
        raise WireError(400, f"hidden_states: {exc}") from None


def _check_shape(tokens: int, width: int, limits: Limits) -> None:
    if tokens < 0 or width < 0:
        raise WireError(400, f"hidden_states shape must be non-negative, got [{tokens}, {width}]")
    if width != limits.d_model:
        raise WireError(400, f"hidden_states must be [T, {limits.d_model}] (d_model={limits.d_model}), "
                             f"got [{tokens}, {width}]")
    if tokens > limits.max_tokens:
        raise WireError(413, f"{tokens} tokens exceed the limit of {limits.max_tokens} per request; "
                             "split the batch")


def check_values(x_TD: torch.Tensor, limits: Limits) -> None:
    if not limits.allow_non_finite and x_TD.numel() and not bool(torch.isfinite(x_TD).all()):
        raise WireError(422, "hidden_states contains NaN or Inf; send finite values")


def _layer_field(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise WireError(400, f"layer must be an integer, got {value!r}")
    return value


def _bool_field(value: Any, name: str) -> bool:
    if not isinstance(value, bool):
        raise WireError(400, f"{name} must be true or false, got {value!r}")
    return value


# --- responses ------------------------------------------------------------------------------

def encode_forward_response(y_TD: torch.Tensor, wire_format: str,
                            expert_counts: list[int] | None = None) -> bytes:
    """The response body, in the request's format (msgpack tensor map, or JSON nested lists)."""
    if wire_format == MSGPACK:
        out: dict[str, Any] = {"output": {"dtype": _dtype_name(y_TD.dtype), "shape": list(y_TD.shape),
                                          "data": tensor_to_bytes(y_TD)}}
        if expert_counts is not None:
            out["expert_counts"] = expert_counts
        return msgpack.packb(out, use_bin_type=True)
    out = {"output": y_TD.float().tolist()}
    if expert_counts is not None:
        out["expert_counts"] = expert_counts
    return json.dumps(out).encode()


def encode_error(message: str) -> bytes:
    return json.dumps({"error": message}).encode()

