"""torch <-> numpy in serving (serving/tensors.py), and the handle's numpy path (MoERouter.forward, no Ray).

The handle takes torch tensors and numpy arrays (float32, float16, and bf16 as ml_dtypes.bfloat16)
and answers in the input's type and dtype. Rows to the experts travel as numpy, bf16 as uint16.
"""

import asyncio

import ml_dtypes
import numpy as np
import pytest
import torch

from moe_cluster import MoEModel, preset_config
from moe_cluster.protocol.errors import WireError
from moe_cluster.protocol.limits import Limits
from moe_cluster.serving.router import MoERouter
from moe_cluster.serving.tensors import from_numpy, from_wire, to_numpy, to_wire, wire_dtype

PAIRS = [(torch.float32, np.dtype(np.float32)), (torch.float16, np.dtype(np.float16)),
         (torch.bfloat16, np.dtype(ml_dtypes.bfloat16))]


@pytest.mark.parametrize("torch_dtype, numpy_dtype", PAIRS)
def test_numpy_round_trip_shares_memory_and_keeps_the_bits(torch_dtype, numpy_dtype):
    t = torch.randn(3, 5).to(torch_dtype)
    array = to_numpy(t)
    assert array.dtype == numpy_dtype and array.shape == (3, 5)
    assert np.array_equal(array.astype(np.float32), t.float().numpy())
    back = from_numpy(array)
    assert back.dtype == torch_dtype and torch.equal(back, t)
    back[0, 0] = 7  # shares memory with the array and the tensor
    assert float(array[0, 0]) == 7 and float(t[0, 0]) == 7


@pytest.mark.filterwarnings("ignore:The given NumPy array is not writable")  # read-only, as serving/__init__ says
@pytest.mark.parametrize("torch_dtype, numpy_dtype", PAIRS)
def test_wire_arrays_are_the_model_dtype_and_bf16_as_uint16(torch_dtype, numpy_dtype):
    name = str(torch_dtype).removeprefix("torch.")
    t = torch.randn(4, 6).to(torch_dtype)
    array = to_wire(t)
    assert array.dtype == wire_dtype(name) == (np.uint16 if name == "bfloat16" else numpy_dtype)
    assert array.tobytes() == to_numpy(t).tobytes()  # the same bits as the protocol's arrays
    array.setflags(write=False)  # as from Ray's object store
    assert torch.equal(from_wire(array, name), t)


def test_from_numpy_refuses_dtypes_torch_has_not_with_a_value_error():
    with pytest.raises(ValueError, match="float32, bfloat16 or float16, got a numpy array of dtype float8_e4m3fn"):
        from_numpy(np.zeros((2, 3), ml_dtypes.float8_e4m3fn))
    assert from_numpy(np.zeros((2, 3))).dtype == torch.float64  # for the caller's own check (float64 message)


class _Router:
    """What MoERouter.forward needs: the config, the limits, serve_request (here: the in-process model)."""

    def __init__(self):
        self.config = preset_config("tiny")
        self.limits = Limits(self.config.d_model, 16)
        self.model = MoEModel.random(self.config, seed=3)

    async def serve_request(self, x_TD, layer):
        return self.model.forward(x_TD, layer), [0] * self.config.num_experts


def _forward(router, x, layer=1):
    return asyncio.run(MoERouter.func_or_class.forward(router, x, layer))


@pytest.mark.parametrize("torch_dtype, numpy_dtype", PAIRS)
def test_the_handle_answers_numpy_in_the_input_dtype(torch_dtype, numpy_dtype):
    router = _Router()
    x = torch.randn(5, 64, generator=torch.Generator().manual_seed(1)).to(torch_dtype)
    expected = router.model.forward(x, 1)
    y = _forward(router, to_numpy(x).copy())  # a numpy array (bf16: ml_dtypes.bfloat16, a TypeError before)
    assert isinstance(y, np.ndarray) and y.dtype == numpy_dtype and y.shape == (5, 64)
    assert y.tobytes() == to_numpy(expected).tobytes()
    y_t = _forward(router, x)  # a tensor answers a tensor
    assert isinstance(y_t, torch.Tensor) and y_t.dtype == torch_dtype and torch.equal(y_t, expected)


def test_the_handle_refuses_bad_numpy_input_with_value_errors():
    router = _Router()
    with pytest.raises(ValueError, match="float64 is not supported"):
        _forward(router, np.zeros((2, 64)))
    with pytest.raises(ValueError, match="float32, bfloat16 or float16"):
        _forward(router, np.zeros((2, 64), ml_dtypes.float8_e5m2))
    with pytest.raises(WireError, match="17 tokens exceed the limit of 16 per request") as info:
        _forward(router, np.zeros((17, 64), np.float32))
    assert info.value.status == 413 and isinstance(info.value, ValueError)
    nan = np.zeros((2, 64), ml_dtypes.bfloat16)
    nan[1, 3] = np.nan
    with pytest.raises(WireError, match="NaN or Inf") as info:
        _forward(router, nan)
    assert info.value.status == 422
