"""The resilient pool: a worker that dies or hangs costs one item, never the run."""

import time
from itertools import count, islice

from support.pool_tasks import square_or_misbehave

from data_pipeline.pool import ResilientPool, TaskFailure


def test_crash_hang_and_error_each_cost_one_item():
    items = list(range(30))
    start = time.monotonic()
    with ResilientPool(square_or_misbehave, workers=2, timeout_s=3) as pool:
        results = list(pool.imap(items))
        assert pool.restarts == 2
    assert time.monotonic() - start < 30
    assert len(results) == len(items)
    for x, result in zip(items, results, strict=True):
        if x in (5, 13, 21):
            assert isinstance(result, TaskFailure)
        else:
            assert result == x * x, (x, result)
    assert "exit code 7" in results[13].reason
    assert "timed out after 3 s" in results[21].reason
    assert results[5].reason == "ValueError: five is a bad number"


def test_results_keep_input_order_with_one_worker():
    with ResilientPool(square_or_misbehave, workers=1, timeout_s=30) as pool:
        assert list(pool.imap([3, 2, 1])) == [9, 4, 1]


def test_an_endless_input_is_drawn_as_workers_free_up():
    # A million-file listing is never held whole: items are drawn lazily, in order.
    with ResilientPool(abs, workers=2, timeout_s=30) as pool:
        assert list(islice(pool.imap(count(-3)), 6)) == [3, 2, 1, 0, 1, 2]
