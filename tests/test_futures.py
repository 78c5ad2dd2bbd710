"""submit/Future and Executor behaviour, map(), thread safety, and the call
deadlines (timeout=) and cancel tokens (cancel=) of process, process_map
and process_stream.

Tasks that must leave a trace write a file named after the task into a
directory the test owns; the file holds the worker's pid.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import itertools
import os
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from conftest import check_usable, mark_then_sleep, wait_until

from poolme_mp import (
    CallCancelledError,
    CallTimeoutError,
    PoolClosedError,
    TaskError,
    WorkerPool,
)

WAIT = 30.0


# -- task functions (run in the workers) -------------------------------------


def square(x: int) -> int:
    return x * x


def add(x: int, y: int, z: int = 0) -> int:
    return x + y + z


def fail_with(message: str) -> None:
    raise ValueError(message)


def sleep_then_return(seconds: float, value: Any) -> Any:
    time.sleep(seconds)
    return value


def wall_clock() -> float:
    return time.time()


def worker_pid(_: Any = None) -> int:
    return os.getpid()


def mark(directory: str, name: str) -> str:
    """Record that this task ran."""
    Path(directory, f"ran-{name}").write_text(str(os.getpid()))
    return name


# -- helpers ---------------------------------------------------------------------


def started(directory: Path) -> dict[int, int]:
    """Task index -> worker pid, for every task that started."""
    return {int(p.name.split("-")[1]): int(p.read_text() or 0)
            for p in directory.glob("started-*")}


def check_usable_pids(pool: WorkerPool, within: float = 10.0) -> list[int]:
    """check_usable, then the pids of the workers that answer now."""
    check_usable(pool, within)
    return pool.process(worker_pid, list(range(8)))


# -- submit and Future --------------------------------------------------------------


def test_submit_returns_future_with_result(start_method: str) -> None:
    """submit() returns a concurrent.futures.Future whose result is
    fn(*args, **kwargs)."""
    with WorkerPool(2, start_method=start_method) as pool:
        future = pool.submit(add, 2, 3, z=4)
        assert isinstance(future, concurrent.futures.Future)
        assert future.result(timeout=WAIT) == 9
        assert future.done() and not future.cancelled()
        assert future.exception(timeout=WAIT) is None
        futures = [pool.submit(square, i) for i in range(20)]
        assert [f.result(timeout=WAIT) for f in futures] == [i * i for i in range(20)]


def test_submit_failure_is_task_error_with_cause(start_method: str) -> None:
    """A failing task sets the future's exception to a TaskError whose
    __cause__ is the original exception; result() raises it."""
    with WorkerPool(2, start_method=start_method) as pool:
        future = pool.submit(fail_with, "no good")
        error = future.exception(timeout=WAIT)
        assert isinstance(error, TaskError)
        assert isinstance(error.__cause__, ValueError)
        assert str(error.__cause__) == "no good"
        assert "no good" in str(error)
        with pytest.raises(TaskError) as info:
            future.result(timeout=WAIT)
        assert info.value is error


def test_futures_work_with_as_completed() -> None:
    """as_completed() yields every submitted future once, in completion order."""
    with WorkerPool(2, start_method="fork") as pool:
        slow = pool.submit(sleep_then_return, 0.6, "slow")
        fast = [pool.submit(square, i) for i in range(4)]
        order = list(concurrent.futures.as_completed([slow, *fast], timeout=WAIT))
    assert len(order) == 5
    assert set(order) == {slow, *fast}
    assert order[-1] is slow
    assert sorted(f.result() for f in fast) == [0, 1, 4, 9]
    assert slow.result() == "slow"


def test_fast_task_does_not_wait_behind_slow_one_while_a_worker_idles() -> None:
    """A short task is not queued behind a long-running one while another
    worker is idle, even when both call the same function."""
    with WorkerPool(2, start_method="fork") as pool:
        begin = time.monotonic()
        slow = pool.submit(sleep_then_return, 2.0, "slow")
        fast = [pool.submit(sleep_then_return, 0.0, i) for i in range(4)]
        done, _ = concurrent.futures.wait(fast, timeout=WAIT)
        elapsed = time.monotonic() - begin
        assert elapsed < 1.0
        assert done == set(fast)
        assert not slow.done()
        assert [f.result() for f in fast] == [0, 1, 2, 3]
        assert slow.result(timeout=WAIT) == "slow"


def test_futures_work_with_wait_first_completed() -> None:
    """wait(FIRST_COMPLETED) returns as soon as one future is done."""
    with WorkerPool(2, start_method="fork") as pool:
        slow = pool.submit(sleep_then_return, 1.5, "slow")
        fast = pool.submit(sleep_then_return, 0.0, "fast")
        begin = time.monotonic()
        done, not_done = concurrent.futures.wait(
            [slow, fast], timeout=WAIT, return_when=concurrent.futures.FIRST_COMPLETED)
        assert time.monotonic() - begin < 1.0
        assert done == {fast}
        assert not_done == {slow}
        assert slow.result(timeout=WAIT) == "slow"


def test_futures_work_with_asyncio_wrap_future() -> None:
    """asyncio.wrap_future() awaits a pool future."""
    with WorkerPool(2, start_method="fork") as pool:

        async def main() -> list[int]:
            wrapped = [asyncio.wrap_future(pool.submit(square, i)) for i in range(5)]
            return await asyncio.wait_for(asyncio.gather(*wrapped), timeout=WAIT)

        assert asyncio.run(main()) == [0, 1, 4, 9, 16]


def test_cancelling_wrapped_future_cancels_queued_task(tmp_path: Path) -> None:
    """Cancelling the asyncio wrapper of a queued pool future cancels the
    pool future, and its task never runs."""
    with WorkerPool(1, start_method="fork") as pool:
        busy = pool.submit(mark_then_sleep, (str(tmp_path), 0, 0.5))
        wait_until(lambda: (tmp_path / "started-0").exists(), timeout=WAIT)
        queued = pool.submit(mark, str(tmp_path), "queued")

        async def main() -> None:
            wrapped = asyncio.wrap_future(queued)
            wrapped.cancel()
            with pytest.raises(asyncio.CancelledError):
                await asyncio.wait_for(wrapped, timeout=WAIT)

        asyncio.run(main())
        wait_until(queued.cancelled, timeout=5)
        assert busy.result(timeout=WAIT) == 0
        assert pool.submit(mark, str(tmp_path), "after").result(timeout=WAIT) == "after"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ran-after", "started-0"]


def test_future_cancelled_before_start_never_runs(start_method: str, tmp_path: Path) -> None:
    """A future cancelled while it waits for a worker never runs."""
    with WorkerPool(1, start_method=start_method) as pool:
        busy = pool.submit(mark_then_sleep, (str(tmp_path), 0, 0.8))
        wait_until(lambda: (tmp_path / "started-0").exists(), timeout=WAIT)
        queued = [pool.submit(mark, str(tmp_path), f"q{i}") for i in range(5)]
        assert busy.cancel() is False  # already running
        assert [f.cancel() for f in queued] == [True] * 5
        assert all(f.cancelled() for f in queued)
        after = pool.submit(mark, str(tmp_path), "after")
        assert busy.result(timeout=WAIT) == 0
        assert after.result(timeout=WAIT) == "after"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ran-after", "started-0"]


def test_shutdown_cancel_futures_wakes_every_waiter(tmp_path: Path) -> None:
    """shutdown(cancel_futures=True) cancels queued futures and wakes their
    as_completed() and wait() callers at once, while the running one
    finishes normally."""
    pool = WorkerPool(1, start_method="fork")
    try:
        running = pool.submit(mark_then_sleep, (str(tmp_path), 0, 1.5))
        wait_until(lambda: (tmp_path / "started-0").exists(), timeout=WAIT)
        queued = [pool.submit(mark, str(tmp_path), f"q{i}") for i in range(4)]
        woken: dict[str, Any] = {}

        def by_as_completed() -> None:
            woken["as_completed"] = list(concurrent.futures.as_completed(queued, timeout=WAIT))

        def by_wait() -> None:
            woken["wait"] = concurrent.futures.wait(queued, timeout=WAIT)

        def by_result() -> None:
            try:
                queued[0].result(timeout=WAIT)
            except concurrent.futures.CancelledError as exc:
                woken["result"] = exc

        waiters = [threading.Thread(target=f) for f in (by_as_completed, by_wait, by_result)]
        for thread in waiters:
            thread.start()
        time.sleep(0.1)  # the waiters are blocked
        pool.shutdown(wait=False, cancel_futures=True)
        for thread in waiters:
            thread.join(1.0)
        assert not any(thread.is_alive() for thread in waiters)
        assert not running.done()  # woken before the running task finished
        assert set(woken["as_completed"]) == set(queued)
        done, not_done = woken["wait"]
        assert done == set(queued) and not not_done
        assert isinstance(woken["result"], concurrent.futures.CancelledError)
        assert all(f.cancelled() for f in queued)
        assert running.result(timeout=WAIT) == 0
    finally:
        pool.shutdown(wait=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["started-0"]


def test_submit_after_shutdown_raises_pool_closed() -> None:
    """submit() (and the other calls) after shutdown raise PoolClosedError,
    a RuntimeError, whether or not the pool ever started."""
    used = WorkerPool(1, start_method="fork")
    assert used.submit(square, 3).result(timeout=WAIT) == 9
    used.shutdown()
    never_started = WorkerPool(1, start_method="fork")
    never_started.shutdown()
    for pool in (used, never_started):
        with pytest.raises(PoolClosedError):
            pool.submit(square, 3)
        with pytest.raises(RuntimeError):
            pool.submit(square, 3)
        with pytest.raises(PoolClosedError):
            pool.process(square, [1])
        with pytest.raises(PoolClosedError):
            pool.process_stream(square, [1])
        with pytest.raises(PoolClosedError):
            pool.map(square, [1])


def test_submit_to_idle_pool_starts_at_once(start_method: str) -> None:
    """A task submitted to a warm, idle pool starts well under 0.5 s later."""
    with WorkerPool(2, start_method=start_method) as pool:
        assert pool.process(square, [1, 2, 3, 4]) == [1, 4, 9, 16]
        for _ in range(3):
            time.sleep(0.3)  # the workers go idle and sleep
            submitted = time.time()
            began = pool.submit(wall_clock).result(timeout=WAIT)
            answered = time.time()
            assert began - submitted < 0.5
            assert answered - submitted < 0.5


# -- map ------------------------------------------------------------------------------


def test_map_timeout_raises_timeout_error() -> None:
    """map(timeout=) raises TimeoutError (CallTimeoutError) once the time is
    up, while tasks still sleep; the pool stays usable."""
    with WorkerPool(2, start_method="fork") as pool:
        begin = time.monotonic()
        results = pool.map(sleep_then_return, [0.0, 10.0, 10.0, 10.0], ["a", "b", "c", "d"],
                           timeout=0.5)
        assert next(results) == "a"
        with pytest.raises(TimeoutError) as info:
            next(results)
        elapsed = time.monotonic() - begin
        assert isinstance(info.value, CallTimeoutError)
        assert 0.4 <= elapsed < 0.5 + 2.0
        check_usable(pool)


def test_map_with_chunksize_and_zip_of_iterables() -> None:
    """map() zips its iterables lazily like builtin map, for any chunksize."""
    with WorkerPool(2, start_method="fork") as pool:
        for chunksize in (1, 7, 100):
            assert list(pool.map(square, range(50), chunksize=chunksize)) == [
                x * x for x in range(50)]
        assert list(pool.map(add, range(5), range(10, 15), range(100, 105))) == list(
            map(add, range(5), range(10, 15), range(100, 105)))
        pulled = itertools.count()
        endless = (next(pulled) for _ in itertools.count())
        assert list(pool.map(add, endless, [10, 20, 30])) == [10, 21, 32]
        # zip reads one more item of the endless input to find the end.
        assert next(pulled) <= 4
        with pytest.raises(ValueError):
            pool.map(square, [1], chunksize=0)


def test_map_of_known_length_is_finished_by_shutdown() -> None:
    """Executor semantics: a map left unread at shutdown() still runs to the
    end, and its results can be read after the pool is gone."""
    pool = WorkerPool(2, start_method="fork", buffer_size=64)
    results = pool.map(square, list(range(5000)))
    assert next(results) == 0
    pool.shutdown(wait=True)
    assert list(results) == [x * x for x in range(1, 5000)]


def test_map_of_endless_input_does_not_hold_up_shutdown() -> None:
    """An unread map over an endless iterator does not keep shutdown()
    reading its input forever: shutdown returns, the tasks read before it
    deliver their results in order, then the map raises PoolClosedError."""
    with WorkerPool(2, start_method="fork") as pool:
        results = pool.map(square, itertools.count())
        assert next(results) == 0
        done = threading.Event()
        closer = threading.Thread(target=lambda: (pool.shutdown(wait=True), done.set()))
        closer.start()
        closer.join(WAIT)
        assert done.is_set(), "shutdown hung on an endless map"
    got = []
    with pytest.raises(PoolClosedError, match="unknown length"):
        for value in results:
            got.append(value)
    assert got == [x * x for x in range(1, len(got) + 1)]


def test_shutdown_with_cancel_futures_ends_unread_maps() -> None:
    """shutdown(cancel_futures=True) drops a map's unstarted work: reading
    it raises PoolClosedError rather than waiting for every task."""
    pool = WorkerPool(2, start_method="fork")
    results = pool.map(sleep_then_return, [0.2] * 40, range(40))
    begin = time.monotonic()
    pool.shutdown(wait=True, cancel_futures=True)
    assert time.monotonic() - begin < 4.0  # 40 tasks would take 4 s
    with pytest.raises(PoolClosedError):
        list(results)


# -- thread safety -------------------------------------------------------------------


def test_threads_sharing_a_pool_get_their_own_results(start_method: str) -> None:
    """8 threads mixing submit, process and process_stream on one pool each
    get exactly their own results."""
    failures: list[BaseException] = []
    outcomes: dict[int, list[Any]] = {}

    def work(thread_id: int, pool: WorkerPool) -> None:
        try:
            base = thread_id * 1000
            got: list[Any] = []
            for round_ in range(5):
                values = list(range(base + round_ * 20, base + round_ * 20 + 20))
                futures = [pool.submit(add, v, 1) for v in values[:5]]
                got.append([f.result(timeout=WAIT) for f in futures])
                got.append(pool.process(square, values))
                got.append(list(pool.process_stream(square, iter(values), buffer_size=8)))
            outcomes[thread_id] = got
        except BaseException as exc:
            failures.append(exc)

    with WorkerPool(2, start_method=start_method) as pool:
        threads = [threading.Thread(target=work, args=(i, pool)) for i in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        assert not any(thread.is_alive() for thread in threads)
    assert failures == []
    for thread_id in range(8):
        base = thread_id * 1000
        expected: list[Any] = []
        for round_ in range(5):
            values = list(range(base + round_ * 20, base + round_ * 20 + 20))
            expected.append([v + 1 for v in values[:5]])
            expected.append([v * v for v in values])
            expected.append([v * v for v in values])
        assert outcomes[thread_id] == expected


# -- deadlines and cancel tokens -------------------------------------------------------


def run_api(pool: WorkerPool, api: str, tasks: list[Any], **options: Any) -> Any:
    if api == "process":
        return pool.process(mark_then_sleep, tasks, **options)
    if api == "process_map":
        return pool.process_map(mark_then_sleep, {f"k{t[1]}": t for t in tasks}, **options)
    return list(pool.process_stream(mark_then_sleep, tasks, **options))


# Every API under fork; process (which all share the engine path with)
# under the start methods whose worker replacement differs.
DEADLINE_CASES = [("fork", api) for api in ("process", "process_map", "process_stream")] + [
    (method, "process") for method in ("forkserver", "spawn")]


@pytest.mark.parametrize(("start_method", "api"), DEADLINE_CASES)
@pytest.mark.parametrize("kind", ["timeout", "cancel"])
def test_deadline_or_cancel_stops_the_call(start_method: str, kind: str, api: str,
                                           tmp_path: Path) -> None:
    """timeout= raises CallTimeoutError (a TimeoutError), a cancel token set
    from another thread raises CallCancelledError, each within 2 s of firing
    while tasks sleep 30 s; the message says which fired, no further task
    starts, and the pool goes on with fresh workers."""
    tasks = [(str(tmp_path), i, 30.0) for i in range(6)]
    with WorkerPool(2, start_method=start_method) as pool:
        pool.start()
        check_usable(pool, within=WAIT)  # workers are up before the clock starts
        token = threading.Event()
        timer = threading.Timer(0.5, token.set)
        options: dict[str, Any] = {"timeout": 0.5} if kind == "timeout" else {"cancel": token}
        begin = time.monotonic()
        timer.start()
        try:
            with pytest.raises((CallTimeoutError, CallCancelledError)) as info:
                run_api(pool, api, tasks, **options)
        finally:
            timer.cancel()
        elapsed = time.monotonic() - begin
        assert 0.4 <= elapsed < 0.5 + 2.0
        message = str(info.value)
        if kind == "timeout":
            assert type(info.value) is CallTimeoutError
            assert isinstance(info.value, TimeoutError)
            assert "timeout=0.5" in message
            assert "cancel" not in message
        else:
            assert type(info.value) is CallCancelledError
            assert not isinstance(info.value, TimeoutError)
            assert "cancel token" in message
            assert "timeout" not in message
        ran = started(tmp_path)
        assert sorted(ran) == [0, 1]  # one task per worker had started
        new_pids = check_usable_pids(pool)
        assert not set(new_pids) & set(ran.values())  # fresh workers
        time.sleep(0.3)
        assert started(tmp_path) == ran


@pytest.mark.parametrize("api", ["process", "process_map", "process_stream"])
@pytest.mark.parametrize("kind", ["timeout", "cancel"])
def test_deadline_already_passed_runs_nothing(kind: str, api: str, tmp_path: Path) -> None:
    """timeout=0 or a cancel token set before the call raises at once and
    starts no task."""
    tasks = [(str(tmp_path), i, 0.0) for i in range(6)]
    token = threading.Event()
    token.set()
    options: dict[str, Any] = {"timeout": 0} if kind == "timeout" else {"cancel": token}
    expected = CallTimeoutError if kind == "timeout" else CallCancelledError
    with WorkerPool(2, start_method="fork") as pool:
        pool.start()
        check_usable(pool, within=WAIT)
        begin = time.monotonic()
        with pytest.raises(expected):
            run_api(pool, api, tasks, **options)
        assert time.monotonic() - begin < 1.0
        time.sleep(0.2)
        assert started(tmp_path) == {}
        check_usable(pool)


# -- an engine held up by a call's own input ------------------------------------------


def one_then_block(seconds: float):
    yield 1
    time.sleep(seconds)
    yield 2


@pytest.mark.parametrize("api", ["process", "process_stream"])
@pytest.mark.parametrize("kind", ["timeout", "cancel"])
def test_deadline_fires_while_the_input_iterator_blocks(api: str, kind: str) -> None:
    """timeout= and cancel= end the call promptly even while its input
    generator blocks the engine (which cannot be interrupted): the waiting
    thread raises, and the pool serves calls again once the generator
    yields."""
    with WorkerPool(2, start_method="fork") as pool:
        token = threading.Event()
        timer = threading.Timer(0.5, token.set)
        options: dict[str, Any] = {"timeout": 0.5} if kind == "timeout" else {"cancel": token}
        expected = CallTimeoutError if kind == "timeout" else CallCancelledError
        timer.start()
        begin = time.monotonic()
        try:
            with pytest.raises(expected):
                if api == "process":
                    pool.process(square, one_then_block(4.0), **options)
                else:
                    list(pool.process_stream(square, one_then_block(4.0), **options))
        finally:
            timer.cancel()
        assert time.monotonic() - begin < 3.0  # the generator blocks for 4 s
        assert pool.process(square, [1, 2, 3], timeout=WAIT) == [1, 4, 9]


def test_blocking_call_from_an_input_iterator_of_the_same_pool_fails_clearly() -> None:
    """An input generator that itself waits on the same pool would deadlock
    the engine: the inner call raises RuntimeError instead, reported as the
    outer call's input failure, and the pool stays usable."""
    with WorkerPool(2, start_method="fork") as pool:
        def nested():
            yield pool.process(square, [5])[0]

        with pytest.raises(TaskError) as caught:
            pool.process(square, nested(), timeout=WAIT)
        assert isinstance(caught.value.__cause__, RuntimeError)
        assert "engine thread" in str(caught.value.__cause__)
        assert pool.process(square, [2], timeout=WAIT) == [4]


@pytest.mark.parametrize("api", ["dtype", "process_map"])
def test_calls_that_read_their_input_first_honour_timeout_and_wrap_input_errors(api: str) -> None:
    """dtype= and process_map over pairs read the whole input before they
    start: what the input raises is the call's TaskError, and the timeout
    counts while it is read, so an endless input cannot run forever."""
    np = pytest.importorskip("numpy")

    def run(tasks: Any, **options: Any) -> Any:
        if api == "dtype":
            return pool.process(square, tasks, dtype=np.int64, **options)
        return pool.process_map(square, ((f"k{x}", x) for x in tasks), **options)

    def broken():
        yield 1
        yield 2
        raise OSError("input broke")

    with WorkerPool(2, start_method="fork") as pool:
        with pytest.raises(TaskError) as caught:
            run(broken())
        assert isinstance(caught.value.__cause__, OSError) and caught.value.index == 2
        begin = time.monotonic()
        with pytest.raises(CallTimeoutError):
            run(itertools.count(), timeout=0.5)
        assert time.monotonic() - begin < 5.0
        assert list(run(iter([1, 2, 3]), timeout=WAIT).values() if api == "process_map"
                    else run(iter([1, 2, 3]), timeout=WAIT)) == [1, 4, 9]


def test_dtype_call_does_not_trust_a_wrong_len() -> None:
    """An input whose __len__ is wrong gives exactly its items' results."""
    np = pytest.importorskip("numpy")

    class Liar:
        def __init__(self, items: list[int], claimed: int) -> None:
            self.items, self.claimed = items, claimed

        def __len__(self) -> int:
            return self.claimed

        def __iter__(self):
            return iter(self.items)

    with WorkerPool(2, start_method="fork") as pool:
        assert pool.process(square, Liar([1, 2, 3], 10), dtype=np.int64, timeout=WAIT).tolist() == [1, 4, 9]
        assert pool.process(square, Liar(list(range(10)), 3), dtype=np.int64,
                            timeout=WAIT).tolist() == [x * x for x in range(10)]


def test_shutdown_from_a_done_callback_does_not_hang() -> None:
    """shutdown(wait=True) from a future's done callback (which runs on the
    pool's engine thread) returns instead of waiting on itself."""
    pool = WorkerPool(2, start_method="fork")
    returned = threading.Event()

    def stop(_: Any) -> None:
        pool.shutdown(wait=True)
        returned.set()

    future = pool.submit(square, 3)
    future.add_done_callback(stop)
    assert future.result(timeout=WAIT) == 9
    assert returned.wait(WAIT)
    with pytest.raises(PoolClosedError):
        pool.submit(square, 1)
    pool.shutdown(wait=True)


def test_time_spent_reading_the_input_counts_against_the_timeout() -> None:
    """process_map over slow pairs: the timeout runs from the call, not
    again from the end of reading, so the call ends near timeout=."""
    def slow_pairs():
        for key in range(2):
            time.sleep(0.4)
            yield key, 5.0  # each task would sleep 5 s

    with WorkerPool(2, start_method="fork") as pool:
        begin = time.monotonic()
        with pytest.raises(CallTimeoutError):
            pool.process_map(sleep_then_return_value, slow_pairs(), timeout=1.0)
        assert time.monotonic() - begin < 1.0 + 0.8  # reading (0.8 s) is not added again


def sleep_then_return_value(seconds: float) -> float:
    time.sleep(seconds)
    return seconds
