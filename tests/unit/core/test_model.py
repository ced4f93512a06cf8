import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from moe_cluster import ModelConfig, MoEModel
from moe_cluster.core.reference import reference_forward

CONFIGS = {
    "seed-mlp-gelu": dict(d_model=32, d_ff=48, num_experts=8, top_k=2, expert_kind="mlp", gate_bias=True),
    "mlp-relu-nobias": dict(d_model=24, d_ff=40, num_experts=4, top_k=1, expert_kind="mlp", activation="relu",
                            expert_bias=False),
    "mixtral": dict(d_model=32, d_ff=64, num_experts=8, top_k=2, normalize_top_k=True),
    "qwen2-shared-gate": dict(d_model=32, d_ff=16, num_experts=60 // 4, top_k=4, num_shared_experts=1,
                              shared_d_ff=64, shared_expert_gate=True),
    "deepseek-v3": dict(d_model=32, d_ff=16, num_experts=64, top_k=8, score_func="sigmoid", selection_bias=True,
                        n_group=8, topk_group=4, normalize_top_k=True, routed_scaling_factor=2.5,
                        num_shared_experts=2, shared_d_ff=16),
    "e64-k8-softmax": dict(d_model=16, d_ff=8, num_experts=64, top_k=8, num_layers=3),
}


@pytest.fixture(scope="module")
def models():
    return {name: MoEModel.random(ModelConfig(**kw), seed=7) for name, kw in CONFIGS.items()}


@pytest.mark.parametrize("name", CONFIGS)
@pytest.mark.parametrize("tokens", [0, 1, 7, 1024])
def test_fast_path_equals_oracle_fp32(models, name, tokens):
    model = models[name]
    x = torch.randn(tokens, model.config.d_model, generator=torch.Generator().manual_seed(tokens))
    for layer in model.config.moe_layer_ids:
        torch.testing.assert_close(model.forward(x, layer), reference_forward(model, x, layer), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["seed-mlp-gelu", "mixtral", "deepseek-v3"])
def test_fast_path_equals_oracle_bf16(name):
    model = MoEModel.random(ModelConfig(**CONFIGS[name], dtype="bfloat16"), seed=3)
    x = torch.randn(257, model.config.d_model).bfloat16()
    y = model.forward(x)
    assert y.dtype == torch.bfloat16
    # Expert matmuls see the rows in another order than the oracle's, so bf16 results may
    # differ by an ulp or two (2**-6 at magnitude 2); the sums of 8 experts cancel, hence atol.
    torch.testing.assert_close(y, reference_forward(model, x), rtol=1.6e-2, atol=3e-2)


def test_output_keeps_the_input_dtype():
    model = MoEModel.random(ModelConfig(**CONFIGS["mixtral"]), seed=0)
    x = torch.randn(5, 32)
    torch.testing.assert_close(model.forward(x.half()), model.forward(x).half(), rtol=2e-3, atol=2e-3)
    assert model.forward(x.half()).dtype == torch.float16


def test_one_expert_moe_is_a_plain_ffn():
    model = MoEModel.random(ModelConfig(d_model=16, d_ff=32, num_experts=1, top_k=1, expert_kind="mlp",
                                        activation="gelu"), seed=1)
    expert = model.layers[0].experts[0]
    x = torch.randn(9, 16)
    ffn = F.linear(F.gelu(F.linear(x, expert.w1, expert.b1)), expert.w2, expert.b2)
    torch.testing.assert_close(model.forward(x), ffn)  # softmax over one expert is exactly 1


def test_random_init_is_deterministic_per_seed():
    config = ModelConfig(**CONFIGS["mixtral"])
    a, b, c = MoEModel.random(config, 5), MoEModel.random(config, 5), MoEModel.random(config, 6)
    assert torch.equal(a.layers[0].experts[3].w1, b.layers[0].experts[3].w1)
    assert not torch.equal(a.layers[0].experts[3].w1, c.layers[0].experts[3].w1)
    assert not torch.equal(a.layers[0].experts[3].w1, a.layers[0].experts[4].w1)


@pytest.mark.parametrize("x, message", [
    (torch.randn(3, 31), r"shape \[T, 32\], got \[3, 31\]"),
    (torch.randn(2, 3, 32), r"shape \[T, 32\], got \[2, 3, 32\]"),
    (torch.ones(3, 32, dtype=torch.int64), "float32, bfloat16 or float16"),
    (torch.ones(3, 32, dtype=torch.float64), "float64 is not supported: send float32, bfloat16 or float16"),
    (torch.ones(3, 32, dtype=torch.float8_e4m3fn), "float32, bfloat16 or float16"),
])
def test_bad_input_is_rejected_with_a_clear_message(x, message):
    model = MoEModel.random(ModelConfig(**CONFIGS["mixtral"]), seed=0)
    with pytest.raises(ValueError, match=message):
        model.forward(x)


def test_unknown_layer_is_rejected():
    model = MoEModel.random(ModelConfig(**CONFIGS["mixtral"]), seed=0)
    with pytest.raises(ValueError, match="unknown layer 1"):
        model.forward(torch.randn(2, 32), layer=1)


def test_layer_is_required_when_the_model_has_several_moe_layers():
    model = MoEModel.random(ModelConfig(**CONFIGS["e64-k8-softmax"], layer_ids=(1, 4, 7)), seed=0)
    x = torch.randn(3, 16)
    message = r'layer is required: this model has MoE layers \[1, 4, 7\]; send "layer": <id>'
    for forward in (model.forward, lambda x: reference_forward(model, x)):
        with pytest.raises(ValueError, match=message):
            forward(x)
    with pytest.raises(ValueError, match=r"unknown layer 0: this model has MoE layers \[1, 4, 7\]"):
        model.forward(x, 0)
    torch.testing.assert_close(model.forward(x, 4), reference_forward(model, x, 4), rtol=1e-5, atol=1e-5)


def test_a_missing_layer_is_the_only_moe_layer():
    """One MoE layer (named 3, as decoder layer 3 of an import): leaving `layer` out means that one."""
    model = MoEModel.random(ModelConfig(**CONFIGS["mixtral"], layer_ids=(3,)), seed=2)
    x = torch.randn(6, 32)
    assert torch.equal(model.forward(x), model.forward(x, 3))
    assert torch.equal(reference_forward(model, x), reference_forward(model, x, 3))
    with pytest.raises(ValueError, match=r"unknown layer 0: this model has MoE layers \[3\]"):
        model.forward(x, 0)


@pytest.mark.parametrize("layer_ids, layer, expected", [
    (None, None, 0), ((3,), None, 3), ((1, 4), 4, 4), (None, 0, 0),
    ((1, 4), None, 'layer is required: this model has MoE layers [1, 4]'),
    ((1, 4), 2, "unknown layer 2: this model has MoE layers [1, 4]"),
    (None, True, "unknown layer True"), (None, "0", "unknown layer '0'"),
])
def test_resolve_layer(layer_ids, layer, expected):
    num_layers = 1 if layer_ids is None else len(layer_ids)
    config = ModelConfig(d_model=8, d_ff=8, num_experts=2, top_k=1, num_layers=num_layers, layer_ids=layer_ids)
    if isinstance(expected, int):
        assert config.resolve_layer(layer) == expected
    else:
        with pytest.raises(ValueError) as info:
            config.resolve_layer(layer)
        assert expected in str(info.value)


def test_import_leaves_ray_out():
    code = "import sys, moe_cluster, moe_cluster.core.reference, moe_cluster.checkpoint.reader, moe_cluster.cli; " \
           "print('ray' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
