"""Read-only access to the tensors of a Hugging Face checkpoint directory (safetensors only, no Ray).

    SRC/config.json + SRC/model.safetensors            (or sharded: model-0000x-of-0000y.safetensors
                                                          + model.safetensors.index.json)

Tensors are read one at a time through `safe_open` (memory-mapped). FP8 block-quantised
weights (DeepSeek-V3) are dequantised to float32 with their `_scale_inv` blocks when read.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open

__all__ = ["HFCheckpoint", "read_hf_config"]

_FP8 = (torch.float8_e4m3fn, torch.float8_e5m2)


class HFCheckpoint:
    """Lazy read-only access to the tensors of a Hugging Face checkpoint directory."""

    def __init__(self, directory: str | Path, config: dict | None = None) -> None:
        self.directory = Path(directory)
        self.config = read_hf_config(self.directory) if config is None else config
        self._file_of = _tensor_index(self.directory)
        self._handles: dict[str, object] = {}

    def __contains__(self, key: str) -> bool:
        return key in self._file_of

    def __enter__(self) -> "HFCheckpoint":
        return self

    def __exit__(self, *exc: object) -> None:
        self._handles.clear()  # safe_open handles unmap when dropped

    def _handle(self, key: str):
        name = self._file_of[key]
        if name not in self._handles:
            self._handles[name] = safe_open(str(self.directory / name), framework="pt")
        return self._handles[name]

    def shape(self, key: str) -> list[int]:
        return list(self._handle(key).get_slice(key).get_shape())

    def dtype_name(self, key: str) -> str:
        """The safetensors dtype of `key`, e.g. "BF16"."""
        return self._handle(key).get_slice(key).get_dtype()

    def get(self, key: str, row: int | None = None) -> torch.Tensor:
        """Tensor `key`, or only its row `row` (one expert of a fused [E, ...] tensor)."""
        handle = self._handle(key)
        tensor = handle.get_tensor(key) if row is None else handle.get_slice(key)[row]
        if tensor.dtype in _FP8:
            tensor = self._dequantize(key, tensor)
        return tensor

    def _dequantize(self, key: str, w_MN: torch.Tensor) -> torch.Tensor:
        """FP8 weight [M, N] with one float scale per (bm x bn) block (`{key}_scale_inv`) -> float32."""
        scale_key = f"{key}_scale_inv"
        if scale_key not in self or w_MN.dim() != 2:
            raise ValueError(f"{key} is stored as {w_MN.dtype} without a 2-D block scale {scale_key}; "
                             "dequantise the checkpoint to bfloat16 first")
        bm, bn = self.config.get("quantization_config", {}).get("weight_block_size", [128, 128])
        M, N = w_MN.shape
        scale_MN = self.get(scale_key).float().repeat_interleave(bm, 0)[:M].repeat_interleave(bn, 1)[:, :N]
        return w_MN.float() * scale_MN


def read_hf_config(directory: Path) -> dict:
    """The Hugging Face config.json of `directory`, as a dict."""
    config_path = Path(directory) / "config.json"
    if not config_path.is_file():
        raise ValueError(f"{config_path} not found: SRC must be a Hugging Face model directory "
                         "(config.json + *.safetensors), e.g. one written by save_pretrained")
    return json.loads(config_path.read_text())


def _tensor_index(directory: Path) -> dict[str, str]:
    """{tensor name: file name} from model.safetensors.index.json, else from the *.safetensors files."""
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        weight_map = dict(json.loads(index.read_text())["weight_map"])
        missing = sorted({name for name in weight_map.values() if not (directory / name).is_file()})
        if missing:
            raise ValueError(f"{index} lists shards that are not in {directory}: {missing}; fetch every shard")
        return weight_map
    files = [directory / "model.safetensors"] if (directory / "model.safetensors").is_file() else \
        sorted(directory.glob("*.safetensors"))
    if not files:
        raise ValueError(f"no *.safetensors in {directory}: import-hf reads safetensors only; re-save the model "
                         "with `model.save_pretrained(DIR)` (transformers writes safetensors by default)")
    out = {}
    for path in files:
        with safe_open(str(path), framework="pt") as f:
            out.update({key: path.name for key in f.keys()})
    return out
