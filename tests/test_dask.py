"""DaskPool against a real Dask cluster on 127.0.0.1.

Most tests share one module-scoped LocalCluster.  Its processes exist
before each test starts, so conftest's leak check counts them as the
baseline.  Tests that kill a dask worker get a cluster of their own and
close it before they end: the nanny replaces a killed worker with a new
process, which the leak check would rightly report.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import itertools
import os
import signal
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import cloudpickle
import pytest

distributed = pytest.importorskip("distributed")
import dask  # noqa: E402

from poolme_mp import (  # noqa: E402
    CallCancelledError,
    CallTimeoutError,
    PoolClosedError,
    RetryPolicy,
    TaskError,
    TaskErrorGroup,
    TaskSerializationError,
    UnpicklableFunctionError,
    WorkerCrashedError,
)
from poolme_mp.dask import _CANCEL_AGAIN_AFTER, DaskPool  # noqa: E402

pytestmark = pytest.mark.timeout(120)

# The dask workers cannot import this test module by name: send its
# functions by value, as they would be from a user's __main__.
cloudpickle.register_pickle_by_value(sys.modules[__name__])

WAIT = 30  # seconds: the bound on every blocking wait below


def local_cluster(**config: Any) -> Any:
    with dask.config.set(config):
        return distributed.LocalCluster(
            n_workers=2, threads_per_worker=1, processes=True,
            dashboard_address=None, host="127.0.0.1")


@pytest.fixture(scope="module")
def cluster() -> Iterator[Any]:
    cluster = local_cluster()
    try:
        yield cluster
    finally:
        cluster.close()


@pytest.fixture(scope="module")
def client(cluster: Any) -> Iterator[Any]:
    client = distributed.Client(cluster, set_as_default=False)
    try:
        yield client
    finally:
        client.close()


@pytest.fixture
def pool(client: Any) -> Iterator[DaskPool]:
    with DaskPool(client) as pool:
        yield pool
    # Nothing of a call may stay on the cluster once it has ended.
    wait_until(lambda: not client.futures, WAIT)


@contextlib.contextmanager
def crash_cluster() -> Iterator[Any]:
    """A cluster of its own, where a task fails the first time its worker
    dies (allowed-failures=0), so crash tests need few restarts."""
    cluster = local_cluster(**{"distributed.scheduler.allowed-failures": 0})
    client = distributed.Client(cluster, set_as_default=False)
    try:
        yield client
    finally:
        client.close()
        cluster.close()


def wait_until(predicate: Any, timeout: float) -> Any:
    deadline = time.monotonic() + timeout
    while not (result := predicate()):
        assert time.monotonic() < deadline, f"not true within {timeout} s: {predicate}"
        time.sleep(0.02)
    return result


# -- task functions (run in the dask workers) ----------------------------------


def square(x: int) -> int:
    return x * x


def invert(x: int) -> float:
    return 1 / x


def record_and_invert(args: tuple[str, int]) -> float:
    folder, x = args
    Path(folder, f"{x}-{time.monotonic_ns()}").touch()
    time.sleep(0.02)
    return 1 / x


def flaky(args: tuple[str, int]) -> str:
    """Fails until it has been called `fails` times for this folder."""
    folder, fails = args
    attempt = len(os.listdir(folder)) + 1
    Path(folder, f"attempt-{attempt}").write_text(repr(time.monotonic()))
    if attempt <= fails:
        raise ValueError(f"attempt {attempt}")
    return f"ok on attempt {attempt}"


def hold(args: tuple[str, int]) -> int:
    """Run until the file release exists in folder (a stoppable long task)."""
    folder, x = args
    Path(folder, f"started-{x}").write_text(str(os.getpid()))
    deadline = time.monotonic() + WAIT
    while not Path(folder, "release").exists() and time.monotonic() < deadline:
        time.sleep(0.01)
    return x


def kill_own_worker_at(args: tuple[int, int]) -> int:
    x, fatal = args
    if x == fatal:
        os.kill(os.getpid(), signal.SIGKILL)
    return x


def count_scheduler_tasks(dask_scheduler: Any) -> int:
    return len(dask_scheduler.tasks)


def worker_pids(client: Any) -> set[int]:
    return set(client.run(os.getpid).values())


# -- process / process_map --------------------------------------------------------


@pytest.mark.parametrize("chunksize", [None, 1, 7])
def test_process_returns_results_in_input_order(client: Any, chunksize: int | None) -> None:
    """process gives a list in input order, for lists and generators, at any chunksize."""
    with DaskPool(client, chunksize=chunksize) as pool:
        assert pool.process(square, list(range(50))) == [x * x for x in range(50)]
        assert pool.process(square, (x for x in range(23))) == [x * x for x in range(23)]
        assert pool.process(square, []) == []
        assert pool.process(lambda x: None, [1, 2]) == [None, None]


def test_automatic_batches_run_many_tiny_tasks_quickly(pool: DaskPool) -> None:
    """chunksize=None groups tiny tasks: 100k of them take well under 10 s."""
    begin = time.monotonic()
    assert pool.process(square, range(100_000))[-3:] == [99997**2, 99998**2, 99999**2]
    assert time.monotonic() - begin < 10


def test_process_map_returns_keys_in_order(pool: DaskPool) -> None:
    """process_map keeps the mapping's keys and their order."""
    mapping = {"z": "abc", "a": "", "m": "xy"}
    result = pool.process_map(len, mapping)
    assert result == {"z": 3, "a": 0, "m": 2}
    assert list(result) == ["z", "a", "m"]
    assert pool.process_map(len, [("k", "1234"), (5, "1")]) == {"k": 4, 5: 1}


def test_first_failure_raises_task_error_and_stops(client: Any, tmp_path: Path) -> None:
    """The first failure raises TaskError with index, cause and traceback; later tasks do not start."""
    tasks = [(str(tmp_path), x) for x in [1, 2, 0] + list(range(3, 60))]
    with DaskPool(client, chunksize=1) as pool:
        with pytest.raises(TaskError) as info:
            pool.process(record_and_invert, tasks)
    error = info.value
    assert type(error) is TaskError
    assert error.index == 2 and error.key is None and error.attempts == 1
    assert isinstance(error.__cause__, ZeroDivisionError)
    assert "ZeroDivisionError: division by zero" in error.remote_traceback
    assert error.worker_pid in worker_pids(client)
    assert "task 2 failed" in str(error)
    time.sleep(0.3)  # anything still running has had time to record itself
    assert len(os.listdir(tmp_path)) < 20


def test_continue_on_error_raises_group_with_results(pool: DaskPool) -> None:
    """continue_on_error runs everything and raises a TaskErrorGroup in task order, with .results."""
    with pytest.raises(TaskErrorGroup) as info:
        pool.process(invert, [1, 0, 2, 0, 4], continue_on_error=True)
    group = info.value
    assert [e.index for e in group.exceptions] == [1, 3]
    assert all(isinstance(e.__cause__, ZeroDivisionError) for e in group.exceptions)
    assert group.results[0] == 1.0 and group.results[2] == 0.5 and group.results[4] == 0.25
    assert group.results[1] is group.exceptions[0] and group.results[3] is group.exceptions[1]


def test_continue_on_error_in_process_map_gives_dict(client: Any) -> None:
    """In process_map a TaskError names its key and the group's results are a dict."""
    with DaskPool(client, continue_on_error=True) as pool:
        with pytest.raises(TaskErrorGroup) as info:
            pool.process_map(invert, {"a": 1, "b": 0, "c": 2})
    group = info.value
    (error,) = group.exceptions
    assert error.key == "b" and error.index == 1
    assert "task with key 'b'" in str(error)
    assert list(group.results) == ["a", "b", "c"]
    assert group.results["a"] == 1.0 and group.results["b"] is error


def test_return_exceptions_puts_errors_in_place(pool: DaskPool) -> None:
    """return_exceptions gives a TaskError in place of each failure and raises nothing."""
    results = pool.process(invert, [2, 0, 1], return_exceptions=True)
    assert results[0] == 0.5 and results[2] == 1.0
    assert isinstance(results[1], TaskError) and results[1].index == 1
    assert isinstance(results[1].__cause__, ZeroDivisionError)


def test_unpicklable_exception_arrives_as_remote_error(pool: DaskPool) -> None:
    """An exception that cannot be pickled arrives as a RemoteError with its type and text."""
    from poolme_mp import RemoteError

    def raise_unpicklable(x: int) -> None:
        error = ValueError("holds a lock")
        error.lock = threading.Lock()  # type: ignore[attr-defined]
        raise error

    with pytest.raises(TaskError) as info:
        pool.process(raise_unpicklable, [1])
    cause = info.value.__cause__
    assert isinstance(cause, RemoteError)
    assert cause.type_name == "builtins.ValueError" and cause.message == "holds a lock"


def test_unpicklable_argument_and_result_fail_their_own_task(pool: DaskPool) -> None:
    """A task argument or result that does not pickle fails only its own item."""
    results = pool.process(lambda x: x, [1, threading.Lock(), 3], return_exceptions=True)
    assert results[0] == 1 and results[2] == 3
    assert isinstance(results[1], TaskSerializationError)
    assert results[1].direction == "task" and results[1].index == 1
    last = pool.process(lambda x: x, [1, 2, threading.Lock()], return_exceptions=True)
    assert last[:2] == [1, 2] and isinstance(last[2], TaskSerializationError)
    results = pool.process(lambda x: threading.Lock() if x == 1 else x, [0, 1, 2],
                           return_exceptions=True)
    assert results[0] == 0 and results[2] == 2
    assert isinstance(results[1], TaskSerializationError)
    assert results[1].direction == "result" and results[1].index == 1


def test_failing_input_iterator_raises_task_error(pool: DaskPool) -> None:
    """An input iterator that raises ends the call with a TaskError whose cause is its error."""
    def tasks() -> Iterator[int]:
        yield from [1, 2, 3]
        raise OSError("disk gone")

    with pytest.raises(TaskError) as info:
        pool.process(square, tasks())
    assert info.value.index == 3
    assert isinstance(info.value.__cause__, OSError)
    stream = pool.process_stream(square, tasks())
    assert [next(stream) for _ in range(3)] == [1, 4, 9]
    with pytest.raises(TaskError, match="disk gone"):
        next(stream)
    with pytest.raises(TaskError, match="disk gone"):
        pool.process_map(square, ((x, x) for x in tasks()))


def test_failing_input_joins_the_group_under_continue_on_error(pool: DaskPool) -> None:
    """Under continue_on_error an input failure is the group's last error, after the tasks'."""
    def tasks() -> Iterator[int]:
        yield from [1, 0, 2]
        raise OSError("disk gone")

    with pytest.raises(TaskErrorGroup) as info:
        pool.process(invert, tasks(), continue_on_error=True)
    first, last = info.value.exceptions
    assert first.index == 1 and isinstance(first.__cause__, ZeroDivisionError)
    assert last.index == 3 and isinstance(last.__cause__, OSError)
    assert info.value.results[0] == 1.0 and info.value.results[2] == 0.5
    with pytest.raises(TaskErrorGroup) as info:
        list(pool.process_stream(invert, tasks(), continue_on_error=True))
    assert [e.index for e in info.value.exceptions] == [1, 3]


# -- retries -----------------------------------------------------------------------


def test_retries_run_again_after_backoff(client: Any, tmp_path: Path) -> None:
    """A failing task is retried up to max_attempts, waiting the backoff between attempts."""
    with DaskPool(client, max_attempts=3, initial_delay=0.2, multiplier=2.0) as pool:
        assert pool.process(flaky, [(str(tmp_path), 2)]) == ["ok on attempt 3"]
    times = [float(Path(tmp_path, f"attempt-{n}").read_text()) for n in (1, 2, 3)]
    assert sorted(os.listdir(tmp_path)) == ["attempt-1", "attempt-2", "attempt-3"]
    assert times[1] - times[0] >= 0.2 and times[2] - times[1] >= 0.4


def test_retries_exhausted_report_attempts(client: Any, tmp_path: Path) -> None:
    """When every attempt fails, TaskError.attempts counts them and the cause is the last error."""
    policy = RetryPolicy(max_attempts=2, initial_delay=0.01)
    with DaskPool(client) as pool:
        with pytest.raises(TaskError) as info:
            pool.process(flaky, [(str(tmp_path), 5)], retry=policy)
    assert info.value.attempts == 2 and "after 2 attempts" in str(info.value)
    assert str(info.value.__cause__) == "attempt 2"
    assert len(os.listdir(tmp_path)) == 2


def test_retry_on_limits_what_is_retried(client: Any, tmp_path: Path) -> None:
    """retry_on decides which exceptions are retried: others fail at once."""
    with DaskPool(client, max_attempts=3, initial_delay=0.01, retry_on=(KeyError,)) as pool:
        with pytest.raises(TaskError) as info:
            pool.process(flaky, [(str(tmp_path), 5)])
    assert info.value.attempts == 1
    assert len(os.listdir(tmp_path)) == 1


def test_submit_retries_too(client: Any, tmp_path: Path) -> None:
    """submit follows the pool's retry policy."""
    with DaskPool(client, max_attempts=2, initial_delay=0.01) as pool:
        future = pool.submit(flaky, (str(tmp_path), 1))
        assert future.result(timeout=WAIT) == "ok on attempt 2"


# -- timeout and cancel ---------------------------------------------------------------


def test_timeout_raises_promptly_and_pool_stays_usable(pool: DaskPool, tmp_path: Path) -> None:
    """timeout= raises CallTimeoutError soon after it passes; the pool answers the next call."""
    tasks = [(str(tmp_path), x) for x in range(6)]
    begin = time.monotonic()
    with pytest.raises(CallTimeoutError):
        pool.process(hold, tasks, timeout=0.5)
    assert 0.5 <= time.monotonic() - begin < 2.0
    Path(tmp_path, "release").touch()
    assert pool.process(square, [3], timeout=WAIT) == [9]


def test_cancel_token_raises_promptly(pool: DaskPool, tmp_path: Path) -> None:
    """Setting the cancel token raises CallCancelledError within a fraction of a second."""
    token = threading.Event()
    timer = threading.Timer(0.3, token.set)
    timer.start()
    begin = time.monotonic()
    try:
        with pytest.raises(CallCancelledError):
            pool.process(hold, [(str(tmp_path), x) for x in range(4)], cancel=token)
    finally:
        timer.cancel()
        Path(tmp_path, "release").touch()
    assert time.monotonic() - begin < 1.5


def test_stream_timeout(pool: DaskPool, tmp_path: Path) -> None:
    """A stream's timeout counts from the call and ends it with CallTimeoutError."""
    stream = pool.process_stream(hold, [(str(tmp_path), x) for x in range(4)], timeout=0.3)
    begin = time.monotonic()
    with pytest.raises(CallTimeoutError):
        list(stream)
    assert time.monotonic() - begin < 1.5
    Path(tmp_path, "release").touch()


# -- process_stream ------------------------------------------------------------------


@pytest.mark.parametrize("ordered", [True, False])
def test_stream_reads_lazily_within_buffer_size(pool: DaskPool, ordered: bool) -> None:
    """A stream never has more than buffer_size tasks read ahead of its consumer."""
    reads = 0

    def tasks() -> Iterator[int]:
        nonlocal reads
        for x in range(40):
            reads += 1
            yield x

    received = []
    for value in pool.process_stream(square, tasks(), buffer_size=4, ordered=ordered):
        assert reads - len(received) <= 4
        received.append(value)
    expected = [x * x for x in range(40)]
    assert (received if ordered else sorted(received)) == expected
    assert reads == 40


def test_unordered_stream_yields_as_completed(pool: DaskPool, tmp_path: Path) -> None:
    """ordered=False yields fast results before a slow one that came first."""
    def slow_first(x: int) -> int:
        if x == 0:
            time.sleep(1.0)
        return x

    with DaskPool(pool.client, chunksize=1) as unbatched:
        results = list(unbatched.process_stream(slow_first, range(4), ordered=False))
    assert sorted(results) == list(range(4))
    assert results[0] != 0


def test_stream_closed_early_stops_reading_and_cancels(pool: DaskPool, client: Any) -> None:
    """Closing a stream early stops reading an endless input and cancels its dask tasks."""
    reads = itertools.count()
    endless = (next(reads) and x for x in itertools.count())
    stream = pool.process_stream(square, endless, buffer_size=8)
    assert [next(stream) for _ in range(3)] == [0, 1, 4]
    stream.close()
    read_at_close = next(reads)
    assert read_at_close <= 3 + 8 + 1
    wait_until(lambda: not client.futures, WAIT)
    assert next(reads) == read_at_close + 1  # nothing read it after close
    assert pool.process(square, [5]) == [25]


def test_ordered_stream_yields_results_before_failure(pool: DaskPool) -> None:
    """An ordered stream yields every result before the first failure, then raises it."""
    stream = pool.process_stream(invert, [1, 2, 4, 0, 5, 8], buffer_size=2)
    assert [next(stream) for _ in range(3)] == [1.0, 0.5, 0.25]
    with pytest.raises(TaskError) as info:
        next(stream)
    assert info.value.index == 3


def test_stream_error_modes(pool: DaskPool) -> None:
    """Streams follow return_exceptions and continue_on_error like process."""
    mixed = list(pool.process_stream(invert, [1, 0, 2], return_exceptions=True))
    assert mixed[0] == 1.0 and mixed[2] == 0.5 and isinstance(mixed[1], TaskError)
    received = []
    with pytest.raises(TaskErrorGroup) as info:
        for value in pool.process_stream(invert, [0, 1, 0, 2], continue_on_error=True):
            received.append(value)
    assert received == [1.0, 0.5]
    assert [e.index for e in info.value.exceptions] == [0, 2]


# -- Executor protocol ----------------------------------------------------------------


def test_submit_returns_future(pool: DaskPool) -> None:
    """submit returns a concurrent.futures.Future; failures are TaskError with the cause."""
    future = pool.submit(pow, 2, 10)
    assert isinstance(future, concurrent.futures.Future)
    assert future.result(timeout=WAIT) == 1024
    assert pool.submit(lambda a, *, b: a - b, 10, b=3).result(timeout=WAIT) == 7
    failing = pool.submit(invert, 0)
    error = failing.exception(timeout=WAIT)
    assert isinstance(error, TaskError) and isinstance(error.__cause__, ZeroDivisionError)


def test_futures_work_with_as_completed_and_wait(pool: DaskPool) -> None:
    """Futures from submit work with as_completed and wait."""
    futures = [pool.submit(square, x) for x in range(6)]
    done = {f.result() for f in concurrent.futures.as_completed(futures, timeout=WAIT)}
    assert done == {x * x for x in range(6)}
    finished, not_done = concurrent.futures.wait(
        [pool.submit(square, 7)], timeout=WAIT, return_when=concurrent.futures.ALL_COMPLETED)
    assert not not_done and [f.result() for f in finished] == [49]


def test_cancelling_future_cancels_dask_task(pool: DaskPool, client: Any,
                                             tmp_path: Path) -> None:
    """Cancelling a queued future cancels its dask task and wakes as_completed."""
    busy = [pool.submit(hold, (str(tmp_path), x)) for x in range(2)]
    wait_until(lambda: len(os.listdir(tmp_path)) == 2, WAIT)
    queued = pool.submit(hold, (str(tmp_path), 99))
    assert queued.cancel() and queued.cancelled()
    assert list(concurrent.futures.as_completed([queued], timeout=WAIT)) == [queued]
    # A cancel can overtake the task's registration on the scheduler; the
    # pool repeats it after _CANCEL_AGAIN_AFTER.  Past that, only the two
    # busy tasks are left, while both workers are still held.
    time.sleep(_CANCEL_AGAIN_AFTER + 0.3)
    wait_until(lambda: client.run_on_scheduler(count_scheduler_tasks) == 2, WAIT)
    Path(tmp_path, "release").touch()
    assert [f.result(timeout=WAIT) for f in busy] == [0, 1]
    assert not Path(tmp_path, "started-99").exists()


def test_map_is_lazy_and_ordered(pool: DaskPool) -> None:
    """map zips its iterables, yields in order and honours timeout."""
    assert list(pool.map(pow, [2, 3, 4], [5, 6, 7])) == [32, 729, 16384]
    assert list(pool.map(square, itertools.islice(itertools.count(), 5), chunksize=2)) == [
        0, 1, 4, 9, 16]
    with pytest.raises(TimeoutError):
        list(pool.map(time.sleep, [2.0, 2.0], timeout=0.3))


# -- arguments -----------------------------------------------------------------------


def test_bad_arguments_raise_naming_the_argument(client: Any) -> None:
    """Bad arguments raise TypeError/ValueError at the call, naming the argument."""
    with pytest.raises(ValueError, match="chunksize"):
        DaskPool(client, chunksize=0)
    with pytest.raises(TypeError, match="buffer_size"):
        DaskPool(client, buffer_size="8")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="retry"):
        DaskPool(client, retry=3)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="client"):
        DaskPool(42)
    with pytest.raises(ValueError, match="workers"):
        DaskPool(client, workers=2)
    with DaskPool(client) as pool:
        with pytest.raises(TypeError, match="fn"):
            pool.process(42, [1])  # type: ignore[arg-type]
        with pytest.raises(TypeError, match="tasks"):
            pool.process(square, 5)  # type: ignore[arg-type]
        with pytest.raises(ValueError, match="timeout"):
            pool.process(square, [1], timeout=-1)
        with pytest.raises(TypeError, match="cancel"):
            pool.process(square, [1], cancel=True)  # type: ignore[arg-type]
        with pytest.raises(ValueError, match="buffer_size"):
            pool.process_stream(square, [1], buffer_size=0)
        with pytest.raises(ValueError, match="chunksize"):
            pool.map(square, [1], chunksize=0)
        with pytest.raises(TypeError, match="mapping"):
            pool.process_map(square, [1, 2])  # type: ignore[arg-type]


def test_unpicklable_function_raises_at_the_call(pool: DaskPool) -> None:
    """A function that cannot be pickled raises UnpicklableFunctionError (a TypeError) at once."""
    lock = threading.Lock()

    def uses_lock(x: int) -> int:
        with lock:
            return x

    for call in (lambda: pool.process(uses_lock, [1]), lambda: pool.submit(uses_lock, 1),
                 lambda: pool.process_stream(uses_lock, [1])):
        with pytest.raises(UnpicklableFunctionError):
            call()
    assert issubclass(UnpicklableFunctionError, TypeError)


def test_threads_share_one_pool(pool: DaskPool) -> None:
    """Several threads may run calls on one pool at once, each getting its own results."""
    def job(offset: int) -> list[int]:
        return pool.process(lambda x: x + offset, range(30), timeout=WAIT)

    with concurrent.futures.ThreadPoolExecutor(3) as threads:
        results = list(threads.map(job, [0, 100, 200], timeout=WAIT))
    assert results == [[x + offset for x in range(30)] for offset in (0, 100, 200)]


def test_progress_bar_does_not_change_results(pool: DaskPool,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    """progress=True draws a tqdm bar and returns the same results."""
    assert pool.process(square, range(20), progress=True) == [x * x for x in range(20)]
    assert list(pool.process_stream(square, range(5), progress=True)) == [0, 1, 4, 9, 16]
    assert "20/20" in capsys.readouterr().err


def test_missing_distributed_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without distributed installed, DaskPool says which extra to install."""
    monkeypatch.setitem(sys.modules, "distributed", None)
    with pytest.raises(ImportError, match=r'pip install "poolme-mp\[dask\]"'):
        DaskPool()


# -- lifecycle -------------------------------------------------------------------------


def test_shutdown_waits_and_then_refuses_work(client: Any, tmp_path: Path) -> None:
    """shutdown(wait=True) finishes submitted work; later calls raise PoolClosedError; a
    client passed in stays open."""
    pool = DaskPool(client)
    future = pool.submit(hold, (str(tmp_path), 1))
    threading.Timer(0.3, Path(tmp_path, "release").touch).start()
    pool.shutdown(wait=True)
    assert future.done() and future.result() == 1
    with pytest.raises(PoolClosedError):
        pool.process(square, [1])
    with pytest.raises(PoolClosedError):
        pool.submit(square, 1)
    pool.shutdown()  # twice is harmless
    assert client.status == "running"


def test_shutdown_cancel_futures_and_open_streams(client: Any, tmp_path: Path) -> None:
    """shutdown(cancel_futures=True) cancels unfinished futures; open streams end with
    PoolClosedError."""
    pool = DaskPool(client, chunksize=1)
    stream = pool.process_stream(square, range(100), buffer_size=2)
    assert next(stream) == 0
    futures = [pool.submit(hold, (str(tmp_path), x)) for x in range(4)]
    pool.shutdown(wait=True, cancel_futures=True)
    assert all(f.cancelled() for f in futures)
    with pytest.raises(PoolClosedError):
        list(stream)
    Path(tmp_path, "release").touch()
    wait_until(lambda: not client.futures, WAIT)


def test_address_string_makes_and_closes_own_client(cluster: Any) -> None:
    """A scheduler address gives a pool with its own client, closed on shutdown."""
    with DaskPool(cluster.scheduler_address) as pool:
        own_client = pool.client
        assert pool.process(square, [1, 2]) == [1, 4]
    assert own_client.status == "closed"


def test_no_client_starts_and_closes_a_local_cluster() -> None:
    """DaskPool() starts a LocalCluster of processes on loopback and closes it on shutdown."""
    with DaskPool(workers=1) as pool:
        info = pool.client.scheduler_info()
        (address,) = info["workers"]
        assert address.startswith("tcp://127.0.0.1:")
        assert pool.process(square, range(4)) == [0, 1, 4, 9]
        pid = next(iter(worker_pids(pool.client)))
    assert pool.client.status == "closed"
    wait_until(lambda: not os.path.exists(f"/proc/{pid}"), WAIT)


# -- dask workers that die -----------------------------------------------------------------


def test_worker_killed_by_its_task_fails_that_task() -> None:
    """A task that kills its dask worker fails with WorkerCrashedError (no hang), its
    batch-mates still succeed, and the pool stays usable."""
    with crash_cluster() as client, DaskPool(client, chunksize=4) as pool:
        with pytest.raises(TaskErrorGroup) as info:
            pool.process(kill_own_worker_at, [(x, 2) for x in range(4)],
                         continue_on_error=True, timeout=60)
        (error,) = info.value.exceptions
        assert isinstance(error, WorkerCrashedError) and error.index == 2
        assert type(error.__cause__).__name__ == "KilledWorker"
        assert "crashed its dask worker" in str(error)
        results = info.value.results
        assert [results[0], results[1], results[3]] == [0, 1, 3]
        with pytest.raises(WorkerCrashedError):
            pool.submit(kill_own_worker_at, (1, 1)).result(timeout=WAIT)
        assert pool.process(square, range(5), timeout=WAIT) == [0, 1, 4, 9, 16]


def test_worker_killed_from_outside_gives_clear_error(tmp_path: Path) -> None:
    """SIGKILL of a dask worker from outside fails the task it ran with WorkerCrashedError;
    the pool then answers."""
    with crash_cluster() as client, DaskPool(client, chunksize=1) as pool:
        future = pool.submit(hold, (str(tmp_path), 7))
        pid_file = Path(tmp_path, "started-7")
        wait_until(pid_file.exists, WAIT)
        os.kill(int(wait_until(pid_file.read_text, WAIT)), signal.SIGKILL)
        error = future.exception(timeout=WAIT)
        assert isinstance(error, WorkerCrashedError)
        Path(tmp_path, "release").touch()
        assert pool.process(square, [4, 5], timeout=WAIT) == [16, 25]


_TEST_PROCESS = os.getpid()


def _fail_outside_the_test_process(pid: int) -> int:
    if pid != _TEST_PROCESS and os.getpid() != _TEST_PROCESS:
        raise RuntimeError("this argument cannot be unpickled in a worker")
    return pid


class ArgumentForTheClientOnly:
    """Pickles here, but fails to unpickle in a dask worker."""

    def __reduce__(self) -> Any:
        return _fail_outside_the_test_process, (0,)


def _unpickling_fails(_: Any = None) -> None:
    raise RuntimeError("this result cannot be unpickled here")


class ResultForTheWorkerOnly:
    """Pickles in the worker, but fails to unpickle on the client."""

    def __reduce__(self) -> Any:
        return _unpickling_fails, ()


def identity(x: Any) -> Any:
    return x


def make_unreadable_result(_: Any) -> Any:
    return ResultForTheWorkerOnly()


def test_argument_that_does_not_unpickle_in_the_worker_fails_alone(client: Any) -> None:
    """One argument a worker cannot unpickle fails only its own task, as
    TaskSerializationError(direction="task"); the rest of its batch runs."""
    with DaskPool(client, chunksize=5) as pool:
        results = pool.process(identity, [1, 2, ArgumentForTheClientOnly(), 4, 5],
                               return_exceptions=True, timeout=60)
        assert [results[i] for i in (0, 1, 3, 4)] == [1, 2, 4, 5]
        error = results[2]
        assert type(error) is TaskSerializationError and error.direction == "task"
        assert error.index == 2
        failure = pool.submit(identity, ArgumentForTheClientOnly()).exception(timeout=60)
        assert type(failure) is TaskSerializationError and failure.direction == "task"


def test_submitted_result_that_does_not_unpickle_is_a_serialization_error(pool: DaskPool) -> None:
    """A submitted task whose result cannot be unpickled on the client fails
    with TaskSerializationError(direction="result"), and the pool goes on."""
    failure = pool.submit(make_unreadable_result, 0).exception(timeout=60)
    assert type(failure) is TaskSerializationError and failure.direction == "result"
    assert isinstance(failure.__cause__, RuntimeError)
    assert pool.submit(square, 4).result(timeout=60) == 16
