"""Checkpoint directories: `config.json` plus safetensors files, laid out per expert.

    DIR/config.json                      {"format": "moe-cluster/1", "model": {ModelConfig fields}}
    DIR/router.safetensors               layers.{L}.gate.weight [E, D], .gate.bias [E],
                                         .gate.selection_bias [E], layers.{L}.shared.* (dense parts)
    DIR/experts/expert-{e:05d}.safetensors   layers.{L}.w1, .w2, .w3, .b1, .b2 of expert e, every layer

L is the MoE layer id (`ModelConfig.moe_layer_ids`). An expert server opens only the
files of the experts it hosts, and reads only the layers it hosts from them.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from ..core.config import ModelConfig
from ..core.experts import SharedExperts, make_expert
from ..core.model import MoELayer, MoEModel, RouterLayer
from ..core.routing import GateWeights

__all__ = ["FORMAT", "save_model", "load_model", "load_config", "load_router_layers", "load_experts",
           "expert_file", "CheckpointError"]

FORMAT = "moe-cluster/1"


class CheckpointError(ValueError):
    """The directory is not a readable moe-cluster checkpoint."""


def expert_file(directory: Path, expert: int) -> Path:
    return Path(directory) / "experts" / f"expert-{expert:05d}.safetensors"


def save_model(model: MoEModel, directory: str | Path) -> None:
    """Write `model` to `directory` (created if needed). Bit-exact round trip with load_model."""
    directory = Path(directory)
    (directory / "experts").mkdir(parents=True, exist_ok=True)
    config = model.config
    router_tensors: dict[str, torch.Tensor] = {}
    for layer_id, moe_layer in zip(config.moe_layer_ids, model.layers):
        router_tensors.update(_router_tensors(layer_id, moe_layer.router))
    save_file(router_tensors, str(directory / "router.safetensors"), metadata={"format": FORMAT})
    for expert in range(config.num_experts):
        tensors = {}
        for layer_id, moe_layer in zip(config.moe_layer_ids, model.layers):
            for name, param in moe_layer.experts[expert].named_parameters():
                tensors[f"layers.{layer_id}.{name}"] = param.detach().contiguous()
        save_file(tensors, str(expert_file(directory, expert)), metadata={"format": FORMAT})
    # config.json last: its presence marks a complete checkpoint.
    (directory / "config.json").write_text(json.dumps({"format": FORMAT, "model": config.to_dict()}, indent=2))


def _router_tensors(layer_id: int, router: RouterLayer) -> dict[str, torch.Tensor]:
    prefix = f"layers.{layer_id}"
    out = {f"{prefix}.gate.weight": router.gate.weight_ED.contiguous()}
    if router.gate.bias_E is not None:
        out[f"{prefix}.gate.bias"] = router.gate.bias_E.contiguous()
    if router.gate.selection_bias_E is not None:
        out[f"{prefix}.gate.selection_bias"] = router.gate.selection_bias_E.contiguous()
    if router.shared is not None:
        for name, param in router.shared.named_parameters():
            out[f"{prefix}.shared.{name}"] = param.detach().contiguous()
    return out


def load_config(directory: str | Path) -> ModelConfig:
    path = Path(directory) / "config.json"
    if not path.is_file():
        raise CheckpointError(f"{path} not found: is {directory} a checkpoint directory? "
                              "Create one with `moe-cluster init DIR --preset tiny`.")
    data = json.loads(path.read_text())
    if data.get("format") != FORMAT:
        raise CheckpointError(f"{path}: format {data.get('format')!r} is not {FORMAT!r}")
    return ModelConfig.from_dict(data["model"])


def load_router_layers(directory: str | Path, config: ModelConfig) -> list[RouterLayer]:
    """The gate (and shared experts) of every MoE layer, in storage order."""
    path = Path(directory) / "router.safetensors"
    layers = []
    with safe_open(str(path), framework="pt") as f:
        keys = set(f.keys())
        get = lambda k: f.get_tensor(k) if k in keys else None  # noqa: E731
        for layer_id in config.moe_layer_ids:
            prefix = f"layers.{layer_id}"
            gate = GateWeights(get(f"{prefix}.gate.weight"), get(f"{prefix}.gate.bias"),
                               get(f"{prefix}.gate.selection_bias"))
            if gate.weight_ED is None:
                raise CheckpointError(f"{path} has no {prefix}.gate.weight")
            shared = None
            if config.num_shared_experts:
                shared = SharedExperts(config)
                _assign(shared, {n: get(f"{prefix}.shared.{n}") for n, _ in shared.named_parameters()}, path)
            layers.append(RouterLayer(gate, shared))
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
        path = expert_file(Path(directory), expert)
        with safe_open(str(path), framework="pt") as f:
            keys = set(f.keys())
            for layer_id in layer_ids:
                module = make_expert(config)
                names = [n for n, _ in module.named_parameters()]
                tensors = {n: f.get_tensor(f"layers.{layer_id}.{n}") if f"layers.{layer_id}.{n}" in keys else None
                           for n in names}
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
