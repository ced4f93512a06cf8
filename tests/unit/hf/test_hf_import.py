"""Parity of `moe-cluster import-hf` with Hugging Face's own MoE blocks.

Each test builds a tiny randomly initialised transformers model, saves it with
`save_pretrained`, imports it, and holds `load_model(DST).forward(x, layer=i)` to the HF
MoE block of decoder layer i on the same x (fp32, 1e-5).
"""

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from moe_cluster import MoEModel
from moe_cluster.cli import main
from moe_cluster.hf.importer import import_hf_checkpoint
from moe_cluster.core.routing import GateWeights, route

from ...support.hf_models import FAMILIES, build_hf, moe_blocks  # skips this module without transformers
from moe_cluster.checkpoint import load_model


@torch.no_grad()
def assert_parity(hf_model, dst, tokens: int = 16) -> MoEModel:
    """Every MoE layer of the import equals HF's block on the same hidden states (fp32, 1e-5)."""
    ours = load_model(dst)
    blocks = moe_blocks(hf_model)
    assert ours.config.moe_layer_ids == tuple(blocks)
    x_TD = torch.randn(tokens, ours.config.d_model, generator=torch.Generator().manual_seed(1))
    for layer_id, block in blocks.items():
        y_hf = block(x_TD[None])  # HF blocks take [B, T, D]; some versions return (hidden, router_logits)
        y_hf = (y_hf[0] if isinstance(y_hf, tuple) else y_hf).reshape(tokens, -1)
        torch.testing.assert_close(ours.forward(x_TD, layer=layer_id), y_hf, rtol=1e-5, atol=1e-5)
    return ours


@pytest.mark.parametrize("model_type", list(FAMILIES))
def test_single_file_parity(tmp_path, model_type):
    hf_model = build_hf(model_type)
    if model_type == "deepseek_v3":
        set_selection_bias(hf_model, torch.tensor([0.3, -0.2, 0.0, 0.25, -0.3, 0.1, 0.2, -0.1]))
    hf_model.save_pretrained(tmp_path / "hf")
    lines = []
    config = import_hf_checkpoint(tmp_path / "hf", tmp_path / "ours", log=lines.append)
    assert len(lines) == config.num_experts + 3  # summary, router, one per expert file, done
    assert_parity(hf_model, tmp_path / "ours")


def set_selection_bias(hf_model, bias_E: torch.Tensor) -> None:
    for block in moe_blocks(hf_model).values():
        block.gate.e_score_correction_bias.copy_(bias_E)


def test_deepseek_selection_bias_changes_the_choice(tmp_path):
    """The hand-set e_score_correction_bias really moves experts, and we follow HF when it does."""
    hf_model = build_hf("deepseek_v3")
    set_selection_bias(hf_model, torch.tensor([0.3, -0.2, 0.0, 0.25, -0.3, 0.1, 0.2, -0.1]))
    hf_model.save_pretrained(tmp_path / "hf")
    import_hf_checkpoint(tmp_path / "hf", tmp_path / "ours", log=lambda _: None)
    ours = assert_parity(hf_model, tmp_path / "ours")
    gate = ours.layer(1).gate_and_shared.gate
    x_TD = torch.randn(16, 32, generator=torch.Generator().manual_seed(1))
    _, with_bias = route(x_TD, gate, ours.config)
    _, without = route(x_TD, GateWeights(gate.weight_ED), ours.config)
    assert not torch.equal(with_bias.sort().values, without.sort().values)


def test_deepseek_negative_bias_masks_dropped_groups_with_minus_inf(tmp_path):
    """All choice scores < 0: masking dropped groups with 0.0 (transformers 4.x) would pick them;
    transformers 5 and we use -inf. This pins which one HF's installed code does."""
    hf_model = build_hf("deepseek_v3")
    set_selection_bias(hf_model, -2.0 - torch.arange(8.0) / 10)
    hf_model.save_pretrained(tmp_path / "hf")
    import_hf_checkpoint(tmp_path / "hf", tmp_path / "ours", log=lambda _: None)
    assert_parity(hf_model, tmp_path / "ours")


def test_sharded_checkpoint(tmp_path):
    hf_model = build_hf("qwen2_moe")
    hf_model.save_pretrained(tmp_path / "hf", max_shard_size="20KB")
    index = json.loads((tmp_path / "hf" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2
    import_hf_checkpoint(tmp_path / "hf", tmp_path / "ours", log=lambda _: None)
    assert_parity(hf_model, tmp_path / "ours")


@pytest.mark.parametrize("model_type", ["mixtral", "deepseek_v3"])
def test_bfloat16_checkpoint(tmp_path, model_type):
    """bf16 weights stay bf16 bit for bit with --dtype keep; --dtype float32 matches HF's model in fp32."""
    hf_model = build_hf(model_type).to(torch.bfloat16)
    hf_model.save_pretrained(tmp_path / "hf")
    kept = import_hf_checkpoint(tmp_path / "hf", tmp_path / "kept", log=lambda _: None)
    assert kept.dtype == "bfloat16"
    ours = load_model(tmp_path / "kept")
    for layer_id, block in moe_blocks(hf_model).items():
        for e, expert in enumerate(ours.layer(layer_id).experts):
            gate_up = block.experts.gate_up_proj[e]
            assert expert.w1.dtype == torch.bfloat16
            assert torch.equal(torch.cat([expert.w1, expert.w3]), gate_up)
            assert torch.equal(expert.w2, block.experts.down_proj[e])
    import_hf_checkpoint(tmp_path / "hf", tmp_path / "fp32", dtype="float32", log=lambda _: None)
    assert_parity(hf_model.float(), tmp_path / "fp32")


def test_fused_expert_tensors_on_disk(tmp_path):
    """transformers 5 modules hold experts as fused [E, 2F, D] tensors; a checkpoint saved from the
    raw state_dict has them on disk (and Mixtral's block under `mlp`, not `block_sparse_moe`)."""
    hf_model = build_hf("mixtral")
    state = hf_model.state_dict()
    assert "model.layers.0.mlp.experts.gate_up_proj" in state
    (tmp_path / "hf").mkdir()
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / "hf" / "model.safetensors"))
    hf_model.config.save_pretrained(tmp_path / "hf")
    import_hf_checkpoint(tmp_path / "hf", tmp_path / "ours", log=lambda _: None)
    assert_parity(hf_model, tmp_path / "ours")


def quantize_fp8(w_MN: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(w_fp8 [M, N], scale_inv [M/b, N/b] one per block, the dequantised w [M, N]) as DeepSeek stores them."""
    M, N = w_MN.shape
    blocks = w_MN.view(M // block, block, N // block, block)
    scale = blocks.abs().amax(dim=(1, 3)) / 448  # 448: the largest float8_e4m3fn
    w_fp8 = (blocks / scale[:, None, :, None]).view(M, N).to(torch.float8_e4m3fn)
    dequantised = (w_fp8.float().view(M // block, block, N // block, block) * scale[:, None, :, None]).view(M, N)
    return w_fp8, scale, dequantised


def test_fp8_block_quantised_experts_are_dequantised(tmp_path):
    """DeepSeek-V3 publishes FP8 experts with one scale per 128x128 block (`weight_scale_inv`); here 8x8."""
    build_hf("deepseek_v3").save_pretrained(tmp_path / "hf")
    tensors = load_file(tmp_path / "hf" / "model.safetensors")
    expected = {}
    for key in [k for k in tensors if ".experts." in k]:
        tensors[key], tensors[f"{key}_scale_inv"], expected[key] = quantize_fp8(tensors[key], block=8)
    save_file(tensors, str(tmp_path / "hf" / "model.safetensors"))
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "fp8", "weight_block_size": [8, 8]}
    (tmp_path / "hf" / "config.json").write_text(json.dumps(config))
    assert import_hf_checkpoint(tmp_path / "hf", tmp_path / "ours", log=lambda _: None).dtype == "bfloat16"
    expert = load_model(tmp_path / "ours").layer(1).experts[5]
    prefix = "model.layers.1.mlp.experts.5"
    for ours, theirs in (("w1", "gate_proj"), ("w3", "up_proj"), ("w2", "down_proj")):
        assert torch.equal(getattr(expert, ours), expected[f"{prefix}.{theirs}.weight"].to(torch.bfloat16))


@pytest.mark.parametrize("model_type, dense_layer", [("deepseek_v3", 0), ("qwen2_moe", 1)])
def test_dense_layer_is_an_unknown_layer(tmp_path, model_type, dense_layer):
    build_hf(model_type).save_pretrained(tmp_path / "hf")
    import_hf_checkpoint(tmp_path / "hf", tmp_path / "ours", log=lambda _: None)
    ours = load_model(tmp_path / "ours")
    with pytest.raises(ValueError, match="unknown layer"):
        ours.forward(torch.randn(2, 32), layer=dense_layer)


def test_cli_import_hf_end_to_end(tmp_path, capsys):
    hf_model = build_hf("olmoe")
    hf_model.save_pretrained(tmp_path / "hf")
    assert main(["import-hf", str(tmp_path / "hf"), str(tmp_path / "ours"), "--dtype", "float32"]) == 0
    out = capsys.readouterr().out
    assert "importing olmoe" in out and "expert 6/6" in out and "wrote" in out
    assert_parity(hf_model, tmp_path / "ours")
    assert main(["import-hf", str(tmp_path / "hf"), str(tmp_path / "ours")]) == 2
    assert "--force" in capsys.readouterr().err
    assert main(["import-hf", str(tmp_path / "hf"), str(tmp_path / "ours"), "--force"]) == 0


def test_cli_reports_bad_sources(tmp_path, capsys):
    assert main(["import-hf", str(tmp_path / "nowhere"), str(tmp_path / "ours")]) == 2
    assert "config.json" in capsys.readouterr().err
    (tmp_path / "llama").mkdir()
    (tmp_path / "llama" / "config.json").write_text(json.dumps({"model_type": "llama"}))
    assert main(["import-hf", str(tmp_path / "llama"), str(tmp_path / "ours")]) == 2
    err = capsys.readouterr().err
    assert "llama" in err and "mixtral" in err and "deepseek_v3" in err


def test_missing_shard_is_reported(tmp_path):
    build_hf("mixtral").save_pretrained(tmp_path / "hf", max_shard_size="20KB")
    index = json.loads((tmp_path / "hf" / "model.safetensors.index.json").read_text())
    shard = index["weight_map"]["model.layers.1.block_sparse_moe.gate.weight"]
    index["weight_map"] = {k: v for k, v in index["weight_map"].items() if v != shard}
    (tmp_path / "hf" / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match="shards|does not match"):
        import_hf_checkpoint(tmp_path / "hf", tmp_path / "ours", log=lambda _: None)


def test_importer_needs_neither_ray_nor_transformers():
    code = "import sys, moe_cluster.hf.importer; print('ray' in sys.modules, 'transformers' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]


def test_missing_shard_file_is_named(tmp_path):
    build_hf("mixtral").save_pretrained(tmp_path / "hf", max_shard_size="20KB")
    shard = sorted((tmp_path / "hf").glob("model-*.safetensors"))[-1]
    shard.unlink()
    with pytest.raises(ValueError, match=shard.name):
        import_hf_checkpoint(tmp_path / "hf", tmp_path / "ours", log=lambda _: None)
