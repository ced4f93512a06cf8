"""What the bench deploys and how it sums up (no Ray cluster): the olmoe-mini preset, its packing
into 8 deployments of 8 experts, and the decode ratios of the summary."""

import pytest

from moe_cluster.core.config import preset_config
from moe_cluster.tools.bench import BenchSettings, cluster_args, summarize


def test_olmoe_mini_is_the_fine_grained_shape_the_issue_names():
    config = preset_config("olmoe-mini")
    assert (config.d_model, config.d_ff, config.num_experts, config.top_k, config.num_layers) == (1024, 512, 64, 8, 2)
    assert (config.score_func, config.normalize_top_k, config.expert_kind) == ("softmax", False, "swiglu")


@pytest.mark.parametrize("preset, per, groups", [("olmoe-mini", None, 8), ("mixtral-mini", None, 8),
                                                 ("tiny", None, 8), ("olmoe-mini", 16, 4), ("tiny", 3, 3)])
def test_cluster_packs_fine_grained_presets_eight_experts_per_deployment(preset, per, groups):
    settings = BenchSettings(preset=preset, experts_per_deployment=per)
    args = cluster_args(settings)
    config = preset_config(preset)
    placement = args.resolve_placement(config)
    assert len(placement.groups) == groups
    hosted = sorted(e for g in placement.groups for e in g.experts)
    assert hosted == list(range(config.num_experts))  # every expert once
    sizes = {len(g.experts) for g in placement.groups}
    expected = per or (8 if config.num_experts >= 64 else 1)
    assert max(sizes) == expected


def _record(mode, tokens, p50, clients=1, **extra):
    return {"mode": mode, "tokens": tokens, "clients": clients, "tokens_per_s": tokens * 1e3 / p50,
            "p50_ms": p50, "p99_ms": p50, "requests": 5, **extra}


def test_summary_ratios_include_decode_and_ignore_decode_records_elsewhere():
    records = [_record(m, t, p50) for m, t, p50 in [("inprocess", 1, 2.0), ("handle", 1, 6.0), ("monolithic", 1, 3.0),
                                                     ("inprocess", 64, 10.0), ("handle", 64, 15.0),
                                                     ("monolithic", 64, 12.0)]]
    records += [_record(mode, batch, ms, batch=batch, ms_per_token=ms, decode_model=model)
                for mode, model, batch, ms in [("decode-inprocess", "4-layer", 1, 40.0),
                                               ("decode-cluster", "4-layer", 1, 60.0),
                                               ("decode-inprocess", "4-layer", 8, 100.0),
                                               ("decode-cluster", "4-layer", 8, 120.0),
                                               ("decode-inprocess", "16-layer", 1, 10.0),
                                               ("decode-cluster", "16-layer", 1, 14.0)]]
    results = {"records": records, "serve_floor_p50_ms": 3.0, "serve_fanout_floor_p50_ms": 4.0,
               "matmul_peak_gflops": 100.0}
    summary = summarize(results, preset_config("tiny"))
    assert summary["largest_T"] == 64  # decode records (tokens 1 and 8) are not layer calls
    assert summary["handle_over_inprocess"] == pytest.approx(10 / 15)
    assert summary["handle_T1_p50_over_fanout_floor"] == pytest.approx(1.5)
    assert summary["handle_T64_p50_over_inprocess"] == pytest.approx(1.5)
    assert summary["decode-cluster_over_inprocess_batch1"] == pytest.approx(1.5)
    assert summary["decode-cluster_over_inprocess_batch8"] == pytest.approx(1.2)
    assert summary["decode-cluster-16-layer_over_inprocess_batch1"] == pytest.approx(1.4)  # each model to its own
    assert "decode-cluster-16-layer_over_inprocess_batch8" not in summary


@pytest.mark.parametrize("transport", ["auto", "channel", "object_store"])
def test_the_bench_cluster_takes_the_transport_and_keeps_channels_on_loopback(transport):
    args = cluster_args(BenchSettings(preset="tiny", transport=transport))
    # set by the bench itself (tests/conftest.py makes loopback the default of every app a test builds)
    assert args.transport == transport and args.channel_host == "127.0.0.1" and "channel_host" in args.model_fields_set
