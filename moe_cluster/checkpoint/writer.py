"""The one checkpoint writer: `moe-cluster init`, `save_model` and `import-hf` all write through it.

    with CheckpointWriter(directory, config) as writer:   # config.json removed: incomplete until the end
        writer.write_router({layer_key(L, "gate.weight"): gate_ED, ...})
        writer.write_expert(e, {layer_key(L, "w1"): w1_FD, ...})     # one file per expert
    # leaving the block without an exception writes config.json, last: the checkpoint is complete

config.json records the sha256 of every file written (read back once, right after writing it):
the weights' identity, checked by every replica that loads them (format.py).
Tensors are written as given (contiguous copies where needed); the caller picks their dtypes.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from ..core.config import ModelConfig
from ..core.layers import GateAndShared
from ..core.model import MoEModel
from .format import FORMAT, config_file, expert_file, file_digest, layer_key, relative_name, router_file

__all__ = ["CheckpointWriter", "save_model"]


class CheckpointWriter:
    """Writes one checkpoint directory, file by file, so that a whole model never needs to be in memory."""

    def __init__(self, directory: str | Path, config: ModelConfig) -> None:
        self.directory = Path(directory)
        self.config = config
        self.digests: dict[str, str] = {}  # sha256 of each file written, by its name in the directory
        (self.directory / "experts").mkdir(parents=True, exist_ok=True)
        config_file(self.directory).unlink(missing_ok=True)  # no config.json = incomplete, until the end

    def __enter__(self) -> "CheckpointWriter":
        return self

    def __exit__(self, exc_type: type | None, *exc: object) -> None:
        """config.json, last, once every file is written: its presence marks a complete checkpoint.
        An exception leaves the directory without it."""
        if exc_type is None:
            manifest = {"format": FORMAT, "model": self.config.to_dict(), "files": dict(sorted(self.digests.items()))}
            config_file(self.directory).write_text(json.dumps(manifest, indent=2))

    def write_router(self, tensors: dict[str, torch.Tensor]) -> Path:
        return self._write(router_file(self.directory), tensors)

    def write_expert(self, expert: int, tensors: dict[str, torch.Tensor]) -> Path:
        return self._write(expert_file(self.directory, expert), tensors)

    def _write(self, path: Path, tensors: dict[str, torch.Tensor]) -> Path:
        save_file({k: t.detach().contiguous() for k, t in tensors.items()}, str(path), metadata={"format": FORMAT})
        # Digested once here (the file is in the page cache) so that serving never hashes the whole checkpoint.
        self.digests[relative_name(self.directory, path)] = file_digest(path)
        return path


def save_model(model: MoEModel, directory: str | Path) -> None:
    """Write `model` to `directory` (created if needed). Bit-exact round trip with load_model."""
    config = model.config
    with CheckpointWriter(directory, config) as writer:
        tensors: dict[str, torch.Tensor] = {}
        for layer_id, moe_layer in zip(config.moe_layer_ids, model.layers):
            tensors.update(_router_tensors(layer_id, moe_layer.gate_and_shared))
        writer.write_router(tensors)
        for expert in range(config.num_experts):
            writer.write_expert(expert, {layer_key(layer_id, name): param
                                         for layer_id, moe_layer in zip(config.moe_layer_ids, model.layers)
                                         for name, param in moe_layer.experts[expert].named_parameters()})


def _router_tensors(layer_id: int, parts: GateAndShared) -> dict[str, torch.Tensor]:
    """The router file's tensors of one layer: gate weight, optional biases, shared experts."""
    out = {layer_key(layer_id, "gate.weight"): parts.gate.weight_ED}
    if parts.gate.bias_E is not None:
        out[layer_key(layer_id, "gate.bias")] = parts.gate.bias_E
    if parts.gate.selection_bias_E is not None:
        out[layer_key(layer_id, "gate.selection_bias")] = parts.gate.selection_bias_E
    if parts.shared is not None:
        for name, param in parts.shared.named_parameters():
            out[layer_key(layer_id, f"shared.{name}")] = param
    return out
