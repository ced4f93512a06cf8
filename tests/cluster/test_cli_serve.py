"""`moe-cluster init` + `moe-cluster serve` as a user runs them: a real process, real HTTP."""

import json
import signal
import subprocess
import sys
import urllib.request

import numpy as np
import pytest
import torch

from moe_cluster import MoEModel
from moe_cluster.client import MoEClient, MoEHTTPError

from .conftest import free_port, stop_process, wait_until
from moe_cluster.checkpoint import load_model


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    checkpoint = tmp_path_factory.mktemp("cli") / "tiny"
    cli = [sys.executable, "-m", "moe_cluster.cli"]
    subprocess.run([*cli, "init", str(checkpoint), "--preset", "tiny", "--seed", "21"], check=True)
    port = free_port()
    log = open(tmp_path_factory.mktemp("log") / "serve.log", "w+")
    process = subprocess.Popen([*cli, "serve", "--checkpoint", str(checkpoint), "--port", str(port)],
                               stdout=log, stderr=subprocess.STDOUT)
    client = MoEClient(f"http://127.0.0.1:{port}")
    try:
        client.wait_ready(timeout=240)
        yield {"client": client, "model": load_model(checkpoint), "process": process, "log": log, "port": port}
    finally:
        stop_process(process)


def test_serve_prints_where_it_listens(server):
    def printed():
        server["log"].seek(0)
        return f"listening on http://127.0.0.1:{server['port']}/" in server["log"].read()

    wait_until(printed, timeout=30, what="the 'listening on' line")  # /healthz may answer first


@pytest.mark.parametrize("wire", ["json", "msgpack"])
def test_forward_equals_the_loaded_model(server, wire):
    x = np.random.default_rng(0).standard_normal((40, 64)).astype(np.float32)
    for layer in (0, 1):
        expected = server["model"].forward(torch.from_numpy(x), layer).numpy()
        np.testing.assert_allclose(server["client"].forward(x, layer, wire=wire), expected, rtol=1e-5, atol=1e-5)


def test_malformed_requests_then_correct_answers(server):
    url = f"http://127.0.0.1:{server['port']}/v1/forward"
    for body, content_type in [(b"{not json", "application/json"), (b"\xc1", "application/msgpack"),
                               (json.dumps({"hidden_states": [[1.0] * 10]}).encode(), "application/json")]:
        request = urllib.request.Request(url, data=body, headers={"Content-Type": content_type})
        with pytest.raises(urllib.error.HTTPError) as caught:
            urllib.request.urlopen(request)
        assert caught.value.code == 400 and "error" in json.loads(caught.value.read())
    with pytest.raises(MoEHTTPError, match="unknown layer 9"):
        server["client"].forward(np.zeros((1, 64), np.float32), layer=9)
    x = np.ones((3, 64), np.float32)
    np.testing.assert_allclose(server["client"].forward(x), server["model"].forward(torch.from_numpy(x)).numpy(),
                               rtol=1e-5, atol=1e-5)


def test_sigterm_shuts_down_cleanly(server):
    process = server["process"]
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=60) == 0
    server["log"].seek(0)
    assert "moe-cluster: stopped" in server["log"].read()
    assert not server["client"].healthy()
