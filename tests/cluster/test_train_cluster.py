"""Training meets the cluster: perplexity with the MoE blocks on a local Ray cluster equals the in-process
number and val_ppl, and data-parallel Ray Train (2 workers, gloo) follows the one-process loss curve."""

import json
import math

import pytest

from moe_cluster.cli import main
from moe_cluster.serving import runtime
from moe_cluster.train.data import encode_documents, load_corpus, train_tokenizer
from moe_cluster.train.evaluate import perplexity
from moe_cluster.train.loop import build_trainees, train_models
from moe_cluster.train.model import PRESETS

pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def cluster():
    runtime.start_local_serve(None, num_cpus=4)  # 2 Ray Train workers of 1 CPU, plus the Serve replicas
    yield
    runtime.stop_local_serve()


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("train")
    assert main(["train", "--out", str(out), "--preset", "smoke", "--steps", "8"]) == 0
    assert main(["import-hf", str(out / "model"), str(out / "ckpt")]) == 0
    return out, json.loads((out / "metrics.json").read_text())


def test_perplexity_through_the_cluster_equals_val_ppl(cluster, trained):
    from transformers import AutoTokenizer

    from moe_cluster.train.cluster import deploy_scorer

    out, metrics = trained
    ids = AutoTokenizer.from_pretrained(out / "model")((out / "val.txt").read_text(), add_special_tokens=False)
    ppl, tokens = perplexity(deploy_scorer(out / "model", out / "ckpt"), ids["input_ids"], metrics["context_length"])
    assert tokens == metrics["val_tokens"]
    assert math.isclose(ppl, metrics["val_ppl"], rel_tol=1e-5)


def test_two_ray_train_workers_follow_the_one_process_loss_curve(cluster, tmp_path):
    from moe_cluster.train.distributed import train_on_ray

    cfg = PRESETS["smoke"].replace(steps=6)
    corpus = load_corpus(cfg.seed, cfg.chars_per_domain)
    stream = encode_documents(train_tokenizer([d.text for d in corpus.train], cfg.vocab_size), corpus.train)
    variants = {"moe": cfg, "dense": cfg}
    alone = build_trainees(variants)
    train_models(alone, stream, cfg, progress=lambda line: None)
    on_ray = train_on_ray(variants, stream, cfg, workers=2, storage=str(tmp_path))
    for one, two in zip(alone, on_ray):
        assert one.name == two.name and len(two.history.loss) == cfg.steps
        assert max(abs(a - b) for a, b in zip(one.history.loss, two.history.loss)) < 2e-3, one.name
        assert two.history.tokens == one.history.tokens
    # the models themselves came back: the dense baseline's weights match up to float rounding
    for (name, p_one), (_, p_two) in zip(alone[1].model.named_parameters(), on_ray[1].model.named_parameters()):
        assert (p_one - p_two).abs().max() < 1e-3, name
