"""Where replicas run and how a local cluster starts: the device and torch threads of a replica,
and the one copy of starting/stopping a local Ray cluster with Serve (used by `moe-cluster serve`,
`generate`, `bench`, the tests and the scripts).

Ray posts usage statistics to the internet a minute after a cluster starts unless
`RAY_USAGE_STATS_ENABLED=0`; a cluster started here keeps them off unless the user set the
variable themselves (their choice is kept). Ray's processes inherit this process's
environment, so setting it before `ray.init` is enough.
"""

from __future__ import annotations

import os
import socket
import sys
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

__all__ = ["pick_device", "set_torch_threads", "start_local_serve", "stop_local_serve",
           "check_port_free", "PortBusyError"]


def pick_device() -> "torch.device":
    """CUDA if this actor was given a GPU and CUDA works here; else CPU (fake GPUs included)."""
    import ray
    import torch

    if ray.get_gpu_ids() and torch.cuda.is_available():
        return torch.device("cuda")
    return torch.device("cpu")


def set_torch_threads(threads: int | None) -> None:
    """torch's intra-op threads of this process; None keeps Ray's default (1 per replica)."""
    if threads is not None:
        import torch

        torch.set_num_threads(threads)


class PortBusyError(OSError):
    """The HTTP port that Serve's proxy would listen on is taken (checked before Ray starts)."""

    def __init__(self, host: str, port: int, reason: str) -> None:
        super().__init__(f"port {port} on {host} is already in use ({reason})")
        self.host = host
        self.port = port


def keep_usage_stats_local() -> None:
    """RAY_USAGE_STATS_ENABLED=0 unless the user set it: no traffic leaves the machine."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


def check_port_free(host: str, port: int) -> None:
    """Raise PortBusyError unless (host, port) can be bound now.

    The bind is the one Serve's proxy makes (ray/serve/_private/http_util.py: no SO_REUSEADDR,
    IPv6 for an IPv6 host). Without this check a busy port costs ~30 s and a long traceback:
    Ray and the proxy start first, and the proxy's bind fails inside an actor. A port outside
    1..65535 is a ValueError (0 would let the proxy pick one that nobody is told about).
    """
    if not 1 <= port <= 65535:
        raise ValueError(f"port {port} is not a TCP port: use one in 1..65535 (e.g. 8100)")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((host, port))
        except OSError as exc:
            raise PortBusyError(host, port, exc.strerror or str(exc)) from None


def start_local_serve(http: tuple[str, int] | None, num_cpus: int | None = None, num_gpus: int | None = None,
                      log_to_driver: bool = False, access_log: bool = True, **init_kwargs: Any) -> None:
    """ray.init (a new local cluster, no dashboard) + serve.start.

    http: (host, port) of Serve's HTTP proxy, or None for handles only (no proxy). A busy
    port raises PortBusyError before Ray starts.
    access_log: False keeps Serve's per-request access log lines out (benchmarks).
    Stop with stop_local_serve().
    """
    if http is not None:
        check_port_free(*http)
    keep_usage_stats_local()
    import ray
    from ray import serve

    ray.init(num_cpus=num_cpus, num_gpus=num_gpus, include_dashboard=False, log_to_driver=log_to_driver,
             **init_kwargs)
    try:
        logging_config = None if access_log else {"enable_access_log": False}
        if http is None:
            serve.start(proxy_location="Disabled", logging_config=logging_config)
        else:
            host, port = http
            serve.start(http_options={"host": host, "port": port}, logging_config=logging_config)
    except BaseException:
        ray.shutdown()
        raise


def stop_local_serve(graceful: bool = True) -> None:
    """Shut Serve down (its replicas drain), then ray.shutdown (the latter even if the former fails).

    graceful=False skips Serve's shutdown: ray.shutdown alone ends every process of the local
    cluster this process started, replicas included, in about a second (an interrupted start-up,
    where Serve's shutdown would wait for replicas still being created)."""
    import ray

    try:
        if graceful:
            _shutdown_serve()
    finally:
        ray.shutdown()


def _shutdown_serve(timeout_s: float = 30.0) -> None:
    """What serve.shutdown() does (ray/serve/_private/client.py, Ray 2.60), minus a false warning.

    Serve's controller answers `graceful_shutdown` by deleting every app and then killing
    itself: the call never returns, it fails with the controller's death, which the client
    expects. The controller actor has max_task_retries=-1, so with serve.shutdown() Ray
    reports that failure as a retriable one and prints "(raylet) Task
    ServeController.graceful_shutdown failed. There are infinite retries remaining" on the
    driver's stdout at every clean stop. The same call with max_task_retries=0 ends with
    the same ActorDiedError, quietly (tests/cluster/test_cli_serve.py checks the stop's
    output). Uses Serve's client internals (ray.serve.context); should a Ray upgrade drop
    them, this falls back to serve.shutdown() and only the warning comes back.
    """
    import ray
    from ray import serve
    from ray.serve import context

    if not ray.is_initialized():  # nothing to stop (and looking Serve up would start a Ray instance)
        return
    client = context._get_global_client(raise_if_no_controller_running=False)
    controller = getattr(client, "_controller", None)
    if client is None or controller is None or not hasattr(client, "shutdown_cached_handles"):
        serve.shutdown()
        return
    client.shutdown_cached_handles()
    try:
        ray.get(controller.graceful_shutdown.options(max_task_retries=0).remote(), timeout=timeout_s)
    except ray.exceptions.RayActorError:
        pass  # the controller exited after deleting every app: Serve is down
    except ray.exceptions.GetTimeoutError:
        print(f"moe-cluster: Serve's controller did not shut down within {timeout_s:.0f}s; stopping Ray anyway",
              file=sys.stderr, flush=True)
    context._disconnect()

