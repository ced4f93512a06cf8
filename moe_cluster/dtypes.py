"""The one dtype table: every dtype the project computes in, and its name in each format (numpy only).

    name        itemsize  numpy array dtype      OIP v2 datatype  safetensors
    "float32"   4         numpy.float32          "FP32"           "F32"
    "bfloat16"  2         ml_dtypes.bfloat16     "BF16"           "BF16"
    "float16"   2         numpy.float16          "FP16"           "F16"

`name` is what configs (`ModelConfig.dtype`), msgpack tensors and the torch dtype
(`getattr(torch, name)`, see `core/config.py` DTYPES) use. numpy has no bfloat16 of its own:
bf16 arrays are `ml_dtypes.bfloat16`, the type tritonclient and JAX use. float64 is refused on
every path with one message, `FLOAT64_NOT_SUPPORTED`.
"""

from __future__ import annotations

from dataclasses import dataclass

import ml_dtypes
import numpy as np

__all__ = ["DType", "DTYPE_TABLE", "DTYPE_NAMES", "BY_NAME", "BY_OIP", "BY_SAFETENSORS", "FLOAT64_NOT_SUPPORTED",
           "dtype_of_array"]


@dataclass(frozen=True)
class DType:
    name: str  # configs, msgpack tensors, torch (getattr(torch, name))
    itemsize: int  # bytes per value
    numpy: np.dtype  # the dtype of numpy arrays of this dtype (native byte order)
    oip: str  # Open Inference Protocol v2 datatype
    safetensors: str  # the dtype name in a safetensors header


DTYPE_TABLE: tuple[DType, ...] = (
    DType("float32", 4, np.dtype(np.float32), "FP32", "F32"),
    DType("bfloat16", 2, np.dtype(ml_dtypes.bfloat16), "BF16", "BF16"),
    DType("float16", 2, np.dtype(np.float16), "FP16", "F16"),
)
BY_NAME: dict[str, DType] = {d.name: d for d in DTYPE_TABLE}
BY_OIP: dict[str, DType] = {d.oip: d for d in DTYPE_TABLE}
BY_SAFETENSORS: dict[str, DType] = {d.safetensors: d for d in DTYPE_TABLE}
DTYPE_NAMES: tuple[str, ...] = tuple(BY_NAME)  # ("float32", "bfloat16", "float16")

# Hidden states in float64 are refused on every path (handle, MoEModel, both wire formats, the
# client): no wire format here carries float64, and computing it in float32 would silently
# change the caller's precision. One message, so every path says the same.
FLOAT64_NOT_SUPPORTED = "float64 is not supported: send float32, bfloat16 or float16"


def dtype_of_array(array: np.ndarray) -> DType:
    """The table's row of a numpy array's dtype, either byte order; ValueError for any other dtype."""
    row = BY_NAME.get(array.dtype.name)
    if row is not None and array.dtype.kind == row.numpy.kind:
        return row
    if array.dtype.name == "float64":
        raise ValueError(FLOAT64_NOT_SUPPORTED)
    raise ValueError(f"dtype {array.dtype} is not one of {DTYPE_NAMES}")
