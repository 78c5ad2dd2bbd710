"""Tests of the error contract of WorkerPool's batch calls.

Default: the first failure raises TaskError and no further tasks start.
continue_on_error: every task runs, failures come together in a
TaskErrorGroup.  return_exceptions: failures are returned in place.
Plus what happens to exceptions that cannot travel, BaseExceptions raised by
tasks, and functions, arguments and results that cannot be pickled.
"""

from __future__ import annotations

import functools
import importlib
import os
import pickle
import sys
import threading
import time

import pytest

from poolme_mp import (
    PoolError,
    RemoteError,
    TaskError,
    TaskErrorGroup,
    TaskSerializationError,
    UnpicklableFunctionError,
    WorkerPool,
)

pytestmark = pytest.mark.timeout(60)

# Bound on every blocking call a test makes.
T = 30.0


# --------------------------------------------------------------------------
# Module-level task functions and exception types
# --------------------------------------------------------------------------


def fail_at_3(x):
    if x == 3:
        raise ValueError(f"bad {x}")
    return x * 10


def fail_on_multiples_of_3(x):
    if x % 3 == 0:
        raise KeyError(f"k{x}")
    return -x


def getpid(_):
    return os.getpid()


def logged(path, delay, fail_at, x):
    """Append x to the side-effect file, sleep, then fail if x is in fail_at."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, f"{x}\n".encode())
    finally:
        os.close(fd)
    time.sleep(delay)
    if x in fail_at:
        raise RuntimeError(f"task {x} failed on purpose")
    return x + 1000


def ran(path) -> list[int]:
    """The task values recorded in a side-effect file."""
    try:
        with open(path) as f:
            return [int(line) for line in f.read().split()]
    except FileNotFoundError:
        return []


class TwoArgError(Exception):
    """Cannot be rebuilt by unpickling: __init__ needs two args, args holds one."""

    def __init__(self, what, code):
        super().__init__(what)
        self.code = code


def raise_two_arg(x):
    raise TwoArgError(f"two-arg {x}", 7)


class UnreducibleError(Exception):
    def __reduce__(self):
        raise RuntimeError("this exception refuses to be pickled")


def raise_unreducible(x):
    raise UnreducibleError(f"unreducible {x}")


class BadStrError(Exception):
    def __str__(self):
        raise RuntimeError("no str for you")


def raise_bad_str(x):
    raise BadStrError("hidden")


class CustomBase(BaseException):
    pass


def raise_base(kind):
    if kind == "exit":
        raise SystemExit(3)
    if kind == "interrupt":
        raise KeyboardInterrupt("ctrl-c in a task")
    if kind == "base":
        raise CustomBase("custom base")
    if kind == "generator_exit":
        raise GeneratorExit("gen exit")
    return os.getpid()


def return_lock(x):
    if x == 1:
        return threading.Lock()
    return x


def _explode(message):
    raise ValueError(message)


class LoadsBadly:
    """Pickles fine, but unpickling it raises ValueError."""

    def __init__(self, message):
        self.message = message

    def __reduce__(self):
        return (_explode, (self.message,))


def make_loads_badly(x):
    return LoadsBadly(f"cannot load result {x}") if x == 1 else x


def use_arg(x):
    return x if isinstance(x, int) else type(x).__name__


def faulty_numbers():
    yield 1
    yield 2
    raise OSError("input source broke")


@pytest.fixture
def pool(start_method):
    """A started 2-worker pool under each start method."""
    with WorkerPool(2, start_method=start_method) as p:
        yield p


@pytest.fixture
def fork_pool():
    """A started 2-worker fork pool, for rules that do not depend on the start method."""
    with WorkerPool(2, start_method="fork") as p:
        yield p


@pytest.fixture
def one_worker(start_method):
    """A started 1-worker pool, so that every task runs in the same process."""
    with WorkerPool(1, start_method=start_method) as p:
        yield p


# --------------------------------------------------------------------------
# Default: raise at the first failure
# --------------------------------------------------------------------------


def test_first_failure_raises_task_error(pool):
    """The default raises TaskError with index, attempts, worker pid, cause and remote traceback."""
    worker_pids = set(pool.process(getpid, range(20), timeout=T))
    with pytest.raises(TaskError) as info:
        pool.process(fail_at_3, range(10), timeout=T)
    e = info.value
    assert type(e) is TaskError
    assert e.index == 3
    assert e.key is None
    assert e.attempts == 1
    assert isinstance(e.worker_pid, int)
    assert e.worker_pid != os.getpid()
    assert e.worker_pid in worker_pids
    assert type(e.__cause__) is ValueError
    assert e.__cause__.args == ("bad 3",)
    assert "fail_at_3" in e.remote_traceback
    assert "ValueError: bad 3" in e.remote_traceback
    text = str(e)
    assert text.startswith("task 3 failed: builtins.ValueError: bad 3")
    assert "fail_at_3" in text
    assert isinstance(e, PoolError)


def test_no_further_tasks_start_after_first_failure(tmp_path, start_method):
    """After the first failure no further tasks start, and the pool still works."""
    log = tmp_path / "ran.txt"
    total = 200
    fn = functools.partial(logged, str(log), 0.01, {5})
    with WorkerPool(2, start_method=start_method) as p:
        with pytest.raises(TaskError) as info:
            p.process(fn, range(total), timeout=T)
        assert info.value.index == 5
        assert type(info.value.__cause__) is RuntimeError
        assert str(info.value.__cause__) == "task 5 failed on purpose"
        # Tasks abandoned in flight may still be finishing; give them time.
        time.sleep(0.5)
        count_after_error = len(ran(log))
        assert p.process(fail_at_3, [1, 2], timeout=T) == [10, 20]
    done = ran(log)
    assert len(done) == count_after_error
    # Tasks sent to a worker still starting up may be dropped unstarted, so
    # only the failing task is sure to have run.
    assert 5 in done
    assert len(done) <= 20, f"{len(done)} of {total} tasks ran after a failure at task 5"
    assert len(done) == len(set(done))


def test_lowest_failing_index_of_a_frame_is_reported(fork_pool):
    """In a call where many tasks fail, the TaskError raised is a real failing task."""
    with pytest.raises(TaskError) as info:
        fork_pool.process(fail_on_multiples_of_3, range(1, 1000), timeout=T)
    e = info.value
    assert e.index is not None and (e.index + 1) % 3 == 0
    assert e.__cause__.args == (f"k{e.index + 1}",)


def test_process_map_failure_names_the_key(fork_pool):
    """process_map's TaskError carries the key and index; its message names the key."""
    with pytest.raises(TaskError) as info:
        fork_pool.process_map(fail_at_3, {"a": 1, "b": 3, "c": 4}, timeout=T)
    e = info.value
    assert e.key == "b"
    assert e.index == 1
    assert str(e).startswith("task with key 'b' failed: builtins.ValueError: bad 3")


def test_failure_reading_the_input_raises_task_error(fork_pool):
    """An input iterator that raises makes the call raise TaskError caused by that error."""
    with pytest.raises(TaskError) as info:
        fork_pool.process(fail_at_3, faulty_numbers(), timeout=T)
    assert type(info.value.__cause__) is OSError
    assert str(info.value.__cause__) == "input source broke"
    assert fork_pool.process(fail_at_3, [2], timeout=T) == [20]


def slow_or_fail(x):
    if x == 0:
        time.sleep(0.05)
        raise ValueError("fails fast")
    time.sleep(5)
    return x


def test_first_failure_raises_without_waiting_for_slow_tasks(fork_pool):
    """The first failure raises at once, without waiting for tasks still running elsewhere."""
    t0 = time.monotonic()
    with pytest.raises(TaskError) as info:
        fork_pool.process(slow_or_fail, [0, 1, 2, 3], timeout=T)
    assert time.monotonic() - t0 < 2.5
    assert info.value.index == 0
    # The worker stuck in a 5 s task is replaced; the pool keeps working.
    assert fork_pool.process(fail_at_3, [1, 2, 4], timeout=T) == [10, 20, 40]


@pytest.fixture
def late_module(tmp_path, monkeypatch):
    """A module importable in this process only, from a path added after the workers started."""
    (tmp_path / "late_module_xyz.py").write_text("def late(x):\n    return x + 1\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        yield importlib.import_module("late_module_xyz")
    finally:
        sys.modules.pop("late_module_xyz", None)


def test_function_that_cannot_be_unpickled_in_worker(start_method, request):
    """A function the workers cannot import fails the call with TaskError caused by the import error."""
    with WorkerPool(2, start_method=start_method) as p:
        p.process(fail_at_3, [1], timeout=T)  # workers are up, with the old sys.path
        module = request.getfixturevalue("late_module")
        assert module.late(1) == 2
        with pytest.raises(TaskError) as info:
            p.process(module.late, [1, 2], timeout=T)
        e = info.value
        assert type(e.__cause__) is ModuleNotFoundError
        assert "late_module_xyz" in str(e.__cause__)
        assert str(e).startswith("the function could not be unpickled in worker pid")
        assert e.worker_pid not in (None, os.getpid())
        assert p.process(fail_at_3, [2], timeout=T) == [20]


# --------------------------------------------------------------------------
# continue_on_error
# --------------------------------------------------------------------------


def _check_group(group, total, failing):
    assert isinstance(group, TaskErrorGroup)
    assert isinstance(group, ExceptionGroup)
    assert isinstance(group, PoolError)
    assert all(type(e) is TaskError for e in group.exceptions)
    assert [e.index for e in group.exceptions] == failing
    assert [e.attempts for e in group.exceptions] == [1] * len(failing)
    assert [str(e.__cause__) for e in group.exceptions] == [
        f"task {i} failed on purpose" for i in failing]
    assert all(e.worker_pid not in (None, os.getpid()) for e in group.exceptions)
    assert len(group.results) == total
    errors = iter(group.exceptions)
    for i, value in enumerate(group.results):
        if i in failing:
            assert value is next(errors)
        else:
            assert value == i + 1000
    assert str(group).startswith(f"{len(failing)} of {total} tasks failed")


def test_continue_on_error_pool_option_runs_everything(tmp_path, start_method):
    """With continue_on_error=True on the pool every task runs and a TaskErrorGroup holds all failures."""
    log = tmp_path / "ran.txt"
    failing = [2, 9, 17]
    fn = functools.partial(logged, str(log), 0.002, set(failing))
    with WorkerPool(2, start_method=start_method, continue_on_error=True) as p:
        with pytest.raises(TaskErrorGroup) as info:
            p.process(fn, range(40), timeout=T)
        _check_group(info.value, 40, failing)
        assert sorted(ran(log)) == list(range(40))
        assert p.process(fail_at_3, [1], timeout=T) == [10]


def test_continue_on_error_per_call(tmp_path, fork_pool):
    """continue_on_error=True on one call runs every task; the next call is back to the default."""
    log = tmp_path / "ran.txt"
    fn = functools.partial(logged, str(log), 0.0, {0, 5})
    with pytest.raises(TaskErrorGroup) as info:
        fork_pool.process(fn, range(30), continue_on_error=True, timeout=T)
    _check_group(info.value, 30, [0, 5])
    assert sorted(ran(log)) == list(range(30))
    with pytest.raises(TaskError) as single:
        fork_pool.process(fail_at_3, range(5), timeout=T)
    assert not isinstance(single.value, TaskErrorGroup)


def test_continue_on_error_false_per_call_overrides_pool(fork_pool):
    """continue_on_error=False on a call overrides a pool created with continue_on_error=True."""
    with WorkerPool(2, start_method="fork", continue_on_error=True) as p:
        with pytest.raises(TaskError) as info:
            p.process(fail_at_3, range(6), continue_on_error=False, timeout=T)
        assert type(info.value) is TaskError
        assert info.value.index == 3


def test_continue_on_error_every_task_fails(fork_pool):
    """When every task fails, the group holds all of them and results holds only errors."""
    with pytest.raises(TaskErrorGroup) as info:
        fork_pool.process(fail_on_multiples_of_3, [0, 3, 6], continue_on_error=True, timeout=T)
    group = info.value
    assert [e.index for e in group.exceptions] == [0, 1, 2]
    assert [e.__cause__.args for e in group.exceptions] == [("k0",), ("k3",), ("k6",)]
    assert group.results == list(group.exceptions)


def test_continue_on_error_with_no_failure_returns_list(fork_pool):
    """continue_on_error with no failing task returns the plain result list."""
    assert fork_pool.process(fail_at_3, [1, 2, 4], continue_on_error=True, timeout=T) == [10, 20, 40]


def test_continue_on_error_many_failures_ordered_by_index(fork_pool):
    """Failures spread over a large batch come in index order in the group."""
    with pytest.raises(TaskErrorGroup) as info:
        fork_pool.process(fail_on_multiples_of_3, range(1, 3001), continue_on_error=True, timeout=T)
    group = info.value
    assert [e.index for e in group.exceptions] == [i - 1 for i in range(1, 3001) if i % 3 == 0]
    assert [r for r in group.results if not isinstance(r, TaskError)] == [
        -i for i in range(1, 3001) if i % 3]


def test_continue_on_error_group_works_with_except_star(fork_pool):
    """except* TaskError catches the group's errors."""
    caught = []
    try:
        fork_pool.process(fail_at_3, range(5), continue_on_error=True, timeout=T)
    except* TaskError as eg:
        caught = [e.index for e in eg.exceptions]
    assert caught == [3]


def test_process_map_continue_on_error_results_is_dict(fork_pool):
    """For process_map the group's results is a dict in key order and errors carry keys."""
    mapping = {"x": 1, "y": 3, "z": 6, "w": 4}
    with pytest.raises(TaskErrorGroup) as info:
        fork_pool.process_map(fail_on_multiples_of_3, mapping, continue_on_error=True, timeout=T)
    group = info.value
    assert [(e.key, e.index) for e in group.exceptions] == [("y", 1), ("z", 2)]
    assert [str(e).split(":")[0] for e in group.exceptions] == [
        "task with key 'y' failed", "task with key 'z' failed"]
    assert type(group.results) is dict
    assert list(group.results) == ["x", "y", "z", "w"]
    assert group.results["x"] == -1
    assert group.results["w"] == -4
    assert group.results["y"] is group.exceptions[0]
    assert group.results["z"] is group.exceptions[1]


# --------------------------------------------------------------------------
# return_exceptions
# --------------------------------------------------------------------------


def test_return_exceptions_returns_errors_in_place(tmp_path, pool):
    """return_exceptions=True returns every result with a TaskError in each failed slot."""
    log = tmp_path / "ran.txt"
    fn = functools.partial(logged, str(log), 0.0, {1, 4})
    results = pool.process(fn, range(6), return_exceptions=True, timeout=T)
    assert [type(r) for r in results] == [int, TaskError, int, int, TaskError, int]
    assert [r for r in results if type(r) is int] == [1000, 1002, 1003, 1005]
    assert [(r.index, r.attempts, str(r.__cause__)) for r in results if type(r) is TaskError] == [
        (1, 1, "task 1 failed on purpose"), (4, 1, "task 4 failed on purpose")]
    assert sorted(ran(log)) == list(range(6))


def test_return_exceptions_never_raises_even_with_continue_on_error(fork_pool):
    """return_exceptions wins over continue_on_error: nothing is raised."""
    results = fork_pool.process(
        fail_on_multiples_of_3, [1, 3, 4], return_exceptions=True, continue_on_error=True, timeout=T)
    assert results[0] == -1 and results[2] == -4
    assert type(results[1]) is TaskError and results[1].index == 1
    with WorkerPool(2, start_method="fork", continue_on_error=True) as p:
        results = p.process(fail_at_3, [3, 3], return_exceptions=True, timeout=T)
    assert [type(r) for r in results] == [TaskError, TaskError]
    assert [r.index for r in results] == [0, 1]


def test_return_exceptions_process_map(fork_pool):
    """process_map with return_exceptions returns a dict with TaskErrors as values."""
    result = fork_pool.process_map(fail_at_3, {"a": 3, "b": 1}, return_exceptions=True, timeout=T)
    assert list(result) == ["a", "b"]
    assert type(result["a"]) is TaskError
    assert (result["a"].key, result["a"].index) == ("a", 0)
    assert result["b"] == 10


def gen_values(n):
    yield from range(n)


def test_failures_with_generator_input_keep_their_places(fork_pool):
    """With generator input, continue_on_error and return_exceptions put errors at the right index."""
    results = fork_pool.process(fail_at_3, gen_values(4), return_exceptions=True, timeout=T)
    assert [type(r) for r in results] == [int, int, int, TaskError]
    assert results[:3] == [0, 10, 20] and results[3].index == 3
    with pytest.raises(TaskErrorGroup) as info:
        fork_pool.process(fail_on_multiples_of_3, gen_values(7), continue_on_error=True, timeout=T)
    group = info.value
    assert [e.index for e in group.exceptions] == [0, 3, 6]
    assert len(group.results) == 7
    assert [group.results[i] for i in (1, 2, 4, 5)] == [-1, -2, -4, -5]


def raise_oserror(x):
    error = OSError(2, "No such file or directory", f"/nonexistent/{x}")
    error.extra = {"x": x}
    raise error


def test_exception_attributes_survive(fork_pool):
    """The cause keeps its standard and custom attributes (errno, filename, extra)."""
    with pytest.raises(TaskError) as info:
        fork_pool.process(raise_oserror, ["f"], timeout=T)
    cause = info.value.__cause__
    assert type(cause) is FileNotFoundError
    assert (cause.errno, cause.strerror, cause.filename) == (2, "No such file or directory", "/nonexistent/f")
    assert cause.extra == {"x": "f"}


def test_exception_class_local_to_the_test_is_rebuilt_as_itself(pool):
    """An exception class defined inside the test comes back as that very class."""

    class LocalError(Exception):
        pass

    def fail(x):
        raise LocalError(f"local {x}")

    with pytest.raises(TaskError) as info:
        pool.process(fail, [4], timeout=T)
    assert type(info.value.__cause__) is LocalError
    assert info.value.__cause__.args == ("local 4",)


# --------------------------------------------------------------------------
# Exceptions that cannot be rebuilt in the parent
# --------------------------------------------------------------------------


def test_exception_that_cannot_be_rebuilt_arrives_as_remote_error(pool):
    """An exception whose __init__ cannot take its own args arrives as a RemoteError cause."""
    with pytest.raises(TaskError) as info:
        pool.process(raise_two_arg, [5], timeout=T)
    cause = info.value.__cause__
    assert type(cause) is RemoteError
    assert cause.type_name == "test_errors.TwoArgError"
    assert cause.message == "two-arg 5"
    assert str(cause) == "test_errors.TwoArgError: two-arg 5"
    assert "raise_two_arg" in cause.remote_traceback
    assert "TwoArgError: two-arg 5" in cause.remote_traceback
    assert str(info.value).startswith("task 0 failed: test_errors.TwoArgError: two-arg 5")
    assert "raise_two_arg" in info.value.remote_traceback


def test_exception_whose_reduce_raises_arrives_as_remote_error(pool):
    """An exception that refuses to be pickled arrives as a RemoteError cause."""
    results = pool.process(raise_unreducible, [1, 2], return_exceptions=True, timeout=T)
    assert [type(r) for r in results] == [TaskError, TaskError]
    for i, error in enumerate(results, start=1):
        cause = error.__cause__
        assert type(cause) is RemoteError
        assert cause.type_name == "test_errors.UnreducibleError"
        assert cause.message == f"unreducible {i}"
        assert "raise_unreducible" in cause.remote_traceback
        assert error.index == i - 1


def test_exception_whose_str_raises_still_reports(fork_pool):
    """An exception whose __str__ raises still becomes a TaskError with a placeholder message."""
    with pytest.raises(TaskError) as info:
        fork_pool.process(raise_bad_str, [1], timeout=T)
    assert type(info.value.__cause__) is BadStrError
    assert "test_errors.BadStrError" in info.value.args[0]
    assert "<str() of the exception failed>" in info.value.args[0]


# --------------------------------------------------------------------------
# BaseExceptions raised by tasks
# --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kind", "cause_type", "cause_args"),
    [
        ("exit", SystemExit, (3,)),
        ("interrupt", KeyboardInterrupt, ("ctrl-c in a task",)),
        ("base", CustomBase, ("custom base",)),
        ("generator_exit", GeneratorExit, ("gen exit",)),
    ],
)
def test_base_exception_in_task_is_a_task_error_and_worker_survives(one_worker, kind, cause_type, cause_args):
    """SystemExit, KeyboardInterrupt and BaseException subclasses become TaskErrors; the worker lives on."""
    (pid,) = one_worker.process(raise_base, ["pid"], timeout=T)
    with pytest.raises(TaskError) as info:
        one_worker.process(raise_base, [kind], timeout=T)
    e = info.value
    assert type(e) is TaskError
    assert type(e.__cause__) is cause_type
    assert e.__cause__.args == cause_args
    assert e.worker_pid == pid
    assert e.index == 0
    assert one_worker.process(raise_base, ["pid"], timeout=T) == [pid]


def test_base_exceptions_with_return_exceptions(one_worker):
    """BaseExceptions mid-batch fail only their own task; the rest succeed in the same worker."""
    kinds = ["pid", "exit", "pid", "interrupt", "pid", "base", "pid"]
    results = one_worker.process(raise_base, kinds, return_exceptions=True, timeout=T)
    pids = {r for r in results if type(r) is int}
    assert len(pids) == 1
    assert [type(r.__cause__) for r in results if isinstance(r, TaskError)] == [
        SystemExit, KeyboardInterrupt, CustomBase]
    assert [r.index for r in results if isinstance(r, TaskError)] == [1, 3, 5]


# --------------------------------------------------------------------------
# Things that cannot be pickled
# --------------------------------------------------------------------------


def test_unpicklable_function_raises_at_the_call(fork_pool):
    """A closure over a Lock raises UnpicklableFunctionError (a TypeError) at once."""
    lock = threading.Lock()

    def holds_lock(x):
        with lock:
            return x

    t0 = time.monotonic()
    with pytest.raises(UnpicklableFunctionError) as info:
        fork_pool.process(holds_lock, [1, 2, 3], timeout=T)
    assert time.monotonic() - t0 < 2
    assert isinstance(info.value, TypeError)
    assert isinstance(info.value, PoolError)
    assert str(info.value).startswith("fn cannot be pickled")
    assert "lock" in str(info.value)
    assert isinstance(info.value.__cause__, TypeError)
    with pytest.raises(UnpicklableFunctionError):
        fork_pool.process_map(holds_lock, {"a": 1}, timeout=T)
    assert fork_pool.process(fail_at_3, [1], timeout=T) == [10]


def test_unpicklable_default_argument_raises_and_starts_nothing():
    """A function with a Lock default raises UnpicklableFunctionError on a never-started pool."""

    def with_default(x, lock=threading.Lock()):  # noqa: B008 - the point of the test
        return x

    p = WorkerPool(2, start_method="fork")
    try:
        with pytest.raises(UnpicklableFunctionError):
            p.process(with_default, [1], timeout=T)
        assert p._engine is None
    finally:
        p.shutdown()


def test_unpicklable_argument_fails_only_its_task(pool):
    """A Lock as a task argument fails that task with TaskSerializationError(direction='task')."""
    lock = threading.Lock()
    results = pool.process(use_arg, [1, lock, 3, 4], return_exceptions=True, timeout=T)
    assert results[0] == 1 and results[2] == 3 and results[3] == 4
    error = results[1]
    assert type(error) is TaskSerializationError
    assert isinstance(error, TaskError)
    assert error.direction == "task"
    assert error.index == 1
    assert error.attempts == 0  # it never ran
    assert error.worker_pid is None
    assert isinstance(error.__cause__, TypeError)
    assert "lock" in str(error.__cause__)
    assert str(error).startswith("task 1: its argument cannot be pickled")


def test_unpicklable_argument_default_mode_raises(fork_pool):
    """Without return_exceptions an unpicklable argument raises TaskSerializationError."""
    with pytest.raises(TaskSerializationError) as info:
        fork_pool.process(use_arg, [1, 2, threading.Lock()], timeout=T)
    assert info.value.direction == "task"
    assert info.value.index == 2
    assert fork_pool.process(use_arg, [5], timeout=T) == [5]


def test_unpicklable_argument_in_process_map_names_key(fork_pool):
    """In process_map an unpicklable value fails its key only."""
    result = fork_pool.process_map(
        use_arg, {"ok": 1, "bad": threading.Lock()}, return_exceptions=True, timeout=T)
    assert result["ok"] == 1
    assert type(result["bad"]) is TaskSerializationError
    assert (result["bad"].key, result["bad"].index, result["bad"].direction) == ("bad", 1, "task")


def test_unpicklable_result_fails_its_task_and_worker_survives(one_worker):
    """A Lock returned by a task fails it with TaskSerializationError(direction='result'); the worker lives on."""
    (pid,) = one_worker.process(getpid, [0], timeout=T)
    results = one_worker.process(return_lock, [0, 1, 2], return_exceptions=True, timeout=T)
    assert results[0] == 0 and results[2] == 2
    error = results[1]
    assert type(error) is TaskSerializationError
    assert error.direction == "result"
    assert error.index == 1
    assert error.attempts == 1
    assert error.worker_pid == pid
    assert "lock" in str(error)
    with pytest.raises(TaskSerializationError) as info:
        one_worker.process(return_lock, [1], timeout=T)
    assert info.value.direction == "result"
    assert one_worker.process(getpid, [0], timeout=T) == [pid]


def test_argument_that_cannot_be_unpickled_in_worker(fork_pool):
    """An argument that pickles but fails to unpickle in the worker fails its task with direction 'task'."""
    tasks = [1, LoadsBadly("cannot load arg"), 3]
    results = fork_pool.process(use_arg, tasks, return_exceptions=True, timeout=T)
    assert results[0] == 1 and results[2] == 3
    error = results[1]
    assert type(error) is TaskSerializationError
    assert error.direction == "task"
    assert error.index == 1
    assert type(error.__cause__) is ValueError
    assert str(error.__cause__) == "cannot load arg"


def test_result_that_cannot_be_unpickled_in_parent(fork_pool):
    """A result that pickles in the worker but cannot be unpickled here fails its task with direction 'result'."""
    results = fork_pool.process(make_loads_badly, [0, 1, 2], return_exceptions=True, timeout=T)
    assert results[0] == 0 and results[2] == 2
    error = results[1]
    assert type(error) is TaskSerializationError
    assert error.direction == "result"
    assert error.index == 1
    assert type(error.__cause__) is ValueError
    assert str(error.__cause__) == "cannot load result 1"


# --------------------------------------------------------------------------
# The error objects themselves
# --------------------------------------------------------------------------


def test_task_error_pickles_with_its_attributes():
    """A TaskError survives pickling with every attribute."""
    error = TaskError("task 4 failed", index=4, key="k", attempts=2, worker_pid=123,
                      remote_traceback="Traceback...")
    copy = pickle.loads(pickle.dumps(error))
    assert type(copy) is TaskError
    assert (copy.args, copy.index, copy.key, copy.attempts, copy.worker_pid, copy.remote_traceback) == (
        ("task 4 failed",), 4, "k", 2, 123, "Traceback...")
    serial = TaskSerializationError("x", direction="result", index=1)
    copy2 = pickle.loads(pickle.dumps(serial))
    assert (type(copy2), copy2.direction, copy2.index) == (TaskSerializationError, "result", 1)


def test_task_error_returned_from_a_task_keeps_attributes(fork_pool):
    """A TaskError returned as a value (as by a nested pool) arrives with its attributes."""
    (value,) = fork_pool.process(
        lambda i: TaskError("inner", index=i, attempts=3, worker_pid=9), [6], timeout=T)
    assert type(value) is TaskError
    assert (value.args, value.index, value.attempts, value.worker_pid) == (("inner",), 6, 3, 9)


def test_remote_error_fields():
    """RemoteError keeps type name, message and traceback, and reads 'type: message'."""
    error = RemoteError("pkg.Err", "went wrong", "tb text")
    assert (error.type_name, error.message, error.remote_traceback) == ("pkg.Err", "went wrong", "tb text")
    assert str(error) == "pkg.Err: went wrong"


# --------------------------------------------------------------------------
# Errors too large for a ring frame
# --------------------------------------------------------------------------


def raise_huge(x):
    raise ValueError(f"{x}:" + "x" * 2_000_000)


def raise_on_odd(x):
    if x % 2:
        raise KeyError(str(x) * 1000)
    return x


def test_exception_with_a_huge_message_arrives_whole(fork_pool_one):
    """An exception whose message is larger than the ring is the task's own
    failure, message intact, not a crash of its worker."""
    with pytest.raises(TaskError) as caught:
        fork_pool_one.process(raise_huge, [7], timeout=T)
    cause = caught.value.__cause__
    assert type(cause) is ValueError
    assert str(cause) == "7:" + "x" * 2_000_000
    assert caught.value.index == 0
    assert fork_pool_one.process(abs, [-3], timeout=T) == [3]


def test_many_large_errors_through_a_small_ring():
    """Thousands of failures with kilobyte messages through a 64 KiB ring
    come back as task errors, each with its own message, and no worker dies."""
    with WorkerPool(2, start_method="fork", ring_size=65536) as pool:
        pids = set(pool.process(lambda _: os.getpid(), range(50), timeout=T))
        results = pool.process(raise_on_odd, range(6000), return_exceptions=True, timeout=60)
        assert set(pool.process(lambda _: os.getpid(), range(50), timeout=T)) <= pids
    for x, value in enumerate(results):
        if x % 2:
            assert isinstance(value, TaskError) and value.index == x
            assert type(value.__cause__) is KeyError
            assert value.__cause__.args == (str(x) * 1000,)
        else:
            assert value == x


@pytest.fixture
def fork_pool_one():
    with WorkerPool(1, start_method="fork") as pool:
        yield pool
