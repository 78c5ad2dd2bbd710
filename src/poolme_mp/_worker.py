"""The worker process: take task frames, run them, send result frames.

    start:  own process group, watch the owner, map the segment, run
            on_worker_start, send READY
    loop:   peek a frame (sleep on the doorbell when there is none)
            TASKS -> decode, run, encode, push RESULTS
            STOP  -> run on_worker_stop, exit 0

Everything a task does to the process (a crash, os._exit, a signal) is
seen by the parent through the process sentinel and the control block,
which says which frame and which task were running.
"""

from __future__ import annotations

import logging
import os
import select
import signal
import sys
import threading
import time
import traceback
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from multiprocessing import reduction
from typing import Any

import cloudpickle

from . import _arena, _codec, _dispatch, _state
from . import _protocol as proto


class InheritedFd:
    """A file descriptor handed to a worker under any start method.

    Under fork the number is simply inherited.  Under spawn and forkserver
    the Process arguments are pickled while multiprocessing prepares the
    child, and DupFd arranges for the descriptor to be passed along.
    """

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def __reduce__(self) -> Any:
        return _rebuild_inherited_fd, (reduction.DupFd(self.fd),)


def _rebuild_inherited_fd(dup: Any) -> InheritedFd:
    return InheritedFd(dup.detach())


@dataclass
class WorkerConfig:
    """Everything a worker needs, picklable for spawn and forkserver."""

    slot: int
    n_slots: int
    ring_bytes: int
    region: InheritedFd
    task_arena: InheritedFd
    result_arena: InheritedFd
    arena_bytes: int
    doorbell: InheritedFd
    result_doorbell: InheritedFd
    owner_pid: int
    on_worker_start: bytes | None = None
    on_worker_stop: bytes | None = None
    log_levels: dict[str, int] = field(default_factory=dict)


def cut_text(text: str, limit: int) -> str:
    """text, or its start and end around a note of how much was cut."""
    if len(text) <= limit:
        return text
    half = max(limit // 2 - 40, 0)
    return f"{text[:half]}\n... ({len(text) - 2 * half} characters cut) ...\n{text[-half:] if half else ''}"


def error_record(offset: int, exc: BaseException, direction: str | None = None) -> tuple[Any, ...]:
    """Describe an exception so that the parent can rebuild or stand in for it.

    direction says where it happened when not in the task itself: "task"
    (decoding the arguments), "result" (pickling the result) or "output"
    (the result does not fit a dtype= / out= array).
    """
    try:
        blob: bytes | None = cloudpickle.dumps(exc, protocol=5)
    except BaseException:
        blob = None
    text = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    kind = type(exc)
    try:
        message = str(exc)
    except BaseException:
        message = "<str() of the exception failed>"
    return (offset, blob, f"{kind.__module__}.{kind.__qualname__}", message, text, direction)


class _ResultArena:
    """The worker's result arena as an encoder's ArenaSpace."""

    def __init__(self, view: memoryview, ring: _arena.Ring) -> None:
        self.view = view
        self.ring = ring
        self.seq = 0

    def take(self, nbytes: int) -> int | None:
        return self.ring.alloc(nbytes, self.seq)


def _released(slices: list[Any]) -> bool:
    """True once nothing uses these task arena slices any more; False
    while a task keeps an array (or other view) built on one of them."""
    return not _dispatch.arena_slices_in_use(slices)


class _FunctionLoadFailure:
    """Stands in the function cache for a function that failed to unpickle,
    so every frame naming it fails the same way."""

    def __init__(self, exc: BaseException) -> None:
        self.exc = exc


class Worker:
    """State of one worker process around its frame loop."""

    def __init__(self, config: WorkerConfig) -> None:
        self.config = config
        self.slot = config.slot
        self.region = _dispatch.SharedRegion(config.region.fd, config.n_slots, config.ring_bytes, False)
        self.doorbell = config.doorbell.fd
        self.result_doorbell = config.result_doorbell.fd
        self.task_arena = _arena.map_arena(config.task_arena.fd, config.arena_bytes, writable=False)
        self.result_arena = _ResultArena(
            _arena.map_arena(config.result_arena.fd, config.arena_bytes, writable=True),
            _arena.Ring(config.arena_bytes))
        # Task arena regions whose views a task kept: (start, views).
        self.pinned: list[tuple[int, list[Any]]] = []
        self.functions: OrderedDict[int, Any] = OrderedDict()
        # Result spills waiting for the parent to map them: (seq, spill).
        self.unacked_spills: deque[tuple[int, _codec.Spill]] = deque()
        # The claim word's value as this worker last left it.
        self.claimed = 0

    # -- sending --------------------------------------------------------

    def push(self, kind: int, seq: int, parts: list[Any]) -> None:
        """Push a result-ring frame, waiting for room if the ring is full."""
        pause = 0.00005
        while True:
            pushed = self.region.push(self.slot, _dispatch.RESULTS, kind, seq, parts)
            if pushed:
                if pushed == 2:
                    _dispatch.ring_doorbell(self.result_doorbell)
                return
            # The parent drains result rings continuously, so a full ring
            # is brief; back off instead of adding a second doorbell.
            time.sleep(pause)
            pause = min(pause * 2, 0.002)

    def control_frame_limit(self) -> int:
        """Most bytes a log record or hook failure may take in the ring."""
        return self.region.max_payload() // 4

    def push_failure(self, kind: int, failure: BaseException) -> None:
        """Report a hook failure, its text cut short if it would not fit."""
        record = error_record(0, failure)
        blob = _codec.dumps(record, [])
        limit = self.control_frame_limit()
        if len(blob) > limit:
            offset, _, name, message, text, direction = record
            record = (offset, None, name, cut_text(message, limit // 4), cut_text(text, limit // 4),
                      direction)
            blob = _codec.dumps(record, [])
        self.push(kind, 0, [blob])

    def release_acked_spills(self) -> None:
        acked = self.region.spill_ack(self.slot)
        self.result_arena.ring.release_upto(acked)
        while self.unacked_spills and self.unacked_spills[0][0] <= acked:
            self.unacked_spills.popleft()[1].close()

    # -- the loop -----------------------------------------------------------

    def serve(self) -> None:
        region, slot = self.region, self.slot
        while True:
            frame = region.peek(slot, _dispatch.TASKS)
            if frame is None:
                self.release_acked_spills()
                self.sleep()
                continue
            kind, seq, payload, frame_bytes = frame
            if kind == proto.STOP:
                region.consume(slot, _dispatch.TASKS, frame_bytes)
                return
            region.set_phase(slot, _dispatch.PHASE_DECODING, seq)
            header = proto.TASK_HEADER.unpack_from(payload, 0)
            call_id, fn_id, fn_len, mode, flags = header
            start = proto.TASK_HEADER.size
            fn = self.function(fn_id, payload[start:start + fn_len] if fn_len else None)
            if not region.claim(slot, self.claimed, seq):
                # The parent took this frame back for an idle worker.
                self.claimed = -seq
                del payload
                region.consume(slot, _dispatch.TASKS, frame_bytes)
                continue
            self.claimed = seq
            envelope = payload[start + fn_len:]
            arena_region = _codec.arena_region(envelope)
            in_place: list[Any] = []
            try:
                tasks = _codec.decode(envelope, False, self.task_arena, in_place)
                decode_error = None
            except BaseException as exc:
                tasks, decode_error = None, exc
            del payload, envelope
            # Decoding copied what it needs, so the ring space can go back
            # to the parent before the tasks run.
            region.consume(slot, _dispatch.TASKS, frame_bytes)
            self.result_arena.seq = seq
            self.pending_pins = self.check_pins(arena_region, in_place)
            box = [tasks]
            del tasks
            self.run_frame(seq, call_id, fn, mode, flags, box, decode_error)

    def check_pins(self, arena_region: tuple[int, int] | None,
                   in_place: list[Any]) -> Any:
        """Return a callable that, after the frame, reports which task arena
        regions are still viewed by something a task kept."""
        def report() -> tuple[list[int], list[int]]:
            pinned: list[int] = []
            if arena_region is not None and not _released(in_place):
                self.pinned.append((arena_region[0], in_place))
                pinned.append(arena_region[0])
            unpinned = [start for start, views in self.pinned
                        if start not in pinned and _released(views)]
            if unpinned:
                self.pinned = [(s, v) for s, v in self.pinned if s not in unpinned]
            return pinned, unpinned
        return report

    def sleep(self) -> None:
        if self.region.worker_prepare_sleep(self.slot):
            return
        try:
            # The timeout is a safety net only; every push of a frame to a
            # sleeping worker rings the doorbell.
            ready, _, _ = select.select([self.doorbell], [], [], 1.0)
            if ready:
                _dispatch.clear_doorbell(self.doorbell)
        finally:
            self.region.worker_awake(self.slot)

    def function(self, fn_id: int, blob: Any) -> Any:
        """The function of fn_id, unpickling it when it comes with the frame."""
        if blob is not None:
            try:
                fn: Any = _codec.decode_function(blob)
            except BaseException as exc:
                fn = _FunctionLoadFailure(exc)
            self.functions[fn_id] = fn
            if len(self.functions) > proto.FUNCTION_CACHE_SIZE:
                self.functions.popitem(last=False)
            return fn
        self.functions.move_to_end(fn_id)
        return self.functions[fn_id]

    def run_frame(self, seq: int, call_id: int, fn: Any, mode: int, flags: int,
                  box: list[Any], decode_error: BaseException | None) -> None:
        # The tasks come in a box so that no caller's variable keeps them
        # (and the arena views they hold) alive after they ran.
        region, slot = self.region, self.slot
        tasks = box.pop()
        if isinstance(fn, _FunctionLoadFailure):
            self.send_results(seq, call_id, 0, -1, proto.STATUS_FUNCTION_FAILED, None,
                              [error_record(0, fn.exc, "task")])
            return
        if decode_error is not None or tasks is None:
            error = decode_error if decode_error is not None else ValueError("empty frame")
            self.send_results(seq, call_id, 0, -1, proto.STATUS_DECODE_FAILED, None,
                              [error_record(0, error, "task")])
            return
        output = None
        if flags & proto.FLAG_TYPED_OUTPUT:
            tasks, output = tasks
            if mode == _dispatch.MODE_MAP and self.run_typed(seq, call_id, fn, flags, tasks, output):
                return
        if type(tasks) is range:
            tasks = list(tasks)
        elif not isinstance(tasks, list):
            tasks = tasks.as_tasks()  # a block of rows of a shared array
        region.set_phase(slot, _dispatch.PHASE_RUNNING, seq)
        stop_on_error = bool(flags & proto.FLAG_STOP_ON_ERROR)
        timed = bool(flags & proto.FLAG_TIMED)
        results, failures, stopped_at, elapsed = region.run_tasks(
            slot, fn, mode, tasks, call_id, stop_on_error, timed)
        del tasks
        region.set_phase(slot, _dispatch.PHASE_ENCODING, seq)
        errors = [error_record(offset, exc) for offset, exc in failures]
        del failures
        if output is not None:
            results = write_output(output, results, errors, stopped_at)
            del output
        box.append(results)
        del results
        self.send_results(seq, call_id, elapsed, stopped_at, proto.STATUS_OK, box, errors)
        region.set_phase(slot, _dispatch.PHASE_IDLE, seq)
        flush_standard_streams()

    def run_typed(self, seq: int, call_id: int, fn: Any, flags: int, tasks: Any,
                  output: Any) -> bool:
        """Numbers in, numbers out: run the frame on the C fast path.
        False if the arrays are not of a kind it serves."""
        source = getattr(tasks, "rows", None)
        if source is None or not _dispatch.typed_1d_supported(source, output):
            return False
        region, slot = self.region, self.slot
        count = len(source)
        region.set_phase(slot, _dispatch.PHASE_RUNNING, seq)
        failures, stopped_at, elapsed = _dispatch.run_typed_1d(
            region, slot, fn, source, output, call_id, bool(flags & proto.FLAG_STOP_ON_ERROR))
        del source, output, tasks
        region.set_phase(slot, _dispatch.PHASE_ENCODING, seq)
        errors = [error_record(offset, exc, "output" if misfit else None)
                  for offset, exc, misfit in failures]
        del failures
        # The results are in the shared output; placeholders travel back.
        box: list[Any] = [[None] * count]
        self.send_results(seq, call_id, elapsed, stopped_at, proto.STATUS_OK, box, errors)
        region.set_phase(slot, _dispatch.PHASE_IDLE, seq)
        return True

    def send_results(self, seq: int, call_id: int, elapsed: int, stopped_at: int, status: int,
                     box: list[Any] | None, errors: list[tuple[Any, ...]]) -> None:
        inline_limit = self.region.max_payload() // 2
        spill = None
        # Free the arena space of results the parent has taken, first.
        self.release_acked_spills()
        if box is None:
            parts: list[Any] = []
        else:
            parts, spill = self.encode_results(box.pop(), errors, inline_limit)
        # Results are encoded and dropped: any arena view still in use now
        # is held by something a task kept.
        pinned, unpinned = self.pending_pins()
        envelope_len = sum(memoryview(p).nbytes for p in parts)
        # Error records travel as an envelope too: an exception with a huge
        # message goes to a spill segment instead of overflowing the ring.
        room = self.region.max_payload() - proto.RESULT_HEADER.size - envelope_len
        error_parts, error_spill, _ = _codec.encode((errors, pinned, unpinned), room // 2)
        header = proto.RESULT_HEADER.pack(call_id, elapsed, stopped_at, status, envelope_len)
        self.push(proto.RESULTS, seq, [header, *parts, *error_parts])
        for sent in (spill, error_spill):
            if sent is not None:
                self.unacked_spills.append((seq, sent))

    def encode_results(self, results: list[Any], errors: list[tuple[Any, ...]],
                       inline_limit: int) -> tuple[list[Any], _codec.Spill | None]:
        """Encode the results; a result that cannot be pickled becomes an
        error of its own task and the others still go through."""
        packed = _dispatch.pack_numbers(results, inline_limit)
        if packed is not None:
            return [packed], None
        _codec.mark_large_bytes(results)
        try:
            parts, spill, _ = _codec.encode(results, inline_limit, self.result_arena)
            return parts, spill
        except BaseException:
            pass
        failed = {record[0] for record in errors}
        for offset, result in enumerate(results):
            if offset in failed:
                continue
            try:
                _codec.dumps(result, [])
            except BaseException as exc:
                results[offset] = None
                errors.append(error_record(offset, exc, "result"))
        errors.sort(key=lambda record: record[0])
        parts, spill, _ = _codec.encode(results, inline_limit, self.result_arena)
        return parts, spill

    def run_hook(self, blob: bytes | None) -> BaseException | None:
        if blob is None:
            return None
        try:
            cloudpickle.loads(blob)()
        except BaseException as exc:
            return exc
        return None


def write_output(output: Any, results: list[Any], errors: list[tuple[Any, ...]],
                 stopped_at: int) -> list[Any]:
    """Store a frame's results in the shared output array; a result that
    does not fit (wrong shape or type) becomes an error of its task.
    Returns the placeholder list that travels back instead."""
    ran = len(results) if stopped_at < 0 else stopped_at
    failed = {record[0] for record in errors}
    if not failed and ran == len(results):
        try:
            output[:ran] = results
            return [None] * len(results)
        except Exception:
            pass
    for offset in range(ran):
        if offset in failed:
            continue
        try:
            output[offset] = results[offset]
        except Exception as exc:
            errors.append(error_record(offset, exc, "output"))
    errors.sort(key=lambda record: record[0])
    return [None] * len(results)


def flush_standard_streams() -> None:
    for stream in (sys.stdout, sys.stderr):
        try:
            if stream is not None:
                stream.flush()
        except Exception:
            pass


class _ForwardToParent(logging.Handler):
    """Sends each log record to the parent, whose handlers emit it."""

    def __init__(self, worker: Worker) -> None:
        super().__init__()
        self.worker = worker

    def emit(self, record: logging.LogRecord) -> None:
        try:
            fields = dict(record.__dict__)
            fields["msg"] = record.getMessage()
            fields["args"] = None
            if record.exc_info:
                fields["exc_text"] = logging.Formatter().formatException(record.exc_info)
            fields["exc_info"] = None
            fields["worker_slot"] = self.worker.slot
            fields["worker_pid"] = os.getpid()
            blob = _codec.dumps(fields, [])
            limit = self.worker.control_frame_limit()
            if len(blob) > limit:
                fields["msg"] = cut_text(fields["msg"], limit // 4)
                fields["exc_text"] = cut_text(fields.get("exc_text") or "", limit // 4) or None
                blob = _codec.dumps(fields, [])
            self.worker.push(proto.LOG, 0, [blob])
        except Exception:
            self.handleError(record)


def _configure_logging(worker: Worker, levels: dict[str, int]) -> None:
    # Handlers inherited through fork would emit in the worker as well as
    # in the parent; the parent's handlers are the only ones that count.
    root = logging.getLogger()
    for logger in [root, *logging.Logger.manager.loggerDict.values()]:
        if isinstance(logger, logging.Logger):
            logger.handlers.clear()
    for name, level in levels.items():
        logging.getLogger(name or None).setLevel(level)
    root.addHandler(_ForwardToParent(worker))


def _watch_owner(owner_pid: int) -> None:
    """Kill this worker's process group as soon as the pool's owner dies,
    even in the middle of a task, so that no worker outlives its pool."""
    try:
        pidfd = os.pidfd_open(owner_pid)
    except OSError:
        os.killpg(0, signal.SIGKILL)
        return

    def wait_and_kill() -> None:
        select.select([pidfd], [], [])
        os.killpg(0, signal.SIGKILL)

    threading.Thread(target=wait_and_kill, name="poolme-owner-watch", daemon=True).start()


def _keep_large_allocations_in_heap() -> None:
    """Let glibc serve large blocks (up to 32 MiB) from the heap.

    By default each large block, such as the array a task returns, gets
    fresh pages from mmap and gives them back on free, so every result
    pays page faults again; kept in the heap, the pages are reused.
    """
    try:
        import ctypes

        libc = ctypes.CDLL(None)
        m_trim_threshold, m_mmap_threshold = -1, -3
        libc.mallopt(m_mmap_threshold, 32 * 1024 * 1024)
        libc.mallopt(m_trim_threshold, 256 * 1024 * 1024)
    except (OSError, AttributeError):
        pass  # not glibc: keep the allocator's defaults


def _line_buffer_standard_streams() -> None:
    # Lines printed just before a crash must reach the terminal, so output
    # is flushed at every newline rather than when a block fills.
    for stream in (sys.stdout, sys.stderr):
        reconfigure = getattr(stream, "reconfigure", None)
        if reconfigure is not None:
            try:
                reconfigure(line_buffering=True)
            except Exception:
                pass


def worker_main(config: WorkerConfig) -> None:
    """Entry point of a worker process."""
    # A group of its own lets the pool kill a worker together with every
    # process its task started, and keeps a terminal's Ctrl-C (sent to the
    # foreground group) for the parent to handle.
    os.setpgid(0, 0)
    _state.in_worker_process = True
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _watch_owner(config.owner_pid)
    _line_buffer_standard_streams()
    _keep_large_allocations_in_heap()
    worker = Worker(config)
    worker.region.set_pid(worker.slot, os.getpid())
    _configure_logging(worker, config.log_levels)
    failure = worker.run_hook(config.on_worker_start)
    if failure is not None:
        worker.push_failure(proto.START_FAILED, failure)
        flush_standard_streams()
        os._exit(3)
    worker.push(proto.READY, 0, [proto.PID.pack(os.getpid())])
    worker.serve()
    failure = worker.run_hook(config.on_worker_stop)
    if failure is not None:
        worker.push_failure(proto.HOOK_FAILED, failure)
    flush_standard_streams()
    # Give the parent time to map any spilled results still unacknowledged.
    deadline = time.monotonic() + 5
    while worker.unacked_spills and time.monotonic() < deadline:
        worker.release_acked_spills()
        time.sleep(0.001)
    logging.getLogger().handlers.clear()
    os._exit(0)
