"""Benchmark group ``ast``: ``ast.parse`` every stdlib ``.py`` file.

Each task is one path; the worker reads and parses the file and returns its
node and definition counts.  File sizes span four orders of magnitude, so this
measures how well each pool balances uneven, medium-grained tasks.
"""

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from conftest import BenchCase

WORKLOAD = "ast"
Case = Callable[[str], "BenchCase"]


def test_ast_serial(benchmark: Any, bench_case: Case) -> None:
    """Parse every file in this process, one after another: the reference."""
    bench_case(WORKLOAD).run(benchmark, "serial")


def test_ast_mp_pool(benchmark: Any, bench_case: Case) -> None:
    """Parse through ``multiprocessing.Pool.map`` with its default chunksize."""
    bench_case(WORKLOAD).run(benchmark, "mp.Pool")


def test_ast_process_pool_executor(benchmark: Any, bench_case: Case) -> None:
    """Parse through ``ProcessPoolExecutor.map`` with Pool's default chunksize."""
    bench_case(WORKLOAD).run(benchmark, "ProcessPoolExecutor")


def test_ast_joblib(benchmark: Any, bench_case: Case) -> None:
    """Parse through ``joblib.Parallel`` (loky backend, automatic batching)."""
    bench_case(WORKLOAD).run(benchmark, "joblib")


def test_ast_mpire(benchmark: Any, bench_case: Case) -> None:
    """Parse through ``mpire.WorkerPool.map`` with workers kept alive."""
    bench_case(WORKLOAD).run(benchmark, "mpire")


def test_ast_poolme_mp(benchmark: Any, bench_case: Case) -> None:
    """Parse through ``poolme_mp.WorkerPool.process``."""
    bench_case(WORKLOAD).run(benchmark, "poolme_mp")
