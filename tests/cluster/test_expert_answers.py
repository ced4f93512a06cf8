"""Broken, raising and dying expert deployments on a real local cluster: a clear error or the
right answer, never a partial output.

One local Ray cluster for the module (tiny preset, one checkpoint), small apps, each a router
and ONE expert deployment hosting every (layer, expert) (see broken_experts.py):
  good:        the real ExpertServer
  short-rows, wrong-d, wrong-dtype: answer [N - 1, D], [N, D - 1], float16 to a float32 model
  raises:      raises on every call
  dies-once:   two replicas; the first forward call kills its replica (os._exit)
"""

import json
import re
import time
import urllib.request

import pytest
import torch

from moe_cluster import MoEModel, preset_config
from moe_cluster.checkpoint import load_model, save_model
from moe_cluster.client import MoEClient, MoEHTTPError
from moe_cluster.core.reference import reference_forward

from ..support.broken_experts import DIED_MARKER, DiesOnce, Raises, ShortRows, WrongD, WrongDtype, expert_app
from .conftest import start_local_serve, stop_local_serve

# name: (deployment class, (rows, D, dtype) it answers to `rows` rows sent)
BROKEN = {"short-rows": (ShortRows, lambda rows: (rows - 1, 64, "float32")),
          "wrong-d": (WrongD, lambda rows: (rows, 63, "float32")),
          "wrong-dtype": (WrongDtype, lambda rows: (rows, 64, "float16"))}
WRONG_ANSWER = re.compile(r"with an array of shape \[(\d+), (\d+)\] and dtype (\w+); "
                          r"expected a numpy array of shape \[(\d+), 64\] \(the rows sent, d_model\) and dtype float32")
REQUEST_TIMEOUT_S = 20.0


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    from ray import serve

    from moe_cluster.serving.app import build_app

    checkpoint = tmp_path_factory.mktemp("ckpt")
    save_model(MoEModel.random(preset_config("tiny"), seed=11), checkpoint)
    markers = tmp_path_factory.mktemp("markers")
    common = {"checkpoint": str(checkpoint), "torch_threads": 1, "request_timeout_s": REQUEST_TIMEOUT_S}
    local = start_local_serve()
    try:
        serve.run(build_app({**common, "placement": [{"name": "all-experts", "experts": list(range(8))}]}),
                  name="good", route_prefix="/good")
        for name, (expert_class, _) in BROKEN.items():
            serve.run(expert_app(common, name, expert_class), name=name, route_prefix=f"/{name}")
        serve.run(expert_app(common, "raises", Raises), name="raises", route_prefix="/raises")
        # Two replicas: the retry finds the live one at once. Health checks every second: Serve
        # replaces the dead one soon (it is not needed for the answer).
        serve.run(expert_app(common, "dies-once", DiesOnce, str(markers),
                             options={"num_replicas": 2, "health_check_period_s": 1}),
                  name="dies-once", route_prefix="/dies-once")
        yield {"model": load_model(checkpoint), "local": local, "markers": markers}
    finally:
        stop_local_serve()


def _x(tokens, seed):
    return torch.randn(tokens, 64, generator=torch.Generator().manual_seed(seed))


def _retries(cluster, app):
    """Expert calls the app's router sent again after a replica failure, from GET /v1/stats."""
    with urllib.request.urlopen(cluster["local"].url(f"/{app}/v1/stats"), timeout=30) as response:
        stats = json.load(response)
    return sum(expert["retries"] for expert in stats["experts"])


@pytest.mark.parametrize("name", sorted(BROKEN))
def test_a_wrong_answer_fails_the_request_over_http(cluster, name):
    x = _x(9, seed=1)
    with pytest.raises(MoEHTTPError) as info:
        MoEClient(cluster["local"].url(f"/{name}")).forward(x.numpy(), layer=0)
    assert info.value.status == 500
    message = info.value.message
    assert f"ExpertComputeError: expert deployment '{name}' answered (layer 0, experts [" in message
    answer = WRONG_ANSWER.search(message)
    assert answer, message
    rows_sent = int(answer[4])  # one call carries every routed row: the deployment hosts every expert
    _, broken = BROKEN[name]
    assert rows_sent == 9 * 2 and (int(answer[1]), int(answer[2]), answer[3]) == broken(rows_sent)


@pytest.mark.parametrize("name", sorted(BROKEN))
def test_a_wrong_answer_fails_the_request_through_the_handle(cluster, name):
    from ray import serve

    from moe_cluster.serving.errors import ExpertComputeError

    with pytest.raises(ExpertComputeError, match=rf"expert deployment '{name}' answered \(layer 1, experts \[[\d, ]+\]\)"):
        serve.get_app_handle(name).forward.remote(_x(5, seed=2), 1).result()


def test_a_replica_that_dies_mid_call_is_retried_and_the_answer_is_right(cluster):
    marker = cluster["markers"] / DIED_MARKER
    assert not marker.exists() and _retries(cluster, "dies-once") == 0
    x = _x(40, seed=3)
    y = MoEClient(cluster["local"].url("/dies-once")).forward(x.numpy(), layer=1)
    assert marker.exists(), "no replica died: the test did not test a failure"
    torch.testing.assert_close(torch.from_numpy(y), reference_forward(cluster["model"], x, 1), rtol=1e-5, atol=1e-5)
    assert _retries(cluster, "dies-once") >= 1
    # The next request finds a live replica and answers right, without new deaths.
    x = _x(7, seed=4)
    y = MoEClient(cluster["local"].url("/dies-once")).forward(x.numpy(), layer=0)
    torch.testing.assert_close(torch.from_numpy(y), reference_forward(cluster["model"], x, 0), rtol=1e-5, atol=1e-5)


def test_an_expert_that_raises_gets_a_500_at_once_without_retries(cluster):
    from ray import serve

    from moe_cluster.serving.errors import ExpertComputeError

    expert = serve.get_deployment_handle("raises", app_name="raises")
    x = _x(6, seed=5)
    raised_before = expert.stats.remote().result()["raised"]
    started = time.monotonic()
    with pytest.raises(MoEHTTPError) as info:
        MoEClient(cluster["local"].url("/raises")).forward(x.numpy(), layer=0)
    elapsed_s = time.monotonic() - started
    assert info.value.status == 500  # not the 503 of an expert that stayed unavailable after retries
    assert "expert deployment 'raises' failed on (layer 0, experts [" in info.value.message
    assert "after 1 attempt(s)" in info.value.message and "deliberate failure of test expert" in info.value.message
    assert elapsed_s < REQUEST_TIMEOUT_S / 2  # retries would go on until the request's deadline
    raised = expert.stats.remote().result()["raised"] - raised_before
    assert raised == 1  # one call for the deployment (it hosts every expert), not sent twice
    with pytest.raises(ExpertComputeError, match="expert deployment 'raises' failed on"):
        serve.get_app_handle("raises").forward.remote(x, 1).result()
    assert _retries(cluster, "raises") == 0


def test_the_cluster_keeps_serving(cluster):
    """After the failures: the broken apps still answer with the same clear error, the good app right."""
    from ray import serve

    for name in [*BROKEN, "raises"]:
        with pytest.raises(MoEHTTPError) as info:
            MoEClient(cluster["local"].url(f"/{name}")).forward(_x(3, seed=6).numpy(), layer=1)
        assert info.value.status == 500 and f"expert deployment '{name}'" in info.value.message
    x = _x(33, seed=7)
    for layer in (0, 1):
        expected = reference_forward(cluster["model"], x, layer)
        y_http = MoEClient(cluster["local"].url("/good")).forward(x.numpy(), layer=layer)
        torch.testing.assert_close(torch.from_numpy(y_http), expected, rtol=1e-5, atol=1e-5)
        y_handle = serve.get_app_handle("good").forward.remote(x, layer).result()
        torch.testing.assert_close(y_handle, expected, rtol=1e-5, atol=1e-5)
