"""The trainable MoE block: this project's routing, dispatch and experts, with autograd.

Shape legend: B batch, S sequence, T = B*S tokens, D model dim, F expert hidden dim, E experts, K top-k.

`TrainableMoEBlock` takes the place of transformers' `MixtralSparseMoeBlock` in a Mixtral model
and keeps that block's own parameter modules (`gate.weight` [E, D], `experts.gate_up_proj`
[E, 2F, D], `experts.down_proj` [E, D, F]), so the model's state dict, `save_pretrained` and
everything that reads a Mixtral checkpoint are unchanged. Its forward is ours:

    core.routing.route        gate (fp32 softmax), stable top-k, renormalised weights (Mixtral's routing)
    core.dispatch.make_plan   rows grouped by expert (stable argsort); gather_rows: their inputs
    core.experts.swiglu       W2 (silu(W1 x) * W3 x) on the fused weights' slices, expert by expert
    core.dispatch.combine     y[token] += w * out, in plan order

the functions the serving path runs, here outside `torch.no_grad`, so gradients reach the gate
(through the routing weights) and the experts. Each forward leaves `RouterStats` in `self.stats`
for the balancing losses and the load plots (the decoder layer expects a tensor back).

The selection bias (`--balance loss_free`) and the inference-time expert mask are a
non-persistent buffer: they change which experts are chosen, never the weights, and Mixtral has no
slot for them on disk, so an exported model routes without them (README, "Train a model").
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..core.config import ModelConfig
from ..core.dispatch import combine, gather_rows, make_plan
from ..core.experts import swiglu
from ..core.routing import GateWeights, route

__all__ = ["RouterStats", "TrainableMoEBlock", "moe_config_of"]


@dataclass
class RouterStats:
    """What one forward of a block saw."""

    counts_E: torch.Tensor  # int64: routed rows per expert (no grad)
    logits_TE: torch.Tensor  # float32 router logits (with grad)
    probs_TE: torch.Tensor  # float32 softmax of the logits (with grad)


def moe_config_of(d_model: int, d_ff: int, num_experts: int, top_k: int, selection_bias: bool) -> ModelConfig:
    """The core ModelConfig of a Mixtral block: softmax scores, top-k renormalised, SwiGLU experts."""
    return ModelConfig(d_model=d_model, d_ff=d_ff, num_experts=num_experts, top_k=top_k, expert_kind="swiglu",
                       score_func="softmax", normalize_top_k=True, selection_bias=selection_bias)


class TrainableMoEBlock(nn.Module):
    """A Mixtral sparse MoE block computed by moe_cluster.core, trainable."""

    def __init__(self, hf_block: nn.Module, use_selection_bias: bool = False) -> None:
        super().__init__()
        self.gate = hf_block.gate  # MixtralTopKRouter: holds `weight` [E, D]
        self.experts = hf_block.experts  # MixtralExperts: holds gate_up_proj, down_proj
        E, D = self.gate.weight.shape
        self.config = moe_config_of(D, self.experts.down_proj.shape[-1], E, int(self.gate.top_k), use_selection_bias)
        self.use_selection_bias = use_selection_bias
        self.register_buffer("selection_bias_E", torch.zeros(E), persistent=False)
        self.register_buffer("expert_mask_E", torch.zeros(E), persistent=False)  # -inf: never chosen
        self.stats: RouterStats | None = None

    def mask_experts(self, experts: list[int]) -> None:
        """Never choose `experts` (inference robustness, the founding document's 9.3); [] unmasks."""
        self.expert_mask_E.zero_()
        self.expert_mask_E[experts] = float("-inf")

    def _choice_bias(self) -> torch.Tensor | None:
        if not self.use_selection_bias and not bool(torch.isinf(self.expert_mask_E).any()):
            return None  # Mixtral's routing exactly
        bias_E = self.selection_bias_E if self.use_selection_bias else torch.zeros_like(self.selection_bias_E)
        return bias_E + self.expert_mask_E

    def forward(self, hidden_BSD: torch.Tensor) -> torch.Tensor:
        B, S, D = hidden_BSD.shape
        x_TD = hidden_BSD.reshape(B * S, D)
        gate = GateWeights(self.gate.weight, None, self._choice_bias())
        weights_TK, expert_ids_TK = route(x_TD, gate, self.config)
        plan = make_plan(weights_TK, expert_ids_TK, self.config.num_experts)
        # All rows at once, split by expert, and one combine: each step's backward is one op, where
        # per-expert indexing would make a full-size gradient of x and of the weights per expert.
        rows_ND = gather_rows(x_TD, plan).split(list(plan.counts))
        w13_E2FD, w2_EDF = self.experts.gate_up_proj.unbind(0), self.experts.down_proj.unbind(0)
        F_ = self.experts.down_proj.shape[-1]
        out_ND = torch.cat([swiglu(rows_ND[e], w13_E2FD[e][:F_], w13_E2FD[e][F_:], w2_EDF[e])
                            for e, count in enumerate(plan.counts) if count])
        y_TD = combine(plan, out_ND)
        logits_TE = F.linear(x_TD.float(), self.gate.weight.float())
        self.stats = RouterStats(plan.counts_E.detach(), logits_TE, torch.softmax(logits_TE, dim=-1))
        return y_TD.reshape(B, S, D)
