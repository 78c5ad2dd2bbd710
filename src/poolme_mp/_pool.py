"""WorkerPool, the public face of poolme_mp.

Every method turns its arguments into a Call, hands it to the pool's
engine thread (see _engine) and waits on the call's sink.  Waits are short
timed waits in a loop, so Ctrl-C is seen within a fraction of a second.
"""

from __future__ import annotations

import atexit
import concurrent.futures
import functools
import itertools
import multiprocessing
import multiprocessing.util
import os
import sys
import threading
import time
import weakref
from collections.abc import (
    AsyncIterator,
    Callable,
    Hashable,
    Iterable,
    Iterator,
    Mapping,
)
from typing import Any, Literal, ParamSpec, TypeVar, overload

from . import _codec, _dispatch
from ._calls import (
    NOT_READY,
    Call,
    Failure,
    FutureSink,
    ListSink,
    StreamSink,
    TypedSink,
)
from ._dispatch import ResultStream
from ._engine import Engine, EngineOptions, terminate_all
from ._errors import (
    CallCancelledError,
    CallTimeoutError,
    PoolClosedError,
    PoolError,
    TaskError,
    TaskErrorGroup,
    input_failure,
)
from ._policies import (
    RateLimiter,
    RetryOn,
    RetryPolicy,
    TokenBucket,
    check_int,
    check_number,
    pool_retry_policy,
)

T = TypeVar("T")
R = TypeVar("R")
K = TypeVar("K", bound=Hashable)
P = ParamSpec("P")

DEFAULT_RING_SIZE = 4 * 1024 * 1024
DEFAULT_BUFFER_SIZE = 65_536
_WAIT_SLICE = 0.1


class UnpicklableFunctionError(PoolError, TypeError):
    """The function given to a call cannot be pickled, even by value."""


def default_start_method() -> str:
    """forkserver where the platform has it, else spawn: both are safe when
    the parent runs threads, which fork is not."""
    methods = multiprocessing.get_all_start_methods()
    return "forkserver" if "forkserver" in methods else "spawn"


def usable_cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


class WorkerPool(concurrent.futures.Executor):
    """A pool of worker processes for CPU-bound work.

    Use it as a context manager, or call start() and shutdown().  Options
    set here apply to every call; process, process_map and process_stream
    accept per-call overrides.

    workers: number of processes (default: usable CPU count).
    buffer_size: most tasks read ahead of the consumer by process_stream
        and map (default 65536).
    start_method: "forkserver" (default where available), "spawn" or
        "fork" (fork is unsafe when the parent runs threads).
    continue_on_error: run every task and report all failures at the end
        in a TaskErrorGroup, instead of raising at the first.
    max_attempts, initial_delay, max_delay, multiplier, jitter, retry_on:
        the retry policy (see RetryPolicy); or pass retry=RetryPolicy(...).
    task_timeout: seconds a single task may run before it fails with
        TaskTimeoutError and its worker is replaced.
    rate_limit, burst: most task starts per second across all workers, with
        up to burst saved up; or rate_limiter= any RateLimiter, shareable
        between pools.
    max_tasks_per_worker: replace a worker after this many tasks.
    on_worker_start, on_worker_stop: run in each worker when it starts and
        before it exits cleanly (per-worker setup and teardown).
    on_task_start(task), on_task_end(task, outcome), on_error(error),
        on_retry(task, attempt, exception, delay): parent-side callbacks;
        task is the index (the key in process_map).
    ring_size: bytes of each shared-memory ring (a power of two).
    """

    def __init__(
        self,
        workers: int | None = None,
        *,
        buffer_size: int | None = None,
        start_method: str | None = None,
        continue_on_error: bool = False,
        max_attempts: int = 1,
        initial_delay: float = 0.1,
        max_delay: float = 30.0,
        multiplier: float = 2.0,
        jitter: float = 0.0,
        retry_on: RetryOn = (Exception,),
        retry: RetryPolicy | None = None,
        task_timeout: float | None = None,
        rate_limit: float | None = None,
        burst: int = 1,
        rate_limiter: RateLimiter | None = None,
        max_tasks_per_worker: int | None = None,
        on_worker_start: Callable[[], Any] | None = None,
        on_worker_stop: Callable[[], Any] | None = None,
        on_task_start: Callable[[Any], Any] | None = None,
        on_task_end: Callable[[Any, Any], Any] | None = None,
        on_error: Callable[[TaskError], Any] | None = None,
        on_retry: Callable[[Any, int, BaseException, float], Any] | None = None,
        ring_size: int = DEFAULT_RING_SIZE,
    ) -> None:
        workers = usable_cpu_count() if workers is None else workers
        check_int("workers", workers, minimum=1)
        buffer_size = DEFAULT_BUFFER_SIZE if buffer_size is None else buffer_size
        check_int("buffer_size", buffer_size, minimum=1)
        start_method = default_start_method() if start_method is None else start_method
        if start_method not in multiprocessing.get_all_start_methods():
            raise ValueError(
                f"start_method must be one of {multiprocessing.get_all_start_methods()}, "
                f"got {start_method!r}")
        retry = pool_retry_policy(retry, max_attempts, initial_delay, max_delay, multiplier,
                                  jitter, retry_on)
        _check_timeout("task_timeout", task_timeout)
        if rate_limit is not None and rate_limiter is not None:
            raise ValueError("rate_limit and rate_limiter are exclusive: pass one")
        if rate_limit is not None:
            check_number("rate_limit", rate_limit, minimum=0.0)
            if rate_limit <= 0:
                raise ValueError(f"rate_limit must be positive, got {rate_limit!r}")
            check_int("burst", burst, minimum=1)
            rate_limiter = TokenBucket(rate_limit, burst)
        elif rate_limiter is not None and not isinstance(rate_limiter, RateLimiter):
            raise TypeError(f"rate_limiter must have a try_acquire() method, got {rate_limiter!r}")
        if max_tasks_per_worker is not None:
            check_int("max_tasks_per_worker", max_tasks_per_worker, minimum=1)
        check_int("ring_size", ring_size, minimum=65536)
        if ring_size & (ring_size - 1):
            raise ValueError(f"ring_size must be a power of two, got {ring_size}")
        for name, hook in [("on_worker_start", on_worker_start), ("on_worker_stop", on_worker_stop),
                           ("on_task_start", on_task_start), ("on_task_end", on_task_end),
                           ("on_error", on_error), ("on_retry", on_retry)]:
            if hook is not None and not callable(hook):
                raise TypeError(f"{name} must be callable, got {hook!r}")
        self.workers = workers
        self.buffer_size = buffer_size
        self.start_method = start_method
        self.continue_on_error = bool(continue_on_error)
        self.retry = retry
        self.task_timeout = task_timeout
        self._options = EngineOptions(
            workers=workers, start_method=start_method, ring_bytes=ring_size,
            task_timeout=task_timeout, rate_limiter=rate_limiter,
            max_tasks_per_worker=max_tasks_per_worker,
            on_worker_start=on_worker_start, on_worker_stop=on_worker_stop,
            on_task_start=on_task_start, on_task_end=on_task_end,
            on_error=on_error, on_retry=on_retry)
        self._engine: Engine | None = None
        self._shut_down = False
        self._lock = threading.Lock()
        self._finalizer: weakref.finalize[Any, Any] | None = None

    # -- lifecycle ---------------------------------------------------------

    def start(self) -> WorkerPool:
        """Start the workers (done on first use if not called)."""
        self._running_engine()
        return self

    def _running_engine(self, blocking: bool = True) -> Engine:
        engine = self._engine
        if blocking and engine is not None and threading.current_thread() is engine.thread:
            raise RuntimeError(
                "a call that waits for results was made from this pool's own engine thread "
                "(from the input iterator of one of its calls, or from a parent-side "
                "callback); it would wait on itself forever: read such input before the "
                "call, or use another pool")
        with self._lock:
            if self._shut_down:
                raise PoolClosedError("the pool is shut down; it accepts no more work")
            if self._engine is None:
                engine = Engine(self._options)
                engine.start()
                self._engine = engine
                # A pool dropped without shutdown still stops its workers.
                self._finalizer = weakref.finalize(self, engine.close)
                # At exit, terminate_all ends the pool instead.
                self._finalizer.atexit = False
            return self._engine

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """Stop accepting work; finish what was submitted, then stop workers.

        cancel_futures=True cancels submitted futures that have not started.
        wait=False returns at once; the workers stop in the background.
        Called from the pool's own engine thread (a future's done callback,
        a parent-side callback), it never waits: it would wait on itself.
        """
        with self._lock:
            self._shut_down = True
            engine = self._engine
        if engine is None:
            return
        engine.close(cancel_futures)
        if wait and threading.current_thread() is not engine.thread:
            _wait_interruptibly(lambda t: engine.join(t), engine.terminate)

    def terminate(self) -> None:
        """Stop at once: fail unfinished calls and kill the workers."""
        with self._lock:
            self._shut_down = True
            engine = self._engine
        if engine is not None:
            engine.terminate()
            engine.join(10)

    def __enter__(self) -> WorkerPool:
        return self.start()

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is None:
            self.shutdown(wait=True)
        else:
            # Leaving on an error or Ctrl-C: do not wait for running work.
            self.terminate()

    # -- calls -------------------------------------------------------------

    def _call(self, fn: Any, tasks: Any, *, mode: int, sink: Any, length: int | None,
              retry: RetryPolicy | None, continue_on_error: bool | None, return_exceptions: bool,
              timeout: float | None, cancel: threading.Event | None,
              keys: Any = None, flow_limit: int | None = None,
              future: concurrent.futures.Future[Any] | None = None,
              drain_on_close: bool = False) -> Call:
        if not callable(fn):
            raise TypeError(f"fn must be callable, got {fn!r}")
        _check_timeout("timeout", timeout)
        if cancel is not None and not callable(getattr(cancel, "is_set", None)):
            raise TypeError(f"cancel must be a threading.Event, got {cancel!r}")
        if retry is not None and not isinstance(retry, RetryPolicy):
            raise TypeError(f"retry must be a RetryPolicy, got {retry!r}")
        try:
            fn_blob = _codec.dumps_function(fn)
        except Exception as exc:
            raise UnpicklableFunctionError(
                f"fn cannot be pickled to reach the workers: {type(exc).__name__}: {exc}. "
                "It may hold a lock, an open file or a socket in a closure or default "
                "argument; create such objects inside the task or in on_worker_start.") from exc
        keep_going = self.continue_on_error if continue_on_error is None else continue_on_error
        return Call(
            fn_blob=fn_blob, mode=mode, tasks=tasks, length=length, sink=sink,
            retry=retry or self.retry, stop_on_error=not (keep_going or return_exceptions),
            task_timeout=self.task_timeout, timeout=timeout, cancel=cancel, keys=keys,
            flow_limit=flow_limit, future=future, drain_on_close=drain_on_close)

    def _run_batch(self, call: Call, sink: ListSink) -> list[Any]:
        engine = self._running_engine()
        engine.submit(call)
        backstop = _Backstop(engine, call)

        def wait(timeout: float) -> bool:
            if sink.wait(timeout):
                return True
            backstop.check()
            return False

        _wait_interruptibly(wait, lambda: engine.abort(
            call, CallCancelledError("interrupted by KeyboardInterrupt")))
        return sink.outcome()

    @overload
    def process(self, fn: Callable[[T], R], tasks: Iterable[T], *,
                return_exceptions: Literal[False] = ..., continue_on_error: bool | None = ...,
                retry: RetryPolicy | None = ..., timeout: float | None = ...,
                cancel: threading.Event | None = ..., progress: bool = ...,
                dtype: None = ..., out: None = ...) -> list[R]: ...

    @overload
    def process(self, fn: Callable[[T], R], tasks: Iterable[T], *,
                return_exceptions: Literal[True], continue_on_error: bool | None = ...,
                retry: RetryPolicy | None = ..., timeout: float | None = ...,
                cancel: threading.Event | None = ...,
                progress: bool = ..., dtype: None = ...,
                out: None = ...) -> list[R | TaskError]: ...

    @overload
    def process(self, fn: Callable[[T], Any], tasks: Iterable[T], *,
                return_exceptions: Literal[False] = ..., continue_on_error: bool | None = ...,
                retry: RetryPolicy | None = ..., timeout: float | None = ...,
                cancel: threading.Event | None = ..., progress: bool = ...,
                dtype: Any = ..., out: Any = ...) -> Any: ...

    def process(self, fn: Callable[[T], R], tasks: Iterable[T], *,
                return_exceptions: bool = False, continue_on_error: bool | None = None,
                retry: RetryPolicy | None = None, timeout: float | None = None,
                cancel: threading.Event | None = None,
                progress: bool = False, dtype: Any = None, out: Any = None) -> Any:
        """Run fn on every task; results in input order.

        By default the first failure raises TaskError and no further tasks
        start.  With continue_on_error every task runs and failures are
        raised together as a TaskErrorGroup (whose .results has every
        success in its place).  With return_exceptions the list holds a
        TaskError in place of each failure and nothing is raised for them.

        tasks may be a numpy array: its rows (elements of a 1-D array, as
        Python scalars) are the tasks, and the array reaches the workers
        through shared memory, not row by row.  With dtype= (or out=, an
        array of len(tasks) rows), each result is a scalar or an array of
        fixed shape that the workers write straight into a shared numpy
        array, which is returned.
        """
        tasks = _as_task_source(_check_iterable("tasks", tasks))
        if dtype is not None or out is not None:
            return self._process_typed(fn, tasks, dtype=dtype, out=out,
                                       return_exceptions=return_exceptions,
                                       continue_on_error=continue_on_error, retry=retry,
                                       timeout=timeout, cancel=cancel, progress=progress)
        length = _length_of(tasks)
        sink = ListSink(length, return_exceptions=return_exceptions,
                        progress=_progress_bar(progress, length))
        call = self._call(fn, tasks, mode=_dispatch.MODE_MAP, sink=sink, length=length,
                          retry=retry, continue_on_error=continue_on_error,
                          return_exceptions=return_exceptions, timeout=timeout, cancel=cancel)
        return self._run_batch(call, sink)

    def _process_typed(self, fn: Any, tasks: Any, *, dtype: Any, out: Any,
                       return_exceptions: bool, continue_on_error: bool | None,
                       retry: RetryPolicy | None, timeout: float | None,
                       cancel: threading.Event | None, progress: bool) -> Any:
        import numpy as np

        from ._shared import SharedArray, empty_shared

        if return_exceptions:
            raise ValueError("return_exceptions cannot be combined with dtype= or out=: "
                             "a numpy array cannot hold the errors")
        started = time.monotonic()
        if not isinstance(tasks, (list, tuple, range)) and not hasattr(tasks, "row_blocks"):
            # The output array is made to the input's length, so the input
            # is read first (a __len__ may be wrong; the items are not).
            tasks = _read_input(tasks, timeout, cancel)
        length = len(tasks)
        sink = TypedSink(length, dtype=np.dtype(dtype) if dtype is not None else None, out=None,
                         progress=_progress_bar(progress, length))
        if out is not None:
            if not isinstance(out, np.ndarray) or out.ndim < 1 or out.shape[0] != length:
                raise ValueError(f"out must be a numpy array with {length} rows, got "
                                 f"{getattr(out, 'shape', type(out).__name__)}")
            if dtype is not None and np.dtype(dtype) != out.dtype:
                raise ValueError(f"dtype {np.dtype(dtype)} differs from out's dtype {out.dtype}")
            if isinstance(out, SharedArray) and out.shared_reference() is not None:
                sink.out = out
                sink.user_out = out  # written in place: the call returns it as it is
            else:
                sink.out = empty_shared(out.shape, out.dtype)
                sink.user_out = out
        call = self._call(fn, tasks, mode=_dispatch.MODE_MAP, sink=sink, length=length,
                          retry=retry, continue_on_error=continue_on_error,
                          return_exceptions=False, timeout=timeout, cancel=cancel)
        _count_timeout_from(call, started)
        return self._run_batch(call, sink)

    def process_map(self, fn: Callable[[T], R], mapping: Mapping[K, T] | Iterable[tuple[K, T]], *,
                    return_exceptions: bool = False, continue_on_error: bool | None = None,
                    retry: RetryPolicy | None = None, timeout: float | None = None,
                    cancel: threading.Event | None = None,
                    progress: bool = False) -> dict[K, R]:
        """Run fn on every value; a dict with the same keys, in the same
        order.  Errors follow process(); a TaskError names its key."""
        started = time.monotonic()
        if isinstance(mapping, Mapping):
            keys, values = list(mapping.keys()), list(mapping.values())
        else:
            pairs = _read_input(_check_iterable("mapping", mapping), timeout, cancel)
            if any(not isinstance(p, tuple) or len(p) != 2 for p in pairs):
                raise TypeError("mapping must be a Mapping or an iterable of (key, value) pairs")
            keys, values = [k for k, _ in pairs], [v for _, v in pairs]
            for key in keys:
                try:
                    hash(key)
                except TypeError:
                    raise TypeError(f"mapping keys must be hashable, got {key!r}") from None
        sink = ListSink(len(values), return_exceptions=return_exceptions,
                        progress=_progress_bar(progress, len(values)))
        call = self._call(fn, values, mode=_dispatch.MODE_MAP, sink=sink, length=len(values),
                          retry=retry, continue_on_error=continue_on_error,
                          return_exceptions=return_exceptions, timeout=timeout, cancel=cancel,
                          keys=keys)
        _count_timeout_from(call, started)
        try:
            results = self._run_batch(call, sink)
        except TaskErrorGroup as group:
            group.results = dict(zip(keys, group.results, strict=True))
            raise
        return dict(zip(keys, results, strict=True))

    def process_stream(self, fn: Callable[[T], R], tasks: Iterable[T], *, ordered: bool = True,
                       return_exceptions: bool = False, continue_on_error: bool | None = None,
                       retry: RetryPolicy | None = None, timeout: float | None = None,
                       cancel: threading.Event | None = None, progress: bool = False,
                       buffer_size: int | None = None) -> ResultStream[R]:
        """Run fn over tasks read lazily; an iterator of results.

        At most buffer_size tasks are read ahead of the consumer.  ordered=
        False yields results as they complete.  Closing the iterator early
        (break, close(), an exception) stops reading and drops the work.
        """
        tasks = _as_stream_source(_check_iterable("tasks", tasks))
        limit = self.buffer_size if buffer_size is None else buffer_size
        check_int("buffer_size", limit, minimum=1)
        length = _length_of(tasks)
        engine = self._running_engine()
        sink = StreamSink(ordered=ordered, return_exceptions=return_exceptions,
                          progress=_progress_bar(progress, length))
        call = self._call(fn, tasks, mode=_dispatch.MODE_MAP, sink=sink, length=length,
                          retry=retry, continue_on_error=continue_on_error,
                          return_exceptions=return_exceptions, timeout=timeout, cancel=cancel,
                          flow_limit=limit)
        sink.on_consumed = _flow_waker(engine, call)
        engine.submit(call)
        return _open_stream(engine, call, sink)

    def submit(self, fn: Callable[P, R], /, *args: P.args,
               **kwargs: P.kwargs) -> concurrent.futures.Future[R]:
        """Run fn(*args, **kwargs) in a worker; a concurrent.futures.Future.

        A failure sets the future's exception to a TaskError whose
        __cause__ is the original exception.
        """
        future: concurrent.futures.Future[R] = concurrent.futures.Future()
        call = self._call(fn, [(args, kwargs)], mode=_dispatch.MODE_APPLY,
                          sink=FutureSink(future), length=1, retry=None, continue_on_error=None,
                          return_exceptions=False, timeout=None, cancel=None, future=future)
        self._running_engine(blocking=False).submit(call)
        return future

    def map(self, fn: Callable[..., R], *iterables: Iterable[Any], timeout: float | None = None,
            chunksize: int = 1) -> Iterator[R]:
        """Executor.map: fn over zipped iterables, lazily, in order.

        timeout bounds the whole map from this call on.  chunksize is
        accepted for compatibility; batching adapts to task time anyway.
        """
        check_int("chunksize", chunksize, minimum=1)
        for position, iterable in enumerate(iterables):
            _check_iterable(f"iterables[{position}]", iterable)
        _check_timeout("timeout", timeout)
        engine = self._running_engine()
        sink = StreamSink(ordered=True, return_exceptions=False)
        # A known length lets shutdown() finish the map (see the engine).
        lengths = [_length_of(iterable) for iterable in iterables]
        known = [n for n in lengths if n is not None]
        length = min(known, default=0) if len(known) == len(lengths) else None
        call = self._call(fn, zip(*iterables, strict=False), mode=_dispatch.MODE_STAR, sink=sink, length=length,
                          retry=None, continue_on_error=False, return_exceptions=False,
                          timeout=timeout, cancel=None, flow_limit=self.buffer_size,
                          drain_on_close=True)
        sink.on_consumed = _flow_waker(engine, call)
        engine.submit(call)
        return _open_stream(engine, call, sink)

    # -- asyncio -------------------------------------------------------------

    async def aprocess(self, fn: Callable[[T], R], tasks: Iterable[T], **options: Any) -> list[R]:
        """process() for asyncio; cancelling the awaiting task cancels the work."""
        import asyncio

        loop = asyncio.get_running_loop()
        token = threading.Event()
        work = loop.run_in_executor(None, functools.partial(self.process, fn, tasks, cancel=token, **options))
        try:
            return await asyncio.shield(work)
        except asyncio.CancelledError:
            token.set()
            # The work now ends with CallCancelledError, which nobody will
            # await; take it so asyncio does not report it as lost.
            work.add_done_callback(lambda done: done.cancelled() or done.exception())
            raise

    async def aprocess_stream(self, fn: Callable[[T], R], tasks: Iterable[T],
                              **options: Any) -> AsyncIterator[R]:
        """process_stream() for asyncio: ``async for result in ...``."""
        stream = self.process_stream(fn, tasks, **options)
        async for value in _async_values(stream._reader):
            yield value


def _open_stream(engine: Engine, call: Call, sink: StreamSink) -> ResultStream[Any]:
    reader = _StreamReader(engine, call, sink)
    return ResultStream(reader.next_chunk_or_end, Failure, reader.on_failure, reader.stop, reader)


async def _async_values(reader: _StreamReader) -> AsyncIterator[Any]:
    """A stream's results for ``async for``: chunks are awaited in a
    thread, so the event loop never blocks."""
    import asyncio

    loop = asyncio.get_running_loop()
    try:
        while True:
            chunk = await loop.run_in_executor(None, reader.next_chunk_or_end)
            if chunk is None:
                return
            for value in chunk:
                if type(value) is Failure:
                    keep, value = reader.on_failure(value)
                    if not keep:
                        continue
                yield value
    finally:
        reader.stop()


class _StreamReader:
    """What a stream's generator works with.

    Kept apart from ResultStream so that the callbacks the iterator holds
    do not point back at the stream: a stream dropped mid-loop is freed at
    once, and its __del__ stops the work.
    """

    def __init__(self, engine: Engine, call: Call, sink: StreamSink) -> None:
        self.engine = engine
        self.call = call
        self.sink = sink
        self.closed = False
        self.errors: list[TaskError] = []
        self.backstop = _Backstop(engine, call)

    def next_chunk(self) -> list[Any] | None:
        if self.closed:
            return None
        box: list[list[Any] | None] = []

        def take(poll: float) -> bool:
            chunk = self.sink.next_chunk(poll)
            if chunk is NOT_READY:
                self.backstop.check()
                return False
            box.append(chunk)
            return True

        try:
            _wait_interruptibly(take, self.stop)
        except BaseException:
            self.closed = True
            raise
        chunk = box[0]
        if chunk is None:
            self.closed = True
        return chunk

    def next_chunk_or_end(self) -> list[Any] | None:
        """The next chunk; None at the end, after raising the failures
        collected under continue_on_error."""
        chunk = self.next_chunk()
        if chunk is None and self.errors:
            errors, self.errors = self.errors, []
            raise TaskErrorGroup(f"{len(errors)} tasks failed", errors)
        return chunk

    def on_failure(self, failure: Failure) -> tuple[bool, Any]:
        """What a failed task's place in the stream turns into: its error as
        an item (return_exceptions), the end of the stream (the default),
        or nothing now and a TaskErrorGroup at the end (continue_on_error)."""
        if self.sink.return_exceptions:
            return True, failure.error
        if self.call.stop_on_error:
            self.stop()
            raise failure.error
        self.errors.append(failure.error)
        return False, None

    def stop(self) -> None:
        if not self.closed:
            self.closed = True
            if not self.sink.finished:
                self.engine.abort(self.call, None)


def _flow_waker(engine: Engine, call: Call) -> Callable[[], None]:
    def wake_if_blocked() -> None:
        # The engine stops reading a stream's input while buffer_size tasks
        # are out; tell it when the consumer has made room.
        if call.flow_limit is not None and call.flow_open():
            engine.wake()
    return wake_if_blocked


# How long after a call's timeout or cancel token fires its caller waits
# for the engine to end the call before raising on its own.  The engine
# normally ends it at once, but its thread may be held up in a call's
# input iterator (a generator that blocks), which no thread can interrupt.
_BACKSTOP_GRACE = 0.5


class _Backstop:
    """Raises a call's timeout or cancellation in the waiting thread when
    the engine has not ended the call soon after either fired."""

    def __init__(self, engine: Engine, call: Call) -> None:
        self.engine = engine
        self.call = call
        self.fired_at: float | None = None

    def check(self) -> None:
        call = self.call
        if call.deadline is None and call.cancel is None:
            return
        expired = call.expiry()
        if expired is None:
            return
        now = time.monotonic()
        if self.fired_at is None:
            self.fired_at = now
        elif now - self.fired_at >= _BACKSTOP_GRACE:
            self.engine.abort(call, expired)
            raise expired


def _wait_interruptibly(wait: Callable[[float], bool], on_interrupt: Callable[[], None]) -> None:
    """Wait in short slices so a signal handler runs promptly; on Ctrl-C,
    stop the work before the KeyboardInterrupt goes on up."""
    try:
        while not wait(_WAIT_SLICE):
            pass
    except KeyboardInterrupt:
        on_interrupt()
        raise


def _check_iterable(name: str, value: Any) -> Any:
    if isinstance(value, (str, bytes)) or not hasattr(value, "__iter__"):
        raise TypeError(f"{name} must be an iterable of tasks, got {type(value).__name__}: {value!r:.80}")
    return value


def _as_task_source(tasks: Any) -> Any:
    """Arrays become shared row sources; other iterables stay as they are."""
    numpy = sys.modules.get("numpy")
    if numpy is not None and isinstance(tasks, numpy.ndarray):
        if tasks.ndim == 0:
            raise TypeError("tasks must not be a 0-d array: it has no rows to iterate")
        if tasks.dtype.hasobject:
            return list(tasks)
        from ._shared import SharedRows

        return SharedRows(tasks)
    return tasks


def _count_timeout_from(call: Call, started: float) -> None:
    """A call's timeout runs from when the call was made, so time spent
    reading its input first is not given twice."""
    if call.timeout is not None:
        call.deadline = started + call.timeout


def _read_input(tasks: Iterable[Any], timeout: float | None,
                cancel: threading.Event | None) -> list[Any]:
    """Read a call's whole input in the calling thread, for calls that
    need it all before they start (dtype= output, keys of process_map).

    The call's timeout and cancel token apply from here on, checked
    between items (an item the iterator is still producing is waited
    for); what the iterator raises becomes the call's TaskError.
    """
    deadline = None if timeout is None else time.monotonic() + timeout
    items: list[Any] = []
    iterator = iter(tasks)
    while True:
        before = len(items)
        try:
            items.extend(itertools.islice(iterator, 256))
        except Exception as exc:
            raise input_failure(len(items), exc) from exc
        if len(items) - before < 256:
            return items
        if deadline is not None and time.monotonic() >= deadline:
            raise CallTimeoutError(f"the call did not finish within timeout={timeout}s: "
                                   f"its input was still being read ({len(items)} tasks so far)")
        if cancel is not None and cancel.is_set():
            raise CallCancelledError("the call's cancel token was set while its input was read")


def _as_stream_source(tasks: Any) -> Any:
    """A 1-D array's elements become Python scalars, as process() gives
    them, converted a slice at a time so the stream stays lazy."""
    numpy = sys.modules.get("numpy")
    if numpy is None or not isinstance(tasks, numpy.ndarray):
        return tasks
    if tasks.ndim == 0:
        raise TypeError("tasks must not be a 0-d array: it has no rows to iterate")
    if tasks.ndim > 1 or tasks.dtype.hasobject:
        return tasks
    step = 4096
    slices = (tasks[start:start + step].tolist() for start in range(0, len(tasks), step))
    return _Sized(itertools.chain.from_iterable(slices), len(tasks))


class _Sized:
    """An iterator that also knows its length (for progress bars)."""

    def __init__(self, iterator: Iterator[Any], length: int) -> None:
        self.iterator = iterator
        self.length = length

    def __iter__(self) -> Iterator[Any]:
        return self.iterator

    def __len__(self) -> int:
        return self.length


def _check_timeout(name: str, value: float | None) -> None:
    if value is not None:
        check_number(name, value, minimum=0.0)


def _length_of(tasks: Any) -> int | None:
    if isinstance(tasks, Iterator):
        return None
    try:
        return len(tasks)
    except (TypeError, OverflowError):  # no length, or one past sys.maxsize
        return None


def _progress_bar(progress: bool, total: int | None) -> Any:
    if not progress:
        return None
    from tqdm.auto import tqdm
    return tqdm(total=total, unit="task", file=sys.stderr, mininterval=0.2)


# Exit handlers run last registered first.  multiprocessing's own handler
# joins every live child process, which would wait for running tasks; it is
# registered when multiprocessing.util is imported (above), so ours, made
# after it, runs first and ends the pools quickly.
atexit.register(terminate_all)
