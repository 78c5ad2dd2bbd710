"""The crash matrix: WHERE a task's fault happens against HOW it happens.

WHERE
    task_pickle      pickling the argument, in the parent (engine thread)
    task_unpickle    unpickling the argument, in the worker
    run              running the task, in the worker
    result_pickle    pickling the result, in the worker
    result_unpickle  unpickling the result, in the parent
HOW
    raise, exit (os._exit(7)), segv (ctypes.string_at(0)), kill (SIGKILL self)

Every cell runs in a child interpreter under a hard time limit, so a hang
or a crash of the pool's own process is a clean failure here.  The child
runs 10 tasks (the faulty one is task 5) with return_exceptions=True and
prints a JSON line with what it saw.

Worker-side faults of every kind must fail only task 5, with the exact
error type, and leave the pool working.  Parent-side faults other than
raise (exit / segv / kill while the parent itself pickles or unpickles)
kill the pool's owner process: no pool can report an error from a dead
process, so the sensible contract checked there is that the owner dies with
exactly that status and that none of its workers outlive it.

The whole table runs under every start method (about 0.3 - 1 s a cell).
"""

from __future__ import annotations

import subprocess
import sys
import time

import crash_helpers as ch
import pytest

CHILD_TIMEOUT = 60

# WHERE x "raise": (error type, direction, message part).
RAISE_EXPECTED = {
    "task_pickle": (
        "TaskSerializationError", "task",
        "task 5: its argument cannot be pickled to travel to a worker: "
        "InjectedFault: injected fault"),
    "task_unpickle": (
        "TaskSerializationError", "task",
        "task 5: its argument could not be unpickled in the worker: "
        "crash_helpers.InjectedFault: injected fault"),
    "run": (
        "TaskError", None,
        "task 5 failed: crash_helpers.InjectedFault: injected fault"),
    "result_pickle": (
        "TaskSerializationError", "result",
        "task 5: its result could not be pickled in the worker to travel back: "
        "crash_helpers.InjectedFault: injected fault"),
    "result_unpickle": (
        "TaskSerializationError", "result",
        "task 5: its result could not be unpickled here: InjectedFault: injected fault"),
}

# Worker-side WHERE x crash: (error type, direction, stage text in message).
CRASH_EXPECTED = {
    "task_unpickle": ("TaskSerializationError", "task", " while unpickling its argument"),
    "run": ("WorkerCrashedError", None, ""),
    "result_pickle": ("TaskSerializationError", "result", " while pickling its result"),
}

CELLS = [(where, how) for where in ch.WHERES for how in ch.HOWS]


def _run_cell(where: str, how: str, method: str) -> tuple[subprocess.CompletedProcess[str], float]:
    code = (
        f"import sys; sys.path.insert(0, {ch.TESTS_DIR!r}); import crash_helpers; "
        f"crash_helpers.matrix_child({where!r}, {how!r}, {method!r})"
    )
    t0 = time.monotonic()
    try:
        proc = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True,
            timeout=CHILD_TIMEOUT)
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"{where}/{how}/{method}: the child hung for {CHILD_TIMEOUT} s; "
                    f"stdout: {exc.stdout!r} stderr: {exc.stderr!r}")
    return proc, time.monotonic() - t0


@pytest.mark.parametrize(("where", "how"), CELLS, ids=[f"{w}-{h}" for w, h in CELLS])
def test_crash_matrix(where: str, how: str, start_method: str) -> None:
    """A fault at any stage fails only its own task with the exact error type, and nothing leaks."""
    shm_before = ch.shm_entries()
    proc, _ = _run_cell(where, how, start_method)
    context = f"\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"

    if where in ch.PARENT_SIDE and how != "raise":
        # The owner process itself died: it must die with exactly this
        # status and take every worker with it.
        status, _ = ch.EXPECTED_STATUS[how]
        assert proc.returncode == status, context
        data = ch.parse_report(proc.stdout)
        assert data["phase"] == "before-fault", context
        pids = data["worker_pids"]
        assert len(pids) == 2, context
        gone = ch.wait_for(lambda: not any(ch.alive(p) for p in pids), 5.0)
        assert gone, f"workers {[p for p in pids if ch.alive(p)]} outlived their pool{context}"
    else:
        assert proc.returncode == 0, context
        data = ch.parse_report(proc.stdout)
        assert data["phase"] == "done", context
        err = data["error"]
        if how == "raise":
            type_name, direction, part = RAISE_EXPECTED[where]
            assert err["type"] == type_name, context
            assert err["direction"] == direction, context
            assert part in err["message"], context
            assert err["cause_type"] == "InjectedFault", context
            if where == "task_pickle":
                # Never reached a worker.
                assert err["worker_pid"] is None, context
            else:
                assert err["attempts"] == 1, context
                # A raised error leaves its worker alive and in the pool.
                assert data["worker_alive"] is True, context
                assert err["worker_pid"] in data["after_pids"], context
                assert len(data["after_pids"]) == 2, context
        else:
            type_name, direction, stage = CRASH_EXPECTED[where]
            exitcode, decoded = ch.EXPECTED_STATUS[how]
            pid = err["worker_pid"]
            assert err["type"] == type_name, context
            assert err["direction"] == direction, context
            assert isinstance(pid, int), context
            assert (f"task 5 crashed its worker (pid {pid}){stage} with {decoded}"
                    in err["message"]), context
            assert err["attempts"] == 1, context
            if type_name == "WorkerCrashedError":
                assert err["exitcode"] == exitcode, context
            else:
                # The serialization error says why: the crash is its cause.
                assert err["cause_type"] == "WorkerCrashedError", context
                assert err["cause_exitcode"] == exitcode, context
            # The crashed worker is gone and was replaced.
            assert data["worker_alive"] is False, context
            assert pid not in data["after_pids"], context
        assert err["index"] == 5, context
        assert data["others"] == {str(i): i * i for i in range(10) if i != 5}, context
        assert data["after_ok"] is True, context
        assert data["leftover"] == [], context
    assert "Traceback" not in proc.stderr, context
    clean = ch.wait_for(lambda: not ch.new_shm(shm_before), 3.0)
    assert clean, f"/dev/shm entries left: {sorted(ch.new_shm(shm_before))}"
