"""Benchmark group ``images``: gaussian blur + Sobel on sample-image tiles.

Each task is one 128x128 uint8 tile (or a rotation/mirror of one) cut from the
images scikit-image ships; the worker filters it with numpy/scipy code and
returns the edge-pixel count and rounded magnitude sum.  This measures moving
numpy arrays to workers plus roughly a millisecond of numpy work per task.
"""

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from conftest import BenchCase

WORKLOAD = "images"
Case = Callable[[str], "BenchCase"]


def test_images_serial(benchmark: Any, bench_case: Case) -> None:
    """Filter every tile in this process, one after another: the reference."""
    bench_case(WORKLOAD).run(benchmark, "serial")


def test_images_mp_pool(benchmark: Any, bench_case: Case) -> None:
    """Filter through ``multiprocessing.Pool.map`` with its default chunksize."""
    bench_case(WORKLOAD).run(benchmark, "mp.Pool")


def test_images_process_pool_executor(benchmark: Any, bench_case: Case) -> None:
    """Filter through ``ProcessPoolExecutor.map`` with Pool's default chunksize."""
    bench_case(WORKLOAD).run(benchmark, "ProcessPoolExecutor")


def test_images_joblib(benchmark: Any, bench_case: Case) -> None:
    """Filter through ``joblib.Parallel`` (loky backend, automatic batching)."""
    bench_case(WORKLOAD).run(benchmark, "joblib")


def test_images_mpire(benchmark: Any, bench_case: Case) -> None:
    """Filter through ``mpire.WorkerPool.map`` with workers kept alive."""
    bench_case(WORKLOAD).run(benchmark, "mpire")


def test_images_poolme_mp(benchmark: Any, bench_case: Case) -> None:
    """Filter through ``poolme_mp.WorkerPool.process``."""
    bench_case(WORKLOAD).run(benchmark, "poolme_mp")
