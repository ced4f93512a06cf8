"""The trainable MoE block against transformers' own MixtralSparseMoeBlock on the same weights:
outputs and gradients (of the input, the gate and the experts) agree in fp32; masking and the
selection bias change the choice only."""

import copy

import pytest
import torch

from moe_cluster.core.config import ModelConfig
from moe_cluster.core.experts import SwiGLUExpert, swiglu
from moe_cluster.train.moe_block import TrainableMoEBlock

transformers = pytest.importorskip("transformers")
from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock  # noqa: E402


def hf_block(seed: int = 0, D: int = 32, F: int = 48, E: int = 6, K: int = 2) -> MixtralSparseMoeBlock:
    torch.manual_seed(seed)
    config = transformers.MixtralConfig(hidden_size=D, intermediate_size=F, num_local_experts=E,
                                        num_experts_per_tok=K)
    config._experts_implementation = "eager"  # the plain loop over experts
    block = MixtralSparseMoeBlock(config)
    for p in block.parameters():
        torch.nn.init.normal_(p, std=0.3)
    return block


@pytest.mark.parametrize("K", [1, 2, 4])
def test_outputs_and_gradients_equal_mixtrals_block(K):
    theirs = hf_block(K=K)
    ours = TrainableMoEBlock(copy.deepcopy(theirs))
    x = torch.randn(3, 7, 32)
    x_theirs, x_ours = x.clone().requires_grad_(), x.clone().requires_grad_()
    y_theirs, y_ours = theirs(x_theirs), ours(x_ours)
    torch.testing.assert_close(y_ours, y_theirs, atol=1e-5, rtol=1e-5)
    upstream = torch.randn_like(y_theirs)
    (y_theirs * upstream).sum().backward()
    (y_ours * upstream).sum().backward()
    torch.testing.assert_close(x_ours.grad, x_theirs.grad, atol=1e-5, rtol=1e-5)
    for (name, p_theirs), (_, p_ours) in zip(theirs.named_parameters(), ours.named_parameters()):
        assert p_ours.grad is not None and p_ours.grad.abs().sum() > 0, name
        torch.testing.assert_close(p_ours.grad, p_theirs.grad, atol=1e-5, rtol=1e-5, msg=name)


def test_state_dict_is_mixtrals():
    theirs = hf_block()
    assert TrainableMoEBlock(theirs).state_dict().keys() == theirs.state_dict().keys()


def test_a_masked_expert_gets_no_rows_and_the_rest_renormalise():
    ours = TrainableMoEBlock(hf_block(E=4, K=2))
    x = torch.randn(2, 16, 32)
    ours.mask_experts([1])
    with torch.no_grad():
        ours(x)
    assert ours.stats.counts_E[1] == 0 and ours.stats.counts_E.sum() == 2 * 16 * 2
    ours.mask_experts([])
    with torch.no_grad():
        ours(x)
    assert ours.stats.counts_E[1] > 0


def test_the_selection_bias_moves_rows_but_a_zero_bias_changes_nothing():
    block = hf_block(E=4, K=1)
    plain, biased = TrainableMoEBlock(copy.deepcopy(block)), TrainableMoEBlock(copy.deepcopy(block), True)
    x = torch.randn(1, 64, 32)
    with torch.no_grad():
        torch.testing.assert_close(biased(x), plain(x), atol=0, rtol=0)
        biased.selection_bias_E[2] = 10.0
        biased(x)
    assert biased.stats.counts_E.tolist() == [0, 0, 64, 0]


def test_swiglu_is_what_the_served_expert_computes():
    expert = SwiGLUExpert(8, 12, torch.float32)
    for p in expert.parameters():
        torch.nn.init.normal_(p)
    x = torch.randn(5, 8)
    torch.testing.assert_close(expert(x), swiglu(x, expert.w1, expert.w3, expert.w2), atol=0, rtol=0)
    assert ModelConfig(d_model=8, d_ff=12, num_experts=2, top_k=1).expert_kind == "swiglu"
