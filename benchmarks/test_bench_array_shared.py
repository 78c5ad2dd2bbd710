"""Benchmark group ``array-shared``: ``array-sum`` over ``poolme_mp.share`` arrays.

The same arrays and sums as ``array-sum``, but poolme_mp gets them as
``[poolme_mp.share(a) for a in arrays]``, made once before the timing (its
seconds are in ``extra_info["setup_seconds"]``), so each task sends only a
reference.  Only serial is timed beside it: the peers have no equivalent,
and joblib memory-maps its inputs afresh on every call.
"""

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from conftest import BenchCase

WORKLOAD = "array-shared"
Case = Callable[[str], "BenchCase"]


def test_array_shared_serial(benchmark: Any, bench_case: Case) -> None:
    """Sum the plain arrays in this process: the reference."""
    bench_case(WORKLOAD).run(benchmark, "serial")


def test_array_shared_poolme_mp(benchmark: Any, bench_case: Case) -> None:
    """``pool.process(np.sum, shared)``: the arrays travel by reference."""
    bench_case(WORKLOAD).run(benchmark, "poolme_mp(shared)")
