"""Per-expert autoscaling on token load, and per-expert observability (JSON + Prometheus).

A small top-1 model (4 experts) so that skewed traffic really lands on one expert: heavy
traffic aimed at the hot expert plus light uniform traffic for all. Only the hot expert's
deployment may grow; the others must stay at min_replicas; the hot one shrinks back after.
Every answer of that load, sent while replicas start, is compared with the oracle.

A second app of the same model, `demand`, has one deployment of slow experts
(tests/support/broken_experts.py:Slow: each expert sleeps DEMAND_DELAY_S per call, then answers
right) that scales between 0 and 2 replicas with a rows target no load here can reach: it may
only grow because calls wait for it. From 0 replicas a call must wake it and be answered;
under concurrent calls it must grow to 2 although it computes a few rows per second.
"""

import itertools
import json
import threading
import time
import urllib.request

import numpy as np
import pytest
import torch

from moe_cluster import ModelConfig, MoEModel
from moe_cluster.client import MoEClient
from moe_cluster.core.reference import reference_forward
from moe_cluster.core.routing import route
from moe_cluster.serving.autoscaling import POLICY_PATH

from .conftest import free_port, start_local_serve, stop_local_serve, wait_until
from ..support.broken_experts import Slow, expert_app
from moe_cluster.checkpoint import load_model, save_model

HOT = 2
CONFIG = ModelConfig(d_model=32, d_ff=64, num_experts=4, top_k=1, num_layers=1, expert_kind="mlp")
DEMAND_DELAY_S = 2.0  # each expert of the demand app sleeps this long per call
DEMAND = {
    "torch_threads": 1, "max_batch_tokens": None,  # no merging: concurrent requests are concurrent calls
    "request_timeout_s": 90,  # room for a replica's start on a busy 2-core machine (12-30 s)
    "router": {"num_replicas": 1, "ray_actor_options": {"num_cpus": 0}},
    # A replica told to stop gets 1 s to finish its calls (Serve's default is 20 s): a policy that
    # stops the replica of a call still computing loses that call, as it would with longer calls.
    "experts": {"ray_actor_options": {"num_cpus": 0}, "graceful_shutdown_timeout_s": 1, "autoscaling_config": {
        "min_replicas": 0, "initial_replicas": 0, "max_replicas": 2, "target_ongoing_requests": 1,
        "metrics_interval_s": 0.5, "look_back_period_s": 2, "upscale_delay_s": 1, "downscale_delay_s": 3,
        "downscale_to_zero_delay_s": 3,
        # far above what this app computes (a few rows/s): only the work waiting can grow it
        "policy": {"policy_function": POLICY_PATH, "policy_kwargs": {"target_rows_per_s": 1e9}}}},
}


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
    serve.run(expert_app({**DEMAND, "checkpoint": str(checkpoint)}, "slow-experts", Slow, DEMAND_DELAY_S),
              name="demand", route_prefix="/demand")
    yield {"local": local, "model": load_model(checkpoint), "metrics_port": metrics_port}
    stop_local_serve()


def _running_replicas(app: str = "moe"):
    from ray import serve

    deployments = serve.status().applications[app].deployments
    return {name: sum(n for state, n in d.replica_states.items() if str(state).endswith("RUNNING"))
            for name, d in deployments.items()}


def _hot_tokens(model, tokens, rng):
    gate_ED = model.layers[0].gate_and_shared.gate.weight_ED
    x = 4.0 * gate_ED[HOT] / gate_ED[HOT].norm() ** 2 * 8 + 0.05 * torch.from_numpy(
        rng.standard_normal((tokens, CONFIG.d_model)).astype(np.float32))
    _, ids = route(x, model.layers[0].gate_and_shared.gate, CONFIG)
    assert (ids == HOT).all(), "the crafted tokens must all route to the hot expert"
    return x.numpy()


def _with_oracle(model, batches):
    """[(x [T, D] float32 numpy, reference_forward's y [T, D])] for layer 0."""
    return [(x, reference_forward(model, torch.from_numpy(x), 0).numpy()) for x in batches]


def _load(url, requests, pause_s, stop, outcomes):
    """Send `requests` [(x, expected)] in a loop until `stop`; append "ok" or what went wrong."""
    client = MoEClient(url)
    for x_TD, expected_TD in itertools.cycle(requests):
        if stop.is_set():
            return
        try:
            torch.testing.assert_close(torch.from_numpy(client.forward(x_TD)), torch.from_numpy(expected_TD),
                                       rtol=1e-5, atol=1e-5)
            outcomes.append("ok")
        except Exception as exc:  # noqa: BLE001 - a failed request or a wrong answer, reported by the test
            outcomes.append(f"T={x_TD.shape[0]}: {type(exc).__name__}: {exc}"[:500])
        time.sleep(pause_s)


def test_only_the_hot_expert_scales_up_then_down(cluster):
    rng = np.random.default_rng(0)
    hot = _with_oracle(cluster["model"], [_hot_tokens(cluster["model"], 128, rng)])
    cold = _with_oracle(cluster["model"], [rng.standard_normal((8, 32)).astype(np.float32) for _ in range(16)])
    url = cluster["local"].url()
    stop, hot_outcomes, cold_outcomes = threading.Event(), [], []
    workers = [threading.Thread(target=_load, args=(url, hot, 0.0, stop, hot_outcomes)) for _ in range(3)]
    workers.append(threading.Thread(target=_load, args=(url, cold, 0.3, stop, cold_outcomes)))
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
    failures = [o for o in hot_outcomes + cold_outcomes if o != "ok"]
    assert not failures, f"{len(failures)} failed or wrong of {len(hot_outcomes + cold_outcomes)}: {failures[:3]}"
    assert hot_outcomes and cold_outcomes, "no answer was checked"
    assert cold_max == {name: 1 for name in cold_max}, f"cold experts scaled: {cold_max}"
    rows = stats["layers"]["0"]["rows"]
    assert rows[HOT] > 10 * max(r for e, r in enumerate(rows) if e != HOT)
    assert stats["layers"]["0"]["imbalance"] > 2.5
    assert stats["replicas"][f"expert-{HOT}"] >= 2
    assert stats["experts"][HOT]["latency_ms"]["p50"] > 0
    print(f"\nexpert-{HOT} scaled up after {scale_up_s:.1f}s of skewed load; "
          f"{len(hot_outcomes)} hot and {len(cold_outcomes)} uniform answers equal to the oracle")

    stopped = time.monotonic()
    wait_until(lambda: _running_replicas()[f"expert-{HOT}"] == 1, timeout=90, what=f"expert-{HOT} scaling down")
    print(f"expert-{HOT} back to 1 replica {time.monotonic() - stopped:.1f}s after the load stopped")
    assert all(n == 1 for name, n in _running_replicas().items() if name in cold_max)


def _get_json(url):
    with urllib.request.urlopen(url) as response:
        return json.loads(response.read())


def test_prometheus_export_has_per_expert_metrics(cluster):
    ((x_TD, expected_TD),) = _with_oracle(cluster["model"], [np.ones((4, 32), np.float32)])
    np.testing.assert_allclose(MoEClient(cluster["local"].url()).forward(x_TD), expected_TD, rtol=1e-5, atol=1e-5)

    def scraped():
        with urllib.request.urlopen(f"http://127.0.0.1:{cluster['metrics_port']}/metrics") as response:
            text = response.read().decode()
        return text if "moe_expert_rows" in text and "moe_expert_call_latency_ms" in text else None

    text = wait_until(scraped, timeout=60, interval=2, what="moe metrics in the Prometheus export")
    assert 'deployment="expert-' in text


# --- the demand app: growing on calls that wait ---------------------------------------------------

def _slow_replicas() -> int:
    return _running_replicas("demand")["slow-experts"]


def _one_token_per_expert(model, rng):
    """[E, D] float32: token e routes to expert e (top-1), so one call carries rows of every expert."""
    x = torch.from_numpy(rng.standard_normal((256, CONFIG.d_model)).astype(np.float32))
    _, ids = route(x, model.layers[0].gate_and_shared.gate, CONFIG)
    return torch.stack([x[(ids[:, 0] == e).nonzero()[0, 0]] for e in range(CONFIG.num_experts)]).numpy()


def test_a_deployment_at_zero_replicas_wakes_for_a_call_and_keeps_its_replica(cluster):
    """min_replicas 0: the call waits at the router while Serve starts a replica, keeps that replica
    while it computes (4 experts x DEMAND_DELAY_S, longer than look_back_period_s plus
    downscale_to_zero_delay_s, while no row is done yet) and is answered right."""
    wait_until(lambda: _slow_replicas() == 0, timeout=90, what="the demand app's experts at 0 replicas")
    time.sleep(3)  # and it stays there while idle
    assert _slow_replicas() == 0
    ((x_TD, expected_TD),) = _with_oracle(cluster["model"], [_one_token_per_expert(cluster["model"],
                                                                                     np.random.default_rng(1))])
    seen, done = [], threading.Event()

    def watch():  # replicas running, every 0.2 s, while the call is in flight
        while not done.is_set():
            seen.append(_slow_replicas())
            time.sleep(0.2)

    watcher = threading.Thread(target=watch)
    started = time.monotonic()
    watcher.start()
    try:
        answer = MoEClient(cluster["local"].url("/demand"), timeout=150).forward(x_TD)
    finally:
        waited_s = time.monotonic() - started
        done.set()
        watcher.join()
    awake = seen[seen.index(1):] if 1 in seen else []
    print(f"\na call to a deployment at 0 replicas answered after {waited_s:.1f}s "
          f"({CONFIG.num_experts * DEMAND_DELAY_S:.0f}s of it computing); replicas seen: {sorted(set(seen))}")
    np.testing.assert_allclose(answer, expected_TD, rtol=1e-5, atol=1e-5)
    assert awake and min(awake) >= 1, f"the replica was stopped while the call computed on it: {seen}"


def test_a_saturated_deployment_grows_whatever_its_rows_per_s(cluster):
    """Four clients keep four 1-row calls of DEMAND_DELAY_S each in flight: 1 / DEMAND_DELAY_S rows/s
    against a target of 1e9 rows/s, but 4 calls waiting against target_ongoing_requests 1: it must grow to 2."""
    rng = np.random.default_rng(2)
    requests = _with_oracle(cluster["model"], [rng.standard_normal((1, CONFIG.d_model)).astype(np.float32)
                                               for _ in range(8)])
    stop, outcomes = threading.Event(), []
    workers = [threading.Thread(target=_load, args=(cluster["local"].url("/demand"), requests, 0.0, stop, outcomes))
               for _ in range(4)]
    started = time.monotonic()
    for worker in workers:
        worker.start()
    try:
        wait_until(lambda: _slow_replicas() >= 2, timeout=120, what="the saturated deployment growing to 2")
        grew_s = time.monotonic() - started
    finally:
        stop.set()
        for worker in workers:
            worker.join()
    failures = [o for o in outcomes if o != "ok"]
    print(f"\nsaturated at {1 / DEMAND_DELAY_S:g} rows/s per replica: 2 replicas after {grew_s:.1f}s, "
          f"{len(outcomes)} answers")
    assert outcomes and not failures, f"{len(failures)} failed or wrong of {len(outcomes)}: {failures[:3]}"
