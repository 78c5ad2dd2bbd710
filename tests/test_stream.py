"""process_stream: ordering, lazy input, flat memory, early close, errors.

Task functions live at module level so that spawn and forkserver workers can
import them by name.  Tasks that must leave a trace write a file into a
directory the test owns, named after the task, holding the worker's pid.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest
from conftest import check_usable, mark_then_sleep, wait_until

from poolme_mp import TaskError, TaskErrorGroup, WorkerPool

T = TypeVar("T")

# Generous bound for any single blocking wait in these tests.
WAIT = 30.0


# -- task functions (run in the workers) -------------------------------------


def square(x: int) -> int:
    return x * x


def increment(x: int) -> int:
    return x + 1


def sleep_then_return(item: tuple[int, float]) -> int:
    value, seconds = item
    time.sleep(seconds)
    return value


def fail_on_five(x: int) -> int:
    if x == 5:
        raise ValueError(f"bad item {x}")
    return x * 10


def slow_except_five(x: int) -> int:
    """Tasks before 5 take a while; task 5 fails at once."""
    if x == 5:
        raise ValueError(f"bad item {x}")
    if x < 5:
        time.sleep(0.3)
    return x * 10


# -- helpers (parent side) -----------------------------------------------------


class CountingSource:
    """An endless iterator of 0, 1, 2, ... that counts how many were pulled."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.pulled = 0

    def __iter__(self) -> CountingSource:
        return self

    def __next__(self) -> int:
        with self._lock:
            value = self.pulled
            self.pulled += 1
            return value


def started(directory: Path) -> set[int]:
    return {int(p.name.split("-")[1]) for p in directory.glob("started-*")}


def private_rss() -> int:
    """Private (anonymous) resident memory now, in bytes: unlike ru_maxrss
    not a peak, and unlike plain RSS without shared-memory pages."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no RssAnon in /proc/self/status")


def consume_within(stream: Iterator[T], timeout: float) -> list[T]:
    """list(stream), failing (instead of hanging) if it takes over timeout s."""
    box: list[Any] = []

    def run() -> None:
        try:
            box.append(("ok", list(stream)))
        except BaseException as exc:  # handed to the test thread
            box.append(("error", exc))

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(timeout)
    if not box:
        raise AssertionError(f"the stream did not end within {timeout} s")
    kind, value = box[0]
    if kind == "error":
        raise value
    return value  # type: ignore[no-any-return]


# -- ordering -------------------------------------------------------------------


def test_ordered_stream_equals_serial(start_method: str) -> None:
    """An ordered stream yields exactly the serial results, in input order."""
    with WorkerPool(2, start_method=start_method) as pool:
        from_list = list(pool.process_stream(square, list(range(500))))
        from_generator = list(pool.process_stream(square, (x for x in range(500))))
    expected = [x * x for x in range(500)]
    assert from_list == expected
    assert from_generator == expected


def test_unordered_stream_yields_every_result(start_method: str) -> None:
    """ordered=False yields every result exactly once (in some order)."""
    with WorkerPool(2, start_method=start_method) as pool:
        results = list(pool.process_stream(square, range(1000), ordered=False))
    assert sorted(results) == [x * x for x in range(1000)]


def test_unordered_stream_yields_fast_task_before_slow_earlier_one() -> None:
    """ordered=False yields a finished later task before a slow earlier one;
    ordered=True still yields the slow first task first."""
    tasks = [(0, 1.0), (1, 0.0), (2, 0.0)]
    with WorkerPool(2, start_method="fork") as pool:
        unordered = list(pool.process_stream(sleep_then_return, tasks, ordered=False))
        ordered = list(pool.process_stream(sleep_then_return, tasks, ordered=True))
    assert unordered[0] != 0
    assert unordered[-1] == 0
    assert sorted(unordered) == [0, 1, 2]
    assert ordered == [0, 1, 2]


# -- lazy input -------------------------------------------------------------------


def test_infinite_input_is_read_lazily(start_method: str) -> None:
    """With an endless input and buffer_size=64, results arrive promptly and
    the stream never reads more than buffer_size tasks past what it has
    handed to the consumer.

    Slack: the consumer takes results a frame at a time, and a frame of a
    stream holds at most buffer_size // (3 * workers) = 10 tasks, so up to
    10 results may be taken from the pool before we see them.
    """
    buffer_size, slack = 64, 64 // (3 * 2)
    source = CountingSource()
    with WorkerPool(2, start_method=start_method) as pool:
        pool.start()
        check_usable(pool, within=WAIT)  # workers are up
        begin = time.monotonic()
        stream = pool.process_stream(increment, source, buffer_size=buffer_size)
        first = next(stream)
        assert time.monotonic() - begin < 1.0
        assert first == 1
        consumed = 1
        worst = source.pulled - consumed
        for expected in range(2, 2001):
            assert next(stream) == expected
            consumed += 1
            worst = max(worst, source.pulled - consumed)
        # A consumer that stops taking results stops the reading.
        time.sleep(0.5)
        worst = max(worst, source.pulled - consumed)
        assert worst <= buffer_size + slack
        pulled_while_paused = source.pulled
        time.sleep(0.2)
        assert source.pulled == pulled_while_paused
        stream.close()


def test_memory_stays_flat_over_long_input() -> None:
    """Streaming 2 million tiny tasks keeps the parent's memory flat.

    Measured as the parent's private resident memory (RssAnon), sampled
    along the way, from a baseline taken after 200,000 results.  RssAnon
    leaves out the shared rings and arenas, whose pages count in plain RSS
    once touched.  Holding on to every result would cost over 60 MB; the
    bound is 16 MB.
    """
    total = 2_000_000
    baseline = None
    peak = 0
    count = 0
    with WorkerPool(2, start_method="fork") as pool:
        for count, result in enumerate(pool.process_stream(increment, (i for i in range(total))), 1):
            if result != count:
                pytest.fail(f"result {count - 1} was {result}, expected {count}")
            if count % 100_000 == 0:
                rss = private_rss()
                if count == 200_000:
                    baseline = rss
                if baseline is not None:
                    peak = max(peak, rss)
    assert count == total
    assert baseline is not None
    assert peak - baseline < 16 * 2**20


def test_stream_over_smallest_ring_finishes() -> None:
    """A stream of many small tasks over the smallest ring (64 KiB) ends,
    with every result in order."""
    with WorkerPool(2, start_method="fork", ring_size=65536) as pool:
        stream = pool.process_stream(increment, (i for i in range(100_000)))
        try:
            results = consume_within(stream, timeout=10)
        finally:
            stream.close()
            if not stream._reader.sink.finished:  # stuck: do not hang the shutdown
                pool.terminate()
    assert results == list(range(1, 100_001))


# -- closing early ------------------------------------------------------------------


class Stop(Exception):
    pass


@pytest.mark.parametrize("how", ["break", "close", "raise"])
def test_closing_early_stops_reading_input(how: str) -> None:
    """Leaving a stream early (break, close(), an exception in the loop body)
    stops reading the input at once, and the pool stays usable."""
    buffer_size, slack = 32, 32 // (2 * 2)
    source = CountingSource()
    with WorkerPool(2, start_method="fork") as pool:
        consumed = 0
        if how == "close":
            stream = pool.process_stream(increment, source, buffer_size=buffer_size)
            for result in stream:
                consumed += 1
                assert result == consumed
                if consumed == 100:
                    stream.close()
                    break
        else:
            # The usual pattern: the loop holds the only reference, so
            # leaving it (break, or an exception unwinding past it) drops
            # the stream.
            try:
                for result in pool.process_stream(increment, source, buffer_size=buffer_size):
                    consumed += 1
                    assert result == consumed
                    if consumed == 100:
                        if how == "break":
                            break
                        raise Stop
            except Stop:
                pass
        assert consumed == 100
        time.sleep(0.1)  # the engine gets a moment to see the close
        pulled = source.pulled
        assert pulled <= consumed + buffer_size + slack
        time.sleep(0.3)
        assert source.pulled == pulled
        check_usable(pool)


@pytest.mark.parametrize("how", ["break", "close", "raise"])
def test_closing_early_abandons_running_task(start_method: str, how: str, tmp_path: Path) -> None:
    """Closing a stream abandons tasks that are running: the pool answers a
    new call promptly although the abandoned tasks sleep 30 s, and no
    further task of the closed stream starts."""
    tasks = [(str(tmp_path), 0, 0.0)] + [(str(tmp_path), i, 30.0) for i in range(1, 10)]
    with WorkerPool(2, start_method=start_method) as pool:
        stream = pool.process_stream(mark_then_sleep, tasks)
        try:
            for result in stream:
                assert result == 0
                # Both workers are now busy with 30 s tasks.
                wait_until(lambda: len(started(tmp_path)) >= 3, timeout=WAIT)
                if how == "close":
                    stream.close()
                    break
                if how == "break":
                    break
                raise Stop
        except Stop:
            pass
        if how != "close":
            # Leaving a loop (break or exception) does not close an
            # iterator; dropping the last reference to it does.
            del stream
        begin = time.monotonic()
        check_usable(pool)
        assert time.monotonic() - begin < 2.0
        before = started(tmp_path)
        assert len(before) == 3
        time.sleep(0.3)
        assert started(tmp_path) == before


def test_closed_stream_yields_nothing_more() -> None:
    """After close(), next() raises StopIteration at once, even though
    results were already delivered to the stream."""
    with WorkerPool(2, start_method="fork") as pool:
        stream = pool.process_stream(increment, range(10_000))
        assert list(itertools.islice(stream, 500)) == list(range(1, 501))
        stream.close()
        with pytest.raises(StopIteration):
            next(stream)
        check_usable(pool)


# -- errors ---------------------------------------------------------------------------


def test_error_raises_at_failing_item_after_earlier_results(start_method: str) -> None:
    """By default a stream yields the results before a failing task, then
    raises its TaskError (index, cause) instead of the next result."""
    seen: list[int] = []
    with WorkerPool(2, start_method=start_method) as pool:
        with pytest.raises(TaskError) as info:
            for result in pool.process_stream(fail_on_five, range(10)):
                seen.append(result)
        check_usable(pool)
    assert seen == [0, 10, 20, 30, 40]
    assert info.value.index == 5
    assert isinstance(info.value.__cause__, ValueError)
    assert str(info.value.__cause__) == "bad item 5"


def test_error_waits_for_slower_earlier_results() -> None:
    """The failing task's error comes after the results of every earlier
    task, even when those earlier tasks finish after the failure."""
    seen: list[int] = []
    with WorkerPool(2, start_method="fork") as pool:
        with pytest.raises(TaskError) as info:
            for result in pool.process_stream(slow_except_five, range(10)):
                seen.append(result)
    assert seen == [0, 10, 20, 30, 40]
    assert info.value.index == 5


def test_return_exceptions_yields_task_error_in_place(start_method: str) -> None:
    """return_exceptions=True yields the TaskError in the failing task's
    place and every other result in its own."""
    with WorkerPool(2, start_method=start_method) as pool:
        results = list(pool.process_stream(fail_on_five, range(10), return_exceptions=True))
    assert len(results) == 10
    error = results[5]
    assert isinstance(error, TaskError)
    assert error.index == 5
    assert isinstance(error.__cause__, ValueError)
    assert results[:5] + results[6:] == [0, 10, 20, 30, 40, 60, 70, 80, 90]


def test_continue_on_error_yields_successes_then_raises_group(start_method: str) -> None:
    """continue_on_error=True yields every success, then raises a
    TaskErrorGroup holding each failure."""
    seen: list[int] = []
    with WorkerPool(2, start_method=start_method) as pool:
        with pytest.raises(TaskErrorGroup) as info:
            for result in pool.process_stream(fail_on_five, range(10), continue_on_error=True):
                seen.append(result)
    assert seen == [0, 10, 20, 30, 40, 60, 70, 80, 90]
    errors = info.value.exceptions
    assert len(errors) == 1
    assert isinstance(errors[0], TaskError)
    assert errors[0].index == 5
    assert isinstance(errors[0].__cause__, ValueError)


def test_stream_is_an_iterator_of_results() -> None:
    """process_stream returns an iterator (iter() is itself) that ends with
    StopIteration and keeps raising it."""
    with WorkerPool(2, start_method="fork") as pool:
        stream = pool.process_stream(square, [1, 2, 3])
        assert iter(stream) is stream
        assert list(itertools.islice(stream, 5)) == [1, 4, 9]
        with pytest.raises(StopIteration):
            next(stream)
        with pytest.raises(StopIteration):
            next(stream)


def test_stream_type_works_as_a_typed_weakrefable_context_manager() -> None:
    """ResultStream is subscriptable at run time (ResultStream[int]), is a
    collections.abc.Iterator, supports weak references, and closes when its
    with block ends."""
    import collections.abc
    import weakref

    from poolme_mp import ResultStream

    assert ResultStream[int].__origin__ is ResultStream
    with WorkerPool(2, start_method="fork") as pool:
        with pool.process_stream(square, range(100_000)) as stream:
            assert isinstance(stream, collections.abc.Iterator)
            assert isinstance(stream, ResultStream)
            ref = weakref.ref(stream)
            assert next(stream) == 0
        assert list(stream) == []  # closed: nothing more
        assert ref() is stream
        assert pool.process(square, range(5), timeout=30) == [0, 1, 4, 9, 16]


def test_stream_over_a_range_longer_than_sys_maxsize() -> None:
    """A range whose len() overflows is streamed lazily like any iterable."""
    with WorkerPool(2, start_method="fork") as pool:
        first = list(itertools.islice(pool.process_stream(square, range(2**64)), 3))
        assert first == [0, 1, 4]
        down = list(itertools.islice(pool.process_stream(square, range(2**64, 0, -1)), 2))
        assert down == [2**128, (2**64 - 1) ** 2]


def _rows_then_failure(count: int):
    yield from range(count)
    raise OSError(f"read failed after row {count - 1}")


@pytest.mark.parametrize("ordered", [True, False], ids=["ordered", "unordered"])
@pytest.mark.parametrize("return_exceptions", [False, True], ids=["raise", "return_exceptions"])
@pytest.mark.parametrize("buffer_size", [3, 1000])
def test_input_that_raises_delivers_every_earlier_result_then_the_error(
        ordered: bool, return_exceptions: bool, buffer_size: int) -> None:
    """As with serial map(): every task read before the input failed yields
    its result, then the stream raises a TaskError whose cause is the
    input's exception and whose index is where the input broke."""
    with WorkerPool(2, start_method="fork") as pool:
        got = []
        with pytest.raises(TaskError) as caught:
            for value in pool.process_stream(square, _rows_then_failure(100), ordered=ordered,
                                             return_exceptions=return_exceptions,
                                             buffer_size=buffer_size, timeout=30):
                got.append(value)
        assert sorted(got) == [x * x for x in range(100)]
        if ordered:
            assert got == [x * x for x in range(100)]
        assert isinstance(caught.value.__cause__, OSError)
        assert caught.value.index == 100
        assert "reading the input raised OSError" in str(caught.value)
        assert pool.process(square, range(4), timeout=30) == [0, 1, 4, 9]


def test_input_that_raises_fails_process_and_map_with_its_error() -> None:
    """process() raises the input's failure; map() yields the results read
    before it, then raises it."""
    with WorkerPool(2, start_method="fork") as pool:
        with pytest.raises(TaskError) as caught:
            pool.process(square, _rows_then_failure(50), timeout=30)
        assert isinstance(caught.value.__cause__, OSError) and caught.value.index == 50
        got = []
        with pytest.raises(TaskError) as caught:
            for value in pool.map(square, _rows_then_failure(50), timeout=30):
                got.append(value)
        assert got == [x * x for x in range(50)]
        assert isinstance(caught.value.__cause__, OSError)


def _type_and_value(x: Any) -> tuple[str, Any]:
    return type(x).__name__, x


def test_stream_over_a_1d_array_hands_out_python_scalars_like_process() -> None:
    """process_stream gives a 1-D array's elements to tasks as the same
    Python scalars process() does, in order, whatever the dtype; rows of a
    2-D array arrive as arrays."""
    np = pytest.importorskip("numpy")
    arrays = [np.arange(10_000, dtype=np.int64), np.linspace(0, 1, 5000, dtype=np.float32),
              np.array([True, False, True]), np.array(["2024-01-02"], dtype="datetime64[D]")]
    with WorkerPool(2, start_method="fork") as pool:
        for array in arrays:
            streamed = list(pool.process_stream(_type_and_value, array, timeout=30))
            assert streamed == pool.process(_type_and_value, array, timeout=30)
            assert streamed == [(type(x).__name__, x) for x in array.tolist()]
        rows = list(pool.process_stream(lambda row: (type(row).__name__, row.tolist()),
                                        np.arange(6).reshape(3, 2), timeout=30))
        assert rows == [("ndarray", [0, 1]), ("ndarray", [2, 3]), ("ndarray", [4, 5])]


def test_continue_on_error_reports_the_input_failure_with_the_task_failures() -> None:
    """With continue_on_error, an input that raises joins the task failures
    in one TaskErrorGroup, in its place after them; the successes read
    before it are all delivered (stream) or kept in .results (process)."""
    def rows():
        for i in range(20):
            if i == 10:
                raise OSError("at 10")
            yield i

    def fails_on_1_mod_4(x: int) -> int:
        if x % 4 == 1:
            raise ValueError(x)
        return x * x

    with WorkerPool(2, start_method="fork") as pool:
        got = []
        with pytest.raises(TaskErrorGroup) as caught:
            for value in pool.process_stream(fails_on_1_mod_4, rows(), continue_on_error=True,
                                             timeout=30):
                got.append(value)
        assert got == [x * x for x in range(10) if x % 4 != 1]
        assert [e.index for e in caught.value.exceptions] == [1, 5, 9, 10]
        assert isinstance(caught.value.exceptions[-1].__cause__, OSError)
        with pytest.raises(TaskErrorGroup) as caught:
            pool.process(fails_on_1_mod_4, rows(), continue_on_error=True, timeout=30)
        assert [e.index for e in caught.value.exceptions] == [1, 5, 9, 10]
        assert [r for r in caught.value.results if not isinstance(r, TaskError)] == [
            x * x for x in range(10) if x % 4 != 1]
