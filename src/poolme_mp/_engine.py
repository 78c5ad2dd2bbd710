"""The parent's engine: one thread per pool that owns the rings.

    API threads ──requests──► engine thread ──frames──► task rings
      (process, submit, ...)   │   ▲                     result rings
      wait on their sink ◄─────┘   └── results, READY, LOG ─┘
                                   └── process sentinels, deadlines

Each pass of the loop takes new requests, collects results, handles dead
workers, enforces deadlines, releases retries and dispatches, then blocks
in one poll() on the result doorbell, the wakeup eventfd and every
worker's sentinel, with a timeout set by the nearest deadline.  Only this
thread touches the rings, the worker table and Call objects, so none of
them needs a lock; requests cross over through a locked deque.
"""

from __future__ import annotations

import heapq
import logging
import math
import multiprocessing
import os
import pickle
import select
import signal
import threading
import time
import weakref
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import cloudpickle

from . import _arena, _codec, _dispatch
from . import _protocol as proto
from ._calls import Call, PendingTask, slice_tasks
from ._errors import (
    BrokenPoolError,
    CallbackError,
    PoolClosedError,
    RemoteError,
    TaskError,
    TaskSerializationError,
    TaskTimeoutError,
    WorkerCrashedError,
    describe_exit,
    describe_task,
)
from ._policies import RateLimiter
from ._worker import InheritedFd, WorkerConfig, worker_main

_log = logging.getLogger("poolme_mp.engine")

# Aim for this much work per frame: long enough that the per-frame cost
# (a doorbell, two headers, a pickle call) vanishes, short enough that
# work still spreads evenly over the workers.
TARGET_FRAME_NS = 4_000_000
MAX_BATCH = 65_536
# Frames whose tasks are slower than this go one at a time per worker, so
# no task waits in a ring behind a long one while another worker idles.
SLOW_TASK_NS = 20_000_000
# How long tasks of a cancelled or timed-out call may keep a worker before
# it is killed and replaced.
ABANDON_GRACE = 0.3
# Consecutive failed worker starts after which the pool is broken.
MAX_START_FAILURES = 3
# How often cancel tokens and task timeouts are looked at while they apply.
POLL_INTERVAL = 0.02


@dataclass
class EngineOptions:
    workers: int
    start_method: str
    ring_bytes: int
    arena_bytes: int = 64 * 1024 * 1024
    task_timeout: float | None = None
    rate_limiter: RateLimiter | None = None
    max_tasks_per_worker: int | None = None
    on_worker_start: Callable[[], Any] | None = None
    on_worker_stop: Callable[[], Any] | None = None
    on_task_start: Callable[[Any], Any] | None = None
    on_task_end: Callable[[Any, Any], Any] | None = None
    on_error: Callable[[TaskError], Any] | None = None
    on_retry: Callable[[Any, int, BaseException, float], Any] | None = None


@dataclass
class Frame:
    """A frame sent to a worker and not yet answered."""

    seq: int
    call: Call
    indices: Any
    tasks: Any  # a list, a range, or a block of rows of a shared array
    attempts: list[int] | None
    spill: _codec.Spill | None
    typed: bool = False
    arena_region: tuple[int, int] | None = None
    sent_ns: int = 0
    fn_spill: _codec.Spill | None = None

    def close_spills(self) -> None:
        for spill in (self.spill, self.fn_spill):
            if spill is not None:
                spill.close()

    def pending_from(self, start: int = 0) -> list[PendingTask]:
        """The frame's tasks from offset start on, to be sent again: as one
        block when they are fresh tasks with consecutive indices."""
        if self.attempts is None and type(self.indices) is range:
            return [(self.indices[start:], slice_tasks(self.tasks, start, None), 0, False)]
        return self.pending(range(start, len(self.tasks)))

    def pending(self, offsets: Any, isolated: bool = False) -> list[PendingTask]:
        attempts = self.attempts
        return [(self.indices[k], self.tasks[k], attempts[k] if attempts else 0, isolated)
                for k in offsets]

    def attempts_of(self, offset: int) -> int:
        return (self.attempts[offset] if self.attempts else 0) + 1


@dataclass
class WorkerHandle:
    """The engine's view of one worker process in one slot."""

    slot: int
    process: Any
    pid: int
    doorbell: int
    frames: deque[Frame] = field(default_factory=deque)
    known_functions: OrderedDict[int, None] = field(default_factory=OrderedDict)
    ready: bool = False
    stopping: bool = False
    tasks_sent: int = 0
    kill_reason: tuple[Any, ...] | None = None
    abandon_at: float | None = None


class SlotArenas:
    """The two data arenas of one worker slot, as the parent sees them."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.task_fd = _arena.create_arena_fd(size)
        self.result_fd = _arena.create_arena_fd(size)
        self.view = _arena.map_arena(self.task_fd, size, writable=True)
        self.result_view = _arena.map_arena(self.result_fd, size, writable=False)
        self.free = _arena.FreeList(size)
        # Regions a task still holds views on, by start: kept out of use
        # until the worker reports them released.
        self.pinned: dict[int, int] = {}

    def take(self, nbytes: int) -> int | None:
        return self.free.alloc(nbytes)

    def release(self, region: tuple[int, int] | None) -> None:
        if region is not None and region[0] not in self.pinned:
            self.free.free(*region)

    def reset(self) -> None:
        """The worker is gone, and with it every view it held."""
        self.free.reset()
        self.pinned.clear()

    def close(self) -> None:
        for view in (self.view, self.result_view):
            try:
                view.release()
            except BufferError:
                pass
        for fd in (self.task_fd, self.result_fd):
            try:
                os.close(fd)
            except OSError:
                pass


class Engine:
    """Runs one pool: its workers, its segment and its engine thread."""

    def __init__(self, options: EngineOptions) -> None:
        self.options = options
        self.context = multiprocessing.get_context(options.start_method)
        if options.start_method == "forkserver":
            _preload_worker_in_forkserver()
        self.region_fd = os.memfd_create("poolme-pool", os.MFD_CLOEXEC)
        self.region = _dispatch.SharedRegion(self.region_fd, options.workers, options.ring_bytes, True)
        self.inline_limit = self.region.max_payload() // 2
        self.result_doorbell = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self.wakeup = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        # Other threads ring the wakeup doorbell (a stream dropped late, a
        # shutdown) possibly after teardown closed it; the lock and the -1
        # make sure they never write into whatever file reuses its number.
        self.wakeup_lock = threading.Lock()
        self.hooks = (
            _codec.dumps_function(options.on_worker_start) if options.on_worker_start else None,
            _codec.dumps_function(options.on_worker_stop) if options.on_worker_stop else None,
        )
        self.arenas = [SlotArenas(options.arena_bytes) for _ in range(options.workers)]
        self.workers: list[WorkerHandle | None] = [None] * options.workers
        self.sentinels: dict[int, WorkerHandle] = {}
        self.poller = select.poll()
        self.poller.register(self.result_doorbell, select.POLLIN)
        self.poller.register(self.wakeup, select.POLLIN)

        self.requests: deque[tuple[str, Any]] = deque()
        self.requests_lock = threading.Lock()
        self.active: dict[int, Call] = {}
        self.ready: deque[Call] = deque()
        self.flow_blocked: list[Call] = []
        self.retries: list[tuple[float, int, Call, PendingTask]] = []
        self.retry_order = 0
        self.seq = 0
        self.function_ids: OrderedDict[bytes, int] = OrderedDict()
        self.next_function_id = 1
        # fn id -> [ns per task, largest batch measured]
        self.costs: dict[int, list[int]] = {}
        self.start_failures = 0
        self.start_failure: BaseException | None = None
        self.broken: BrokenPoolError | None = None
        self.closing = False       # no new calls; stop once calls are done
        self.terminating = False   # stop now, killing workers
        self.rate_wait_until = 0.0
        self.thread = threading.Thread(target=self._run, name="poolme-engine", daemon=True)
        self.stopped = threading.Event()

    # == API side (any thread) ==================================================

    def start(self) -> None:
        for slot in range(self.options.workers):
            self._spawn(slot)
        self.thread.start()
        _live_engines.add(self)

    def submit(self, call: Call) -> None:
        with self.requests_lock:
            if self.broken is not None:
                raise self.broken
            if self.closing or self.terminating:
                raise PoolClosedError("the pool is shut down; it accepts no more work")
            self.requests.append(("call", call))
        self.wake()

    def abort(self, call: Call, failure: BaseException | None) -> None:
        """Stop a call from another thread (interrupt, closed stream)."""
        with self.requests_lock:
            self.requests.append(("abort", (call, failure)))
        self.wake()

    def close(self, cancel_futures: bool = False) -> None:
        with self.requests_lock:
            self.closing = True
            self.requests.append(("close", cancel_futures))
        self.wake()

    def terminate(self) -> None:
        with self.requests_lock:
            self.closing = True
            self.terminating = True
        self.wake()

    def wake(self) -> None:
        with self.wakeup_lock:
            if self.wakeup >= 0:
                _dispatch.ring_doorbell(self.wakeup)

    def join(self, timeout: float | None) -> bool:
        if not self.thread.is_alive() and not self.stopped.is_set():
            return True
        return self.stopped.wait(timeout)

    # == engine thread ===========================================================

    def _run(self) -> None:
        try:
            while True:
                self._take_requests()
                if self.terminating:
                    break
                self._collect_all()
                self._enforce_deadlines()
                self._release_retries()
                self._dispatch()
                if self.closing and not self.active and self._stop_idle_workers():
                    break
                self._wait()
        except BaseException as exc:  # an engine bug must not hang callers
            _log.error("poolme_mp engine failed", exc_info=True)
            broken = BrokenPoolError(f"the poolme_mp engine failed: {exc!r}")
            broken.__cause__ = exc
            with self.requests_lock:
                self.broken = broken
            self._fail_all(broken)
        finally:
            with self.requests_lock:
                # Whatever ends the engine, later calls must fail at once
                # rather than wait for a thread that is gone.
                self.closing = True
                pending, self.requests = self.requests, deque()
            for kind, payload in pending:
                if kind == "call":
                    payload.done = True
                    payload.sink.finish(self.broken or PoolClosedError("the pool was shut down"))
            self._teardown()

    # -- requests -------------------------------------------------------------

    def _take_requests(self) -> None:
        with self.requests_lock:
            requests, self.requests = self.requests, deque()
        for kind, payload in requests:
            if kind == "call":
                self._add_call(payload)
            elif kind == "abort":
                call, failure = payload
                self._abort_call(call, failure)
            elif kind == "close":
                self._close_streams(cancel_futures=payload)
                if payload:
                    self._cancel_pending_futures()
        if self.flow_blocked:
            blocked, self.flow_blocked = self.flow_blocked, []
            for call in blocked:
                self._make_ready(call)
        if self.terminating:
            self._fail_all(PoolClosedError("the pool was terminated"))

    def _add_call(self, call: Call) -> None:
        if call.exhausted:
            call.sink.set_length(0)
        if self.broken is not None:
            call.done = True
            call.sink.finish(self.broken)
            return
        call.fn_id = self._function_id(call.fn_blob)
        self.active[call.id] = call
        self._make_ready(call)
        self._finish_if_done(call)

    def _function_id(self, blob: bytes) -> int:
        """The same function bytes get the same id, so workers unpickle a
        function once and later calls only name it."""
        fn_id = self.function_ids.get(blob)
        if fn_id is None:
            fn_id = self.next_function_id
            self.next_function_id += 1
            self.function_ids[blob] = fn_id
            if len(self.function_ids) > 1024:
                self.function_ids.popitem(last=False)
        else:
            self.function_ids.move_to_end(blob)
        return fn_id

    def _close_streams(self, cancel_futures: bool) -> None:
        """Streams cannot outlive shutdown: one nobody reads would keep it
        waiting forever.  process_stream streams end with PoolClosedError.

        Executor.map streams finish their work instead (Executor semantics:
        submitted work completes and can be iterated afterwards): an input
        of known length is read to the end.  An input of unknown length
        may never end, so reading stops; the tasks already read run, and
        the map raises PoolClosedError after their results.  With
        cancel_futures, maps end at once like other streams.
        """
        for call in list(self.active.values()):
            if call.flow_limit is None:
                continue
            if not call.drain_on_close or cancel_futures:
                self._abort_call(call, PoolClosedError(
                    "the pool was shut down while this stream was still open"))
                continue
            call.flow_limit = None
            if call.length is None and not call.exhausted:
                call.exhausted = True
                call.input_error = PoolClosedError(
                    f"the pool was shut down before this map's input, of unknown length, "
                    f"was read to the end: the results of the {call.next_index} tasks read "
                    f"before come first")
            self._make_ready(call)
            self._finish_if_done(call)

    def _cancel_pending_futures(self) -> None:
        for call in list(self.active.values()):
            if call.future is not None and not call.future_started:
                self._abort_call(call, None)

    def _make_ready(self, call: Call) -> None:
        if not call.in_ready_queue and not call.done:
            call.in_ready_queue = True
            self.ready.append(call)

    # -- workers ----------------------------------------------------------------

    def _spawn(self, slot: int) -> None:
        self.region.reset_slot(slot)
        doorbell = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        config = WorkerConfig(
            slot=slot,
            n_slots=self.options.workers,
            ring_bytes=self.options.ring_bytes,
            region=InheritedFd(self.region_fd),
            task_arena=InheritedFd(self.arenas[slot].task_fd),
            result_arena=InheritedFd(self.arenas[slot].result_fd),
            arena_bytes=self.options.arena_bytes,
            doorbell=InheritedFd(doorbell),
            result_doorbell=InheritedFd(self.result_doorbell),
            owner_pid=os.getpid(),
            on_worker_start=self.hooks[0],
            on_worker_stop=self.hooks[1],
            log_levels=_logging_levels(),
        )
        process = self.context.Process(  # type: ignore[attr-defined]
            target=worker_main, args=(config,), name=f"poolme-worker-{slot}", daemon=False)
        process.start()
        handle = WorkerHandle(slot=slot, process=process, pid=int(process.pid or 0), doorbell=doorbell)
        self.workers[slot] = handle
        self.sentinels[process.sentinel] = handle
        self.poller.register(process.sentinel, select.POLLIN)

    def _worker_exited(self, handle: WorkerHandle) -> None:
        handle.process.join(1.0)
        exitcode = handle.process.exitcode
        self._collect(handle)
        self.poller.unregister(handle.process.sentinel)
        del self.sentinels[handle.process.sentinel]
        os.close(handle.doorbell)
        self.workers[handle.slot] = None
        expected = handle.stopping and not handle.frames
        if not handle.ready and not expected:
            self._count_start_failure(handle, exitcode)
        self._recover_frames(handle, exitcode)
        self.arenas[handle.slot].reset()
        handle.process.close()
        if not self.terminating and self.broken is None and not (self.closing and not self.active):
            self._spawn(handle.slot)

    def _count_start_failure(self, handle: WorkerHandle, exitcode: int | None) -> None:
        self.start_failures += 1
        if self.start_failures < MAX_START_FAILURES:
            return
        cause = self.start_failure
        detail = f": {type(cause).__name__}: {cause}" if cause is not None else (
            f"; the last one ended with {describe_exit(exitcode)} before it was ready "
            "(its stderr says why; under spawn the main module must be importable)")
        broken = BrokenPoolError(
            f"{self.start_failures} worker starts failed in a row{detail}")
        broken.__cause__ = cause
        self.broken = broken
        self._fail_all(broken)

    def _recover_frames(self, handle: WorkerHandle, exitcode: int | None) -> None:
        """Decide the fate of every frame a dead worker still held."""
        phase, seq, offset, _ = self.region.progress(handle.slot)
        frames = list(handle.frames)
        handle.frames.clear()
        for position, frame in enumerate(frames):
            frame.close_spills()
            frame.arena_region = None  # the whole arena is reset below
            call = frame.call
            call.in_flight -= len(frame.tasks)
            if call.done:
                continue
            started = position == 0 and seq == frame.seq and phase in (
                _dispatch.PHASE_DECODING, _dispatch.PHASE_RUNNING, _dispatch.PHASE_ENCODING)
            if not started:
                self._sent_back_unstarted(frame)
                self._requeue(call, frame.pending_from())
            elif phase == _dispatch.PHASE_RUNNING and 0 <= offset < len(frame.tasks):
                self._blame_task(handle, frame, offset, exitcode)
            elif len(frame.tasks) > 1:
                # Died reading the frame or writing its results: one of its
                # tasks is to blame, so run each alone to find which.
                self._requeue(call, frame.pending(range(len(frame.tasks)), isolated=True))
            else:
                self._crashed(handle, frame, 0, exitcode, _crash_stage(phase))
            self._finish_if_done(call)

    def _blame_task(self, handle: WorkerHandle, frame: Frame, offset: int, exitcode: int | None) -> None:
        others = [k for k in range(len(frame.tasks)) if k != offset]
        # Tasks before the culprit ran, but their results died with the
        # worker; they run again along with those after it.
        self._requeue(frame.call, frame.pending(others))
        reason = handle.kill_reason
        if reason and reason[0] == "timeout" and reason[1] == frame.seq and reason[2] == offset:
            index = frame.indices[offset]
            error = TaskTimeoutError(
                f"{self._describe(frame.call, index)} ran past task_timeout="
                f"{frame.call.task_timeout}s; its worker (pid {handle.pid}) was killed "
                "with its process group and replaced",
                index=index, key=frame.call.key_of(index), attempts=frame.attempts_of(offset),
                worker_pid=handle.pid)
            self._task_failed(frame.call, frame, offset, error, error)
        else:
            self._crashed(handle, frame, offset, exitcode, "")

    def _crashed(self, handle: WorkerHandle, frame: Frame, offset: int,
                 exitcode: int | None, stage: str) -> None:
        index = frame.indices[offset]
        call = frame.call
        if handle.kill_reason and handle.kill_reason[0] == "abandon":
            return
        error = WorkerCrashedError(
            f"{self._describe(call, index)} crashed its worker (pid {handle.pid}){stage} "
            f"with {describe_exit(exitcode)}. Likely causes: a segfault in native code, "
            "os._exit() in the task, running out of memory (the OOM killer sends SIGKILL), "
            "or a signal sent from outside. The worker was replaced.",
            index=index, key=call.key_of(index), attempts=frame.attempts_of(offset),
            worker_pid=handle.pid, exitcode=exitcode)
        failure: TaskError = error
        if "pickling" in stage:
            failure = self._as_serialization_error(error, stage)
        self._task_failed(call, frame, offset, failure, failure)

    @staticmethod
    def _as_serialization_error(error: WorkerCrashedError, stage: str) -> TaskError:
        direction = "task" if "argument" in stage else "result"
        crashed = TaskSerializationError(
            str(error.args[0]), direction=direction, index=error.index, key=error.key,
            attempts=error.attempts, worker_pid=error.worker_pid)
        crashed.__cause__ = error
        return crashed

    def _kill(self, handle: WorkerHandle, reason: tuple[Any, ...]) -> None:
        handle.kill_reason = reason
        pid = handle.pid
        try:
            # The worker leads its own process group, so this also ends
            # every process its task started.
            os.killpg(pid, signal.SIGKILL)
        except OSError:
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass

    def _stop_idle_workers(self) -> bool:
        """Send STOP to every worker; True once all have exited."""
        alive = False
        for handle in self.workers:
            if handle is None:
                continue
            alive = True
            if not handle.stopping:
                self._send_stop(handle)
        return not alive

    def _send_stop(self, handle: WorkerHandle) -> None:
        self.seq += 1
        pushed = self.region.push(handle.slot, _dispatch.TASKS, proto.STOP, self.seq, [])
        if pushed:
            handle.stopping = True
            if pushed == 2:
                _dispatch.ring_doorbell(handle.doorbell)

    # -- collecting results -----------------------------------------------------

    def _collect_all(self) -> None:
        for handle in self.workers:
            if handle is not None:
                self._collect(handle)

    def _collect(self, handle: WorkerHandle) -> None:
        region, slot = self.region, handle.slot
        while True:
            frame = region.peek(slot, _dispatch.RESULTS)
            if frame is None:
                return
            kind, seq, payload, frame_bytes = frame
            try:
                self._on_message(handle, kind, seq, payload)
            finally:
                del payload
                region.consume(slot, _dispatch.RESULTS, frame_bytes)

    def _on_message(self, handle: WorkerHandle, kind: int, seq: int, payload: Any) -> None:
        if kind == proto.RESULTS:
            self._on_results(handle, seq, payload)
        elif kind == proto.READY:
            handle.ready = True
            self.start_failures = 0
            self.start_failure = None
        elif kind == proto.LOG:
            _emit_worker_log(pickle.loads(payload))
        elif kind == proto.START_FAILED:
            self.start_failure = _rebuild_exception(pickle.loads(payload))
        elif kind == proto.HOOK_FAILED:
            failure = _rebuild_exception(pickle.loads(payload))
            _log.error("on_worker_stop raised in worker pid %s: %r", handle.pid, failure)

    def _on_results(self, handle: WorkerHandle, seq: int, payload: Any) -> None:
        frame = handle.frames[0]
        try:
            self._take_results(handle, seq, payload)
        except Exception as exc:
            # A fault in one call's results must not stop the engine.
            self._abort_call(frame.call, _internal_error("collecting results", exc))

    def _take_results(self, handle: WorkerHandle, seq: int, payload: Any) -> None:
        frame = handle.frames.popleft()
        assert frame.seq == seq, (frame.seq, seq)
        frame.close_spills()
        arenas = self.arenas[handle.slot]
        call = frame.call
        n = len(frame.tasks)
        call.in_flight -= n
        _, elapsed, stopped_at, status, envelope_len = proto.RESULT_HEADER.unpack_from(payload, 0)
        start = proto.RESULT_HEADER.size
        records, pinned, unpinned = _codec.decode(payload[start + envelope_len:], True)
        self._track_pins(arenas, frame, pinned, unpinned)
        if call.done:
            self.region.set_spill_ack(handle.slot, seq)
            return
        try:
            envelope = payload[start:start + envelope_len]
            results = _codec.decode(envelope, True, arenas.result_view) if envelope_len else None
            decode_error: BaseException | None = None
        except BaseException as exc:
            results, decode_error = None, exc
        # Decoded (or given up): the worker may reuse the result arena space
        # and close its spill segment.
        self.region.set_spill_ack(handle.slot, seq)
        if status == proto.STATUS_FUNCTION_FAILED:
            self._function_failed(call, handle, records[0])
        elif status == proto.STATUS_DECODE_FAILED or decode_error is not None:
            self._undecodable(handle, frame, records, decode_error)
        else:
            self._record_cost(call, frame, elapsed, stopped_at)
            self._deliver(handle, frame, results, records, stopped_at)
        self._finish_if_done(call)

    @staticmethod
    def _track_pins(arenas: SlotArenas, frame: Frame, pinned: list[int], unpinned: list[int]) -> None:
        """Keep task arena space a task still views out of use; free it once
        the worker reports it released."""
        region = frame.arena_region
        for start in pinned:
            if region is not None and region[0] == start:
                arenas.pinned[start] = region[1]
        arenas.release(region)
        for start in unpinned:
            length = arenas.pinned.pop(start, None)
            if length is not None:
                arenas.free.free(start, length)

    def _record_cost(self, call: Call, frame: Frame, elapsed: int, stopped_at: int) -> None:
        ran = len(frame.tasks) if stopped_at < 0 else stopped_at
        if ran <= 0:
            return
        per_task = max(1, elapsed // ran)
        cost = self.costs.get(call.fn_id)
        if cost is None:
            self.costs[call.fn_id] = [per_task, ran]
        else:
            # Weighted toward the new figure so a change in task size shows
            # within a frame or two.
            cost[0] = (cost[0] + 3 * per_task) // 4
            cost[1] = max(cost[1], ran)

    def _deliver(self, handle: WorkerHandle, frame: Frame, results: Any,
                 records: list[tuple[Any, ...]], stopped_at: int) -> None:
        call = frame.call
        end_callback = self.options.on_task_end
        if call.probing:
            self._learn_output_shape(call, frame, results, records, stopped_at)
        if not records and stopped_at < 0:
            misfits = call.sink.accept(frame.indices, results, frame.typed)
            if misfits:
                self._misfit_results(handle, frame, misfits)
            if end_callback is not None:
                for index, value in zip(frame.indices, results, strict=True):
                    self._callback(call, end_callback, self._task_ref(call, index), value)
            return
        failed = {record[0]: record for record in records}
        ran = len(frame.tasks) if stopped_at < 0 else stopped_at
        for offset in range(len(frame.tasks)):
            if call.done:
                return
            index = frame.indices[offset]
            record = failed.get(offset)
            if record is not None:
                cause = _rebuild_exception(record)
                error = self._task_error(call, frame, offset, handle, record, cause)
                self._task_failed(call, frame, offset, error, cause)
            elif offset < ran:
                misfits = call.sink.accept([index], [results[offset]], frame.typed)
                if misfits:
                    self._misfit_results(handle, frame, misfits)
                if end_callback is not None:
                    self._callback(call, end_callback, self._task_ref(call, index), results[offset])
            else:
                self._requeue(call, frame.pending([offset]))

    def _misfit_results(self, handle: WorkerHandle, frame: Frame,
                        misfits: list[tuple[int, BaseException]]) -> None:
        """Results the typed output cannot hold fail their own tasks."""
        call = frame.call
        for index, exc in misfits:
            error = TaskSerializationError(
                f"{self._describe(call, index)}: its result does not fit the output array "
                f"({type(exc).__name__}: {exc})", direction="result", index=index,
                key=call.key_of(index), worker_pid=handle.pid)
            error.__cause__ = exc
            self._final_failure(call, index, error)

    def _learn_output_shape(self, call: Call, frame: Frame, results: Any,
                            records: list[tuple[Any, ...]], stopped_at: int) -> None:
        """The first result of a dtype= call gives each item's shape; the
        shared output is made from it and later frames write into it."""
        failed = {record[0] for record in records}
        ran = len(frame.tasks) if stopped_at < 0 else stopped_at
        for offset in range(ran):
            if offset not in failed:
                try:
                    call.sink.allocate(results[offset])  # type: ignore[attr-defined]
                except Exception as exc:
                    error = TaskError(f"dtype= cannot hold the results: {type(exc).__name__}: {exc}")
                    error.__cause__ = exc
                    self._abort_call(call, error)
                    return
                call.probing = False
                self._make_ready(call)
                return
        # No result in this frame: the next frame probes again.
        call.probing = False
        self._make_ready(call)

    def _task_error(self, call: Call, frame: Frame, offset: int, handle: WorkerHandle,
                    record: tuple[Any, ...], cause: BaseException) -> TaskError:
        index = frame.indices[offset]
        _, _, type_name, message, text, direction = record
        what = self._describe(call, index)
        attempts = frame.attempts_of(offset)
        common: dict[str, Any] = dict(
            index=index, key=call.key_of(index), attempts=attempts,
            worker_pid=handle.pid, remote_traceback=text)
        if direction == "result":
            error: TaskError = TaskSerializationError(
                f"{what}: its result could not be pickled in the worker to travel back: "
                f"{type_name}: {message}", direction="result", **common)
        elif direction == "output":
            error = TaskSerializationError(
                f"{what}: its result does not fit the output array: {type_name}: {message}",
                direction="result", **common)
        elif direction == "task":
            error = TaskSerializationError(
                f"{what}: its argument could not be unpickled in the worker: "
                f"{type_name}: {message}", direction="task", **common)
        else:
            tries = f" after {attempts} attempts" if attempts > 1 else ""
            error = TaskError(f"{what} failed{tries}: {type_name}: {message}", **common)
        error.__cause__ = cause
        return error

    def _undecodable(self, handle: WorkerHandle, frame: Frame, records: list[tuple[Any, ...]],
                     decode_error: BaseException | None) -> None:
        if len(frame.tasks) > 1:
            self._requeue(frame.call, frame.pending(range(len(frame.tasks)), isolated=True))
            return
        index = frame.indices[0]
        if decode_error is not None:
            error: TaskError = TaskSerializationError(
                f"{self._describe(frame.call, index)}: its result could not be unpickled "
                f"here: {type(decode_error).__name__}: {decode_error}", direction="result",
                index=index, key=frame.call.key_of(index), attempts=frame.attempts_of(0),
                worker_pid=handle.pid)
            error.__cause__ = decode_error
            self._final_failure(frame.call, index, error)
            return
        cause = _rebuild_exception(records[0])
        error = self._task_error(frame.call, frame, 0, handle, records[0], cause)
        self._final_failure(frame.call, index, error)

    def _function_failed(self, call: Call, handle: WorkerHandle, record: tuple[Any, ...]) -> None:
        cause = _rebuild_exception(record)
        error = TaskError(
            f"the function could not be unpickled in worker pid {handle.pid}: "
            f"{record[2]}: {record[3]}. Under spawn and forkserver, a function is "
            "imported by module name unless it is defined in __main__, a lambda or a closure.",
            worker_pid=handle.pid, remote_traceback=record[4])
        error.__cause__ = cause
        self._abort_call(call, error)

    # -- failures and retries ------------------------------------------------------

    def _task_failed(self, call: Call, frame: Frame, offset: int, error: TaskError,
                     cause: BaseException) -> None:
        """A task's attempt failed: retry it after its backoff, or give up."""
        attempts = frame.attempts_of(offset)
        index = frame.indices[offset]
        if call.retry.should_retry(cause, attempts):
            delay = call.retry.delay(attempts)
            isolated = isinstance(error, WorkerCrashedError)
            self.retry_order += 1
            heapq.heappush(self.retries, (time.monotonic() + delay, self.retry_order, call,
                                          (index, frame.tasks[offset], attempts, isolated)))
            call.delayed += 1
            if self.options.on_retry is not None:
                self._callback(call, self.options.on_retry, self._task_ref(call, index),
                               attempts + 1, cause, delay)
            return
        self._final_failure(call, index, error)

    def _final_failure(self, call: Call, index: int, error: TaskError) -> None:
        if self.options.on_error is not None:
            self._callback(call, self.options.on_error, error)
        if self.options.on_task_end is not None:
            self._callback(call, self.options.on_task_end, self._task_ref(call, index), error)
        if call.done:
            return
        if call.stop_on_error and call.ordered_stream:
            self._fail_in_order(call, index, error)
        elif call.stop_on_error:
            self._abort_call(call, error)
        else:
            call.sink.fail(index, error)

    def _fail_in_order(self, call: Call, index: int, error: TaskError) -> None:
        """Stop an ordered stream at a failure without losing the results
        before it: read no more input, drop later queued tasks, and let the
        earlier ones finish; the consumer raises on reaching the failure."""
        if call.fail_index is None or index < call.fail_index:
            call.fail_index = index
        call.exhausted = True
        call.drop_pending_from(call.fail_index)
        call.sink.fail(index, error)

    def _release_retries(self) -> None:
        now = time.monotonic()
        while self.retries and self.retries[0][0] <= now:
            _, _, call, item = heapq.heappop(self.retries)
            call.delayed -= 1
            if call.fail_index is not None and item[0] > call.fail_index:
                continue
            if not call.done:
                call.pending.append(item)
                self._make_ready(call)

    def _requeue(self, call: Call, items: list[PendingTask]) -> None:
        call.probing = False
        if items and not call.done:
            call.requeue(items)
            self._make_ready(call)

    def _abort_call(self, call: Call, failure: BaseException | None) -> None:
        """End a call now: skip its unstarted tasks, abandon running ones."""
        if call.done:
            return
        call.done = True
        self.region.cancel(call.id)
        call.pending.clear()
        self.active.pop(call.id, None)
        now = time.monotonic()
        for handle in self.workers:
            if handle is not None and handle.frames and handle.frames[0].call is call:
                handle.abandon_at = now + ABANDON_GRACE
        call.sink.finish(failure)

    def _finish_if_done(self, call: Call) -> None:
        if not call.done and call.finished():
            call.done = True
            self.active.pop(call.id, None)
            failure = call.input_error
            if (isinstance(failure, TaskError) and not call.stop_on_error
                    and not getattr(call.sink, "return_exceptions", False)):
                # continue_on_error: the input's failure is reported in the
                # group with the tasks' own, in its place after them.
                call.sink.fail(call.next_index, failure)
                failure = None
            call.sink.finish(failure)

    def _fail_all(self, failure: BaseException) -> None:
        for call in list(self.active.values()):
            self._abort_call(call, failure)

    def _callback(self, call: Call, callback: Callable[..., Any], *args: Any) -> None:
        try:
            callback(*args)
        except Exception as exc:
            name = getattr(callback, "__name__", repr(callback))
            error = CallbackError(f"callback {name} raised {type(exc).__name__}: {exc}")
            error.__cause__ = exc
            self._abort_call(call, error)

    def _describe(self, call: Call, index: int) -> str:
        return describe_task(index, call.key_of(index), keyed=call.keys is not None)

    def _task_ref(self, call: Call, index: int) -> Any:
        return index if call.keys is None else call.keys[index]

    # -- deadlines ----------------------------------------------------------------

    def _enforce_deadlines(self) -> None:
        now = time.monotonic()
        for call in list(self.active.values()):
            expired = call.expiry()
            if expired is not None:
                self._abort_call(call, expired)
        now_ns = _dispatch.monotonic_ns()
        for handle in self.workers:
            if handle is None or handle.kill_reason is not None:
                continue
            if handle.abandon_at is not None:
                if not handle.frames or not handle.frames[0].call.done:
                    handle.abandon_at = None
                elif now >= handle.abandon_at:
                    self._kill(handle, ("abandon",))
                    continue
            self._check_task_timeout(handle, now_ns)

    def _check_task_timeout(self, handle: WorkerHandle, now_ns: int) -> None:
        if not handle.frames:
            return
        frame = handle.frames[0]
        limit = frame.call.task_timeout
        if limit is None:
            return
        phase, seq, offset, started = self.region.progress(handle.slot)
        if phase == _dispatch.PHASE_RUNNING and seq == frame.seq and offset >= 0:
            if now_ns - started > limit * 1e9:
                self._kill(handle, ("timeout", seq, offset))

    def _next_wakeup(self) -> float | None:
        """Seconds until the engine must look again, None for never."""
        now = time.monotonic()
        times: list[float] = []
        if self.retries:
            times.append(self.retries[0][0])
        if self.rate_wait_until > now:
            times.append(self.rate_wait_until)
        for call in self.active.values():
            if call.deadline is not None:
                times.append(call.deadline)
            if call.cancel is not None:
                times.append(now + POLL_INTERVAL)
        for handle in self.workers:
            if handle is None:
                continue
            if handle.abandon_at is not None:
                times.append(handle.abandon_at)
            if handle.frames and handle.frames[0].call.task_timeout is not None:
                times.append(now + min(POLL_INTERVAL, handle.frames[0].call.task_timeout / 4))
            if handle.stopping or handle.kill_reason is not None:
                times.append(now + 0.1)
            if len(handle.frames) >= 2:
                times.append(now + 0.005)
        if not times:
            return None
        return max(0.0, min(times) - now)

    # -- dispatch -------------------------------------------------------------------

    def _take_back_stuck_frames(self) -> None:
        """Work stealing: a frame queued behind one that runs far longer
        than expected is asked back, so an idle worker can run its tasks.
        The worker skips it only if it has not started it; either way its
        tasks run exactly once.

        Not under a rate limiter: the queued tasks were given their permits
        when sent, and sending them again would take a second permit each.
        """
        if self.options.rate_limiter is not None:
            return
        workers = [h for h in self.workers if h is not None and h.kill_reason is None]
        if not any(not h.frames and not h.stopping for h in workers):
            return
        now_ns = _dispatch.monotonic_ns()
        for handle in workers:
            if len(handle.frames) < 2:
                continue
            head, queued = handle.frames[0], handle.frames[1]
            cost = self.costs.get(head.call.fn_id)
            expected = cost[0] * len(head.tasks) if cost else 0
            if now_ns - head.sent_ns <= max(4 * expected, 2_000_000):
                continue
            if self.region.take_back(handle.slot, head.seq, queued.seq):
                self._taken_back(handle, queued)

    def _taken_back(self, handle: WorkerHandle, frame: Frame) -> None:
        """The worker will skip this frame; its tasks go to another."""
        handle.frames.remove(frame)
        handle.tasks_sent -= len(frame.tasks)
        frame.close_spills()
        self.arenas[handle.slot].release(frame.arena_region)
        call = frame.call
        call.in_flight -= len(frame.tasks)
        if not call.done:
            self._sent_back_unstarted(frame)
            self._requeue(call, frame.pending_from())

    def _dispatch(self) -> None:
        self._take_back_stuck_frames()
        while self.ready:
            handle = self._least_loaded_worker()
            if handle is None:
                return
            call = self.ready.popleft()
            call.in_ready_queue = False
            if not call.has_work():
                if not call.done and not call.exhausted and not call.pending:
                    self.flow_blocked.append(call)
                continue
            try:
                sent = self._send_frame(handle, call)
            except Exception as exc:
                # A fault in one call's data must not stop the engine.
                self._abort_call(call, _internal_error("sending tasks", exc))
                continue
            if call.has_work():
                self._make_ready(call)
            elif not call.done and not call.exhausted:
                self.flow_blocked.append(call)
            if not sent:
                # The ring was full or the limiter said wait: try later.
                self._make_ready(call)
                return

    def _least_loaded_worker(self) -> WorkerHandle | None:
        best: WorkerHandle | None = None
        for handle in self.workers:
            if handle is None or handle.stopping or handle.kill_reason is not None:
                continue
            if len(handle.frames) >= self._frames_allowed(handle):
                continue
            if best is None or _load(handle) < _load(best):
                best = handle
        return best

    def _frames_allowed(self, handle: WorkerHandle) -> int:
        if not handle.frames:
            return 1
        head = handle.frames[0]
        cost = self.costs.get(head.call.fn_id)
        if self.options.rate_limiter is not None:
            # A released task must start at once for the rate to hold: it
            # may wait only behind a task known to take under a millisecond
            # (which saves a round trip per start at high rates).
            return 2 if cost is not None and cost[0] < 1_000_000 else 1
        if cost is None or cost[0] >= SLOW_TASK_NS:
            return 1
        # A frame running far past its expected time holds a slow task:
        # queue nothing behind it while other workers may be free.
        expected = cost[0] * len(head.tasks)
        if _dispatch.monotonic_ns() - head.sent_ns > max(4 * expected, 1_000_000):
            return 1
        return 2

    def _batch_size(self, call: Call, handle: WorkerHandle) -> int:
        if self.options.rate_limiter is not None:
            return 1
        if call.typed_output and call.sink.out is None:  # type: ignore[attr-defined]
            return 1
        cost = self.costs.get(call.fn_id)
        if cost is None:
            size = 1
        else:
            # Grow at most fourfold past the largest batch measured, so a
            # slow function seen once as fast cannot flood one worker.
            size = min(TARGET_FRAME_NS // cost[0], 4 * cost[1])
        if call.frames_sent < self.options.workers:
            # Start every worker quickly with a small frame rather than
            # make the last one wait while the first frame is encoded.
            size = max(1, size // 8)
        remaining = call.remaining()
        if remaining is not None:
            # Keep part of the input back so that the tail spreads over the
            # workers even if one of them runs slow (a busy machine), but
            # not in frames so small that round trips dominate.
            share = math.ceil(remaining / (2 * self.options.workers))
            size = min(size, max(share, size // 8))
        if call.flow_limit is not None:
            size = min(size, max(1, call.flow_limit // (3 * self.options.workers)))
        if call.bytes_per_task:
            # Two frames in flight must fit in the worker's data arena.
            size = min(size, self.options.arena_bytes // (4 * call.bytes_per_task))
        quota = self.options.max_tasks_per_worker
        if quota is not None:
            size = min(size, quota - handle.tasks_sent)
        return max(1, min(size, MAX_BATCH))

    def _send_frame(self, handle: WorkerHandle, call: Call) -> bool:
        indices, tasks, attempts, isolated = call.take(self._batch_size(call, handle))
        if not tasks:
            self._finish_if_done(call)
            return True
        limiter = self.options.rate_limiter
        if limiter is not None:
            wait = limiter.try_acquire()
            if wait > 0:
                # Not yet: put the task back and look again when a permit
                # is due.
                self.rate_wait_until = time.monotonic() + wait
                call.requeue([(indices[k], tasks[k], attempts[k] if attempts else 0, isolated)
                              for k in range(len(tasks))])
                return False
        if call.future is not None and not call.future_started:
            call.future_started = True
            if not call.future.set_running_or_notify_cancel():
                self._abort_call(call, None)
                return True
        frame = Frame(self.seq + 1, call, indices, tasks, attempts, None)
        if call.typed_output:
            out = call.sink.out  # type: ignore[attr-defined]
            if out is None:
                call.probing = True
            elif type(indices) is range:
                frame.typed = True
        parts = self._encode_frame(handle, frame)
        if parts is None:
            return True
        fn_known = call.fn_id in handle.known_functions
        fn_part = b""
        if not fn_known:
            fn_part, frame.fn_spill = _codec.encode_function(call.fn_blob, self.inline_limit // 2)
        flags = proto.FLAG_STOP_ON_ERROR if call.stop_on_error and call.retry.max_attempts == 1 else 0
        if call.task_timeout is not None:
            flags |= proto.FLAG_TIMED
        if frame.typed:
            flags |= proto.FLAG_TYPED_OUTPUT
        header = proto.TASK_HEADER.pack(call.id, call.fn_id, len(fn_part), call.mode, flags)
        pushed = self.region.push(handle.slot, _dispatch.TASKS, proto.TASKS, frame.seq,
                                  [header, fn_part, *parts])
        if not pushed:
            frame.close_spills()
            self.arenas[handle.slot].release(frame.arena_region)
            call.requeue(frame.pending(range(len(frame.tasks)), True) if isolated
                         else frame.pending_from())
            return False
        self.seq = frame.seq
        if pushed == 2:
            _dispatch.ring_doorbell(handle.doorbell)
        self._remember_function(handle, call.fn_id, fn_known)
        frame.sent_ns = _dispatch.monotonic_ns()
        handle.frames.append(frame)
        handle.tasks_sent += len(frame.tasks)
        call.in_flight += len(frame.tasks)
        call.frames_sent += 1
        self._after_send(handle, call, frame)
        return True

    def _after_send(self, handle: WorkerHandle, call: Call, frame: Frame) -> None:
        quota = self.options.max_tasks_per_worker
        if quota is not None and handle.tasks_sent >= quota:
            # Recycling: the worker finishes this frame, then exits cleanly;
            # its replacement starts when it is gone.
            self._send_stop(handle)
        if self.options.on_task_start is not None:
            unstarted = call.announced_unstarted
            for index in frame.indices:
                if index in unstarted:
                    unstarted.discard(index)  # announced when first sent
                    continue
                self._callback(call, self.options.on_task_start, self._task_ref(call, index))

    def _sent_back_unstarted(self, frame: Frame) -> None:
        """A frame a worker never started goes out again: its tasks were
        announced to on_task_start already, and are not announced twice."""
        if self.options.on_task_start is not None:
            frame.call.announced_unstarted.update(frame.indices)

    def _remember_function(self, handle: WorkerHandle, fn_id: int, known: bool) -> None:
        # Mirrors the worker's cache exactly (same size, same order of use),
        # so the parent knows when the worker has evicted a function.
        known_functions = handle.known_functions
        if known:
            known_functions.move_to_end(fn_id)
            return
        known_functions[fn_id] = None
        if len(known_functions) > proto.FUNCTION_CACHE_SIZE:
            known_functions.popitem(last=False)

    def _encode_frame(self, handle: WorkerHandle, frame: Frame) -> list[Any] | None:
        """Encode a frame's tasks; tasks that cannot be pickled fail alone.

        Returns the envelope parts, or None when nothing is left to send.
        """
        payload: Any
        if type(frame.tasks) is list and not frame.typed:
            # Plain numbers (the common tiny task) pack as they are: no copy
            # of the list and no scan for large bytes first.
            packed = _dispatch.pack_numbers(frame.tasks, self.inline_limit)
            if packed is not None:
                return [packed]
        if type(frame.tasks) is range or hasattr(frame.tasks, "as_tasks"):
            payload = frame.tasks
        else:
            payload = list(frame.tasks)
            _codec.mark_large_bytes(payload)
        if frame.typed:
            window = frame.indices
            payload = (payload, frame.call.sink.out[window.start:window.stop])  # type: ignore[attr-defined]
        try:
            parts, frame.spill, frame.arena_region = _codec.encode(
                payload, self.inline_limit, self.arenas[handle.slot],
                spill_ok=len(frame.tasks) == 1)
            out_of_band = frame.arena_region[1] if frame.arena_region else (
                frame.spill.size if frame.spill else 0)
            frame.call.bytes_per_task = max(frame.call.bytes_per_task,
                                            out_of_band // max(1, len(frame.tasks)))
            return parts
        except _codec.ArenaFull as full:
            # Too much array data for the arena's free space: send fewer
            # tasks now rather than pay for a segment of their own.
            frame.call.bytes_per_task = max(frame.call.bytes_per_task,
                                            int(full.args[0]) // len(frame.tasks))
            return self._shrink_and_encode(handle, frame)
        except Exception:
            pass
        call = frame.call
        good: list[PendingTask] = []
        for offset, task in enumerate(frame.tasks):
            try:
                _codec.dumps(task, [])
            except Exception as exc:
                index = frame.indices[offset]
                error = TaskSerializationError(
                    f"{self._describe(call, index)}: its argument cannot be pickled to "
                    f"travel to a worker: {type(exc).__name__}: {exc}", direction="task",
                    index=index, key=call.key_of(index), attempts=frame.attempts_of(offset) - 1)
                error.__cause__ = exc
                self._final_failure(call, index, error)
            else:
                good.extend(frame.pending([offset]))
        self._requeue(call, good)
        self._finish_if_done(call)
        return None

    def _shrink_and_encode(self, handle: WorkerHandle, frame: Frame) -> list[Any] | None:
        keep = len(frame.tasks) // 2
        frame.call.requeue(frame.pending_from(keep))
        frame.indices = frame.indices[:keep]
        frame.tasks = slice_tasks(frame.tasks, 0, keep)
        if frame.attempts is not None:
            frame.attempts = frame.attempts[:keep]
        self._make_ready(frame.call)
        return self._encode_frame(handle, frame)

    # -- waiting ----------------------------------------------------------------------

    def _wait(self) -> None:
        active_slots = [h.slot for h in self.workers if h is not None]
        if self.region.parent_prepare_sleep(active_slots):
            return
        timeout = self._next_wakeup()
        try:
            events = self.poller.poll(None if timeout is None else math.ceil(timeout * 1000))
        finally:
            self.region.parent_awake()
        for fd, _ in events:
            if fd == self.wakeup or fd == self.result_doorbell:
                _dispatch.clear_doorbell(fd)
            else:
                handle = self.sentinels.get(fd)
                if handle is not None:
                    self._worker_exited(handle)

    # -- teardown -----------------------------------------------------------------------

    def _teardown(self) -> None:
        for handle in self.workers:
            if handle is not None:
                self._kill(handle, ("shutdown",))
        for handle in self.workers:
            if handle is None:
                continue
            handle.process.join(5)
            for frame in handle.frames:
                frame.close_spills()
            os.close(handle.doorbell)
        self.workers = [None] * self.options.workers
        self._fail_all(PoolClosedError("the pool was shut down"))
        for _, _, call, _ in self.retries:
            if not call.done:
                self._abort_call(call, PoolClosedError("the pool was shut down"))
        self.retries.clear()
        try:
            self.region.close()
        except BufferError:
            pass  # a view is still alive; the mapping goes with the object
        for arenas in self.arenas:
            arenas.close()
        for fd in (self.region_fd, self.result_doorbell):
            os.close(fd)
        with self.wakeup_lock:
            os.close(self.wakeup)
            self.wakeup = -1
        _live_engines.discard(self)
        self.stopped.set()


def _load(handle: WorkerHandle) -> tuple[int, int]:
    """Order workers by frames queued, then by how long the running frame
    has run (a worker that took its frame recently is likelier to be free
    soon than one stuck on a long task)."""
    if not handle.frames:
        return (0, 0)
    return (len(handle.frames), -handle.frames[0].sent_ns)


def _internal_error(stage: str, exc: BaseException) -> TaskError:
    error = TaskError(f"poolme_mp failed while {stage} for this call: {type(exc).__name__}: {exc}")
    error.__cause__ = exc
    return error


def _crash_stage(phase: int) -> str:
    """Where in a frame a worker died, for a crash message."""
    if phase == _dispatch.PHASE_DECODING:
        return " while unpickling its argument"
    if phase == _dispatch.PHASE_ENCODING:
        return " while pickling its result"
    return " before its task started"


def _preload_worker_in_forkserver() -> None:
    """Have the fork server import the worker module once, so a new worker
    starts in milliseconds instead of importing poolme_mp afresh.

    Only takes effect if the fork server is not running yet; the user's
    own preload list is kept.
    """
    from multiprocessing import forkserver

    server = forkserver._forkserver
    preload = list(getattr(server, "_preload_modules", ["__main__"]))
    if "poolme_mp._worker" not in preload:
        server._preload_modules = [*preload, "poolme_mp._worker"]  # type: ignore[attr-defined]


def _logging_levels() -> dict[str, int]:
    """Levels set on the parent's loggers, for workers to apply: a record
    the parent would drop is not worth sending."""
    levels = {"": logging.getLogger().level}
    for name, logger in logging.Logger.manager.loggerDict.items():
        if isinstance(logger, logging.Logger) and logger.level != logging.NOTSET:
            levels[name] = logger.level
    return levels


def _emit_worker_log(fields: dict[str, Any]) -> None:
    record = logging.makeLogRecord(fields)
    record.processName = f"poolme-worker-{fields.get('worker_slot')}"
    logger = logging.getLogger(record.name)
    if logger.isEnabledFor(record.levelno):
        logger.handle(record)


def _rebuild_exception(record: tuple[Any, ...]) -> BaseException:
    """The worker's exception if it can be rebuilt here, else a stand-in."""
    _, blob, type_name, message, text, _ = record
    if blob is not None:
        try:
            exc = cloudpickle.loads(blob)
            if isinstance(exc, BaseException):
                return exc
        except BaseException:
            pass
    return RemoteError(type_name, message, text)


_live_engines: weakref.WeakSet[Engine] = weakref.WeakSet()


def terminate_all() -> None:
    """At interpreter exit: end every pool at once, quietly."""
    engines = list(_live_engines)
    for engine in engines:
        engine.terminate()
    for engine in engines:
        if not engine.join(3.0):
            for handle in list(engine.workers):
                if handle is not None:
                    engine._kill(handle, ("exit",))
