"""A whole `moe-cluster train --preset smoke` run (seconds): what it writes, that transformers loads the
export with its tokenizer from local files and recomputes val_ppl on val.txt, that import-hf + the
runner's in-process MoE give the same number, and an --ablations run's extra measurements."""

import json
import math

import pytest
import torch

from moe_cluster.cli import main
from moe_cluster.train.evaluate import logits_fn, perplexity
from moe_cluster.train.loop import Comm, batch_windows
from moe_cluster.train.model import PRESETS
from moe_cluster.train.pipeline import run_training

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("train")
    assert main(["train", "--out", str(out), "--preset", "smoke", "--threads", "2"]) == 0
    return out, json.loads((out / "metrics.json").read_text())


def test_metrics_and_history(trained):
    out, metrics = trained
    cfg = PRESETS["smoke"]
    for key in ("val_ppl", "dense_val_ppl", "unigram_val_ppl"):
        assert math.isfinite(metrics[key]) and metrics[key] > 1, key
    assert metrics["tokens_seen"] == cfg.steps * cfg.batch_size * cfg.context_length
    assert metrics["context_length"] == cfg.context_length
    moe, dense = metrics["parameters"]["moe"], metrics["parameters"]["dense"]
    assert moe["active"] < moe["total"] and dense["active"] == dense["total"]
    assert abs(moe["active"] - dense["active"]) / dense["active"] < 0.01  # same active parameters
    history = json.loads((out / "history.json").read_text())
    loss = history["moe"]["loss"]
    assert len(loss) == cfg.steps and sum(loss[-3:]) < sum(loss[:3]) - 0.5  # it learns
    loads = history["moe"]["tokens_per_expert"]  # [step][layer][E]: every routed row counted
    assert len(loads) == cfg.steps and all(sum(layer) == cfg.batch_size * cfg.context_length * cfg.top_k
                                           for step in loads for layer in step)
    for png in ("loss.png", "experts.png"):
        assert (out / png).read_bytes()[:4] == b"\x89PNG"


def test_transformers_loads_the_export_and_recomputes_val_ppl(trained):
    out, metrics = trained
    model = transformers.AutoModelForCausalLM.from_pretrained(out / "model", local_files_only=True)
    tokenizer = transformers.AutoTokenizer.from_pretrained(out / "model", local_files_only=True)
    assert type(model).__name__ == "MixtralForCausalLM"
    ids = tokenizer((out / "val.txt").read_text(encoding="utf-8"), add_special_tokens=False)["input_ids"]
    ppl, tokens = perplexity(logits_fn(model), ids, metrics["context_length"])
    assert tokens == metrics["val_tokens"]
    assert math.isclose(ppl, metrics["val_ppl"], rel_tol=1e-5)


def test_import_hf_and_the_in_process_runner_give_val_ppl(trained, capsys):
    out, metrics = trained
    assert main(["import-hf", str(out / "model"), str(out / "ckpt")]) == 0
    capsys.readouterr()
    assert main(["perplexity", "--hf-model", str(out / "model"), "--text", str(out / "val.txt"),
                 "--checkpoint", str(out / "ckpt"), "--in-process", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["tokens"] == metrics["val_tokens"]
    assert math.isclose(result["perplexity"], metrics["val_ppl"], rel_tol=1e-5)


def test_perplexity_in_process_needs_a_checkpoint(trained, capsys):
    out, _ = trained
    assert main(["perplexity", "--hf-model", str(out / "model"), "--text", str(out / "val.txt"), "--in-process"]) == 2
    assert "--in-process needs --checkpoint" in capsys.readouterr().err


def test_ablations(tmp_path):
    cfg = PRESETS["smoke"].replace(steps=3, chars_per_domain=100_000)
    metrics = run_training(cfg, tmp_path, ablations=True, log=lambda line: None)
    assert set(metrics["models"]) == {"moe", "dense", "moe_top1", "moe_top4", "moe_loss_free", "moe_none"}
    assert "val_ppl_with_selection_bias" in metrics["models"]["moe_loss_free"]
    assert len(metrics["masked_expert_val_ppl"]) == cfg.num_experts
    assert all(math.isfinite(p) for p in metrics["masked_expert_val_ppl"])
    for domain, per_layer in metrics["domain_expert_load"].items():
        assert len(per_layer) == cfg.num_layers and len({sum(layer) for layer in per_layer}) == 1, domain
        assert sum(per_layer[0]) % cfg.top_k == 0
    assert (tmp_path / "domains.png").read_bytes()[:4] == b"\x89PNG"


class _Worker(Comm):
    def __init__(self, rank: int, world: int) -> None:
        self.rank, self.world = rank, world


def test_workers_split_the_same_global_batch():
    cfg, stream = PRESETS["smoke"], torch.arange(10_000)
    whole = batch_windows(stream, cfg, step=3)
    halves = torch.cat([batch_windows(stream, cfg, 3, _Worker(r, 2)) for r in range(2)])
    assert torch.equal(whole, halves) and whole.shape == (cfg.batch_size, cfg.context_length + 1)
    assert not torch.equal(whole, batch_windows(stream, cfg, step=4))
