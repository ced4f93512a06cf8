"""The one checkpoint reader (format: `checkpoint/format.py`): the whole model, or only the parts a
replica needs (the router's gates, the experts a deployment hosts, for the layers it hosts).

`load_digests` gives the weights' identity (the sha256 of every file); a loader given `digests`
checks each file it opens against them first (CheckpointChanged), reading only those files."""

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
from .format import (FORMAT, CheckpointError, config_file, expert_file, file_digest, layer_key, relative_name,
                     router_file, verify_file, weight_files)

__all__ = ["load_model", "load_config", "load_digests", "load_router_layers", "load_experts"]


def _manifest(directory: str | Path) -> dict:
    path = config_file(directory)
    if not path.is_file():
        raise CheckpointError(f"{path} not found: is {directory} a checkpoint directory? "
                              "Create one with `moe-cluster init DIR --preset tiny`.")
    data = json.loads(path.read_text())
    if data.get("format") != FORMAT:
        raise CheckpointError(f"{path}: format {data.get('format')!r} is not {FORMAT!r}")
    return data


def load_config(directory: str | Path) -> ModelConfig:
    return ModelConfig.from_dict(_manifest(directory)["model"])


def recorded_digests(directory: str | Path) -> dict[str, str]:
    """The sha256 of each weight file as config.json records it ({} for a checkpoint written before
    digests were recorded)."""
    return dict(_manifest(directory).get("files", {}))


def load_digests(directory: str | Path) -> dict[str, str]:
    """The sha256 of every weight file, by name in the directory: config.json's record, and for files
    it lacks (a checkpoint written before digests were recorded) computed now, reading the files."""
    digests = recorded_digests(directory)
    for path in weight_files(directory, load_config(directory).num_experts):
        name = relative_name(directory, path)
        if name not in digests:
            if not path.is_file():
                raise CheckpointError(f"{path} not found: {directory} is not a complete checkpoint; write it "
                                      "again (`moe-cluster import-hf` or `moe-cluster init`)")
            digests[name] = file_digest(path)
    return digests


APP_DIGESTS = "the app (its weights as they were when it was built)"  # whose digests a replica checks


def load_router_layers(directory: str | Path, config: ModelConfig, digests: dict[str, str] | None = None,
                       digests_from: str = APP_DIGESTS) -> list[GateAndShared]:
    """The gate (and shared experts) of every MoE layer, in storage order. With `digests` (the app's),
    the file is checked against them first: CheckpointChanged if it was rewritten."""
    path = router_file(directory)
    if digests is not None:
        verify_file(directory, path, digests, digests_from)
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


def load_experts(directory: str | Path, config: ModelConfig, experts: list[int], layers: list[int] | None = None,
                 digests: dict[str, str] | None = None,
                 digests_from: str = APP_DIGESTS) -> dict[tuple[int, int], nn.Module]:
    """Only the listed experts, for the listed layer ids (default: all): {(layer_id, expert): module}.
    With `digests` (the app's), each expert file is checked against them before it is read."""
    layer_ids = config.moe_layer_ids if layers is None else layers
    for layer_id in layer_ids:
        config.layer_position(layer_id)  # ValueError for an unknown layer
    out = {}
    for expert in experts:
        if not 0 <= expert < config.num_experts:
            raise ValueError(f"expert {expert} out of range 0..{config.num_experts - 1}")
        path = expert_file(directory, expert)
        if digests is not None:
            verify_file(directory, path, digests, digests_from)
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
    """The whole model; every file is checked against the digests config.json records (if any)."""
    config = load_config(directory)
    digests, written = recorded_digests(directory), f"{config_file(directory)} (the file as written)"
    routers = load_router_layers(directory, config, digests, written)
    experts = load_experts(directory, config, list(range(config.num_experts)), digests=digests, digests_from=written)
    layers = [MoELayer(router, [experts[(layer_id, e)] for e in range(config.num_experts)])
              for layer_id, router in zip(config.moe_layer_ids, routers)]
    return MoEModel(config, layers)
