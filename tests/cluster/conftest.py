"""Shared helpers for cluster-tier tests: one real local Ray cluster + Serve per test module."""

import signal
import subprocess
import time
from dataclasses import dataclass

import pytest

from moe_cluster.ports import free_port  # noqa: F401 - the tests import it from here

pytestmark = pytest.mark.cluster


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
    """ray.init + serve.start on a free port. Stop with stop_local_serve()."""
    import ray
    from ray import serve

    port = free_port()
    ray.init(num_cpus=2, num_gpus=num_gpus, include_dashboard=False, log_to_driver=False,
             **init_kwargs)
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    return LocalServe(port)


def stop_local_serve() -> None:
    import ray
    from ray import serve

    try:
        serve.shutdown()
    finally:
        ray.shutdown()


def wait_until(predicate, timeout: float, interval: float = 0.5, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} not reached within {timeout}s")
        time.sleep(interval)
