"""Fault tolerance of WorkerPool: retries, rate limits, task timeouts,
worker deaths, start failures, interrupts, nested pools, recycling, worker
output and a chaos load test.

Task functions live in crash_helpers so that workers can import them
under every start method.  Every wait is bounded: calls get a timeout=,
futures a result(timeout=), child interpreters a subprocess timeout, and
polling goes through wait_until.
"""

from __future__ import annotations

import collections
import logging
import os
import random
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path
from typing import Any

import crash_helpers as ch
import pytest
from conftest import wait_until

from poolme_mp import (
    BrokenPoolError,
    CallTimeoutError,
    RateLimiter,
    RetryPolicy,
    TaskError,
    TaskSerializationError,
    TaskTimeoutError,
    TokenBucket,
    WorkerCrashedError,
    WorkerPool,
)

CALL_TIMEOUT = 30  # no call in this file should come anywhere near this
def _read_pid(path: Path, timeout: float = 10.0) -> int:
    wait_until(path.exists, timeout)
    return int(path.read_text().split()[0])


def _stamps(path: Path) -> list[float]:
    return [float(line) for line in path.read_text().split()]


def _all_dead(pids: list[int], timeout: float) -> bool:
    return ch.wait_for(lambda: not any(ch.alive(p) for p in pids), timeout)


def _worker_pids(pool: WorkerPool, expected: int) -> set[int]:
    """The pool's worker pids, probed by tasks (retried until all answer)."""
    def probe() -> set[int] | None:
        pids = set(pool.process(ch.slow_pid, [0.03] * (4 * expected), timeout=CALL_TIMEOUT))
        return pids if len(pids) == expected else None
    result: set[int] = wait_until(probe, 20, interval=0.05)
    return result


def _cause_chain(exc: BaseException) -> list[BaseException]:
    chain = []
    while exc is not None:
        chain.append(exc)
        exc = exc.__cause__  # type: ignore[assignment]
    return chain


# ===========================================================================
# Retries
# ===========================================================================


def test_retry_counts_attempts(tmp_path: Path) -> None:
    """A task that always fails runs max_attempts times and its TaskError says so."""
    log = tmp_path / "attempts"
    with WorkerPool(2, max_attempts=4, initial_delay=0.01) as pool:
        with pytest.raises(TaskError) as info:
            pool.process(ch.stamp_and_fail, [str(log)], timeout=CALL_TIMEOUT)
    err = info.value
    assert type(err) is TaskError
    assert err.attempts == 4
    assert err.index == 0
    assert "task 0 failed after 4 attempts: crash_helpers.InjectedFault: injected fault" in str(err)
    assert isinstance(err.__cause__, ch.InjectedFault)
    assert len(_stamps(log)) == 4


def test_retry_delays_follow_the_backoff(tmp_path: Path) -> None:
    """The k-th retry starts min(initial * multiplier**(k-1), max_delay) after the failure before it."""
    log = tmp_path / "attempts"
    policy = dict(max_attempts=5, initial_delay=0.1, multiplier=3.0, max_delay=0.5)
    with WorkerPool(1, **policy) as pool:  # type: ignore[arg-type]
        with pytest.raises(TaskError) as info:
            pool.process(ch.stamp_and_fail, [str(log)], timeout=CALL_TIMEOUT)
    assert info.value.attempts == 5
    stamps = _stamps(log)
    assert len(stamps) == 5
    gaps = [b - a for a, b in zip(stamps, stamps[1:], strict=False)]
    expected = [0.1, 0.3, 0.5, 0.5]  # 0.9 and 2.7 are capped at max_delay
    for k, (gap, want) in enumerate(zip(gaps, expected, strict=True), start=1):
        assert want - 0.01 <= gap <= want + 0.15, f"retry {k}: waited {gap:.3f} s, wanted {want} s"


def test_retry_jitter_stays_in_bounds(tmp_path: Path) -> None:
    """With jitter j every backoff is scaled by a factor in [1-j, 1+j], and it does vary."""
    delays: list[tuple[Any, int, float]] = []
    lock = threading.Lock()

    def on_retry(task: Any, attempt: int, exc: BaseException, delay: float) -> None:
        with lock:
            delays.append((task, attempt, delay))

    logs = [str(tmp_path / f"attempts{i}") for i in range(4)]
    with WorkerPool(2, max_attempts=4, initial_delay=0.2, multiplier=1.0, jitter=0.5,
                    on_retry=on_retry) as pool:
        out = pool.process(ch.stamp_and_fail, logs, return_exceptions=True, timeout=CALL_TIMEOUT)
    assert all(isinstance(e, TaskError) and e.attempts == 4 for e in out)
    assert sorted((t, a) for t, a, _ in delays) == [(t, a) for t in range(4) for a in (2, 3, 4)]
    values = [d for _, _, d in delays]
    assert all(0.1 <= d <= 0.3 for d in values), values
    assert len({round(d, 6) for d in values}) > 1, f"jitter never varied the delay: {values}"
    # ... and the pool really waited that long before each retry.
    for task in range(4):
        stamps = _stamps(Path(logs[task]))
        planned = [d for t, _, d in sorted(delays, key=lambda x: (x[0], x[1])) if t == task]
        for gap, want in zip([b - a for a, b in zip(stamps, stamps[1:], strict=False)], planned,
                             strict=True):
            assert want - 0.01 <= gap <= want + 0.15, (gap, want)


def test_retry_on_types(tmp_path: Path) -> None:
    """Only exceptions of the retry_on types are retried; others fail at once with attempts == 1."""
    retried, fatal = tmp_path / "retried", tmp_path / "fatal"
    with WorkerPool(2, max_attempts=3, initial_delay=0.01, retry_on=(KeyError, OSError)) as pool:
        out = pool.process(ch.count_and_fail, [
            (str(retried), "KeyError", "k"),
            (str(fatal), "ValueError", "v"),
        ], return_exceptions=True, timeout=CALL_TIMEOUT)
    assert out[0].attempts == 3 and isinstance(out[0].__cause__, KeyError)
    assert out[1].attempts == 1 and isinstance(out[1].__cause__, ValueError)
    assert "task 1 failed: builtins.ValueError: v" in str(out[1])
    assert len(retried.read_text().split()) == 3
    assert len(fatal.read_text().split()) == 1


def test_retry_on_predicate(tmp_path: Path) -> None:
    """A retry_on predicate decides from the task's own exception."""
    seen: list[BaseException] = []

    def transient(exc: BaseException) -> bool:
        seen.append(exc)
        return "transient" in str(exc)

    a, b = tmp_path / "a", tmp_path / "b"
    with WorkerPool(2, max_attempts=3, initial_delay=0.01, retry_on=transient) as pool:
        out = pool.process(ch.count_and_fail, [
            (str(a), "RuntimeError", "transient glitch"),
            (str(b), "RuntimeError", "permanent"),
        ], return_exceptions=True, timeout=CALL_TIMEOUT)
    assert [e.attempts for e in out] == [3, 1]
    assert len(a.read_text().split()) == 3
    assert len(b.read_text().split()) == 1
    assert all(type(e) is RuntimeError for e in seen)


def test_per_call_retry_overrides_pool_policy(tmp_path: Path) -> None:
    """retry=RetryPolicy(...) on a call replaces the pool's policy for that call only."""
    with WorkerPool(2, max_attempts=1) as pool:
        with pytest.raises(TaskError) as info:
            pool.process(ch.stamp_and_fail, [str(tmp_path / "a")], timeout=CALL_TIMEOUT,
                         retry=RetryPolicy(max_attempts=3, initial_delay=0.01))
        assert info.value.attempts == 3
        with pytest.raises(TaskError) as info:
            pool.process(ch.stamp_and_fail, [str(tmp_path / "b")], timeout=CALL_TIMEOUT)
        assert info.value.attempts == 1
    with WorkerPool(2, max_attempts=5, initial_delay=0.01) as pool:
        with pytest.raises(TaskError) as info:
            pool.process(ch.stamp_and_fail, [str(tmp_path / "c")], timeout=CALL_TIMEOUT,
                         retry=RetryPolicy(max_attempts=1))
        assert info.value.attempts == 1
    assert [len(_stamps(tmp_path / n)) for n in "abc"] == [3, 1, 1]


def test_backing_off_task_holds_no_worker(tmp_path: Path) -> None:
    """While a task waits out its backoff, its worker runs other tasks."""
    log = tmp_path / "log"
    backoff, n_short, short = 1.5, 20, 0.05
    tasks = [(str(log), 0.0, True)] + [(str(log), short, False)] * n_short
    with WorkerPool(1, max_attempts=2, initial_delay=backoff) as pool:
        pool.process(ch.square, [1], timeout=CALL_TIMEOUT)  # worker up
        t0 = time.monotonic()
        out = pool.process(ch.stamp_or_sleep, tasks, return_exceptions=True, timeout=CALL_TIMEOUT)
        elapsed = time.monotonic() - t0
    assert isinstance(out[0], TaskError) and out[0].attempts == 2
    assert out[1:] == ["ok"] * n_short
    events = [line.split() for line in log.read_text().splitlines()]
    fails = [float(t) for kind, t in events if kind == "fail"]
    oks = [float(t) for kind, t in events if kind == "ok"]
    assert len(fails) == 2 and len(oks) == n_short
    # All the short work happened inside the backoff window.
    assert max(oks) < fails[1]
    assert backoff - 0.05 <= elapsed < backoff + 0.6, (
        f"took {elapsed:.2f} s; {backoff + n_short * short:.2f} s would mean the worker was held")


def test_crashed_task_is_retried_on_a_fresh_worker(tmp_path: Path) -> None:
    """A task whose worker died is retried (WorkerCrashedError is retryable) on a new worker."""
    marker = tmp_path / "first-attempt"
    with WorkerPool(1, max_attempts=2, initial_delay=0.01) as pool:
        [pid] = pool.process(ch.crash_first_attempt, [str(marker)], timeout=CALL_TIMEOUT)
    first_pid = int(marker.read_text())
    assert pid != first_pid
    assert not ch.alive(first_pid)


def test_task_that_kills_every_worker_gives_up(start_method: str) -> None:
    """A task that crashes each worker it runs on fails after max_attempts instead of looping."""
    with WorkerPool(2, start_method=start_method, max_attempts=3, initial_delay=0.01) as pool:
        t0 = time.monotonic()
        out = pool.process(ch.always_crash, [None], return_exceptions=True, timeout=CALL_TIMEOUT)
        assert time.monotonic() - t0 < 15
        [err] = out
        assert type(err) is WorkerCrashedError
        assert err.attempts == 3
        assert err.exitcode == -signal.SIGKILL
        assert "SIGKILL (-9)" in str(err)
        # The pool is neither broken nor short of workers afterwards.
        assert pool.process(ch.square, range(50), timeout=CALL_TIMEOUT) == [i * i for i in range(50)]
        assert len(_worker_pids(pool, 2)) == 2


# ===========================================================================
# Rate limits
# ===========================================================================


def _max_in_window(times: list[float], window: float = 1.0) -> int:
    times = sorted(times)
    best, j = 0, 0
    for i in range(len(times)):
        while times[i] - times[j] >= window:
            j += 1
        best = max(best, i - j + 1)
    return best


def test_rate_limit_holds_over_ten_seconds(tmp_path: Path) -> None:
    """rate_limit=50 over 2 workers starts 500 +- 2% tasks in 10 s, never over rate+burst in 1 s."""
    rate, burst, seconds = 50, 1, 10.0
    log = tmp_path / "starts"
    released: list[float] = []
    with WorkerPool(2, rate_limit=rate, burst=burst,
                    on_task_start=lambda _: released.append(time.monotonic())) as pool:
        pool.start()
        time.sleep(0.5)  # let the bucket fill to its burst, as it would when idle
        with pytest.raises(CallTimeoutError):
            pool.process(ch.log_start, [(str(log), 0.0)] * 2000, timeout=seconds + 1.0)
    starts = sorted(_stamps(log))
    first = starts[0]
    in_window = [t for t in starts if t < first + seconds]
    assert abs(len(in_window) - rate * seconds) <= 0.02 * rate * seconds, len(in_window)
    assert _max_in_window(released) <= rate + burst
    # Seen from the workers, start times also carry dispatch latency jitter.
    assert _max_in_window(starts) <= rate + burst + 1


def test_rate_limit_keeps_up_at_a_high_rate() -> None:
    """rate_limit=250 (default burst 1) releases 250 tasks/s +- 2%: late wakeups must not lose permits."""
    rate, seconds = 250, 2.0
    released: list[float] = []
    with WorkerPool(2, rate_limit=rate,
                    on_task_start=lambda _: released.append(time.monotonic())) as pool:
        pool.process(ch.square, [1], timeout=CALL_TIMEOUT)
        with pytest.raises(CallTimeoutError):
            pool.process(ch.square, [1] * 100_000, timeout=seconds + 0.5)
    first = released[1]  # released[0] is the warm-up task
    count = sum(1 for t in released[1:] if t < first + seconds)
    assert abs(count - rate * seconds) <= 0.02 * rate * seconds, (
        f"{count} releases in {seconds} s at rate_limit={rate}")
    # A permit released late (the engine woke late) is followed at once by
    # the next one falling due, so a one-second window may hold a few more
    # than rate + 1 releases; 2% more allows for wake-ups up to 20 ms late.
    assert _max_in_window(released[1:]) <= rate + 1 + 0.02 * rate


def test_token_bucket_shared_by_two_pools(tmp_path: Path) -> None:
    """One TokenBucket given to two pools limits their combined task starts."""
    rate, per_pool = 40, 40
    bucket = TokenBucket(rate, burst=1)
    logs = [tmp_path / "a", tmp_path / "b"]
    released: list[float] = []
    results: dict[int, Any] = {}

    def on_start(_: Any) -> None:
        released.append(time.monotonic())

    def run(i: int, pool: WorkerPool) -> None:
        results[i] = pool.process(ch.log_start, [(str(logs[i]), 0.0)] * per_pool,
                                  timeout=CALL_TIMEOUT)

    with WorkerPool(1, rate_limiter=bucket, on_task_start=on_start) as a, \
            WorkerPool(1, rate_limiter=bucket, on_task_start=on_start) as b:
        a.process(ch.square, [1], timeout=CALL_TIMEOUT)
        b.process(ch.square, [1], timeout=CALL_TIMEOUT)
        released.clear()
        threads = [threading.Thread(target=run, args=(i, p)) for i, p in enumerate((a, b))]
        t0 = time.monotonic()
        for t in threads:
            t.start()
        for t in threads:
            t.join(CALL_TIMEOUT + 5)
        elapsed = time.monotonic() - t0
    assert len(results[0]) == len(results[1]) == per_pool
    assert len(_stamps(logs[0])) == len(_stamps(logs[1])) == per_pool
    # 80 starts at 40/s together take about 2 s; either pool alone would take 1 s.
    assert len(released) == 2 * per_pool
    assert elapsed >= (2 * per_pool - 2) / rate
    assert _max_in_window(released) <= rate + 1


def test_custom_rate_limiter_object(tmp_path: Path) -> None:
    """Any object with try_acquire() works as rate_limiter: no task starts until it grants one."""

    class Gate:
        def __init__(self) -> None:
            self.open = threading.Event()
            self.calls = 0
            self.granted = 0
            self.lock = threading.Lock()

        def try_acquire(self) -> float:
            with self.lock:
                self.calls += 1
                if not self.open.is_set():
                    return 0.05
                self.granted += 1
                return 0.0

    gate = Gate()
    assert isinstance(gate, RateLimiter)
    log = tmp_path / "starts"
    with WorkerPool(2, rate_limiter=gate) as pool:
        future_result: list[Any] = []
        thread = threading.Thread(target=lambda: future_result.append(
            pool.process(ch.log_start, [(str(log), 0.0)] * 10, timeout=CALL_TIMEOUT)))
        thread.start()
        time.sleep(0.5)
        assert not log.exists(), "a task started while the limiter said wait"
        assert gate.calls >= 2  # asked again after the wait it was told
        opened = time.monotonic()
        gate.open.set()
        thread.join(CALL_TIMEOUT)
    assert len(future_result[0]) == 10
    assert gate.granted == 10
    assert min(_stamps(log)) >= opened


# ===========================================================================
# task_timeout
# ===========================================================================


def test_task_timeout_kills_worker_and_its_subprocesses(tmp_path: Path, start_method: str) -> None:
    """A task past task_timeout fails with TaskTimeoutError; its worker and the processes it started die."""
    pids_file = tmp_path / "pids"
    with WorkerPool(2, start_method=start_method, task_timeout=0.5) as pool:
        pool.process(ch.square, [1, 2], timeout=CALL_TIMEOUT)
        t0 = time.monotonic()
        with pytest.raises(TaskTimeoutError) as info:
            pool.process(ch.start_sleeper_and_wait, [(str(pids_file), 60)], timeout=CALL_TIMEOUT)
        elapsed = time.monotonic() - t0
        err = info.value
        worker_pid, sleeper_pid = map(int, pids_file.read_text().split())
        assert err.worker_pid == worker_pid
        assert isinstance(err, TimeoutError)
        assert err.index == 0 and err.attempts == 1
        assert "task 0 ran past task_timeout=0.5s" in str(err)
        assert f"its worker (pid {worker_pid}) was killed" in str(err)
        assert 0.5 <= elapsed < 3.0
        assert _all_dead([worker_pid, sleeper_pid], 3.0), "worker or its subprocess survived"
        # The worker was replaced.
        assert pool.process(ch.square, range(10), timeout=CALL_TIMEOUT) == [i * i for i in range(10)]


def test_task_timeout_clock_starts_when_the_task_starts() -> None:
    """A task queued behind others is not timed out for its time waiting."""
    with WorkerPool(1, task_timeout=1.0) as pool:
        t0 = time.monotonic()
        out = pool.process(ch.sleep_return, [(0.6, i) for i in range(3)], timeout=CALL_TIMEOUT)
        elapsed = time.monotonic() - t0
    assert out == [0, 1, 2]
    assert elapsed >= 1.8  # the last one waited 1.2 s > task_timeout before it ran


def test_task_timeout_leaves_other_tasks_alone() -> None:
    """Only the overrunning task fails; every other task of the call gets its result."""
    tasks: list[Any] = [(0.01, i) for i in range(20)]
    tasks[10] = (60, "hang")
    with WorkerPool(2, task_timeout=0.5) as pool:
        out = pool.process(ch.sleep_return, tasks, return_exceptions=True, timeout=CALL_TIMEOUT)
    assert type(out[10]) is TaskTimeoutError
    assert "task 10 ran past task_timeout=0.5s" in str(out[10])
    assert [v for i, v in enumerate(out) if i != 10] == [i for i in range(20) if i != 10]


# ===========================================================================
# Worker death from outside
# ===========================================================================


def test_sigkill_of_idle_worker(start_method: str) -> None:
    """An idle worker killed from outside is replaced; no call sees an error."""
    with WorkerPool(2, start_method=start_method) as pool:
        pids = _worker_pids(pool, 2)
        victim = min(pids)
        os.kill(victim, signal.SIGKILL)
        assert _all_dead([victim], 5.0)
        assert pool.process(ch.square, range(100), timeout=CALL_TIMEOUT) == [i * i for i in range(100)]
        new = _worker_pids(pool, 2)
        assert victim not in new and len(new - pids) == 1


def test_sigkill_of_worker_mid_task(tmp_path: Path, start_method: str) -> None:
    """Killing a worker mid-task fails that task with WorkerCrashedError naming SIGKILL."""
    path = tmp_path / "pid"
    with WorkerPool(2, start_method=start_method) as pool:
        future = pool.submit(ch.pid_then_sleep, str(path), 60)
        pid = _read_pid(path)
        os.kill(pid, signal.SIGKILL)
        err = future.exception(timeout=10)
        assert type(err) is WorkerCrashedError
        assert err.exitcode == -signal.SIGKILL
        assert err.worker_pid == pid
        assert f"task 0 crashed its worker (pid {pid}) with SIGKILL (-9)" in str(err)
        assert pool.process(ch.square, range(10), timeout=CALL_TIMEOUT) == [i * i for i in range(10)]


def test_repeated_kills(tmp_path: Path) -> None:
    """The pool survives worker after worker being killed, busy or idle."""
    with WorkerPool(2) as pool:
        killed: list[int] = []
        for round_ in range(4):
            path = tmp_path / f"pid{round_}"
            future = pool.submit(ch.pid_then_sleep, str(path), 60)
            pid = _read_pid(path)
            os.kill(pid, signal.SIGKILL)
            err = future.exception(timeout=10)
            assert type(err) is WorkerCrashedError and err.worker_pid == pid
            killed.append(pid)
            idle = _worker_pids(pool, 2)
            assert not idle & set(killed)
            victim = min(idle)
            os.kill(victim, signal.SIGKILL)
            killed.append(victim)
            assert _all_dead([victim], 5.0)
            assert pool.process(ch.square, range(200), timeout=CALL_TIMEOUT) == [
                i * i for i in range(200)]
        assert not _worker_pids(pool, 2) & set(killed)


def test_batch_mates_of_a_killed_task_are_not_lost(tmp_path: Path) -> None:
    """Tasks sharing a frame with the one whose worker was killed are rerun, not lost."""
    path = tmp_path / "pid"
    n, bad = 3000, 2000
    tasks: list[Any] = [(i, None) for i in range(n)]
    tasks[bad] = (bad, str(path))
    sent: collections.Counter[int] = collections.Counter()
    with WorkerPool(1, on_task_start=lambda i: sent.update([i])) as pool:
        box: list[Any] = []
        thread = threading.Thread(target=lambda: box.append(pool.process(
            ch.slow_marked, tasks, return_exceptions=True, timeout=CALL_TIMEOUT)))
        thread.start()
        pid = _read_pid(path)
        os.kill(pid, signal.SIGKILL)
        thread.join(CALL_TIMEOUT + 5)
    [out] = box
    assert type(out[bad]) is WorkerCrashedError
    assert out[bad].exitcode == -signal.SIGKILL
    assert [v for i, v in enumerate(out) if i != bad] == [i * i for i in range(n) if i != bad]
    # The killed task did share its frame: its frame-mates were sent again.
    resent = [i for i, count in sent.items() if count > 1]
    assert resent and bad not in resent, resent


# ===========================================================================
# Worker start failures
# ===========================================================================


def test_on_worker_start_failure_breaks_the_pool(start_method: str) -> None:
    """on_worker_start raising makes calls fail promptly with BrokenPoolError caused by the original error."""
    pool = WorkerPool(2, start_method=start_method, on_worker_start=ch.fail_start)
    try:
        t0 = time.monotonic()
        with pytest.raises(BrokenPoolError) as info:
            pool.process(ch.square, range(4), timeout=CALL_TIMEOUT)
        assert time.monotonic() - t0 < 10
        err = info.value
        assert "worker starts failed in a row: InjectedFault: on_worker_start refuses" in str(err)
        assert isinstance(err.__cause__, ch.InjectedFault)
        assert str(err.__cause__) == "on_worker_start refuses"
        # Later calls fail at once, the same way.
        t0 = time.monotonic()
        with pytest.raises(BrokenPoolError):
            pool.process(ch.square, range(4), timeout=CALL_TIMEOUT)
        with pytest.raises(BrokenPoolError):
            pool.submit(ch.square, 3)
        assert time.monotonic() - t0 < 0.5
    finally:
        pool.shutdown()


# ===========================================================================
# Interrupts and exit (child interpreters)
# ===========================================================================

CHILD_PRELUDE = f"""
import os, sys, time, signal
sys.path.insert(0, {ch.TESTS_DIR!r})
import crash_helpers as ch
from poolme_mp import WorkerPool
"""


def _child(code: str, tmp_path: Path) -> subprocess.Popen[str]:
    script = tmp_path / "child.py"
    script.write_text(CHILD_PRELUDE + textwrap.dedent(code))
    return subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=tmp_path)


def _finish(proc: subprocess.Popen[str], timeout: float) -> tuple[str, str]:
    try:
        return proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, errs = proc.communicate(timeout=10)
        pytest.fail(f"child did not exit within {timeout} s\nstdout:\n{out}\nstderr:\n{errs}")


def test_sigint_interrupts_a_running_call(tmp_path: Path) -> None:
    """One SIGINT ends a process() of long tasks within 1.5 s with KeyboardInterrupt; workers and shm go."""
    shm_before = ch.shm_entries()
    proc = _child(f"""
        if __name__ == "__main__":
            with WorkerPool(2) as pool:
                pids = pool.process(ch.slow_pid, [0.03] * 8)
                ch.write_atomically({str(tmp_path / 'workers')!r}, " ".join(map(str, set(pids))))
                pool.process(ch.pid_then_sleep_task,
                             [({str(tmp_path)!r} + f"/task{{i}}", 60) for i in range(6)])
        """, tmp_path)
    wait_until(lambda: (tmp_path / "task0").exists() and (tmp_path / "task1").exists(), 20)
    workers = [int(p) for p in (tmp_path / "workers").read_text().split()]
    t0 = time.monotonic()
    proc.send_signal(signal.SIGINT)
    out, errs = _finish(proc, 10)
    elapsed = time.monotonic() - t0
    assert elapsed <= 1.5, f"took {elapsed:.2f} s to stop"
    assert proc.returncode == -signal.SIGINT, (proc.returncode, errs)
    assert "KeyboardInterrupt" in errs
    assert _all_dead(workers, 3.0)
    assert ch.wait_for(lambda: not ch.new_shm(shm_before), 3.0), ch.new_shm(shm_before)


def test_parent_sigkill_takes_workers_and_their_children_along(tmp_path: Path) -> None:
    """When the pool's process is SIGKILLed, its workers and their task's subprocesses exit within seconds."""
    proc = _child(f"""
        if __name__ == "__main__":
            pool = WorkerPool(2)
            pool.process(ch.start_sleeper_and_wait,
                         [({str(tmp_path)!r} + f"/task{{i}}", 60) for i in range(2)])
        """, tmp_path)
    files = [tmp_path / "task0", tmp_path / "task1"]
    wait_until(lambda: all(f.exists() and f.read_text().endswith("\n") for f in files), 20)
    pids = [int(p) for f in files for p in f.read_text().split()]
    assert len(pids) == 4 and all(ch.alive(p) for p in pids)
    proc.kill()
    _finish(proc, 10)
    assert _all_dead(pids, 5.0), [p for p in pids if ch.alive(p)]


@pytest.mark.parametrize("busy", [False, True], ids=["idle", "task-running"])
def test_shutdown_nowait_then_exit_is_prompt_and_quiet(tmp_path: Path, busy: bool) -> None:
    """shutdown(wait=False) and then interpreter exit ends promptly, workers gone, nothing on stderr."""
    proc = _child(f"""
        if __name__ == "__main__":
            pool = WorkerPool(2)
            pids = pool.process(ch.slow_pid, [0.03] * 8)
            ch.write_atomically({str(tmp_path / 'workers')!r}, " ".join(map(str, set(pids))))
            if {busy!r}:
                pool.submit(time.sleep, 60)
                time.sleep(0.3)
            pool.shutdown(wait=False)
            print("returned")
        """, tmp_path)
    t0 = time.monotonic()
    out, errs = _finish(proc, 15)
    elapsed = time.monotonic() - t0
    assert proc.returncode == 0
    assert out == "returned\n"
    assert errs == ""
    assert elapsed < 5, f"exit took {elapsed:.2f} s"
    workers = [int(p) for p in (tmp_path / "workers").read_text().split()]
    assert _all_dead(workers, 3.0)


def test_dropped_pool_stops_its_workers_quietly(tmp_path: Path) -> None:
    """A pool dropped without shutdown stops its workers; the interpreter then exits promptly and quietly."""
    proc = _child("""
        def main():
            pool = WorkerPool(2)
            pids = pool.process(ch.slow_pid, [0.03] * 8)
            return sorted(set(pids))

        if __name__ == "__main__":
            pids = main()
            gone = ch.wait_for(lambda: not any(ch.alive(p) for p in pids), 5.0)
            print("gone" if gone else f"alive {pids}")
        """, tmp_path)
    t0 = time.monotonic()
    out, errs = _finish(proc, 30)
    elapsed = time.monotonic() - t0
    assert proc.returncode == 0
    assert out == "gone\n", out
    assert errs == ""
    assert elapsed < 8, f"took {elapsed:.2f} s"


def test_pool_alive_at_exit_without_shutdown_exits_quietly(tmp_path: Path) -> None:
    """A pool still referenced, never shut down, at interpreter exit: prompt exit, nothing on stderr."""
    code = """
        if __name__ == "__main__":
            pool = WorkerPool(2)
            print(pool.process(ch.square, range(5)))
        """
    # The failure seen here is a race, so look at a few exits.
    for attempt in range(4):
        proc = _child(code, tmp_path)
        t0 = time.monotonic()
        out, errs = _finish(proc, 30)
        elapsed = time.monotonic() - t0
        assert proc.returncode == 0, errs
        assert out == "[0, 1, 4, 9, 16]\n"
        assert errs == "", f"exit {attempt}: stderr:\n{errs}"
        assert elapsed < 5, f"took {elapsed:.2f} s"


# ===========================================================================
# Nested pools
# ===========================================================================


@pytest.mark.parametrize("mode", ["return", "hang", "crash"])
def test_nested_pool_workers_die_with_the_outer_task(tmp_path: Path, mode: str) -> None:
    """A pool started inside a task loses its workers when that task ends, times out or crashes."""
    path = tmp_path / "inner"
    with WorkerPool(1, task_timeout=3.0) as pool:
        out = pool.process(ch.nested_outer, [(str(path), mode)], return_exceptions=True,
                           timeout=CALL_TIMEOUT)
        inner = [int(p) for p in path.read_text().split()]
        assert len(inner) == 2
        [result] = out
        if mode == "return":
            assert result == sorted(inner)
        elif mode == "hang":
            assert type(result) is TaskTimeoutError
        else:
            assert type(result) is WorkerCrashedError and result.exitcode == ch.EXIT_CODE
        assert _all_dead(inner, 5.0), [p for p in inner if ch.alive(p)]
        assert pool.process(ch.square, range(5), timeout=CALL_TIMEOUT) == [0, 1, 4, 9, 16]


# ===========================================================================
# Recycling
# ===========================================================================


def test_max_tasks_per_worker_recycles_without_losing_or_repeating(tmp_path: Path) -> None:
    """With max_tasks_per_worker=N each worker runs at most N tasks, and every task runs exactly once."""
    log = tmp_path / "runs"
    n, quota = 30, 3
    with WorkerPool(2, max_tasks_per_worker=quota) as pool:
        out = pool.process(ch.append_line, [(str(log), i) for i in range(n)], timeout=CALL_TIMEOUT)
    assert out == list(range(n))
    runs = [line.split() for line in log.read_text().splitlines()]
    assert sorted(int(v) for v, _ in runs) == list(range(n)), "a task was lost or ran twice"
    per_pid = collections.Counter(pid for _, pid in runs)
    assert max(per_pid.values()) <= quota, per_pid
    assert len(per_pid) >= n // quota


# ===========================================================================
# Worker output
# ===========================================================================


class _ListHandler(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def test_task_logging_reaches_parent_handlers() -> None:
    """Log records from tasks reach the parent's handlers, tagged with the worker's name and pid."""
    handler = _ListHandler()
    logger = logging.getLogger("poolme_test.task")
    logger.addHandler(handler)
    try:
        with WorkerPool(2) as pool:
            pids = pool.process(ch.log_something, range(6), timeout=CALL_TIMEOUT)
    finally:
        logger.removeHandler(handler)
    by_message = {r.getMessage(): r for r in handler.records}
    assert sorted(by_message) == sorted(f"task says {i}" for i in range(6))
    for i, pid in enumerate(pids):
        record = by_message[f"task says {i}"]
        assert record.levelno == logging.WARNING
        assert record.worker_pid == pid  # type: ignore[attr-defined]
        assert record.processName in ("poolme-worker-0", "poolme-worker-1")


def test_task_prints_reach_parent_stdout(tmp_path: Path, start_method: str) -> None:
    """print() in a task shows in the parent's stdout, even a line printed right before os._exit."""
    proc = _child(f"""
        if __name__ == "__main__":
            with WorkerPool(2, start_method={start_method!r}) as pool:
                pool.process(ch.print_and_return, range(5))
                [err] = pool.process(ch.print_then_exit, [42], return_exceptions=True)
                print("parent saw", type(err).__name__, flush=True)
        """, tmp_path)
    out, errs = _finish(proc, 30)
    assert proc.returncode == 0, errs
    # Substrings, not whole lines: with PYTHONUNBUFFERED=1 (set on this
    # machine) print() writes its text and its newline separately, so two
    # workers' lines may interleave; none may be lost.
    for i in range(5):
        assert f"printed by task {i}" in out, out
    assert "last words of task 42" in out, out
    assert "parent saw WorkerCrashedError" in out.splitlines()


# ===========================================================================
# Load test
# ===========================================================================


@pytest.mark.slow
def test_load_with_random_worker_kills() -> None:
    """100k tasks while workers are SIGKILLed every ~0.2 s: every task ends exactly once, correct or crashed."""
    n = 100_000
    stop = threading.Event()
    kills: list[int] = []
    rng = random.Random(1234)

    def killer() -> None:
        while not stop.wait(0.2):
            workers = ch.non_helper_descendants()
            if workers:
                pid = rng.choice(workers)
                try:
                    os.kill(pid, signal.SIGKILL)
                    kills.append(pid)
                except ProcessLookupError:
                    pass

    with WorkerPool(2, continue_on_error=True) as pool:
        pool.process(ch.spin_square, range(1000), timeout=CALL_TIMEOUT)
        thread = threading.Thread(target=killer, daemon=True)
        thread.start()
        try:
            t0 = time.monotonic()
            out = pool.process(ch.spin_square, range(n), return_exceptions=True, timeout=120)
            elapsed = time.monotonic() - t0
        finally:
            stop.set()
            thread.join(5)
        assert pool.process(ch.square, range(100), timeout=CALL_TIMEOUT) == [i * i for i in range(100)]
    assert len(out) == n
    crashed = serialization = 0
    for i, value in enumerate(out):
        if isinstance(value, TaskError):
            chain = _cause_chain(value)
            crash = next((e for e in chain if isinstance(e, WorkerCrashedError)), None)
            assert crash is not None, f"task {i}: unexpected {value!r}"
            assert crash.exitcode == -signal.SIGKILL and value.index == i, repr(value)
            if isinstance(value, WorkerCrashedError):
                crashed += 1
            else:
                # Killed while (un)pickling a one-task frame: reported as a
                # serialization failure caused by the crash.
                assert isinstance(value, TaskSerializationError)
                serialization += 1
        else:
            assert value == i * i, f"task {i}: {value!r}"
    assert len(kills) >= 5, f"only {len(kills)} kills in {elapsed:.1f} s"
    # A kill fails at most the one task its worker was running.
    assert crashed + serialization <= len(kills)


# --------------------------------------------------------------------------
# Work stealing
# --------------------------------------------------------------------------


def _slow_head(log: str, index: int) -> tuple[int, int]:
    """Task 0 sleeps 1.5 s, the others 0.2 ms; each logs that it ran."""
    time.sleep(1.5 if index == 0 else 0.0002)
    with open(log, "a") as out:
        out.write(f"{index}\n")
    return index, os.getpid()


@pytest.mark.parametrize("source", ["range", "list", "generator"])
def test_frame_queued_behind_a_slow_task_runs_elsewhere_exactly_once(
        tmp_path: Path, source: str) -> None:
    """Tasks queued behind a task that overruns are taken back and run by
    the other worker, each exactly once, with results in input order.

    The slow worker ends up with only its first frame (a run of indices
    from 0): the frame queued behind it went to the other worker, and
    the input is used up before the sleep ends.
    """
    import functools

    log = str(tmp_path / "ran.log")
    count = 2000
    with WorkerPool(2, start_method="fork") as pool:
        # Let the engine learn that this function is fast, so it queues a
        # second frame behind the first on each worker.
        pool.process(functools.partial(_slow_head, os.devnull), range(1, 200), timeout=30)
        jobs: Any = {"range": range(count), "list": list(range(count)),
                     "generator": (index for index in range(count))}[source]
        results = pool.process(functools.partial(_slow_head, log), jobs, timeout=30)
    assert [index for index, _ in results] == list(range(count))
    ran = Path(log).read_text().split()
    assert sorted(map(int, ran)) == list(range(count)), "a task ran twice or never"
    slow_pid = results[0][1]
    on_slow = [index for index, pid in results if pid == slow_pid]
    assert on_slow == list(range(len(on_slow))), on_slow[:50]
    assert len(on_slow) < count // 2


def _slow_head_fails_at(index: int) -> int:
    time.sleep(1.5 if index == 0 else 0.0002)
    if index == 1500:
        raise ValueError(index)
    return index


def test_ordered_stream_stops_at_a_failure_after_stolen_frames() -> None:
    """An ordered stream whose head is slow (so frames behind it are taken
    back) still yields every result before its first failure, then raises
    that failure, and runs nothing the failure made moot twice."""
    with WorkerPool(2, start_method="fork") as pool:
        pool.process(_slow_head_fails_at, range(1, 200), timeout=30)
        got = []
        with pytest.raises(TaskError) as caught:
            for value in pool.process_stream(_slow_head_fails_at, range(2000), timeout=30):
                got.append(value)
        assert got == list(range(1500))
        assert caught.value.index == 1500
        assert isinstance(caught.value.__cause__, ValueError)
        assert pool.process(_slow_head_fails_at, range(1, 10), timeout=30) == list(range(1, 10))


def _log_huge(x: int) -> int:
    logging.getLogger("poolme_test.task").warning("start-" + "z" * 3_000_000 + "-end")
    return x


def test_huge_log_record_is_cut_short_not_fatal() -> None:
    """A log record larger than the ring reaches the parent cut short, with
    its start, its end and a note of the cut; the task's result is kept."""
    handler = _ListHandler()
    logger = logging.getLogger("poolme_test.task")
    logger.addHandler(handler)
    try:
        with WorkerPool(1, start_method="fork") as pool:
            assert pool.process(_log_huge, [1, 2], timeout=CALL_TIMEOUT) == [1, 2]
    finally:
        logger.removeHandler(handler)
    assert len(handler.records) == 2
    for record in handler.records:
        message = record.getMessage()
        assert message.startswith("start-zzz") and message.endswith("zzz-end")
        assert "characters cut" in message
        assert len(message) < 3_000_000


def test_on_task_start_announces_a_task_once_when_its_frame_is_taken_back(tmp_path: Path) -> None:
    """Tasks of a frame taken back from a stuck worker go out again, but
    on_task_start reports each task once: it never started the first time."""
    import functools

    starts: list[int] = []
    count = 2000
    with WorkerPool(2, start_method="fork", on_task_start=starts.append) as pool:
        pool.process(functools.partial(_slow_head, os.devnull), range(1, 200), timeout=30)
        starts.clear()
        results = pool.process(functools.partial(_slow_head, str(tmp_path / "ran.log")),
                               range(count), timeout=30)
    assert [index for index, _ in results] == list(range(count))
    assert sorted(starts) == list(range(count))
