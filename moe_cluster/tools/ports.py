"""Picking a free local port for a Serve HTTP server (tests, scripts, benchmarks)."""

from __future__ import annotations

import random

from ..serving.runtime import PortBusyError, check_port_free

__all__ = ["free_port"]

LOW, HIGH = 20000, 32767


def free_port() -> int:
    """A free port in 20000-32767 on 127.0.0.1.

    Not `bind(0)`: that returns a port of the ephemeral range, which the kernel may give to
    one of the processes Ray starts before Serve binds it ("Failed to bind"). 20000-32767
    is below Linux's ephemeral range and above Ray's worker ports (10002-19999).
    """
    for _ in range(200):
        port = random.randint(LOW, HIGH)
        try:
            check_port_free("127.0.0.1", port)  # the bind Serve's proxy will make
        except PortBusyError:
            continue
        return port
    raise RuntimeError(f"no free port in {LOW}-{HIGH}; pass a port explicitly")
