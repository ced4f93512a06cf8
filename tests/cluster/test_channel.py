"""Direct channels (`transport: channel`, serving/channel.py) on a real local cluster.

One local Ray cluster and one app for the module: router + experts-0-3 (2 replicas) and
experts-4-7 (1 replica), tiny preset from a checkpoint, every channel socket on 127.0.0.1.
Answers equal the oracle and go on the channel (the router's /v1/stats counts them, the
experts' stats count the rows); every published address is loopback; a call with a wrong
secret is refused by the replica; a replica killed under load is left for the other one
(retries seen, no wrong answer); a scale-up is used within seconds.
"""

import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch

from moe_cluster import MoEModel, preset_config
from moe_cluster.checkpoint import load_model, save_model
from moe_cluster.core.reference import reference_forward

from .conftest import start_local_serve, stop_local_serve, wait_until

APP = {
    "torch_threads": 1, "transport": "channel", "channel_host": "127.0.0.1", "max_tokens_per_call": 8,
    "experts": {"num_replicas": 1, "health_check_period_s": 1, "ray_actor_options": {"num_cpus": 0}},
    "placement": [{"name": "experts-0-3", "experts": [0, 1, 2, 3], "options": {"num_replicas": 2}},
                  {"name": "experts-4-7", "experts": [4, 5, 6, 7]}],
}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    from ray import serve

    from moe_cluster.serving.app import build_app

    checkpoint = tmp_path_factory.mktemp("ckpt")
    save_model(MoEModel.random(preset_config("tiny"), seed=11), checkpoint)
    start_local_serve()
    try:
        router = serve.run(build_app({**APP, "checkpoint": str(checkpoint)}), name="chan", route_prefix="/chan")
        cluster = {"model": load_model(checkpoint), "router": router}
        # The router follows the replicas from its start; wait until it has connected to all three.
        wait_until(lambda: sum(map(len, router.stats.remote().result()["transport"]["channel"]["replicas"].values()))
                   == 3 or _check(cluster, 2, 0, 0), timeout=30, what="the router's channels to every replica")
        yield cluster
    finally:
        stop_local_serve()


def _x(tokens, seed):
    return torch.randn(tokens, 64, generator=torch.Generator().manual_seed(seed))


def _expert_stats(deployment):
    from ray import serve

    handle = serve.get_deployment_handle(deployment, app_name="chan")
    return handle.broadcast("stats").results() if hasattr(handle, "broadcast") else []


def _check(cluster, tokens, seed, layer):
    x = _x(tokens, seed)
    y = cluster["router"].forward.remote(x.numpy(), layer).result()
    torch.testing.assert_close(torch.from_numpy(np.array(y)), reference_forward(cluster["model"], x, layer),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("tokens", [1, 37, 300])
def test_answers_equal_the_oracle_and_go_on_the_channel(cluster, tokens):
    router = cluster["router"]
    before = router.stats.remote().result()["transport"]
    for layer in (0, 1):
        _check(cluster, tokens, 40 + tokens, layer)
    after = router.stats.remote().result()["transport"]
    sent = {path: after["calls"][path] - before["calls"][path] for path in after["calls"]}
    assert after["mode"] == "channel" and sent["channel"] >= 2 and sent["by_value"] == sent["object_store"] == 0, sent
    assert after["channel"]["answers"] - before["channel"]["answers"] == sent["channel"], after["channel"]
    assert after["channel"]["fallback"] == before["channel"]["fallback"]


def test_every_channel_socket_is_on_loopback_and_rows_are_counted(cluster):
    _check(cluster, 64, 1, 0)
    addresses = cluster["router"].stats.remote().result()["transport"]["channel"]["replicas"]
    assert sorted(addresses) == ["experts-0-3", "experts-4-7"] and len(addresses["experts-0-3"]) == 2, addresses
    assert all(a.startswith("tcp://127.0.0.1:") for group in addresses.values() for a in group), addresses
    stats = _expert_stats("experts-0-3") + _expert_stats("experts-4-7")
    assert all(s["channel"]["address"].startswith("tcp://127.0.0.1:") for s in stats), stats
    # The channel's calls are counted as Serve's are: rows per expert, and answered calls.
    assert sum(s["channel"]["answered"] for s in stats) > 0 and sum(s["requests"] for s in stats) > 0
    assert sum(n for s in stats for _, _, n in s["rows"]) >= 64 * 2


def test_a_call_with_a_wrong_secret_is_refused(cluster):
    import zmq

    from moe_cluster.protocol.channel import CallHeader, decode_answer, encode_call

    address = _expert_stats("experts-4-7")[0]["channel"]["address"]
    assert address.startswith("tcp://127.0.0.1:")
    context = zmq.Context()
    sock = context.socket(zmq.DEALER)
    try:
        sock.connect(address)
        rows = np.zeros((1, 64), np.float32)
        sock.send_multipart(encode_call(CallHeader(5, 0, ((4, 1),), "float32", "whatever"), rows, "not-the-secret"))
        assert sock.poll(10_000), "the replica did not answer"
        answer = decode_answer(sock.recv_multipart())
        assert answer.error == "refused" and "secret" in answer.message, answer
    finally:
        sock.close(linger=0)
        context.term()


def test_a_replica_killed_under_load_is_left_for_the_other(cluster):
    """Calls to experts-0-3 (2 replicas) while one of its replicas is killed: every answer right, the
    router resent calls (channel retries), and the deployment is whole again later."""
    import ray

    router = cluster["router"]
    retries_before = router.stats.remote().result()["transport"]["channel"]["retries"]
    stop = time.monotonic() + 8.0
    wrong, done = [], []

    def client(seed):
        i = 0
        while time.monotonic() < stop:
            x = _x(16, seed * 1000 + i)
            y = router.forward.remote(x.numpy(), i % 2).result()
            expected = reference_forward(cluster["model"], x, i % 2)
            if not torch.allclose(torch.from_numpy(np.array(y)), expected, rtol=1e-5, atol=1e-5):
                wrong.append(i)
            done.append(i)
            i += 1

    with ThreadPoolExecutor(4) as pool:
        clients = [pool.submit(client, s) for s in range(4)]
        time.sleep(2.0)
        names = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
                 if "#experts-0-3#" in a["name"] and a["name"].startswith("SERVE_REPLICA::chan#")]
        assert len(names) == 2, names
        ray.kill(ray.get_actor(names[0], namespace="serve"), no_restart=True)
        for c in clients:
            c.result()
    channel = router.stats.remote().result()["transport"]["channel"]
    assert not wrong and len(done) > 20, (wrong, len(done))
    assert channel["retries"] > retries_before, channel
    # The router reads the running replicas when it calls the deployment (at most once a second).
    wait_until(lambda: _check(cluster, 5, 3, 1) is None and len(
        router.stats.remote().result()["transport"]["channel"]["replicas"].get("experts-0-3", [])) == 2,
        timeout=90, what="the replacement used on the channel")
    assert router.stats.remote().result()["transport"]["channel"]["dropped"] >= 1
