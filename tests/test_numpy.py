"""Tests of the zero-copy numpy data path: out-of-band buffers in tasks and
results, shared arrays (share(), empty_shared()), numpy arrays as the input
of process(), typed output (dtype=, out=) and buffers around the ring and
data arena sizes.

Pools are kept small (1 or 2 workers).  Every call passes timeout= so that a
hang becomes a CallTimeoutError, and pytest-timeout (with conftest's
watchdog) is the backstop for anything else.  Tests whose behaviour could
depend on how workers start (sharing, passing by reference) run under every
start method; the others use fork for speed.

Tests marked xfail(strict=True) assert the documented behaviour where the
library is known not to meet it; each reason names the bug.
"""

from __future__ import annotations

import gc
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import poolme_mp
from poolme_mp import (
    SharedArray,
    TaskError,
    TaskErrorGroup,
    TaskSerializationError,
    WorkerPool,
    empty_shared,
    share,
    worker_state,
)

pytestmark = pytest.mark.timeout(60)

# Bound on every blocking call a test makes.
T = 30.0

# Sizes of the data path (see _codec and _engine).
OUT_OF_BAND = 256 * 1024          # buffers at least this large go out of band
SMALL_RING = 64 * 1024            # the smallest ring WorkerPool accepts
SMALL_ARENA = 1024 * 1024         # data arena of the small_pool fixture
DEFAULT_ARENA = 64 * 1024 * 1024  # EngineOptions.arena_bytes default

STRUCT = np.dtype([("id", "<i4"), ("score", "<f8"), ("tag", "S3")])


# --------------------------------------------------------------------------
# Module-level helpers (importable by name in spawn and forkserver workers)
# --------------------------------------------------------------------------


def identity(x):
    return x


def double(x):
    return x * 2


def describe_array(a):
    """What a worker sees of an array task."""
    return (type(a).__name__, a.dtype.str, a.shape, bool(a.flags.writeable))


def describe_row(row):
    return (type(row).__name__, row.dtype.str, row.shape, bool(row.flags.writeable), row.tolist())


def describe_scalar(x):
    return (type(x).__name__, x)


def write_first(a):
    a[0] = 99
    return "wrote"


def write_into(args):
    """Write i * 10 into position i of a shared output array."""
    out, i = args
    out[i] = i * 10
    return i


def shared_sum(a):
    return float(np.asarray(a).sum())


def dtype_names(a):
    return a.dtype.names


def make_bytes(n):
    return bytes(range(256)) * (n // 256) + bytes(range(n % 256))


def make_uint8(n):
    return np.arange(n, dtype=np.uint8)


def make_bytearray(n):
    return bytearray(make_bytes(n))


def make_shared(n):
    return share(np.arange(n, dtype=np.float64))


def make_small_memoryview(n):
    return memoryview(bytearray(b"m" * n))


def invert(image):
    return 255 - image


def as_vector(x):
    return np.full(3, x, dtype=np.float64)


def half(x):
    return x / 2


def on_fast_path(_):
    """1 if the typed C fast path called this function, else 0.

    run_typed_1d is compiled code and has no Python frame of its own, so
    the caller's frame is the worker's run_typed (the fast path) or
    run_frame (the general path)."""
    return 1 if sys._getframe(1).f_code.co_name == "run_typed" else 0


def string_at_two(x):
    return "abc" if x == 2 else x


def vector_at_two(x):
    return np.zeros(3) if x == 2 else x


def wrong_shape_at_two(x):
    return np.zeros(4) if x == 2 else np.zeros(3) + x


def keep_task_array(a):
    worker_state["kept"] = a
    return int(a[0])


def kept_array_range(_):
    kept = worker_state["kept"]
    return (int(kept.min()), int(kept.max()))


def first_element(a):
    return int(a[0])


def mark_then_half(args):
    """Mark task i as run in a shared array, then return i / 2."""
    ran, i = args
    ran[i] = 1
    return i / 2


def segment_maps():
    """How many mappings of share()/empty_shared() segments this process has."""
    with open("/proc/self/maps") as f:
        return sum("poolme-shared" in line for line in f)


def segment_fds():
    """How many descriptors of share()/empty_shared() segments are open here."""
    count = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            if "poolme-shared" in os.readlink(f"/proc/self/fd/{fd}"):
                count += 1
        except OSError:
            pass  # closed meanwhile (the directory's own descriptor)
    return count


def same_buffer(got, expected):
    """Type, layout and bytes of a buffer-like result match the original."""
    assert type(got) is type(expected)
    if isinstance(expected, np.ndarray):
        assert got.dtype == expected.dtype
        assert got.shape == expected.shape
        assert np.array_equal(got, expected)
    elif isinstance(expected, memoryview):
        assert (got.format, got.shape, got.itemsize) == (
            expected.format, expected.shape, expected.itemsize)
        assert got.tobytes() == expected.tobytes()
    else:
        assert len(got) == len(expected)
        assert got == expected
    return True


@pytest.fixture
def fork_pool():
    """A started 2-worker fork pool, for rules that do not depend on the start method."""
    with WorkerPool(2, start_method="fork") as p:
        yield p


@pytest.fixture
def pool(start_method):
    """A started 2-worker pool under each start method."""
    with WorkerPool(2, start_method=start_method) as p:
        yield p


def small_pool(workers=2):
    """A fork pool with the smallest ring and a 1 MiB data arena.

    WorkerPool has no public option for the arena size; it is set on the
    engine options before the pool starts."""
    p = WorkerPool(workers, start_method="fork", ring_size=SMALL_RING)
    p._options.arena_bytes = SMALL_ARENA
    return p


# --------------------------------------------------------------------------
# 1. Large buffers travel out of band
# --------------------------------------------------------------------------


def large_buffers():
    """One buffer of each kind, every one past the out-of-band threshold."""
    rng = np.random.default_rng(7)
    return {
        "float64": rng.standard_normal(OUT_OF_BAND // 8 + 3),
        "int32-2d": np.arange(300 * 301, dtype=np.int32).reshape(300, 301),
        "uint8-image": rng.integers(0, 256, (256, 384, 3), dtype=np.uint8),
        "complex128": (np.arange(20_000) + 1j * np.arange(20_000)[::-1]),
        "bool": rng.integers(0, 2, OUT_OF_BAND + 5).astype(bool),
        "fortran": np.asfortranarray(np.arange(400 * 200, dtype=np.float64).reshape(400, 200)),
        "bytes": make_bytes(OUT_OF_BAND + 17),
        "bytearray": make_bytearray(OUT_OF_BAND + 1),
        "memoryview-B": memoryview(make_bytes(OUT_OF_BAND * 2)),
        "memoryview-d-2d": memoryview(np.arange(200 * 200, dtype=np.float64).reshape(200, 200)),
    }


@pytest.mark.parametrize("kind", list(large_buffers()))
def test_large_buffer_round_trips_intact(fork_pool, kind):
    """A large array, bytes, bytearray or memoryview sent as a task and
    returned as the result arrives with its type, dtype/format, shape and
    every byte intact."""
    buffer = large_buffers()[kind]
    results = fork_pool.process(identity, [buffer, buffer, buffer], timeout=T)
    assert len(results) == 3
    for result in results:
        assert same_buffer(result, buffer)


@pytest.mark.parametrize("make, n", [
    (make_uint8, OUT_OF_BAND + 3),
    (make_bytes, OUT_OF_BAND + 3),
    (make_bytearray, OUT_OF_BAND + 3),
])
def test_large_results_made_in_the_worker_arrive_intact(fork_pool, make, n):
    """Large arrays, bytes and bytearrays created by a task arrive intact
    and with their own type."""
    results = fork_pool.process(make, [n, n + 1, n - 1], timeout=T)
    for size, result in zip([n, n + 1, n - 1], results, strict=True):
        assert same_buffer(result, make(size))


def test_small_buffers_round_trip_intact(fork_pool):
    """Arrays, bytes and bytearrays below the out-of-band threshold (sent
    in band) round-trip with type, dtype and shape intact."""
    tasks = [np.arange(10, dtype=np.int16).reshape(2, 5), b"\x00\x01abc", bytearray(b"xyz"),
             np.array(3.5), np.zeros((0, 4), dtype=np.float32)]
    results = fork_pool.process(identity, tasks, timeout=T)
    for result, task in zip(results, tasks, strict=True):
        assert same_buffer(result, task)


def test_small_memoryview_round_trips_as_a_memoryview(fork_pool):
    """A small memoryview (in band) arrives as a memoryview with its format
    and shape, as task and as result."""
    view = memoryview(np.arange(12, dtype=np.float64).reshape(3, 4))
    assert same_buffer(fork_pool.process(identity, [view], timeout=T)[0], view)
    result = fork_pool.process(make_small_memoryview, [10], timeout=T)[0]
    assert same_buffer(result, memoryview(bytearray(b"m" * 10)))


def test_large_task_arrays_are_read_only_views_in_the_worker(fork_pool):
    """A worker sees a large task array as a read-only array of the same
    dtype and shape; a task that writes to it fails with numpy's
    ValueError, and the parent's array is unchanged."""
    array = np.arange(OUT_OF_BAND // 8 * 2, dtype=np.float64)
    before = array.copy()
    assert fork_pool.process(describe_array, [array], timeout=T) == [
        ("ndarray", "<f8", array.shape, False)]
    with pytest.raises(TaskError) as caught:
        fork_pool.process(write_first, [array], timeout=T)
    assert caught.value.index == 0
    assert type(caught.value.__cause__) is ValueError
    assert "read-only" in str(caught.value.__cause__)
    assert np.array_equal(array, before)
    assert array.flags.writeable


def test_large_task_memoryview_is_read_only_in_the_worker(fork_pool):
    """A large memoryview task is read-only in the worker (writing raises
    TypeError) and the parent's buffer is unchanged."""
    data = bytearray(OUT_OF_BAND + 8)
    with pytest.raises(TaskError) as caught:
        fork_pool.process(write_first, [memoryview(data)], timeout=T)
    assert caught.value.index == 0
    assert type(caught.value.__cause__) is TypeError
    assert data == bytearray(OUT_OF_BAND + 8)


def test_small_task_array_write_does_not_reach_the_parent(fork_pool):
    """A small array (sent in band, a private copy) may be written by the
    task, but the write never reaches the parent's array."""
    array = np.zeros(10, dtype=np.int64)
    assert fork_pool.process(write_first, [array], timeout=T) == ["wrote"]
    assert array.tolist() == [0] * 10


def test_computed_results_are_writable_arrays_owned_by_the_caller(fork_pool):
    """Array results computed by tasks are writable, do not share memory
    with the data arena (a later call does not change them) and stay valid
    after the pool shuts down."""
    arrays = [np.full(OUT_OF_BAND // 8 + 1, float(i)) for i in range(4)]
    first = fork_pool.process(double, arrays, timeout=T)
    fork_pool.process(double, [a + 100 for a in arrays] * 3, timeout=T)
    for i, result in enumerate(first):
        assert result.flags.writeable
        assert type(result) is np.ndarray
        assert np.array_equal(result, np.full(OUT_OF_BAND // 8 + 1, 2.0 * i))
        result[0] = -1.0
        assert result[0] == -1.0
    fork_pool.shutdown()
    assert np.array_equal(first[3][1:], np.full(OUT_OF_BAND // 8, 6.0))


def test_result_that_is_a_view_of_the_task_is_writable(fork_pool):
    """A large result that is the task's own (read-only) input array, or a
    slice of it, arrives in the parent as a writable array."""
    array = np.arange(OUT_OF_BAND, dtype=np.uint8)
    same, tail = fork_pool.process(identity, [array], timeout=T)[0], fork_pool.process(
        lambda a: a[16:], [array], timeout=T)[0]
    assert np.array_equal(same, array) and np.array_equal(tail, array[16:])
    assert same.flags.writeable
    assert tail.flags.writeable


def test_nested_large_buffers_round_trip(fork_pool):
    """Large buffers nested in dicts, tuples and lists arrive intact, each
    in its place."""
    task = {"image": np.ones((300, 300), dtype=np.uint16),
            "pair": (make_bytes(OUT_OF_BAND + 1), bytearray(b"q" * OUT_OF_BAND)),
            "list": [np.arange(OUT_OF_BAND // 4, dtype=np.float32), 5, None]}
    result = fork_pool.process(identity, [task], timeout=T)[0]
    assert set(result) == {"image", "pair", "list"}
    assert same_buffer(result["image"], task["image"])
    assert same_buffer(result["pair"][0], task["pair"][0])
    assert same_buffer(result["pair"][1], task["pair"][1])
    assert same_buffer(result["list"][0], task["list"][0])
    assert result["list"][1:] == [5, None]


def test_task_array_kept_by_a_worker_is_not_overwritten():
    """A task that keeps its input array (in worker_state) still sees the
    same data after later tasks have passed through the data arena."""
    with small_pool(workers=1) as p:
        assert p.process(keep_task_array, [np.full(OUT_OF_BAND, 7, np.uint8)], timeout=T) == [7]
        for i in range(4):
            tasks = [np.full(OUT_OF_BAND, i, np.uint8) for _ in range(3)]
            assert p.process(first_element, tasks, timeout=T) == [i] * 3
        assert p.process(kept_array_range, [0], timeout=T) == [(7, 7)]


# --------------------------------------------------------------------------
# 2. Shared arrays: share(), empty_shared()
# --------------------------------------------------------------------------


def test_share_copies_into_a_shared_array():
    """share() returns a SharedArray holding a copy of the data, of the same
    dtype and shape; later changes to the source do not reach it.
    empty_shared() gives an array of the asked shape and dtype."""
    source = np.arange(12, dtype=np.int32).reshape(3, 4)
    shared = share(source)
    assert isinstance(shared, SharedArray)
    assert shared.dtype == np.int32 and shared.shape == (3, 4)
    assert np.array_equal(shared, source)
    source[0, 0] = 100
    assert shared[0, 0] == 0
    converted = share([1, 2, 3], dtype=np.float32)
    assert converted.dtype == np.float32 and converted.tolist() == [1.0, 2.0, 3.0]
    empty = empty_shared((2, 5), np.uint8)
    assert isinstance(empty, SharedArray)
    assert (empty.shape, empty.dtype) == ((2, 5), np.uint8)
    assert empty_shared(7).shape == (7,) and empty_shared(7).dtype == np.float64
    # Arrays computed from a SharedArray are ordinary arrays.
    assert type(shared * 2) is np.ndarray
    assert poolme_mp.SharedArray is SharedArray


def test_share_rejects_object_arrays():
    """Object arrays cannot be shared: share() and empty_shared() raise
    TypeError."""
    with pytest.raises(TypeError, match="object"):
        share(np.array([1, "a"], dtype=object))
    with pytest.raises(TypeError, match="object"):
        empty_shared(3, dtype=object)


def test_worker_writes_into_empty_shared_are_visible(pool):
    """Tasks writing by index into an empty_shared array (passed in every
    task) write into the parent's array: every write is visible there."""
    out = empty_shared(50, np.int64)
    out[:] = -1
    assert pool.process(write_into, [(out, i) for i in range(50)], timeout=T) == list(range(50))
    assert out.tolist() == [i * 10 for i in range(50)]


def test_shared_array_is_passed_by_reference(pool):
    """A shared array in a task is a reference, not a copy: a worker sees
    changes the parent made after share() and after an earlier call."""
    table = share(np.zeros(OUT_OF_BAND // 8 * 4))
    assert pool.process(shared_sum, [table] * 6, timeout=T) == [0.0] * 6
    table[:] = 1.0
    assert pool.process(shared_sum, [table] * 6, timeout=T) == [float(table.size)] * 6
    table[5] = 100.0
    assert pool.process(shared_sum, [table[:10]], timeout=T) == [109.0]


def test_shared_array_in_a_closure_travels_by_reference(pool):
    """A shared array captured by a lambda reaches the workers by
    reference: their writes land in the parent's array, and they read the
    parent's current values."""
    out = empty_shared(20, np.float64)
    table = share(np.arange(20, dtype=np.float64))

    def fill(i):
        out[i] = table[i] * 3
        return i

    assert pool.process(fill, range(20), timeout=T) == list(range(20))
    assert out.tolist() == [3.0 * i for i in range(20)]
    table[:] = 1.0
    assert pool.process(lambda i: float(table[i]), range(20), timeout=T) == [1.0] * 20


def test_shared_views_travel_with_their_offsets_and_strides(pool):
    """Views of a shared array (slices, steps, transposes, reversals) reach
    workers as the same view: same shape and elements."""
    base = share(np.arange(60, dtype=np.int64).reshape(6, 10))
    views = [base[2:4], base[:, ::3], base.T, base[::-1, ::-2], base[1:5, 2:7:2], base[3]]
    results = pool.process(describe_row, views, timeout=T)
    for view, (kind, dtype, shape, _, values) in zip(views, results, strict=True):
        assert (kind, dtype, shape, values) == ("SharedArray", "<i8", view.shape, view.tolist())


def test_shared_arrays_stay_valid_after_the_pool_shuts_down(start_method):
    """Shared arrays, including what workers wrote into them, stay valid
    and readable after the pool has shut down and its workers are gone."""
    out = empty_shared(16, np.int64)
    table = share(np.arange(16.0))
    with WorkerPool(2, start_method=start_method) as p:
        p.process(write_into, [(out, i) for i in range(16)], timeout=T)
        assert p.process(shared_sum, [table], timeout=T) == [120.0]
    assert out.tolist() == [i * 10 for i in range(16)]
    assert table.sum() == 120.0
    out[0] = 5
    assert out[0] == 5


def test_shared_memory_is_freed_when_the_last_reference_goes(start_method):
    """A shared array's segment stays mapped while the array or any view of
    it is referenced here, and is unmapped and its descriptor closed once
    the last reference goes (after the pool used it)."""
    gc.collect()
    maps0, fds0 = segment_maps(), segment_fds()
    table = share(np.arange(OUT_OF_BAND, dtype=np.float64))
    out = empty_shared(8, np.int64)
    assert segment_maps() == maps0 + 2
    with WorkerPool(2, start_method=start_method) as p:
        assert p.process(shared_sum, [table] * 4, timeout=T) == [float(table.sum())] * 4
        p.process(write_into, [(out, i) for i in range(8)], timeout=T)
    view = table[10:20]
    del table
    gc.collect()
    assert segment_maps() == maps0 + 2
    assert view.tolist() == [float(i) for i in range(10, 20)]
    del view, out
    gc.collect()
    assert segment_maps() == maps0
    assert segment_fds() == fds0


def test_array_input_copy_is_freed_after_the_call(fork_pool):
    """process() over a plain array shares it for the call only: no shared
    segment is left mapped here once the call returns."""
    gc.collect()
    maps0 = segment_maps()
    assert fork_pool.process(shared_sum, np.ones((64, 1024)), timeout=T) == [1024.0] * 64
    gc.collect()
    assert segment_maps() == maps0


def test_new_shared_array_is_not_confused_with_a_freed_one(pool):
    """After a shared array is freed, a new one of the same size (which may
    get the same descriptor number) is seen by the workers with its own
    data, not the old array's."""
    for value in (1.0, 2.0, 3.0, 4.0):
        table = share(np.full(1000, value))
        assert pool.process(shared_sum, [table] * 4, timeout=T) == [1000.0 * value] * 4
        del table
        gc.collect()


def test_shared_array_returned_by_a_task_is_freed_when_dropped(fork_pool):
    """A shared array that went to a worker and came back as the result is
    still freed (unmapped here) once the caller drops every reference."""
    gc.collect()
    maps0 = segment_maps()
    table = share(np.arange(1000, dtype=np.float64))
    back = fork_pool.process(identity, [table], timeout=T)[0]
    assert np.array_equal(back, table)
    del table, back
    gc.collect()
    assert segment_maps() == maps0


def test_shared_array_created_in_a_worker_arrives_intact(fork_pool):
    """A task may return an array made with share(); the parent receives its
    data intact."""
    results = fork_pool.process(make_shared, [10, 20], timeout=T)
    assert [r.tolist() for r in results] == [list(np.arange(10.0)), list(np.arange(20.0))]


def test_shared_structured_array_keeps_its_dtype(fork_pool):
    """A shared array of a structured dtype reaches the worker with its
    fields."""
    table = share(np.zeros(4, dtype=STRUCT))
    assert fork_pool.process(dtype_names, [table], timeout=T) == [("id", "score", "tag")]


# --------------------------------------------------------------------------
# 3. numpy arrays as the input of process()
# --------------------------------------------------------------------------


def test_2d_input_gives_read_only_rows_in_order(fork_pool):
    """process(fn, 2-D array) calls fn once per row, in order; each row is
    a read-only ndarray view with the row's dtype, shape and values."""
    array = np.arange(200 * 7, dtype=np.int32).reshape(200, 7)
    results = fork_pool.process(describe_row, array, timeout=T)
    assert results == [("ndarray", "<i4", (7,), False, row.tolist()) for row in array]


def test_3d_input_gives_2d_rows(fork_pool):
    """Rows of a 3-D array are 2-D read-only views."""
    array = np.arange(5 * 3 * 4, dtype=np.float64).reshape(5, 3, 4)
    results = fork_pool.process(describe_row, array, timeout=T)
    assert results == [("ndarray", "<f8", (3, 4), False, row.tolist()) for row in array]


@pytest.mark.parametrize("array", [
    np.arange(-50, 50, dtype=np.int64),
    np.linspace(-1.0, 1.0, 101),
    np.array([True, False, True]),
    np.array([1 + 2j, -3j, 0j]),
    np.array([0.5, 1.25, -2.0], dtype=np.float32),
    np.arange(0, 256, 5, dtype=np.uint8),
    np.array([-1, 2, 3], dtype=np.int8),
    np.array(["2020-01-01", "2021-06-30"], dtype="datetime64[D]"),
    np.array(["ab", "c", ""]),
], ids=["int64", "float64", "bool", "complex", "float32", "uint8", "int8", "datetime", "str"])
def test_1d_input_gives_python_scalars(fork_pool, array):
    """Elements of a 1-D array arrive as Python scalars, exactly as
    array.tolist() gives them (type and value), in order."""
    results = fork_pool.process(describe_scalar, array, timeout=T)
    assert results == [(type(x).__name__, x) for x in array.tolist()]


def test_object_array_input_gives_the_objects(fork_pool):
    """Elements of an object array arrive as the objects themselves."""
    array = np.array([1, "two", None, (3, 4), {"k": [5]}], dtype=object)
    results = fork_pool.process(identity, array, timeout=T)
    assert results == [1, "two", None, (3, 4), {"k": [5]}]


@pytest.mark.parametrize("shape", [(0,), (0, 3), (0, 2, 2)])
def test_empty_array_input_gives_no_results(fork_pool, shape):
    """An empty array as input runs nothing and gives an empty list."""
    assert fork_pool.process(describe_row, np.empty(shape), timeout=T) == []


def test_0d_array_input_is_rejected(fork_pool):
    """A 0-d array has no rows: process() raises TypeError."""
    with pytest.raises(TypeError, match="0-d"):
        fork_pool.process(identity, np.array(5), timeout=T)


@pytest.mark.parametrize("name", ["step", "reversed", "transposed", "column-step", "fortran"])
def test_non_contiguous_input_gives_the_right_rows(fork_pool, name):
    """Sliced, stepped, reversed, transposed and Fortran-ordered inputs give
    exactly the rows (or elements) that iterating them in Python gives."""
    base = np.arange(12 * 9, dtype=np.int64).reshape(12, 9)
    array = {"step": base[::3], "reversed": base[::-1], "transposed": base.T,
             "column-step": base[1:10:2, ::4], "fortran": np.asfortranarray(base)}[name]
    results = fork_pool.process(describe_row, array, timeout=T)
    assert [r[4] for r in results] == [row.tolist() for row in array]
    assert all(r[3] is False for r in results)
    flat = base.ravel()[::7]
    assert fork_pool.process(identity, flat, timeout=T) == flat.tolist()
    assert fork_pool.process(identity, flat[::-1], timeout=T) == flat[::-1].tolist()


def test_uint8_image_stack_rows_are_images(fork_pool):
    """Rows of an (n, H, W, 3) uint8 stack are (H, W, 3) uint8 images; an
    image filter over them returns the filtered images in order."""
    rng = np.random.default_rng(3)
    images = rng.integers(0, 256, (6, 64, 48, 3), dtype=np.uint8)
    results = fork_pool.process(invert, images, timeout=T)
    assert len(results) == 6
    for result, image in zip(results, images, strict=True):
        assert result.dtype == np.uint8 and result.shape == (64, 48, 3)
        assert np.array_equal(result, 255 - image)


def test_bool_and_float32_rows(fork_pool):
    """Rows of bool and float32 2-D arrays keep their dtype."""
    flags = np.arange(12).reshape(4, 3) % 2 == 0
    assert fork_pool.process(describe_row, flags, timeout=T) == [
        ("ndarray", "|b1", (3,), False, row.tolist()) for row in flags]
    floats = np.linspace(0, 1, 12, dtype=np.float32).reshape(3, 4)
    assert fork_pool.process(describe_row, floats, timeout=T) == [
        ("ndarray", "<f4", (4,), False, row.tolist()) for row in floats]


def test_structured_dtype_input_keeps_its_fields(fork_pool):
    """Elements of a 1-D structured array arrive as tolist() gives them
    (tuples), and rows of a 2-D structured array keep the field names."""
    records = np.array([(1, 2.5, b"abc"), (2, -1.0, b"xy")], dtype=STRUCT)
    assert fork_pool.process(identity, records, timeout=T) == records.tolist()
    table = np.zeros((3, 2), dtype=STRUCT)
    assert fork_pool.process(dtype_names, table, timeout=T) == [("id", "score", "tag")] * 3


def test_shared_array_input_is_not_copied(pool):
    """process(fn, shared_array) hands out rows of that very array: rows
    are read-only in the worker, and the parent's later writes show in a
    following call."""
    table = share(np.zeros((8, 4)))
    assert pool.process(shared_sum, table, timeout=T) == [0.0] * 8
    table[3] = 1.0
    assert pool.process(shared_sum, table, timeout=T) == [0.0] * 3 + [4.0] + [0.0] * 4
    assert pool.process(describe_row, table, timeout=T)[3][:4] == ("ndarray", "<f8", (4,), False)


# --------------------------------------------------------------------------
# 4. Typed output: dtype= and out=
# --------------------------------------------------------------------------


@pytest.mark.parametrize("source, dtype", [
    (np.arange(1000, dtype=np.float64), np.float64),
    (np.arange(1000, dtype=np.int64), np.int64),
    (np.arange(1000, dtype=np.int64), np.float64),
    (np.arange(1000, dtype=np.float64), np.float32),
    (np.arange(1000, dtype=np.int64), np.int32),
    (np.arange(1000, dtype=np.int64), np.uint16),
    (np.arange(1000, dtype=np.float64), np.complex128),
    (list(range(1000)), np.float64),
], ids=["f64-f64", "i64-i64", "i64-f64", "f64-f32", "i64-i32", "i64-u16", "f64-c128", "list"])
def test_dtype_gives_an_array_of_scalar_results(fork_pool, source, dtype):
    """dtype= returns a plain ndarray of that dtype and shape (n,), holding
    every result in input order."""
    result = fork_pool.process(double, source, dtype=dtype, timeout=T)
    assert type(result) is np.ndarray
    assert result.dtype == np.dtype(dtype)
    assert result.shape == (1000,)
    assert np.array_equal(result, (np.arange(1000) * 2).astype(dtype))
    assert result.flags.writeable


def test_dtype_bool_results(fork_pool):
    """Boolean results fill a bool array."""
    result = fork_pool.process(lambda x: x % 3 == 0, np.arange(30), dtype=bool, timeout=T)
    assert result.dtype == np.bool_ and result.tolist() == [x % 3 == 0 for x in range(30)]


def test_dtype_gives_an_array_of_fixed_shape_results(fork_pool):
    """With array results of one fixed shape, dtype= returns an array of
    shape (n, *shape)."""
    result = fork_pool.process(as_vector, np.arange(300.0), dtype=np.float32, timeout=T)
    assert type(result) is np.ndarray
    assert result.dtype == np.float32 and result.shape == (300, 3)
    assert np.array_equal(result, np.repeat(np.arange(300.0, dtype=np.float32)[:, None], 3, 1))
    images = np.arange(10 * 8 * 6 * 3, dtype=np.uint8).reshape(10, 8, 6, 3)
    inverted = fork_pool.process(invert, images, dtype=np.uint8, timeout=T)
    assert inverted.dtype == np.uint8 and inverted.shape == (10, 8, 6, 3)
    assert np.array_equal(inverted, 255 - images)


def test_typed_result_stays_valid_after_shutdown(fork_pool):
    """The array dtype= returns stays valid and writable after the pool is
    shut down."""
    result = fork_pool.process(half, np.arange(100.0), dtype=np.float64, timeout=T)
    fork_pool.shutdown()
    assert np.array_equal(result, np.arange(100.0) / 2)
    result[0] = 7.0
    assert result[0] == 7.0


@pytest.mark.parametrize("kind", ["plain", "shared", "2-d", "column"])
def test_out_writes_into_the_callers_array_and_returns_it(fork_pool, kind):
    """out= writes every result into the caller's array (plain, shared,
    2-D, or a strided column view) and returns that very array."""
    if kind == "plain":
        out, fn, expected = np.zeros(50), half, np.arange(50) / 2
    elif kind == "shared":
        out, fn, expected = empty_shared(50, np.float64), half, np.arange(50) / 2
    elif kind == "2-d":
        out, fn = np.zeros((50, 3), np.float32), as_vector
        expected = np.repeat(np.arange(50.0)[:, None], 3, 1)
    else:
        frame = np.full((50, 2), -1.0)
        out, fn, expected = frame[:, 1], half, np.arange(50) / 2
    returned = fork_pool.process(fn, np.arange(50.0), out=out, timeout=T)
    assert np.array_equal(out, expected)
    assert returned is out
    if kind == "column":
        assert (frame[:, 0] == -1.0).all()


def test_typed_fast_path_serves_float64_vectors(fork_pool):
    """A float64 vector in, float64 out runs on the C fast path (every
    task after the first, which only probes the output shape)."""
    result = fork_pool.process(on_fast_path, np.arange(400, dtype=np.float64),
                               dtype=np.float64, timeout=T)
    assert result[1:].tolist() == [1.0] * 399


@pytest.mark.parametrize("source_dtype, out_dtype", [
    (np.int64, np.int64), (np.int64, np.float64), (np.float64, np.int64)])
def test_typed_fast_path_serves_int64_vectors(fork_pool, source_dtype, out_dtype):
    """int64 vectors (in or out, with float64) run on the C fast path."""
    result = fork_pool.process(on_fast_path, np.arange(400, dtype=source_dtype),
                               dtype=out_dtype, timeout=T)
    assert result[1:].tolist() == [1] * 399


# The cause is numpy's error on the general path, the C conversion's on
# the float64/int64 fast path; the error type and index are the same.
MISFITS = [
    ("non-number, float32 out", string_at_two, np.float32, ValueError),
    ("wrong shape, (3,) items", wrong_shape_at_two, np.float64, ValueError),
    ("non-number, int64 out, fast path", string_at_two, np.int64, TypeError),
    ("non-number, fast path", string_at_two, np.float64, TypeError),
    ("array for a scalar, fast path", vector_at_two, np.float64, TypeError),
]


@pytest.mark.parametrize("name, fn, dtype, cause", MISFITS, ids=[c[0] for c in MISFITS])
def test_misfit_result_fails_its_own_task(fork_pool, name, fn, dtype, cause):
    """A result of the wrong shape, or not a number, fails that task alone
    with TaskSerializationError(direction="result") naming its index and
    holding the numpy error as __cause__; with continue_on_error every
    other result is in the array (TaskErrorGroup.results)."""
    source = np.arange(8, dtype=np.float64)
    with pytest.raises(TaskError) as caught:
        fork_pool.process(fn, source, dtype=dtype, timeout=T)
    error = caught.value
    assert type(error) is TaskSerializationError
    assert error.direction == "result"
    assert error.index == 2
    assert type(error.__cause__) is cause
    with pytest.raises(TaskErrorGroup) as group:
        fork_pool.process(fn, source, dtype=dtype, continue_on_error=True, timeout=T)
    assert [(type(e), e.index) for e in group.value.exceptions] == [(TaskSerializationError, 2)]
    results = group.value.results
    assert results.dtype == np.dtype(dtype)
    good = [0, 1, 3, 4, 5, 6, 7]
    expected = np.array([fn(float(x)) for x in good]).astype(dtype)
    assert np.array_equal(results[good], expected)


def test_misfit_error_message_names_the_output_array(fork_pool):
    """The error of a result that does not fit the output says so rather
    than blaming pickling."""
    with pytest.raises(TaskSerializationError) as caught:
        fork_pool.process(wrong_shape_at_two, np.arange(8.0), dtype=np.float64, timeout=T)
    message = str(caught.value).split("Worker traceback")[0]
    assert "pickled" not in message
    assert "output" in message


def test_task_exception_in_a_typed_call_names_its_index(fork_pool):
    """A task that raises in a dtype= call fails with TaskError at its
    index, its exception as __cause__, on the fast and general paths."""
    for dtype in (np.float64, np.float32):
        with pytest.raises(TaskError) as caught:
            fork_pool.process(lambda x: 1.0 / (x - 5), np.arange(10.0), dtype=dtype, timeout=T)
        assert caught.value.index == 5
        assert type(caught.value.__cause__) is ZeroDivisionError


@pytest.mark.parametrize("dtype", [np.float64, np.int32, np.complex64])
def test_empty_input_gives_an_empty_array_of_the_dtype(fork_pool, dtype):
    """dtype= over an empty input (list or array) gives an empty array of
    that dtype; out= of length 0 is returned as is."""
    for source in ([], np.empty(0), np.empty((0, 3))):
        result = fork_pool.process(half, source, dtype=dtype, timeout=T)
        assert type(result) is np.ndarray
        assert result.dtype == np.dtype(dtype) and result.shape == (0,)
    out = np.empty(0, dtype=dtype)
    assert fork_pool.process(half, [], out=out, timeout=T) is out


def test_out_of_the_wrong_length_fails_before_running(fork_pool):
    """out= with the wrong number of rows, a non-array out=, a dtype= that
    differs from out's, or return_exceptions with dtype= raise ValueError
    at the call, before any task runs."""
    ran = empty_shared(5, np.int64)
    ran[:] = 0
    tasks = [(ran, x) for x in range(5)]
    with pytest.raises(ValueError, match="5 rows"):
        fork_pool.process(mark_then_half, tasks, out=np.zeros(4), timeout=T)
    with pytest.raises(ValueError, match="5 rows"):
        fork_pool.process(mark_then_half, tasks, out=np.zeros(6), timeout=T)
    with pytest.raises(ValueError, match="5 rows"):
        fork_pool.process(mark_then_half, tasks, out=[0.0] * 5, timeout=T)
    with pytest.raises(ValueError, match="differs"):
        fork_pool.process(mark_then_half, tasks, out=np.zeros(5), dtype=np.int64, timeout=T)
    with pytest.raises(ValueError, match="return_exceptions"):
        fork_pool.process(mark_then_half, tasks, dtype=np.float64, return_exceptions=True,
                          timeout=T)
    assert ran.tolist() == [0] * 5
    # The pool is still fine, and the same tasks run with a fitting out=.
    out = np.zeros(5)
    assert fork_pool.process(mark_then_half, tasks, out=out, timeout=T) is out
    assert out.tolist() == [0.0, 0.5, 1.0, 1.5, 2.0]
    assert ran.tolist() == [1] * 5


def test_typed_output_with_a_generator_input(fork_pool):
    """dtype= accepts any iterable of tasks, a generator included."""
    result = fork_pool.process(half, (float(x) for x in range(20)), dtype=np.float64, timeout=T)
    assert result.tolist() == [x / 2 for x in range(20)]


# --------------------------------------------------------------------------
# 5. Sizes around the ring and the data arena
# --------------------------------------------------------------------------


def _edges(size):
    return [size - 65, size - 64, size - 1, size, size + 1, size + 64]


@pytest.mark.parametrize("boundary", ["half-ring", "ring", "out-of-band", "arena"])
def test_buffers_around_ring_and_arena_sizes_round_trip(boundary):
    """bytes and uint8 arrays just below, at and just above half the ring
    (the inline limit), the ring, the out-of-band threshold and the data
    arena round-trip exactly, as tasks and as results."""
    size = {"half-ring": SMALL_RING // 2, "ring": SMALL_RING, "out-of-band": OUT_OF_BAND,
            "arena": SMALL_ARENA}[boundary]
    with small_pool() as p:
        for n in _edges(size):
            for make in (make_bytes, make_uint8):
                buffer = make(n)
                for result in p.process(identity, [buffer, buffer, buffer], timeout=T):
                    assert same_buffer(result, buffer), (n, make.__name__)
                for result in p.process(make, [n, n], timeout=T):
                    assert same_buffer(result, buffer), (n, make.__name__)


def test_results_larger_than_the_ring_arrive_intact():
    """Results far larger than the ring (a big list, a big dict, an array
    of four rings) arrive intact."""
    with small_pool() as p:
        results = p.process(lambda n: list(range(n)), [100_000, 5], timeout=T)
        assert results == [list(range(100_000)), list(range(5))]
        mapping = p.process(lambda n: {str(i): "v" * (i % 7) for i in range(n)}, [50_000],
                            timeout=T)[0]
        assert mapping == {str(i): "v" * (i % 7) for i in range(50_000)}
        array = p.process(make_uint8, [4 * SMALL_RING], timeout=T)[0]
        assert same_buffer(array, make_uint8(4 * SMALL_RING))
        # And as a task: a list much larger than the ring.
        assert p.process(len, [list(range(100_000))], timeout=T) == [100_000]


def test_many_arena_sized_tasks_in_one_call():
    """A call whose tasks together are many times the data arena, each
    half or nearly all of it, delivers every result intact and in order."""
    with small_pool() as p:
        tasks = [np.full(SMALL_ARENA // 2, i, np.uint8) for i in range(12)]
        tasks += [np.full(SMALL_ARENA - 64, i, np.uint8) for i in range(4)]
        tasks += [np.full(SMALL_ARENA + 64, i, np.uint8) for i in range(3)]
        results = p.process(identity, tasks, timeout=T)
        assert len(results) == len(tasks)
        for result, task in zip(results, tasks, strict=True):
            assert same_buffer(result, task)


def test_array_input_and_typed_output_larger_than_the_arena():
    """process() over an array several times the data arena, with dtype=
    results of fixed shape that together exceed it too, gives exact
    results."""
    with small_pool() as p:
        rows = np.arange(8 * SMALL_ARENA, dtype=np.uint8).reshape(128, -1)
        sums = p.process(lambda r: int(r.sum(dtype=np.int64)), rows, timeout=T)
        assert sums == rows.sum(axis=1, dtype=np.int64).tolist()
        inverted = p.process(invert, rows, dtype=np.uint8, timeout=T)
        assert inverted.shape == rows.shape and np.array_equal(inverted, 255 - rows)
        halves = p.process(half, np.arange(3 * SMALL_ARENA // 8, dtype=np.float64),
                           dtype=np.float64, timeout=T)
        assert np.array_equal(halves, np.arange(3 * SMALL_ARENA // 8) / 2)


@pytest.mark.parametrize("n", [DEFAULT_ARENA, DEFAULT_ARENA + 1])
def test_buffers_at_the_default_arena_size_round_trip(fork_pool, n):
    """A task and a result of exactly the default 64 MiB data arena, and
    one byte more, round-trip exactly."""
    task = np.arange(n, dtype=np.uint8)
    result = fork_pool.process(identity, [task], timeout=T)[0]
    assert result.shape == (n,) and result.dtype == np.uint8
    assert np.array_equal(result, task)
    del result
    made = fork_pool.process(make_uint8, [n], timeout=T)[0]
    assert made.shape == (n,) and np.array_equal(made, task)


# --------------------------------------------------------------------------
# 6. A clean exit: no resource-tracker warnings
# --------------------------------------------------------------------------


CHILD_SCRIPT = textwrap.dedent("""
    import sys
    import numpy as np
    from poolme_mp import WorkerPool, empty_shared, share

    def fill(args):
        out, i = args
        out[i] = i
        return i

    def ident(x):
        return x

    if __name__ == "__main__":
        method = sys.argv[1]
        table = share(np.arange(1000.0))
        out = empty_shared(10, np.int64)
        with WorkerPool(2, start_method=method) as pool:
            pool.process(fill, [(out, i) for i in range(10)], timeout=30)
            sums = pool.process(lambda r: float(r.sum()), np.ones((16, 4096)), timeout=30)
            halves = pool.process(lambda x: x / 2, np.arange(1000.0), dtype=np.float64,
                                  timeout=30)
            big = pool.process(ident, [np.ones(1 << 20), bytes(300_000)], timeout=30)
            total = pool.process(lambda i: float(table[i]), range(1000), timeout=30)
        assert out.tolist() == list(range(10)), out
        assert sums == [4096.0] * 16 and halves[999] == 499.5
        assert big[0].sum() == 1 << 20 and big[1] == bytes(300_000)
        assert sum(total) == table.sum()
        # Exit with shared arrays still referenced.
        print("ok")
""")


def test_child_interpreter_exits_without_resource_tracker_warnings(tmp_path, start_method):
    """A program that uses shared arrays, array input, typed output and
    large buffers exits cleanly: status 0, and nothing on stderr (no
    resource_tracker warnings about leaked shared memory)."""
    script = tmp_path / "numpy_child.py"
    script.write_text(CHILD_SCRIPT)
    proc = subprocess.run([sys.executable, str(script), start_method], capture_output=True,
                          text=True, timeout=60, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "ok\n"
    assert "resource_tracker" not in proc.stderr
    assert "leaked" not in proc.stderr
    assert proc.stderr == ""


def test_float_results_into_int64_output_truncate_like_numpy_on_both_paths(fork_pool):
    """A float result stored into int64 output truncates toward zero, as
    numpy's assignment does, on the fast path (int64 vector input) and the
    general path (list input) alike; a NaN result fails its own task."""
    values = np.array([-7, -3, 0, 3, 7, 10**15], dtype=np.int64)
    expected = np.array(values / 2, dtype=np.float64).astype(np.int64)
    fast = fork_pool.process(lambda x: x / 2, values, dtype=np.int64, timeout=T)
    general = fork_pool.process(lambda x: x / 2, values.tolist(), dtype=np.int64, timeout=T)
    assert fast.dtype == general.dtype == np.int64
    assert fast.tolist() == general.tolist() == expected.tolist()
    with pytest.raises(TaskSerializationError) as caught:
        fork_pool.process(lambda x: float("nan") if x == 3 else x, values, dtype=np.int64, timeout=T)
    assert caught.value.index == 3 and caught.value.direction == "result"


def test_shared_array_returned_by_a_task_is_the_same_memory(fork_pool):
    """A shared array a task returns comes back as a view of the caller's
    own shared memory: writes through either are seen by the other."""
    table = share(np.zeros(100, dtype=np.int64))
    back = fork_pool.process(identity, [table], timeout=T)[0]
    assert isinstance(back, SharedArray)
    back[5] = 42
    assert table[5] == 42
    table[6] = 7
    assert back[6] == 7


@pytest.mark.parametrize("dtype, count", [("float16", 4), ("complex128", 4), ("complex64", 100_000),
                                          ("int32", 0), ("float64", 0),
                                          ([("a", "i4"), ("b", "f8")], 3)],
                         ids=["float16", "complex128", "complex64-large", "empty-int32",
                              "empty-float64", "structured"])
def test_memoryviews_of_any_numpy_format_round_trip(fork_pool, dtype, count):
    """Memoryviews of arrays whose format memoryview.cast cannot make
    (float16, complex, structs) and empty ones arrive with format, shape
    and bytes intact, as tasks and as results."""
    view = memoryview(np.ones(count, dtype=dtype))
    back = fork_pool.process(identity, [view], timeout=T)[0]
    made = fork_pool.process(lambda spec: memoryview(np.ones(spec[1], dtype=spec[0])),
                             [(dtype, count)], timeout=T)[0]
    for got in (back, made):
        assert isinstance(got, memoryview)
        assert (got.format, got.shape, got.tobytes()) == (view.format, view.shape, view.tobytes())
