"""Benchmark group ``startup``: pool construction to the first result.

Each round constructs a pool and maps a single task; shutting the pool down
happens in the round's teardown and is not timed.
"""

from collections.abc import Callable
from typing import Any

StartTimer = Callable[[Any, str], None]


def test_startup_fork_pool(benchmark: Any, time_pool_start: StartTimer) -> None:
    """Construct a fork-context ``multiprocessing.Pool``, get one result."""
    time_pool_start(benchmark, "mp.Pool(fork)")


def test_startup_poolme_mp(benchmark: Any, time_pool_start: StartTimer) -> None:
    """Construct a ``poolme_mp.WorkerPool``, get one result."""
    time_pool_start(benchmark, "poolme_mp")


def test_startup_poolme_mp_fork(benchmark: Any, time_pool_start: StartTimer) -> None:
    """Construct a ``poolme_mp.WorkerPool(start_method="fork")``, get one result."""
    time_pool_start(benchmark, "poolme_mp(fork)")
