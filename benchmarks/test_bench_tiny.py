"""Benchmark group ``tiny``: ``x * x`` over a million integers.

The task does almost nothing, so this measures each pool's per-task cost:
batching, pickling and the round trip to the workers and back.
"""

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from conftest import BenchCase

WORKLOAD = "tiny"
Case = Callable[[str], "BenchCase"]


def test_tiny_serial(benchmark: Any, bench_case: Case) -> None:
    """Square every number with ``list(map(...))`` in this process."""
    bench_case(WORKLOAD).run(benchmark, "serial")


def test_tiny_mp_pool(benchmark: Any, bench_case: Case) -> None:
    """Square through ``multiprocessing.Pool.map`` with its default chunksize."""
    bench_case(WORKLOAD).run(benchmark, "mp.Pool")


def test_tiny_process_pool_executor(benchmark: Any, bench_case: Case) -> None:
    """Square through ``ProcessPoolExecutor.map`` with Pool's default chunksize."""
    bench_case(WORKLOAD).run(benchmark, "ProcessPoolExecutor")


def test_tiny_joblib(benchmark: Any, bench_case: Case) -> None:
    """Square through ``joblib.Parallel`` (loky backend, automatic batching)."""
    bench_case(WORKLOAD).run(benchmark, "joblib")


def test_tiny_mpire(benchmark: Any, bench_case: Case) -> None:
    """Square through ``mpire.WorkerPool.map`` with workers kept alive."""
    bench_case(WORKLOAD).run(benchmark, "mpire")


def test_tiny_poolme_mp(benchmark: Any, bench_case: Case) -> None:
    """Square through ``poolme_mp.WorkerPool.process``."""
    bench_case(WORKLOAD).run(benchmark, "poolme_mp")
