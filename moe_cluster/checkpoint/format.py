"""The on-disk checkpoint format: file names and tensor names, shared by the reader and the writer.

    DIR/config.json                      {"format": "moe-cluster/1", "model": {ModelConfig fields},
                                          "files": {"router.safetensors": sha256 hex, "experts/...": ...}}
    DIR/router.safetensors               layers.{L}.gate.weight [E, D], .gate.bias [E],
                                         .gate.selection_bias [E], layers.{L}.shared.* (dense parts)
    DIR/experts/expert-{e:05d}.safetensors   layers.{L}.w1, .w2, .w3, .b1, .b2 of expert e, every layer

L is the MoE layer id (`ModelConfig.moe_layer_ids`). An expert server opens only the
files of the experts it hosts, and reads only the layers it hosts from them. config.json is
written last: its presence marks a complete checkpoint, and its "files" are the sha256 of every
weight file as written (older checkpoints lack them: the reader then computes them). The weights
are identified by these digests, not by the directory's path: a replica that loads a file checks
its digest against the app's, so weights rewritten in place are refused rather than mixed in.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

__all__ = ["FORMAT", "CheckpointError", "CheckpointChanged", "config_file", "router_file", "expert_file",
           "layer_key", "file_digest", "weight_files", "verify_file"]

FORMAT = "moe-cluster/1"


class CheckpointError(ValueError):
    """The directory is not a readable moe-cluster checkpoint."""


class CheckpointChanged(CheckpointError):
    """A weight file's content is not the one expected (rewritten or damaged since it was recorded)."""


def config_file(directory: str | Path) -> Path:
    return Path(directory) / "config.json"


def router_file(directory: str | Path) -> Path:
    return Path(directory) / "router.safetensors"


def expert_file(directory: str | Path, expert: int) -> Path:
    return Path(directory) / "experts" / f"expert-{expert:05d}.safetensors"


def layer_key(layer_id: int, name: str) -> str:
    """The tensor name of parameter `name` (e.g. "gate.weight", "w1") of MoE layer `layer_id`."""
    return f"layers.{layer_id}.{name}"


def weight_files(directory: str | Path, num_experts: int) -> list[Path]:
    """Every weight file of a checkpoint of `num_experts` experts: the router's, then one per expert."""
    return [router_file(directory)] + [expert_file(directory, e) for e in range(num_experts)]


def relative_name(directory: str | Path, path: Path) -> str:
    """The key of `path` in config.json's "files": its path below the directory, with "/"."""
    return path.relative_to(Path(directory)).as_posix()


def file_digest(path: str | Path, chunk_bytes: int = 8 * 2**20) -> str:
    """sha256 hex of a file, read in chunks (a checkpoint file may be larger than memory)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(chunk_bytes):
            digest.update(chunk)
    return digest.hexdigest()


def verify_file(directory: str | Path, path: Path, digests: dict[str, str], expected_from: str) -> None:
    """CheckpointChanged unless `path` has the digest `digests` records for it (`expected_from` says
    whose record that is, for the message). A file the record lacks is not checked."""
    expected = digests.get(relative_name(directory, path))
    if expected is None:
        return
    if not path.is_file():
        raise CheckpointChanged(f"{path} is missing, but {expected_from} expects it with sha256 {expected}: the "
                                "checkpoint directory was changed (is it being rewritten?); redeploy once it is "
                                "complete, or restore the file")
    actual = file_digest(path)
    if actual != expected:
        raise CheckpointChanged(f"{path} has sha256 {actual}, but {expected_from} expects sha256 {expected}: the "
                                "file was rewritten (e.g. by `moe-cluster import-hf --force`) or damaged since; "
                                "refusing to mix other weights in. Redeploy the app to serve the new weights, "
                                "or restore the old file")
