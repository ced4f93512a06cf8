"""The whole MoE model in one process: every layer's gate, experts and shared experts.

Shape legend: T tokens, D model dim, N = T*K routed rows.

`MoEModel.forward` is the fast in-process path. It is built from the same pieces the
router uses (`route` and `make_plan` via `prepare_dispatch`, then per chunk `gather_rows`
and `add_rows`, then `finish_combine`), so the only thing the cluster changes is where the
experts run.
Random weights are drawn per (layer, expert) from a seed, so an expert server can build
its own experts of a random model without building the others.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .config import DTYPES, FLOAT64_NOT_SUPPORTED, ModelConfig
from .dispatch import DispatchPlan, add_rows, expert_chunks, gather_rows, make_plan
from .experts import SharedExperts, make_expert
from .routing import GateWeights, route

__all__ = ["MoELayer", "MoEModel", "RouterLayer", "prepare_dispatch", "finish_combine",
           "random_expert", "random_router_layer"]


@dataclass
class RouterLayer:
    """What the router holds for one MoE layer: the gate and the (dense) shared experts."""

    gate: GateWeights
    shared: SharedExperts | None = None

    def to(self, device: torch.device | str) -> "RouterLayer":
        return RouterLayer(self.gate.to(device), None if self.shared is None else self.shared.to(device))


@dataclass
class MoELayer:
    """One MoE layer: router parameters plus its E routed experts."""

    router: RouterLayer
    experts: list[nn.Module]


def prepare_dispatch(x_TD: torch.Tensor, router: RouterLayer, config: ModelConfig
                     ) -> tuple[torch.Tensor, DispatchPlan]:
    """Route and group. Returns (x_TD in the model dtype, plan)."""
    x_TD = x_TD.to(config.torch_dtype)
    weights_TK, expert_ids_TK = route(x_TD, router.gate, config)
    return x_TD, make_plan(weights_TK, expert_ids_TK, config.num_experts)


def finish_combine(x_TD: torch.Tensor, routed_TD: torch.Tensor, router: RouterLayer) -> torch.Tensor:
    """y_TD = the weighted sum of the routed answers (from add_rows) + the shared experts, in the model dtype."""
    if router.shared is not None:
        return routed_TD + router.shared(x_TD)
    return routed_TD


class MoEModel:
    """All MoE layers of a model, in one process."""

    def __init__(self, config: ModelConfig, layers: list[MoELayer]) -> None:
        if len(layers) != config.num_layers:
            raise ValueError(f"expected {config.num_layers} layers, got {len(layers)}")
        self.config = config
        self.layers = layers

    def layer(self, layer: int) -> MoELayer:
        return self.layers[self.config.layer_position(layer)]

    @torch.no_grad()
    def forward(self, x_TD: torch.Tensor, layer: int | None = None) -> torch.Tensor:
        """y_TD for hidden states x_TD [T, D] through MoE layer `layer`, in x_TD's dtype.

        `layer` may be left out only when the model has one MoE layer (ModelConfig.resolve_layer).
        """
        check_hidden_states(x_TD, self.config)
        moe_layer = self.layer(self.config.resolve_layer(layer))
        x_model_TD, plan = prepare_dispatch(x_TD, moe_layer.router, self.config)
        routed_TD = torch.zeros_like(x_model_TD)
        for chunk in expert_chunks(plan):
            x_ND = gather_rows(x_model_TD, plan, chunk.start, chunk.stop)
            add_rows(routed_TD, plan, chunk.start, moe_layer.experts[chunk.expert](x_ND))
        return finish_combine(x_model_TD, routed_TD, moe_layer.router).to(x_TD.dtype)

    __call__ = forward

    @classmethod
    def random(cls, config: ModelConfig, seed: int = 0) -> "MoEModel":
        """A model with deterministic random weights: the same (config, seed) gives the same bits."""
        layers = []
        for layer_id in config.moe_layer_ids:
            router = random_router_layer(config, seed, layer_id)
            experts = [random_expert(config, seed, layer_id, e) for e in range(config.num_experts)]
            layers.append(MoELayer(router, experts))
        return cls(config, layers)

    @classmethod
    def load(cls, directory: str | Path) -> "MoEModel":
        from .checkpoint import load_model
        return load_model(directory)

    def save(self, directory: str | Path) -> None:
        from .checkpoint import save_model
        save_model(self, directory)


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


# --- deterministic random init -------------------------------------------------------------

_ROUTER_SLOT = -1  # generator slot of a layer's router parameters (experts use slots 0..E-1)


def _generator(seed: int, layer_id: int, slot: int) -> torch.Generator:
    """An independent generator per (seed, layer, expert slot)."""
    entropy = [int(seed) & 0xFFFFFFFF, int(layer_id) & 0xFFFFFFFF, (slot + 1) & 0xFFFFFFFF]
    state = np.random.SeedSequence(entropy).generate_state(2, dtype=np.uint32)
    return torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))


def _init_(module_or_params: nn.Module, generator: torch.Generator) -> None:
    """Normal(0, 1/sqrt(fan_in)) weights, Normal(0, 0.02) biases, in parameter order."""
    for name, param in module_or_params.named_parameters():
        if param.dim() >= 2:
            values = torch.randn(param.shape, generator=generator) / param.shape[-1] ** 0.5
        else:
            values = torch.randn(param.shape, generator=generator) * 0.02
        param.data.copy_(values.to(param.dtype))


def random_expert(config: ModelConfig, seed: int, layer_id: int, expert: int) -> nn.Module:
    module = make_expert(config)
    _init_(module, _generator(seed, layer_id, expert))
    return module


def random_router_layer(config: ModelConfig, seed: int, layer_id: int) -> RouterLayer:
    generator = _generator(seed, layer_id, _ROUTER_SLOT)
    E, D = config.num_experts, config.d_model
    dtype = config.torch_dtype
    weight_ED = (torch.randn(E, D, generator=generator) / D ** 0.5).to(dtype)
    bias_E = (torch.randn(E, generator=generator) * 0.1).to(dtype) if config.gate_bias else None
    # The selection bias stays float32: it only shifts the float32 choice scores.
    selection_E = torch.randn(E, generator=generator) * 0.1 if config.selection_bias else None
    shared = None
    if config.num_shared_experts:
        shared = SharedExperts(config)
        _init_(shared, generator)
    return RouterLayer(GateWeights(weight_ED, bias_E, selection_E), shared)
