"""The oracle: a plain loop over experts, in the shape of Hugging Face's
`MixtralSparseMoeBlock.forward`. Deliberately simple; every other path is tested against it.

It shares nothing with the fast path but the gate (`routing.route`), whose own math is
tested by hand-computed numbers.
"""

from __future__ import annotations

import torch

from .model import MoEModel
from .routing import route

__all__ = ["reference_forward"]


@torch.no_grad()
def reference_forward(model: MoEModel, x_TD: torch.Tensor, layer: int | None = None) -> torch.Tensor:
    """y_TD = sum_j w_j Expert_{idx_j}(x) (+ shared experts), computed expert by expert.

    `layer` may be left out only when the model has one MoE layer, as in MoEModel.forward."""
    config = model.config
    moe_layer = model.layer(config.resolve_layer(layer))
    hidden = x_TD.to(config.torch_dtype)
    routing_weights, selected_experts = route(hidden, moe_layer.gate_and_shared.gate, config)
    routing_weights = routing_weights.to(hidden.dtype)
    final = torch.zeros_like(hidden)
    # expert_mask[e, k, t] = 1 if token t chose expert e as its k-th choice
    expert_mask = torch.nn.functional.one_hot(selected_experts, num_classes=config.num_experts).permute(2, 1, 0)
    for expert_idx in range(config.num_experts):
        idx, top_x = torch.where(expert_mask[expert_idx])
        if top_x.numel() == 0:
            continue  # an expert with no tokens is not called
        current_state = hidden[top_x]
        current_out = moe_layer.experts[expert_idx](current_state) * routing_weights[top_x, idx, None]
        final.index_add_(0, top_x, current_out)
    if moe_layer.gate_and_shared.shared is not None:
        final = final + moe_layer.gate_and_shared.shared(hidden)
    return final.to(x_TD.dtype)
