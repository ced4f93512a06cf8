"""Expert modules: the two-layer MLP (the seed's Dense experts) and SwiGLU (Mixtral, Qwen, DeepSeek).

Shape legend: N rows (tokens sent to this expert), D model dim, F expert hidden dim.

Weights use the Mixtral names: `w1` [F, D] in, `w3` [F, D] up (SwiGLU only), `w2` [D, F]
out; MLP experts may carry `b1` [F] and `b2` [D]. Shared experts are the same modules
(fused: n shared experts of width F_s are one expert of width n * F_s), optionally scaled
by a sigmoid gate `sigmoid(x w_s)` as in Qwen2-MoE.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelConfig

__all__ = ["MLPExpert", "SwiGLUExpert", "SharedExperts", "make_expert", "swiglu", "ACTIVATION_FNS"]

ACTIVATION_FNS = {"relu": F.relu, "gelu": F.gelu, "silu": F.silu, "tanh": torch.tanh}


class MLPExpert(nn.Module):
    """y = W2 act(W1 x + b1) + b2."""

    def __init__(self, d_model: int, d_ff: int, activation: str, bias: bool, dtype: torch.dtype) -> None:
        super().__init__()
        self.act = ACTIVATION_FNS[activation]
        self.w1 = nn.Parameter(torch.empty(d_ff, d_model, dtype=dtype), requires_grad=False)
        self.w2 = nn.Parameter(torch.empty(d_model, d_ff, dtype=dtype), requires_grad=False)
        self.b1 = nn.Parameter(torch.empty(d_ff, dtype=dtype), requires_grad=False) if bias else None
        self.b2 = nn.Parameter(torch.empty(d_model, dtype=dtype), requires_grad=False) if bias else None

    def forward(self, x_ND: torch.Tensor) -> torch.Tensor:
        return F.linear(self.act(F.linear(x_ND, self.w1, self.b1)), self.w2, self.b2)


def swiglu(x_ND: torch.Tensor, w1_FD: torch.Tensor, w3_FD: torch.Tensor, w2_DF: torch.Tensor) -> torch.Tensor:
    """y_ND = W2 (silu(W1 x) * W3 x): the SwiGLU expert as a function of its weights (autograd-friendly,
    so the trainable block of moe_cluster/train computes exactly what SwiGLUExpert serves)."""
    return F.linear(F.silu(F.linear(x_ND, w1_FD)) * F.linear(x_ND, w3_FD), w2_DF)


class SwiGLUExpert(nn.Module):
    """y = W2 (silu(W1 x) * W3 x)."""

    def __init__(self, d_model: int, d_ff: int, dtype: torch.dtype) -> None:
        super().__init__()
        self.w1 = nn.Parameter(torch.empty(d_ff, d_model, dtype=dtype), requires_grad=False)
        self.w3 = nn.Parameter(torch.empty(d_ff, d_model, dtype=dtype), requires_grad=False)
        self.w2 = nn.Parameter(torch.empty(d_model, d_ff, dtype=dtype), requires_grad=False)

    def forward(self, x_ND: torch.Tensor) -> torch.Tensor:
        return swiglu(x_ND, self.w1, self.w3, self.w2)


def make_expert(config: ModelConfig, d_ff: int | None = None) -> nn.Module:
    """An uninitialised expert of the model's kind (width `d_ff`, default config.d_ff)."""
    width = config.d_ff if d_ff is None else d_ff
    if config.expert_kind == "mlp":
        return MLPExpert(config.d_model, width, config.activation, config.expert_bias, config.torch_dtype)
    return SwiGLUExpert(config.d_model, width, config.torch_dtype)


class SharedExperts(nn.Module):
    """Always-on experts: y = [sigmoid(x w_s)] * Expert_shared(x)."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.expert = make_expert(config, config.num_shared_experts * config.shared_d_ff)
        self.gate = (nn.Parameter(torch.empty(1, config.d_model, dtype=config.torch_dtype), requires_grad=False)
                     if config.shared_expert_gate else None)

    def forward(self, x_TD: torch.Tensor) -> torch.Tensor:
        y_TD = self.expert(x_TD)
        if self.gate is not None:
            y_TD = torch.sigmoid(F.linear(x_TD, self.gate)) * y_TD
        return y_TD
