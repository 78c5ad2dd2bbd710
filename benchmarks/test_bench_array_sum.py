"""Benchmark group ``array-sum``: ``np.sum`` of 8 MB float64 arrays.

Each task is one array of a million float64 values; the worker sums it and
returns one float.  The sum takes well under a millisecond, so this measures
how each pool moves large numpy inputs to its workers: pickled through pipes
(multiprocessing, ProcessPoolExecutor, mpire), memory-mapped files (joblib)
or poolme_mp's shared-memory arenas.
"""

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from conftest import BenchCase

WORKLOAD = "array-sum"
Case = Callable[[str], "BenchCase"]


def test_array_sum_serial(benchmark: Any, bench_case: Case) -> None:
    """Sum every array in this process, one after another: the reference."""
    bench_case(WORKLOAD).run(benchmark, "serial")


def test_array_sum_mp_pool(benchmark: Any, bench_case: Case) -> None:
    """Sum through ``multiprocessing.Pool.map``: each array pickled to a worker."""
    bench_case(WORKLOAD).run(benchmark, "mp.Pool")


def test_array_sum_process_pool_executor(benchmark: Any, bench_case: Case) -> None:
    """Sum through ``ProcessPoolExecutor.map`` with Pool's default chunksize."""
    bench_case(WORKLOAD).run(benchmark, "ProcessPoolExecutor")


def test_array_sum_joblib(benchmark: Any, bench_case: Case) -> None:
    """Sum through ``joblib.Parallel``, which memory-maps arrays over 1 MB."""
    bench_case(WORKLOAD).run(benchmark, "joblib")


def test_array_sum_mpire(benchmark: Any, bench_case: Case) -> None:
    """Sum through ``mpire.WorkerPool.map`` with workers kept alive."""
    bench_case(WORKLOAD).run(benchmark, "mpire")


def test_array_sum_poolme_mp(benchmark: Any, bench_case: Case) -> None:
    """Sum through ``poolme_mp.WorkerPool.process`` (arrays via its arenas)."""
    bench_case(WORKLOAD).run(benchmark, "poolme_mp")
