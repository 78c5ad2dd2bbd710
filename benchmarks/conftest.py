"""Shared fixtures for the pytest-benchmark versions of ``poolme-mp bench``.

The workloads, task functions and pool runners are those of
:mod:`poolme_mp._bench`, so these numbers and the CLI's measure the same thing.
Each test times only the map call of an already started and warmed pool, puts
itself in its workload's ``benchmark.group`` so the peers line up side by side,
and asserts that the pool returned exactly the serial results.  The stream,
submit and progress groups time their own calls the same way.

Options: ``--bench-quick`` for the CLI's ``--quick`` inputs and a single round,
``--bench-workers N`` to override the usable CPU count.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import pytest

from poolme_mp import _bench

#: Timed rounds per test, after one untimed warm-up map.
FULL_ROUNDS = 3
QUICK_ROUNDS = 1
#: Cold pool starts per start-up test.
STARTUP_ROUNDS = 5

STARTUP_RUNNERS_BY_NAME = {runner.name: runner for runner in _bench.STARTUP_RUNNERS}


def pytest_addoption(parser: pytest.Parser) -> None:
    """The knobs that ``poolme-mp bench`` has as ``--quick`` and ``--workers``."""
    group = parser.getgroup("poolme_mp benchmarks")
    group.addoption(
        "--bench-quick",
        action="store_true",
        help="use the smaller --quick inputs and one timed round",
    )
    group.addoption(
        "--bench-workers",
        type=int,
        default=_bench.usable_cpu_count(),
        help="worker processes per pool (default: usable CPUs)",
    )


@dataclass
class BenchCase:
    """One workload's tasks and serial results, ready to time a peer on."""

    workload: _bench.Workload
    tasks: Sequence[Any]
    expected: Sequence[Any]
    workers: int
    rounds: int

    def run(self, benchmark: Any, runner_name: str) -> None:
        """Time ``runner_name``'s map of this workload; check it matches serial.

        A runner's one-time ``prepare`` (``poolme_mp.share``) happens before
        the timing; its seconds go to ``extra_info["setup_seconds"]``.
        """
        runner = self.runner_named(runner_name)
        if runner.optional_module:
            pytest.importorskip(runner.optional_module)
        benchmark.group = self.workload.name
        benchmark.extra_info.update(tasks=len(self.tasks), workers=self.workers)
        tasks, setup_seconds = _bench.prepare_tasks(runner, self.tasks)
        if setup_seconds is not None:
            benchmark.extra_info["setup_seconds"] = setup_seconds
        with runner.open(self.workers) as mapper:
            _bench.warm_up(mapper, self.workload.fn, tasks, self.workers)
            results = benchmark.pedantic(
                mapper,
                args=(self.workload.fn, tasks),
                rounds=self.rounds,
                iterations=1,
            )
        assert self.workload.check(results, self.expected), _bench.describe_mismatch(
            results, self.expected
        )

    def runner_named(self, name: str) -> _bench.Runner:
        """This workload's runner called ``name`` (``typed`` has its own)."""
        runners = _bench.runners_for(self.workload)
        return next(runner for runner in runners if runner.name == name)


@pytest.fixture(scope="session")
def bench_quick(request: pytest.FixtureRequest) -> bool:
    """Whether ``--bench-quick`` was given."""
    return bool(request.config.getoption("--bench-quick"))


@pytest.fixture(scope="session")
def bench_workers(request: pytest.FixtureRequest) -> int:
    """Worker processes per pool."""
    return int(request.config.getoption("--bench-workers"))


@pytest.fixture(scope="session")
def bench_rounds(bench_quick: bool) -> int:
    """Timed rounds per test: one with ``--bench-quick``, else three."""
    return QUICK_ROUNDS if bench_quick else FULL_ROUNDS


@pytest.fixture(scope="session")
def bench_case(bench_quick: bool, bench_workers: int) -> Callable[[str], BenchCase]:
    """``bench_case(name)``: that workload's tasks and serial results, built once.

    Building the tasks and the serial reference happens outside any timing and
    only once per session, however many peers are benchmarked on them.
    """
    cases: dict[str, BenchCase] = {}

    def case_for(name: str) -> BenchCase:
        if name not in cases:
            workload = _bench.WORKLOADS[name]
            tasks = workload.build_tasks(bench_quick)
            reference = _bench.reference_runner(workload)
            with reference.open(bench_workers) as serial_map:
                expected = serial_map(workload.fn, tasks)
            cases[name] = BenchCase(
                workload,
                tasks,
                expected,
                bench_workers,
                QUICK_ROUNDS if bench_quick else FULL_ROUNDS,
            )
        return cases[name]

    return case_for


@pytest.fixture
def time_pool_start(bench_workers: int) -> Callable[[Any, str], None]:
    """``time_pool_start(benchmark, runner)``: construct to first 1-task result.

    Each round constructs a pool and maps one task; the pool is shut down in
    the round's teardown, outside the timing.
    """

    def run(benchmark: Any, runner_name: str) -> None:
        runner = STARTUP_RUNNERS_BY_NAME[runner_name]
        benchmark.group = "startup"
        benchmark.extra_info.update(workers=bench_workers)

        lifetimes: list[contextlib.ExitStack] = []

        def new_slot() -> tuple[tuple[contextlib.ExitStack], dict[str, Any]]:
            lifetimes.append(contextlib.ExitStack())
            return (lifetimes[-1],), {}

        def start_and_map_one(pool_lifetime: contextlib.ExitStack) -> Sequence[Any]:
            mapper = pool_lifetime.enter_context(runner.open(bench_workers))
            return mapper(_bench.square, [3])

        def shut_down(pool_lifetime: contextlib.ExitStack) -> None:
            pool_lifetime.close()

        result = benchmark.pedantic(
            start_and_map_one,
            setup=new_slot,
            teardown=shut_down,
            rounds=STARTUP_ROUNDS,
        )
        for lifetime in lifetimes:  # --benchmark-disable skips the teardown
            lifetime.close()
        assert result == [9]

    return run
