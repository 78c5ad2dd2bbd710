"""Data arenas: where large out-of-band buffers travel between processes.

Each worker slot has two arenas, memfd regions mapped once by the pool and
by the slot's worker:

    task arena    the parent writes array data of tasks; the worker maps it
                  read-only and rebuilds arrays as views on it (no copy)
    result arena  the worker writes array data of results; the parent
                  copies each buffer out while decoding, so the space can
                  be reused as soon as the frame is acknowledged

Mapping once matters: a fresh segment per message costs more than the copy
itself (new pages are zeroed and faulted in on both sides), while arena
pages stay allocated and mapped for the pool's life.

Task arena space is managed by the parent (FreeList) and returned when the
frame's results arrive, unless the worker reports that a task kept a view
(the region is then "pinned" until the worker reports it released).
Result arena space is managed by the worker (Ring), first in first out,
released up to the last frame the parent acknowledged.
"""

from __future__ import annotations

import bisect
import mmap
import os
from collections import deque

ALIGN = 64


def aligned(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


def create_arena_fd(size: int) -> int:
    fd = os.memfd_create("poolme-arena", os.MFD_CLOEXEC)
    os.ftruncate(fd, size)
    return fd


def map_arena(fd: int, size: int, writable: bool) -> memoryview:
    prot = mmap.PROT_READ | (mmap.PROT_WRITE if writable else 0)
    view = memoryview(mmap.mmap(fd, size, mmap.MAP_SHARED, prot))
    return view if writable else view.toreadonly()


class FreeList:
    """First-fit allocator over [0, size), with coalescing frees."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.starts: list[int] = [0]
        self.lengths: list[int] = [size]

    def alloc(self, n: int) -> int | None:
        n = aligned(max(n, 1))
        for i, length in enumerate(self.lengths):
            if length >= n:
                start = self.starts[i]
                if length == n:
                    del self.starts[i], self.lengths[i]
                else:
                    self.starts[i] += n
                    self.lengths[i] -= n
                return start
        return None

    def free(self, start: int, n: int) -> None:
        n = aligned(max(n, 1))
        i = bisect.bisect_left(self.starts, start)
        self.starts.insert(i, start)
        self.lengths.insert(i, n)
        # Merge with the next block, then with the previous one.
        if i + 1 < len(self.starts) and start + n == self.starts[i + 1]:
            self.lengths[i] += self.lengths[i + 1]
            del self.starts[i + 1], self.lengths[i + 1]
        if i > 0 and self.starts[i - 1] + self.lengths[i - 1] == start:
            self.lengths[i - 1] += self.lengths[i]
            del self.starts[i], self.lengths[i]

    def reset(self) -> None:
        self.starts, self.lengths = [0], [self.size]


class Ring:
    """FIFO allocator: regions are freed in the order they were taken."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.live: deque[tuple[int, int, int]] = deque()  # (seq, start, end)

    def alloc(self, n: int, seq: int) -> int | None:
        n = aligned(max(n, 1))
        if n > self.size:
            return None
        if not self.live:
            start = 0
        else:
            first, last = self.live[0][1], self.live[-1][2]
            if last >= first:  # used space does not wrap
                if last + n <= self.size:
                    start = last
                elif n <= first:
                    start = 0
                else:
                    return None
            elif last + n <= first:
                start = last
            else:
                return None
        self.live.append((seq, start, start + n))
        return start

    def release_upto(self, seq: int) -> None:
        while self.live and self.live[0][0] <= seq:
            self.live.popleft()
