"""The wire format of a direct channel message (serving/channel.py): numpy and msgpack only.

Shape legend: N rows of one expert call, D model dim.

A call to an expert replica is two ZeroMQ frames, and so is its answer:

    frame 0  a small msgpack map (the header)
    frame 1  the rows: N*D values, raw little-endian bytes, row-major (bf16 as its 16-bit pattern)

    call header    {"v": 1, "kind": "call", "id": request id, "layer": int, "spans": [[expert, rows], ...],
                    "dtype": "float32" | "bfloat16" | "float16", "shape": [N, D],
                    "fp": the app's fingerprint, "secret": the app's channel secret}
    answer header  {"v": 1, "kind": "answer", "id": the call's id, "dtype": ..., "shape": [N, D]}
    error header   {"v": 1, "kind": "error", "id": the call's id (0 if unknown), "error": one of ERRORS,
                    "message": str}      (no rows frame)

Nothing is unpickled. Every decoder checks the header's fields (types, ranges, sizes), that the
rows frame holds exactly N*D values of the dtype, and (for a call) the secret; anything else
raises ChannelMessageError, and only that, whatever the bytes. Rows decode to a read-only numpy
array of the wire dtype (`wire_dtype_of`: bf16 as uint16) that shares the frame's memory.
"""

from __future__ import annotations

import hmac
from dataclasses import dataclass
from typing import Any, Sequence

import msgpack
import numpy as np

__all__ = ["ChannelMessageError", "CallHeader", "Answer", "ERRORS", "VERSION", "MAX_HEADER_BYTES", "MAX_SPANS",
           "encode_call", "decode_call", "encode_answer", "encode_error", "decode_answer", "wire_dtype_of",
           "dtype_of_wire"]

VERSION = 1
MAX_HEADER_BYTES = 64 * 1024  # a header is a few hundred bytes; the spans of a call are at most a few hundred
MAX_SPANS = 4096
MAX_ID = 2**63 - 1
# Why an expert refused or failed a call: what the caller does next (serving/channel.py).
#   busy         the replica's queue is full: try another replica
#   refused      the message was malformed or the secret wrong: never retried
#   app_changed  the fingerprint differs (MoEAppChanged): the request fails
#   compute      the expert raised: the request fails, not retried
ERRORS = ("busy", "refused", "app_changed", "compute")
_WIRE = {"float32": np.dtype("<f4"), "bfloat16": np.dtype("<u2"), "float16": np.dtype("<f2")}


class ChannelMessageError(ValueError):
    """A channel message that is not what the format says (or carries a wrong secret)."""


def wire_dtype_of(dtype: str) -> np.dtype:
    """The numpy dtype rows of model dtype `dtype` travel in (bf16 as uint16); ChannelMessageError if unknown."""
    if not isinstance(dtype, str) or dtype not in _WIRE:
        raise ChannelMessageError(f"dtype must be one of {sorted(_WIRE)}, got {dtype!r:.40}")
    return _WIRE[dtype]


def dtype_of_wire(rows_ND: np.ndarray) -> str:
    """The model dtype whose wire form `rows_ND` has (uint16: bfloat16); ChannelMessageError if none.
    An expert's answer travels in the dtype it has, so that the caller's answer check names what the
    expert really answered, as on Serve's path."""
    for dtype, wire in _WIRE.items():
        if rows_ND.dtype == wire:
            return dtype
    raise ChannelMessageError(f"an answer of dtype {rows_ND.dtype} cannot travel on the channel; "
                              f"it takes {sorted(_WIRE)} (bfloat16 as uint16)")


@dataclass(frozen=True)
class CallHeader:
    """What a call says besides its rows."""

    request_id: int
    layer: int
    spans: tuple[tuple[int, int], ...]  # (expert, rows), one after the other
    dtype: str  # the model dtype
    fingerprint: str  # ResolvedApp.fingerprint of the caller's app


@dataclass(frozen=True)
class Answer:
    """A decoded answer: `rows` [N, D] of the wire dtype, or an error kind (ERRORS) and its message."""

    request_id: int
    rows: np.ndarray | None = None
    error: str | None = None
    message: str = ""


def encode_call(header: CallHeader, rows_ND: np.ndarray, secret: str) -> list[Any]:
    """The frames of a call: the header and the rows (sent without a copy when contiguous)."""
    rows_ND = _checked_rows(rows_ND, header.dtype)
    meta = {"v": VERSION, "kind": "call", "id": header.request_id, "layer": header.layer,
            "spans": [[int(e), int(r)] for e, r in header.spans], "dtype": header.dtype,
            "shape": list(rows_ND.shape), "fp": header.fingerprint, "secret": secret}
    return [msgpack.packb(meta), memoryview(rows_ND).cast("B")]


def decode_call(frames: Sequence[Any], secret: str) -> tuple[CallHeader, np.ndarray]:
    """(header, rows_ND read-only) of a call's frames; ChannelMessageError for anything malformed, a wrong
    secret, or spans that do not cover the rows."""
    meta = _header(frames, "call", 2)
    presented = meta.get("secret")
    if not isinstance(presented, str) or not hmac.compare_digest(presented.encode(), secret.encode()):
        raise ChannelMessageError("the call did not present this app's channel secret")
    request_id = _int(meta, "id", MAX_ID)
    layer = _int(meta, "layer", 2**31)
    fingerprint = meta.get("fp")
    if not isinstance(fingerprint, str) or len(fingerprint) > 256:
        raise ChannelMessageError("fp (the app fingerprint) must be a string")
    spans = meta.get("spans")
    if not isinstance(spans, list) or len(spans) > MAX_SPANS:
        raise ChannelMessageError(f"spans must be a list of at most {MAX_SPANS} [expert, rows] pairs")
    pairs = []
    for span in spans:
        if not (isinstance(span, list) and len(span) == 2 and all(_is_int(v, 2**31) for v in span)):
            raise ChannelMessageError(f"each span must be [expert, rows] of non-negative ints, got {span!r:.60}")
        pairs.append((span[0], span[1]))
    rows = _rows(meta, frames[1])
    if sum(r for _, r in pairs) != rows.shape[0]:
        raise ChannelMessageError(f"spans cover {sum(r for _, r in pairs)} rows but {rows.shape[0]} were sent")
    return CallHeader(request_id, layer, tuple(pairs), meta["dtype"], fingerprint), rows


def encode_answer(request_id: int, out_ND: np.ndarray, dtype: str) -> list[Any]:
    """The frames of an answer to call `request_id`."""
    out_ND = _checked_rows(out_ND, dtype)
    meta = {"v": VERSION, "kind": "answer", "id": request_id, "dtype": dtype, "shape": list(out_ND.shape)}
    return [msgpack.packb(meta), memoryview(out_ND).cast("B")]


def encode_error(request_id: int, error: str, message: str) -> list[Any]:
    """The frame of an error answer to call `request_id` (0 when the call's id could not be read)."""
    assert error in ERRORS, error
    return [msgpack.packb({"v": VERSION, "kind": "error", "id": request_id, "error": error,
                           "message": message[:2000]})]


def decode_answer(frames: Sequence[Any]) -> Answer:
    """An answer or error answer; ChannelMessageError for anything malformed."""
    meta = _header(frames, None, None)
    request_id = _int(meta, "id", MAX_ID)
    if meta["kind"] == "error":
        error, message = meta.get("error"), meta.get("message")
        if len(frames) != 1 or error not in ERRORS or not isinstance(message, str):
            raise ChannelMessageError("an error answer is one frame with error (one of "
                                      f"{ERRORS}) and message")
        return Answer(request_id, error=error, message=message)
    if meta["kind"] != "answer" or len(frames) != 2:
        raise ChannelMessageError(f"expected an answer (2 frames) or an error (1 frame), got kind "
                                  f"{meta['kind']!r:.40} in {len(frames)} frame(s)")
    return Answer(request_id, rows=_rows(meta, frames[1]))


def _checked_rows(rows_ND: np.ndarray, dtype: str) -> np.ndarray:
    wire = wire_dtype_of(dtype)
    if rows_ND.ndim != 2 or rows_ND.dtype.newbyteorder("<") != wire or rows_ND.dtype.byteorder == ">":
        raise ChannelMessageError(f"rows must be [N, D] of {wire} (model dtype {dtype}); got "
                                  f"{list(rows_ND.shape)} of {rows_ND.dtype}")
    return np.ascontiguousarray(rows_ND)


def _buffer(frame: Any) -> memoryview:
    """The bytes of a frame (bytes, a zmq.Frame with .buffer, or anything with the buffer protocol)."""
    try:
        view = memoryview(getattr(frame, "buffer", frame))
        return view.cast("B") if view.format != "B" or view.ndim != 1 else view
    except (TypeError, ValueError) as exc:
        raise ChannelMessageError(f"a frame is not bytes: {type(frame).__name__}") from exc


def _header(frames: Sequence[Any], kind: str | None, count: int | None) -> dict:
    if not isinstance(frames, (list, tuple)) or not frames or (count is not None and len(frames) != count):
        raise ChannelMessageError(f"a {kind or 'channel message'} is {count or '1 or 2'} frames")
    raw = _buffer(frames[0])
    if len(raw) > MAX_HEADER_BYTES:
        raise ChannelMessageError(f"the header is {len(raw)} bytes, more than {MAX_HEADER_BYTES}")
    try:
        meta = msgpack.unpackb(raw, raw=False, strict_map_key=True, max_bin_len=0, max_ext_len=0)
    except Exception as exc:  # noqa: BLE001 - msgpack raises many kinds for bad bytes
        raise ChannelMessageError(f"the header is not msgpack: {type(exc).__name__}") from None
    if not isinstance(meta, dict):
        raise ChannelMessageError("the header must be a msgpack map")
    if meta.get("v") != VERSION or (kind is not None and meta.get("kind") != kind) \
            or meta.get("kind") not in ("call", "answer", "error"):
        raise ChannelMessageError(f"expected a version {VERSION} {kind or 'answer'} header, got version "
                                  f"{meta.get('v')!r:.20} kind {meta.get('kind')!r:.20}")
    return meta


def _is_int(value: Any, bound: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= bound


def _int(meta: dict, key: str, bound: int) -> int:
    value = meta.get(key)
    if not _is_int(value, bound):
        raise ChannelMessageError(f"{key} must be an int in [0, {bound}], got {value!r:.40}")
    return value


def _rows(meta: dict, frame: Any) -> np.ndarray:
    """The rows frame as a read-only [N, D] array of the header's dtype and shape, sizes checked."""
    wire = wire_dtype_of(meta.get("dtype"))
    shape = meta.get("shape")
    if not (isinstance(shape, list) and len(shape) == 2 and all(_is_int(v, 2**31) for v in shape)):
        raise ChannelMessageError(f"shape must be [N, D] of non-negative ints, got {shape!r:.60}")
    data = _buffer(frame)
    expected = shape[0] * shape[1] * wire.itemsize
    if len(data) != expected:
        raise ChannelMessageError(f"shape {shape} of {meta['dtype']} is {expected} bytes but the rows frame "
                                  f"has {len(data)}")
    return np.frombuffer(data, dtype=wire).reshape(shape)
