"""numpy arrays on the wire: raw little-endian bytes, and JSON numbers (no torch).

Arrays are [T, D] of a dtype of the table (`moe_cluster/dtypes.py`): float32, float16, or
bfloat16 as `ml_dtypes.bfloat16`, whose bytes are the 16-bit pattern torch and the server use.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..dtypes import BY_NAME, dtype_of_array
from .errors import WireError

__all__ = ["array_to_bytes", "array_from_bytes", "array_from_numbers", "array_to_numbers"]

_BF16 = BY_NAME["bfloat16"].numpy


def _bits_dtype(dtype: str) -> np.dtype:
    """The little-endian dtype of `dtype`'s bytes: bf16 as its 16-bit pattern (ml_dtypes has no byte order)."""
    return np.dtype("<u2") if dtype == "bfloat16" else BY_NAME[dtype].numpy.newbyteorder("<")


def array_to_bytes(array: np.ndarray) -> bytes:
    """Raw little-endian bytes, row-major, of an array of a dtype of the table."""
    name = dtype_of_array(array).name
    if name == "bfloat16":
        array = np.ascontiguousarray(array).view(np.uint16)
    return array.astype(_bits_dtype(name), copy=False).tobytes()


def array_from_bytes(data: bytes | memoryview, dtype: str, shape: tuple[int, ...]) -> np.ndarray:
    """A writable array in native byte order from raw little-endian bytes; sizes must already be checked."""
    array = np.frombuffer(data, dtype=_bits_dtype(dtype)).reshape(shape)
    array = array.astype(array.dtype.newbyteorder("="), copy=True)
    return array.view(_BF16) if dtype == "bfloat16" else array


def array_from_numbers(values: list, dtype: str, shape: tuple[int, ...], what: str,
                       nested: bool = False) -> np.ndarray:
    """An array from JSON numbers, flat row-major or (`nested`) a list of equal-length rows: the values
    `torch.tensor(values, dtype=...)` gives, each number to a double, rounded to float32, then to
    fp16 or bf16 from that float32 (rounding to nearest even at each step).

    `what` names the field in errors: WireError 400 for anything but numbers, or an integer
    too large for a double. Out-of-range values become +-Inf (the caller's NaN/Inf check decides).
    """
    rows = values if nested else [values]
    for row in rows:
        for value in row:
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise WireError(400, f"{what} must hold only numbers, found {type(value).__name__}")
    try:
        doubles = np.asarray(values, dtype=np.float64)
    except (OverflowError, ValueError) as exc:  # an integer beyond the range of a double
        raise WireError(400, f"{what}: {exc}") from None
    with np.errstate(over="ignore", invalid="ignore"):  # out of range: Inf, as torch gives
        array = doubles.astype(np.float32).reshape(shape)
        if dtype == "float32":
            return array
        array = array.astype(BY_NAME[dtype].numpy)
    nan = np.isnan(array)
    if nan.any():  # torch's NaNs: bf16 0x7fc0 whatever the sign, fp16 0x7e00 with the sign (JSON's NaN: +)
        signed = np.where(np.signbit(array[nan]), -np.nan, np.nan)
        array[nan] = np.nan if dtype == "bfloat16" else signed
    return array


def array_to_numbers(array: np.ndarray) -> list[Any]:
    """The values as Python floats, nested as the array (exact: every fp16/bf16 value is a float32)."""
    return array.astype(np.float32).tolist()
