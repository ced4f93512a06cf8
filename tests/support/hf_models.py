"""Tiny randomly initialised Hugging Face MoE models, shared by the tests that hold our code
to transformers' own (tests/unit/hf/test_hf_import.py, tests/unit/hf/test_runner.py, tests/cluster/test_hf_cluster.py).

Importing this module skips the importing test module when transformers is not installed.
"""

import pytest
import torch

transformers = pytest.importorskip("transformers", reason="needs the `hf` extra: pip install -e '.[hf]'")

TINY = dict(hidden_size=32, num_attention_heads=4, num_key_value_heads=2, vocab_size=128,
            bos_token_id=None, eos_token_id=None, pad_token_id=None)

# model_type -> (config class, model class, config kwargs)
FAMILIES = {
    "mixtral": ("MixtralConfig", "MixtralForCausalLM",
                dict(num_hidden_layers=2, intermediate_size=48, num_local_experts=4, num_experts_per_tok=2)),
    # Three layers, layer 1 dense (mlp_only_layers): MoE layers are 0 and 2.
    "qwen2_moe": ("Qwen2MoeConfig", "Qwen2MoeForCausalLM",
                  dict(num_hidden_layers=3, intermediate_size=48, moe_intermediate_size=16, num_experts=6,
                       num_experts_per_tok=2, shared_expert_intermediate_size=24, mlp_only_layers=[1])),
    # decoder_sparse_step=2: only layer 1 is MoE.
    "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM",
                  dict(num_hidden_layers=2, intermediate_size=48, moe_intermediate_size=16, num_experts=6,
                       num_experts_per_tok=2, decoder_sparse_step=2, norm_topk_prob=True, head_dim=8)),
    "olmoe": ("OlmoeConfig", "OlmoeForCausalLM",
              dict(num_hidden_layers=2, intermediate_size=16, num_experts=6, num_experts_per_tok=2)),
    # Layer 0 dense; 8 experts in 4 groups, 2 groups kept, top-3, one shared expert.
    "deepseek_v3": ("DeepseekV3Config", "DeepseekV3ForCausalLM",
                    dict(num_hidden_layers=2, intermediate_size=48, moe_intermediate_size=16, n_routed_experts=8,
                         num_experts_per_tok=3, n_group=4, topk_group=2, first_k_dense_replace=1,
                         n_shared_experts=1, routed_scaling_factor=2.5, norm_topk_prob=True, kv_lora_rank=16,
                         q_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8)),
}


def build_hf(model_type: str, seed: int = 0, **overrides):
    """A tiny HF model of the family with O(1) outputs (HF's init, std 0.02, would make 1e-5 meaningless).

    `overrides` change the family's config kwargs (e.g. tie_word_embeddings=True)."""
    config_cls, model_cls, kwargs = FAMILIES[model_type]
    if not hasattr(transformers, model_cls):
        pytest.skip(f"transformers {transformers.__version__} has no {model_cls}")
    torch.manual_seed(seed)
    config = getattr(transformers, config_cls)(**{**TINY, **kwargs, **overrides})
    model = getattr(transformers, model_cls)(config).eval()
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() >= 2:  # Normal(0, 1/fan_in): unit-scale activations, clearly separated gates
                param.copy_(torch.randn_like(param) / param.shape[-1] ** 0.5)
    return model


def moe_blocks(hf_model) -> dict[int, torch.nn.Module]:
    """{decoder layer index: its MoE block}, found by HF's own modules (dense MLPs have no experts)."""
    return {i: layer.mlp for i, layer in enumerate(hf_model.model.layers) if hasattr(layer.mlp, "experts")}
