"""Faults and overload on a real local cluster: nothing lost, nothing wrong, clear errors.

One local Ray cluster for the module, two small apps sharing a checkpoint (tiny preset):
  faults: router + experts-0-3 and experts-4-7, two replicas each, health-checked every
          second. Eight HTTP clients run while a replica of a random expert deployment is
          killed every few seconds: every answer must equal the oracle, >= 99% must
          succeed, a failure may only be a clear 503/504 (a client exception of any kind
          counts as a failure), the router must have retried calls to the dead replicas,
          and requests succeed again soon after each kill.
  limits: a router that runs 1 request and queues 1 more (Serve answers the rest with
          503 at once), a 3 s request deadline, and expert calls of at most 4 rows, so a
          large request is slow enough to miss its deadline.
  busy:   a router and one deployment of slow experts (tests/support/broken_experts.py:Slow),
          so that one call keeps an expert replica computing for 6 s while the health
          endpoints are asked.

`pytest -s` prints the measured recovery times and success rates. The faults app uses the
default transport (`auto`: these small calls go on the experts' direct channels, on 127.0.0.1);
`MOE_FAULTS_TRANSPORT=object_store` (or `by_value`, or `channel`) runs the same test with that transport forced.
"""

import json
import os
import random
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import msgpack
import numpy as np
import pytest
import torch

from moe_cluster import MoEModel, preset_config
from moe_cluster.core.reference import reference_forward

from .conftest import start_local_serve, stop_local_serve, wait_until
from ..support.broken_experts import Slow, expert_app
from ..support.loadgen import Load, first_success_after, request_pool, summarize
from moe_cluster.checkpoint import load_model, save_model

KILL_EVERY_S = 5.0  # at most one kill per interval
CHAOS_S = 60.0
MIN_KILLS = 4  # a replica takes 12-30 s to start on a busy 2-core machine: that bounds the kill rate
BUSY_WAIT_S = 2.0  # how long a kill waits for a replica with calls in flight
REPLICAS = 2  # per expert deployment of the faults app: one replica may die, the other answers
DEADLINE_S = 3.0  # the 64-token overload request takes ~0.8 s on a busy CI machine, twice that when queued
FAULTS = {
    "torch_threads": 1, "max_tokens_per_call": 16,
    # Health checks every second: Serve notices a dead replica and starts another within ~1-3 s.
    "experts": {"num_replicas": REPLICAS, "health_check_period_s": 1, "health_check_timeout_s": 5,
                "ray_actor_options": {"num_cpus": 0}},
    "placement": [{"name": "experts-0-3", "experts": [0, 1, 2, 3]}, {"name": "experts-4-7", "experts": [4, 5, 6, 7]}],
    "transport": os.environ.get("MOE_FAULTS_TRANSPORT", "auto"),
    "channel_host": "127.0.0.1",  # transport channel: every socket of ours on loopback in tests
}
LIMITS = {
    "torch_threads": 1, "max_tokens_per_call": 4, "request_timeout_s": DEADLINE_S,
    # Request merging stays on (the default): a batch whose requests all missed their deadline
    # is cancelled, so it does not hold up the requests after it.
    "router": {"max_ongoing_requests": 1, "max_queued_requests": 1, "ray_actor_options": {"num_cpus": 0}},
    "experts": {"ray_actor_options": {"num_cpus": 0}},
    "placement": [{"name": "all-experts", "experts": list(range(8))}],
    # The deadline test needs a request slower than DEADLINE_S: its 4096 calls of 4 rows take 3 s or more
    # through Serve's request path, and ~1 s on the experts' direct channels (auto's path for them).
    "transport": "by_value",
}
BUSY_S = 6.0  # one call keeps the busy app's expert replica computing this long
BUSY = {"torch_threads": 1, "request_timeout_s": 60, "router": {"ray_actor_options": {"num_cpus": 0}}}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    from ray import serve

    from moe_cluster.serving.app import build_app

    checkpoint = tmp_path_factory.mktemp("ckpt")
    save_model(MoEModel.random(preset_config("tiny"), seed=7), checkpoint)
    local = start_local_serve()
    try:
        serve.run(build_app({**FAULTS, "checkpoint": str(checkpoint)}), name="faults", route_prefix="/faults")
        serve.run(build_app({**LIMITS, "checkpoint": str(checkpoint)}), name="limits", route_prefix="/limits")
        # A 1-token call carries rows for top_k experts, each of which sleeps BUSY_S / top_k.
        delay_s = BUSY_S / preset_config("tiny").top_k
        serve.run(expert_app({**BUSY, "checkpoint": str(checkpoint)}, "slow-experts", Slow, delay_s),
                  name="busy", route_prefix="/busy")
        yield {"model": load_model(checkpoint), "local": local}
    finally:
        stop_local_serve()


# --- killing expert replicas under load --------------------------------------------------------

@dataclass
class Kill:
    deployment: str
    replica: str  # the killed actor's name
    at: float  # time.monotonic()
    busy: bool = False  # it had calls in flight when it was killed
    replaced_s: float | None = None  # until the deployment had REPLICAS running ones again


def _replicas(app: str) -> dict[str, list[str]]:
    """Names of the live replica actors of each expert deployment of `app`."""
    import ray

    out: dict[str, list[str]] = {}
    for actor in ray.util.list_named_actors(all_namespaces=True):
        _, _, rest = actor["name"].partition("SERVE_REPLICA::")
        parts = rest.split("#")
        if len(parts) == 3 and parts[0] == app and parts[1].startswith("experts-"):
            out.setdefault(parts[1], []).append(actor["name"])
    return out


def _running(app: str) -> dict[str, int]:
    from ray import serve

    deployments = serve.status().applications[app].deployments
    return {name: sum(n for state, n in d.replica_states.items() if str(state).endswith("RUNNING"))
            for name, d in deployments.items()}


def _kill_one(app: str, rng: random.Random) -> Kill | None:
    """Kill a replica of a random expert deployment whose replicas are all up (None: none is).

    So a deployment always keeps one live replica: the test measures retries onto it, not how
    long a new replica takes to start (that is `replaced_s`). The victim is one with calls in
    flight where one is seen within BUSY_WAIT_S (Serve's own queue-length probe), so that the
    kill fails calls and the router must retry them; an idle replica dies without a retry.
    """
    import ray

    replicas, running = _replicas(app), _running(app)
    healthy = sorted(d for d, names in replicas.items() if len(names) == REPLICAS and running.get(d) == REPLICAS)
    if not healthy:
        return None
    deployment = rng.choice(healthy)
    actors = {name: ray.get_actor(name, namespace="serve") for name in replicas[deployment]}
    name, busy = _busy_replica(actors, BUSY_WAIT_S), True
    if name is None:
        name, busy = rng.choice(sorted(actors)), False
    ray.kill(actors[name], no_restart=True)
    return Kill(deployment, name, time.monotonic(), busy=busy)


def _busy_replica(actors: dict, wait_s: float) -> str | None:
    """The name of one of `actors` (Serve replicas) with a call in flight, polled for up to wait_s."""
    import ray

    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        for name, actor in actors.items():
            try:
                if ray.get(actor.get_num_ongoing_requests.remote(), timeout=5) > 0:
                    return name
            except ray.exceptions.RayError:  # it is going away (Serve replaces it): not a victim
                continue
        time.sleep(0.005)
    return None


def _note_replacements(app: str, kills: list[Kill]) -> None:
    """Set replaced_s of kills whose deployment runs REPLICAS replicas again, none of them the dead one."""
    pending = [k for k in kills if k.replaced_s is None]
    if not pending:
        return
    replicas, running = _replicas(app), _running(app)
    for kill in pending:
        names = replicas.get(kill.deployment, [])
        if kill.replica not in names and len(names) == REPLICAS and running.get(kill.deployment) == REPLICAS:
            kill.replaced_s = time.monotonic() - kill.at


def _chaos(app: str, duration_s: float, every_s: float, seed: int = 0) -> list[Kill]:
    """Kill a replica every `every_s` for `duration_s` (the load runs alone for the first interval)."""
    rng, kills = random.Random(seed), []
    start = time.monotonic()
    next_kill = start + every_s
    while time.monotonic() < start + duration_s:
        _note_replacements(app, kills)
        if time.monotonic() >= next_kill:
            kill = _kill_one(app, rng)
            if kill is not None:
                kills.append(kill)
                next_kill += every_s
        time.sleep(0.1)
    return kills


def _retries(url: str) -> int:
    with urllib.request.urlopen(url + "/v1/stats", timeout=60) as response:
        return sum(e["retries"] for e in json.loads(response.read())["experts"])


def test_killing_expert_replicas_under_load_loses_nothing(cluster):
    url = cluster["local"].url("/faults")
    pool = request_pool(cluster["model"], seed=1)
    retries_before = _retries(url)
    with Load(url, pool, clients=8) as load:
        kills = _chaos("faults", CHAOS_S, KILL_EVERY_S)
        # The load keeps running until every killed replica is replaced, so a kill near the end
        # of the chaos window still has requests after it (CI once saw a last kill with none).
        wait_until(lambda: (_note_replacements("faults", kills), all(k.replaced_s for k in kills))[1], timeout=120,
                   interval=0.2, what="a replacement for every killed replica")
    summary = summarize(load.outcomes)
    recovery = [first_success_after(load.outcomes, k.at) for k in kills]
    retries = _retries(url) - retries_before
    print(f"\nkilled {len(kills)} expert replicas in {CHAOS_S:.0f}s under 8 clients: {summary['requests']} requests, "
          f"success {100 * summary['success_rate']:.2f}%, {summary['clear_errors']} clear 503/504, "
          f"p50 {summary['p50_s']:.3f}s, max {summary['max_s']:.2f}s, outcomes {summary['by_kind']}")
    print("first success after each kill (s):", [None if r is None else round(r, 2) for r in recovery])
    print("replica replaced after (s):", [round(k.replaced_s, 1) for k in kills])
    print(f"expert calls retried by the router: {retries} ({sum(k.busy for k in kills)} kills hit a busy replica)")
    # Each kill is real: _chaos waited until the killed actor was gone and replaced (replaced_s).
    assert len(kills) >= MIN_KILLS, f"only {len(kills)} kills: killed replicas were not replaced in time"
    assert retries > 0, "replicas were killed under load but the router retried no expert call"
    # Every request is counted (an exception in a client is a failure too): none may be wrong,
    # and a failure may only be a clear 503/504.
    assert summary["wrong_answers"] == 0 and summary["unclear_count"] == 0, \
        f"{summary['wrong_answers']} wrong answers, {summary['unclear_count']} unclear failures " \
        f"{summary['by_kind']}, e.g. {summary['unclear']}"
    assert summary["success_rate"] >= 0.99, summary
    assert all(r is not None and r <= 5.0 for r in recovery), recovery


# --- bounded queues and deadlines ----------------------------------------------------------------

def _post(url: str, body: bytes, content_type: str = "application/msgpack") -> tuple[int, str, bytes, float]:
    """(status, content type, body, seconds) of one POST."""
    request = urllib.request.Request(url, data=body, headers={"Content-Type": content_type})
    started = time.monotonic()
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, response.headers.get("content-type", ""), response.read(), \
                time.monotonic() - started
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers.get("content-type", ""), exc.read(), time.monotonic() - started


def _msgpack_request(x: np.ndarray, layer: int) -> bytes:
    tensor = {"dtype": "float32", "shape": list(x.shape), "data": x.tobytes()}
    return msgpack.packb({"hidden_states": tensor, "layer": layer})


def _output(body: bytes) -> np.ndarray:
    out = msgpack.unpackb(body)["output"]
    return np.frombuffer(out["data"], np.float32).reshape(out["shape"])


def _check_serves(cluster, prefix: str) -> None:
    x = np.random.default_rng(3).standard_normal((3, 64)).astype(np.float32)
    status, _, body, _ = _post(cluster["local"].url(prefix) + "/v1/forward", _msgpack_request(x, 1))
    assert status == 200, body[:300]
    expected = reference_forward(cluster["model"], torch.from_numpy(x), 1).numpy()
    np.testing.assert_allclose(_output(body), expected, rtol=1e-5, atol=1e-5)


def test_overload_gets_fast_503s_and_accepted_requests_are_right(cluster):
    url = cluster["local"].url("/limits") + "/v1/forward"
    x = np.random.default_rng(4).standard_normal((64, 64)).astype(np.float32)  # 32+ expert calls of <= 4 rows
    expected = reference_forward(cluster["model"], torch.from_numpy(x), 0).numpy()
    body = _msgpack_request(x, 0)
    with ThreadPoolExecutor(max_workers=24) as pool:
        results = list(pool.map(lambda _: _post(url, body), range(24)))
    statuses = sorted(r[0] for r in results)
    rejected = [r for r in results if r[0] == 503]
    accepted = [r for r in results if r[0] == 200]
    print(f"\n24 concurrent requests, router holds 1 + queues 1: {len(accepted)} answered, {len(rejected)} got 503 "
          f"(slowest 503 after {max((r[3] for r in rejected), default=0):.2f}s, slowest answer after "
          f"{max((r[3] for r in accepted), default=0):.2f}s)")
    # a request that waited in the queue longer than the deadline may get a clear 504 instead
    late = [json.loads(r[2])["error"] for r in results if r[0] == 504]
    assert set(statuses) <= {200, 503, 504}, statuses
    assert all("DeadlineExceeded" in message for message in late), late
    assert len(accepted) >= 1 and len(rejected) >= 12, statuses
    for _, _, content, _ in accepted:
        np.testing.assert_allclose(_output(content), expected, rtol=1e-5, atol=1e-5)
    for _, _, content, seconds in rejected:  # Serve's own answer, before the router sees the request
        assert seconds < 5.0 and b"backpressure" in content.lower(), (seconds, content[:200])
    _check_serves(cluster, "/limits")


def test_missed_deadline_is_a_504_with_a_clear_message(cluster):
    url = cluster["local"].url("/limits") + "/v1/forward"
    x = np.random.default_rng(5).standard_normal((8192, 64)).astype(np.float32)  # 4096 expert calls
    status, content_type, body, seconds = _post(url, _msgpack_request(x, 0))
    print(f"\n8192 tokens in expert calls of 4 rows with request_timeout_s={DEADLINE_S:g}: {status} "
          f"after {seconds:.2f}s")
    assert status == 504 and content_type == "application/json", body[:300]
    message = json.loads(body)["error"]
    assert "DeadlineExceeded" in message and "request_timeout_s" in message and "retry later" in message
    assert seconds < DEADLINE_S + 10
    missed = time.monotonic()
    wait_until(lambda: _post(url, _msgpack_request(x[:2], 0))[0] == 200, timeout=30, interval=0.2,
               what="a small request answered after the missed deadline")
    print(f"answering again {time.monotonic() - missed:.2f}s after the 504")
    _check_serves(cluster, "/limits")


# --- health checks while an expert computes ---------------------------------------------------------

def _get(url: str) -> tuple[int, float]:
    """(status, seconds) of one GET."""
    started = time.monotonic()
    try:
        with urllib.request.urlopen(url, timeout=60) as response:
            response.read()
            return response.status, time.monotonic() - started
    except urllib.error.HTTPError as exc:
        return exc.code, time.monotonic() - started


def test_health_answers_while_an_expert_computes(cluster):
    """The router pings every expert deployment (5 s timeout) for /healthz and /v2/health/ready: an
    expert replica in the middle of a 6 s computation must still answer at once."""
    url = cluster["local"].url("/busy")
    x = np.random.default_rng(6).standard_normal((1, 64)).astype(np.float32)
    expected = reference_forward(cluster["model"], torch.from_numpy(x), 0).numpy()
    assert _get(url + "/healthz")[0] == 200, "the busy app is not healthy before the test"
    with ThreadPoolExecutor(max_workers=1) as pool:
        busy = pool.submit(_post, url + "/v1/forward", _msgpack_request(x, 0))
        time.sleep(1.0)  # the call reaches the expert within milliseconds; then it computes for BUSY_S
        probes = []
        while not busy.done() and len(probes) < 40:
            for path in ("/healthz", "/v2/health/ready"):
                probes.append((path, *_get(url + path), busy.done()))
            time.sleep(0.3)
        status, _, body, seconds = busy.result()
    print(f"\nan expert computing for {seconds:.1f}s; health probes meanwhile (path, status, s): "
          f"{[(p, s, round(t, 3)) for p, s, t, _ in probes]}")
    assert status == 200 and seconds >= BUSY_S, (status, seconds, body[:300])
    np.testing.assert_allclose(_output(body), expected, rtol=1e-5, atol=1e-5)
    during = [p for p in probes if not p[3]]  # answered before the busy call was
    assert all(status == 200 and t < 1.0 for _, status, t, _ in during), during
    assert len(during) >= 4, f"too few probes while the expert computed: {probes}"
