"""Hugging Face MoE families: which decoder layers are MoE, where their tensors live, and
the `ModelConfig` that computes the same routing (pure python, no transformers import).

The truth for every rule here is `transformers/models/<family>/modeling_*.py` (checked
against transformers 5.24):

| family      | scores  | top-k renormalised        | extras                                           |
|-------------|---------|---------------------------|--------------------------------------------------|
| mixtral     | softmax | always                    |                                                  |
| qwen2_moe   | softmax | `norm_topk_prob` (False)  | one shared SwiGLU expert scaled by sigmoid(x w_s) |
| qwen3_moe   | softmax | `norm_topk_prob` (False)  |                                                  |
| olmoe       | softmax | `norm_topk_prob` (False)  |                                                  |
| deepseek_v3 | sigmoid | `norm_topk_prob` (True)   | selection bias, groups, scaling, shared experts  |

Tensor names on disk (what `save_pretrained` writes and what published checkpoints use):
`model.layers.{i}.{block}.gate.weight` [E, D] and per expert
`model.layers.{i}.{block}.experts.{e}.{gate|up|down}.weight`, or the fused form of
transformers 5 modules, `experts.gate_up_proj` [E, 2F, D] (gate rows first) and
`experts.down_proj` [E, D, F]. `importer.py` reads both.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..core.config import ModelConfig

__all__ = ["HFFamily", "FAMILIES", "family_for", "moe_layer_ids", "model_config"]


@dataclass(frozen=True)
class HFFamily:
    """Where one family keeps its MoE tensors inside decoder layer i (`model.layers.{i}.`)."""

    model_type: str
    block_names: tuple[str, ...]  # the MoE block's module name on disk, first match wins
    expert_names: tuple[str, str, str]  # per-expert (gate, up, down) = our (w1, w3, w2)
    shared_name: str | None = None  # the shared-expert FFN (gate_proj/up_proj/down_proj)
    shared_gate_name: str | None = None  # Linear(D, 1): the shared output is scaled by its sigmoid
    selection_bias_name: str | None = None  # inside `gate.`: bias added to the scores for the choice only


_SWIGLU = ("gate_proj", "up_proj", "down_proj")

FAMILIES: dict[str, HFFamily] = {
    # transformers 5 renames Mixtral's `block_sparse_moe` to `mlp` in memory; disk keeps the old name.
    "mixtral": HFFamily("mixtral", ("block_sparse_moe", "mlp"), ("w1", "w3", "w2")),
    "qwen2_moe": HFFamily("qwen2_moe", ("mlp",), _SWIGLU, shared_name="shared_expert",
                          shared_gate_name="shared_expert_gate"),
    "qwen3_moe": HFFamily("qwen3_moe", ("mlp",), _SWIGLU),
    "olmoe": HFFamily("olmoe", ("mlp",), _SWIGLU),
    "deepseek_v3": HFFamily("deepseek_v3", ("mlp",), _SWIGLU, shared_name="shared_experts",
                            selection_bias_name="e_score_correction_bias"),
}


def family_for(hf: dict[str, Any]) -> HFFamily:
    """The family of a Hugging Face `config.json` (by its `model_type`)."""
    model_type = hf.get("model_type")
    if model_type not in FAMILIES:
        raise ValueError(f"unsupported model_type {model_type!r} in config.json; "
                         f"import-hf supports {sorted(FAMILIES)}")
    act = hf.get("hidden_act", "silu")
    if act != "silu":
        raise ValueError(f"hidden_act {act!r} is not supported: our SwiGLU experts use silu")
    return FAMILIES[model_type]


def moe_layer_ids(hf: dict[str, Any]) -> list[int]:
    """Decoder layer indices that hold an MoE block (the others are dense MLPs), ascending."""
    model_type, n = hf["model_type"], int(hf["num_hidden_layers"])
    if model_type in ("mixtral", "olmoe"):
        return list(range(n))
    if model_type in ("qwen2_moe", "qwen3_moe"):
        # Qwen{2,3}MoeDecoderLayer: MoE unless listed in mlp_only_layers, every decoder_sparse_step-th layer.
        dense = set(hf.get("mlp_only_layers") or [])
        step = int(hf.get("decoder_sparse_step", 1))
        experts = _num_experts(hf, default=60 if model_type == "qwen2_moe" else 128)
        return [i for i in range(n) if i not in dense and experts > 0 and (i + 1) % step == 0]
    # deepseek_v3: the first `first_k_dense_replace` layers are dense. (HF ignores moe_layer_freq; so do we.)
    first_moe = int(hf.get("first_k_dense_replace", 3) or 0)
    return list(range(first_moe, n))


def model_config(hf: dict[str, Any], layer_ids: list[int], dtype: str) -> ModelConfig:
    """The ModelConfig whose routing is the family's, for MoE layers `layer_ids`."""
    if not layer_ids:
        raise ValueError("this checkpoint has no MoE layer (every decoder layer is dense): nothing to import")
    try:
        family = _ROUTING[hf["model_type"]](hf)
        d_model, top_k = int(hf["hidden_size"]), int(hf["num_experts_per_tok"])
    except KeyError as err:
        raise ValueError(f"config.json of this {hf['model_type']} checkpoint lacks {err.args[0]!r}; "
                         "is it the config.json that came with the weights?") from None
    return ModelConfig(d_model=d_model, top_k=top_k, num_layers=len(layer_ids), layer_ids=tuple(layer_ids),
                       expert_kind="swiglu", dtype=dtype, **family)


def _num_experts(hf: dict[str, Any], default: int | None = None) -> int:
    """Routed experts per layer. The key differs by family and by transformers version (its
    attribute_map aliases them): num_local_experts, num_experts or n_routed_experts."""
    for key in ("num_local_experts", "num_experts", "n_routed_experts"):
        if hf.get(key) is not None:
            return int(hf[key])
    if default is None:
        raise KeyError("num_local_experts (or num_experts, n_routed_experts)")
    return default


def _mixtral(hf: dict[str, Any]) -> dict[str, Any]:
    # MixtralTopKRouter always renormalises the top-k softmax weights.
    return dict(d_ff=int(hf["intermediate_size"]), num_experts=_num_experts(hf),
                score_func="softmax", normalize_top_k=True)


def _olmoe(hf: dict[str, Any]) -> dict[str, Any]:
    return dict(d_ff=int(hf["intermediate_size"]), num_experts=_num_experts(hf),
                score_func="softmax", normalize_top_k=bool(hf.get("norm_topk_prob", False)))


def _qwen3_moe(hf: dict[str, Any]) -> dict[str, Any]:
    return dict(d_ff=int(hf["moe_intermediate_size"]), num_experts=_num_experts(hf),
                score_func="softmax", normalize_top_k=bool(hf.get("norm_topk_prob", False)))


def _qwen2_moe(hf: dict[str, Any]) -> dict[str, Any]:
    # Qwen2MoeSparseMoeBlock always has one shared expert, scaled by sigmoid(shared_expert_gate(x)).
    return dict(_qwen3_moe(hf), num_shared_experts=1, shared_d_ff=int(hf["shared_expert_intermediate_size"]),
                shared_expert_gate=True)


def _deepseek_v3(hf: dict[str, Any]) -> dict[str, Any]:
    # DeepseekV3TopkRouter: sigmoid scores; e_score_correction_bias only for the choice; the top-2
    # sum of each group picks topk_group groups; n_shared_experts fused into one FFN.
    n_shared = int(hf.get("n_shared_experts") or 0)
    return dict(d_ff=int(hf["moe_intermediate_size"]), num_experts=_num_experts(hf),
                score_func="sigmoid", normalize_top_k=bool(hf.get("norm_topk_prob", True)),
                routed_scaling_factor=float(hf.get("routed_scaling_factor", 2.5)),
                n_group=int(hf.get("n_group", 8) or 1), topk_group=int(hf.get("topk_group", 4) or 1),
                selection_bias=True, num_shared_experts=n_shared,
                shared_d_ff=int(hf["moe_intermediate_size"]) if n_shared else 0)


_ROUTING = {"mixtral": _mixtral, "qwen2_moe": _qwen2_moe, "qwen3_moe": _qwen3_moe, "olmoe": _olmoe,
            "deepseek_v3": _deepseek_v3}
