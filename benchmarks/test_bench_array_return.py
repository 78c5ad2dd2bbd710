"""Benchmark group ``array-return``: ``a * 2`` of 8 MB float64 arrays.

Each task is one array of a million float64 values; the worker doubles it
and returns the new 8 MB array.  This measures moving large numpy data both
ways: to the workers and, unlike ``array-sum``, back to the parent.
"""

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from conftest import BenchCase

WORKLOAD = "array-return"
Case = Callable[[str], "BenchCase"]


def test_array_return_serial(benchmark: Any, bench_case: Case) -> None:
    """Double every array in this process, one after another: the reference."""
    bench_case(WORKLOAD).run(benchmark, "serial")


def test_array_return_mp_pool(benchmark: Any, bench_case: Case) -> None:
    """Double through ``multiprocessing.Pool.map``: pickled there and back."""
    bench_case(WORKLOAD).run(benchmark, "mp.Pool")


def test_array_return_process_pool_executor(benchmark: Any, bench_case: Case) -> None:
    """Double through ``ProcessPoolExecutor.map`` with Pool's default chunksize."""
    bench_case(WORKLOAD).run(benchmark, "ProcessPoolExecutor")


def test_array_return_joblib(benchmark: Any, bench_case: Case) -> None:
    """Double through ``joblib.Parallel`` (inputs memory-mapped, results pickled)."""
    bench_case(WORKLOAD).run(benchmark, "joblib")


def test_array_return_mpire(benchmark: Any, bench_case: Case) -> None:
    """Double through ``mpire.WorkerPool.map``, one array per result."""
    bench_case(WORKLOAD).run(benchmark, "mpire")


def test_array_return_poolme_mp(benchmark: Any, bench_case: Case) -> None:
    """Double through ``poolme_mp.WorkerPool.process`` (task and result arenas)."""
    bench_case(WORKLOAD).run(benchmark, "poolme_mp")
