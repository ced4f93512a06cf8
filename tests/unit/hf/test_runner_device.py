"""The runner's device and dtype (no Ray, no GPU here): the dense model, its buffers and its inputs go
to the device asked; `auto` is bfloat16 on a GPU and the checkpoint's dtype on the CPU; on the CPU
the runner is what it was (greedy tokens equal transformers')."""

import pytest
import torch

from moe_cluster.checkpoint import load_model
from moe_cluster.cli import main
from moe_cluster.hf.importer import import_hf_checkpoint
from moe_cluster.hf.runner import HFMoERunner, dense_dtype, load_dense_model

from ...support.hf_models import build_hf

PROMPTS = [[1, 5, 9, 17, 33], [2, 127, 64, 8, 3]]


@pytest.fixture(scope="module")
def mixtral(tmp_path_factory):
    """(hf_model, hf_dir, moe_dir) of a tiny Mixtral saved in bfloat16 (config.json says bfloat16)."""
    root = tmp_path_factory.mktemp("device")
    hf_model = build_hf("mixtral")
    hf_model.save_pretrained(root / "hf")
    import_hf_checkpoint(root / "hf", root / "moe", log=lambda _: None)
    return hf_model, root / "hf", root / "moe"


@pytest.mark.parametrize("dtype, device, config_dtype, expected", [
    ("auto", "cuda", torch.float32, torch.bfloat16),  # a GPU: bfloat16 whatever the checkpoint says
    ("auto", torch.device("cuda", 0), torch.float16, torch.bfloat16),
    ("auto", "cpu", torch.float32, torch.float32),  # the CPU: the checkpoint's dtype, as before
    ("auto", "cpu", torch.bfloat16, torch.bfloat16),
    ("auto", "cpu", None, torch.float32),  # config.json without a dtype
    ("float32", "cuda", torch.bfloat16, torch.float32),  # asked by name: that dtype anywhere
    ("bfloat16", "cpu", torch.float32, torch.bfloat16),
])
def test_dense_dtype(dtype, device, config_dtype, expected):
    assert dense_dtype(dtype, device, config_dtype) == expected


def test_an_unknown_dtype_is_refused_naming_the_choices():
    with pytest.raises(ValueError, match=r"dtype must be one of \('auto', 'float32'"):
        dense_dtype("fp8", "cpu", None)


def test_the_dense_model_and_its_buffers_go_to_the_device(mixtral):
    """On the meta device (the only other device here): every parameter and buffer (rotary inv_freq is
    computed at construction, on the CPU) lands there, in the checkpoint's dtype (auto, not a GPU)."""
    _, hf_dir, moe_dir = mixtral
    model, _ = load_dense_model(hf_dir, load_model(moe_dir).forward, device="meta")
    tensors = dict(model.named_parameters()) | dict(model.named_buffers())
    assert any("inv_freq" in name for name in tensors)
    assert {t.device.type for t in tensors.values()} == {"meta"}
    assert {p.dtype for p in model.parameters()} == {torch.float32}


def test_on_the_cpu_the_runner_is_unchanged(mixtral):
    """The default device is the CPU: greedy tokens equal transformers' generate, the info says cpu, and
    every MoE call gets its rows on the runner's device."""
    hf_model, hf_dir, moe_dir = mixtral
    moe, devices = load_model(moe_dir), set()

    def moe_call(x_TD, layer):
        devices.add(x_TD.device)
        return moe.forward(x_TD, layer)

    runner = HFMoERunner(hf_dir, moe_call)
    ids = torch.tensor(PROMPTS)
    expected = hf_model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=6,
                                 do_sample=False).tolist()
    assert runner.generate(PROMPTS, 6)["output_ids"] == expected
    assert devices == {torch.device("cpu")}
    assert (runner.info()["device"], runner.info()["dtype"]) == ("cpu", "float32")
    in_process = HFMoERunner.in_process(hf_dir, moe_dir, device="cpu")
    assert in_process.generate(PROMPTS, 6)["output_ids"] == expected


def test_cli_generate_device_cuda_without_cuda_says_what_to_do(mixtral, capsys, monkeypatch):
    _, hf_dir, moe_dir = mixtral
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert main(["generate", "--hf-model", str(hf_dir), "--checkpoint", str(moe_dir), "--input-ids", "1", "5",
                 "--in-process", "--device", "cuda", "--warmup", "0"]) == 2
    assert "torch sees no CUDA device here; leave --device out" in capsys.readouterr().err


def test_a_dense_tensor_missing_from_the_checkpoint_is_named(mixtral, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    _, hf_dir, moe_dir = mixtral
    shutil.copytree(hf_dir, tmp_path / "hf")
    tensors = load_file(tmp_path / "hf" / "model.safetensors")
    del tensors["model.norm.weight"]
    save_file(tensors, tmp_path / "hf" / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"lacks 1 dense tensors the model needs, e.g. \['model.norm.weight'\]"):
        load_dense_model(tmp_path / "hf", load_model(moe_dir).forward)
