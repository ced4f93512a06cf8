"""Import the MoE layers of a Hugging Face checkpoint into a moe-cluster checkpoint (no Ray).

    SRC/config.json + SRC/model.safetensors            (or sharded: model-0000x-of-0000y.safetensors
                                                          + model.safetensors.index.json)
      -> DST/config.json, DST/router.safetensors, DST/experts/expert-NNNNN.safetensors

Only the MoE blocks are imported (gate, routed experts, shared experts), not attention or
embeddings. Our layer ids are the decoder layer indices of the source model, so a dense
layer (DeepSeek-V3's first `first_k_dense_replace` layers, Qwen's `mlp_only_layers`) is an
"unknown layer". Families and their routing rules: `families.py`.

Memory: tensors are read one at a time through `safe_open` (memory-mapped), and one expert
file (that expert, every MoE layer) is built and written at a time; the whole model is
never in memory.

Dtypes: `dtype="keep"` keeps the experts' dtype (FP8 block-quantised DeepSeek weights are
dequantised to bfloat16, as DeepSeek's own fp8_cast_bf16 does); "float32"/"bfloat16"
convert experts and shared experts. The gate is never made less precise than stored: it
runs in float32 anyway, and DeepSeek-V3 keeps it in float32. The selection bias is float32.

Where HF's arithmetic differs from ours (none matters in float32; tests/unit/hf/test_hf_import.py):
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

import time
from collections.abc import Callable
from pathlib import Path

import torch

from ..checkpoint import CheckpointWriter
from ..checkpoint.format import layer_key
from ..core.config import ModelConfig
from ..dtypes import BY_SAFETENSORS
from .families import HFFamily, family_for, model_config, moe_layer_ids
from .safetensors_reader import HFCheckpoint, read_hf_config

__all__ = ["import_hf_checkpoint", "IMPORT_DTYPES"]

IMPORT_DTYPES = ("keep", "float32", "bfloat16")
# Our dtype for each stored safetensors dtype "keep" accepts: the table's, and FP8 (an import
# policy) dequantised to bfloat16.
_ST_DTYPES = {**{st: row.name for st, row in BY_SAFETENSORS.items()}, "F8_E4M3": "bfloat16", "F8_E5M2": "bfloat16"}


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
        with CheckpointWriter(dst, config) as writer:  # config.json comes last, at the end of the block
            path = writer.write_router(_router_tensors(ckpt, family, config, prefixes, dtype))
            log(f"router: {len(prefixes)} layers -> {path}")
            for expert in range(config.num_experts):
                _write_expert(ckpt, family, config, prefixes, expert, writer, log)
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


def _router_tensors(ckpt: HFCheckpoint, family: HFFamily, config: ModelConfig, prefixes: dict[int, str],
                    dtype: str) -> dict[str, torch.Tensor]:
    """The router file: every layer's gate [E, D], selection bias [E] and shared experts."""
    E, D, model_dtype = config.num_experts, config.d_model, config.torch_dtype
    F_s = config.num_shared_experts * config.shared_d_ff
    tensors: dict[str, torch.Tensor] = {}
    for layer_id, prefix in prefixes.items():
        gate_ED = _checked(ckpt, f"{prefix}.gate.weight", [E, D])
        # The gate runs in float32 (routing.gate_scores), so keep its stored precision unless asked for float32.
        tensors[layer_key(layer_id, "gate.weight")] = gate_ED.float() if dtype == "float32" else gate_ED
        if family.selection_bias_name:
            bias_E = _checked(ckpt, f"{prefix}.gate.{family.selection_bias_name}", [E])
            tensors[layer_key(layer_id, "gate.selection_bias")] = bias_E.float()
        if family.shared_name and config.num_shared_experts:
            shared = f"{prefix}.{family.shared_name}"
            tensors[layer_key(layer_id, "shared.expert.w1")] = _checked(ckpt, f"{shared}.gate_proj.weight", [F_s, D])
            tensors[layer_key(layer_id, "shared.expert.w3")] = _checked(ckpt, f"{shared}.up_proj.weight", [F_s, D])
            tensors[layer_key(layer_id, "shared.expert.w2")] = _checked(ckpt, f"{shared}.down_proj.weight", [D, F_s])
            for name in ("w1", "w3", "w2"):
                key = layer_key(layer_id, f"shared.expert.{name}")
                tensors[key] = tensors[key].to(model_dtype)
        if family.shared_gate_name:
            gate_1D = _checked(ckpt, f"{prefix}.{family.shared_gate_name}.weight", [1, D])
            tensors[layer_key(layer_id, "shared.gate")] = gate_1D.to(model_dtype)
    return tensors


def _write_expert(ckpt: HFCheckpoint, family: HFFamily, config: ModelConfig, prefixes: dict[int, str],
                  expert: int, writer: CheckpointWriter, log: Callable[[str], None]) -> None:
    """The file of expert e: w1, w3 [F, D] and w2 [D, F], every MoE layer."""
    tensors: dict[str, torch.Tensor] = {}
    for layer_id, prefix in prefixes.items():
        for name, tensor in _expert_weights(ckpt, family, config, prefix, expert).items():
            tensors[layer_key(layer_id, name)] = tensor.to(config.torch_dtype)
    path = writer.write_expert(expert, tensors)
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
