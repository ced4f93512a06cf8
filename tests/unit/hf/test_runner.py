"""The model runner in process (no Ray): a whole HF MoE model with its MoE blocks swapped for
calls to `MoEModel.forward` generates exactly what transformers' own `model.generate` does."""

import re
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from moe_cluster.cli import main
from moe_cluster.hf.importer import import_hf_checkpoint
from moe_cluster.hf.safetensors_reader import HFCheckpoint
from moe_cluster.hf.runner import GenerateLimits, HFMoERunner, MoEBlockProxy
from moe_cluster.protocol.errors import WireError

from ...support.hf_models import FAMILIES, build_hf, moe_blocks
from moe_cluster.checkpoint import load_model

# DeepSeek's attention (MLA) needs as many key/value heads as query heads to run at all.
OVERRIDES = {"deepseek_v3": {"num_key_value_heads": 4}}
PROMPTS = [[1, 5, 9, 17, 33], [2, 127, 64, 8, 3]]


def save_and_import(tmp_path, model_type: str, **overrides):
    """(hf_model, hf_dir, moe checkpoint dir) of a tiny model of the family."""
    hf_model = build_hf(model_type, **{**OVERRIDES.get(model_type, {}), **overrides})
    hf_model.save_pretrained(tmp_path / "hf")
    import_hf_checkpoint(tmp_path / "hf", tmp_path / "moe", log=lambda _: None)
    return hf_model, tmp_path / "hf", tmp_path / "moe"


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
    """imported(model_type) -> (hf_model, hf_dir, moe_dir), built once per family for this module."""
    cache = {}

    def get(model_type: str):
        if model_type not in cache:
            cache[model_type] = save_and_import(tmp_path_factory.mktemp(model_type), model_type)
        return cache[model_type]

    return get


def hf_generate(hf_model, prompts: list[list[int]], new_tokens: int) -> list[list[int]]:
    ids = torch.tensor(prompts)
    return hf_model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                             do_sample=False).tolist()


@pytest.mark.parametrize("model_type", list(FAMILIES))
def test_in_process_generate_equals_hf_generate(imported, model_type):
    hf_model, hf_dir, moe_dir = imported(model_type)
    runner = HFMoERunner.in_process(hf_dir, moe_dir)
    result = runner.generate(PROMPTS, 8)
    assert result["output_ids"] == hf_generate(hf_model, PROMPTS, 8)
    moe_layers = len(moe_blocks(hf_model))
    assert runner.moe_layer_ids == list(moe_blocks(hf_model))
    assert [t["moe_calls"] for t in result["timings"]["per_token"]] == [moe_layers] * 8


def test_tied_embeddings_and_sharded_checkpoint(tmp_path):
    hf_model = build_hf("olmoe", tie_word_embeddings=True)
    hf_model.save_pretrained(tmp_path / "hf", max_shard_size="20KB")
    import_hf_checkpoint(tmp_path / "hf", tmp_path / "moe", log=lambda _: None)
    runner = HFMoERunner.in_process(tmp_path / "hf", tmp_path / "moe")
    assert runner.model.lm_head.weight is runner.model.model.embed_tokens.weight
    assert runner.generate(PROMPTS, 5)["output_ids"] == hf_generate(hf_model, PROMPTS, 5)


def test_expert_weights_are_never_read(imported, monkeypatch):
    hf_model, hf_dir, moe_dir = imported("qwen2_moe")
    read = []
    original_get = HFCheckpoint.get
    monkeypatch.setattr(HFCheckpoint, "get", lambda self, key, row=None: read.append(key) or original_get(self, key, row))
    runner = HFMoERunner(hf_dir, load_model(moe_dir).forward)
    blocks = moe_blocks(hf_model)
    moe_keys = {f"model.layers.{i}.mlp." for i in blocks}
    assert read and not [key for key in read if any(key.startswith(prefix) for prefix in moe_keys)]
    assert "model.layers.1.mlp.gate_proj.weight" in read  # layer 1 is dense: its MLP stays in the runner
    expert_params = sum(p.numel() for block in blocks.values() for p in block.parameters())
    assert runner.info()["dense_parameters"] == sum(p.numel() for p in hf_model.parameters()) - expert_params
    assert all(isinstance(runner.model.model.layers[i].mlp, MoEBlockProxy) for i in blocks)


MOE_SLEEP_S = 0.05  # each MoE call of the timing test lasts at least this long, so a missed call shows


def test_moe_call_gets_flat_rows_and_timings_are_measured(imported):
    """The runner's MoE time of each token is the time spent inside its MoE calls, as the
    calls themselves measure it; dense and overhead times are what is left, never negative."""
    hf_model, hf_dir, moe_dir = imported("mixtral")
    moe, shapes, call_ms = load_model(moe_dir), [], []

    def moe_call(x_TD, layer):
        started = time.perf_counter()
        shapes.append((tuple(x_TD.shape), layer))
        time.sleep(MOE_SLEEP_S)
        y_TD = moe.forward(x_TD, layer)
        call_ms.append((time.perf_counter() - started) * 1e3)
        return y_TD

    runner = HFMoERunner(hf_dir, moe_call)
    started = time.perf_counter()
    timings = runner.generate(PROMPTS, 3)["timings"]
    wall_ms = (time.perf_counter() - started) * 1e3
    # Prefill: 2 x 5 prompt rows per layer; then one row per sequence and layer per token.
    assert shapes == [((10, 32), 0), ((10, 32), 1)] + [((2, 32), 0), ((2, 32), 1)] * 2
    assert (timings["batch"], timings["prompt_tokens"], timings["new_tokens"]) == (2, 5, 3)
    assert timings["moe_calls_per_token"] == 2
    per_token, layers = timings["per_token"], len(runner.moe_layer_ids)
    assert [row["moe_calls"] for row in per_token] == [layers] * 3 and len(call_ms) == 3 * layers
    for step, row in enumerate(per_token):
        own_ms = sum(call_ms[step * layers:(step + 1) * layers])  # this token's calls, timed by themselves
        # The runner times around the call (a reshape more): a little more, never less. The slack
        # (half a call) is for a busy machine; a call counted twice or missed is a whole call off.
        assert own_ms - 0.01 <= row["moe_ms"] <= own_ms + MOE_SLEEP_S * 1e3 / 2, (step, row, own_ms)
        assert row["moe_ms"] >= layers * MOE_SLEEP_S * 1e3, row
        assert row["dense_ms"] >= 0 and row["overhead_ms"] >= 0, row  # forward >= MoE, token >= forward
    assert timings["first_token_ms"] == per_token[0]["ms"]
    assert timings["moe_ms_per_token"] == pytest.approx(sum(r["moe_ms"] for r in per_token[1:]) / 2, abs=0.01)
    assert timings["decode_ms_per_token"] == pytest.approx(sum(r["ms"] for r in per_token[1:]) / 2, abs=0.01)
    assert sum(call_ms) - 0.01 <= sum(row["ms"] for row in per_token) <= timings["total_ms"] <= wall_ms + 0.01


def test_concurrent_generate_calls_keep_apart(imported):
    """A serving replica runs several generate calls in threads on one model: same outputs,
    and each call's timings count only its own MoE calls."""
    hf_model, hf_dir, moe_dir = imported("mixtral")
    runner = HFMoERunner.in_process(hf_dir, moe_dir)
    prompts = [[[i, i + 1, i + 2]] for i in range(1, 7)]
    with ThreadPoolExecutor(6) as pool:
        results = list(pool.map(lambda prompt: runner.generate(prompt, 6), prompts))
    for prompt, result in zip(prompts, results):
        assert result["output_ids"] == hf_generate(hf_model, prompt, 6)
        assert [t["moe_calls"] for t in result["timings"]["per_token"]] == [2] * 6


BAD = {
    "not a list": ("1 2 3", 1, 400, "list of non-empty lists"),
    "flat list": ([1, 2, 3], 1, 400, "[[1, 2, 3]]"),
    "empty row": ([[]], 1, 400, "non-empty"),
    "float id": ([[1, 2.0]], 1, 400, "integers"),
    "bool id": ([[True]], 1, 400, "integers"),
    "id >= vocab": ([[128]], 1, 400, "outside the model's vocabulary [0, 128)"),
    "ragged": ([[1, 2], [3]], 1, 400, "same length"),
    "too many input tokens": ([[1] * 9], 1, 400, "over this server's limit of 8"),
    "too many new tokens": ([[1]], 5, 400, "over this server's limit of 4"),
    "max_new_tokens not int": ([[1]], "3", 400, "positive integer"),
}


@pytest.fixture(scope="module")
def small_runner(imported):
    _, hf_dir, moe_dir = imported("mixtral")
    return HFMoERunner.in_process(hf_dir, moe_dir, limits=GenerateLimits(max_input_tokens=8, max_new_tokens=4))


@pytest.mark.parametrize("case", BAD)
def test_bad_requests_say_what_is_wrong(small_runner, case):
    input_ids, new_tokens, status, message = BAD[case]
    with pytest.raises(WireError, match=re.escape(message)) as error:
        small_runner.generate(input_ids, new_tokens)
    assert error.value.status == status


def test_a_checkpoint_of_another_model_is_refused(imported):
    _, hf_dir, _ = imported("mixtral")
    _, _, deepseek_moe = imported("deepseek_v3")
    with pytest.raises(ValueError, match="does not match"):
        HFMoERunner.in_process(hf_dir, deepseek_moe)


def test_bfloat16_model_runs_in_bfloat16(tmp_path):
    hf_model = build_hf("mixtral").to(torch.bfloat16)
    hf_model.save_pretrained(tmp_path / "hf")
    import_hf_checkpoint(tmp_path / "hf", tmp_path / "moe", log=lambda _: None)
    runner = HFMoERunner.in_process(tmp_path / "hf", tmp_path / "moe")
    assert runner.info()["dtype"] == "bfloat16"
    assert len(runner.generate([[1, 2, 3]], 4)["output_ids"][0]) == 7
    assert HFMoERunner.in_process(tmp_path / "hf", tmp_path / "moe", dtype="float32").info()["dtype"] == "float32"


def test_cli_generate_in_process(imported, tmp_path, capsys):
    hf_model, hf_dir, moe_dir = imported("deepseek_v3")
    assert main(["generate", "--hf-model", str(hf_dir), "--checkpoint", str(moe_dir), "--input-ids", "1", "5", "9",
                 "--max-new-tokens", "4", "--in-process", "--warmup", "0"]) == 0
    out = capsys.readouterr().out
    expected = hf_generate(hf_model, [[1, 5, 9]], 4)[0]
    assert f"output ids: 1 5 9 | {' '.join(map(str, expected[3:]))}" in out
    assert "per decode token (mean of tokens 1..3)" in out and "1 calls" in out
    assert main(["generate", "--hf-model", str(hf_dir), "--checkpoint", str(tmp_path / "nowhere"),
                 "--input-ids", "1", "--in-process"]) == 2
    assert "error:" in capsys.readouterr().err


def test_runner_needs_no_ray():
    code = "import sys, moe_cluster.hf.runner; print('ray' in sys.modules, 'transformers' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]
