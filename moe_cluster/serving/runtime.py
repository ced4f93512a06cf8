"""Starting and stopping a local Ray cluster with Serve: the one copy used by `moe-cluster serve`,
`generate`, `bench`, the tests and the scripts.

Ray posts usage statistics to the internet a minute after a cluster starts unless
`RAY_USAGE_STATS_ENABLED=0`; a cluster started here keeps them off unless the user set the
variable themselves (their choice is kept). Ray's processes inherit this process's
environment, so setting it before `ray.init` is enough.
"""

from __future__ import annotations

import contextlib
import os
from typing import Any, Iterator

__all__ = ["start_local_serve", "stop_local_serve", "local_serve", "keep_usage_stats_local"]


def keep_usage_stats_local() -> None:
    """RAY_USAGE_STATS_ENABLED=0 unless the user set it: no traffic leaves the machine."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


def start_local_serve(http: tuple[str, int] | None, num_cpus: int | None = None, num_gpus: int | None = None,
                      log_to_driver: bool = False, access_log: bool = True, **init_kwargs: Any) -> None:
    """ray.init (a new local cluster, no dashboard) + serve.start.

    http: (host, port) of Serve's HTTP proxy, or None for handles only (no proxy).
    access_log: False keeps Serve's per-request access log lines out (benchmarks).
    Stop with stop_local_serve().
    """
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


def stop_local_serve() -> None:
    """serve.shutdown, then ray.shutdown (the latter even if the former fails)."""
    import ray
    from ray import serve

    try:
        serve.shutdown()
    finally:
        ray.shutdown()


@contextlib.contextmanager
def local_serve(http: tuple[str, int] | None, **kwargs: Any) -> Iterator[None]:
    """`with local_serve(("127.0.0.1", port)): serve.run(...)`: start_local_serve, then always stop."""
    start_local_serve(http, **kwargs)
    try:
        yield
    finally:
        stop_local_serve()
