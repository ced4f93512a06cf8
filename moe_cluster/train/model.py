"""The models that `moe-cluster train` trains: a Mixtral whose MoE blocks are ours, and a dense baseline.

- MoE: `transformers.MixtralForCausalLM` (the family `import-hf`, the runner and the cluster
  serve) with every `MixtralSparseMoeBlock` replaced by `TrainableMoEBlock` (moe_block.py),
  which keeps the block's parameters, so the state dict is Mixtral's.
- Dense: `transformers.MistralForCausalLM`, Mixtral's architecture with one SwiGLU FFN per layer
  (same embeddings, attention, norms and head), of width `dense_d_ff` so that its parameters per
  token (the active ones) match the MoE's: K experts of width F plus the gate (E x D) ~ one FFN
  of width K*F + round(E/3).

Both are built from one `TrainConfig` and the same seed, and trained on the same batches.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .balance import BALANCE_METHODS
from .moe_block import TrainableMoEBlock

__all__ = ["TrainConfig", "PRESETS", "build_moe_model", "build_dense_model", "moe_blocks", "parameter_counts",
           "export_model"]


@dataclass(frozen=True)
class TrainConfig:
    """One training run: the model shape, the data budget and the optimisation."""

    vocab_size: int = 4096  # byte-level BPE vocabulary, trained on the training split
    d_model: int = 128  # D
    num_layers: int = 4  # decoder layers, each with one MoE block
    num_heads: int = 4  # attention heads (head dim D / heads)
    num_kv_heads: int = 2  # grouped-query attention: key/value heads
    d_ff: int = 256  # F: hidden width of one expert
    num_experts: int = 8  # E
    top_k: int = 2  # K
    context_length: int = 128  # tokens per training window and per scored validation window
    batch_size: int = 16  # windows per step (the global batch, split over --workers)
    steps: int = 400  # optimiser steps
    lr: float = 3e-3  # peak AdamW learning rate (linear warmup, cosine decay to 10%)
    warmup_steps: int = 30
    weight_decay: float = 0.05
    balance: str = "aux"  # aux | loss_free | none
    aux_alpha: float = 0.01  # weight of the Switch auxiliary loss
    z_loss: float = 0.0  # weight of the router z-loss (0: off)
    bias_rate: float = 0.01  # u of the loss-free bias update
    chars_per_domain: int = 1_500_000  # text per domain (code, prose) before the split
    seed: int = 0

    def __post_init__(self) -> None:
        if self.balance not in BALANCE_METHODS:
            raise ValueError(f"balance must be one of {BALANCE_METHODS}, got {self.balance!r}")
        if not 1 <= self.top_k <= self.num_experts:
            raise ValueError(f"top_k must be 1..num_experts ({self.num_experts}), got {self.top_k}")
        if self.d_model % self.num_heads or self.num_heads % self.num_kv_heads:
            raise ValueError(f"d_model ({self.d_model}) must divide by num_heads ({self.num_heads}) and num_heads "
                             f"by num_kv_heads ({self.num_kv_heads})")

    @property
    def dense_d_ff(self) -> int:
        return self.top_k * self.d_ff + round(self.num_experts / 3)

    def replace(self, **changes: Any) -> "TrainConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


PRESETS: dict[str, TrainConfig] = {
    # 2-core CPU, MoE + dense in at most 5 minutes.
    "tiny": TrainConfig(),
    # Seconds: checks the whole pipeline (CI's smoke training); learns little.
    "smoke": TrainConfig(vocab_size=512, d_model=32, num_layers=2, num_heads=2, num_kv_heads=1, d_ff=32,
                         num_experts=4, context_length=32, batch_size=8, steps=20, warmup_steps=5,
                         chars_per_domain=150_000),
    # More of everything: tens of minutes on a 2-core CPU, minutes with a few Ray Train workers.
    "small": TrainConfig(vocab_size=8192, d_model=256, num_layers=6, num_heads=8, num_kv_heads=4, d_ff=512,
                         context_length=256, batch_size=32, steps=2000, lr=2e-3, warmup_steps=100,
                         chars_per_domain=8_000_000),
}


def _common_config(cfg: TrainConfig) -> dict[str, Any]:
    return dict(vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, num_hidden_layers=cfg.num_layers,
                num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_kv_heads,
                head_dim=cfg.d_model // cfg.num_heads, max_position_embeddings=cfg.context_length,
                tie_word_embeddings=True, bos_token_id=0, eos_token_id=0, pad_token_id=None,
                sliding_window=None, hidden_act="silu")


def mixtral_config(cfg: TrainConfig):
    from transformers import MixtralConfig

    return MixtralConfig(**_common_config(cfg), intermediate_size=cfg.d_ff, num_local_experts=cfg.num_experts,
                         num_experts_per_tok=cfg.top_k, router_jitter_noise=0.0, output_router_logits=False)


def build_moe_model(cfg: TrainConfig) -> nn.Module:
    """A MixtralForCausalLM (fp32, seeded) whose MoE blocks are TrainableMoEBlock."""
    from transformers import MixtralForCausalLM

    torch.manual_seed(cfg.seed)
    model = MixtralForCausalLM(mixtral_config(cfg))
    for layer in model.model.layers:
        layer.mlp = TrainableMoEBlock(layer.mlp, use_selection_bias=cfg.balance == "loss_free")
    return model


def build_dense_model(cfg: TrainConfig) -> nn.Module:
    """A MistralForCausalLM (fp32, seeded): Mixtral's architecture with one FFN of width dense_d_ff."""
    from transformers import MistralConfig, MistralForCausalLM

    torch.manual_seed(cfg.seed)
    return MistralForCausalLM(MistralConfig(**_common_config(cfg), intermediate_size=cfg.dense_d_ff))


def moe_blocks(model: nn.Module) -> list[TrainableMoEBlock]:
    return [m for m in model.modules() if isinstance(m, TrainableMoEBlock)]


def parameter_counts(model: nn.Module) -> dict[str, int]:
    """{"total", "active"}: active leaves out the routed experts a token does not use (E - K of E)."""
    total = sum(p.numel() for p in model.parameters())
    idle = 0
    for block in moe_blocks(model):
        E, K = block.config.num_experts, block.config.top_k
        expert_params = block.experts.gate_up_proj.numel() + block.experts.down_proj.numel()
        idle += expert_params * (E - K) // E
    return {"total": total, "active": total - idle}


def export_model(model: nn.Module, cfg: TrainConfig, tokenizer, out: Path) -> Path:
    """`out` as transformers writes it (save_pretrained of a plain MixtralForCausalLM holding the trained
    weights, plus the tokenizer files): AutoModelForCausalLM / AutoTokenizer.from_pretrained(out) load it."""
    from transformers import GenerationConfig, MixtralForCausalLM, PreTrainedTokenizerFast

    from .data import EOS

    plain = MixtralForCausalLM(mixtral_config(cfg))
    plain.load_state_dict(model.state_dict(), strict=True)
    plain.generation_config = GenerationConfig(bos_token_id=0, eos_token_id=0, pad_token_id=0)
    plain.save_pretrained(out)
    # No model_max_length: a whole text is tokenized, then scored window by window (evaluate.py).
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token=EOS, bos_token=EOS, pad_token=EOS).save_pretrained(out)
    return out
