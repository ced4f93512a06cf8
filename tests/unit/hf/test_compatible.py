"""The runner refuses an HF model whose MoE gates are not its MoE checkpoint's: two tiny Mixtrals of
the same shape (different seeds), the dense model of one with the MoE checkpoint of the other."""

import pytest

from moe_cluster.hf.importer import import_hf_checkpoint
from moe_cluster.hf.runner import HFMoERunner, check_compatible
from moe_cluster.checkpoint import load_config

from ...support.hf_models import build_hf


@pytest.fixture(scope="module")
def two_mixtrals(tmp_path_factory):
    """{seed: (hf_dir, moe_dir)} of two tiny Mixtrals of one shape."""
    root = tmp_path_factory.mktemp("crossed")
    out = {}
    for seed in (0, 1):
        build_hf("mixtral", seed=seed).save_pretrained(root / f"hf-{seed}")
        import_hf_checkpoint(root / f"hf-{seed}", root / f"moe-{seed}", log=lambda _: None)
        out[seed] = (root / f"hf-{seed}", root / f"moe-{seed}")
    return out


def test_matching_gates_pass(two_mixtrals):
    hf_dir, moe_dir = two_mixtrals[0]
    check_compatible(hf_dir, load_config(moe_dir), moe_dir)


def test_crossed_models_are_refused_naming_both_directories(two_mixtrals):
    (hf_a, _), (_, moe_b) = two_mixtrals[0], two_mixtrals[1]
    with pytest.raises(ValueError) as info:
        check_compatible(hf_a, load_config(moe_b), moe_b)
    message = str(info.value)
    assert str(moe_b) in message and str(hf_a) in message and "gate of MoE layer 0 differs" in message
    with pytest.raises(ValueError, match="was not imported from"):
        HFMoERunner.in_process(hf_a, moe_b)


def test_the_runner_app_refuses_crossed_models_before_deploying(two_mixtrals):
    pytest.importorskip("ray")
    from moe_cluster.serving.runner import build_runner_app

    (hf_a, _), (_, moe_b) = two_mixtrals[0], two_mixtrals[1]
    with pytest.raises(ValueError, match="was not imported from"):
        build_runner_app({"hf_model": str(hf_a), "moe": {"checkpoint": str(moe_b)}})
