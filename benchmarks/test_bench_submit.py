"""Benchmark group ``submit``: one ``submit`` to an idle, warm pool.

Each round submits ``square(3)`` and waits for ``.result()``; a short untimed
pause before every round lets the workers go idle, so this measures the
latency a lone request sees, not the throughput of a queue of them.
"""

from concurrent.futures import ProcessPoolExecutor
from typing import Any

from poolme_mp import WorkerPool, _bench


def join_group(benchmark: Any, workers: int) -> None:
    """Put this test in the ``submit`` group."""
    benchmark.group = "submit"
    benchmark.extra_info.update(workers=workers)


def test_submit_process_pool_executor(
    benchmark: Any, bench_quick: bool, bench_workers: int
) -> None:
    """``ProcessPoolExecutor.submit(square, 3).result()``."""
    join_group(benchmark, bench_workers)
    with ProcessPoolExecutor(bench_workers) as executor:
        list(executor.map(_bench.square, range(4 * bench_workers)))
        value = benchmark.pedantic(
            lambda: executor.submit(_bench.square, 3).result(),
            setup=_bench.idle_pause,
            rounds=_bench.submit_tries(bench_quick),
        )
    assert value == 9


def test_submit_poolme_mp(
    benchmark: Any, bench_quick: bool, bench_workers: int
) -> None:
    """``poolme_mp.WorkerPool.submit(square, 3).result()``."""
    join_group(benchmark, bench_workers)
    with WorkerPool(bench_workers) as pool:
        pool.process(_bench.square, range(4 * bench_workers))
        value = benchmark.pedantic(
            lambda: pool.submit(_bench.square, 3).result(),
            setup=_bench.idle_pause,
            rounds=_bench.submit_tries(bench_quick),
        )
    assert value == 9
