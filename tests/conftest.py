"""Shared test fixtures: leak checks, start-method parametrization, hang guards.

Every test is wrapped by ``_no_leaks``: a test that leaves a process of its own
or a new /dev/shm entry behind fails at teardown, and the leftovers are killed
or removed so that one leak does not spill into the next test.
"""

from __future__ import annotations

import ctypes
import faulthandler
import multiprocessing
import os
import re
import signal
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import pytest

T = TypeVar("T")

START_METHODS = ("fork", "forkserver", "spawn")

# How long a test's processes and shm entries may take to go away after the
# test body and its fixtures have finished, before they count as leaked.
# Overridable so tests of this file can run its checks quickly.
LEAK_GRACE_S = float(os.environ.get("POOLME_LEAK_GRACE", "3"))
# How long the backup watchdog waits past the pytest-timeout deadline.
WATCHDOG_GRACE_S = float(os.environ.get("POOLME_WATCHDOG_GRACE", "10"))

SHM_DIR = "/dev/shm"
_PR_SET_CHILD_SUBREAPER = 36
# Long-lived helpers that multiprocessing starts once and keeps on purpose.
_HELPER_MARKERS = (
    "from multiprocessing.forkserver import main",
    "from multiprocessing.resource_tracker import main",
)


def wait_until(predicate: Callable[[], T], timeout: float, interval: float = 0.01) -> T:
    """Poll ``predicate`` until it returns a truthy value; fail after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if result:
            return result
        if time.monotonic() >= deadline:
            raise AssertionError(f"condition not met within {timeout} s: {predicate}")
        time.sleep(interval)


# A task (run in workers, under every start method: this module is
# importable there, like the test modules).
def mark_then_sleep(item: tuple[str, int, float]) -> int:
    """Record that this task started (file holds the pid), then sleep."""
    directory, index, seconds = item
    Path(directory, f"started-{index}").write_text(str(os.getpid()))
    time.sleep(seconds)
    return index


def check_usable(pool: Any, within: float = 10.0) -> None:
    """A fresh call on pool answers correctly within ``within`` seconds.

    Used after a call was abandoned: its tasks sleep far longer than
    within, so an answer shows the pool did not wait for them.  within
    allows for replaced workers to start, which under spawn means
    importing everything again: seconds on a loaded two-core machine.
    """
    begin = time.monotonic()
    assert pool.process(abs, [-x for x in range(8)], timeout=within) == list(range(8))
    assert time.monotonic() - begin < within


@pytest.fixture(params=START_METHODS)
def start_method(request: pytest.FixtureRequest) -> str:
    """Run the test once per multiprocessing start method."""
    method: str = request.param
    return method


# --------------------------------------------------------------------------
# Session setup
# --------------------------------------------------------------------------


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "allow_leaks: skip the child-process and /dev/shm leak check"
    )
    _become_subreaper()
    # Global capture is suspended while plugins configure, so fd 2 is the real
    # stderr here; keep a copy so the watchdog can write past fd capture.
    config.stash[_watchdog_fd_key] = os.dup(2)


def pytest_unconfigure(config: pytest.Config) -> None:
    faulthandler.cancel_dump_traceback_later()
    fd = config.stash.get(_watchdog_fd_key, None)
    if fd is not None:
        os.close(fd)


_watchdog_fd_key = pytest.StashKey[int]()


def _become_subreaper() -> None:
    """Make orphaned grandchildren re-parent to us, so the leak check sees them."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    except (OSError, AttributeError):
        pass  # Not Linux: only direct children and their trees are checked.


# --------------------------------------------------------------------------
# Hang guard
# --------------------------------------------------------------------------


def _test_timeout(item: pytest.Item) -> float:
    """The pytest-timeout deadline for ``item`` (0 means none)."""
    marker = item.get_closest_marker("timeout")
    if marker is not None:
        value = marker.args[0] if marker.args else marker.kwargs.get("timeout", 0)
        return float(value or 0)
    option = item.config.getoption("timeout", None)
    if option is not None:
        return float(option)
    try:
        return float(item.config.getini("timeout") or 0)
    except ValueError:  # pytest-timeout is not installed
        return 0.0


@pytest.fixture(autouse=True)
def _hang_watchdog(request: pytest.FixtureRequest) -> Iterator[None]:
    """Dump every thread's stack and exit if a test outlives pytest-timeout.

    pytest-timeout's signal method already prints all thread stacks, but its
    handler only runs when the main thread gets back to Python bytecode. A
    hang inside C code (a nogil spin loop, a blocked futex) never does, so
    this C-level watchdog is the backstop that keeps CI from hanging.
    """
    timeout = _test_timeout(request.node)
    if timeout <= 0:
        yield
        return
    fd = request.config.stash[_watchdog_fd_key]
    faulthandler.dump_traceback_later(timeout + WATCHDOG_GRACE_S, exit=True, file=fd)
    try:
        yield
    finally:
        faulthandler.cancel_dump_traceback_later()


# --------------------------------------------------------------------------
# Leak check
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class Proc:
    """One entry of /proc, identified by pid and start time against pid reuse."""

    pid: int
    ppid: int
    state: str
    start_ticks: int
    comm: str

    @property
    def key(self) -> tuple[int, int]:
        return (self.pid, self.start_ticks)


def _read_proc(pid: int) -> Proc | None:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read().decode(errors="replace")
    except OSError:
        return None  # Gone between listing and reading.
    # The command name is in parentheses and may itself contain spaces.
    comm = stat[stat.index("(") + 1 : stat.rindex(")")]
    fields = stat[stat.rindex(")") + 2 :].split()
    return Proc(pid, int(fields[1]), fields[0], int(fields[19]), comm)


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            raw = f.read()
    except OSError:
        return ""
    return raw.replace(b"\0", b" ").decode(errors="replace").strip()[:200]


def _helper_pids() -> set[int]:
    """Pids of multiprocessing's forkserver and resource tracker, if running."""
    pids = set()
    forkserver = getattr(multiprocessing, "forkserver", None)
    tracker = getattr(multiprocessing, "resource_tracker", None)
    if forkserver is not None:
        pids.add(getattr(forkserver._forkserver, "_forkserver_pid", None))
    if tracker is not None:
        pids.add(getattr(tracker._resource_tracker, "_pid", None))
    return {pid for pid in pids if pid}


def _descendants() -> dict[tuple[int, int], Proc]:
    """All processes below this one, except the multiprocessing helpers.

    The helpers' own children (the forkserver's workers) are still included.
    """
    children: dict[int, list[Proc]] = {}
    for name in os.listdir("/proc"):
        proc = _read_proc(int(name)) if name.isdigit() else None
        if proc is not None:
            children.setdefault(proc.ppid, []).append(proc)
    helper_pids = _helper_pids()
    found: dict[tuple[int, int], Proc] = {}
    stack = [(os.getpid(), False)]
    while stack:
        parent, parent_is_helper = stack.pop()
        for child in children.get(parent, []):
            # Forkserver workers inherit the forkserver's cmdline: a helper's
            # children are the workers it started, never helpers themselves.
            is_helper = not parent_is_helper and (
                child.pid in helper_pids or _has_helper_cmdline(child.pid)
            )
            stack.append((child.pid, is_helper))
            if not is_helper:
                found[child.key] = child
    return found


def _has_helper_cmdline(pid: int) -> bool:
    cmdline = _cmdline(pid)
    return any(marker in cmdline for marker in _HELPER_MARKERS)


def _mp_child_pids() -> set[int]:
    """Pids that multiprocessing tracks as this process's children."""
    children = multiprocessing.process._children  # type: ignore[attr-defined]
    return {p.pid for p in children if p.pid is not None}


def _reap_untracked_zombies(procs: dict[tuple[int, int], Proc]) -> None:
    """Reap dead direct children nobody else will wait for.

    With the subreaper bit set, orphans that exited land here as zombies.
    Processes multiprocessing tracks are left alone: waiting on them behind
    its back would break its join(). An unjoined one is reported instead.
    """
    tracked = _mp_child_pids()
    for proc in procs.values():
        if proc.state == "Z" and proc.ppid == os.getpid() and proc.pid not in tracked:
            try:
                os.waitpid(proc.pid, os.WNOHANG)
            except ChildProcessError:
                pass


def _new_procs(baseline: set[tuple[int, int]]) -> dict[tuple[int, int], Proc]:
    _reap_untracked_zombies(_descendants())
    return {k: p for k, p in _descendants().items() if k not in baseline}


def _shm_entries() -> set[str]:
    try:
        return set(os.listdir(SHM_DIR))
    except FileNotFoundError:
        return set()


def _someone_elses(name: str) -> bool:
    """True if an shm entry is named after a live process outside this test
    run (libraries such as joblib put their pid in the name): on a shared
    machine, other programs' entries come and go during a test."""
    ours = {os.getpid(), *(pid for pid, _ in _descendants())}
    for token in re.findall(r"\d{3,}", name):
        pid = int(token)
        if pid not in ours and os.path.exists(f"/proc/{pid}"):
            return True
    return False


def _wait_for_cleanup(
    baseline_procs: set[tuple[int, int]], baseline_shm: set[str]
) -> tuple[dict[tuple[int, int], Proc], set[str]]:
    """Give the test's processes and shm entries a short grace to go away."""
    deadline = time.monotonic() + LEAK_GRACE_S
    while True:
        procs = _new_procs(baseline_procs)
        shm = {name for name in _shm_entries() - baseline_shm if not _someone_elses(name)}
        if (not procs and not shm) or time.monotonic() >= deadline:
            return procs, shm
        time.sleep(0.05)


def _describe(procs: dict[tuple[int, int], Proc], shm: set[str]) -> str:
    lines = []
    for proc in procs.values():
        what = "exited but never joined" if proc.state == "Z" else "still running"
        command = _cmdline(proc.pid) or f"[{proc.comm}]"  # Zombies have no cmdline.
        lines.append(f"  process {proc.pid} (parent {proc.ppid}, {what}): {command}")
    lines.extend(f"  {SHM_DIR}/{name}" for name in sorted(shm))
    return "\n".join(lines)


def _kill(procs: dict[tuple[int, int], Proc]) -> None:
    """SIGKILL leftovers and wait (bounded) until they are gone or reaped."""
    for proc in procs.values():
        try:
            os.kill(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + 2.0
    while time.monotonic() < deadline:
        multiprocessing.active_children()  # Lets multiprocessing join its own.
        alive = [k for k in _new_procs(set()) if k in procs]
        if not alive:
            return
        time.sleep(0.02)


def _remove_shm(names: set[str]) -> None:
    for name in names:
        try:
            os.unlink(os.path.join(SHM_DIR, name))
        except OSError:
            pass


@pytest.fixture(autouse=True)
def _no_leaks(request: pytest.FixtureRequest) -> Iterator[None]:
    """Fail a test that leaves processes or /dev/shm entries behind."""
    if request.node.get_closest_marker("allow_leaks"):
        yield
        return
    # Processes started by wider-scoped fixtures already exist here and are
    # part of the baseline, so a module-scoped pool is not a leak.
    baseline_procs = set(_descendants())
    baseline_shm = _shm_entries()
    yield
    procs, shm = _wait_for_cleanup(baseline_procs, baseline_shm)
    if not procs and not shm:
        return
    report = _describe(procs, shm)
    _kill(procs)
    _remove_shm(shm)
    pytest.fail(f"test leaked resources (now cleaned up):\n{report}", pytrace=False)
