"""The router's check of an expert's answer (no cluster): shape [rows sent, D], the model dtype."""

import numpy as np
import pytest
import torch

from moe_cluster.serving.errors import ExpertComputeError
from moe_cluster.serving.remote_experts import check_expert_answer
from moe_cluster.serving.tensors import to_wire, wire_dtype

SOURCE = "expert deployment 'expert-3' answered (layer 1, expert 3)"
WIRE = {name: wire_dtype(name) for name in ("float32", "float16", "bfloat16")}


def _answer(rows, d, dtype):
    return to_wire(torch.randn(rows, d).to(dtype))


@pytest.mark.parametrize("model_dtype, dtype", [("float32", torch.float32), ("float16", torch.float16),
                                                ("bfloat16", torch.bfloat16)])
def test_a_right_answer_passes(model_dtype, dtype):
    check_expert_answer(_answer(5, 8, dtype), (5, 8), WIRE[model_dtype], model_dtype, SOURCE)
    check_expert_answer(_answer(0, 8, dtype), (0, 8), WIRE[model_dtype], model_dtype, SOURCE)  # no rows sent


@pytest.mark.parametrize("answer, got", [
    (_answer(4, 8, torch.float32), "shape [4, 8] and dtype float32"),  # a row short
    (_answer(6, 8, torch.float32), "shape [6, 8]"),  # a row too many
    (_answer(5, 7, torch.float32), "shape [5, 7]"),  # wrong D
    (_answer(5, 8, torch.float32).reshape(-1), "shape [40]"),  # flat
    (_answer(5, 8, torch.float16), "dtype float16"),
    (_answer(5, 8, torch.float32).astype(np.float64), "dtype float64"),
    (torch.randn(5, 8), "a torch tensor of shape [5, 8]"),  # a tensor only through a direct transport
    (None, "a NoneType"),
])
def test_a_wrong_answer_fails_with_the_deployment_named(answer, got):
    with pytest.raises(ExpertComputeError) as info:
        check_expert_answer(answer, (5, 8), WIRE["float32"], "float32", SOURCE)
    message = str(info.value)
    assert message.startswith(SOURCE) and got in message
    assert "expected a numpy array of shape [5, 8]" in message and "dtype float32" in message


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_a_bf16_model_takes_only_the_uint16_bit_pattern(dtype):
    """A float32 answer to a bf16 model would be reinterpreted as [N, 2D] bf16 without the check."""
    with pytest.raises(ExpertComputeError, match=r"and dtype uint16 \(model dtype bfloat16\)"):
        check_expert_answer(_answer(5, 8, dtype), (5, 8), WIRE["bfloat16"], "bfloat16", SOURCE)


def test_a_direct_call_takes_a_tensor_of_the_model_dtype_and_nothing_else():
    check_expert_answer(torch.randn(5, 8), (5, 8), WIRE["float32"], "float32", SOURCE, direct=True)
    for answer, got in [(torch.randn(4, 8), "shape [4, 8]"), (torch.randn(5, 8).half(), "dtype torch.float16"),
                        (_answer(5, 8, torch.float32), "an array of shape [5, 8] and dtype float32")]:
        with pytest.raises(ExpertComputeError) as info:
            check_expert_answer(answer, (5, 8), WIRE["float32"], "float32", SOURCE, direct=True)
        assert got in str(info.value) and "expected a torch tensor of shape [5, 8]" in str(info.value)
