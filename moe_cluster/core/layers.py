"""The parts of one MoE layer, and the two steps around its experts (pure torch).

Shape legend: T tokens, D model dim, N = T*K routed rows.

    GateAndShared   what a router holds for a layer: the gate and the (dense) shared experts
    MoELayer        GateAndShared + the layer's E routed experts (the in-process model)
    route_and_plan  x_TD -> (x_TD in the model dtype, DispatchPlan): gate, top-k, rows grouped by expert
    add_shared_experts   routed_TD (the combined routed answers) + shared experts -> y_TD
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..dtypes import FLOAT64_NOT_SUPPORTED
from .config import DTYPES, ModelConfig
from .dispatch import DispatchPlan, make_plan
from .experts import SharedExperts
from .routing import GateWeights, route

__all__ = ["GateAndShared", "MoELayer", "route_and_plan", "add_shared_experts", "check_hidden_states"]


@dataclass
class GateAndShared:
    """The non-routed parts of one MoE layer: the gate and the (dense) shared experts, if any."""

    gate: GateWeights
    shared: SharedExperts | None = None

    def to(self, device: torch.device | str) -> "GateAndShared":
        return GateAndShared(self.gate.to(device), None if self.shared is None else self.shared.to(device))


@dataclass
class MoELayer:
    """One MoE layer: its gate and shared experts plus its E routed experts."""

    gate_and_shared: GateAndShared
    experts: list[nn.Module]


def route_and_plan(x_TD: torch.Tensor, parts: GateAndShared, config: ModelConfig
                   ) -> tuple[torch.Tensor, DispatchPlan]:
    """Route and group. Returns (x_TD in the model dtype, plan)."""
    x_TD = x_TD.to(config.torch_dtype)
    weights_TK, expert_ids_TK = route(x_TD, parts.gate, config)
    return x_TD, make_plan(weights_TK, expert_ids_TK, config.num_experts)


def add_shared_experts(x_TD: torch.Tensor, routed_TD: torch.Tensor, parts: GateAndShared) -> torch.Tensor:
    """y_TD = the weighted sum of the routed answers (routed_TD) + the shared experts, in the model dtype."""
    if parts.shared is not None:
        return routed_TD + parts.shared(x_TD)
    return routed_TD


def check_hidden_states(x_TD: torch.Tensor, config: ModelConfig) -> None:
    """ValueError unless x_TD is a [T, D] tensor (D = d_model) of float32, bfloat16 or float16."""
    if not isinstance(x_TD, torch.Tensor):
        raise ValueError(f"hidden_states must be a torch.Tensor, got {type(x_TD).__name__}")
    if x_TD.dim() != 2 or x_TD.shape[1] != config.d_model:
        raise ValueError(f"hidden_states must have shape [T, {config.d_model}], got {list(x_TD.shape)}")
    if x_TD.dtype == torch.float64:
        raise ValueError(f"hidden_states: {FLOAT64_NOT_SUPPORTED} (x.float() for a tensor, "
                         "x.astype(np.float32) for a numpy array)")
    if x_TD.dtype not in DTYPES.values():
        raise ValueError(f"hidden_states must be float32, bfloat16 or float16, got {x_TD.dtype}")
