"""The one checkpoint reader (format: `checkpoint/format.py`): the whole model, or only the parts a
replica needs (the router's gates, the experts a deployment hosts, for the layers it hosts)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from ..core.config import ModelConfig
from ..core.experts import SharedExperts, make_expert
from ..core.layers import MoELayer, GateAndShared
from ..core.model import MoEModel
from ..core.routing import GateWeights
from .format import FORMAT, CheckpointError, config_file, expert_file, layer_key, router_file

__all__ = ["load_model", "load_config", "load_router_layers", "load_experts"]


def load_config(directory: str | Path) -> ModelConfig:
    path = config_file(directory)
    if not path.is_file():
        raise CheckpointError(f"{path} not found: is {directory} a checkpoint directory? "
                              "Create one with `moe-cluster init DIR --preset tiny`.")
    data = json.loads(path.read_text())
    if data.get("format") != FORMAT:
        raise CheckpointError(f"{path}: format {data.get('format')!r} is not {FORMAT!r}")
    return ModelConfig.from_dict(data["model"])


def load_router_layers(directory: str | Path, config: ModelConfig) -> list[GateAndShared]:
    """The gate (and shared experts) of every MoE layer, in storage order."""
    path = router_file(directory)
    layers = []
    with safe_open(str(path), framework="pt") as f:
        keys = set(f.keys())
        get = lambda k: f.get_tensor(k) if k in keys else None  # noqa: E731
        for layer_id in config.moe_layer_ids:
            gate = GateWeights(get(layer_key(layer_id, "gate.weight")), get(layer_key(layer_id, "gate.bias")),
                               get(layer_key(layer_id, "gate.selection_bias")))
            if gate.weight_ED is None:
                raise CheckpointError(f"{path} has no {layer_key(layer_id, 'gate.weight')}")
            shared = None
            if config.num_shared_experts:
                shared = SharedExperts(config)
                _assign(shared, {n: get(layer_key(layer_id, f"shared.{n}")) for n, _ in shared.named_parameters()},
                        path)
            layers.append(GateAndShared(gate, shared))
    return layers


def load_experts(directory: str | Path, config: ModelConfig, experts: list[int],
                 layers: list[int] | None = None) -> dict[tuple[int, int], nn.Module]:
    """Only the listed experts, for the listed layer ids (default: all): {(layer_id, expert): module}."""
    layer_ids = config.moe_layer_ids if layers is None else layers
    for layer_id in layer_ids:
        config.layer_position(layer_id)  # ValueError for an unknown layer
    out = {}
    for expert in experts:
        if not 0 <= expert < config.num_experts:
            raise ValueError(f"expert {expert} out of range 0..{config.num_experts - 1}")
        path = expert_file(directory, expert)
        with safe_open(str(path), framework="pt") as f:
            keys = set(f.keys())
            for layer_id in layer_ids:
                module = make_expert(config)
                tensors = {n: f.get_tensor(layer_key(layer_id, n)) if layer_key(layer_id, n) in keys else None
                           for n, _ in module.named_parameters()}
                _assign(module, tensors, path)
                out[(layer_id, expert)] = module
    return out


def _assign(module: nn.Module, tensors: dict[str, torch.Tensor | None], path: Path) -> None:
    missing = [name for name, t in tensors.items() if t is None]
    if missing:
        raise CheckpointError(f"{path} lacks tensors {missing}")
    module.load_state_dict(tensors, strict=True, assign=True)
    for param in module.parameters():
        param.requires_grad_(False)


def load_model(directory: str | Path) -> MoEModel:
    config = load_config(directory)
    routers = load_router_layers(directory, config)
    experts = load_experts(directory, config, list(range(config.num_experts)))
    layers = [MoELayer(router, [experts[(layer_id, e)] for e in range(config.num_experts)])
              for layer_id, router in zip(config.moe_layer_ids, routers)]
    return MoEModel(config, layers)
