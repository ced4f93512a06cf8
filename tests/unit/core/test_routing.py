import math

import torch

from moe_cluster import ModelConfig
from moe_cluster.core.routing import GateWeights, route


def _config(**changes):
    return ModelConfig(**{**dict(d_model=2, d_ff=4, num_experts=3, top_k=2), **changes})


def test_seed_gate_softmax_of_wx_plus_b_by_hand():
    # g(x) = softmax(W x + b) with W = [[1, 0], [0, 1], [1, 1]], b = [0.5, -0.5, 0], x = [1, 2]
    # logits = [1.5, 1.5, 3.0]; top-2 = experts 2 then 0 (tie 0/1 goes to the lower id)
    gate = GateWeights(torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]), torch.tensor([0.5, -0.5, 0.0]))
    weights, ids = route(torch.tensor([[1.0, 2.0]]), gate, _config(gate_bias=True))
    denom = 2 * math.exp(1.5) + math.exp(3.0)
    assert ids.tolist() == [[2, 0]]
    torch.testing.assert_close(weights, torch.tensor([[math.exp(3.0) / denom, math.exp(1.5) / denom]]))


def test_normalize_and_scaling():
    gate = GateWeights(torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]))
    x = torch.tensor([[1.0, 2.0]])  # logits [1, 2, 3]
    weights, ids = route(x, gate, _config(normalize_top_k=True, routed_scaling_factor=2.5))
    assert ids.tolist() == [[2, 1]]
    e2, e1 = math.exp(3.0), math.exp(2.0)
    torch.testing.assert_close(weights, torch.tensor([[2.5 * e2 / (e2 + e1), 2.5 * e1 / (e2 + e1)]]))


def test_sigmoid_scores_and_selection_bias_changes_choice_only():
    gate = GateWeights(torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 0.0]]),
                       selection_bias_E=torch.tensor([0.0, 0.0, 1.0]))
    x = torch.tensor([[2.0, 1.0]])  # logits [2, 1, 0] -> sigmoid [0.881, 0.731, 0.5]; +bias: [0.881, 0.731, 1.5]
    weights, ids = route(x, gate, _config(score_func="sigmoid", selection_bias=True))
    assert ids.tolist() == [[2, 0]]
    torch.testing.assert_close(weights, torch.tensor([[0.5, 1 / (1 + math.exp(-2.0))]]))


def test_group_limited_routing_hand_worked():
    # 8 experts in 4 groups of 2; scores (sigmoid of logits) chosen directly via the logits.
    # choice scores: g0 = [0.9, 0.1], g1 = [0.6, 0.5], g2 = [0.8, 0.0], g3 = [0.7, 0.7]
    # group score = sum of its top-2: [1.0, 1.1, 0.8, 1.4] -> top-2 groups: 3 and 1
    # best experts inside groups {1, 3}: 6 (0.7), 7 (0.7), 2 (0.6) -> top-3 = [6, 7, 2]; expert 0
    # (0.9, the best overall) is excluded because its group lost.
    target = torch.tensor([0.9, 0.1, 0.6, 0.5, 0.8, 0.0 + 1e-6, 0.7, 0.7])
    logits = torch.log(target / (1 - target))
    gate = GateWeights(torch.diag(logits))
    config = ModelConfig(d_model=8, d_ff=4, num_experts=8, top_k=3, n_group=4, topk_group=2,
                         score_func="sigmoid")
    weights, ids = route(torch.ones(1, 8), gate, config)
    assert ids.tolist() == [[6, 7, 2]]
    torch.testing.assert_close(weights, torch.tensor([[0.7, 0.7, 0.6]]))


def test_ties_go_to_the_lower_expert_id():
    gate = GateWeights(torch.zeros(6, 2))  # all scores equal
    _, ids = route(torch.randn(5, 2), gate, ModelConfig(d_model=2, d_ff=4, num_experts=6, top_k=3))
    assert ids.tolist() == [[0, 1, 2]] * 5


def test_gate_runs_in_float32_for_bf16_input():
    torch.manual_seed(0)
    gate = GateWeights(torch.randn(8, 16).bfloat16())
    x = torch.randn(32, 16).bfloat16()
    config = ModelConfig(d_model=16, d_ff=4, num_experts=8, top_k=2, dtype="bfloat16")
    weights, ids = route(x, gate, config)
    ref_weights, ref_ids = route(x.float(), GateWeights(gate.weight_ED.float()), config.replace(dtype="float32"))
    assert weights.dtype == torch.float32
    assert torch.equal(ids, ref_ids) and torch.equal(weights, ref_weights)
