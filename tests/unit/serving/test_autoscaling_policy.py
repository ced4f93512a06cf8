"""The autoscaling policy and its metrics: TokenLoadPolicy's rule (rows computed, rows waiting,
calls queued or ongoing), and RowRate (the `rows_per_s` metric) under threads: the replica's
event loop adds rows while Serve reads the rate from a threadpool (`record_autoscaling_stats`)."""

import sys
import threading
import time
import types

import pytest
from ray.serve.config import AutoscalingConfig

from moe_cluster.serving.autoscaling import CHANNEL_CALLS, ROWS_PER_S, ROWS_WAITING, RowRate, TokenLoadPolicy

ADDERS, READERS, ADDS_PER_THREAD = 4, 4, 10000


@pytest.fixture
def frequent_thread_switches():
    """Switch threads every microsecond (default 5 ms) so that unguarded updates really interleave."""
    before = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    yield
    sys.setswitchinterval(before)


def _hammer(rate: RowRate) -> list[BaseException]:
    """ADDERS threads add 1 row ADDS_PER_THREAD times while READERS threads read the rate; the
    readers' exceptions (e.g. IndexError from two expiries popping one event) are returned."""
    errors: list[BaseException] = []
    adders_done = threading.Event()

    def add():
        for _ in range(ADDS_PER_THREAD):
            rate.add(1)

    def read():
        try:
            while not adders_done.is_set():
                assert rate.per_second() >= 0
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            errors.append(exc)

    adders = [threading.Thread(target=add) for _ in range(ADDERS)]
    readers = [threading.Thread(target=read) for _ in range(READERS)]
    for thread in [*readers, *adders]:
        thread.start()
    for thread in adders:
        thread.join()
    adders_done.set()
    for thread in readers:
        thread.join()
    return errors


def test_row_rate_counts_every_row_added_from_threads(frequent_thread_switches):
    rate = RowRate(window_s=4096.0)  # nothing expires during the test; a power of 2: rows/s * window is exact
    assert _hammer(rate) == []
    assert rate.per_second() * rate.window_s == ADDERS * ADDS_PER_THREAD


def test_row_rate_stays_exact_while_threads_expire_rows(frequent_thread_switches):
    """Rows leave the window while adders and readers expire them at the same time: the count
    always equals the rows of the events still in the window, and is 0 once the window passed
    (not a lost update's remainder, nor a negative number)."""
    rate = RowRate(window_s=0.005)
    assert _hammer(rate) == []
    assert rate._rows_in_window == sum(rows for _, rows in rate._events)
    time.sleep(2 * rate.window_s)
    assert rate.per_second() == 0.0
    assert not rate._events


# --- TokenLoadPolicy -------------------------------------------------------------------------------

def _ctx(rows_per_s=None, rows_waiting=None, calls=0.0, target=1, current=None, target_ongoing=2.0,
         channel_calls=None):
    """An AutoscalingContext as Serve 2.60 builds it, with the fields the policy reads: per-replica
    custom metrics (None: no replica reported yet), calls queued or ongoing, the current target."""
    metrics = {name: dict(enumerate(values)) for name, values in ((ROWS_PER_S, rows_per_s),
                                                                    (ROWS_WAITING, rows_waiting),
                                                                    (CHANNEL_CALLS, channel_calls))
               if values is not None}
    return types.SimpleNamespace(
        aggregated_metrics=metrics, total_num_requests=calls, target_num_replicas=target, policy_state={},
        current_num_replicas=target if current is None else current,
        config=AutoscalingConfig(min_replicas=0, max_replicas=8, target_ongoing_requests=target_ongoing))


def test_policy_sizes_replicas_from_the_rows_computed():
    policy = TokenLoadPolicy(target_rows_per_s=1000)
    assert policy(_ctx([2500.0], [0.0]))[0] == 3
    assert policy(_ctx([600.0, 600.0], [0.0, 0.0], target=2))[0] == 2
    assert policy(_ctx([0.0, 0.0], [0.0, 0.0], target=2))[0] == 0  # idle: Serve clamps to min_replicas


def test_policy_counts_the_rows_waiting_in_replicas():
    """Rows received and not yet answered ask for replicas that clear them within drain_s."""
    assert TokenLoadPolicy(target_rows_per_s=1000)(_ctx([500.0], [1500.0]))[0] == 2  # 500 + 1500 / 1 s
    assert TokenLoadPolicy(target_rows_per_s=1000, drain_s=4.0)(_ctx([500.0], [1500.0]))[0] == 1  # 500 + 375
    assert TokenLoadPolicy(target_rows_per_s=1000)(_ctx([0.0], [4000.0]))[0] == 4  # nothing done yet


def test_a_saturated_deployment_grows_whatever_its_rows_per_s():
    """Calls waiting beyond target_ongoing_requests per replica ask for more replicas, however few rows
    the replicas manage (the old rule, rows computed only, kept such a deployment at its size)."""
    policy = TokenLoadPolicy(target_rows_per_s=1e9)
    assert policy(_ctx([3.0], [2.0], calls=5.0))[0] == 3  # ceil(5 calls / 2 per replica)
    assert policy(_ctx([3.0, 3.0], [2.0, 2.0], calls=8.0, target=2, target_ongoing=1.0))[0] == 8
    assert policy(_ctx([3.0], [2.0], calls=2.0))[0] == 1  # at its target: stays


def test_calls_on_the_channels_count_as_calls():
    """Calls that came on the replicas' channels never pass Serve's request path (total_num_requests
    does not see them): the replicas report them, and they count like Serve's own."""
    policy = TokenLoadPolicy(target_rows_per_s=1e9)
    assert policy(_ctx([3.0], [2.0], calls=0.0, channel_calls=[5.0]))[0] == 3
    assert policy(_ctx([3.0, 3.0], [2.0, 2.0], calls=1.0, channel_calls=[4.0, 3.0]))[0] == 4  # (1 + 7) / 2
    _, state = policy(_ctx([0.0], [0.0], calls=0.0, channel_calls=[1.0]))
    assert _ == 1 and state["last_calls"] == 1.0


def test_calls_waiting_keep_or_wake_a_replica():
    """min_replicas 0: a call waiting for a deployment at 0 replicas (no replica, so no metrics) asks
    for one; a call computing on the only replica keeps it although no row is done yet."""
    policy = TokenLoadPolicy(target_rows_per_s=1e9)
    assert policy(_ctx(calls=1.0, target=0, current=0))[0] == 1
    assert policy(_ctx([0.0], [0.0], calls=1.0))[0] == 1
    assert policy(_ctx([0.0], [0.0], calls=0.0))[0] == 0  # idle: may go back to 0


def test_policy_without_reports_keeps_the_target_unless_calls_wait():
    policy = TokenLoadPolicy(target_rows_per_s=1000)
    assert policy(_ctx(target=3))[0] == 3  # replicas starting: keep the current decision
    assert policy(_ctx(target=1, calls=6.0))[0] == 3


def test_policy_records_what_it_saw_and_checks_its_arguments():
    _, state = TokenLoadPolicy(target_rows_per_s=1000)(_ctx([2500.0], [500.0], calls=3.0))
    assert state["last_rows_demand"] == 3000.0 and state["last_calls"] == 3.0
    with pytest.raises(ValueError, match="target_rows_per_s"):
        TokenLoadPolicy(target_rows_per_s=0)
    with pytest.raises(ValueError, match="drain_s"):
        TokenLoadPolicy(drain_s=0)


def test_policy_runs_under_serves_own_wrapper():
    """Serve 2.60 resolves the class from its import path with policy_kwargs and wraps it (bounds,
    factors, delays): a deployment at 0 replicas with a call waiting goes to 1 at once."""
    from ray.serve._private.autoscaling_state import _resolve_policy_callable
    from ray.serve.autoscaling_policy import _apply_autoscaling_config
    from ray.serve.config import AutoscalingPolicy

    from moe_cluster.serving.autoscaling import POLICY_PATH

    policy = _resolve_policy_callable(AutoscalingPolicy(policy_function=POLICY_PATH,
                                                        policy_kwargs={"target_rows_per_s": 1000, "drain_s": 2}))
    assert isinstance(policy, TokenLoadPolicy) and policy.drain_s == 2.0
    wrapped = _apply_autoscaling_config(policy)
    assert wrapped(_ctx(calls=1.0, target=0, current=0))[0] == 1
    assert wrapped(_ctx([3000.0], [0.0], calls=1.0, target=3))[0] == 3
