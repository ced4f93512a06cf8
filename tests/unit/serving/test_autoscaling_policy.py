"""RowRate (the `rows_per_s` autoscaling metric) under threads: the replica's event loop adds
rows while Serve reads the rate from a threadpool (`record_autoscaling_stats`, Ray 2.60)."""

import sys
import threading
import time

import pytest

from moe_cluster.serving.autoscaling import RowRate

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
