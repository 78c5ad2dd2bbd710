"""A call (one process/process_map/process_stream/submit) and where its
results go.

The engine thread owns Call objects; the calling thread waits on the
call's sink.  Sinks are the only objects both threads touch, and each
guards its state with its own lock or event.
"""

from __future__ import annotations

import enum
import itertools
import threading
import time
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Callable, Hashable, Iterator, Sequence
from concurrent.futures import Future
from typing import Any

from ._errors import (
    CallCancelledError,
    CallTimeoutError,
    TaskError,
    TaskErrorGroup,
    input_failure,
)
from ._policies import RetryPolicy

# A task waiting to be (re)sent: (index, task, attempts so far, isolated).
# Isolated tasks travel alone in a frame, so that a crash or an encoding
# failure can be pinned on exactly one task.  A block of fresh tasks taken
# back from a worker waits whole, as (range of indices, sequence of tasks,
# 0, False), so that it is sent again as cheaply as it was the first time.
PendingTask = tuple[Any, Any, int, bool]


def is_block(item: PendingTask) -> bool:
    return type(item[0]) is range

_call_ids = itertools.count(1)


class Call:
    """The engine's record of one call: where its tasks come from, how many
    are out, and the rules it runs under."""

    def __init__(
        self,
        *,
        fn_blob: bytes,
        mode: int,
        tasks: Any,
        length: int | None,
        sink: Sink,
        retry: RetryPolicy,
        stop_on_error: bool,
        task_timeout: float | None,
        timeout: float | None,
        cancel: threading.Event | None,
        keys: Sequence[Hashable] | None = None,
        flow_limit: int | None = None,
        future: Future[Any] | None = None,
        drain_on_close: bool = False,
    ) -> None:
        self.id = next(_call_ids)
        self.fn_blob = fn_blob
        self.fn_id = 0
        self.mode = mode
        self.sink = sink
        self.retry = retry
        self.stop_on_error = stop_on_error
        self.task_timeout = task_timeout
        self.deadline = None if timeout is None else time.monotonic() + timeout
        self.timeout = timeout
        self.cancel = cancel
        self.keys = keys
        self.flow_limit = flow_limit
        self.drain_on_close = drain_on_close
        self.future = future
        # Where tasks come from: a sequence is sliced (fast), anything else
        # is read lazily through an iterator.
        # A range is sliced into ranges, which travel as three numbers.
        self.sequence: Sequence[Any] | None = tasks if _sliceable(tasks) else None
        self.iterator: Iterator[Any] | None = None if self.sequence is not None else iter(tasks)
        self.length = length
        self.next_index = 0
        self.exhausted = self.sequence is not None and len(self.sequence) == 0
        # What reading the input raised: the call fails with it once the
        # tasks read before it have run.
        self.input_error: BaseException | None = None
        self.future_started = False
        self.pending: deque[PendingTask] = deque()
        self.in_flight = 0
        self.delayed = 0
        self.frames_sent = 0
        self.done = False
        self.in_ready_queue = False
        # Typed output (dtype= / out=): the shared array results go to,
        # once known, and whether a first result is being awaited to learn
        # the shape of each item.
        self.typed_output = getattr(sink, "typed", False)
        # An ordered stream that must stop at its first failure: the index
        # of the earliest failure so far, whose error the consumer raises
        # once every result before it has been handed out.
        self.ordered_stream = isinstance(sink, StreamSink) and sink.ordered
        self.fail_index: int | None = None
        # Out-of-band bytes per task seen so far, to keep frames within the
        # data arena.
        self.bytes_per_task = 0
        self.probing = False
        # Indices announced to on_task_start whose frame came back unstarted
        # (taken back for another worker, or queued behind a crash).
        self.announced_unstarted: set[int] = set()

    # -- deadlines ------------------------------------------------------

    def expiry(self) -> BaseException | None:
        """The error that ends the call now, if its timeout has passed or
        its cancel token is set."""
        if self.deadline is not None and time.monotonic() >= self.deadline:
            return CallTimeoutError(
                f"the call did not finish within timeout={self.timeout}s; "
                "its unstarted tasks were dropped and running ones abandoned")
        if self.cancel is not None and self.cancel.is_set():
            return CallCancelledError(
                "the call's cancel token was set; its unstarted tasks were dropped "
                "and running ones abandoned")
        return None

    # -- where tasks come from -------------------------------------------

    def has_work(self) -> bool:
        if self.done or self.probing:
            return False
        if self.pending:
            return True
        return not self.exhausted and self.flow_open()

    def flow_open(self) -> bool:
        """Streams stop reading input while buffer_size tasks are out.

        Reading starts again only once a quarter of the buffer is free:
        resuming at the first free place would send frames as small as the
        chunks the consumer takes, and round trips would dominate.
        """
        if self.flow_limit is None:
            return True
        room = self.flow_limit - (self.next_index - self.sink.consumed)
        return room >= max(1, self.flow_limit // 4)

    def flow_room(self) -> int | None:
        if self.flow_limit is None:
            return None
        return max(0, self.flow_limit - (self.next_index - self.sink.consumed))

    def remaining(self) -> int | None:
        """Tasks not yet read from the input, when that is known."""
        if self.length is None:
            return None
        return self.length - self.next_index

    def take(self, limit: int) -> tuple[Any, Any, list[int] | None, bool]:
        """Up to limit tasks to send: (indices, tasks, attempts, isolated).

        indices is a range for fresh tasks, a list for resent ones.
        Raises whatever the input iterator raises.
        """
        if self.pending:
            return self._take_pending(limit)
        room = self.flow_room()
        if room is not None:
            limit = max(1, min(limit, room))
        start = self.next_index
        if self.sequence is not None:
            chunk = self.sequence[start:start + limit]
            # A block of array rows stays one object: it travels as a
            # reference to the shared input, not row by row.
            tasks = chunk if type(chunk) in (list, range) or hasattr(chunk, "as_tasks") else list(chunk)
            if start + len(tasks) >= len(self.sequence):
                self.exhausted = True
        else:
            assert self.iterator is not None
            tasks = []
            try:
                # extend() keeps the items read before a failure, so that
                # their tasks still run and deliver.
                tasks.extend(itertools.islice(self.iterator, limit))
            except BaseException as exc:  # noqa: BLE001 - reported as the call's failure
                self.input_error = input_failure(start + len(tasks), exc)
                self.exhausted = True
            if len(tasks) < limit:
                self.exhausted = True
        self.next_index = start + len(tasks)
        if self.exhausted:
            self.length = self.next_index
            self.sink.set_length(self.next_index)
        return range(start, self.next_index), tasks, None, False

    def _take_pending(self, limit: int) -> tuple[Any, Any, list[int] | None, bool]:
        first = self.pending[0]
        if is_block(first):
            return self._take_block(limit)
        if first[3]:
            self.pending.popleft()
            return [first[0]], [first[1]], [first[2]], True
        indices: list[int] = []
        tasks: list[Any] = []
        attempts: list[int] = []
        while (self.pending and len(tasks) < limit and not self.pending[0][3]
               and not is_block(self.pending[0])):
            index, task, tries, _ = self.pending.popleft()
            indices.append(index)
            tasks.append(task)
            attempts.append(tries)
        return indices, tasks, attempts, False

    def _take_block(self, limit: int) -> tuple[range, Any, None, bool]:
        block_indices, block_tasks, _, _ = self.pending.popleft()
        if len(block_tasks) > limit:
            rest = (block_indices[limit:], slice_tasks(block_tasks, limit, None), 0, False)
            self.pending.appendleft(rest)
            return block_indices[:limit], slice_tasks(block_tasks, 0, limit), None, False
        return block_indices, block_tasks, None, False

    def requeue(self, items: list[PendingTask]) -> None:
        """Put tasks back at the front, in their original order."""
        self.pending.extendleft(reversed(items))

    def drop_pending_from(self, index: int) -> None:
        """Forget waiting tasks at index and after (blocks are cut short)."""
        kept: deque[PendingTask] = deque()
        for item in self.pending:
            if not is_block(item):
                if item[0] < index:
                    kept.append(item)
                continue
            indices = item[0]
            keep = len(range(indices.start, min(indices.stop, index)))
            if keep:
                kept.append((indices[:keep], slice_tasks(item[1], 0, keep), 0, False))
        self.pending = kept

    def finished(self) -> bool:
        return self.exhausted and not self.pending and self.in_flight == 0 and self.delayed == 0

    def key_of(self, index: int) -> Hashable | None:
        return None if self.keys is None else self.keys[index]


class Sink(ABC):
    """Receives a call's outcomes, on the engine thread."""

    consumed = 0

    def set_length(self, length: int) -> None:  # noqa: B027 - optional hook
        """The input turned out to hold length tasks (sinks may ignore it)."""

    @abstractmethod
    def accept(self, indices: Any, values: list[Any], written: bool = False) -> Any:
        """Store results; a sink may return (index, error) pairs for results
        it cannot hold."""

    @abstractmethod
    def fail(self, index: int, error: TaskError) -> None:
        """Store the final failure of one task."""

    @abstractmethod
    def finish(self, failure: BaseException | None) -> None:
        """The call is over: with failure, it failed as a whole."""


_MISSING: Any = object()


class ListSink(Sink):
    """Collects a batch call's results in input order."""

    typed = False

    def __init__(self, length: int | None, *, return_exceptions: bool,
                 progress: Any = None) -> None:
        self.results: list[Any] = [_MISSING] * length if length is not None else []
        self.errors: dict[int, TaskError] = {}
        self.return_exceptions = return_exceptions
        self.failure: BaseException | None = None
        self.progress = progress
        self.length = length
        self._done = threading.Event()

    def set_length(self, length: int) -> None:
        self.length = length
        if self.progress is not None and self.progress.total is None:
            self.progress.total = length
            self.progress.refresh()

    def _grow(self, stop: int) -> None:
        if stop > len(self.results):
            self.results.extend([_MISSING] * (stop - len(self.results)))

    def accept(self, indices: Any, values: list[Any], written: bool = False) -> Any:
        if type(indices) is range:
            self._grow(indices.stop)
            self.results[indices.start:indices.stop] = values
        else:
            self._grow(max(indices) + 1)
            for index, value in zip(indices, values, strict=True):
                self.results[index] = value
        if self.progress is not None:
            self.progress.update(len(values))

    def fail(self, index: int, error: TaskError) -> None:
        self._grow(index + 1)
        self.errors[index] = error
        self.results[index] = error
        if self.progress is not None:
            self.progress.update(1)

    def finish(self, failure: BaseException | None) -> None:
        self.failure = failure
        if self.progress is not None:
            self.progress.close()
        self._done.set()

    def wait(self, timeout: float) -> bool:
        return self._done.wait(timeout)

    def outcome(self) -> list[Any]:
        if self.failure is not None:
            raise self.failure
        if self.length is not None:
            del self.results[self.length:]
        if self.errors and not self.return_exceptions:
            errors = [self.errors[i] for i in sorted(self.errors)]
            raise TaskErrorGroup(
                f"{len(errors)} of {len(self.results)} tasks failed", errors, self.results)
        return self.results


class Failure:
    """Marks a failed task's place in a stream's chunks."""

    __slots__ = ("error",)

    def __init__(self, error: TaskError) -> None:
        self.error = error


class TypedSink(ListSink):
    """Collects a batch call's results into one numpy array (dtype=/out=).

    Workers write straight into the shared output for frames that carry
    it (written=True); other results are stored here.
    """

    typed = True

    def __init__(self, length: int, *, dtype: Any, out: Any, progress: Any = None) -> None:
        super().__init__(length, return_exceptions=False, progress=progress)
        self.results = []
        self.dtype = dtype
        self.out = out
        self.user_out: Any = None

    def allocate(self, first: Any) -> Any:
        """Create the shared output from the first result's shape."""
        import numpy as np

        from ._shared import empty_shared

        assert self.length is not None
        shape = np.shape(first)
        self.out = empty_shared((self.length, *shape), self.dtype)
        return self.out

    def accept(self, indices: Any, values: list[Any], written: bool = False
               ) -> list[tuple[int, BaseException]]:
        """Store results; returns (index, error) for those that do not fit."""
        misfits: list[tuple[int, BaseException]] = []
        if not written:
            out = self.out
            for index, value in zip(indices, values, strict=True):
                try:
                    out[index] = value
                except Exception as exc:
                    misfits.append((index, exc))
        if self.progress is not None:
            self.progress.update(len(values) - len(misfits))
        return misfits

    def fail(self, index: int, error: TaskError) -> None:
        self.errors[index] = error
        if self.progress is not None:
            self.progress.update(1)

    def outcome(self) -> Any:
        if self.failure is not None:
            raise self.failure
        import numpy as np

        if self.out is None:
            # No task ran, so no result showed the shape of one: an empty
            # input gives an empty 1-D array.
            self.out = np.empty(0, dtype=self.dtype)
        # A plain ndarray view: it keeps the shared memory alive as long as
        # it is referenced, like any array keeps its buffer.
        result = np.asarray(self.out).view(np.ndarray)
        if self.user_out is not None:
            if self.user_out is not self.out:
                self.user_out[...] = self.out
            result = self.user_out
        if self.errors:
            errors = [self.errors[i] for i in sorted(self.errors)]
            raise TaskErrorGroup(f"{len(errors)} of {self.length} tasks failed", errors, result)
        return result


class NotReady(enum.Enum):
    NOT_READY = "not ready"


NOT_READY = NotReady.NOT_READY


class StreamSink(Sink):
    """Hands a stream's results to the consuming thread as they arrive.

    Results are kept in chunks (one per frame) so that the consumer takes
    a lock once per frame, not once per result.
    """

    def __init__(self, *, ordered: bool, return_exceptions: bool, progress: Any = None,
                 on_consumed: Callable[[], None] | None = None) -> None:
        self.ordered = ordered
        self.return_exceptions = return_exceptions
        self.progress = progress
        self.on_consumed = on_consumed
        self.consumed = 0
        self.finished = False
        self.failure: BaseException | None = None
        self._cond = threading.Condition()
        # ordered: start index -> values; unordered: a queue of chunks.
        self._by_start: dict[int, list[Any]] = {}
        self._queue: deque[list[Any]] = deque()
        self._next = 0

    def set_length(self, length: int) -> None:
        if self.progress is not None and self.progress.total is None:
            self.progress.total = length
            self.progress.refresh()

    def accept(self, indices: Any, values: list[Any], written: bool = False) -> None:
        with self._cond:
            if type(indices) is range:
                self._store(indices.start, values)
            else:
                for index, value in zip(indices, values, strict=True):
                    self._store(index, [value])
            self._cond.notify()
        if self.progress is not None:
            self.progress.update(len(values))

    def _store(self, start: int, values: list[Any]) -> None:
        if self.ordered:
            self._by_start[start] = values
        else:
            self._queue.append(values)

    def fail(self, index: int, error: TaskError) -> None:
        with self._cond:
            self._store(index, [Failure(error)])
            self._cond.notify()
        if self.progress is not None:
            self.progress.update(1)

    def finish(self, failure: BaseException | None) -> None:
        with self._cond:
            self.finished = True
            self.failure = failure
            self._cond.notify_all()
        if self.progress is not None:
            self.progress.close()

    def next_chunk(self, poll: float) -> list[Any] | None | NotReady:
        """The next chunk in stream order; None at the end; NOT_READY if
        none came within poll seconds.  Raises the call's failure once
        every result before it has been handed out."""
        with self._cond:
            for _ in range(2):
                chunk = self._pop_ready()
                if chunk is not None:
                    break
                if self.finished:
                    if self.failure is not None:
                        raise self.failure
                    return None
                self._cond.wait(poll)
            else:
                return NOT_READY
        self.consumed += len(chunk)
        if self.on_consumed is not None:
            self.on_consumed()
        return chunk

    def _pop_ready(self) -> list[Any] | None:
        if not self.ordered:
            return self._queue.popleft() if self._queue else None
        chunk = self._by_start.pop(self._next, None)
        if chunk is not None:
            self._next += len(chunk)
        return chunk


class FutureSink(Sink):
    """Resolves the Future of a submit()."""

    def __init__(self, future: Future[Any]) -> None:
        self.future = future

    def accept(self, indices: Any, values: list[Any], written: bool = False) -> None:
        if not self.future.done():
            self.future.set_result(values[0])

    def fail(self, index: int, error: TaskError) -> None:
        if not self.future.done():
            self.future.set_exception(error)

    def finish(self, failure: BaseException | None) -> None:
        future = self.future
        if future.cancelled():
            self.notify_cancelled()
        elif failure is None:
            # Ended without a result: the call was dropped before it ran.
            if future.cancel():
                self.notify_cancelled()
        elif not future.done():
            future.set_exception(failure)

    def notify_cancelled(self) -> None:
        """Wake as_completed() and wait() callers of a cancelled future.

        Future.cancel() alone only wakes result() callers; the waiters that
        as_completed installs are told by set_running_or_notify_cancel().
        """
        try:
            self.future.set_running_or_notify_cancel()
        except RuntimeError:
            pass  # already notified


def _sliceable(tasks: Any) -> bool:
    if isinstance(tasks, range):
        # len() of a range longer than sys.maxsize overflows: such a range
        # is read as an iterator instead.
        try:
            len(tasks)
        except OverflowError:
            return False
        return True
    return isinstance(tasks, (list, tuple)) or hasattr(tasks, "row_blocks")


def slice_tasks(tasks: Any, start: int, stop: int | None) -> Any:
    """tasks[start:stop] for a list, a range or a block of array rows."""
    if hasattr(tasks, "as_tasks"):
        return type(tasks)(tasks.rows[start:stop])
    return tasks[start:stop]
