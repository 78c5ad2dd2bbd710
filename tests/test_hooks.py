"""Worker hooks (on_worker_start, on_worker_stop), parent callbacks
(on_task_start, on_task_end, on_error, on_retry) and progress bars.

Hooks run in the workers, so they live at module level where spawn and
forkserver workers can import them; parent callbacks are plain closures.
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import functools
import io
import logging
import os
import re
import time
from pathlib import Path
from typing import Any

import pytest

from poolme_mp import (
    BrokenPoolError,
    CallbackError,
    RetryPolicy,
    TaskError,
    TaskErrorGroup,
    WorkerPool,
)

WAIT = 30.0

# Set by on_worker_start in each worker; never in the parent.
WORKER_STATE: tuple[str, int] | None = None


# -- worker-side hooks and tasks ------------------------------------------------


def set_worker_state(token: str) -> None:
    global WORKER_STATE
    WORKER_STATE = (token, os.getpid())


def read_worker_state(_: Any) -> tuple[tuple[str, int] | None, int]:
    return WORKER_STATE, os.getpid()


def write_stop_file(directory: str) -> None:
    Path(directory, f"stopped-{os.getpid()}").write_text("")


def fail_to_start() -> None:
    raise ValueError("worker setup failed: no config")


def fail_to_stop() -> None:
    raise RuntimeError("teardown broke")


def square(x: int) -> int:
    return x * x


def pid_after_nap(seconds: float) -> int:
    time.sleep(seconds)
    return os.getpid()


def fail_on(x: int) -> int:
    if x in (3, 7):
        raise ValueError(f"bad {x}")
    return x * x


def always_fail_logging_time(item: tuple[str, int]) -> None:
    """Append this attempt's start time to a file, then fail."""
    directory, index = item
    with open(Path(directory, f"attempts-{index}"), "a") as f:
        f.write(f"{time.time()}\n")
    raise ValueError(f"attempt failed for {index}")


def succeed_on_third_attempt(item: tuple[str, int]) -> int:
    directory, index = item
    path = Path(directory, f"attempts-{index}")
    with open(path, "a") as f:
        f.write("x")
    attempts = len(path.read_text())
    if attempts < 3:
        raise ValueError(f"attempt {attempts} of {index} failed")
    return index * 100


def first_fails_others_nap(x: int) -> int:
    if x == 0:
        raise ValueError("first task fails")
    time.sleep(0.2)
    return x


# -- helpers ---------------------------------------------------------------------------


def check_usable(pool: WorkerPool, within: float = 2.0) -> None:
    begin = time.monotonic()
    assert pool.process(square, list(range(8))) == [x * x for x in range(8)]
    assert time.monotonic() - begin < within


# -- on_worker_start / on_worker_stop -----------------------------------------------------


def test_on_worker_start_sets_state_tasks_can_read(start_method: str) -> None:
    """on_worker_start runs in each worker before its tasks, and the state
    it sets is visible to them (and not set in the parent)."""
    hook = functools.partial(set_worker_state, "token-42")
    with WorkerPool(2, start_method=start_method, on_worker_start=hook) as pool:
        results = pool.process(read_worker_state, range(20))
    assert len(results) == 20
    for state, pid in results:
        assert state == ("token-42", pid)
    assert WORKER_STATE is None


def test_on_worker_stop_runs_at_clean_shutdown(start_method: str, tmp_path: Path) -> None:
    """on_worker_stop runs in every worker when the pool shuts down cleanly."""
    hook = functools.partial(write_stop_file, str(tmp_path))
    with WorkerPool(2, start_method=start_method, on_worker_stop=hook) as pool:
        pids = set(pool.process(pid_after_nap, [0.2] * 4))
        assert len(pids) == 2
        assert list(tmp_path.iterdir()) == []  # not before shutdown
    assert {p.name for p in tmp_path.iterdir()} == {f"stopped-{pid}" for pid in pids}


def test_on_worker_stop_runs_when_a_worker_is_recycled(tmp_path: Path) -> None:
    """A worker replaced after max_tasks_per_worker exits cleanly, so its
    on_worker_stop runs too."""
    hook = functools.partial(write_stop_file, str(tmp_path))
    with WorkerPool(1, start_method="fork", max_tasks_per_worker=2, on_worker_stop=hook) as pool:
        pids = [pool.submit(pid_after_nap, 0.0).result(timeout=WAIT) for _ in range(6)]
    assert len(set(pids)) == 3
    assert {p.name for p in tmp_path.iterdir()} == {f"stopped-{pid}" for pid in set(pids)}


def test_failing_on_worker_start_breaks_the_pool_fast(start_method: str) -> None:
    """A raising on_worker_start fails the pool fast with BrokenPoolError
    carrying the original message and exception (__cause__); later calls
    raise it at once, and shutdown does not hang."""
    pool = WorkerPool(2, start_method=start_method, on_worker_start=fail_to_start)
    try:
        begin = time.monotonic()
        with pytest.raises(BrokenPoolError) as info:
            pool.process(square, [1, 2, 3])
        assert time.monotonic() - begin < 10.0
        error = info.value
        assert isinstance(error, concurrent.futures.BrokenExecutor)
        assert "worker setup failed: no config" in str(error)
        assert isinstance(error.__cause__, ValueError)
        assert str(error.__cause__) == "worker setup failed: no config"
        begin = time.monotonic()
        with pytest.raises(BrokenPoolError):
            pool.process(square, [1])
        with pytest.raises(BrokenPoolError):
            pool.submit(square, 1)
        with pytest.raises(BrokenPoolError):
            list(pool.process_stream(square, [1]))
        assert time.monotonic() - begin < 0.5
    finally:
        begin = time.monotonic()
        pool.shutdown(wait=True)
        assert time.monotonic() - begin < 5.0


def test_failing_on_worker_stop_is_logged_and_shutdown_ends(
        start_method: str, caplog: pytest.LogCaptureFixture) -> None:
    """A raising on_worker_stop is logged at ERROR on poolme_mp.engine, once
    per worker, and shutdown still finishes promptly."""
    with caplog.at_level(logging.ERROR, logger="poolme_mp.engine"):
        pool = WorkerPool(2, start_method=start_method, on_worker_stop=fail_to_stop)
        assert pool.process(square, range(10)) == [x * x for x in range(10)]
        begin = time.monotonic()
        pool.shutdown(wait=True)
        assert time.monotonic() - begin < 5.0
    records = [r for r in caplog.records
               if r.name == "poolme_mp.engine" and r.levelno == logging.ERROR]
    assert len(records) == 2
    for record in records:
        assert "on_worker_stop" in record.getMessage()
        assert "teardown broke" in record.getMessage()


# -- parent callbacks -----------------------------------------------------------------------


def test_task_start_and_end_fire_once_per_task() -> None:
    """on_task_start(index) and on_task_end(index, result) fire exactly once
    per task, start before end."""
    events: list[tuple[str, Any, Any]] = []
    with WorkerPool(2, start_method="fork",
                    on_task_start=lambda i: events.append(("start", i, None)),
                    on_task_end=lambda i, r: events.append(("end", i, r))) as pool:
        assert pool.process(square, range(30)) == [x * x for x in range(30)]
    starts = [i for kind, i, _ in events if kind == "start"]
    ends = {i: r for kind, i, r in events if kind == "end"}
    assert collections.Counter(starts) == collections.Counter(range(30))
    assert len([e for e in events if e[0] == "end"]) == 30
    assert ends == {i: i * i for i in range(30)}
    for i in range(30):
        assert events.index(("start", i, None)) < events.index(("end", i, i * i))


def test_process_map_callbacks_get_keys() -> None:
    """In process_map, on_task_start and on_task_end get the task's key."""
    starts: list[Any] = []
    ends: list[tuple[Any, Any]] = []
    mapping = {f"key-{c}": i for i, c in enumerate("abcdefgh")}
    with WorkerPool(2, start_method="fork", on_task_start=starts.append,
                    on_task_end=lambda k, r: ends.append((k, r))) as pool:
        assert pool.process_map(square, mapping) == {k: v * v for k, v in mapping.items()}
    assert sorted(starts) == sorted(mapping)
    assert sorted(ends) == sorted((k, v * v) for k, v in mapping.items())


def test_on_error_and_on_task_end_receive_task_errors() -> None:
    """on_error gets each failure's TaskError, and on_task_end gets it as the
    failed task's outcome."""
    errors: list[TaskError] = []
    ends: dict[int, Any] = {}
    with WorkerPool(2, start_method="fork", on_error=errors.append,
                    on_task_end=ends.__setitem__) as pool:
        with pytest.raises(TaskErrorGroup):
            pool.process(fail_on, range(10), continue_on_error=True)
    assert sorted(e.index for e in errors) == [3, 7]
    for error in errors:
        assert isinstance(error, TaskError)
        assert isinstance(error.__cause__, ValueError)
        assert str(error.__cause__) == f"bad {error.index}"
    assert sorted(ends) == list(range(10))
    assert {i: r for i, r in ends.items() if i not in (3, 7)} == {
        i: i * i for i in range(10) if i not in (3, 7)}
    assert ends[3] in errors and ends[7] in errors


def test_on_retry_reports_attempts_and_backoff_delays(tmp_path: Path) -> None:
    """on_retry(task, attempt, exc, delay) fires before attempts 2, 3, ...
    with the backoff's delays (capped at max_delay), and each retry really
    waits that long."""
    calls: list[tuple[Any, int, BaseException, float]] = []
    policy = RetryPolicy(max_attempts=5, initial_delay=0.05, multiplier=3.0, max_delay=0.2)
    with WorkerPool(1, start_method="fork",
                    on_retry=lambda *args: calls.append(args)) as pool:
        with pytest.raises(TaskError) as info:
            pool.process(always_fail_logging_time, [(str(tmp_path), 0)], retry=policy)
    assert info.value.attempts == 5
    assert [(task, attempt) for task, attempt, _, _ in calls] == [(0, 2), (0, 3), (0, 4), (0, 5)]
    assert [delay for *_, delay in calls] == pytest.approx([0.05, 0.15, 0.2, 0.2])
    for _, _, exc, _ in calls:
        assert isinstance(exc, ValueError)
        assert str(exc) == "attempt failed for 0"
    times = [float(line) for line in Path(tmp_path, "attempts-0").read_text().split()]
    gaps = [b - a for a, b in zip(times, times[1:], strict=False)]
    assert len(gaps) == 4
    for gap, delay in zip(gaps, [0.05, 0.15, 0.2, 0.2], strict=True):
        assert delay * 0.95 <= gap < delay + 1.0


def test_on_retry_then_success(tmp_path: Path) -> None:
    """A task that succeeds on its third attempt reports retries 2 and 3
    only, and its result is returned; pool-level retry options apply."""
    calls: list[tuple[Any, int, float]] = []
    with WorkerPool(2, start_method="fork", max_attempts=4, initial_delay=0.01,
                    on_retry=lambda t, a, e, d: calls.append((t, a, d))) as pool:
        results = pool.process(succeed_on_third_attempt, [(str(tmp_path), i) for i in range(3)])
    assert results == [0, 100, 200]
    assert sorted((t, a) for t, a, _ in calls) == [(0, 2), (0, 3), (1, 2), (1, 3), (2, 2), (2, 3)]
    assert sorted({round(d, 6) for _, a, d in calls if a == 2}) == [0.01]
    assert sorted({round(d, 6) for _, a, d in calls if a == 3}) == [0.02]


@pytest.mark.parametrize("which", ["on_task_start", "on_task_end", "on_error", "on_retry"])
def test_raising_callback_raises_callback_error(which: str) -> None:
    """A parent callback that raises makes the call raise CallbackError
    promptly, with the original exception as __cause__; the pool stays
    usable."""
    raised: list[BaseException] = []

    def callback(*args: Any) -> None:
        if not raised:
            exc = LookupError(f"{which} blew up")
            raised.append(exc)
            raise exc

    options: dict[str, Any] = {which: callback}
    call_options: dict[str, Any] = {"continue_on_error": True}
    if which == "on_retry":
        call_options["retry"] = RetryPolicy(max_attempts=3, initial_delay=0.01)
    # 20 tasks of 0.2 s on 2 workers take 2 s in all.
    with WorkerPool(2, start_method="fork", **options) as pool:
        begin = time.monotonic()
        with pytest.raises(CallbackError) as info:
            pool.process(first_fails_others_nap, range(20), **call_options)
        assert time.monotonic() - begin < 1.0
        assert len(raised) == 1
        assert info.value.__cause__ is raised[0]
        assert f"{which} blew up" in str(info.value)
        check_usable(pool)


# -- progress --------------------------------------------------------------------------------


def final_counts(text: str) -> list[tuple[int, int | None]]:
    """(n, total) of each tqdm bar state written, e.g. '20/20' -> (20, 20)."""
    states = re.split(r"[\r\n]", text)
    found: list[tuple[int, int | None]] = []
    for state in states:
        match = re.search(r"\b(\d+)/(\d+) \[", state)
        if match:
            found.append((int(match.group(1)), int(match.group(2))))
            continue
        match = re.search(r"\b(\d+)task \[", state)
        if match:
            found.append((int(match.group(1)), None))
    return found


@pytest.mark.parametrize("api", ["process", "process_map", "process_stream"])
def test_progress_bar_reaches_the_total(api: str) -> None:
    """progress=True writes a tqdm bar to stderr that shows the total from
    the start and ends at total/total."""
    stderr = io.StringIO()
    with WorkerPool(2, start_method="fork") as pool:
        with contextlib.redirect_stderr(stderr):
            if api == "process":
                assert pool.process(square, list(range(20)), progress=True) == [
                    x * x for x in range(20)]
            elif api == "process_map":
                assert pool.process_map(square, {i: i for i in range(20)}, progress=True) == {
                    i: i * i for i in range(20)}
            else:
                assert list(pool.process_stream(square, list(range(20)), progress=True)) == [
                    x * x for x in range(20)]
    states = final_counts(stderr.getvalue())
    assert states, stderr.getvalue()
    assert states[0] == (0, 20)
    assert states[-1] == (20, 20)
    assert "100%" in stderr.getvalue()


def test_progress_bar_of_unsized_input_ends_at_the_count() -> None:
    """For a generator input the bar counts up and ends at the number of
    tasks, as total once the input is exhausted."""
    stderr = io.StringIO()
    with WorkerPool(2, start_method="fork") as pool:
        with contextlib.redirect_stderr(stderr):
            results = pool.process(square, (x for x in range(25)), progress=True)
    assert results == [x * x for x in range(25)]
    states = final_counts(stderr.getvalue())
    assert states, stderr.getvalue()
    assert states[-1] == (25, 25)


def fail_to_start_loudly() -> None:
    raise RuntimeError("setup-" + "y" * 3_000_000 + "-failed")


def test_on_worker_start_failure_with_a_huge_message_still_breaks_the_pool() -> None:
    """A start hook whose error is larger than the ring is still reported:
    BrokenPoolError with the message's start and end, cut in the middle."""
    with WorkerPool(1, start_method="fork", on_worker_start=fail_to_start_loudly) as pool:
        with pytest.raises(BrokenPoolError) as info:
            pool.process(square, [1], timeout=WAIT)
    text = str(info.value)
    assert "RuntimeError" in text and "setup-yyy" in text and "yyy-failed" in text
    assert "characters cut" in text
