"""Model configuration: one frozen dataclass that describes an MoE model, plus presets.

`ModelConfig` fixes the math (DESIGN.md, "The math"): sizes, expert kind, routing options,
shared experts and dtype. It validates itself on construction; a bad value raises
`ValueError` naming the field and what is allowed. `to_dict`/`from_dict` give the
`config.json` form stored in a checkpoint directory.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Literal

import torch

from ..dtypes import DTYPE_NAMES

__all__ = ["ModelConfig", "PRESETS", "preset_config", "DTYPES"]

ExpertKind = Literal["mlp", "swiglu"]
ScoreFunc = Literal["softmax", "sigmoid"]

# Names accepted in configs and on the wire (the one table: moe_cluster/dtypes.py), mapped to torch dtypes.
DTYPES: dict[str, torch.dtype] = {name: getattr(torch, name) for name in DTYPE_NAMES}
ACTIVATIONS = ("relu", "gelu", "silu", "tanh")


@dataclass(frozen=True)
class ModelConfig:
    """One MoE model: `num_layers` MoE layers of `num_experts` experts each."""

    d_model: int  # D: hidden size of a token
    d_ff: int  # F: hidden size inside one routed expert
    num_experts: int  # E: routed experts per layer
    top_k: int  # K: experts chosen per token
    num_layers: int = 1  # MoE layers stored in the model
    # Names of the MoE layers as callers use them (e.g. decoder layer indices of an
    # imported model, where dense layers have no experts). Default: 0..num_layers-1.
    layer_ids: tuple[int, ...] | None = None
    expert_kind: ExpertKind = "swiglu"  # "mlp": W2 act(W1 x + b1) + b2; "swiglu": W2 (silu(W1 x) * W3 x)
    activation: str = "gelu"  # activation of "mlp" experts
    expert_bias: bool = True  # "mlp" experts carry b1, b2
    gate_bias: bool = False  # gate logits = x W^T + b (the seed's g(x) = softmax(Wx + b))
    score_func: ScoreFunc = "softmax"  # softmax (Mixtral, Qwen) or sigmoid (DeepSeek-V3)
    normalize_top_k: bool = False  # renormalise the K chosen weights to sum to 1 (Mixtral)
    routed_scaling_factor: float = 1.0  # multiplies the routed weights (DeepSeek-V3: 2.5)
    n_group: int = 1  # expert groups for group-limited routing (1 = off)
    topk_group: int = 1  # groups a token may choose from (DeepSeek-V3)
    selection_bias: bool = False  # per-expert bias added to scores for the choice only
    num_shared_experts: int = 0  # always-on experts, fused into one FFN of width n * shared_d_ff
    shared_d_ff: int = 0  # hidden size of one shared expert
    shared_expert_gate: bool = False  # scale the shared output by sigmoid(x w_s) (Qwen2-MoE)
    dtype: str = "float32"  # weights and compute dtype: float32 | bfloat16 | float16

    def __post_init__(self) -> None:
        if self.layer_ids is not None:
            object.__setattr__(self, "layer_ids", tuple(int(i) for i in self.layer_ids))
        for name in ("d_model", "d_ff", "num_experts", "top_k", "num_layers", "n_group", "topk_group"):
            _require(isinstance(getattr(self, name), int) and getattr(self, name) >= 1, name,
                     "a positive integer", getattr(self, name))
        _require(self.top_k <= self.num_experts, "top_k", f"1..num_experts ({self.num_experts})", self.top_k)
        _require(self.expert_kind in ("mlp", "swiglu"), "expert_kind", "'mlp' or 'swiglu'", self.expert_kind)
        _require(self.activation in ACTIVATIONS, "activation", f"one of {ACTIVATIONS}", self.activation)
        _require(self.score_func in ("softmax", "sigmoid"), "score_func", "'softmax' or 'sigmoid'", self.score_func)
        _require(self.dtype in DTYPES, "dtype", f"one of {tuple(DTYPES)}", self.dtype)
        _require(self.routed_scaling_factor > 0, "routed_scaling_factor", "a number > 0", self.routed_scaling_factor)
        _require(self.num_experts % self.n_group == 0, "n_group", f"a divisor of num_experts ({self.num_experts})",
                 self.n_group)
        _require(self.topk_group <= self.n_group, "topk_group", f"1..n_group ({self.n_group})", self.topk_group)
        experts_allowed = self.topk_group * (self.num_experts // self.n_group)
        _require(self.top_k <= experts_allowed, "top_k",
                 f"at most topk_group * experts per group ({experts_allowed})", self.top_k)
        _require(self.num_shared_experts >= 0, "num_shared_experts", "an integer >= 0", self.num_shared_experts)
        if self.num_shared_experts:
            _require(self.shared_d_ff >= 1, "shared_d_ff", "a positive integer when num_shared_experts > 0",
                     self.shared_d_ff)
        else:
            _require(not self.shared_expert_gate, "shared_expert_gate", "False when num_shared_experts == 0",
                     self.shared_expert_gate)
        if self.layer_ids is not None:
            _require(len(self.layer_ids) == self.num_layers and len(set(self.layer_ids)) == self.num_layers,
                     "layer_ids", f"{self.num_layers} distinct integers (one per MoE layer)", self.layer_ids)

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @property
    def moe_layer_ids(self) -> tuple[int, ...]:
        """The layer names callers pass as `layer`, in storage order."""
        return self.layer_ids if self.layer_ids is not None else tuple(range(self.num_layers))

    def layer_position(self, layer: int) -> int:
        """Storage position of MoE layer `layer`; ValueError if the model has no such MoE layer."""
        ids = self.moe_layer_ids
        if isinstance(layer, bool) or not isinstance(layer, int) or layer not in ids:
            contiguous = len(ids) > 1 and ids == tuple(range(ids[0], ids[-1] + 1))
            shown = f"{ids[0]}..{ids[-1]}" if contiguous else str(list(ids))
            raise ValueError(f"unknown layer {layer!r}: this model has MoE layers {shown}")
        return ids.index(layer)

    def resolve_layer(self, layer: int | None) -> int:
        """The MoE layer a request means: `layer`, or, when none is given, the model's only MoE layer.

        ValueError when `layer` is None and the model has several MoE layers (a missing layer
        never silently means the first one), or when `layer` is not one of them.
        """
        if layer is None:
            ids = self.moe_layer_ids
            if len(ids) == 1:
                return ids[0]
            raise ValueError(f'layer is required: this model has MoE layers {list(ids)}; send "layer": <id> '
                             '(Python: forward(x, layer=<id>); Open Inference Protocol: the input "layer")')
        self.layer_position(layer)
        return layer

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        if self.layer_ids is not None:
            out["layer_ids"] = list(self.layer_ids)
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ModelConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown model config fields {unknown}; allowed: {sorted(known)}")
        return cls(**data)

    def replace(self, **changes: Any) -> "ModelConfig":
        return dataclasses.replace(self, **changes)


def _require(ok: bool, name: str, allowed: str, value: Any) -> None:
    if not ok:
        raise ValueError(f"ModelConfig.{name} must be {allowed}, got {value!r}")


PRESETS: dict[str, ModelConfig] = {
    # The seed's model: Dense (MLP) experts, gate g(x) = softmax(Wx + b), top-2, no renormalisation.
    "tiny": ModelConfig(d_model=64, d_ff=128, num_experts=8, top_k=2, num_layers=2,
                        expert_kind="mlp", activation="gelu", gate_bias=True),
    # Mixtral's layer shape scaled down: D=1024, F=3584, 8 SwiGLU experts, top-2, renormalised.
    "mixtral-mini": ModelConfig(d_model=1024, d_ff=3584, num_experts=8, top_k=2, num_layers=2,
                                expert_kind="swiglu", normalize_top_k=True),
    # Fine-grained, OLMoE's routing at half its width: D=1024, F=512, 64 SwiGLU experts, top-8,
    # softmax over all 64, no renormalisation of the top-8 weights.
    "olmoe-mini": ModelConfig(d_model=1024, d_ff=512, num_experts=64, top_k=8, num_layers=2,
                              expert_kind="swiglu", normalize_top_k=False),
}


def preset_config(name: str) -> ModelConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    return PRESETS[name]

