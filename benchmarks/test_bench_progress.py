"""Benchmark group ``progress``: what ``progress=True`` costs on tiny tasks.

Both tests square the ``tiny`` workload's integers with ``pool.process`` on a
warm pool; the second draws a tqdm bar into a throwaway ``io.StringIO``
(``contextlib.redirect_stderr``), so the difference is the bar's overhead.
"""

import contextlib
import io
from typing import Any

from poolme_mp import WorkerPool, _bench


def time_process(benchmark: Any, quick: bool, workers: int, progress: bool) -> None:
    """Time ``pool.process(square, tasks, progress=progress)``; check the results."""
    tasks = _bench.tiny_tasks(quick)
    benchmark.group = "progress"
    benchmark.extra_info.update(tasks=len(tasks), workers=workers)
    with (
        WorkerPool(workers) as pool,
        contextlib.redirect_stderr(io.StringIO()) as bar_output,
    ):
        pool.process(_bench.square, tasks[: 4 * workers], progress=progress)
        results = benchmark.pedantic(
            lambda: pool.process(_bench.square, tasks, progress=progress),
            rounds=_bench.PROGRESS_PAIRS,
        )
    benchmark.extra_info["bar_characters"] = len(bar_output.getvalue())
    assert results == list(map(_bench.square, tasks))


def test_progress_off(benchmark: Any, bench_quick: bool, bench_workers: int) -> None:
    """``pool.process(square, xs)``: the reference."""
    time_process(benchmark, bench_quick, bench_workers, progress=False)


def test_progress_on(benchmark: Any, bench_quick: bool, bench_workers: int) -> None:
    """``pool.process(square, xs, progress=True)``, the bar into ``io.StringIO``."""
    time_process(benchmark, bench_quick, bench_workers, progress=True)
