"""Arrays in shared memory, passed to workers by reference.

share(array) copies an array once into a memfd segment and returns a
SharedArray, a numpy array whose data lives there.  When a SharedArray (or
a view of one) travels to a worker inside a task, only a reference goes:
the owner's pid, the segment's descriptor and inode, and the view's offset,
shape, strides and dtype.  The worker maps the segment by path
(/proc/<pid>/fd/<fd>) and builds the same view on it, so a large lookup
table or one image shared by many tiles costs nothing per task.

Lifetime: a SharedArray keeps its segment object alive, and views keep the
array alive, so the memory stays valid for as long as any of them is
referenced here, pool or no pool.  When the last goes, the descriptor is
closed and the kernel frees the pages once no process maps them.
Workers keep the few segments they used last mapped, to avoid mapping a
table again for every task.
"""

from __future__ import annotations

import mmap
import os
import weakref
from collections import OrderedDict
from typing import Any

import numpy as np
import numpy.typing as npt

from . import _state

# How many segments a worker keeps mapped after their tasks are done.
_ATTACHED_CACHE_SIZE = 8


class _Segment:
    """A shared-memory block: a memfd we created, or a mapping of one
    created by another process (or by us, reached by reference)."""

    __slots__ = ("owner", "fd", "inode", "size", "map", "address", "owns_fd", "__weakref__")

    def __init__(self, owner: int, fd: int, inode: int, size: int,
                 segment_map: mmap.mmap, owns_fd: bool) -> None:
        self.owner = owner
        self.fd = fd
        self.inode = inode
        self.size = size
        self.map = segment_map
        self.owns_fd = owns_fd
        self.address = np.frombuffer(segment_map, dtype=np.uint8, count=1).ctypes.data

    @classmethod
    def create(cls, nbytes: int) -> _Segment:
        size = max(nbytes, 1)
        fd = os.memfd_create("poolme-shared", os.MFD_CLOEXEC)
        try:
            os.ftruncate(fd, size)
            segment_map = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        except BaseException:
            os.close(fd)
            raise
        segment = cls(os.getpid(), fd, os.fstat(fd).st_ino, size, segment_map, owns_fd=True)
        _own_segments[segment.key()] = segment
        return segment

    def key(self) -> tuple[int, int, int, int]:
        """What a reference to this segment names: owner, fd, inode, size."""
        return self.owner, self.fd, self.inode, self.size

    @classmethod
    def attach(cls, owner: int, fd: int, inode: int, size: int) -> _Segment:
        local = os.open(f"/proc/{owner}/fd/{fd}", os.O_RDWR | os.O_CLOEXEC)
        try:
            if os.fstat(local).st_ino != inode:
                raise RuntimeError(
                    f"the shared array of pid {owner} is gone (its descriptor was reused)")
            segment_map = mmap.mmap(local, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        finally:
            os.close(local)
        # References to an attached segment still name the owner's
        # descriptor, which the owner keeps open while it holds the array.
        return cls(owner, fd, inode, size, segment_map, owns_fd=False)

    def contains(self, address: int, extent: int) -> bool:
        return self.address <= address and address + extent <= self.address + self.size

    def __del__(self) -> None:
        if self.owns_fd and self.fd >= 0:
            try:
                os.close(self.fd)
            except OSError:
                pass
            self.fd = -1


# Segments of other processes this process mapped, most recently used last.
_attached: OrderedDict[tuple[int, int, int, int], _Segment] = OrderedDict()
# Segments this process created, while anything here still uses them: a
# reference to one that comes back (a task returned a shared array it was
# given) resolves to the same memory, without mapping it a second time.
_own_segments: weakref.WeakValueDictionary[tuple[int, int, int, int], _Segment] = (
    weakref.WeakValueDictionary())


class SharedArray(np.ndarray):
    """A numpy array whose data lives in shared memory (see share()).

    It behaves as any ndarray.  Passed to a worker, it travels by
    reference; writes by a worker are visible to every process mapping it
    (no locking is done: give each task its own region to write).  Arrays
    computed from it (a * 2, np.sum(a)) are ordinary arrays.
    """

    _segment: _Segment | None

    def __array_finalize__(self, obj: Any) -> None:
        self._segment = getattr(obj, "_segment", None)

    def __array_wrap__(self, array: Any, context: Any = None, return_scalar: bool = False) -> Any:
        # Results of ufuncs live in fresh memory, not in the segment.
        result = np.asarray(array)
        if return_scalar and result.ndim == 0:
            return result[()]
        return result

    def shared_reference(self) -> tuple[Any, ...] | None:
        """(segment key, offset, shape, strides, dtype) if this view's data
        lies inside its segment, else None."""
        segment = self._segment
        if segment is None:
            return None
        base = np.ndarray.view(self, np.ndarray)
        address = base.__array_interface__["data"][0]
        low, high = _byte_bounds(base)
        if base.size and not segment.contains(low, high - low):
            return None
        return segment.key(), address - segment.address, base.shape, base.strides, base.dtype


def _byte_bounds(array: np.ndarray) -> tuple[int, int]:
    """Lowest and one-past-highest byte address an array's view touches."""
    interface = array.__array_interface__
    low = high = interface["data"][0]
    if array.size == 0:
        return low, high
    for extent, stride in zip(array.shape, array.strides, strict=True):
        step = (extent - 1) * stride
        if step < 0:
            low += step
        else:
            high += step
    return low, high + array.itemsize


def share(array: npt.ArrayLike, dtype: npt.DTypeLike | None = None) -> SharedArray:
    """Copy array into shared memory once; pass the result to any number
    of tasks at no per-task cost.  Object arrays cannot be shared."""
    source = np.asarray(array, dtype=dtype)
    if source.dtype.hasobject:
        raise TypeError(f"array must not hold Python objects (dtype {source.dtype}) to be shared")
    shared = empty_shared(source.shape, source.dtype)
    shared[...] = source
    return shared


def empty_shared(shape: int | tuple[int, ...], dtype: npt.DTypeLike = np.float64) -> SharedArray:
    """A new uninitialised SharedArray, for example for tasks to write into."""
    descr = np.dtype(dtype)
    if descr.hasobject:
        raise TypeError(f"dtype must not be an object dtype to be shared, got {descr}")
    shape_tuple = (shape,) if isinstance(shape, int) else tuple(shape)
    nbytes = int(np.prod(shape_tuple, dtype=np.int64)) * descr.itemsize
    segment = _Segment.create(nbytes)
    array = np.ndarray(shape_tuple, dtype=descr, buffer=segment.map).view(SharedArray)
    array._segment = segment
    return array


def reduce_shared(array: SharedArray) -> Any:
    """How our picklers send a SharedArray: by reference when its data is
    in its segment, by value otherwise (NotImplemented)."""
    segment = array._segment
    if segment is not None and segment.owns_fd and _state.in_worker_process:
        # A segment a worker created is freed once the task's result is
        # sent, before the parent could map it: a plain copy goes instead,
        # like any array (out of band when large).
        return _plain_array, (np.ndarray.view(array, np.ndarray),)
    reference = array.shared_reference()
    if reference is None:
        return NotImplemented
    return _rebuild_shared, reference


def _plain_array(array: np.ndarray) -> np.ndarray:
    return array


def _rebuild_shared(key: tuple[int, int, int, int], offset: int, shape: tuple[int, ...],
                    strides: tuple[int, ...], dtype: np.dtype[Any]) -> SharedArray:
    segment = _lookup_segment(key)
    array = np.ndarray(shape, dtype=dtype, buffer=segment.map, offset=offset,
                       strides=strides).view(SharedArray)
    array._segment = segment
    return array


def _lookup_segment(key: tuple[int, int, int, int]) -> _Segment:
    owner, fd, inode, size = key
    if owner == os.getpid():
        own = _own_segments.get(key)
        if own is None:
            raise RuntimeError(
                "a shared array came back to the process that created it, which has "
                "dropped it since (its memory is freed with the creator's last reference): "
                "keep a reference while tasks may return it, or return a copy (np.array(a))")
        return own
    cached = _attached.get(key)
    if cached is not None:
        _attached.move_to_end(key)
        return cached
    segment = _Segment.attach(owner, fd, inode, size)
    _attached[key] = segment
    if len(_attached) > _ATTACHED_CACHE_SIZE:
        _attached.popitem(last=False)
    return segment


class RowBlock:
    """Rows start..stop of an array given as the input of a call.

    Sent as a reference to the shared input plus a range, so rows are never
    pickled one by one.  In the worker, a 1-D array's elements arrive as
    Python scalars (what array.tolist() gives); rows of an N-D array arrive
    as read-only views.
    """

    __slots__ = ("rows",)

    def __init__(self, rows: Any) -> None:
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, offset: int) -> Any:
        return _as_tasks(self.rows[offset:offset + 1])[0]

    def as_tasks(self) -> list[Any]:
        return _as_tasks(self.rows)


def _as_tasks(rows: Any) -> list[Any]:
    if rows.ndim == 1:
        return list(np.ndarray.view(rows, np.ndarray).tolist())
    view = np.ndarray.view(rows, np.ndarray)
    view.flags.writeable = False
    return list(view)


class SharedRows:
    """The input of a call over an array, sliced into RowBlocks."""

    row_blocks = True

    def __init__(self, array: np.ndarray) -> None:
        self.array = array if isinstance(array, SharedArray) and array.shared_reference() else share(array)

    def __len__(self) -> int:
        return len(self.array)

    def __getitem__(self, window: slice) -> RowBlock:
        return RowBlock(self.array[window])
