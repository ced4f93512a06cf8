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
MAX_MESSAGE_BYTES = 2**20


def _run(scenario):
    return asyncio.run(asyncio.wait_for(scenario(), 30))


async def _servers(monkeypatch, *handlers, max_waiting=64):
    """One ChannelServer per handler, each computing on a math thread of its own as a replica does."""
    servers = [ChannelServer("127.0.0.1", SECRET, h, ThreadPoolExecutor(1, thread_name_prefix="math"),
                             threading.RLock(), MAX_MESSAGE_BYTES, max_waiting) for h in handlers]
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
    from moe_cluster.serving.args import uses_channel
    from moe_cluster.serving.transport import Transport

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


def test_an_idle_replica_computes_on_the_socket_thread_and_a_busy_one_queues_counted(monkeypatch):
    """Idle math and quick calls: the socket thread computes the call itself (no hand-off). The math
    busy (its lock held by another computation) or the previous call slow: the call waits for the math
    thread, counted in `waiting` (autoscaling sees it) while the socket thread goes on receiving."""
    from moe_cluster.serving import channel_server

    # A quick call must stay under the limit even on a loaded machine (a 5 ms preemption would send the next call
    # to the math thread): a limit of 200 ms here, and a slow call of 400 ms.
    monkeypatch.setattr(channel_server, "INLINE_MAX_S", 0.2)
    INLINE_MAX_S = channel_server.INLINE_MAX_S

    threads, delay_s, server = [], {"s": 0.0}, None

    def record(header, rows):
        with server._math_lock:  # as ExpertServer._compute: every computation holds the replica's math lock
            threads.append(threading.current_thread().name)
            time.sleep(delay_s["s"])
            return rows * 2

    async def scenario():
        nonlocal server
        servers, _ = await _servers(monkeypatch, record)
        server, client = servers[0], ChannelClient(SECRET)
        rows = np.ones((1, 4), np.float32)
        try:
            await _call(client, rows)  # idle: on the socket thread
            server._math_lock.acquire()  # another computation holds the math: the call waits for the math thread
            waiting = asyncio.ensure_future(_call(client, rows))
            for _ in range(200):
                await asyncio.sleep(0.01)
                if server.stats()["waiting"] == 1:
                    break
            seen_waiting = server.stats()["waiting"]
            server._math_lock.release()
            await waiting
            delay_s["s"] = 2 * INLINE_MAX_S
            await _call(client, rows)  # idle, slow: on the socket thread (the previous call was quick)
            delay_s["s"] = 0.0
            await _call(client, rows)  # after a slow call: the math thread
            await _call(client, rows)  # quick again: the socket thread
            return seen_waiting, server.stats()
        finally:
            client.close()
            server.close()

    seen_waiting, stats = _run(scenario)
    assert seen_waiting == 1 and stats["waiting"] == 0 and stats["answered"] == 5, stats
    assert [name.startswith("math") for name in threads] == [False, True, False, True, False], threads
    assert stats["inline"] == 3


def test_a_frame_larger_than_any_call_is_dropped_unread(monkeypatch):
    """The socket listens on the node's address: ZeroMQ drops a frame over max_message_bytes (and that
    connection) before the replica holds it; calls of the right size still answer."""
    import zmq

    async def scenario():
        servers, _ = await _servers(monkeypatch, _double)
        server = servers[0]
        context = zmq.Context()
        rogue = context.socket(zmq.DEALER)
        rogue.setsockopt(zmq.LINGER, 0)
        rogue.connect(server.address)
        rogue.send_multipart([b"header", b"x" * (MAX_MESSAGE_BYTES + 1)])
        await asyncio.sleep(0.5)
        received = server.stats()["calls"]
        client = ChannelClient(SECRET)
        out = await _call(client, np.ones((2, 4), np.float32))
        client.close()
        rogue.close()
        context.term()
        server.close()
        return received, out

    received, out = _run(scenario)
    assert received == 0  # never read: not even refused
    np.testing.assert_array_equal(out, np.full((2, 4), 2, np.float32))

