"""ChannelClient against ChannelServers in this process (real ZeroMQ sockets on 127.0.0.1, no Ray).

The running replicas that Serve would report are given by hand (`running_replicas` patched). A
healthy replica answers; a busy or silent one is left for another (retries counted, the silent
one's late answer dropped); when no replica can be reached, `call` returns None (the caller's
Serve handle path); an expert's failure is an ExpertComputeError, not retried.
"""

import asyncio
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from moe_cluster.serving import channel as channel_module
from moe_cluster.serving.channel import ChannelClient
from moe_cluster.serving.channel_server import ChannelServer
from moe_cluster.serving.errors import ExpertComputeError

SECRET = "unit-secret"


def _run(scenario):
    return asyncio.run(asyncio.wait_for(scenario(), 30))


async def _servers(monkeypatch, *handlers, max_waiting=64):
    """One ChannelServer per handler, each computing on a math thread of its own as a replica does."""
    servers = [ChannelServer("127.0.0.1", SECRET, h, ThreadPoolExecutor(1), max_waiting) for h in handlers]
    metadata = {f"r{i}": {"channel": s.address} for i, s in enumerate(servers)}
    monkeypatch.setattr(channel_module, "running_replicas", lambda handle: dict(metadata))
    return servers, metadata


def _double(header, rows):
    return rows * 2


def _call(client, rows, deadline_s=10.0):
    return client.call("g", None, 0, [(1, rows.shape[0])], rows, "float32", "fp", time.monotonic() + deadline_s)


def test_answers_from_the_replica(monkeypatch):
    async def scenario():
        servers, _ = await _servers(monkeypatch, _double)
        client = ChannelClient(SECRET)
        rows = np.arange(8, dtype=np.float32).reshape(2, 4)
        out = await _call(client, rows)
        np.testing.assert_array_equal(out, rows * 2)
        assert all(a.startswith("tcp://127.0.0.1:") for a in client.stats()["replicas"]["g"])
        client.close()
        for s in servers:
            s.close()
        return client.stats()

    stats = _run(scenario)
    assert stats["answers"] == 1 and stats["retries"] == 0


def test_a_silent_replica_is_left_for_another_and_its_late_answer_dropped(monkeypatch):
    release = threading.Event()

    def silent(header, rows):
        release.wait(10)
        return rows * 3  # a wrong answer: it must never be used

    async def scenario():
        servers, _ = await _servers(monkeypatch, silent, _double)
        client = ChannelClient(SECRET, silent_s=0.3)
        rows = np.ones((3, 4), np.float32)
        # Two calls at once: the second goes to the replica the first did not take, so one meets the silent one.
        outs = await asyncio.gather(_call(client, rows), _call(client, rows))
        release.set()
        await asyncio.sleep(0.3)
        for out in outs:
            np.testing.assert_array_equal(out, rows * 2)
        stats = client.stats()
        client.close()
        for s in servers:
            s.close()
        return stats

    stats = _run(scenario)
    assert stats["retries"] >= 1 and stats["silent"] >= 1 and stats["late"] >= 1, stats


def test_busy_replicas_and_no_replica_fall_back(monkeypatch):
    async def scenario():
        servers, metadata = await _servers(monkeypatch, _double, max_waiting=0)  # refuses every call: busy
        client = ChannelClient(SECRET)
        out = await _call(client, np.ones((1, 4), np.float32))
        busy = client.stats()
        metadata.clear()  # Serve runs no replica any more
        client._refreshed.clear()
        none = await _call(client, np.ones((1, 4), np.float32))
        stats = client.stats()
        client.close()
        servers[0].close()
        return out, busy, none, stats

    out, busy, none, stats = _run(scenario)
    assert out is None and busy["busy"] == 1 and busy["fallback"] == 1
    assert none is None and stats["dropped"] == 1 and stats["replicas"] == {"g": []}


def test_an_expert_failure_is_not_retried(monkeypatch):
    def broken(header, rows):
        raise RuntimeError("exploded")

    async def scenario():
        servers, _ = await _servers(monkeypatch, broken, broken)
        client = ChannelClient(SECRET)
        try:
            with pytest.raises(ExpertComputeError, match="exploded"):
                await _call(client, np.ones((1, 4), np.float32))
            return client.stats()
        finally:
            client.close()
            for s in servers:
                s.close()

    assert _run(scenario)["retries"] == 0


def test_auto_sends_calls_up_to_channel_max_bytes_on_the_channel():
    from moe_cluster.serving.args import AppArgs
    from moe_cluster.serving.transport import Transport, uses_channel

    assert AppArgs().transport == "auto" and AppArgs().channel_max_bytes == 4 * 2**20  # docs/channel.md: crossover
    assert uses_channel("auto", 4 * 2**20) and uses_channel("channel", 0)
    assert not uses_channel("auto", 0) and not uses_channel("by_value", 2**20) and not uses_channel("nixl", 2**20)
    transport = Transport("auto")
    assert not transport.use_channel(10) and "channel" not in transport.paths()  # no ChannelClient: never
    transport.channel, transport.channel_max_bytes = object(), 1000
    assert transport.use_channel(1000) and not transport.use_channel(1001)
    assert transport.by_value(1001) and transport.paths() == {"by_value": 0, "object_store": 0, "channel": 1}
    forced = Transport("channel")
    forced.channel = object()
    assert forced.use_channel(2**30) and forced.paths()["channel"] == 1
