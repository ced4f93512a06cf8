"""Which transport a call of a given size takes (serving/transport.py Transport), and the direct
transport's check of what arrived, without a cluster."""

import asyncio

import pytest
import ray
import torch

from moe_cluster.serving.args import AppArgs
from moe_cluster.serving.transport import (AnswerLost, DirectRows, DirectTransportError, Transport, by_value_limit,
                                           word_checksum)


def test_auto_sends_small_calls_by_value_and_large_ones_through_the_object_store():
    transport = Transport("auto", by_value_max_bytes=1000)
    assert transport.by_value(0) and transport.by_value(1000)
    assert not transport.by_value(1001)


def test_auto_never_goes_past_serves_grpc_limit():
    assert Transport("auto", by_value_max_bytes=2**40).by_value_max_bytes == by_value_limit()
    assert 0 < by_value_limit() < 4 * 2**20 + 1  # Serve's replica gRPC limit is 4 MiB by default


def test_object_store_never_by_value_and_forced_by_value_falls_back_above_the_limit(caplog):
    assert not Transport("object_store").by_value(1)
    forced = Transport("by_value", by_value_max_bytes=10)  # the setting only bounds auto
    assert forced.by_value(by_value_limit())
    assert not forced.by_value(by_value_limit() + 1) and not forced.by_value(by_value_limit() + 2)
    assert sum("over Serve's gRPC message limit" in r.getMessage() for r in caplog.records) == 1  # logged once


def test_a_bad_transport_is_refused_with_the_choices():
    with pytest.raises(ValueError, match="auto, object_store, by_value, nixl, cuda_ipc"):
        Transport("gloo")
    with pytest.raises(ValueError, match="transport"):
        AppArgs.model_validate({"transport": "nccl"})
    assert AppArgs().transport == "auto" and AppArgs().by_value_max_bytes == 2**20


def test_cuda_ipc_on_a_cpu_router_falls_back_to_the_object_store_with_one_log_line(caplog):
    import torch

    transport = Transport("cuda_ipc", device=torch.device("cpu"))
    assert transport.direct is None and not transport.by_value(1)
    assert sum("cannot be used" in r.getMessage() and "CUDA IPC" in r.getMessage() for r in caplog.records) == 1
    packed = transport.pack(torch.zeros(2, 4))
    assert packed.shape == (2, 4)  # numpy of the model dtype, as the object store path sends


def test_nixl_without_nixl_installed_falls_back(caplog, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_nixl(name, *args, **kwargs):
        if name.startswith("nixl"):
            raise ImportError("No module named 'nixl'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_nixl)
    transport = Transport("nixl")
    assert transport.direct is None
    assert any("pip install 'moe-cluster[nixl]'" in r.getMessage() for r in caplog.records)


def test_giving_up_a_direct_transport_is_logged_once(caplog, monkeypatch):
    from moe_cluster.serving import transport as module

    monkeypatch.setattr(module, "direct_unavailable", lambda mode, device: None)
    transport = Transport("nixl")
    assert transport.direct == "nixl" and transport.paths() == {"by_value": 0, "object_store": 0, "nixl": 0}
    transport.give_up_direct("expert could not fetch")
    transport.give_up_direct("again")
    assert transport.direct is None
    assert sum("failed" in r.getMessage() for r in caplog.records) == 1


def test_word_checksum_is_exact_across_dtypes_and_sees_one_changed_word():
    x = torch.randn(37, 64)
    assert word_checksum(x) == word_checksum(x.clone()) == word_checksum(x.T.contiguous().T.contiguous())
    assert word_checksum(x.bfloat16()) == word_checksum(x.bfloat16().clone())
    changed = x.clone()
    changed[20, 5] += 1.0
    assert word_checksum(changed) != word_checksum(x)
    odd = torch.arange(7, dtype=torch.uint8)  # 7 bytes: neither 32- nor 16-bit words
    assert word_checksum(odd) == 21


def test_direct_rows_whose_bytes_changed_on_the_way_raise_direct_transport_error(monkeypatch):
    sent = torch.randn(5, 8)
    rows = DirectRows(["ref"], "nixl", word_checksum(sent))
    monkeypatch.setattr(ray, "get", lambda ref: sent.clone())
    torch.testing.assert_close(asyncio.run(rows.get()), sent)
    garbage = sent.clone()
    garbage[2] = 0.0
    monkeypatch.setattr(ray, "get", lambda ref: garbage)
    for retryable in (False, True):  # also for the router fetching an answer: not retried through nixl
        with pytest.raises(DirectTransportError, match="differ from what was sent"):
            asyncio.run(rows.get(retryable=retryable))

    def lost(ref):
        raise RuntimeError("The NIXL transfer failed")

    monkeypatch.setattr(ray, "get", lost)
    with pytest.raises(AnswerLost, match="could not fetch an answer through nixl"):
        asyncio.run(rows.get(retryable=True))
