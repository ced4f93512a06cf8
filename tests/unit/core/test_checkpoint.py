import subprocess
import sys

import pytest
import torch

from moe_cluster import ModelConfig, MoEModel
from moe_cluster.checkpoint import CheckpointError, expert_file, load_config, load_experts, load_model, save_model
from moe_cluster.cli import main

CONFIG = ModelConfig(d_model=16, d_ff=24, num_experts=6, top_k=2, num_layers=2, layer_ids=(1, 3),
                     num_shared_experts=1, shared_d_ff=8, shared_expert_gate=True, gate_bias=True,
                     selection_bias=True, score_func="sigmoid")


def _tensors(model):
    out = {}
    for layer_id, layer in zip(model.config.moe_layer_ids, model.layers):
        out[(layer_id, "gate")] = layer.gate_and_shared.gate.weight_ED
        out[(layer_id, "bias")] = layer.gate_and_shared.gate.bias_E
        out[(layer_id, "sel")] = layer.gate_and_shared.gate.selection_bias_E
        for name, p in layer.gate_and_shared.shared.named_parameters():
            out[(layer_id, "shared", name)] = p
        for e, expert in enumerate(layer.experts):
            for name, p in expert.named_parameters():
                out[(layer_id, e, name)] = p
    return out


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_round_trip_is_bit_exact(tmp_path, dtype):
    model = MoEModel.random(CONFIG.replace(dtype=dtype), seed=11)
    save_model(model, tmp_path)
    loaded = load_model(tmp_path)
    assert loaded.config == model.config
    before, after = _tensors(model), _tensors(loaded)
    assert before.keys() == after.keys()
    for key in before:
        assert before[key].dtype == after[key].dtype and torch.equal(before[key], after[key]), key
    x = torch.randn(33, 16)
    assert torch.equal(model.forward(x, 3), loaded.forward(x, 3))


def test_one_expert_loads_alone(tmp_path):
    model = MoEModel.random(CONFIG, seed=2)
    save_model(model, tmp_path)
    for e in range(CONFIG.num_experts):
        if e != 4:
            expert_file(tmp_path, e).unlink()  # prove nothing else is read
    experts = load_experts(tmp_path, load_config(tmp_path), [4], layers=[3])
    assert list(experts) == [(3, 4)]
    x = torch.randn(5, 16)
    assert torch.equal(experts[(3, 4)](x), model.layer(3).experts[4](x))


def test_missing_checkpoint_says_how_to_make_one(tmp_path):
    with pytest.raises(CheckpointError, match="moe-cluster init"):
        load_model(tmp_path / "nowhere")


def test_cli_init_writes_a_loadable_checkpoint(tmp_path, capsys):
    assert main(["init", str(tmp_path / "ckpt"), "--preset", "tiny", "--seed", "4"]) == 0
    loaded = load_model(tmp_path / "ckpt")
    fresh = MoEModel.random(loaded.config, seed=4)
    x = torch.randn(10, loaded.config.d_model)
    assert torch.equal(loaded.forward(x, 1), fresh.forward(x, 1))
    assert main(["init", str(tmp_path / "ckpt")]) == 2
    assert "--force" in capsys.readouterr().err


def test_cli_help_lists_commands():
    out = subprocess.run([sys.executable, "-m", "moe_cluster.cli", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "init" in out.stdout
