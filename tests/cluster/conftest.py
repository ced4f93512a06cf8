"""Shared helpers for cluster-tier tests: one real local Ray cluster + Serve per test module.

Every test under tests/cluster gets the `cluster` marker (below), so `pytest -m "not cluster"`
runs the unit and k8s tiers alone and `pytest -m cluster` this one.
"""

import os
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from moe_cluster.tools.ports import free_port  # noqa: F401 - the tests import it from here
from moe_cluster.serving import runtime

CLUSTER_TIER = Path(__file__).resolve().parent


@pytest.hookimpl(tryfirst=True)  # before pytest's own -m selection sees the items
def pytest_collection_modifyitems(config, items):
    """Mark every test of this directory `cluster` (a `pytestmark` in a conftest is ignored)."""
    for item in items:
        if CLUSTER_TIER in item.path.resolve().parents:
            item.add_marker(pytest.mark.cluster)


def children(pid: int) -> set[int]:
    """The processes whose parent is `pid` (from /proc/*/stat)."""
    found = set()
    for entry in os.listdir("/proc"):
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[1]) == pid:
            found.add(int(entry))
    return found


def stop_process(process: subprocess.Popen, timeout: float = 60) -> None:
    """SIGTERM a server this test started (by PID, never a broad kill), SIGKILL if it hangs."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.kill()


@dataclass
class LocalServe:
    port: int

    def url(self, prefix: str = "") -> str:
        return f"http://127.0.0.1:{self.port}{prefix}"


def start_local_serve(num_gpus: int = 0, **init_kwargs) -> LocalServe:
    """A local Ray cluster + Serve on a free port (moe_cluster.serving.runtime). Stop with stop_local_serve()."""
    port = free_port()
    runtime.start_local_serve(("127.0.0.1", port), num_cpus=2, num_gpus=num_gpus, **init_kwargs)
    return LocalServe(port)


def stop_local_serve() -> None:
    runtime.stop_local_serve()


def wait_until(predicate, timeout: float, interval: float = 0.5, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} not reached within {timeout}s")
        time.sleep(interval)


def triton_client(port: int):
    """A tritonclient HTTP client (a standard OIP v2 client) for the Serve proxy on `port`; close() it."""
    import tritonclient.http as httpclient

    return httpclient.InferenceServerClient(f"127.0.0.1:{port}", network_timeout=120)
