"""Per-expert autoscaling on token load, and per-expert observability (JSON + Prometheus).

A small top-1 model (4 experts) so that skewed traffic really lands on one expert: heavy
traffic aimed at the hot expert plus light uniform traffic for all. Only the hot expert's
deployment may grow; the others must stay at min_replicas; the hot one shrinks back after.
"""

import json
import threading
import time
import urllib.request

import numpy as np
import pytest
import torch

from moe_cluster import ModelConfig, MoEModel
from moe_cluster.client import MoEClient
from moe_cluster.core.routing import route
from moe_cluster.serving.autoscaling import POLICY_PATH

from .conftest import free_port, start_local_serve, stop_local_serve, wait_until
from moe_cluster.checkpoint import load_model, save_model

HOT = 2
CONFIG = ModelConfig(d_model=32, d_ff=64, num_experts=4, top_k=1, num_layers=1, expert_kind="mlp")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    from ray import serve

    from moe_cluster.serving.app import build_app

    checkpoint = tmp_path_factory.mktemp("autoscale")
    save_model(MoEModel.random(CONFIG, seed=3), checkpoint)
    metrics_port = free_port()
    local = start_local_serve(_metrics_export_port=metrics_port)
    autoscaling = {"min_replicas": 1, "max_replicas": 3, "initial_replicas": 1, "metrics_interval_s": 0.5,
                   "look_back_period_s": 2, "upscale_delay_s": 1, "downscale_delay_s": 3,
                   "policy": {"policy_function": POLICY_PATH, "policy_kwargs": {"target_rows_per_s": 300}}}
    serve.run(build_app({"checkpoint": str(checkpoint), "torch_threads": 1,
                         "router": {"num_replicas": 1, "ray_actor_options": {"num_cpus": 0}},
                         "experts": {"autoscaling_config": autoscaling, "ray_actor_options": {"num_cpus": 0}}}),
              name="moe", route_prefix="/")
    yield {"local": local, "model": load_model(checkpoint), "metrics_port": metrics_port}
    stop_local_serve()


def _running_replicas():
    from ray import serve

    deployments = serve.status().applications["moe"].deployments
    return {name: sum(n for state, n in d.replica_states.items() if str(state).endswith("RUNNING"))
            for name, d in deployments.items()}


def _hot_tokens(model, tokens, rng):
    gate_ED = model.layers[0].gate_and_shared.gate.weight_ED
    x = 4.0 * gate_ED[HOT] / gate_ED[HOT].norm() ** 2 * 8 + 0.05 * torch.from_numpy(
        rng.standard_normal((tokens, CONFIG.d_model)).astype(np.float32))
    _, ids = route(x, model.layers[0].gate_and_shared.gate, CONFIG)
    assert (ids == HOT).all(), "the crafted tokens must all route to the hot expert"
    return x.numpy()


def _load(url, make_batch, pause_s, stop, errors):
    client = MoEClient(url)
    while not stop.is_set():
        try:
            client.forward(make_batch())
        except Exception as exc:  # noqa: BLE001 - reported by the test
            errors.append(exc)
        time.sleep(pause_s)


def test_only_the_hot_expert_scales_up_then_down(cluster):
    rng = np.random.default_rng(0)
    hot_batch = _hot_tokens(cluster["model"], 128, rng)
    url = cluster["local"].url()
    stop, errors = threading.Event(), []
    workers = [threading.Thread(target=_load, args=(url, lambda: hot_batch, 0.0, stop, errors)) for _ in range(3)]
    workers.append(threading.Thread(target=_load, args=(
        url, lambda: rng.standard_normal((8, 32)).astype(np.float32), 0.3, stop, errors)))
    cold_max = {f"expert-{e}": 1 for e in range(4) if e != HOT}
    started = time.monotonic()
    for worker in workers:
        worker.start()
    try:
        def hot_scaled_up():
            running = _running_replicas()
            for name in cold_max:
                cold_max[name] = max(cold_max[name], running[name])
            return running[f"expert-{HOT}"] >= 2

        wait_until(hot_scaled_up, timeout=90, what=f"expert-{HOT} scaling up")
        scale_up_s = time.monotonic() - started
        stats = _get_json(f"{url}/v1/stats")
    finally:
        stop.set()
        for worker in workers:
            worker.join()
    assert not errors, errors[:3]
    assert cold_max == {name: 1 for name in cold_max}, f"cold experts scaled: {cold_max}"
    rows = stats["layers"]["0"]["rows"]
    assert rows[HOT] > 10 * max(r for e, r in enumerate(rows) if e != HOT)
    assert stats["layers"]["0"]["imbalance"] > 2.5
    assert stats["replicas"][f"expert-{HOT}"] >= 2
    assert stats["experts"][HOT]["latency_ms"]["p50"] > 0
    print(f"\nexpert-{HOT} scaled up after {scale_up_s:.1f}s of skewed load")

    stopped = time.monotonic()
    wait_until(lambda: _running_replicas()[f"expert-{HOT}"] == 1, timeout=90, what=f"expert-{HOT} scaling down")
    print(f"expert-{HOT} back to 1 replica {time.monotonic() - stopped:.1f}s after the load stopped")
    assert all(n == 1 for name, n in _running_replicas().items() if name in cold_max)


def _get_json(url):
    with urllib.request.urlopen(url) as response:
        return json.loads(response.read())


def test_prometheus_export_has_per_expert_metrics(cluster):
    MoEClient(cluster["local"].url()).forward(np.ones((4, 32), np.float32))

    def scraped():
        with urllib.request.urlopen(f"http://127.0.0.1:{cluster['metrics_port']}/metrics") as response:
            text = response.read().decode()
        return text if "moe_expert_rows" in text and "moe_expert_call_latency_ms" in text else None

    text = wait_until(scraped, timeout=60, interval=2, what="moe metrics in the Prometheus export")
    assert 'deployment="expert-' in text
