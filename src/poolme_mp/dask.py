"""DaskPool: WorkerPool's API and error contract on a Dask cluster.

    from poolme_mp.dask import DaskPool
    with DaskPool("tcp://scheduler:8786") as pool:
        results = pool.process(parse, paths)

How a call travels::

    caller's thread                       dask worker (one of N)
    ---------------                       ----------------------
    read input lazily, group it into
    batches, pickle each batch   ──────►  _run_batch: unpickle fn and items,
    (client.submit, one dask task         run fn on each item, catch each
     per batch)                           failure, pickle the outcomes
    done callbacks ──► queue     ◄──────  (bytes, so a bad result fails its
    place results, retry failures         own item, not the dask task)
    after their backoff, fail, stop

The call is driven by the thread that waits for it (process) or reads
it (process_stream), so there is no engine thread: dask's own client
thread moves the data.  Retries wait in the caller's delay queue and are
submitted again when due; no dask worker sleeps for a backoff.

distributed is imported only when a DaskPool is made, so this module
imports without it; the workers need poolme_mp installed, since each
dask task calls _run_batch from here.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import heapq
import itertools
import math
import os
import pickle
import queue
import threading
import time
import traceback
import uuid
from collections import deque
from collections.abc import (
    Callable,
    Generator,
    Hashable,
    Iterable,
    Iterator,
    Mapping,
    Sequence,
)
from typing import Any, ParamSpec, TypeVar

import cloudpickle

from ._errors import (
    CallCancelledError,
    CallTimeoutError,
    PoolClosedError,
    RemoteError,
    TaskError,
    TaskErrorGroup,
    TaskSerializationError,
    WorkerCrashedError,
    describe_task,
    input_failure,
)
from ._policies import RetryOn, RetryPolicy, check_int, pool_retry_policy
from ._pool import (
    DEFAULT_BUFFER_SIZE,
    UnpicklableFunctionError,
    _check_iterable,
    _check_timeout,
    _length_of,
    _progress_bar,
    _read_input,
    usable_cpu_count,
)

T = TypeVar("T")
R = TypeVar("R")
K = TypeVar("K", bound=Hashable)
P = ParamSpec("P")

# How items are handed to fn in the worker.
_ONE, _STAR, _APPLY = "one", "star", "apply"

# Automatic batching aims at this much work per dask task: each dask task
# costs a few milliseconds of scheduling and round trips, so batches well
# above that keep the overhead small, while staying short enough to spread
# over the workers and to stop soon after a failure.
_TARGET_BATCH_SECONDS = 0.05
_MAX_AUTO_BATCH = 10_000
# Dask tasks kept submitted per worker thread: one running and one queued,
# so a worker never waits for a round trip between batches.
_TASKS_PER_THREAD = 2
# Fetches of a finished task's result that may fail inside distributed
# in one call before the call gives up (see _CallRunner._settle_finished).
_MAX_REFETCH_FAILURES = 5
# The caller's waits are slices this long, so timeouts, cancel tokens and
# Ctrl-C are seen promptly.
_WAIT_SLICE = 0.1

_INSTALL_HINT = 'DaskPool needs dask distributed: pip install "poolme-mp[dask]"'


def _import_distributed() -> Any:
    try:
        import distributed
    except ImportError as exc:
        raise ImportError(_INSTALL_HINT) from exc
    return distributed


# --------------------------------------------------------------------------
# Worker side: what one dask task runs
# --------------------------------------------------------------------------

# Functions unpickled in this worker, by their pickled bytes: a call's
# batches all carry the same function, and one holding a large closure
# (a model, a table) should be rebuilt once per worker, not per batch.
_function_cache: dict[bytes, Callable[..., Any]] = {}
_FUNCTION_CACHE_SIZE = 8


def _load_function(fn_blob: bytes) -> Callable[..., Any]:
    fn = _function_cache.get(fn_blob)
    if fn is None:
        fn = pickle.loads(fn_blob)
        if len(_function_cache) >= _FUNCTION_CACHE_SIZE:
            _function_cache.pop(next(iter(_function_cache)))
        _function_cache[fn_blob] = fn
    return fn


def _run_batch(fn_blob: bytes, items_blob: bytes, mode: str) -> tuple[int, float, bytes]:
    """Run fn on every item of one batch: (pid, seconds, pickled outcomes).

    Each outcome is (True, result) or (False, error record).  Outcomes
    travel pickled by us, so a result that cannot be pickled fails its own
    item instead of the whole dask task.
    """
    begin = time.perf_counter()
    fn = _load_function(fn_blob)
    try:
        items = pickle.loads(items_blob)
    except Exception as exc:
        # Some argument does not unpickle here.  The items travel as one
        # pickle, so the client splits the batch to find which.
        unreadable = cloudpickle.dumps(_ArgumentsUnreadable(_error_record(exc, "task")))
        return os.getpid(), time.perf_counter() - begin, unreadable
    outcomes = [_run_item(fn, item, mode) for item in items]
    blob = _dump_outcomes(outcomes)
    return os.getpid(), time.perf_counter() - begin, blob


class _ArgumentsUnreadable:
    """What a batch returns when its arguments do not unpickle: the error."""

    def __init__(self, record: tuple[Any, ...]) -> None:
        self.record = record


def _run_item(fn: Callable[..., Any], item: Any, mode: str) -> tuple[bool, Any]:
    try:
        if mode == _ONE:
            return True, fn(item)
        if mode == _STAR:
            return True, fn(*item)
        args, kwargs = item
        return True, fn(*args, **kwargs)
    # SystemExit and KeyboardInterrupt fail their task, as in WorkerPool;
    # the dask worker lives on.
    except BaseException as exc:  # noqa: BLE001
        return False, _error_record(exc, "")


def _error_record(exc: BaseException, direction: str) -> tuple[Any, ...]:
    """(exception or None, type name, message, traceback text, direction).

    The exception itself is sent only if it survives a pickle round trip;
    otherwise the parent rebuilds a RemoteError from the text.
    """
    text = "".join(traceback.format_exception(exc))
    _drop_tracebacks(exc)
    try:
        sendable: BaseException | None = pickle.loads(cloudpickle.dumps(exc))
    except Exception:
        sendable = None
    return (sendable, f"{type(exc).__module__}.{type(exc).__qualname__}", str(exc),
            text, direction)


def _drop_tracebacks(exc: BaseException) -> None:
    """Strip the tracebacks of exc and its chain: their text travels in the
    record.  A pickled traceback (dask installs tblib) would be rebuilt in
    the parent as frames chained to the caller's stack, keeping every
    local there alive, dask futures included, as long as the error lives."""
    seen: set[int] = set()
    pending: list[BaseException | None] = [exc]
    while pending:
        current = pending.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        current.__traceback__ = None
        pending.extend((current.__cause__, current.__context__))


def _dump_outcomes(outcomes: list[tuple[bool, Any]]) -> bytes:
    try:
        return cloudpickle.dumps(outcomes)  # type: ignore[no-any-return]
    except Exception:
        pass
    # Some result does not pickle: find it and fail only that item.
    checked = []
    for ok, value in outcomes:
        if ok:
            try:
                cloudpickle.dumps(value)
            except Exception as exc:
                ok, value = False, _error_record(exc, "result")
        checked.append((ok, value))
    return cloudpickle.dumps(checked)  # type: ignore[no-any-return]


# --------------------------------------------------------------------------
# Client side: one call
# --------------------------------------------------------------------------


class _Item:
    """One task of a call: its place, its input, and how often it ran."""

    __slots__ = ("index", "value", "attempts")

    def __init__(self, index: int, value: Any) -> None:
        self.index = index
        self.value = value
        self.attempts = 0


# What a call hands its consumer: (index, True, result) or
# (index, False, TaskError), in completion order.
Outcome = tuple[int, bool, Any]


class _CallRunner:
    """Runs one call on the cluster, driven by the thread that consumes it.

    events() submits batches while there is room, waits for them, and
    yields each item's final outcome.  Leaving it early (close()) cancels
    the dask tasks still out.
    """

    def __init__(self, pool: DaskPool, fn: Callable[..., Any], tasks: Iterable[Any], *,
                 mode: str, keys: list[Hashable] | None, retry: RetryPolicy,
                 timeout: float | None, cancel: threading.Event | None,
                 flow_limit: int | None, length: int | None, ends_at_shutdown: bool) -> None:
        self.pool = pool
        self.client = pool._client
        self.fn_blob = _dump_function(fn)
        self.name = getattr(fn, "__name__", type(fn).__name__)
        self.mode = mode
        self.keys = keys
        self.retry = retry
        self.timeout = timeout
        self.deadline = None if timeout is None else time.monotonic() + timeout
        self.cancel = cancel
        self.flow_limit = flow_limit
        self.length = length
        # Streams and maps end at shutdown (nobody may be reading them);
        # process() and process_map() run to their end, and shutdown waits.
        self.ends_at_shutdown = ends_at_shutdown
        self.iterator: Iterator[Any] | None = iter(tasks)
        self.next_index = 0
        # Results handed to the consumer so far: with next_index, how many
        # tasks are out, which flow_limit bounds.
        self.consumed = 0
        self.input_error: TaskError | None = None
        # Tasks to send before reading more input: retries that are due.
        self.pending: deque[_Item] = deque()
        # Groups of tasks whose dask task died with its worker (or whose
        # results did not unpickle), to be run apart until the culprit is
        # found; and the dask futures running such a group.
        self.suspects: deque[list[_Item]] = deque()
        self.suspect_futures: set[Any] = set()
        # Retries waiting out their backoff: (due time, sequence, item).
        self.delayed: list[tuple[float, int, _Item]] = []
        self._delay_order = itertools.count()
        self.in_flight: dict[Any, list[_Item]] = {}
        # dask invokes done callbacks on its own thread; they only queue.
        self.done: queue.SimpleQueue[Any] = queue.SimpleQueue()
        # Outcomes of tasks that failed before reaching the cluster.
        self.failed_unsent: deque[Outcome] = deque()
        self.closed = False
        self.refetch_failures = 0
        self.threads = pool._total_threads()
        self.max_in_flight = max(2, _TASKS_PER_THREAD * self.threads)
        self.sizer = _BatchSizer(pool.chunksize, self.threads)

    # -- the loop ---------------------------------------------------------

    def events(self, *, input_error_in_group: bool = False
               ) -> Generator[Outcome, None, None]:
        """Each task's final outcome, until the call is done.

        An input iterator that raised ends the call with its TaskError,
        after every task read before it; under continue_on_error
        (input_error_in_group) it is the last outcome instead, so that it
        joins the tasks' failures in the TaskErrorGroup.
        """
        while True:
            self._check_expiry()
            if self.ends_at_shutdown:
                self.pool._check_open()
            self._release_due_retries()
            self._submit_while_room()
            while self.failed_unsent:
                yield self.failed_unsent.popleft()
            if self._finished():
                if self.input_error is None:
                    return
                if not input_error_in_group:
                    raise self.input_error
                yield self.next_index, False, self.input_error
                return
            yield from self._collect(self._wait_budget())

    def close(self) -> None:
        """Stop: read no more input and cancel the dask tasks still out."""
        self.closed = True
        self.iterator = None
        self.pending.clear()
        self.failed_unsent.clear()
        self.suspects.clear()
        self.delayed.clear()
        futures = list(self.in_flight)
        self.in_flight.clear()
        self.suspect_futures.clear()
        _cancel_quietly(self.client, futures)
        while True:
            try:
                self.done.get_nowait()
            except queue.Empty:
                break

    def stop_after_index(self, index: int) -> None:
        """Start nothing after index; drop the work already out after it."""
        self.iterator = None
        self.pending = deque(i for i in self.pending if i.index <= index)
        self.suspects = deque(kept for group in self.suspects
                              if (kept := [i for i in group if i.index <= index]))
        self.delayed = [d for d in self.delayed if d[2].index <= index]
        heapq.heapify(self.delayed)
        doomed = [f for f, items in self.in_flight.items()
                  if min(i.index for i in items) > index]
        for future in doomed:
            del self.in_flight[future]
            self.suspect_futures.discard(future)
        _cancel_quietly(self.client, doomed)

    def _finished(self) -> bool:
        return (self.iterator is None and not self.pending and not self.suspects
                and not self.delayed and not self.in_flight)

    def _check_expiry(self) -> None:
        if self.deadline is not None and time.monotonic() >= self.deadline:
            self.close()
            raise CallTimeoutError(
                f"the call did not finish within timeout={self.timeout}s; its unstarted "
                "tasks were dropped and running ones abandoned (a running dask task "
                "cannot be stopped: it runs to its end and its result is dropped)")
        if self.cancel is not None and self.cancel.is_set():
            self.close()
            raise CallCancelledError(
                "the call's cancel token was set; its unstarted tasks were dropped and "
                "running ones abandoned")

    def _wait_budget(self) -> float:
        budget = _WAIT_SLICE
        if self.delayed:
            budget = min(budget, self.delayed[0][0] - time.monotonic())
        if self.deadline is not None:
            budget = min(budget, self.deadline - time.monotonic())
        return max(budget, 0.0)

    # -- sending ------------------------------------------------------------

    def _release_due_retries(self) -> None:
        now = time.monotonic()
        while self.delayed and self.delayed[0][0] <= now:
            self.pending.append(heapq.heappop(self.delayed)[2])

    def _submit_while_room(self) -> None:
        if self.suspects:
            # A suspect group runs with nothing else of this call out: the
            # scheduler fails every task a dying worker held, so a
            # bystander next to the culprit would be blamed with it.
            if not self.in_flight:
                self._submit(self.suspects.popleft(), suspect=True)
            return
        while len(self.in_flight) < self.max_in_flight:
            items = self._next_batch()
            if not items:
                return
            self._submit(items)

    def _next_batch(self) -> list[_Item]:
        if self.pending:
            size = self.sizer.size(len(self.pending))
            return [self.pending.popleft() for _ in range(min(size, len(self.pending)))]
        return self._read_input()

    def _read_input(self) -> list[_Item]:
        if self.iterator is None:
            return []
        remaining = None if self.length is None else self.length - self.next_index
        size = self.sizer.size(remaining)
        if self.flow_limit is not None:
            room = self.flow_limit - (self.next_index - self.consumed)
            size = min(size, room)
            if size <= 0:
                return []
        values: list[Any] = []
        try:
            # extend() keeps what was read before a failure, so those
            # tasks still run.
            values.extend(itertools.islice(self.iterator, size))
        except Exception as exc:
            self.input_error = input_failure(self.next_index + len(values), exc)
            self.iterator = None
        if len(values) < size:
            self.iterator = None
        start = self.next_index
        self.next_index += len(values)
        return [_Item(start + offset, value) for offset, value in enumerate(values)]

    def _submit(self, items: list[_Item], *, suspect: bool = False) -> None:
        blob, items, unsendable = _pickle_batch(items)
        for item, exc in unsendable:
            error = self._error(
                item, TaskSerializationError, "its argument could not be pickled to reach "
                f"the cluster: {type(exc).__name__}: {exc}", exc, direction="task")
            self.failed_unsent.append((item.index, False, error))
        if not items:
            return
        for item in items:
            item.attempts += 1
        key = f"poolme_mp-{self.name}-{uuid.uuid4().hex}"
        future = self.client.submit(_run_batch, self.fn_blob, blob, self.mode,
                                    key=key, pure=False)
        self.in_flight[future] = items
        if suspect:
            self.suspect_futures.add(future)
        future.add_done_callback(self._on_done)

    def _on_done(self, future: Any) -> None:
        # Runs on dask's callback thread.  After close() nobody will take
        # from the queue, and a future left in it would keep its dask task
        # alive for as long as this runner is referenced (by a traceback).
        if not self.closed:
            self.done.put(future)

    # -- receiving ------------------------------------------------------------

    def _collect(self, budget: float) -> Iterator[Outcome]:
        try:
            first = self.done.get(timeout=budget) if budget > 0 else self.done.get_nowait()
        except queue.Empty:
            return
        ready = [first]
        while True:
            try:
                ready.append(self.done.get_nowait())
            except queue.Empty:
                break
        for future in ready:
            items = self.in_flight.pop(future, None)
            if items is not None:  # None: cancelled by stop_after_index
                yield from self._settle(future, items)

    def _settle(self, future: Any, items: list[_Item]) -> Iterator[Outcome]:
        status = future.status
        ran_alone = future in self.suspect_futures
        self.suspect_futures.discard(future)
        if status == "finished":
            yield from self._settle_finished(future, items)
        elif status == "error":
            yield from self._settle_errored(future, items, ran_alone)
        else:
            self.pool._check_open()
            for item in items:
                yield from self._failed(item, self._error(
                    item, TaskError, "its dask task was cancelled outside this pool",
                    _future_exception(future)))

    def _settle_finished(self, future: Any, items: list[_Item]) -> Iterator[Outcome]:
        try:
            pid, seconds, blob = future.result(timeout=self._result_timeout())
        except TimeoutError:
            self._check_expiry()
            raise
        except (Exception, asyncio.CancelledError):
            # The task finished, but fetching its result failed inside
            # distributed (seen when a cancel of other keys races with it):
            # run the batch again, a few times at most per call.
            self.refetch_failures += 1
            if self.refetch_failures > _MAX_REFETCH_FAILURES:
                raise
            for item in items:
                item.attempts -= 1
            self.pending.extendleft(reversed(items))
            return
        self.sizer.measured(seconds, len(items))
        try:
            outcomes = pickle.loads(blob)
        except Exception as exc:
            if len(items) > 1:
                self._suspect(items)  # split, to find which result fails
                return
            yield from self._failed(items[0], self._error(
                items[0], TaskSerializationError, "its result could not be unpickled "
                f"here: {type(exc).__name__}: {exc}", exc, direction="result",
                worker_pid=pid))
            return
        if isinstance(outcomes, _ArgumentsUnreadable):
            if len(items) > 1:
                self._suspect(items)  # split, to find whose argument fails
                return
            yield from self._failed(items[0], self._task_error(items[0], outcomes.record, pid))
            return
        for item, (ok, value) in zip(items, outcomes, strict=True):
            if ok:
                yield item.index, True, value
            else:
                yield from self._failed(item, self._task_error(item, value, pid))

    def _settle_errored(self, future: Any, items: list[_Item],
                        ran_alone: bool) -> Iterator[Outcome]:
        exc = _future_exception(future)
        killed = _is_killed_worker(exc)
        if killed and (len(items) > 1 or not ran_alone):
            # Dask does not say which task took the worker down, nor
            # whether this one was merely there: narrow it down, without
            # charging anyone an attempt.
            self._suspect(items)
            return
        for item in items:
            if killed:
                error = self._error(
                    item, WorkerCrashedError, "crashed its dask worker: the worker process "
                    "died while running it, as often as the scheduler allows "
                    "(distributed.scheduler.allowed-failures). Likely causes: a segfault "
                    "in native code, os._exit() in the task, running out of memory (the "
                    "OOM killer or the nanny's memory limit), or a signal sent from "
                    f"outside. Dask says: {exc}", exc)
            else:
                error = self._error(item, TaskError, "its dask task failed outside the task "
                                    f"itself: {type(exc).__name__}: {exc}", exc)
            yield from self._failed(item, error)

    def _suspect(self, items: list[_Item]) -> None:
        """Run items again as suspects, halved: a crash that follows a half
        alone narrows the culprit down in log2(len(items)) crashes."""
        for item in items:
            item.attempts -= 1
        middle = (len(items) + 1) // 2
        halves = [half for half in (items[:middle], items[middle:]) if half]
        self.suspects.extendleft(reversed(halves))

    def _failed(self, item: _Item, error: TaskError) -> Iterator[Outcome]:
        """An item failed: retry it after its backoff, or report it."""
        subject = _retry_subject(error)
        if subject is not None and self.retry.should_retry(subject, item.attempts):
            due = time.monotonic() + self.retry.delay(item.attempts)
            heapq.heappush(self.delayed, (due, next(self._delay_order), item))
            return
        yield item.index, False, error

    def _result_timeout(self) -> float | None:
        if self.deadline is None:
            return None
        return max(self.deadline - time.monotonic(), 0.001)

    # -- errors -------------------------------------------------------------

    def _describe(self, index: int) -> str:
        keyed = self.keys is not None
        return describe_task(index, self._key_of(index), keyed=keyed)

    def _key_of(self, index: int) -> Hashable | None:
        return None if self.keys is None else self.keys[index]

    def _error(self, item: _Item, kind: type[TaskError], what: str, cause: BaseException,
               *, worker_pid: int | None = None, remote_traceback: str = "",
               **extra: Any) -> TaskError:
        error = kind(f"{self._describe(item.index)} {what}", index=item.index,
                     key=self._key_of(item.index), attempts=item.attempts,
                     worker_pid=worker_pid, remote_traceback=remote_traceback, **extra)
        error.__cause__ = cause
        return error

    def _task_error(self, item: _Item, record: tuple[Any, ...], pid: int) -> TaskError:
        sent, type_name, message, text, direction = record
        cause = sent if sent is not None else RemoteError(type_name, message, text)
        if direction == "result":
            return self._error(item, TaskSerializationError, "its result could not be "
                               f"pickled in the worker to travel back: {type_name}: {message}",
                               cause, worker_pid=pid, remote_traceback=text,
                               direction="result")
        if direction == "task":
            return self._error(item, TaskSerializationError, "its argument could not be "
                               f"unpickled in the worker: {type_name}: {message}",
                               cause, worker_pid=pid, remote_traceback=text, direction="task")
        tries = f" after {item.attempts} attempts" if item.attempts > 1 else ""
        return self._error(item, TaskError, f"failed{tries}: {type_name}: {message}", cause,
                           worker_pid=pid, remote_traceback=text)


class _BatchSizer:
    """How many tasks go into one dask task.

    A fixed chunksize is used as it is.  Otherwise the first batches hold
    one task each; once a batch has reported how long its tasks took, the
    size aims at _TARGET_BATCH_SECONDS of work, but never more than an
    even share of the known remaining input per worker thread, so the end
    of a call still spreads over every worker.
    """

    def __init__(self, chunksize: int | None, threads: int) -> None:
        self.chunksize = chunksize
        self.threads = max(threads, 1)
        self.seconds_per_task: float | None = None

    def measured(self, seconds: float, tasks: int) -> None:
        latest = seconds / max(tasks, 1)
        previous = self.seconds_per_task
        self.seconds_per_task = latest if previous is None else (previous + latest) / 2

    def size(self, remaining: int | None) -> int:
        if self.chunksize is not None:
            return self.chunksize
        if self.seconds_per_task is None:
            size = 1
        else:
            size = int(_TARGET_BATCH_SECONDS / max(self.seconds_per_task, 1e-7))
        size = min(max(size, 1), _MAX_AUTO_BATCH)
        if remaining is not None:
            size = min(size, max(1, math.ceil(remaining / self.threads)))
        return size


def _dump_function(fn: Callable[..., Any]) -> bytes:
    try:
        return cloudpickle.dumps(fn)  # type: ignore[no-any-return]
    except Exception as exc:
        raise UnpicklableFunctionError(
            f"fn cannot be pickled to reach the dask workers: {type(exc).__name__}: {exc}. "
            "It may hold a lock, an open file or a socket in a closure or default "
            "argument; create such objects inside the task.") from exc


def _pickle_batch(items: list[_Item]
                  ) -> tuple[bytes, list[_Item], list[tuple[_Item, Exception]]]:
    """(pickled values, the items in it, the items that do not pickle and why).

    The whole batch is tried first; only a batch that fails is checked
    item by item, so the common case pickles once.
    """
    try:
        return cloudpickle.dumps([item.value for item in items]), items, []
    except Exception:
        pass
    good: list[_Item] = []
    bad: list[tuple[_Item, Exception]] = []
    for item in items:
        try:
            cloudpickle.dumps(item.value)
            good.append(item)
        except Exception as exc:
            bad.append((item, exc))
    return cloudpickle.dumps([item.value for item in good]), good, bad


def _retry_subject(error: TaskError) -> BaseException | None:
    """What retry_on is asked about: the task's own exception, or the
    WorkerCrashedError itself; None for failures a rerun cannot fix
    (a task or result that does not pickle)."""
    if type(error) is WorkerCrashedError:
        return error
    if type(error) is TaskError:
        return error.__cause__
    return None


def _is_killed_worker(exc: BaseException) -> bool:
    """The scheduler gave up on a task whose workers kept dying."""
    return type(exc).__name__ == "KilledWorker"


def _future_exception(future: Any) -> BaseException:
    try:
        exc = future.exception(timeout=10)
    except BaseException as error:  # noqa: BLE001 - the future's own failure
        return error
    return exc if isinstance(exc, BaseException) else RuntimeError(str(exc))


# How long after cancelling a dask task it is cancelled once more.
_CANCEL_AGAIN_AFTER = 1.0


def _cancel_quietly(client: Any, futures: list[Any]) -> None:
    """Cancel dask futures; a closed client has nothing left to cancel."""
    if not futures:
        return
    try:
        client.cancel(futures)
    except Exception:
        return
    keys = [future.key for future in futures]
    timer = threading.Timer(_CANCEL_AGAIN_AFTER, _cancel_keys_again, (client, keys))
    timer.daemon = True
    timer.start()


def _cancel_keys_again(client: Any, keys: list[Any]) -> None:
    """Send the scheduler the same cancel request again.

    The scheduler registers a submitted task only after materializing its
    graph in a background thread, and a cancel that overtakes it is
    dropped: the task would then run, unwanted, and its result stay on the
    cluster until the client closes.  By now the task is registered.
    Client.cancel() needs Future objects, whose mere creation would want
    the keys again, so this sends the client's own cancel message.
    """
    message = {"op": "cancel-keys", "keys": keys, "force": False, "reason": None,
               "msg": None}
    try:
        if client.status == "running":
            client.loop.add_callback(client._send_to_scheduler, message)
    except Exception:
        pass  # the client closed meanwhile: its tasks went with it


# --------------------------------------------------------------------------
# submit(): one task, bridged to a concurrent.futures.Future
# --------------------------------------------------------------------------


class _BridgedFuture(concurrent.futures.Future[Any]):
    """A concurrent.futures.Future whose cancel() also cancels the dask task."""

    def __init__(self, task: _SubmittedTask) -> None:
        super().__init__()
        self._task = task

    def cancel(self) -> bool:
        if not super().cancel():
            return False
        # cancel() alone wakes only result() callers; this also wakes the
        # waiters as_completed() and wait() install.
        self.set_running_or_notify_cancel()
        self._task.cancel_remote()
        return True


class _SubmittedTask:
    """The state of one submit(): its attempts and its current dask future."""

    def __init__(self, pool: DaskPool, fn_blob: bytes, name: str, payload: Any) -> None:
        self.pool = pool
        self.fn_blob = fn_blob
        self.name = name
        self.payload = payload
        self.attempts = 0
        self.future = _BridgedFuture(self)
        self.dask_future: Any = None
        self._lock = threading.Lock()

    def launch(self) -> None:
        with self._lock:
            if self.future.done():
                return
            try:
                blob = cloudpickle.dumps([self.payload])
            except Exception as exc:
                self._fail(TaskSerializationError, "its arguments could not be pickled to "
                           f"reach the cluster: {type(exc).__name__}: {exc}", exc,
                           direction="task")
                return
            try:
                self.dask_future = self.pool._client.submit(
                    _run_batch, self.fn_blob, blob, _APPLY,
                    key=f"poolme_mp-{self.name}-{uuid.uuid4().hex}", pure=False)
            except Exception as exc:
                self.future.set_exception(PoolClosedError(
                    f"the pool can no longer reach the cluster: {exc}"))
                return
            self.attempts += 1
        self.dask_future.add_done_callback(self._on_done)

    def cancel_remote(self) -> None:
        with self._lock:
            dask_future = self.dask_future
        if dask_future is not None:
            _cancel_quietly(self.pool._client, [dask_future])

    def _on_done(self, dask_future: Any) -> None:
        try:
            if not self.future.done():
                self._resolve(dask_future)
        except Exception as exc:  # the client went away under us
            if not self.future.done():
                self.future.set_exception(PoolClosedError(
                    f"the pool lost its cluster before the task finished: {exc}"))
        finally:
            # Let go of the finished dask future (a retry makes a new one):
            # the caller may keep the concurrent future for long.
            with self._lock:
                if self.dask_future is dask_future:
                    self.dask_future = None

    def _resolve(self, dask_future: Any) -> None:
        if dask_future.status == "finished":
            pid, _, blob = dask_future.result(timeout=60)
            try:
                outcomes = pickle.loads(blob)
            except Exception as unpickling:
                # Its traceback would hold this frame, and with it the dask
                # future, on the cluster for as long as the error is kept.
                unpickling.__traceback__ = None
                self._fail(TaskSerializationError, "its result could not be unpickled here: "
                           f"{type(unpickling).__name__}: {unpickling}", unpickling,
                           worker_pid=pid, direction="result")
                return
            if isinstance(outcomes, _ArgumentsUnreadable):
                sent, type_name, message, text, _ = outcomes.record
                cause = sent if sent is not None else RemoteError(type_name, message, text)
                self._fail(TaskSerializationError, "its arguments could not be unpickled in "
                           f"the worker: {type_name}: {message}", cause, worker_pid=pid,
                           remote_traceback=text, direction="task")
                return
            ok, value = outcomes[0]
            if ok:
                self.future.set_result(value)
                return
            sent, type_name, message, text, direction = value
            cause = sent if sent is not None else RemoteError(type_name, message, text)
            if direction == "result":
                self._fail(TaskSerializationError, "its result could not be pickled in the "
                           f"worker to travel back: {type_name}: {message}", cause,
                           worker_pid=pid, remote_traceback=text, direction="result")
                return
            error = self._error(TaskError, f"failed: {type_name}: {message}", cause,
                                worker_pid=pid, remote_traceback=text)
            self._fail_or_retry(error)
        elif dask_future.status == "error":
            exc = _future_exception(dask_future)
            if _is_killed_worker(exc):
                self._fail_or_retry(self._error(
                    WorkerCrashedError, f"crashed its dask worker: {exc}", exc))
            else:
                self._fail_or_retry(self._error(
                    TaskError, f"its dask task failed: {type(exc).__name__}: {exc}", exc))
        elif not self.future.done():
            self.future.set_exception(PoolClosedError(
                "the task's dask future was cancelled (the pool was shut down)"))

    def _fail_or_retry(self, error: TaskError) -> None:
        """Retry after the policy's backoff (a timer here, not a sleep in a
        worker), or fail the future with error."""
        retry = self.pool.retry
        subject = _retry_subject(error)
        if subject is not None and retry.should_retry(subject, self.attempts):
            timer = threading.Timer(retry.delay(self.attempts), self.launch)
            timer.daemon = True
            timer.start()
            return
        if not self.future.done():
            self.future.set_exception(error)

    def _error(self, kind: type[TaskError], what: str, cause: BaseException,
               **extra: Any) -> TaskError:
        tries = f" (after {self.attempts} attempts)" if self.attempts > 1 else ""
        error = kind(f"the task {what}{tries}", attempts=max(self.attempts, 1), **extra)
        error.__cause__ = cause
        return error

    def _fail(self, kind: type[TaskError], what: str, cause: BaseException,
              **extra: Any) -> None:
        if not self.future.done():
            self.future.set_exception(self._error(kind, what, cause, **extra))


# --------------------------------------------------------------------------
# The pool
# --------------------------------------------------------------------------


class DaskPool(concurrent.futures.Executor):
    """WorkerPool's API on a Dask distributed cluster.

    client: a distributed.Client (used as it is and left open), a
        scheduler address (a Client is made and closed on shutdown), or
        None: a LocalCluster of `workers` processes with one thread each
        is started on 127.0.0.1 (dashboard off) and closed on shutdown.
    workers: processes of that LocalCluster (default: usable CPUs); only
        without client.
    chunksize: tasks per dask task; None sizes batches from measured task
        time (about 50 ms of work each).  One dask task per tiny item
        would cost far more than the item.
    buffer_size, continue_on_error, max_attempts, initial_delay,
        max_delay, multiplier, jitter, retry_on, retry: as in WorkerPool.

    Errors follow WorkerPool's contract.  When a worker dies running a
    batch, its tasks run again in halves, each half with nothing else of
    the call out, until the task that takes the worker down is alone; it
    fails with WorkerCrashedError once its worker has died as often as the
    scheduler allows (distributed.scheduler.allowed-failures, 3 by default:
    lower it on clusters where crashes are expected).  The others are not
    charged an attempt.

    Limitations: a running dask task cannot be stopped, so after a timeout,
    a cancel or an early close it runs to its end (its result is dropped)
    and holds its worker thread until then.  Crashed workers report no exit
    status, so WorkerCrashedError.exitcode is None.  shutdown() ends open
    streams and maps with PoolClosedError.
    """

    def __init__(
        self,
        client: Any = None,
        *,
        workers: int | None = None,
        chunksize: int | None = None,
        buffer_size: int | None = None,
        continue_on_error: bool = False,
        max_attempts: int = 1,
        initial_delay: float = 0.1,
        max_delay: float = 30.0,
        multiplier: float = 2.0,
        jitter: float = 0.0,
        retry_on: RetryOn = (Exception,),
        retry: RetryPolicy | None = None,
    ) -> None:
        if chunksize is not None:
            check_int("chunksize", chunksize, minimum=1)
        buffer_size = DEFAULT_BUFFER_SIZE if buffer_size is None else buffer_size
        check_int("buffer_size", buffer_size, minimum=1)
        retry = pool_retry_policy(retry, max_attempts, initial_delay, max_delay, multiplier,
                                  jitter, retry_on)
        if workers is not None:
            check_int("workers", workers, minimum=1)
            if client is not None:
                raise ValueError("workers applies only to the LocalCluster DaskPool starts "
                                 "itself: pass either client or workers")
        self.chunksize = chunksize
        self.buffer_size = buffer_size
        self.continue_on_error = bool(continue_on_error)
        self.retry = retry
        self._cluster: Any = None
        self._owns_client = False
        self._client: Any = self._connect(client, workers)
        self._lock = threading.Lock()
        # Set by shutdown(): new calls raise PoolClosedError, and open
        # streams end with it at their next step instead of holding it up.
        self._shut_down = False
        self._submitted: set[_SubmittedTask] = set()
        self._active_calls = 0
        self._calls_done = threading.Condition(self._lock)

    def _connect(self, client: Any, workers: int | None) -> Any:
        distributed = _import_distributed()
        if isinstance(client, distributed.Client):
            return client
        if client is not None and not isinstance(client, str):
            raise TypeError("client must be a distributed.Client, a scheduler address or "
                            f"None, got {client!r}")
        self._owns_client = True
        if client is not None:
            return distributed.Client(client, set_as_default=False)
        self._cluster = distributed.LocalCluster(
            n_workers=workers or usable_cpu_count(), threads_per_worker=1, processes=True,
            host="127.0.0.1", dashboard_address=None)
        try:
            return distributed.Client(self._cluster, set_as_default=False)
        except BaseException:
            self._cluster.close()
            raise

    @property
    def client(self) -> Any:
        """The distributed.Client this pool submits to."""
        return self._client

    # -- lifecycle ---------------------------------------------------------

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """Stop accepting work.

        Submitted futures run to their end (cancel_futures=True cancels
        those not done); open streams and maps end with PoolClosedError;
        a client or cluster the pool made itself is closed.  wait=False
        returns at once and does the rest in the background.
        """
        with self._lock:
            if self._shut_down:
                return
            self._shut_down = True
            pending = [task.future for task in self._submitted]
        if cancel_futures:
            for future in pending:
                future.cancel()
        if wait:
            self._finish(pending)
        else:
            threading.Thread(target=self._finish, args=(pending,), daemon=True,
                             name="poolme_mp-dask-shutdown").start()

    def _finish(self, pending: Sequence[concurrent.futures.Future[Any]]) -> None:
        concurrent.futures.wait(pending)
        with self._calls_done:
            while self._active_calls:
                self._calls_done.wait()
        self._close_connection()

    def _close_connection(self) -> None:
        if not self._owns_client:
            return
        self._owns_client = False
        try:
            self._client.close()
        finally:
            if self._cluster is not None:
                self._cluster.close()
                self._cluster = None

    def __enter__(self) -> DaskPool:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        # Leaving on an error: cancel what is queued rather than wait for it.
        self.shutdown(wait=True, cancel_futures=exc_type is not None)

    def _check_open(self) -> None:
        if self._shut_down:
            raise PoolClosedError("the pool is shut down; it accepts no more work")

    def _total_threads(self) -> int:
        try:
            return sum(self._client.nthreads().values()) or 1
        except Exception:
            return 1

    # -- calls -------------------------------------------------------------

    def _runner(self, fn: Any, tasks: Iterable[Any], *, mode: str, retry: RetryPolicy | None,
                timeout: float | None, cancel: threading.Event | None,
                keys: list[Hashable] | None = None, flow_limit: int | None = None,
                length: int | None = None, ends_at_shutdown: bool = False) -> _CallRunner:
        if not callable(fn):
            raise TypeError(f"fn must be callable, got {fn!r}")
        _check_timeout("timeout", timeout)
        if cancel is not None and not callable(getattr(cancel, "is_set", None)):
            raise TypeError(f"cancel must be a threading.Event, got {cancel!r}")
        if retry is not None and not isinstance(retry, RetryPolicy):
            raise TypeError(f"retry must be a RetryPolicy, got {retry!r}")
        self._check_open()
        return _CallRunner(self, fn, tasks, mode=mode, keys=keys, retry=retry or self.retry,
                           timeout=timeout, cancel=cancel, flow_limit=flow_limit,
                           length=length, ends_at_shutdown=ends_at_shutdown)

    def _keep_going(self, continue_on_error: bool | None) -> bool:
        return self.continue_on_error if continue_on_error is None else continue_on_error

    def process(self, fn: Callable[[T], R], tasks: Iterable[T], *,
                return_exceptions: bool = False, continue_on_error: bool | None = None,
                retry: RetryPolicy | None = None, timeout: float | None = None,
                cancel: threading.Event | None = None, progress: bool = False) -> list[Any]:
        """Run fn on every task; results in input order.

        The first failure raises TaskError and no further tasks start;
        continue_on_error runs everything and raises a TaskErrorGroup
        (with .results) at the end; return_exceptions puts each TaskError
        in its task's place.
        """
        _check_iterable("tasks", tasks)
        length = _length_of(tasks)
        runner = self._runner(fn, tasks, mode=_ONE, retry=retry, timeout=timeout,
                              cancel=cancel, length=length)
        return self._collect_list(runner, return_exceptions=return_exceptions,
                                  keep_going=self._keep_going(continue_on_error),
                                  progress=_progress_bar(progress, length))

    def _collect_list(self, runner: _CallRunner, *, return_exceptions: bool,
                      keep_going: bool, progress: Any) -> list[Any]:
        results: dict[int, Any] = {}
        errors: dict[int, TaskError] = {}
        with self._calls_done:
            self._active_calls += 1
        events = runner.events(input_error_in_group=keep_going and not return_exceptions)
        try:
            for index, ok, value in events:
                if progress is not None:
                    progress.update(1)
                if not ok and not (return_exceptions or keep_going):
                    raise value
                if not ok:
                    errors[index] = value
                results[index] = value
        finally:
            # Closing the generator now, not when a traceback that holds
            # it is collected, lets go of the dask futures it still refers to.
            events.close()
            runner.close()
            if progress is not None:
                progress.close()
            with self._calls_done:
                self._active_calls -= 1
                self._calls_done.notify_all()
        ordered = [results[index] for index in range(len(results))]
        if errors and not return_exceptions:
            failures = [errors[index] for index in sorted(errors)]
            raise TaskErrorGroup(f"{len(failures)} of {len(ordered)} tasks failed",
                                 failures, ordered)
        return ordered

    def process_map(self, fn: Callable[[T], R], mapping: Mapping[K, T] | Iterable[tuple[K, T]],
                    *, return_exceptions: bool = False, continue_on_error: bool | None = None,
                    retry: RetryPolicy | None = None, timeout: float | None = None,
                    cancel: threading.Event | None = None,
                    progress: bool = False) -> dict[K, Any]:
        """Run fn on every value; a dict with the same keys in the same
        order.  Errors follow process(); a TaskError names its key."""
        keys, values = _split_mapping(mapping, timeout, cancel)
        runner = self._runner(fn, values, mode=_ONE, retry=retry, timeout=timeout,
                              cancel=cancel, keys=list(keys), length=len(values))
        try:
            results = self._collect_list(
                runner, return_exceptions=return_exceptions,
                keep_going=self._keep_going(continue_on_error),
                progress=_progress_bar(progress, len(values)))
        except TaskErrorGroup as group:
            group.results = dict(zip(keys, group.results, strict=True))
            raise
        return dict(zip(keys, results, strict=True))

    def process_stream(self, fn: Callable[[T], R], tasks: Iterable[T], *, ordered: bool = True,
                       return_exceptions: bool = False, continue_on_error: bool | None = None,
                       retry: RetryPolicy | None = None, timeout: float | None = None,
                       cancel: threading.Event | None = None, progress: bool = False,
                       buffer_size: int | None = None) -> Generator[Any, None, None]:
        """Run fn over tasks read lazily; a generator of results.

        At most buffer_size tasks are read ahead of the consumer.  ordered=
        False yields results as they complete.  Closing the generator early
        (break, close(), an exception) stops reading and cancels the dask
        tasks still out.
        """
        _check_iterable("tasks", tasks)
        limit = self.buffer_size if buffer_size is None else buffer_size
        check_int("buffer_size", limit, minimum=1)
        length = _length_of(tasks)
        runner = self._runner(fn, tasks, mode=_ONE, retry=retry, timeout=timeout,
                              cancel=cancel, flow_limit=limit, length=length,
                              ends_at_shutdown=True)
        return _stream(runner, ordered=ordered, return_exceptions=return_exceptions,
                       keep_going=self._keep_going(continue_on_error),
                       progress=_progress_bar(progress, length))

    def submit(self, fn: Callable[P, R], /, *args: P.args,
               **kwargs: P.kwargs) -> concurrent.futures.Future[R]:
        """Run fn(*args, **kwargs) on the cluster; a concurrent.futures.Future.

        A failure sets a TaskError whose __cause__ is the original
        exception; the pool's retry policy applies.  Cancelling the future
        cancels the dask task (a running one runs on; its result is dropped).
        """
        if not callable(fn):
            raise TypeError(f"fn must be callable, got {fn!r}")
        fn_blob = _dump_function(fn)
        name = getattr(fn, "__name__", type(fn).__name__)
        task = _SubmittedTask(self, fn_blob, name, (args, kwargs))
        with self._lock:
            self._check_open()
            self._submitted.add(task)
        task.future.add_done_callback(lambda _: self._forget(task))
        task.launch()
        return task.future

    def _forget(self, task: _SubmittedTask) -> None:
        with self._lock:
            self._submitted.discard(task)

    def map(self, fn: Callable[..., R], *iterables: Iterable[Any], timeout: float | None = None,
            chunksize: int = 1) -> Iterator[R]:
        """Executor.map: fn over zipped iterables, lazily, in order.

        timeout bounds the whole map from this call on.  chunksize is
        accepted for compatibility; the pool's own chunksize decides.
        """
        check_int("chunksize", chunksize, minimum=1)
        for position, iterable in enumerate(iterables):
            _check_iterable(f"iterables[{position}]", iterable)
        lengths = [_length_of(iterable) for iterable in iterables]
        known = [n for n in lengths if n is not None]
        length = min(known, default=0) if len(known) == len(lengths) else None
        runner = self._runner(fn, zip(*iterables, strict=False), mode=_STAR, retry=None,
                              timeout=timeout, cancel=None, flow_limit=self.buffer_size,
                              length=length, ends_at_shutdown=True)
        return _stream(runner, ordered=True, return_exceptions=False, keep_going=False,
                       progress=None)


def _stream(runner: _CallRunner, *, ordered: bool, return_exceptions: bool,
            keep_going: bool, progress: Any) -> Generator[Any, None, None]:
    """The generator behind process_stream and map."""
    waiting: dict[int, tuple[bool, Any]] = {}
    next_index = 0
    errors: list[TaskError] = []
    events = runner.events(input_error_in_group=keep_going and not return_exceptions)
    try:
        for index, ok, value in events:
            if progress is not None:
                progress.update(1)
            if not ordered:
                runner.consumed += 1
                yield from _deliver(ok, value, return_exceptions, keep_going, errors)
                continue
            waiting[index] = (ok, value)
            if not ok and not (return_exceptions or keep_going):
                runner.stop_after_index(index)
            while next_index in waiting:
                ok, value = waiting.pop(next_index)
                next_index += 1
                runner.consumed += 1
                yield from _deliver(ok, value, return_exceptions, keep_going, errors)
    finally:
        events.close()
        runner.close()
        if progress is not None:
            progress.close()
    if errors:
        errors.sort(key=lambda error: -1 if error.index is None else error.index)
        raise TaskErrorGroup(f"{len(errors)} tasks failed", errors)


def _deliver(ok: bool, value: Any, return_exceptions: bool, keep_going: bool,
             errors: list[TaskError]) -> Iterator[Any]:
    if ok or return_exceptions:
        yield value
    elif keep_going:
        errors.append(value)
    else:
        raise value


def _split_mapping(mapping: Any, timeout: float | None,
                   cancel: threading.Event | None) -> tuple[list[Any], list[Any]]:
    """Keys and values; an iterable of pairs is read first, as WorkerPool
    reads it (the keys are needed before the call starts)."""
    if isinstance(mapping, Mapping):
        return list(mapping.keys()), list(mapping.values())
    _check_timeout("timeout", timeout)
    pairs = _read_input(_check_iterable("mapping", mapping), timeout, cancel)
    if any(not isinstance(p, tuple) or len(p) != 2 for p in pairs):
        raise TypeError("mapping must be a Mapping or an iterable of (key, value) pairs")
    keys = [k for k, _ in pairs]
    for key in keys:
        try:
            hash(key)
        except TypeError:
            raise TypeError(f"mapping keys must be hashable, got {key!r}") from None
    return keys, [v for _, v in pairs]


__all__ = ["DaskPool"]
