"""Losing a whole node: a multi-node Ray cluster whose expert node crashes under load (slow).

    pytest -m slow -s tests/cluster/test_faults_multinode.py      # ~70 s on 2 cores

Three raylets on this machine (`ray.cluster_utils.Cluster`): the head runs Serve's
controller, the HTTP proxy and the router (custom resource `router_node`); the expert
deployments need `expert_node`, which only worker nodes have. Both expert deployments
start on node A. Node B joins (spare capacity, as a cloud autoscaler would add), then node
A is killed without warning while four clients send requests. Serve restarts the experts
on node B; the router retries the failed calls meanwhile. Every answer must equal the
oracle, failures may only be clear 503/504s, and the service must answer again within
the measured recovery time (printed with -s).

The rows travel on the expert replicas' direct channels (`transport: channel`, serving/channel.py)
across raylets: the router's connections to node A's replicas drop when it dies, their calls go
again (to node B's replicas once Serve starts them, or Serve's handle path meanwhile), and the
router's stats show the calls on the channel, the retries and the replicas it dropped. Every
channel binds 127.0.0.1 (all three raylets are on this machine; a real cluster takes the
node address Ray reports).
"""

import os
import tempfile
import time

import pytest

from moe_cluster import MoEModel, preset_config

from .conftest import free_port, wait_until
from ..support.loadgen import Load, first_success_after, request_pool, summarize
from moe_cluster.checkpoint import load_model, save_model

pytestmark = pytest.mark.slow

RECOVERY_LIMIT_S = 90.0  # node death detection (~15 s) + a replica start on a busy machine (~15-30 s)
ARGS = {
    "torch_threads": 1, "transport": "channel", "channel_host": "127.0.0.1",
    "router": {"ray_actor_options": {"num_cpus": 0, "resources": {"router_node": 0.1}}},
    "experts": {"health_check_period_s": 1, "health_check_timeout_s": 5,
                "ray_actor_options": {"num_cpus": 0, "resources": {"expert_node": 0.1}}},
    "placement": [{"name": "experts-0-3", "experts": [0, 1, 2, 3]}, {"name": "experts-4-7", "experts": [4, 5, 6, 7]}],
}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    import ray
    from ray import serve
    from ray.cluster_utils import Cluster

    from moe_cluster.serving.app import build_app

    checkpoint = tmp_path_factory.mktemp("ckpt")
    save_model(MoEModel.random(preset_config("tiny"), seed=11), checkpoint)
    # A short directory of our own (Ray's socket paths live under it); Ray also writes the
    # cluster address to $RAY_TMPDIR/ray, which must exist.
    old_tmpdir = os.environ.get("RAY_TMPDIR")
    os.environ["RAY_TMPDIR"] = tempfile.mkdtemp(prefix="rt", dir="/tmp")
    temp_dir = os.path.join(os.environ["RAY_TMPDIR"], "ray")
    os.makedirs(temp_dir)
    nodes = None
    try:
        nodes = Cluster(initialize_head=True, head_node_args={
            "num_cpus": 2, "resources": {"router_node": 1}, "temp_dir": temp_dir, "include_dashboard": False})
        node_a = nodes.add_node(num_cpus=1, resources={"expert_node": 1})
        ray.init(address=nodes.address, log_to_driver=False)
        port = free_port()
        serve.start(proxy_location="HeadOnly", http_options={"host": "127.0.0.1", "port": port})
        serve.run(build_app({**ARGS, "checkpoint": str(checkpoint)}), name="moe", route_prefix="/")
        yield {"nodes": nodes, "node_a": node_a, "url": f"http://127.0.0.1:{port}",
               "model": load_model(checkpoint)}
    finally:
        _shutdown(nodes)
        if old_tmpdir is None:  # leave the environment as it was for the next test module
            os.environ.pop("RAY_TMPDIR", None)
        else:
            os.environ["RAY_TMPDIR"] = old_tmpdir


def _shutdown(nodes) -> None:
    """Serve, the driver's connection and every node of the cluster, whatever got started."""
    import ray
    from ray import serve

    try:
        if ray.is_initialized():
            serve.shutdown()
    finally:
        ray.shutdown()
        if nodes is not None:
            nodes.shutdown()


def _expert_nodes() -> dict[str, str]:
    """The node id of each expert deployment's replica (from Ray's actor table)."""
    import ray

    out = {}
    for actor in ray._private.state.actors().values():
        name = actor.get("Name") or ""
        if actor["State"] == "ALIVE" and name.startswith("SERVE_REPLICA::moe#experts-"):
            out[name.split("#")[1]] = actor["Address"]["NodeID"]
    return out


def test_the_service_survives_losing_the_expert_node(cluster):
    nodes, node_a = cluster["nodes"], cluster["node_a"]
    assert set(_expert_nodes().values()) == {node_a.node_id}, "the experts should start on node A"
    node_b = nodes.add_node(num_cpus=1, resources={"expert_node": 1})
    nodes.wait_for_nodes()
    pool = request_pool(cluster["model"], seed=2)
    with Load(cluster["url"], pool, clients=4) as load:
        time.sleep(5)  # some normal traffic first
        removed_at = time.monotonic()
        nodes.remove_node(node_a, allow_graceful=False)  # a crash: no goodbye to the GCS
        wait_until(lambda: first_success_after(load.outcomes, removed_at) is not None, timeout=RECOVERY_LIMIT_S,
                   what="a request answered after the node was lost")
        wait_until(lambda: set(_expert_nodes().values()) == {node_b.node_id} and len(_expert_nodes()) == 2,
                   timeout=RECOVERY_LIMIT_S, what="both expert deployments running on node B")
        moved_s = time.monotonic() - removed_at
        time.sleep(10)  # and normal traffic again
    summary = summarize(load.outcomes)
    recovered_s = first_success_after(load.outcomes, removed_at)
    print(f"\nnode A lost under 4 clients: {summary['requests']} requests, success {100 * summary['success_rate']:.2f}%, "
          f"{summary['clear_errors']} clear 503/504; first success of a request sent after the crash "
          f"{recovered_s:.1f}s later; experts running on node B after {moved_s:.1f}s; slowest answer "
          f"{summary['max_s']:.1f}s")
    assert summary["wrong_answers"] == 0 and summary["unclear_count"] == 0, summary["unclear"]
    assert recovered_s <= RECOVERY_LIMIT_S
    late = [o for o in load.outcomes if o.started > removed_at + moved_s + 1]
    assert late and all(o.status == 200 for o in late), "requests after the recovery must all succeed"
    transport = _router_stats(cluster["url"])["transport"]
    channel = transport["channel"]
    print(f"router: calls per path {transport['calls']}, channel {channel}")
    assert transport["mode"] == "channel" and transport["calls"]["channel"] > 0, transport
    assert channel["answers"] > 0 and channel["dropped"] >= 2, channel  # both of node A's replicas left
    assert channel["retries"] + channel["fallback"] > 0, channel  # calls of the lost node went again
    # The router's channels now lead to node B's two replicas only.
    assert sorted(map(len, channel["replicas"].values())) == [1, 1], channel["replicas"]


def _router_stats(url: str) -> dict:
    import json
    import urllib.request

    with urllib.request.urlopen(f"{url}/v1/stats", timeout=30) as response:
        return json.loads(response.read())
