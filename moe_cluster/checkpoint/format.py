"""The on-disk checkpoint format: file names and tensor names, shared by the reader and the writer.

    DIR/config.json                      {"format": "moe-cluster/1", "model": {ModelConfig fields}}
    DIR/router.safetensors               layers.{L}.gate.weight [E, D], .gate.bias [E],
                                         .gate.selection_bias [E], layers.{L}.shared.* (dense parts)
    DIR/experts/expert-{e:05d}.safetensors   layers.{L}.w1, .w2, .w3, .b1, .b2 of expert e, every layer

L is the MoE layer id (`ModelConfig.moe_layer_ids`). An expert server opens only the
files of the experts it hosts, and reads only the layers it hosts from them. config.json is
written last: its presence marks a complete checkpoint.
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["FORMAT", "CheckpointError", "config_file", "router_file", "expert_file", "layer_key"]

FORMAT = "moe-cluster/1"


class CheckpointError(ValueError):
    """The directory is not a readable moe-cluster checkpoint."""


def config_file(directory: str | Path) -> Path:
    return Path(directory) / "config.json"


def router_file(directory: str | Path) -> Path:
    return Path(directory) / "router.safetensors"


def expert_file(directory: str | Path, expert: int) -> Path:
    return Path(directory) / "experts" / f"expert-{expert:05d}.safetensors"


def layer_key(layer_id: int, name: str) -> str:
    """The tensor name of parameter `name` (e.g. "gate.weight", "w1") of MoE layer `layer_id`."""
    return f"layers.{layer_id}.{name}"
