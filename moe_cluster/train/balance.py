"""Load balancing of the routed experts (pure torch).

Shape legend: T tokens, E experts, K top-k.

- `switch_aux_loss`: Switch Transformer's auxiliary loss alpha * E * sum_i f_i * P_i, where f_i
  is the fraction of the T*K routed rows that went to expert i and P_i the mean router
  probability of expert i; 1.0 (times alpha) when perfectly balanced. f_i has no gradient,
  P_i does: the gate learns to lower the probability of overloaded experts.
- `router_z_loss`: ST-MoE's mean(logsumexp(logits)^2), keeps the router logits small.
- `loss_free_update`: DeepSeek-V3's auxiliary-loss-free balancing: after each step, each
  expert's selection bias moves by u * sign(mean load - its load): an underloaded expert
  becomes easier to choose. The bias changes only which experts are chosen, never their weights.
"""

from __future__ import annotations

import torch

__all__ = ["BALANCE_METHODS", "switch_aux_loss", "router_z_loss", "loss_free_update", "max_violation"]

BALANCE_METHODS = ("aux", "loss_free", "none")


def switch_aux_loss(probs_TE: torch.Tensor, counts_E: torch.Tensor) -> torch.Tensor:
    """E * sum_i f_i * P_i (without alpha): f_i = counts_E / sum(counts_E), P_i = mean over tokens of probs."""
    E = probs_TE.shape[-1]
    f_E = counts_E.to(probs_TE.dtype) / counts_E.sum().clamp(min=1)
    return E * (f_E.detach() * probs_TE.mean(dim=0)).sum()


def router_z_loss(logits_TE: torch.Tensor) -> torch.Tensor:
    """mean over tokens of logsumexp(logits)^2."""
    return torch.logsumexp(logits_TE.float(), dim=-1).square().mean()


@torch.no_grad()
def loss_free_update(bias_E: torch.Tensor, counts_E: torch.Tensor, rate: float) -> None:
    """bias_E += rate * sign(mean(counts) - counts), in place (counts of the whole global batch)."""
    load_E = counts_E.to(bias_E.dtype)
    bias_E.add_(rate * torch.sign(load_E.mean() - load_E))


def max_violation(counts_E: torch.Tensor) -> float:
    """max load / mean load - 1: 0 when every expert got the same number of rows."""
    load_E = counts_E.double()
    return float(load_E.max() / load_E.mean().clamp(min=1e-12) - 1.0)
