"""Import the MoE layers of a Hugging Face checkpoint into a moe-cluster checkpoint (no Ray).

    SRC/config.json + SRC/model.safetensors            (or sharded: model-0000x-of-0000y.safetensors
                                                          + model.safetensors.index.json)
      -> DST/config.json, DST/router.safetensors, DST/experts/expert-NNNNN.safetensors

Only the MoE blocks are imported (gate, routed experts, shared experts), not attention or
embeddings. Our layer ids are the decoder layer indices of the source model, so a dense
layer (DeepSeek-V3's first `first_k_dense_replace` layers, Qwen's `mlp_only_layers`) is an
"unknown layer". Families and their routing rules: `hf_families.py`.

Memory: tensors are read one at a time through `safe_open` (memory-mapped), and one expert
file (that expert, every MoE layer) is built and written at a time; the whole model is
never in memory.

Dtypes: `dtype="keep"` keeps the experts' dtype (FP8 block-quantised DeepSeek weights are
dequantised to bfloat16, as DeepSeek's own fp8_cast_bf16 does); "float32"/"bfloat16"
convert experts and shared experts. The gate is never made less precise than stored: it
runs in float32 anyway, and DeepSeek-V3 keeps it in float32. The selection bias is float32.

Where HF's arithmetic differs from ours (none matters in float32; tests/unit/test_hf_import.py):
- Mixtral/Qwen/OLMoE compute the router logits in the model dtype, then softmax in float32;
  we compute the logits in float32. With bfloat16 weights a near tie may pick another expert.
- Qwen/OLMoE round the top-k weights to the model dtype before weighting; Mixtral and
  DeepSeek multiply in float32. We round the weights to the expert output's dtype.
- torch.topk's order among exactly equal scores is unspecified; ours gives the lower expert id.
- DeepSeek-V3 group masking: transformers 5.x fills the experts of dropped groups with -inf,
  as we do; transformers 4.x and DeepSeek's remote code filled them with 0.0, which differs
  only when fewer than K experts of the kept groups have score + bias > 0.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ..checkpoint import FORMAT, expert_file
from ..core.config import ModelConfig
from .families import HFFamily, family_for, model_config, moe_layer_ids

__all__ = ["import_hf_checkpoint", "HFCheckpoint", "read_hf_config", "IMPORT_DTYPES"]

IMPORT_DTYPES = ("keep", "float32", "bfloat16")
_FP8 = (torch.float8_e4m3fn, torch.float8_e5m2)
_ST_DTYPES = {"F32": "float32", "BF16": "bfloat16", "F16": "float16",
              "F8_E4M3": "bfloat16", "F8_E5M2": "bfloat16"}  # FP8 is dequantised to bfloat16 by default


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


def import_hf_checkpoint(src: str | Path, dst: str | Path, dtype: str = "keep",
                         log: Callable[[str], None] = print) -> ModelConfig:
    """Convert the MoE layers of Hugging Face checkpoint `src` into our checkpoint `dst`.

    Returns the ModelConfig written to dst/config.json; `log` gets one line per step
    (the router file, then one per expert file).
    """
    src, dst = Path(src), Path(dst)
    if dtype not in IMPORT_DTYPES:
        raise ValueError(f"dtype must be one of {IMPORT_DTYPES}, got {dtype!r}")
    if dst.resolve() == src.resolve():
        raise ValueError("DST must be another directory than SRC (both would hold a config.json)")
    started = time.perf_counter()
    hf_config = read_hf_config(src)
    family = family_for(hf_config)  # an unsupported model fails before any tensor is opened
    with HFCheckpoint(src, hf_config) as ckpt:
        layer_ids = moe_layer_ids(ckpt.config)
        prefixes = {layer_id: _block_prefix(ckpt, family, layer_id) for layer_id in layer_ids}
        model_dtype = _model_dtype(ckpt, family, prefixes[layer_ids[0]], dtype) if layer_ids else "float32"
        config = model_config(ckpt.config, layer_ids, model_dtype)
        dense = sorted(set(range(int(ckpt.config["num_hidden_layers"]))) - set(layer_ids))
        log(f"importing {family.model_type} from {src}: D={config.d_model} F={config.d_ff} E={config.num_experts} "
            f"K={config.top_k}, MoE layers {list(layer_ids)} (dense, skipped: {dense}), dtype {model_dtype}")
        (dst / "experts").mkdir(parents=True, exist_ok=True)
        (dst / "config.json").unlink(missing_ok=True)  # no config.json = incomplete checkpoint, until the end
        _write_router(ckpt, family, config, prefixes, dst, dtype, log)
        for expert in range(config.num_experts):
            _write_expert(ckpt, family, config, prefixes, expert, dst, log)
    # config.json last: its presence marks a complete checkpoint (as checkpoint.save_model does).
    (dst / "config.json").write_text(json.dumps({"format": FORMAT, "model": config.to_dict()}, indent=2))
    log(f"wrote {dst} in {time.perf_counter() - started:.1f}s")
    return config


def _block_prefix(ckpt: HFCheckpoint, family: HFFamily, layer_id: int) -> str:
    """`model.layers.{i}.{block}` of MoE layer i; ValueError if its gate is not in the checkpoint."""
    for block in family.block_names:
        prefix = f"model.layers.{layer_id}.{block}"
        if f"{prefix}.gate.weight" in ckpt:
            return prefix
    tried = " or ".join(f"model.layers.{layer_id}.{b}.gate.weight" for b in family.block_names)
    raise ValueError(f"config.json makes decoder layer {layer_id} an MoE layer, but {ckpt.directory} has no "
                     f"{tried}: are all shards of the checkpoint there?")


def _model_dtype(ckpt: HFCheckpoint, family: HFFamily, prefix: str, dtype: str) -> str:
    """The dtype of our experts: `dtype`, or for "keep" the stored dtype of the routed experts."""
    if dtype != "keep":
        return dtype
    per_expert = f"{prefix}.experts.0.{family.expert_names[0]}.weight"
    key = per_expert if per_expert in ckpt else f"{prefix}.experts.gate_up_proj"
    stored = ckpt.dtype_name(key) if key in ckpt else "F32"
    if stored not in _ST_DTYPES:
        raise ValueError(f"{key} is stored as {stored}, which has no moe-cluster dtype; "
                         "pass --dtype float32 or --dtype bfloat16 to convert")
    return _ST_DTYPES[stored]


def _checked(ckpt: HFCheckpoint, key: str, shape: list[int], row: int | None = None) -> torch.Tensor:
    """ckpt.get(key, row), with a clear error if it is missing or its shape is not `shape`."""
    if key not in ckpt:
        raise ValueError(f"{ckpt.directory} has no tensor {key}: the checkpoint does not match its config.json")
    tensor = ckpt.get(key, row)
    if list(tensor.shape) != shape:
        where = key if row is None else f"{key}[{row}]"
        raise ValueError(f"{where} has shape {list(tensor.shape)}, expected {shape} from config.json")
    return tensor


def _write_router(ckpt: HFCheckpoint, family: HFFamily, config: ModelConfig, prefixes: dict[int, str],
                  dst: Path, dtype: str, log: Callable[[str], None]) -> None:
    """router.safetensors: every layer's gate [E, D], selection bias [E] and shared experts."""
    E, D, model_dtype = config.num_experts, config.d_model, config.torch_dtype
    F_s = config.num_shared_experts * config.shared_d_ff
    tensors: dict[str, torch.Tensor] = {}
    for layer_id, prefix in prefixes.items():
        ours = f"layers.{layer_id}"
        gate_ED = _checked(ckpt, f"{prefix}.gate.weight", [E, D])
        # The gate runs in float32 (routing.gate_scores), so keep its stored precision unless asked for float32.
        tensors[f"{ours}.gate.weight"] = gate_ED.float() if dtype == "float32" else gate_ED
        if family.selection_bias_name:
            bias_E = _checked(ckpt, f"{prefix}.gate.{family.selection_bias_name}", [E])
            tensors[f"{ours}.gate.selection_bias"] = bias_E.float()
        if family.shared_name and config.num_shared_experts:
            shared = f"{prefix}.{family.shared_name}"
            tensors[f"{ours}.shared.expert.w1"] = _checked(ckpt, f"{shared}.gate_proj.weight", [F_s, D])
            tensors[f"{ours}.shared.expert.w3"] = _checked(ckpt, f"{shared}.up_proj.weight", [F_s, D])
            tensors[f"{ours}.shared.expert.w2"] = _checked(ckpt, f"{shared}.down_proj.weight", [D, F_s])
            for name in ("w1", "w3", "w2"):
                key = f"{ours}.shared.expert.{name}"
                tensors[key] = tensors[key].to(model_dtype)
        if family.shared_gate_name:
            gate_1D = _checked(ckpt, f"{prefix}.{family.shared_gate_name}.weight", [1, D])
            tensors[f"{ours}.shared.gate"] = gate_1D.to(model_dtype)
    tensors = {k: t.contiguous() for k, t in tensors.items()}
    save_file(tensors, str(dst / "router.safetensors"), metadata={"format": FORMAT})
    log(f"router: {len(prefixes)} layers -> {dst / 'router.safetensors'}")


def _write_expert(ckpt: HFCheckpoint, family: HFFamily, config: ModelConfig, prefixes: dict[int, str],
                  expert: int, dst: Path, log: Callable[[str], None]) -> None:
    """experts/expert-{e:05d}.safetensors: w1, w3 [F, D] and w2 [D, F] of expert e, every MoE layer."""
    tensors: dict[str, torch.Tensor] = {}
    for layer_id, prefix in prefixes.items():
        for name, tensor in _expert_weights(ckpt, family, config, prefix, expert).items():
            tensors[f"layers.{layer_id}.{name}"] = tensor.to(config.torch_dtype).contiguous()
    path = expert_file(dst, expert)
    save_file(tensors, str(path), metadata={"format": FORMAT})
    size_mb = sum(t.numel() * t.element_size() for t in tensors.values()) / 2**20
    log(f"expert {expert + 1}/{config.num_experts}: {len(prefixes)} layers, {size_mb:.1f} MiB -> {path}")


def _expert_weights(ckpt: HFCheckpoint, family: HFFamily, config: ModelConfig, prefix: str,
                    expert: int) -> dict[str, torch.Tensor]:
    """{w1, w3, w2} of one expert of one layer, from per-expert tensors or fused [E, ...] tensors."""
    E, D, F = config.num_experts, config.d_model, config.d_ff
    gate, up, down = family.expert_names
    per_expert = f"{prefix}.experts.{expert}"
    if f"{per_expert}.{gate}.weight" in ckpt:  # the published layout, and what save_pretrained writes
        return {"w1": _checked(ckpt, f"{per_expert}.{gate}.weight", [F, D]),
                "w3": _checked(ckpt, f"{per_expert}.{up}.weight", [F, D]),
                "w2": _checked(ckpt, f"{per_expert}.{down}.weight", [D, F])}
    fused = f"{prefix}.experts.gate_up_proj"
    if fused not in ckpt:
        raise ValueError(f"{ckpt.directory} has neither {per_expert}.{gate}.weight nor {fused}: "
                         "the checkpoint does not match its config.json")
    if ckpt.shape(fused) != [E, 2 * F, D]:
        raise ValueError(f"{fused} has shape {ckpt.shape(fused)}, expected [E, 2F, D] = {[E, 2 * F, D]}")
    gate_up_2FD = ckpt.get(fused, expert)  # transformers 5 layout: gate rows, then up rows
    return {"w1": gate_up_2FD[:F], "w3": gate_up_2FD[F:],
            "w2": _checked(ckpt, f"{prefix}.experts.down_proj", [D, F], row=expert)}
