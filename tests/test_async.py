"""asyncio: aprocess() and aprocess_stream(), and cancelling them.

Tasks that must leave a trace write a file named after the task into a
directory the test owns.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any, TypeVar

import pytest
from conftest import check_usable, mark_then_sleep

from poolme_mp import TaskError, TaskErrorGroup, WorkerPool

T = TypeVar("T")

WAIT = 30.0


# -- task functions (run in the workers) -------------------------------------


def square(x: int) -> int:
    return x * x


def fail_on_three(x: int) -> int:
    if x == 3:
        raise ValueError("three")
    return x


def nap(seconds: float) -> float:
    time.sleep(seconds)
    return seconds


# -- helpers ---------------------------------------------------------------------


def started(directory: Path) -> set[int]:
    return {int(p.name.split("-")[1]) for p in directory.glob("started-*")}


def run(make: Callable[[], Coroutine[Any, Any, T]], timeout: float = WAIT) -> T:
    """asyncio.run() with an overall timeout."""

    async def bounded() -> T:
        return await asyncio.wait_for(make(), timeout)

    return asyncio.run(bounded())


async def until(predicate: Callable[[], bool], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() >= deadline:
            raise AssertionError(f"condition not met within {timeout} s")
        await asyncio.sleep(0.01)


# -- aprocess ----------------------------------------------------------------------


def test_aprocess_returns_results_in_order(start_method: str) -> None:
    """await pool.aprocess(fn, tasks) returns process()'s list."""
    with WorkerPool(2, start_method=start_method) as pool:
        assert run(lambda: pool.aprocess(square, range(50))) == [x * x for x in range(50)]


def test_aprocess_passes_options_and_raises_task_error() -> None:
    """aprocess forwards call options (return_exceptions) and raises a
    failing task's TaskError by default."""
    with WorkerPool(2, start_method="fork") as pool:
        results = run(lambda: pool.aprocess(fail_on_three, range(5), return_exceptions=True))
        assert results[:3] + results[4:] == [0, 1, 2, 4]
        assert isinstance(results[3], TaskError) and results[3].index == 3
        with pytest.raises(TaskError) as info:
            run(lambda: pool.aprocess(fail_on_three, range(5)))
        assert info.value.index == 3
        assert isinstance(info.value.__cause__, ValueError)


def test_aprocess_leaves_the_event_loop_free() -> None:
    """While aprocess waits for its tasks, other coroutines keep running."""
    with WorkerPool(2, start_method="fork") as pool:

        async def main() -> tuple[list[float], int]:
            ticks = 0

            async def ticker() -> None:
                nonlocal ticks
                while True:
                    ticks += 1
                    await asyncio.sleep(0.01)

            tick_task = asyncio.create_task(ticker())
            try:
                results = await pool.aprocess(nap, [0.4, 0.4])
            finally:
                tick_task.cancel()
            return results, ticks

        results, ticks = run(main)
    assert results == [0.4, 0.4]
    assert ticks >= 10


def test_cancelling_aprocess_cancels_the_work(start_method: str, tmp_path: Path) -> None:
    """Cancelling the asyncio task awaiting aprocess stops the call: no
    further task starts and the pool answers a new call promptly although
    the running tasks sleep 30 s."""
    tasks = [(str(tmp_path), i, 30.0) for i in range(8)]
    with WorkerPool(2, start_method=start_method) as pool:
        pool.start()
        check_usable(pool, within=WAIT)

        async def main() -> bool:
            work = asyncio.create_task(pool.aprocess(mark_then_sleep, tasks))
            await until(lambda: len(started(tmp_path)) == 2, timeout=WAIT)
            work.cancel()
            await asyncio.wait([work], timeout=WAIT)
            return work.cancelled()

        assert run(main) is True
        check_usable(pool)
        assert started(tmp_path) == {0, 1}
        time.sleep(0.3)
        assert started(tmp_path) == {0, 1}


# -- aprocess_stream ------------------------------------------------------------------


def test_aprocess_stream_async_for(start_method: str) -> None:
    """async for over aprocess_stream yields the results in order, or all
    of them with ordered=False."""
    with WorkerPool(2, start_method=start_method) as pool:

        async def collect(**options: Any) -> list[int]:
            return [r async for r in pool.aprocess_stream(square, range(200), **options)]

        assert run(collect) == [x * x for x in range(200)]
        assert sorted(run(lambda: collect(ordered=False))) == [x * x for x in range(200)]


def test_aprocess_stream_raises_task_error() -> None:
    """An error in aprocess_stream surfaces in the async for loop, after
    the results before it."""
    with WorkerPool(1, start_method="fork") as pool:

        async def collect() -> tuple[list[int], BaseException | None]:
            seen: list[int] = []
            try:
                async for result in pool.aprocess_stream(fail_on_three, range(6)):
                    seen.append(result)
            except TaskError as exc:
                return seen, exc
            return seen, None

        seen, error = run(collect)
    assert seen == [0, 1, 2]
    assert isinstance(error, TaskError) and error.index == 3


def test_aprocess_stream_return_exceptions_yields_task_error() -> None:
    """aprocess_stream(return_exceptions=True) yields the TaskError itself in
    the failing task's place, like process_stream."""
    with WorkerPool(2, start_method="fork") as pool:

        async def collect() -> list[Any]:
            return [r async for r in pool.aprocess_stream(
                fail_on_three, range(6), return_exceptions=True)]

        results = run(collect)
    assert len(results) == 6
    assert isinstance(results[3], TaskError) and results[3].index == 3
    assert results[:3] + results[4:] == [0, 1, 2, 4, 5]


def test_aprocess_stream_continue_on_error_raises_group_at_end() -> None:
    """aprocess_stream(continue_on_error=True) yields every success, then
    raises a TaskErrorGroup, like process_stream."""
    with WorkerPool(2, start_method="fork") as pool:

        async def collect() -> tuple[list[Any], BaseException | None]:
            seen: list[Any] = []
            try:
                async for result in pool.aprocess_stream(
                        fail_on_three, range(6), continue_on_error=True):
                    seen.append(result)
            except TaskErrorGroup as exc:
                return seen, exc
            return seen, None

        seen, group = run(collect)
    assert seen == [0, 1, 2, 4, 5]
    assert isinstance(group, TaskErrorGroup)
    assert [e.index for e in group.exceptions] == [3]


def test_cancelling_aprocess_stream_cancels_the_work(tmp_path: Path) -> None:
    """Cancelling the asyncio task looping over aprocess_stream closes the
    stream: no further task starts and the pool answers a new call within
    2 s although the running tasks sleep 30 s."""
    tasks = [(str(tmp_path), 0, 0.0)] + [(str(tmp_path), i, 30.0) for i in range(1, 10)]
    with WorkerPool(2, start_method="fork") as pool:

        async def main() -> tuple[list[int], bool]:
            seen: list[int] = []

            async def consume() -> None:
                async for result in pool.aprocess_stream(mark_then_sleep, tasks):
                    seen.append(result)

            work = asyncio.create_task(consume())
            await until(lambda: bool(seen) and len(started(tmp_path)) == 3, timeout=WAIT)
            work.cancel()
            await asyncio.wait([work], timeout=WAIT)
            return seen, work.cancelled()

        seen, cancelled = run(main)
        assert seen == [0]
        assert cancelled
        check_usable(pool)
        assert started(tmp_path) == {0, 1, 2}
        time.sleep(0.3)
        assert started(tmp_path) == {0, 1, 2}
