"""Routing: gate logits, scores, top-k choice and weights (pure torch, no Ray).

Shape legend: T tokens, D model dim, E experts, K top-k, G expert groups.

The gate always runs in float32 whatever the activation dtype, so the choice of experts
does not depend on the dtype the model is served in. Ties between equal scores go to the
lower expert id (a stable descending sort), on every device.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .config import ModelConfig

__all__ = ["GateWeights", "route", "gate_scores"]


@dataclass(frozen=True)
class GateWeights:
    """The router's parameters for one MoE layer."""

    weight_ED: torch.Tensor  # gate projection W
    bias_E: torch.Tensor | None = None  # gate bias b (logits = x W^T + b)
    selection_bias_E: torch.Tensor | None = None  # added to scores for the choice only

    def to(self, device: torch.device | str) -> "GateWeights":
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        return GateWeights(move(self.weight_ED), move(self.bias_E), move(self.selection_bias_E))


def gate_scores(x_TD: torch.Tensor, gate: GateWeights, config: ModelConfig) -> torch.Tensor:
    """scores_TE = softmax|sigmoid(x W^T + b), computed in float32."""
    bias_E = None if gate.bias_E is None else gate.bias_E.float()
    logits_TE = F.linear(x_TD.float(), gate.weight_ED.float(), bias_E)
    if config.score_func == "softmax":
        return torch.softmax(logits_TE, dim=-1)
    return torch.sigmoid(logits_TE)


def route(x_TD: torch.Tensor, gate: GateWeights, config: ModelConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Choose K experts per token.

    Returns (weights_TK float32, expert_ids_TK int64), experts in descending order of the
    selection score. Weights are the unbiased scores of the chosen experts, renormalised
    if `normalize_top_k`, times `routed_scaling_factor`.
    """
    scores_TE = gate_scores(x_TD, gate, config)
    choice_TE = scores_TE if gate.selection_bias_E is None else scores_TE + gate.selection_bias_E.float()
    if config.n_group > 1:
        choice_TE = _mask_to_top_groups(choice_TE, config.n_group, config.topk_group)
    expert_ids_TK = _stable_topk_ids(choice_TE, config.top_k)
    weights_TK = scores_TE.gather(1, expert_ids_TK)
    if config.normalize_top_k:
        weights_TK = weights_TK / (weights_TK.sum(dim=-1, keepdim=True) + 1e-20)
    if config.routed_scaling_factor != 1.0:
        weights_TK = weights_TK * config.routed_scaling_factor
    return weights_TK, expert_ids_TK


def _stable_topk_ids(scores_TE: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k largest scores per row; equal scores go to the lower index."""
    return torch.sort(scores_TE, dim=-1, descending=True, stable=True).indices[:, :k]


def _mask_to_top_groups(choice_TE: torch.Tensor, n_group: int, topk_group: int) -> torch.Tensor:
    """Group-limited routing (DeepSeek-V3): keep only experts of the `topk_group` best groups.

    A group's score is the sum of its two best expert scores (its best, if it has one
    expert). Experts outside the chosen groups get -inf, so they can never be chosen.
    """
    T, E = choice_TE.shape
    choice_TGe = choice_TE.view(T, n_group, E // n_group)
    per_group = min(2, E // n_group)
    group_scores_TG = choice_TGe.topk(per_group, dim=-1).values.sum(dim=-1)
    top_groups_TG = _stable_topk_ids(group_scores_TG, topk_group)
    keep_TG = torch.zeros_like(group_scores_TG, dtype=torch.bool).scatter_(1, top_groups_TG, True)
    keep_TE = keep_TG.unsqueeze(-1).expand_as(choice_TGe).reshape(T, E)
    return choice_TE.masked_fill(~keep_TE, float("-inf"))
