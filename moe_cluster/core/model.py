"""The whole MoE model in one process: every layer's gate, shared experts and routed experts.

Shape legend: T tokens, D model dim.

`MoEModel.forward` is the fast in-process path: the one forward loop (`forward.moe_forward`)
over `LocalExperts`, the same loop the router runs over the expert deployments. Checkpoints:
`moe_cluster.checkpoint.load_model(dir)` and `save_model(model, dir)`.
"""

from __future__ import annotations

import torch

from .config import ModelConfig
from .forward import LocalExperts, moe_forward, run_sync
from .init import random_layers
from .layers import MoELayer, check_hidden_states

__all__ = ["MoEModel"]


class MoEModel:
    """All MoE layers of a model, in one process."""

    def __init__(self, config: ModelConfig, layers: list[MoELayer]) -> None:
        if len(layers) != config.num_layers:
            raise ValueError(f"expected {config.num_layers} layers, got {len(layers)}")
        self.config = config
        self.layers = layers
        self.experts = LocalExperts({layer_id: moe_layer.experts
                                     for layer_id, moe_layer in zip(config.moe_layer_ids, layers)})

    def to(self, device: torch.device | str) -> "MoEModel":
        """This model on `device`. As with nn.Module.to, the expert modules move in place (this model's too):
        deep-copy the model first to keep one on each device."""
        layers = [MoELayer(layer.gate_and_shared.to(device), [expert.to(device) for expert in layer.experts])
                  for layer in self.layers]
        return MoEModel(self.config, layers)

    def layer(self, layer: int) -> MoELayer:
        return self.layers[self.config.layer_position(layer)]

    def forward(self, x_TD: torch.Tensor, layer: int | None = None) -> torch.Tensor:
        """y_TD for hidden states x_TD [T, D] through MoE layer `layer`, in x_TD's dtype.

        `layer` may be left out only when the model has one MoE layer (ModelConfig.resolve_layer).
        """
        check_hidden_states(x_TD, self.config)
        layer = self.config.resolve_layer(layer)
        parts = self.layer(layer).gate_and_shared
        y_TD, _ = run_sync(moe_forward(x_TD, layer, parts, self.config, self.experts))
        return y_TD.to(x_TD.dtype)

    __call__ = forward

    @classmethod
    def random(cls, config: ModelConfig, seed: int = 0) -> "MoEModel":
        """A model with deterministic random weights: the same (config, seed) gives the same bits."""
        return cls(config, random_layers(config, seed))
