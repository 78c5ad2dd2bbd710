"""Pins the public API's generic signatures; checked by ``mypy --strict``, never run.

Each ``assert_type`` fails type checking if an inferred type drifts (for example
to ``Any``). Each ``# type: ignore[...]`` line is a call that must be rejected:
strict mode reports an unused ignore, so a signature that grows too loose to
catch the mistake fails the check too. pytest does not collect this file.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from concurrent.futures import Future
from typing import assert_type

from poolme_mp import ResultStream, TaskError, WorkerPool


def square(x: int) -> int:
    return x * x


def scale(x: int, *, by: float) -> float:
    return x * by


def add(a: int, b: int) -> int:
    return a + b


def construction() -> None:
    assert_type(WorkerPool(), WorkerPool)
    assert_type(WorkerPool(None), WorkerPool)
    WorkerPool(2, start_method="forkserver", buffer_size=1 << 20)
    WorkerPool(2, continue_on_error=True, max_attempts=3)
    with WorkerPool(2) as pool:
        assert_type(pool, WorkerPool)


def process(pool: WorkerPool) -> None:
    assert_type(pool.process(len, ["a"]), list[int])
    assert_type(pool.process(square, range(3)), list[int])
    assert_type(pool.process(square, (i for i in range(3))), list[int])
    assert_type(pool.process(square, [1], return_exceptions=False), list[int])
    assert_type(pool.process(square, [1], timeout=1.5, progress=True), list[int])
    pool.process(square, ["a"])  # type: ignore[arg-type]


def process_collecting_errors(pool: WorkerPool) -> None:
    results = pool.process(square, [1, 2], return_exceptions=True)
    assert_type(results, list[int | TaskError])
    for result in results:
        if isinstance(result, TaskError):
            assert_type(result, TaskError)
        else:
            assert_type(result, int)


def process_map(pool: WorkerPool) -> None:
    assert_type(pool.process_map(len, {"k": "v"}), dict[str, int])
    assert_type(pool.process_map(square, {"a": 1, "b": 2}), dict[str, int])
    assert_type(pool.process_map(square, {1.5: 1}), dict[float, int])
    pool.process_map(square, {"k": "v"})  # type: ignore[arg-type]


def process_stream(pool: WorkerPool) -> None:
    assert_type(pool.process_stream(square, [1, 2]), ResultStream[int])
    assert_type(pool.process_stream(len, ["a"], ordered=False), ResultStream[int])
    for item in pool.process_stream(square, range(3)):
        assert_type(item, int)


def submit(pool: WorkerPool) -> None:
    assert_type(pool.submit(len, "abc"), Future[int])
    assert_type(pool.submit(square, 3), Future[int])
    assert_type(pool.submit(scale, 3, by=0.5), Future[float])
    assert_type(pool.submit(square, 3).result(timeout=1), int)
    pool.submit(square, "3")  # type: ignore[arg-type]
    pool.submit(scale, 3)  # type: ignore[call-arg]


def map_(pool: WorkerPool) -> None:
    assert_type(pool.map(len, ["a"]), Iterator[int])
    assert_type(pool.map(square, [1], timeout=2.0, chunksize=4), Iterator[int])
    assert_type(pool.map(add, [1], [2]), Iterator[int])


async def aprocess(pool: WorkerPool) -> None:
    assert_type(await pool.aprocess(square, [1, 2]), list[int])
    assert_type(await pool.aprocess(len, ["a"]), list[int])


async def aprocess_stream(pool: WorkerPool) -> None:
    assert_type(pool.aprocess_stream(square, [1, 2]), AsyncIterator[int])
    async for item in pool.aprocess_stream(len, ["a"]):
        assert_type(item, int)
