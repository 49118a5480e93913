"""core.pipeline: the results and order of the plain loop, overlap proven by events (not
timing), errors raised in the caller, and no thread left behind."""
import threading

import pytest

from core.pipeline import Behind, ahead


@pytest.mark.parametrize("depth", [0, 1, 3])
def test_ahead_gives_the_plain_loops_results_in_order(depth):
    assert list(ahead(range(50), lambda x: x * x, depth)) == [(x, x * x) for x in range(50)]


def test_ahead_overlaps_the_next_item_with_the_callers_work():
    started = {i: threading.Event() for i in range(3)}

    def fn(i):
        started[i].set()
        return i

    stream = ahead(range(3), fn, depth=1)
    assert next(stream) == (0, 0)
    assert started[1].wait(5)  # item 1 is computed while the caller still holds item 0
    assert list(stream) == [(1, 1), (2, 2)]


def test_ahead_raises_in_the_caller_and_stops_when_the_caller_stops():
    def fn(i):
        if i == 3:
            raise KeyError("item 3")
        return i

    with pytest.raises(KeyError, match="item 3"):
        list(ahead(range(10), fn, depth=2))
    before = threading.active_count()
    stream = ahead(range(10_000), lambda i: i, depth=2)
    next(stream)
    stream.close()  # the producer, blocked on a full queue, ends
    assert threading.active_count() == before


def test_behind_consumes_in_order_overlapping_the_producer():
    seen, release = [], threading.Event()

    def consume(x):
        release.wait(5)
        seen.append(x)

    with Behind(consume, depth=2) as behind:
        behind.put(0)
        behind.put(1)  # returns while 0 is still being consumed
        assert seen == []
        release.set()
        for x in range(2, 20):
            behind.put(x)
    assert seen == list(range(20))


def test_behind_raises_the_consumers_error_and_abandons_on_the_callers():
    def consume(x):
        if x == 2:
            raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        with Behind(consume, depth=1) as behind:
            for x in range(10):
                behind.put(x)
    seen = []
    with pytest.raises(RuntimeError):
        with Behind(seen.append, depth=4) as behind:
            behind.put(0)
            raise RuntimeError("caller failed")
    assert seen in ([], [0])
