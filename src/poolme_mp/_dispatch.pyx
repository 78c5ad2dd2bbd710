# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""The dispatch core: shared-memory rings between the pool and its workers.

    parent (engine thread)                      worker i
    ----------------------                      --------
    push(slot i, TASKS, frame) ══ task ring ══► peek / run_tasks / consume
    peek / consume  ◄══════════ result ring ═══ push(slot i, RESULTS, frame)
    eventfd doorbell i ────────────────────────► woken only if it sleeps
    ◄────────────── shared result doorbell ──── rung only if the parent sleeps

One memfd-backed segment per pool holds everything below.  memfd is used
instead of a named /dev/shm file so that nothing can outlive the processes
that map it: the kernel frees the pages when the last mapping and the last
descriptor go, whoever dies first and however.

Layout (all offsets in bytes, every hot word on its own 64-byte line so the
producer and the consumer of a ring never write the same cache line):

    0      header         HEADER_BYTES
             +0   magic, +8 version, +16 slot count, +24 ring bytes,
             +32  slot stride
             +64  parent_sleeping: the parent is about to block on the
                  shared result doorbell
    4096   cancel table   CANCEL_SLOTS x int64; entry (id % CANCEL_SLOTS)
                          holds the id of a call whose unstarted tasks
                          must be skipped
    12288  slot 0         SLOT_STRIDE = CONTROL_BYTES + 2 x ring bytes
           slot 1 ...

A slot belongs to one worker at a time:

    +0     task tail      written by the parent (producer)
    +64    task head      written by the worker (consumer)
    +128   result tail    written by the worker (producer)
    +192   result head    written by the parent (consumer)
    +256   worker_sleeping: the worker is about to block on its doorbell
    +320   pid            +328 phase        +336 running offset
    +344   task started (CLOCK_MONOTONIC ns) +352 frame seq being run
    +360   result spill ack (last result seq the parent has decoded)
    +376   claim: seq of the frame the worker last took (it swaps in each
           frame's seq before running it), or -seq of a queued frame the
           parent took back.  Both sides change it only by compare-and-
           swap, so a frame is either run or taken back, never both.
    +512   task ring data, then result ring data

Heads and tails are byte counters that only grow; used space is
tail - head.  A frame is a 16-byte header (payload length u32, kind u32,
sequence u64) and its payload, padded to 8 bytes.  Frames may wrap past the
end of the ring; a wrapped frame is reassembled into one bytes object on
read, a contiguous one is read in place.

Because each ring has exactly one producer and one consumer, no lock is
ever taken: a worker that dies holds nothing, and the parent knows from
the head/tail pair exactly which frames it had not yet taken.
"""

from types import GenericAlias

from libc.stdint cimport int64_t, uint32_t, uint64_t
from libc.string cimport memcpy, memset, strerror
from cpython.float cimport PyFloat_AS_DOUBLE
from libc.errno cimport errno, EAGAIN
from posix.unistd cimport read, write
from cpython.bytes cimport PyBytes_FromStringAndSize, PyBytes_AS_STRING
from cpython.buffer cimport (
    PyObject_GetBuffer, PyBuffer_Release, PyBUF_SIMPLE, PyBUF_WRITABLE, PyBUF_FORMAT, PyBUF_ND,
    PyBUF_STRIDES,
)
from cpython.list cimport PyList_GET_ITEM
from cpython.object cimport PyObject

cdef extern from "_atomics.h":
    uint64_t pm_load_acquire(const volatile uint64_t *p) nogil
    void pm_store_release(volatile uint64_t *p, uint64_t v) nogil
    int64_t pm_load_i64(const volatile int64_t *p) nogil
    void pm_store_i64(volatile int64_t *p, int64_t v) nogil
    void pm_full_fence() nogil
    int pm_cas_i64(volatile int64_t *p, int64_t expected, int64_t desired) nogil
    int64_t pm_monotonic_ns() nogil

import mmap as _mmap
import os as _os

cdef enum:
    _HEADER_BYTES = 4096
    _CANCEL_SLOTS = 1024
    _CANCEL_OFFSET = _HEADER_BYTES
    _SLOTS_OFFSET = _CANCEL_OFFSET + _CANCEL_SLOTS * 8
    _CONTROL_BYTES = 512
    _FRAME_HEADER_BYTES = 16

cdef uint64_t _MAGIC = 0x31504D4C4F4F50      # "POOLMP1" little-endian

MAGIC = _MAGIC
LAYOUT_VERSION = 1
HEADER_BYTES = _HEADER_BYTES
CANCEL_SLOTS = _CANCEL_SLOTS
CANCEL_OFFSET = _CANCEL_OFFSET
SLOTS_OFFSET = _SLOTS_OFFSET
CONTROL_BYTES = _CONTROL_BYTES
FRAME_HEADER_BYTES = _FRAME_HEADER_BYTES

# Ring selectors.
TASKS = 0
RESULTS = 1

# Worker phases, kept in the control block so that the parent can tell,
# after a crash, whether the worker died reading a frame, running a task or
# writing results.
PHASE_IDLE = 0
PHASE_DECODING = 1
PHASE_RUNNING = 2
PHASE_ENCODING = 3

# Invocation modes of run_tasks.
MODE_MAP = 0      # fn(task)
MODE_STAR = 1     # fn(*task)
MODE_APPLY = 2    # fn(*task[0], **task[1])

cdef enum:
    _OFF_PARENT_SLEEPING = 64
    _OFF_TASK_TAIL = 0
    _OFF_TASK_HEAD = 64
    _OFF_RESULT_TAIL = 128
    _OFF_RESULT_HEAD = 192
    _OFF_WORKER_SLEEPING = 256
    _OFF_PID = 320
    _OFF_PHASE = 328
    _OFF_RUNNING = 336
    _OFF_STARTED = 344
    _OFF_FRAME_SEQ = 352
    _OFF_SPILL_ACK = 360
    _OFF_CLAIM = 376


def region_bytes(int n_slots, uint64_t ring_bytes):
    """Size of a segment with n_slots slots of two rings of ring_bytes."""
    return _SLOTS_OFFSET + n_slots * (_CONTROL_BYTES + 2 * ring_bytes)


def monotonic_ns():
    """CLOCK_MONOTONIC in nanoseconds, the clock the control blocks use."""
    return pm_monotonic_ns()


# Doorbells are rung and cleared while holding the GIL.  An eventfd write
# or a non-blocking read never waits, and os.eventfd_write / eventfd_read
# release the GIL around the call: with a second busy thread in the process
# (a stream's consumer) the caller then waits up to the interpreter's
# switch interval (5 ms) to get it back, which stalls the whole pool.

def ring_doorbell(int fd):
    """Add one to an eventfd's counter without releasing the GIL."""
    cdef uint64_t one = 1
    if write(fd, &one, 8) != 8 and errno != EAGAIN:
        raise OSError(errno, strerror(errno))


def clear_doorbell(int fd):
    """Reset a non-blocking eventfd to zero without releasing the GIL."""
    cdef uint64_t value
    if read(fd, &value, 8) != 8 and errno != EAGAIN:
        raise OSError(errno, strerror(errno))


cdef inline uint64_t _pad8(uint64_t n) nogil:
    return (n + 7) & ~(<uint64_t>7)


cdef class SharedRegion:
    """A mapped pool segment with typed access to its rings and blocks.

    The parent creates it (create=True writes the header); workers map the
    same memfd by descriptor.  All methods are safe to call from the one
    thread of each side that owns the given end of a ring.
    """

    cdef object _map
    cdef Py_buffer _view
    cdef bint _has_view
    cdef char *base
    cdef readonly int n_slots
    cdef readonly uint64_t ring_bytes
    cdef uint64_t slot_stride
    cdef uint64_t ring_mask

    def __cinit__(self):
        self._has_view = False

    def __init__(self, int fd, int n_slots, uint64_t ring_bytes, bint create):
        if ring_bytes < 4096 or (ring_bytes & (ring_bytes - 1)) != 0:
            raise ValueError(
                f"ring_bytes must be a power of two of at least 4096, got {ring_bytes}")
        size = region_bytes(n_slots, ring_bytes)
        if create:
            _os.ftruncate(fd, size)
        self._map = _mmap.mmap(fd, size, _mmap.MAP_SHARED,
                               _mmap.PROT_READ | _mmap.PROT_WRITE)
        PyObject_GetBuffer(self._map, &self._view, PyBUF_SIMPLE | PyBUF_WRITABLE)
        self._has_view = True
        self.base = <char *>self._view.buf
        self.n_slots = n_slots
        self.ring_bytes = ring_bytes
        self.ring_mask = ring_bytes - 1
        self.slot_stride = _CONTROL_BYTES + 2 * ring_bytes
        if create:
            (<uint64_t *>(self.base + 0))[0] = _MAGIC
            (<uint64_t *>(self.base + 8))[0] = LAYOUT_VERSION
            (<uint64_t *>(self.base + 16))[0] = n_slots
            (<uint64_t *>(self.base + 24))[0] = ring_bytes
            (<uint64_t *>(self.base + 32))[0] = self.slot_stride
        elif (<uint64_t *>(self.base + 0))[0] != _MAGIC:
            raise RuntimeError("shared segment has no poolme_mp header")

    def close(self):
        """Unmap the segment; safe to call twice."""
        if self._has_view:
            PyBuffer_Release(&self._view)
            self._has_view = False
            self.base = NULL
        if self._map is not None:
            self._map.close()
            self._map = None

    def __dealloc__(self):
        if self._has_view:
            PyBuffer_Release(&self._view)

    # -- addressing -------------------------------------------------------

    cdef inline char *_slot(self, int slot) except NULL:
        if self.base == NULL:
            raise RuntimeError("shared segment is closed")
        if slot < 0 or slot >= self.n_slots:
            raise IndexError(f"slot {slot} out of range")
        return self.base + _SLOTS_OFFSET + slot * self.slot_stride

    cdef inline volatile uint64_t *_word(self, int slot, int off) except NULL:
        return <volatile uint64_t *>(self._slot(slot) + off)

    cdef inline volatile int64_t *_i64(self, int slot, int off) except NULL:
        return <volatile int64_t *>(self._slot(slot) + off)

    cdef inline char *_ring_data(self, int slot, int ring) except NULL:
        return self._slot(slot) + _CONTROL_BYTES + ring * self.ring_bytes

    cdef inline int _tail_off(self, int ring):
        return _OFF_TASK_TAIL if ring == TASKS else _OFF_RESULT_TAIL

    cdef inline int _head_off(self, int ring):
        return _OFF_TASK_HEAD if ring == TASKS else _OFF_RESULT_HEAD

    # -- byte copies with wrap-around --------------------------------------

    cdef void _copy_in(self, char *data, uint64_t pos, const char *src, uint64_t n):
        cdef uint64_t start = pos & self.ring_mask
        cdef uint64_t first = self.ring_bytes - start
        if n <= first:
            memcpy(data + start, src, n)
        else:
            memcpy(data + start, src, first)
            memcpy(data, src + first, n - first)

    cdef void _copy_out(self, char *data, uint64_t pos, char *dst, uint64_t n):
        cdef uint64_t start = pos & self.ring_mask
        cdef uint64_t first = self.ring_bytes - start
        if n <= first:
            memcpy(dst, data + start, n)
        else:
            memcpy(dst, data + start, first)
            memcpy(dst + first, data, n - first)

    # -- producer side -----------------------------------------------------

    def max_payload(self):
        """Largest payload one frame may carry in this segment's rings."""
        return self.ring_bytes - _FRAME_HEADER_BYTES

    def push(self, int slot, int ring, uint32_t kind, uint64_t seq, parts):
        """Append one frame made of the concatenated buffers in parts.

        Returns 0 if the ring has no room (nothing written), 1 if the frame
        was published, 2 if it was published and the consumer is asleep, so
        the caller must ring its doorbell.
        """
        cdef Py_buffer buf
        cdef uint64_t payload = 0
        cdef uint64_t tail, head, pos, need
        cdef char *data = self._ring_data(slot, ring)
        cdef uint32_t header[4]
        views = [memoryview(p) for p in parts]
        for v in views:
            payload += v.nbytes
        need = _FRAME_HEADER_BYTES + _pad8(payload)
        if need > self.ring_bytes:
            raise ValueError(
                f"frame of {payload} bytes exceeds the ring of {self.ring_bytes} bytes")
        tail = self._word(slot, self._tail_off(ring))[0]
        head = pm_load_acquire(self._word(slot, self._head_off(ring)))
        if need > self.ring_bytes - (tail - head):
            return 0
        header[0] = <uint32_t>payload
        header[1] = kind
        (<uint64_t *>&header[2])[0] = seq
        self._copy_in(data, tail, <const char *>header, _FRAME_HEADER_BYTES)
        pos = tail + _FRAME_HEADER_BYTES
        for v in views:
            PyObject_GetBuffer(v, &buf, PyBUF_SIMPLE)
            try:
                self._copy_in(data, pos, <const char *>buf.buf, <uint64_t>buf.len)
                pos += <uint64_t>buf.len
            finally:
                PyBuffer_Release(&buf)
        pm_store_release(self._word(slot, self._tail_off(ring)), tail + need)
        # Doorbell handshake, producer half: publish, fence, then look at
        # the consumer's flag.  The consumer sets its flag, fences, then
        # looks at the tail, so at least one side sees the other.
        pm_full_fence()
        if ring == TASKS:
            if pm_load_i64(self._i64(slot, _OFF_WORKER_SLEEPING)):
                return 2
        elif pm_load_i64(<volatile int64_t *>(self.base + _OFF_PARENT_SLEEPING)):
            return 2
        return 1

    # -- consumer side -----------------------------------------------------

    def has_frame(self, int slot, int ring):
        cdef uint64_t head = self._word(slot, self._head_off(ring))[0]
        return pm_load_acquire(self._word(slot, self._tail_off(ring))) != head

    def peek(self, int slot, int ring):
        """The oldest unread frame as (kind, seq, payload, frame_bytes).

        payload is a memoryview into the ring when the frame is contiguous
        (valid only until consume) or a bytes copy when it wraps.  Returns
        None when the ring is empty.
        """
        cdef char *data = self._ring_data(slot, ring)
        cdef uint64_t head = self._word(slot, self._head_off(ring))[0]
        cdef uint64_t tail = pm_load_acquire(self._word(slot, self._tail_off(ring)))
        cdef uint32_t header[4]
        cdef uint64_t start, length
        if tail == head:
            return None
        self._copy_out(data, head, <char *>header, _FRAME_HEADER_BYTES)
        length = header[0]
        start = (head + _FRAME_HEADER_BYTES) & self.ring_mask
        frame_bytes = _FRAME_HEADER_BYTES + _pad8(length)
        if start + length <= self.ring_bytes:
            offset = _SLOTS_OFFSET + slot * self.slot_stride + _CONTROL_BYTES \
                + ring * self.ring_bytes + start
            payload = memoryview(self._map)[offset:offset + length]
        else:
            payload = PyBytes_FromStringAndSize(NULL, length)
            self._copy_out(data, head + _FRAME_HEADER_BYTES,
                           PyBytes_AS_STRING(payload), length)
        return header[1], (<uint64_t *>&header[2])[0], payload, frame_bytes

    def consume(self, int slot, int ring, uint64_t frame_bytes):
        """Release the oldest frame's space to the producer."""
        cdef volatile uint64_t *head = self._word(slot, self._head_off(ring))
        pm_store_release(head, head[0] + frame_bytes)

    def reset_slot(self, int slot):
        """Empty both rings and clear the control block for a new worker.

        Only the parent calls this, and only once the slot's old worker has
        exited, so no one else can be touching the slot.
        """
        cdef char *p = self._slot(slot)
        cdef int i
        for i in range(_CONTROL_BYTES // 8):
            (<int64_t *>p)[i] = 0
        pm_store_i64(self._i64(slot, _OFF_RUNNING), -1)
        pm_full_fence()

    # -- sleeping and waking -------------------------------------------------

    def worker_prepare_sleep(self, int slot):
        """Announce that the worker will block; True if a frame is waiting
        (the worker must then not block)."""
        pm_store_i64(self._i64(slot, _OFF_WORKER_SLEEPING), 1)
        pm_full_fence()
        if self.has_frame(slot, TASKS):
            pm_store_i64(self._i64(slot, _OFF_WORKER_SLEEPING), 0)
            return True
        return False

    def worker_awake(self, int slot):
        pm_store_i64(self._i64(slot, _OFF_WORKER_SLEEPING), 0)

    def parent_prepare_sleep(self, active_slots):
        """Announce that the parent will block; True if some result ring of
        active_slots holds a frame (the parent must then not block)."""
        cdef volatile int64_t *flag = <volatile int64_t *>(self.base + _OFF_PARENT_SLEEPING)
        pm_store_i64(flag, 1)
        pm_full_fence()
        for slot in active_slots:
            if self.has_frame(slot, RESULTS):
                pm_store_i64(flag, 0)
                return True
        return False

    def parent_awake(self):
        pm_store_i64(<volatile int64_t *>(self.base + _OFF_PARENT_SLEEPING), 0)

    # -- cancellation --------------------------------------------------------

    def cancel(self, int64_t call_id):
        """Mark a call so that workers skip its tasks that have not started."""
        cdef volatile int64_t *table = <volatile int64_t *>(self.base + _CANCEL_OFFSET)
        pm_store_i64(&table[call_id % _CANCEL_SLOTS], call_id)

    cdef inline bint _cancelled(self, int64_t call_id) noexcept:
        cdef volatile int64_t *table = <volatile int64_t *>(self.base + _CANCEL_OFFSET)
        return pm_load_i64(&table[call_id % _CANCEL_SLOTS]) == call_id

    # -- control block fields ------------------------------------------------

    def set_pid(self, int slot, int64_t pid):
        pm_store_i64(self._i64(slot, _OFF_PID), pid)

    def set_phase(self, int slot, int64_t phase, int64_t frame_seq):
        pm_store_i64(self._i64(slot, _OFF_FRAME_SEQ), frame_seq)
        pm_store_i64(self._i64(slot, _OFF_PHASE), phase)

    def progress(self, int slot):
        """(phase, frame seq, running offset, started ns) of a worker."""
        return (pm_load_i64(self._i64(slot, _OFF_PHASE)),
                pm_load_i64(self._i64(slot, _OFF_FRAME_SEQ)),
                pm_load_i64(self._i64(slot, _OFF_RUNNING)),
                pm_load_i64(self._i64(slot, _OFF_STARTED)))

    def set_spill_ack(self, int slot, int64_t seq):
        pm_store_i64(self._i64(slot, _OFF_SPILL_ACK), seq)

    def spill_ack(self, int slot):
        return pm_load_i64(self._i64(slot, _OFF_SPILL_ACK))

    def claim(self, int slot, int64_t previous, int64_t seq):
        """Worker: take frame seq to run it.  previous is the claim value
        the worker left last time.  False if the parent took it back."""
        return bool(pm_cas_i64(self._i64(slot, _OFF_CLAIM), previous, seq))

    def take_back(self, int slot, int64_t running_seq, int64_t seq):
        """Parent: take back queued frame seq, which works only while the
        worker is still on running_seq.  True if taken back."""
        return bool(pm_cas_i64(self._i64(slot, _OFF_CLAIM), running_seq, -seq))

    # -- the worker's inner loop -----------------------------------------------

    def run_tasks(self, int slot, fn, int mode, list tasks, int64_t call_id,
                  bint stop_on_error, bint timed=True):
        """Run fn over tasks in order, in the calling worker.

        Returns (results, errors, stopped_at, elapsed_ns).  results has one
        entry per task (None where a task failed or did not run); errors is
        a list of (offset, exception); stopped_at is the offset of the first
        task that did not run (because the call was cancelled, or the first
        failure stops the frame), or -1 when all ran.

        The running offset is published before each task so that, if the
        task kills the process, the parent knows exactly which task it was;
        with timed, so is its start time, for the parent's task timeout.
        """
        cdef Py_ssize_t n = len(tasks)
        cdef Py_ssize_t k
        cdef Py_ssize_t stopped_at = -1
        cdef int64_t t0 = pm_monotonic_ns()
        cdef volatile int64_t *running = self._i64(slot, _OFF_RUNNING)
        cdef volatile int64_t *started = self._i64(slot, _OFF_STARTED)
        cdef list results = [None] * n
        cdef list errors = []
        for k in range(n):
            if self._cancelled(call_id):
                stopped_at = k
                break
            if timed:
                pm_store_i64(started, pm_monotonic_ns())
            pm_store_i64(running, k)
            task = tasks[k]
            try:
                if mode == MODE_MAP:
                    result = fn(task)
                elif mode == MODE_STAR:
                    result = fn(*task)
                else:
                    result = fn(*task[0], **task[1])
            except BaseException as exc:
                # SystemExit, KeyboardInterrupt and bare BaseException raised
                # by a task are that task's failure; the worker lives on.
                errors.append((k, exc))
                if stop_on_error:
                    stopped_at = k + 1 if k + 1 < n else -1
                    break
                continue
            results[k] = result
        pm_store_i64(running, -1)
        return results, errors, stopped_at, pm_monotonic_ns() - t0


def wrap_large_bytes(list items, Py_ssize_t threshold, wrapper):
    """Replace each bytes item of at least threshold bytes by wrapper(item).

    pickle never offers exact bytes objects to reducer_override, so large
    ones are wrapped here, at C speed, to travel out of band.  Returns the
    number of items wrapped.
    """
    cdef Py_ssize_t i, n = len(items), count = 0
    for i in range(n):
        item = items[i]
        if type(item) is bytes and len(<bytes>item) >= threshold:
            items[i] = wrapper(item)
            count += 1
    return count


cdef extern from "Python.h":
    object PyFloat_FromDouble(double v)
    double PyFloat_AsDouble(object o) except? -1.0
    object PyLong_FromLongLong(long long v)
    long long PyLong_AsLongLong(object o) except? -1
    long long PyLong_AsLongLongAndOverflow(object o, int *overflow) except? -1
    object PyList_New(Py_ssize_t n)
    void PyList_SET_ITEM(object lst, Py_ssize_t i, object item)
    void Py_INCREF(object o)


# A list of numbers all of one kind, packed: the tag byte, the kind, six
# bytes of padding, then one 8-byte little-endian value per item.  Packing
# costs a type check and a store per item, against 10 to 40 ns for pickle
# (large ints are its slow case), and unpacking about half of pickle's time.
cdef enum:
    _PACKED_HEADER = 8

PACKED_TAG = 3


def pack_numbers(list items, Py_ssize_t limit):
    """items packed as exact int64 or float64 values, or None.

    None when the list is empty, longer than fits in limit bytes, or holds
    anything but exact ints that fit in 64 bits or exact floats: bool, int
    subclasses and mixed lists keep their types only through pickle.
    """
    cdef Py_ssize_t n = len(items), k
    cdef bint floats
    cdef int overflow = 0
    cdef long long whole
    cdef double real
    cdef object item
    if n == 0 or _PACKED_HEADER + 8 * n > limit:
        return None
    first = type(items[0])
    if first is int:
        floats = False
    elif first is float:
        floats = True
    else:
        return None
    packed = PyBytes_FromStringAndSize(NULL, _PACKED_HEADER + 8 * n)
    cdef char *out = PyBytes_AS_STRING(packed)
    memset(out, 0, _PACKED_HEADER)
    out[0] = PACKED_TAG
    out[1] = b'd' if floats else b'q'
    out += _PACKED_HEADER
    for k in range(n):
        item = items[k]
        if floats:
            if type(item) is not float:
                return None
            real = PyFloat_AS_DOUBLE(item)
            memcpy(out + 8 * k, &real, 8)
        else:
            if type(item) is not int:
                return None
            whole = PyLong_AsLongLongAndOverflow(item, &overflow)
            if overflow:
                return None
            memcpy(out + 8 * k, &whole, 8)
    return packed


def unpack_numbers(const unsigned char[::1] packed):
    """The list that pack_numbers packed."""
    cdef Py_ssize_t n = (packed.shape[0] - _PACKED_HEADER) // 8, k
    cdef const char *data = <const char *>&packed[0]
    cdef bint floats = data[1] == b'd'
    cdef long long whole
    cdef double real
    data += _PACKED_HEADER
    result = PyList_New(n)
    for k in range(n):
        if floats:
            memcpy(&real, data + 8 * k, 8)
            value = PyFloat_FromDouble(real)
        else:
            memcpy(&whole, data + 8 * k, 8)
            value = PyLong_FromLongLong(whole)
        Py_INCREF(value)
        PyList_SET_ITEM(result, k, value)
    return result


cdef long long _float_to_int64(double value) except? -1:
    """A float stored into int64 output truncates toward zero, as numpy's
    assignment does; NaN, infinities and values out of range are errors."""
    if not (-9223372036854775808.0 <= value < 9223372036854775808.0):
        raise OverflowError(f"{value!r} does not fit in int64")
    return <long long>value


def run_typed_1d(SharedRegion region, int slot, fn, source, output, int64_t call_id,
                 bint stop_on_error):
    """The typed fast path: output[k] = fn(source[k]) for 1-D arrays of
    float64 or int64, without building task or result lists.

    Elements are handed to fn as Python floats or ints (as tolist() would)
    and results are stored as C values, converted as numpy's assignment
    would (a float into int64 output truncates toward zero).  Returns
    (errors, stopped_at, elapsed_ns) like run_tasks, except that each error
    is (offset, exception, misfit): misfit is True when the task ran but
    its result does not fit the output (not a number, or out of range).
    """
    cdef Py_ssize_t n = len(source)
    cdef Py_ssize_t k
    cdef Py_ssize_t stopped_at = -1
    cdef int64_t t0 = pm_monotonic_ns()
    cdef volatile int64_t *running = region._i64(slot, _OFF_RUNNING)
    cdef const double[::1] src_f
    cdef const long long[::1] src_i
    cdef double[::1] out_f
    cdef long long[::1] out_i
    cdef bint float_in = source.dtype.kind == 'f'
    cdef bint float_out = output.dtype.kind == 'f'
    cdef list errors = []
    if float_in:
        src_f = source
    else:
        src_i = source
    if float_out:
        out_f = output
    else:
        out_i = output
    for k in range(n):
        if region._cancelled(call_id):
            stopped_at = k
            break
        pm_store_i64(running, k)
        try:
            if float_in:
                result = fn(PyFloat_FromDouble(src_f[k]))
            else:
                result = fn(PyLong_FromLongLong(src_i[k]))
        except BaseException as exc:
            errors.append((k, exc, False))
            if stop_on_error:
                stopped_at = k + 1 if k + 1 < n else -1
                break
            continue
        try:
            if float_out:
                out_f[k] = PyFloat_AsDouble(result)
            elif type(result) is float:
                out_i[k] = _float_to_int64(result)
            else:
                out_i[k] = PyLong_AsLongLong(result)
        except BaseException as exc:
            # The task ran; its result does not fit the output array.
            errors.append((k, exc, True))
            if stop_on_error:
                stopped_at = k + 1 if k + 1 < n else -1
                break
    pm_store_i64(running, -1)
    return errors, stopped_at, pm_monotonic_ns() - t0


def typed_1d_supported(source, output):
    """True if run_typed_1d can serve this pair of arrays."""
    try:
        return (source.ndim == 1 and output.ndim == 1 and len(source) == len(output)
                # float64 or int64 ('q' and, on LP64 Linux, 'l' alike)
                and source.dtype.kind in 'fi' and output.dtype.kind in 'fi'
                and source.dtype.itemsize == 8 and output.dtype.itemsize == 8
                and source.flags.c_contiguous and output.flags.c_contiguous
                and output.flags.writeable and source.dtype.isnative and output.dtype.isnative)
    except AttributeError:
        return False


cdef class ResultStream:
    """The iterator returned by process_stream and map.

    Results arrive in chunks (one per frame) and are handed out here at C
    speed: a for loop costs an index and a type check per result, not a
    Python call.  (It is a complete class rather than a base for a Python
    subclass because a subclass would make every next() a method lookup.)
    close(), leaving a with block, or dropping the stream stops reading
    input and drops the work in flight.

    fetch() returns the next chunk, or None at the end.  An item whose type
    is marker_type (a failed task) is passed to on_marker(item), which
    returns (keep, value) or raises.  on_close() stops the work.
    """

    cdef list _chunk
    cdef Py_ssize_t _position
    cdef object _fetch
    cdef object _marker_type
    cdef object _on_marker
    cdef object _on_close
    cdef bint _done
    cdef readonly object _reader
    cdef object __weakref__

    __class_getitem__ = classmethod(GenericAlias)

    def __init__(self, fetch, marker_type, on_marker, on_close, reader=None):
        self._chunk = []
        self._position = 0
        self._fetch = fetch
        self._marker_type = marker_type
        self._on_marker = on_marker
        self._on_close = on_close
        self._done = False
        self._reader = reader

    def __iter__(self):
        return self

    def __next__(self):
        cdef object value
        while True:
            if self._position < len(self._chunk):
                value = self._chunk[self._position]
                self._position += 1
                if type(value) is self._marker_type:
                    keep, value = self._on_marker(value)
                    if not keep:
                        continue
                return value
            if self._done:
                raise StopIteration
            chunk = self._fetch()
            if chunk is None:
                self._done = True
                self._chunk = []
                raise StopIteration
            self._chunk = chunk
            self._position = 0

    def close(self):
        """Stop the stream: read no more input, drop work in flight."""
        self._chunk = []
        self._position = 0
        self._done = True
        if self._on_close is not None:
            self._on_close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass


cdef char *_BYTE_FORMAT = b"B"


cdef class ArenaSlice:
    """A read-only buffer over part of a mapped arena that knows whether
    anything still uses it.

    A worker hands these to the unpickler for task buffers read in place.
    A plain memoryview slice cannot tell: numpy builds arrays on a view of
    the slice's underlying buffer, so releasing the slice succeeds while an
    array a task kept still points into the arena.  Every consumer of an
    ArenaSlice must take a buffer from it (counted here) or hold a
    reference to it, so in_use() is exact.
    """

    cdef Py_buffer _arena
    cdef bint _has_arena
    cdef char *_start
    cdef Py_ssize_t _length
    cdef Py_ssize_t _shape[1]
    cdef Py_ssize_t _strides[1]
    cdef int _exports

    def __cinit__(self, arena, Py_ssize_t start, Py_ssize_t length):
        self._has_arena = False
        PyObject_GetBuffer(arena, &self._arena, PyBUF_SIMPLE)
        self._has_arena = True
        if start < 0 or length < 0 or start + length > self._arena.len:
            raise ValueError(f"slice {start}+{length} outside an arena of {self._arena.len} bytes")
        self._start = <char *>self._arena.buf + start
        self._length = length
        self._shape[0] = length
        self._strides[0] = 1
        self._exports = 0

    def __dealloc__(self):
        if self._has_arena:
            PyBuffer_Release(&self._arena)

    def __getbuffer__(self, Py_buffer *buffer, int flags):
        if flags & PyBUF_WRITABLE:
            raise BufferError("task data read in place is read-only")
        buffer.buf = self._start
        buffer.len = self._length
        buffer.readonly = 1
        buffer.itemsize = 1
        buffer.format = NULL
        if flags & PyBUF_FORMAT:
            buffer.format = _BYTE_FORMAT
        buffer.ndim = 1
        buffer.shape = NULL
        if flags & PyBUF_ND:
            buffer.shape = self._shape
        buffer.strides = NULL
        if (flags & PyBUF_STRIDES) == PyBUF_STRIDES:
            buffer.strides = self._strides
        buffer.suboffsets = NULL
        buffer.internal = NULL
        buffer.obj = self
        self._exports += 1

    def __releasebuffer__(self, Py_buffer *buffer):
        self._exports -= 1

    def __len__(self):
        return self._length

    cdef bint exported(self):
        return self._exports > 0


def arena_slices_in_use(list slices):
    """True if something other than the list slices holds one of its
    ArenaSlices, or a buffer taken from one (a task kept an array)."""
    cdef Py_ssize_t i
    cdef PyObject *item
    for i in range(len(slices)):
        item = PyList_GET_ITEM(slices, i)
        if item.ob_refcnt > 1:
            return True
        if (<ArenaSlice>item).exported():
            return True
    return False
