"""Deterministic random weights: the same (config, seed) gives the same bits on every machine.

Random weights are drawn per (layer, expert) from a seed, so an expert server can build
its own experts of a random model without building the others.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from .config import ModelConfig
from .experts import SharedExperts, make_expert
from .layers import GateAndShared, MoELayer
from .routing import GateWeights

__all__ = ["random_expert", "random_gate_and_shared", "random_layers"]

_GATE_SLOT = -1  # generator slot of a layer's gate and shared experts (experts use slots 0..E-1)


def _generator(seed: int, layer_id: int, slot: int) -> torch.Generator:
    """An independent generator per (seed, layer, expert slot)."""
    entropy = [int(seed) & 0xFFFFFFFF, int(layer_id) & 0xFFFFFFFF, (slot + 1) & 0xFFFFFFFF]
    state = np.random.SeedSequence(entropy).generate_state(2, dtype=np.uint32)
    return torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))


def _init_(module: nn.Module, generator: torch.Generator) -> None:
    """Normal(0, 1/sqrt(fan_in)) weights, Normal(0, 0.02) biases, in parameter order."""
    for _, param in module.named_parameters():
        if param.dim() >= 2:
            values = torch.randn(param.shape, generator=generator) / param.shape[-1] ** 0.5
        else:
            values = torch.randn(param.shape, generator=generator) * 0.02
        param.data.copy_(values.to(param.dtype))


def random_expert(config: ModelConfig, seed: int, layer_id: int, expert: int) -> nn.Module:
    module = make_expert(config)
    _init_(module, _generator(seed, layer_id, expert))
    return module


def random_gate_and_shared(config: ModelConfig, seed: int, layer_id: int) -> GateAndShared:
    generator = _generator(seed, layer_id, _GATE_SLOT)
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
    return GateAndShared(GateWeights(weight_ED, bias_E, selection_E), shared)


def random_layers(config: ModelConfig, seed: int) -> list[MoELayer]:
    """Every MoE layer of a random model, in storage order."""
    return [MoELayer(random_gate_and_shared(config, seed, layer_id),
                     [random_expert(config, seed, layer_id, e) for e in range(config.num_experts)])
            for layer_id in config.moe_layer_ids]
