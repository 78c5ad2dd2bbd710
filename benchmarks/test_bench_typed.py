"""Benchmark group ``typed``: ``x * 0.5`` over a float64 numpy vector.

The input is ``np.arange(N, dtype=np.float64)`` and each task one element.
Serial, ``multiprocessing.Pool.map`` and plain ``poolme_mp`` map over
``xs.tolist()`` (converted inside the timing) and return lists;
``poolme_mp(dtype)`` takes the array itself and writes the floats straight
into a shared result array, which measures what ``dtype=`` saves.
"""

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from conftest import BenchCase

WORKLOAD = "typed"
Case = Callable[[str], "BenchCase"]


def test_typed_serial(benchmark: Any, bench_case: Case) -> None:
    """``[half(x) for x in xs.tolist()]`` in this process: the reference."""
    bench_case(WORKLOAD).run(benchmark, "serial")


def test_typed_mp_pool(benchmark: Any, bench_case: Case) -> None:
    """``Pool.map(half, xs.tolist())`` with the chunksize Pool picks."""
    bench_case(WORKLOAD).run(benchmark, "mp.Pool")


def test_typed_poolme_mp(benchmark: Any, bench_case: Case) -> None:
    """``pool.process(half, xs.tolist())``: a list in, a list out."""
    bench_case(WORKLOAD).run(benchmark, "poolme_mp")


def test_typed_poolme_mp_dtype(benchmark: Any, bench_case: Case) -> None:
    """``pool.process(half, xs, dtype=np.float64)``: an array in, an array out."""
    bench_case(WORKLOAD).run(benchmark, "poolme_mp(dtype)")
