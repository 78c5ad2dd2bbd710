"""Importable helpers for the fault-tolerance tests (not a test module).

Workers started with spawn or forkserver rebuild task functions and
argument objects by module name, so everything a worker must find lives
here rather than in a test file or in a ``python -c`` script.

Faults ("how"):
    raise    raise RuntimeError("injected fault")
    exit     os._exit(7)
    segv     read address 0 through ctypes: SIGSEGV
    kill     SIGKILL to the current process
"""

from __future__ import annotations

import ctypes
import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HOWS = ("raise", "exit", "segv", "kill")
EXIT_CODE = 7
FAULT_MESSAGE = "injected fault"

# What each fault looks like once the pool has decoded the worker's status.
EXPECTED_STATUS = {
    "exit": (EXIT_CODE, f"exit code {EXIT_CODE}"),
    "segv": (-signal.SIGSEGV, f"SIGSEGV ({-signal.SIGSEGV})"),
    "kill": (-signal.SIGKILL, f"SIGKILL ({-signal.SIGKILL})"),
}

TESTS_DIR = str(Path(__file__).resolve().parent)


class InjectedFault(RuntimeError):
    """The exception raised by the 'raise' fault."""


def fault(how: str) -> None:
    """Do the fault named by how, in the calling process."""
    if how == "raise":
        raise InjectedFault(FAULT_MESSAGE)
    sys.stdout.flush()
    sys.stderr.flush()
    if how == "exit":
        os._exit(EXIT_CODE)
    if how == "segv":
        # Disable the core dump this would otherwise write.
        try:
            import resource
            resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        except (ImportError, ValueError, OSError):
            pass
        ctypes.string_at(0)
    if how == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
        time.sleep(10)  # SIGKILL is asynchronous only in theory
    raise AssertionError(f"fault {how!r} did not happen")


def rebuild_with_fault(how: str) -> Any:
    """Called by pickle.loads to rebuild a RebuildBomb: does the fault."""
    fault(how)
    return None


class PickleBomb:
    """Does its fault when pickled (its __reduce__ is the fault)."""

    def __init__(self, how: str) -> None:
        self.how = how

    def __reduce__(self) -> Any:
        fault(self.how)
        raise AssertionError("unreachable")


class RebuildBomb:
    """Pickles fine; does its fault when unpickled (rebuilt)."""

    def __init__(self, how: str) -> None:
        self.how = how

    def __reduce__(self) -> Any:
        return rebuild_with_fault, (self.how,)


class RunFault:
    """A task argument telling work() to do a fault while it runs."""

    def __init__(self, how: str) -> None:
        self.how = how


class ReturnBomb:
    """A task argument telling work() to return a bomb of kind cls."""

    def __init__(self, kind: str, how: str) -> None:
        self.kind = kind
        self.how = how


def work(x: Any) -> Any:
    """The crash matrix's task: x * x for numbers, or the fault x asks for."""
    if isinstance(x, RunFault):
        fault(x.how)
    if isinstance(x, ReturnBomb):
        return PickleBomb(x.how) if x.kind == "pickle" else RebuildBomb(x.how)
    return x * x


# ---------------------------------------------------------------------------
# Plain task functions used by test_resilience.py
# ---------------------------------------------------------------------------


def square(x: int) -> int:
    return x * x


def getpid(_: Any = None) -> int:
    return os.getpid()


def slow_pid(delay: float) -> int:
    time.sleep(delay)
    return os.getpid()


def sleep_return(args: tuple[float, Any]) -> Any:
    delay, value = args
    time.sleep(delay)
    return value


def stamp_and_fail(path: str) -> None:
    """Append a monotonic timestamp to path, then fail."""
    with open(path, "a") as f:
        f.write(f"{time.monotonic()!r}\n")
    raise InjectedFault(FAULT_MESSAGE)


def append_line(args: tuple[str, Any]) -> Any:
    """Append 'value pid' to the file, return value: one line per run."""
    path, value = args
    with open(path, "a") as f:
        f.write(f"{value} {os.getpid()}\n")
    return value


def log_start(args: tuple[str, float]) -> float:
    """Append the start time to the file (for rate checks); return it."""
    path, _ = args
    now = time.monotonic()
    with open(path, "a") as f:
        f.write(f"{now!r}\n")
    return now


def raise_type(name: str) -> None:
    """Raise the builtin exception type called name."""
    raise getattr(__import__("builtins"), name)(f"raised {name}")


def always_crash(_: Any) -> None:
    fault("kill")


def crash_first_attempt(path: str) -> int:
    """SIGKILL own worker on the first run (marked by path), succeed later."""
    if not os.path.exists(path):
        with open(path, "w") as f:
            f.write(f"{os.getpid()}\n")
        fault("kill")
    return os.getpid()


def start_sleeper_and_wait(args: tuple[str, float]) -> None:
    """Start a `sleep` subprocess, write its pid and ours, then hang."""
    path, seconds = args
    proc = subprocess.Popen(["sleep", str(seconds)])
    with open(path, "w") as f:
        f.write(f"{os.getpid()} {proc.pid}\n")
    time.sleep(seconds)


def log_something(x: int) -> int:
    logging.getLogger("poolme_test.task").warning("task says %d", x)
    return os.getpid()


def print_and_return(x: int) -> int:
    print(f"printed by task {x}")
    return x


def print_then_exit(x: int) -> None:
    print(f"last words of task {x}")
    os._exit(EXIT_CODE)


def fail_start() -> None:
    raise InjectedFault("on_worker_start refuses")


# ---------------------------------------------------------------------------
# Process inspection
# ---------------------------------------------------------------------------

HELPER_MARKERS = (
    "from multiprocessing.forkserver import main",
    "from multiprocessing.resource_tracker import main",
)


def proc_state(pid: int) -> str | None:
    """The /proc state letter of pid, None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return None


def alive(pid: int) -> bool:
    """True if pid exists and is not a zombie."""
    state = proc_state(pid)
    return state is not None and state not in ("Z", "X")


def cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def descendants(root: int | None = None) -> list[tuple[int, bool]]:
    """Live processes below root as (pid, is_multiprocessing_helper)."""
    root = os.getpid() if root is None else root
    children: dict[int, list[int]] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        if fields[0] in ("Z", "X"):
            continue
        children.setdefault(int(fields[1]), []).append(int(name))
    found: list[tuple[int, bool]] = []
    stack = [(root, False)]
    while stack:
        parent, parent_is_helper = stack.pop()
        for child in children.get(parent, []):
            is_helper = not parent_is_helper and any(
                marker in cmdline(child) for marker in HELPER_MARKERS)
            found.append((child, is_helper))
            stack.append((child, is_helper))
    return found


def non_helper_descendants(root: int | None = None) -> list[int]:
    return [pid for pid, helper in descendants(root) if not helper]


def wait_for(predicate: Any, timeout: float, interval: float = 0.02) -> bool:
    """Poll predicate up to timeout seconds; its last truth value."""
    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(interval)


def report(data: dict[str, Any]) -> None:
    """Print one JSON line for the test that started this interpreter."""
    sys.stdout.write("RESULT " + json.dumps(data) + "\n")
    sys.stdout.flush()


def parse_report(stdout: str) -> dict[str, Any]:
    lines = [line for line in stdout.splitlines() if line.startswith("RESULT ")]
    assert len(lines) == 1, f"expected one RESULT line, got stdout:\n{stdout}"
    result: dict[str, Any] = json.loads(lines[0][len("RESULT "):])
    return result


# ---------------------------------------------------------------------------
# The crash matrix's child interpreter
# ---------------------------------------------------------------------------

WHERES = ("task_pickle", "task_unpickle", "run", "result_pickle", "result_unpickle")
PARENT_SIDE = ("task_pickle", "result_unpickle")
N_TASKS = 10
BAD = 5


def matrix_tasks(where: str, how: str) -> list[Any]:
    tasks: list[Any] = list(range(N_TASKS))
    tasks[BAD] = {
        "task_pickle": lambda: PickleBomb(how),
        "task_unpickle": lambda: RebuildBomb(how),
        "run": lambda: RunFault(how),
        "result_pickle": lambda: ReturnBomb("pickle", how),
        "result_unpickle": lambda: ReturnBomb("rebuild", how),
    }[where]()
    return tasks


def describe_error(err: BaseException) -> dict[str, Any]:
    cause = err.__cause__
    return {
        "type": type(err).__name__,
        "message": str(err.args[0]) if err.args else "",
        "direction": getattr(err, "direction", None),
        "exitcode": getattr(err, "exitcode", None),
        "index": getattr(err, "index", None),
        "attempts": getattr(err, "attempts", None),
        "worker_pid": getattr(err, "worker_pid", None),
        "cause_type": type(cause).__name__ if cause is not None else None,
        "cause_exitcode": getattr(cause, "exitcode", None),
    }


def matrix_child(where: str, how: str, method: str) -> None:
    """Run one crash-matrix cell and report what happened as JSON."""
    from poolme_mp import TaskError, WorkerPool

    tasks = matrix_tasks(where, how)
    with WorkerPool(2, start_method=method) as pool:
        # Both workers are up and have run something before the fault.
        before = pool.process(slow_pid, [0.03] * 6)
        if where in PARENT_SIDE and how != "raise":
            # The fault takes down this (the parent) process itself.
            report({"phase": "before-fault", "worker_pids": sorted(set(before))})
            pool.process(work, tasks, return_exceptions=True)
            report({"phase": "survived"})
            return
        t0 = time.monotonic()
        out = pool.process(work, tasks, return_exceptions=True)
        elapsed = time.monotonic() - t0
        err = out[BAD]
        others = {str(i): out[i] for i in range(N_TASKS) if i != BAD}
        error = describe_error(err) if isinstance(err, TaskError) else {"type": repr(err)}
        pid = error.get("worker_pid")
        worker_alive = alive(pid) if isinstance(pid, int) else None
        after = pool.process(square, range(20))
        after_pids = sorted(set(pool.process(slow_pid, [0.03] * 6)))
    # Shut down: every worker (also the forkserver's children) must be gone.
    clean = wait_for(lambda: not non_helper_descendants(), 5.0)
    report({
        "phase": "done",
        "error": error,
        "others": others,
        "worker_alive": worker_alive,
        "after_ok": after == [i * i for i in range(20)],
        "before_pids": sorted(set(before)),
        "after_pids": after_pids,
        "elapsed": elapsed,
        "leftover": non_helper_descendants() if not clean else [],
    })


# ---------------------------------------------------------------------------
# More task functions for test_resilience.py
# ---------------------------------------------------------------------------


def write_atomically(path: str, text: str) -> None:
    """Write text so that a reader never sees a partial file."""
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def pid_then_sleep(path: str, seconds: float) -> int:
    """Write our pid to path, then sleep (a long task to be killed)."""
    write_atomically(path, f"{os.getpid()}\n")
    time.sleep(seconds)
    return os.getpid()


def pid_then_sleep_task(args: tuple[str, float]) -> int:
    return pid_then_sleep(*args)


def stamp_or_sleep(args: tuple[str, float, bool]) -> str:
    """Stamp 'fail <t>' and fail, or sleep and stamp 'ok <t>'."""
    path, delay, fail = args
    if fail:
        with open(path, "a") as f:
            f.write(f"fail {time.monotonic()!r}\n")
        raise InjectedFault(FAULT_MESSAGE)
    time.sleep(delay)
    with open(path, "a") as f:
        f.write(f"ok {time.monotonic()!r}\n")
    return "ok"


def fail_with_message(args: tuple[str, str]) -> None:
    """Raise builtin exception type args[0] with message args[1]."""
    name, message = args
    raise getattr(__import__("builtins"), name)(message)


def count_and_fail(args: tuple[str, str, str]) -> None:
    """Append a line to path (one per attempt), then raise name(message)."""
    path, name, message = args
    with open(path, "a") as f:
        f.write(f"{os.getpid()}\n")
    raise getattr(__import__("builtins"), name)(message)


def spin_square(x: int) -> int:
    """About 50 microseconds of pure-Python work, then x * x."""
    n = 0
    for i in range(2000):
        n += i
    return x * x


def slow_marked(args: tuple[int, str | None]) -> int:
    """x * x; the task carrying a path writes its pid there and hangs."""
    x, path = args
    if path is not None:
        write_atomically(path, f"{os.getpid()}\n")
        time.sleep(60)
    return x * x


def nested_outer(args: tuple[str, str]) -> list[int]:
    """Start an inner pool, write its worker pids to path, then end by mode.

    return: return, dropping the inner pool without shutdown
    hang:   sleep (the outer pool's task_timeout ends it)
    crash:  os._exit(7)
    """
    path, mode = args
    from poolme_mp import WorkerPool

    inner = WorkerPool(2)
    pids = sorted(set(inner.process(slow_pid, [0.05] * 8, timeout=30)))
    write_atomically(path, " ".join(map(str, pids)) + "\n")
    if mode == "hang":
        time.sleep(60)
    elif mode == "crash":
        os._exit(EXIT_CODE)
    return pids


# ---------------------------------------------------------------------------
# /dev/shm
# ---------------------------------------------------------------------------

SHM_DIR = "/dev/shm"


def shm_entries() -> set[str]:
    try:
        return set(os.listdir(SHM_DIR))
    except FileNotFoundError:
        return set()


def _foreign(name: str, ours: set[int]) -> bool:
    """True if name embeds the pid of a live process outside our tree.

    The machine is shared: other sessions' libraries (joblib/loky, for
    one) create entries named after their own pid while a test runs.
    """
    import re
    for token in re.findall(r"\d{2,}", name):
        pid = int(token)
        if pid not in ours and alive(pid):
            return True
    return False


def new_shm(before: set[str]) -> set[str]:
    """Entries added since before, leaving out other processes' entries."""
    ours = {os.getpid(), *(pid for pid, _ in descendants())}
    return {name for name in shm_entries() - before if not _foreign(name, ours)}
