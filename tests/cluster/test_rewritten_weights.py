"""A served checkpoint directory rewritten with another model: never an answer that mixes the two.

One app serves a tiny Mixtral (A) imported into DIR. `moe-cluster import-hf --force` then writes
another Mixtral of the same shape (B, another seed) into DIR, and the expert replica is killed (as a
crash would). Its replacement is built with the app's arguments, digests of A's files included: it
finds B's files, refuses to start, and Serve's status says why. Meanwhile a client keeps asking:
every answer is A's exactly, or an error.
"""

import threading
import time

import pytest
import torch

from moe_cluster.cli import main

from ..support.hf_models import build_hf, moe_blocks
from .conftest import start_local_serve, stop_local_serve, wait_until

APP = "rewritten"


@pytest.fixture(scope="module")
def local_serve():
    yield start_local_serve()
    stop_local_serve()


def _expert_replicas(app: str, deployment: str) -> list[str]:
    """Names of the replica actors of `deployment` (RAY-NOTES: list_named_actors needs no dashboard)."""
    import ray

    prefix = f"SERVE_REPLICA::{app}#{deployment}#"
    return [a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if a["name"].startswith(prefix)]


def _status_message(app: str, deployment: str) -> str:
    from ray import serve

    application = serve.status().applications.get(app)
    return application.deployments[deployment].message if application else ""


class Client(threading.Thread):
    """Asks layer 0 for x_TD again and again until stopped: ("ok", y_TD) or ("error", message) each time."""

    def __init__(self, handle, x_TD: torch.Tensor) -> None:
        super().__init__(daemon=True)
        self.handle, self.x_TD = handle, x_TD
        self.answers: list[tuple[str, object]] = []
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            try:
                self.answers.append(("ok", self.handle.forward.remote(self.x_TD, 0).result(timeout_s=20)))
            except Exception as exc:  # noqa: BLE001 - an error is an allowed answer; a wrong tensor is not
                self.answers.append(("error", str(exc)))
            time.sleep(0.05)


def test_a_replacement_replica_refuses_weights_rewritten_under_its_app(local_serve, tmp_path):
    import ray
    from ray import serve

    from moe_cluster.serving.app import build_app

    models = {}
    for name, seed in (("a", 0), ("b", 1)):
        models[name] = build_hf("mixtral", seed=seed)
        models[name].save_pretrained(tmp_path / f"hf-{name}")
    served = tmp_path / "served"
    assert main(["import-hf", str(tmp_path / "hf-a"), str(served)]) == 0
    experts = {"name": "experts", "experts": [0, 1, 2, 3], "options": {"health_check_period_s": 1}}
    handle = serve.run(build_app(dict(checkpoint=str(served), torch_threads=1, request_timeout_s=5,
                                      placement=[experts])), name=APP, route_prefix=None)
    try:
        x_TD = torch.randn(8, 32, generator=torch.Generator().manual_seed(3))
        blocks = {name: moe_blocks(model)[0] for name, model in models.items()}
        with torch.no_grad():
            expected = {name: block(x_TD.view(1, 8, 32)).view(8, 32) for name, block in blocks.items()}
        y_a = handle.forward.remote(x_TD, 0).result(timeout_s=30)
        torch.testing.assert_close(y_a, expected["a"], rtol=1e-5, atol=1e-5)
        assert (expected["a"] - expected["b"]).abs().max() > 0.1  # a mixed answer would show

        client = Client(handle, x_TD)
        client.start()
        assert main(["import-hf", str(tmp_path / "hf-b"), str(served), "--force"]) == 0
        time.sleep(1.0)  # the running replica keeps A's weights in memory: still A's answers
        (replica,) = _expert_replicas(APP, "experts")
        ray.kill(ray.get_actor(replica, namespace="serve"), no_restart=True)
        message = wait_until(lambda: "sha256" in _status_message(APP, "experts") and _status_message(APP, "experts"),
                             timeout=90, what="the replacement expert replica refusing B's weights")
        time.sleep(2.0)  # more calls while the deployment has no replica that will start
        client.stop.set()
        client.join(timeout=60)
    finally:
        serve.delete(APP)

    assert "experts/expert-00000.safetensors has sha256" in message, message
    assert "import-hf --force" in message, message
    oks = [y for kind, y in client.answers if kind == "ok"]
    errors = [e for kind, e in client.answers if kind == "error"]
    assert oks, client.answers  # answers before the kill
    for y_TD in oks:
        assert torch.equal(y_TD, y_a), "an answer that is not model A's: the two models were mixed"
    assert errors, "no call failed although the expert deployment had no replica for seconds"
