"""Which transport a call of a given size takes (serving/remote_experts.py Transport), without a cluster."""

import pytest

from moe_cluster.serving.args import AppArgs
from moe_cluster.serving.remote_experts import Transport, by_value_limit


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
    with pytest.raises(ValueError, match="auto, object_store or by_value"):
        Transport("nixl")
    with pytest.raises(ValueError, match="transport"):
        AppArgs.model_validate({"transport": "nixl"})
    assert AppArgs().transport == "auto" and AppArgs().by_value_max_bytes == 2**20
