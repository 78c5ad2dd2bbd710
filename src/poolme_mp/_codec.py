"""Serialization between the pool and its workers.

A payload is pickled with protocol 5.  Large buffers (numpy arrays,
bytearray, memoryview and large bytes) are taken out of band and written to
a *spill* segment, a memfd that the receiver maps by path
(/proc/<sender pid>/fd/<fd>), so array data is never pickled and is copied
once, into the segment; the receiver reads it in place.  A pickle stream
too large for a ring frame goes to the spill segment too.

Envelope, the bytes that travel inside a ring frame:

    b"\\x00" + pickle                 everything inline
    b"\\x03" + kind + values         a list of exact ints (kind b"q") or
                                      floats (b"d") as 8-byte values, after
                                      six bytes of padding (pack_numbers)
    b"\\x02" + ARENA_HEADER + ranges + pickle
        the out-of-band buffers are in the sender's data arena (see
        _arena): region start and length (Q, Q), buffer count (I), then
        (offset Q, length Q) per buffer
    b"\\x01" + SPILL_HEADER + ranges [+ pickle]
        SPILL_HEADER: sender pid (q), fd (i), segment size (Q),
                      buffer count (I), pickle-in-segment flag (I)
        ranges: (offset Q, length Q) per out-of-band buffer, then one more
                for the pickle stream when it is in the segment

The sender keeps the spill descriptor open until the receiver says it has
mapped it (see the engine and the worker); after that the pages live as
long as any array viewing them.
"""

from __future__ import annotations

import io
import mmap
import os
import pickle
import struct
import sys
from collections.abc import Callable
from typing import Any, Literal, Protocol

import cloudpickle

from ._dispatch import (
    PACKED_TAG,
    ArenaSlice,
    pack_numbers,
    unpack_numbers,
    wrap_large_bytes,
)

# Buffers at least this large travel out of band.  Below it, the copies
# made by pickling in band cost less than a segment of their own.
OUT_OF_BAND_THRESHOLD = 256 * 1024

_SPILL_HEADER = struct.Struct("<qiQII")
_ARENA_HEADER = struct.Struct("<QQI")
_FUNCTION_SPILL = struct.Struct("<qiQ")
_IN_ARENA = b"\x02"
_RANGE = struct.Struct("<QQ")
_INLINE = b"\x00"
_SPILLED = b"\x01"
# Out-of-band buffers start on this boundary in a segment, so numpy arrays
# rebuilt on top of them are aligned for vectorised code.
_ALIGN = 64


class LargeBytes:
    """Marks a bytes object that should travel out of band."""

    __slots__ = ("data",)

    def __init__(self, data: bytes) -> None:
        self.data = data


def _bytes_from_buffer(buffer: Any) -> bytes:
    return bytes(buffer)


def _bytearray_from_buffer(buffer: Any) -> bytearray:
    return bytearray(buffer)


def _memoryview_from_buffer(buffer: Any, fmt: str, shape: tuple[int, ...],
                            dtype: Any = None) -> memoryview:
    """The memoryview that was sent: buffer's bytes with its format and
    shape.  dtype (numpy's, when the view was of an array) rebuilds the
    formats memoryview.cast cannot make (float16, complex, structs) and
    empty views, which cast refuses."""
    view = memoryview(buffer)
    if view.format == fmt and view.shape == shape:
        return view
    try:
        rebuilt: memoryview = view.cast("B").cast(fmt, shape)  # type: ignore[call-overload]
        return rebuilt
    except (TypeError, ValueError):
        if dtype is None:
            raise
    import numpy

    array: Any = numpy.frombuffer(view.cast("B"), dtype=dtype).reshape(shape)
    return memoryview(array)


def _numpy_dtype_of(view: memoryview) -> Any:
    """The numpy dtype behind a memoryview of an array, if there is one."""
    owner = view.obj
    dtype = getattr(owner, "dtype", None)
    if dtype is not None and type(owner).__module__ == "numpy" and dtype.itemsize == view.itemsize:
        return dtype
    return None


def _reduce_buffer_like(obj: Any) -> Any:
    """Out-of-band reductions for the byte containers pickle keeps in band,
    and references for arrays that already live in shared memory."""
    kind = type(obj)
    if kind.__name__ == "SharedArray":
        from ._shared import SharedArray, reduce_shared

        if isinstance(obj, SharedArray):
            return reduce_shared(obj)
    if kind is LargeBytes:
        return _bytes_from_buffer, (pickle.PickleBuffer(obj.data),)
    if kind is bytearray and len(obj) >= OUT_OF_BAND_THRESHOLD:
        return _bytearray_from_buffer, (pickle.PickleBuffer(obj),)
    if kind is memoryview:
        dtype = _numpy_dtype_of(obj)
        if obj.nbytes >= OUT_OF_BAND_THRESHOLD and obj.c_contiguous:
            return _memoryview_from_buffer, (pickle.PickleBuffer(obj), obj.format, obj.shape, dtype)
        # pickle cannot send a memoryview itself: its bytes go in band, in
        # a bytearray when it was writable, and it is rebuilt with its
        # format and shape.
        data = obj.tobytes() if obj.readonly else bytearray(obj.tobytes())
        return _memoryview_from_buffer, (data, obj.format, obj.shape, dtype)
    if kind.__name__ == "ndarray" and kind.__module__ == "numpy" and not obj.flags.writeable:
        return _reduce_read_only_array(obj)
    return NotImplemented


def _reduce_read_only_array(array: Any) -> Any:
    """A large read-only array (a worker's view of its task data) travels
    like any array, but is rebuilt writable where the receiver's copy of
    its data is private (see _array_from_buffer); the protocol-5 default
    would carry the read-only flag along."""
    if array.dtype.hasobject:
        return NotImplemented
    order: Literal["C", "F"]
    if array.flags.c_contiguous:
        order = "C"
    elif array.flags.f_contiguous:
        order = "F"
    else:
        return NotImplemented
    if array.nbytes < OUT_OF_BAND_THRESHOLD:
        # In band the data would travel as (immutable) bytes: a bytearray
        # arrives as a private, writable copy.
        data: Any = bytearray(array.tobytes(order=order))
    else:
        data = pickle.PickleBuffer(array)
    return _array_from_buffer, (data, array.dtype, array.shape, order)


def _array_from_buffer(buffer: Any, dtype: Any, shape: tuple[int, ...],
                       order: Literal["C", "F"]) -> Any:
    import numpy

    view = memoryview(buffer)
    if view.readonly:
        # pickle marks a buffer that was read-only at the sender read-only
        # here too.  When the object under it is writable it is this
        # process's private copy (decode() hands out nothing else that
        # is writable), so the array may be writable as well.
        owner = memoryview(view.obj) if view.obj is not None else view
        if not owner.readonly and owner.nbytes == view.nbytes:
            view = owner
    return numpy.frombuffer(view, dtype=dtype).reshape(shape, order=order)


class _StdPickler(pickle.Pickler):
    reducer_override = staticmethod(_reduce_buffer_like)


class _CloudPickler(cloudpickle.Pickler):  # type: ignore[misc]
    def reducer_override(self, obj: Any) -> Any:
        reduced = _reduce_buffer_like(obj)
        if reduced is NotImplemented:
            return super().reducer_override(obj)
        return reduced


def _dumps(pickler_cls: type, obj: Any, buffers: list[pickle.PickleBuffer]) -> bytes:
    def keep_large_out_of_band(buffer: pickle.PickleBuffer) -> bool:
        if buffer.raw().nbytes < OUT_OF_BAND_THRESHOLD:
            return True
        buffers.append(buffer)
        return False

    stream = io.BytesIO()
    pickler_cls(stream, protocol=5, buffer_callback=keep_large_out_of_band).dump(obj)
    return stream.getvalue()


def dumps(obj: Any, buffers: list[pickle.PickleBuffer]) -> bytes:
    """Pickle obj, collecting its large buffers; cloudpickle if needed.

    The standard pickler is tried first because it is several times
    faster; cloudpickle is the fallback for lambdas, closures and classes
    defined in __main__ inside the payload.
    """
    try:
        return _dumps(_StdPickler, obj, buffers)
    except Exception:
        buffers.clear()
        return _dumps(_CloudPickler, obj, buffers)


def dumps_function(fn: Callable[..., Any]) -> bytes:
    """Pickle a function by value where needed, so that lambdas, closures
    and functions of __main__ work under every start method.  Shared arrays
    it captures travel by reference, as they do in tasks."""
    stream = io.BytesIO()
    _CloudPickler(stream, protocol=5).dump(fn)
    return stream.getvalue()


def encode_function(blob: bytes, inline_limit: int) -> tuple[bytes, Spill | None]:
    """A function's bytes as they travel in a frame: inline (b"\\x00" +
    blob), or, for a function that captured a lot of data, in a spill
    segment (b"\\x01" + pid, fd, size)."""
    if len(blob) <= inline_limit:
        return _INLINE + blob, None
    spill = Spill([memoryview(blob)])
    return _SPILLED + _FUNCTION_SPILL.pack(os.getpid(), spill.fd, len(blob)), spill


def decode_function(part: Any) -> Any:
    view = memoryview(part)
    if view[0] == 0:
        return cloudpickle.loads(view[1:])
    pid, fd, size = _FUNCTION_SPILL.unpack_from(view, 1)
    return cloudpickle.loads(map_spill(pid, fd, max(size, 1), False)[:size])


class Spill:
    """A memfd segment holding a payload's out-of-band parts.

    The sender owns the descriptor and closes it once the receiver has
    mapped the segment.
    """

    __slots__ = ("fd", "size")

    def __init__(self, parts: list[memoryview]) -> None:
        self.fd = -1
        self.size = 0
        self.fd = os.memfd_create("poolme-spill", os.MFD_CLOEXEC)
        try:
            self._write(parts)
        except BaseException:
            self.close()
            raise

    def _write(self, parts: list[memoryview]) -> None:
        # pwritev lets the kernel copy straight into the segment's pages:
        # no mapping, no page faults on the sending side.
        total = sum(_aligned(part.nbytes) for part in parts)
        os.ftruncate(self.fd, max(total, 1))
        offset = 0
        for part in parts:
            written = 0
            while written < part.nbytes:
                written += os.pwrite(self.fd, part[written:], offset + written)
            offset += _aligned(part.nbytes)
        self.size = max(total, 1)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def _aligned(n: int) -> int:
    return (n + _ALIGN - 1) // _ALIGN * _ALIGN


class ArenaSpace(Protocol):
    """Where an encoder may place out-of-band buffers (see _arena)."""

    view: memoryview

    def take(self, nbytes: int) -> int | None:
        """Offset of nbytes of free space, or None if there is none."""
        ...


class ArenaFull(Exception):
    """The arena has no room and the caller asked not to spill."""


def encode(obj: Any, inline_limit: int, arena: ArenaSpace | None = None,
           spill_ok: bool = True) -> tuple[list[Any], Spill | None, tuple[int, int] | None]:
    """Encode obj as an envelope.

    Returns (byte parts to concatenate, spill or None, arena region or
    None).  Large buffers go to the arena when it has room, else to a
    spill segment (or ArenaFull is raised, when not spill_ok).  Raises
    whatever pickling raises.
    """
    if type(obj) is list:
        packed = pack_numbers(obj, inline_limit)
        if packed is not None:
            return [packed], None, None
    buffers: list[pickle.PickleBuffer] = []
    main = dumps(obj, buffers)
    if not buffers and len(main) + 1 <= inline_limit:
        return [_INLINE, main], None, None
    views = [buffer.raw() for buffer in buffers]
    fits_inline = len(main) + 1 + _ARENA_HEADER.size + _RANGE.size * len(views) <= inline_limit
    if arena is not None and fits_inline:
        placed = _place_in_arena(arena, views)
        if placed is not None:
            region, ranges = placed
            header = _ARENA_HEADER.pack(region[0], region[1], len(views))
            return [_IN_ARENA, header, ranges, main], None, region
    if arena is not None and not spill_ok:
        raise ArenaFull(sum(view.nbytes for view in views))
    parts, spill = _encode_spilled(main, views, inline_limit)
    return parts, spill, None


def _place_in_arena(arena: ArenaSpace, views: list[memoryview]
                    ) -> tuple[tuple[int, int], bytes] | None:
    total = sum(_aligned(view.nbytes) for view in views)
    start = arena.take(total)
    if start is None:
        return None
    ranges = bytearray()
    offset = start
    for view in views:
        # One copy, straight into memory the receiver already has mapped.
        arena.view[offset:offset + view.nbytes] = view
        ranges += _RANGE.pack(offset, view.nbytes)
        offset += _aligned(view.nbytes)
    return (start, total), bytes(ranges)


def _encode_spilled(main: bytes, views: list[memoryview], inline_limit: int
                    ) -> tuple[list[Any], Spill]:
    n_buffers = len(views)
    main_in_spill = len(main) + 1 + _SPILL_HEADER.size + _RANGE.size * (len(views) + 1) > inline_limit
    if main_in_spill:
        views.append(memoryview(main))
    spill = Spill(views)
    ranges = bytearray()
    offset = 0
    for view in views:
        ranges += _RANGE.pack(offset, view.nbytes)
        offset += _aligned(view.nbytes)
    header = _SPILL_HEADER.pack(os.getpid(), spill.fd, spill.size, n_buffers, main_in_spill)
    parts: list[Any] = [_SPILLED, header, bytes(ranges)]
    if not main_in_spill:
        parts.append(main)
    return parts, spill


def decode(envelope: Any, writable: bool, arena: memoryview | None = None,
           arena_buffers: list[Any] | None = None) -> Any:
    """Rebuild an object from an envelope (bytes or a memoryview).

    With writable=False, out-of-band buffers are mapped read-only, so a
    worker sees its input arrays as read-only views.  Buffers in an arena
    are copied out when writable (the arena space is reused soon), and
    used in place otherwise; the views used in place are appended to
    arena_buffers so the caller can tell when they are released.
    """
    view = memoryview(envelope)
    if view[0] == 0:
        return pickle.loads(view[1:])
    if view[0] == PACKED_TAG:
        return unpack_numbers(view)
    if view[0] == 2:
        return _decode_from_arena(view, writable, arena, arena_buffers)
    pid, fd, size, n_buffers, main_in_spill = _SPILL_HEADER.unpack_from(view, 1)
    position = 1 + _SPILL_HEADER.size
    n_ranges = n_buffers + (1 if main_in_spill else 0)
    ranges = [_RANGE.unpack_from(view, position + i * _RANGE.size) for i in range(n_ranges)]
    segment = map_spill(pid, fd, size, writable)
    buffers = [_spilled_buffer(segment, start, length, writable)
               for start, length in ranges[:n_buffers]]
    if main_in_spill:
        start, length = ranges[-1]
        main: Any = segment[start:start + length]
    else:
        main = view[position + n_ranges * _RANGE.size:]
    return pickle.loads(main, buffers=buffers)


def _spilled_buffer(segment: memoryview, start: int, length: int, writable: bool) -> Any:
    """One buffer of a mapped spill segment.  A writable mapping is ours
    alone once mapped; handed out as a numpy view it is an object of its
    own, so _array_from_buffer can see that it is writable."""
    piece = segment[start:start + length]
    numpy = sys.modules.get("numpy")
    if writable and numpy is not None:
        return numpy.frombuffer(piece, dtype=numpy.uint8)
    return piece


def arena_region(envelope: Any) -> tuple[int, int] | None:
    """(start, length) of the arena region an envelope uses, if any."""
    view = memoryview(envelope)
    if view[0] != 2:
        return None
    start, length, _ = _ARENA_HEADER.unpack_from(view, 1)
    return start, length


def _decode_from_arena(view: memoryview, writable: bool, arena: memoryview | None,
                       arena_buffers: list[Any] | None) -> Any:
    if arena is None:
        raise RuntimeError("envelope refers to a data arena, but none is mapped")
    _, _, n_buffers = _ARENA_HEADER.unpack_from(view, 1)
    position = 1 + _ARENA_HEADER.size
    buffers: list[Any] = []
    for i in range(n_buffers):
        start, length = _RANGE.unpack_from(view, position + i * _RANGE.size)
        if writable:
            piece = arena[start:start + length]
            buffers.append(_copy_out(piece))
            piece.release()
        else:
            # Read in place: an ArenaSlice can tell later whether anything
            # built on it (an array a task kept) is still alive.
            in_place = ArenaSlice(arena, start, length)
            buffers.append(in_place)
            if arena_buffers is not None:
                arena_buffers.append(in_place)
    main = view[position + n_buffers * _RANGE.size:]
    return pickle.loads(main, buffers=buffers)


def _copy_out(piece: memoryview) -> Any:
    """A private, writable copy of an arena buffer.

    numpy allocates large arrays on transparent huge pages where the
    kernel allows, so the fresh memory costs a few page faults instead of
    one per 4 KiB; a bytearray would fault on every page.
    """
    try:
        import numpy
    except ImportError:
        return bytearray(piece)
    copy = numpy.empty(piece.nbytes, dtype=numpy.uint8)
    copy.data.cast("B")[:] = piece
    return copy


def map_spill(pid: int, fd: int, size: int, writable: bool) -> memoryview:
    """Map another process's memfd by path and return a view of it."""
    flags = os.O_RDWR if writable else os.O_RDONLY
    local_fd = os.open(f"/proc/{pid}/fd/{fd}", flags | os.O_CLOEXEC)
    try:
        prot = mmap.PROT_READ | (mmap.PROT_WRITE if writable else 0)
        populate = getattr(mmap, "MAP_POPULATE", 0)
        segment = mmap.mmap(local_fd, size, mmap.MAP_SHARED | populate, prot)
    finally:
        # The mapping keeps the pages alive; the descriptor is not needed.
        os.close(local_fd)
    view = memoryview(segment)
    return view if writable else view.toreadonly()


def mark_large_bytes(items: list[Any]) -> None:
    """Wrap large bytes items of a list in place so they go out of band."""
    wrap_large_bytes(items, OUT_OF_BAND_THRESHOLD, LargeBytes)
