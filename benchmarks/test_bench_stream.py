"""Benchmark group ``stream``: tiny tasks streamed and consumed with ``sum()``.

Every test squares ``range(N)`` (N as in ``tiny``) lazily and sums the
results as they come: ``multiprocessing.Pool.imap`` at each chunksize the CLI
tries, against ``poolme_mp``'s ``process_stream``; serial ``sum(map(...))``
gives the scale.  Group ``stream-rss`` (full runs only) streams 10 million
inputs through poolme_mp and records this process's peak-RSS growth.
"""

import multiprocessing
from typing import Any

import pytest

from poolme_mp import WorkerPool, _bench

#: Peak-RSS growth, in MiB, above which streaming no longer counts as flat:
#: holding the 10 million results instead would take hundreds of MiB.
FLAT_RSS_MIB = 64


def stream_tasks(benchmark: Any, quick: bool, workers: int) -> int:
    """Join the ``stream`` group; how many inputs to stream."""
    tasks = _bench.stream_tasks(quick)
    benchmark.group = "stream"
    benchmark.extra_info.update(tasks=tasks, workers=workers)
    return tasks


def test_stream_serial(
    benchmark: Any, bench_quick: bool, bench_workers: int, bench_rounds: int
) -> None:
    """``sum(map(square, range(N)))`` in this process, for scale."""
    tasks = stream_tasks(benchmark, bench_quick, bench_workers)
    total = benchmark.pedantic(
        lambda: sum(map(_bench.square, range(tasks))), rounds=bench_rounds
    )
    assert total == _bench.sum_of_squares(tasks)


@pytest.mark.parametrize("chunksize", _bench.IMAP_CHUNKSIZES)
def test_stream_mp_pool_imap(
    benchmark: Any,
    bench_quick: bool,
    bench_workers: int,
    bench_rounds: int,
    chunksize: int,
) -> None:
    """``sum(Pool.imap(square, range(N), chunksize=chunksize))`` on a warm pool."""
    tasks = stream_tasks(benchmark, bench_quick, bench_workers)
    benchmark.extra_info["chunksize"] = chunksize
    with multiprocessing.Pool(bench_workers) as pool:
        pool.map(_bench.square, range(4 * bench_workers))
        total = benchmark.pedantic(
            _bench.imap_sum, args=(pool, tasks, chunksize), rounds=bench_rounds
        )
    assert total == _bench.sum_of_squares(tasks)


def test_stream_poolme_mp(
    benchmark: Any, bench_quick: bool, bench_workers: int, bench_rounds: int
) -> None:
    """``sum(pool.process_stream(square, range(N)))`` on a warm pool."""
    tasks = stream_tasks(benchmark, bench_quick, bench_workers)
    with WorkerPool(bench_workers) as pool:
        sum(pool.process_stream(_bench.square, range(4 * bench_workers)))
        total = benchmark.pedantic(
            lambda: sum(pool.process_stream(_bench.square, range(tasks))),
            rounds=bench_rounds,
        )
    assert total == _bench.sum_of_squares(tasks)


def test_stream_memory_poolme_mp(
    benchmark: Any, bench_quick: bool, bench_workers: int
) -> None:
    """Stream 10 million inputs through poolme_mp; peak RSS must stay flat.

    The peak is reset just before the stream, so the arrays that earlier tests
    keep do not hide its growth.  The time includes starting the pool and the
    list-input contrast; the RSS figures are in ``extra_info``.  Skipped with
    ``--bench-quick``, as in the CLI.
    """
    if bench_quick:
        pytest.skip("the 10-million-input memory check runs only in full runs")
    benchmark.group = "stream-rss"
    figure = benchmark.pedantic(_bench.measure_stream_memory, args=(bench_workers,))
    benchmark.extra_info.update(
        {k: v for k, v in figure.as_dict().items() if k != "samples"}
    )
    assert figure.status == "ok", figure.detail
    assert figure.value is not None and figure.value < FLAT_RSS_MIB, figure.detail
