"""torch tensors <-> numpy arrays, for the two places arrays cross a boundary in serving.

    to_numpy / from_numpy   the protocol's arrays and a handle caller's: float32, float16, and
                            bf16 as `ml_dtypes.bfloat16` (protocol/, the client, MoERouter.forward)
    to_wire / from_wire     rows between the router and the expert deployments, through Ray's
                            object store: bf16 as its uint16 bit pattern (`wire_dtype`)

All four share memory with their input (CPU tensors; `to_*` moves a tensor to the CPU first).
An array from the object store is read-only: `from_*` then gives a tensor that must only be read.
"""

from __future__ import annotations

import numpy as np
import torch

from ..dtypes import BY_NAME, DTYPE_NAMES

__all__ = ["to_numpy", "from_numpy", "to_wire", "from_wire", "wire_dtype"]

_BF16 = BY_NAME["bfloat16"].numpy


def to_numpy(t: torch.Tensor) -> np.ndarray:
    """The tensor as a numpy array of its dtype (bf16 as ml_dtypes.bfloat16)."""
    t = t.detach().cpu()
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(_BF16)
    return t.numpy()


def from_numpy(array: np.ndarray) -> torch.Tensor:
    """A tensor of the array's dtype (ml_dtypes.bfloat16 -> torch.bfloat16). Any other dtype torch
    knows (float64, integers) passes through, for the caller's own dtype check; one torch has no
    dtype for (other ml_dtypes types, objects) is a ValueError."""
    if array.dtype == _BF16:
        return torch.from_numpy(array.view(np.int16)).view(torch.bfloat16)
    try:
        return torch.from_numpy(array)
    except TypeError:
        raise ValueError(f"hidden_states must be float32, bfloat16 or float16, got a numpy array of "
                         f"dtype {array.dtype}") from None


def wire_dtype(dtype: str) -> np.dtype:
    """The numpy dtype rows of model dtype `dtype` travel in: its own, bf16 as uint16."""
    if dtype not in BY_NAME:
        raise ValueError(f"dtype {dtype!r} is not one of {DTYPE_NAMES}")
    return np.dtype(np.uint16) if dtype == "bfloat16" else BY_NAME[dtype].numpy


def to_wire(t: torch.Tensor) -> np.ndarray:
    """Rows to send to an expert deployment (or its answer): numpy of the tensor's dtype, bf16 as uint16."""
    array = to_numpy(t)
    return array.view(np.uint16) if array.dtype == _BF16 else array


def from_wire(array: np.ndarray, dtype: str) -> torch.Tensor:
    """Inverse of to_wire for rows of model dtype `dtype`; the array's dtype must be wire_dtype(dtype)."""
    if dtype == "bfloat16":
        return torch.from_numpy(array.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(array)
