"""Tests of WorkerPool's core batch API: process(), process_map(), argument
validation, lifecycle and thread safety.

Pools are kept small (2 workers).  Every call passes timeout= so that a hang
becomes a CallTimeoutError, and pytest-timeout (with conftest's watchdog) is
the backstop for anything else.
"""

from __future__ import annotations

import collections
import dataclasses
import decimal
import fractions
import functools
import operator
import os
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator

import pytest
from conftest import wait_until

from poolme_mp import (
    PoolClosedError,
    PoolError,
    RateLimiter,
    RetryPolicy,
    TaskError,
    TokenBucket,
    WorkerPool,
)

pytestmark = pytest.mark.timeout(60)

# Bound on every blocking call a test makes.
T = 30.0


# --------------------------------------------------------------------------
# Module-level helpers (importable by name in spawn and forkserver workers)
# --------------------------------------------------------------------------


def square(x):
    return x * x


def identity(x):
    return x


def getpid(_):
    return os.getpid()


def sleep_then_pid(seconds):
    time.sleep(seconds)
    return os.getpid()


def always_falsy(x):
    return [None, 0, "", [], {}, False, 0.0, b"", (), set()][x]


@dataclasses.dataclass(frozen=True)
class Point:
    x: int
    y: int

    def norm1(self):
        return abs(self.x) + abs(self.y)


class Plain:
    """A class without __eq__ of its own; compared by its attributes."""

    def __init__(self, value):
        self.value = value
        self.tag = f"plain-{value}"


class Adder:
    """A callable object."""

    def __init__(self, n):
        self.n = n

    def __call__(self, x):
        return x + self.n


class Multiplier:
    def __init__(self, factor):
        self.factor = factor

    def apply(self, x):
        return x * self.factor

    @staticmethod
    def negate(x):
        return -x

    @classmethod
    def label(cls, x):
        return f"{cls.__name__}:{x}"


def make_result(kind):
    """One value of each kind tested in test_results_of_many_types."""
    return {
        "dict": {"a": 1, 2: [3, 4], (5, 6): {"nested": None}},
        "tuple": (1, "two", 3.0, (4,)),
        "set": {1, 2, 3},
        "frozenset": frozenset({"x", "y"}),
        "list": [1, [2, [3, [4]]]],
        "point": Point(3, -4),
        "plain": Plain(7),
        "exception": ValueError("returned, not raised", 42),
        "bytes": b"\x00\x01\xff",
        "bigint": 2**200 + 1,
        "complex": 3 - 4j,
        "decimal": decimal.Decimal("1.10"),
        "fraction": fractions.Fraction(1, 3),
        "str": "unicode \u00e9\u4e2d\U0001f600",
        "deque": collections.deque([1, 2, 3]),
        "ordered": collections.OrderedDict([("b", 1), ("a", 2)]),
        "nested": {"points": [Point(i, i) for i in range(3)], "meta": ({"k": (None, True)},)},
        "large_bytes": bytes(range(256)) * 2048,  # 512 KiB: travels out of band
        "large_bytearray": bytearray(b"\xab" * (300 * 1024)),
    }[kind]


RESULT_KINDS = [
    "dict", "tuple", "set", "frozenset", "list", "point", "plain", "exception", "bytes",
    "bigint", "complex", "decimal", "fraction", "str", "deque", "ordered", "nested",
    "large_bytes", "large_bytearray",
]


def numbers(n: int) -> Iterator[int]:
    yield from range(n)


@pytest.fixture
def pool(start_method):
    """A started 2-worker pool under each start method."""
    with WorkerPool(2, start_method=start_method) as p:
        yield p


@pytest.fixture
def fork_pool():
    """A started 2-worker fork pool, for rules that do not depend on the start method."""
    with WorkerPool(2, start_method="fork") as p:
        yield p


# --------------------------------------------------------------------------
# process(): order and input kinds
# --------------------------------------------------------------------------


def test_process_list_keeps_input_order(pool):
    """process() over a list returns fn of each task, in input order."""
    tasks = [5, 3, 9, 1, 7, 0, 2]
    assert pool.process(square, tasks, timeout=T) == [25, 9, 81, 1, 49, 0, 4]


def test_process_tuple_keeps_input_order(fork_pool):
    """process() over a tuple returns a list, in input order."""
    result = fork_pool.process(square, (4, -2, 6), timeout=T)
    assert result == [16, 4, 36]
    assert type(result) is list


def test_process_range_keeps_input_order(fork_pool):
    """process() over a range returns a list in range order."""
    assert fork_pool.process(square, range(10, 0, -1), timeout=T) == [x * x for x in range(10, 0, -1)]


def test_process_generator_keeps_input_order(fork_pool):
    """process() reads a generator lazily and keeps its order."""
    assert fork_pool.process(square, numbers(500), timeout=T) == [i * i for i in range(500)]
    assert fork_pool.process(square, (x for x in [3, 1, 2]), timeout=T) == [9, 1, 4]


def test_tuple_tasks_are_passed_whole(pool):
    """Each task is passed as one argument, even when it is a tuple."""
    assert pool.process(len, [(1, 2), (3,), ()], timeout=T) == [2, 1, 0]
    assert pool.process(identity, [(1, "a"), [2]], timeout=T) == [(1, "a"), [2]]


def test_process_numpy_array_input(pool):
    """A numpy array's rows are the tasks, in order; a 1-D array gives Python scalars."""
    np = pytest.importorskip("numpy")
    one_d = np.arange(10, dtype=np.int64)[::-1]
    assert pool.process(lambda v: (type(v).__name__, v * 2), one_d, timeout=T) == [
        ("int", 2 * i) for i in range(9, -1, -1)]
    two_d = np.arange(12, dtype=np.float64).reshape(4, 3)
    assert pool.process(lambda row: row.tolist(), two_d, timeout=T) == two_d.tolist()
    assert pool.process(square, np.array([], dtype=np.int64), timeout=T) == []
    objects = np.array([{"a": 1}, None, "x"], dtype=object)
    assert pool.process(identity, objects, timeout=T) == [{"a": 1}, None, "x"]


def test_process_plain_iterator_and_dict_keys(fork_pool):
    """An iterator or a dict (its keys) is accepted as the task iterable."""
    assert fork_pool.process(square, iter([2, 3]), timeout=T) == [4, 9]
    assert fork_pool.process(identity, {"b": 1, "a": 2}, timeout=T) == ["b", "a"]
    assert fork_pool.process(identity, map(str, [1, 2]), timeout=T) == ["1", "2"]


@pytest.mark.parametrize(
    "empty",
    [[], (), range(0), "generator", "iterator"],
    ids=["list", "tuple", "range", "generator", "iterator"],
)
def test_process_empty_input_returns_empty_list(fork_pool, empty):
    """process() over any empty input returns [] without calling fn."""
    if empty == "generator":
        empty = (x for x in ())
    elif empty == "iterator":
        empty = iter([])
    result = fork_pool.process(square, empty, timeout=T)
    assert result == []
    assert type(result) is list


def test_process_empty_input_on_unstarted_pool(start_method):
    """process([]) on a never-started pool returns [] and leaves no processes."""
    p = WorkerPool(2, start_method=start_method)
    try:
        assert p.process(square, [], timeout=T) == []
    finally:
        p.shutdown()


def test_process_single_task(fork_pool):
    """A batch of one task returns a one-element list."""
    assert fork_pool.process(square, [12], timeout=T) == [144]


def test_process_100k_tiny_tasks_equal_serial(pool):
    """100 000 tiny tasks give exactly the serial result."""
    tasks = range(100_000)
    assert pool.process(square, tasks, timeout=T) == list(map(square, tasks))


def test_process_uses_several_workers(fork_pool):
    """Slow tasks are spread over both workers, none on the parent."""
    pids = fork_pool.process(sleep_then_pid, [0.05] * 8, timeout=T)
    assert len(set(pids)) == 2
    assert os.getpid() not in pids


# --------------------------------------------------------------------------
# process(): results
# --------------------------------------------------------------------------


def test_none_and_falsy_results_are_results(pool):
    """None and falsy values returned by fn are kept as results, types intact."""
    result = pool.process(always_falsy, range(10), timeout=T)
    assert result == [None, 0, "", [], {}, False, 0.0, b"", (), set()]
    assert [type(r) for r in result] == [
        type(None), int, str, list, dict, bool, float, bytes, tuple, set]


def test_none_results_in_a_large_batch(fork_pool):
    """A batch where every result is None returns that many Nones."""
    assert fork_pool.process(lambda x: None, range(5000), timeout=T) == [None] * 5000


def test_results_of_many_types(pool):
    """Results of many types come back equal to what fn returned."""
    results = pool.process(make_result, RESULT_KINDS, timeout=T)
    assert len(results) == len(RESULT_KINDS)
    by_kind = dict(zip(RESULT_KINDS, results, strict=True))
    for kind in RESULT_KINDS:
        expected = make_result(kind)
        got = by_kind[kind]
        assert type(got) is type(expected), kind
        if kind == "plain":
            assert vars(got) == {"value": 7, "tag": "plain-7"}
        elif kind == "exception":
            assert got.args == ("returned, not raised", 42)
        else:
            assert got == expected, kind
    assert list(by_kind["ordered"]) == ["b", "a"]
    assert by_kind["point"].norm1() == 7


class Flag(int):
    """An int subclass: must come back as itself, not as a plain int."""


def number_batch(kind):
    """Lists that sit on the edge of the packed-numbers encoding."""
    batches = {
        "ints": [0, -1, 1, 2**31, -(2**31) - 1, 2**63 - 1, -(2**63), 10**12],
        "floats": [0.0, -0.0, 1.5, -2.25e300, 5e-324, float("inf"), float("-inf")],
        "huge_int": [1, 2, 2**63],
        "negative_huge": [1, -(2**63) - 1],
        "bool_among_ints": [1, True, 0],
        "int_then_float": [1, 2.0],
        "float_then_int": [2.0, 1],
        "int_subclass": [1, Flag(2)],
        "bools": [True, False],
    }
    return batches[kind]


NUMBER_BATCHES = ["ints", "floats", "huge_int", "negative_huge", "bool_among_ints",
                  "int_then_float", "float_then_int", "int_subclass", "bools"]


@pytest.mark.parametrize("kind", NUMBER_BATCHES)
def test_numbers_keep_their_exact_types_and_values(fork_pool, kind):
    """Lists of numbers travel packed when they can; types and values never change.

    Each batch goes out as tasks (identity) and comes back as results, in
    one frame and spread over several.
    """
    batch = number_batch(kind)
    for tasks in (batch, batch * 3000):
        got = fork_pool.process(identity, tasks, timeout=T)
        assert got == tasks, kind
        assert [type(value) for value in got] == [type(value) for value in tasks], kind
        assert [repr(value) for value in got] == [repr(value) for value in tasks], kind


def test_nan_results_come_back_as_nan(fork_pool):
    """NaN (which equals nothing) survives the packed float encoding."""
    import math

    got = fork_pool.process(lambda x: float("nan") if x % 2 else x / 2, range(1000), timeout=T)
    assert all(math.isnan(v) for v in got[1::2])
    assert got[0::2] == [x / 2 for x in range(0, 1000, 2)]


@pytest.mark.parametrize("tasks", [range(0, 50_000, 7), range(10, -10, -3), range(5, 6),
                                   range(-(2**40), -(2**40) + 3000)],
                         ids=["step", "negative_step", "one", "large_values"])
def test_range_input_is_sent_in_slices(pool, tasks):
    """A range input arrives task by task as the same ints, whatever its step."""
    assert pool.process(identity, tasks, timeout=T) == list(tasks)
    assert list(pool.process_stream(square, tasks, timeout=T)) == [x * x for x in tasks]


def fail_first_time_per_worker(x):
    """Fails on x % 31 == 0 the first time this worker sees x; x % 97 == 0 always."""
    from poolme_mp import worker_state

    if x % 97 == 0:
        raise ValueError(x)
    seen = worker_state.setdefault("seen", set())
    if x % 31 == 0 and x not in seen:
        seen.add(x)
        raise KeyError(x)
    return x


def test_range_input_with_retries_and_failures(fork_pool):
    """Tasks of a range input are retried and reported by their own index.

    With two workers a task fails at most twice before it succeeds, so
    three attempts always suffice for the KeyError tasks.
    """
    policy = RetryPolicy(max_attempts=3, initial_delay=0.001, retry_on=(KeyError,))
    got = fork_pool.process(fail_first_time_per_worker, range(3000), retry=policy,
                            return_exceptions=True, timeout=T)
    for x, value in zip(range(3000), got, strict=True):
        if x % 97 == 0:
            assert isinstance(value, TaskError) and value.index == x
            assert isinstance(value.__cause__, ValueError)
        else:
            assert value == x


def test_large_arguments_and_results_round_trip(pool):
    """Arguments and results of several MiB (out of band) arrive intact and in order."""
    blobs = [bytes([i]) * (1 << 20) + bytes(range(256)) * i for i in range(6)]
    assert pool.process(len, blobs, timeout=T) == [len(b) for b in blobs]
    echoed = pool.process(identity, blobs, timeout=T)
    assert [type(b) for b in echoed] == [bytes] * 6
    assert echoed == blobs
    big = pool.process(lambda n: b"z" * n, [9 << 20], timeout=T)
    assert len(big[0]) == 9 << 20 and big[0] == b"z" * (9 << 20)


def test_large_numpy_arguments(pool):
    """Large numpy arrays travel to the workers intact (read-only in the worker)."""
    np = pytest.importorskip("numpy")
    arrays = [np.full(200_000, i, dtype=np.int64) for i in range(5)]
    sums = pool.process(lambda a: (int(a.sum()), a.shape, a.flags.writeable), arrays, timeout=T)
    assert [s[0] for s in sums] == [200_000 * i for i in range(5)]
    assert [s[1] for s in sums] == [(200_000,)] * 5
    doubled = pool.process(lambda a: a * 2, arrays, timeout=T)
    assert [int(d[0]) for d in doubled] == [0, 2, 4, 6, 8]
    assert all(d.shape == (200_000,) and d.dtype == np.int64 for d in doubled)


def test_exception_subclass_returned_as_value_is_a_result(fork_pool):
    """An exception returned (not raised) is a result, never a failure."""
    results = fork_pool.process(lambda x: KeyError(x), [1, 2], timeout=T)
    assert [type(r) for r in results] == [KeyError, KeyError]
    assert [r.args for r in results] == [(1,), (2,)]


def test_numpy_array_results(fork_pool):
    """numpy arrays, small and out-of-band large, round-trip exactly."""
    np = pytest.importorskip("numpy")
    results = fork_pool.process(lambda n: np.arange(n, dtype=np.float64), [3, 100_000], timeout=T)
    assert results[0].tolist() == [0.0, 1.0, 2.0]
    assert results[1].shape == (100_000,)
    assert results[1].dtype == np.float64
    assert float(results[1].sum()) == float(sum(range(100_000)))


# --------------------------------------------------------------------------
# process(): kinds of callables
# --------------------------------------------------------------------------


def test_lambda(pool):
    """A lambda runs in the workers."""
    assert pool.process(lambda x: x + 100, [1, 2, 3], timeout=T) == [101, 102, 103]


def test_closure(pool):
    """A closure carries its captured variables to the workers."""
    offset = 7
    table = {1: "one", 2: "two"}

    def describe(x):
        return f"{table[x]}+{offset}"

    assert pool.process(describe, [2, 1], timeout=T) == ["two+7", "one+7"]


def test_nested_closure_factory(pool):
    """A closure built by a factory function keeps its own captured value."""

    def make_adder(n):
        return lambda x: x + n

    assert pool.process(make_adder(5), [1, 2], timeout=T) == [6, 7]
    assert pool.process(make_adder(-5), [1, 2], timeout=T) == [-4, -3]


def test_functools_partial(pool):
    """functools.partial of a builtin and of a module function both work."""
    assert pool.process(functools.partial(pow, 2), [0, 1, 10], timeout=T) == [1, 2, 1024]
    assert pool.process(functools.partial(int, base=16), ["ff", "10"], timeout=T) == [255, 16]


def test_builtins(pool):
    """Builtin functions and types are valid task functions."""
    assert pool.process(abs, [-3, 4, -5], timeout=T) == [3, 4, 5]
    assert pool.process(len, ["a", "bcd", ""], timeout=T) == [1, 3, 0]
    assert pool.process(str, [1, None], timeout=T) == ["1", "None"]
    assert pool.process(operator.itemgetter(1), [(0, "x"), (0, "y")], timeout=T) == ["x", "y"]


def test_methods_of_objects(pool):
    """Bound, static and class methods, and methods of builtin types, work."""
    m = Multiplier(3)
    assert pool.process(m.apply, [1, 2, 3], timeout=T) == [3, 6, 9]
    assert pool.process(Multiplier.negate, [1, -2], timeout=T) == [-1, 2]
    assert pool.process(Multiplier.label, [1], timeout=T) == ["Multiplier:1"]
    assert pool.process(str.upper, ["ab", "c"], timeout=T) == ["AB", "C"]
    assert pool.process({"a": 1, "b": 2}.get, ["b", "a", "z"], timeout=T) == [2, 1, None]
    assert pool.process(Point.norm1, [Point(1, -2)], timeout=T) == [3]
    assert pool.process(Adder(10), [1, 2], timeout=T) == [11, 12]


def test_function_defined_in_test_module(pool):
    """A function defined at module level in the test module is found by workers."""
    assert pool.process(square, [3], timeout=T) == [9]
    assert pool.process(always_falsy, [1], timeout=T) == [0]
    assert pool.process(Plain, [5], timeout=T)[0].tag == "plain-5"


def test_class_defined_in_test_module_as_task_and_result(pool):
    """Instances of a module-level class travel both ways unchanged."""
    result = pool.process(lambda p: Point(p.y, p.x), [Point(1, 2), Point(3, 4)], timeout=T)
    assert result == [Point(2, 1), Point(4, 3)]
    assert all(type(r) is Point for r in result)


def test_function_changed_between_calls_is_not_stale(fork_pool):
    """Two different lambdas in a row each run their own code (no stale cache)."""
    assert fork_pool.process(lambda x: x + 1, [1], timeout=T) == [2]
    assert fork_pool.process(lambda x: x + 2, [1], timeout=T) == [3]
    captured = [10]
    assert fork_pool.process(lambda x: x + captured[0], [1], timeout=T) == [11]
    captured[0] = 20
    assert fork_pool.process(lambda x: x + captured[0], [1], timeout=T) == [21]


def test_more_distinct_functions_than_the_worker_cache_holds():
    """Past the workers' function cache size, old and new functions still run their own code."""
    with WorkerPool(1, start_method="fork") as p:
        fns = [functools.partial(lambda k, x: x * 1000 + k, k) for k in range(80)]
        got = [p.process(fn, [1], timeout=T)[0] for fn in fns]
        assert got == [1000 + k for k in range(80)]
        # The first ones were evicted from the worker's cache: they must be resent.
        assert [p.process(fns[k], [2], timeout=T)[0] for k in (0, 1, 79, 5)] == [
            2000, 2001, 2079, 2005]


def test_locally_defined_class_as_result(fork_pool):
    """An instance of a class defined inside the test function comes back by value."""

    class Local:
        def __init__(self, v):
            self.v = v

    results = fork_pool.process(lambda v: Local(v * 2), [1, 2], timeout=T)
    assert [r.v for r in results] == [2, 4]
    assert [type(r).__name__ for r in results] == ["Local", "Local"]


# --------------------------------------------------------------------------
# Functions defined in __main__
# --------------------------------------------------------------------------

MAIN_SCRIPT = textwrap.dedent(
    """
    import sys
    from poolme_mp import WorkerPool

    class Box:
        def __init__(self, v):
            self.v = v

    def triple(x):
        return 3 * x

    def boxed(x):
        return Box(x)

    if __name__ == "__main__":
        method = sys.argv[1]
        with WorkerPool(2, start_method=method) as pool:
            print("triple", pool.process(triple, [1, 2, 3], timeout=30))
            print("lambda", pool.process(lambda x: triple(x) + 1, [1, 2], timeout=30))
            out = pool.process(boxed, [4, 5], timeout=30)
            print("boxed", [b.v for b in out], all(isinstance(b, Box) for b in out))
        print("done")
    """
)


@pytest.mark.parametrize("method", ["spawn", "forkserver"])
def test_function_defined_in_main_script(tmp_path, method):
    """A function and a class defined in a script's __main__ work under spawn and forkserver."""
    script = tmp_path / "main_script.py"
    script.write_text(MAIN_SCRIPT)
    proc = subprocess.run(
        [sys.executable, str(script), method],
        capture_output=True, text=True, timeout=60, cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == [
        "triple [3, 6, 9]",
        "lambda [4, 7]",
        "boxed [4, 5] True",
        "done",
    ]


# --------------------------------------------------------------------------
# process_map()
# --------------------------------------------------------------------------


def test_process_map_keeps_keys_in_order(pool):
    """process_map() returns a dict with the same keys in the same order."""
    mapping = {"zeta": 1, "alpha": 2, "mid": 3, "beta": 4}
    result = pool.process_map(square, mapping, timeout=T)
    assert result == {"zeta": 1, "alpha": 4, "mid": 9, "beta": 16}
    assert list(result) == ["zeta", "alpha", "mid", "beta"]
    assert type(result) is dict


def test_process_map_non_str_keys(fork_pool):
    """Keys of any hashable type are kept as they are."""
    mapping = {3: 1, (1, "a"): 2, None: 3, frozenset({1}): 4, 2.5: 5, Point(0, 0): 6}
    result = fork_pool.process_map(square, mapping, timeout=T)
    assert list(result.items()) == [
        (3, 1), ((1, "a"), 4), (None, 9), (frozenset({1}), 16), (2.5, 25), (Point(0, 0), 36)]


def test_process_map_iterable_of_pairs(fork_pool):
    """An iterable of (key, value) tuples is accepted, order kept."""
    pairs = [("b", 2), ("a", 3), ("c", 4)]
    assert list(fork_pool.process_map(square, pairs, timeout=T).items()) == [
        ("b", 4), ("a", 9), ("c", 16)]
    gen = ((k, v) for k, v in pairs)
    assert list(fork_pool.process_map(square, gen, timeout=T).items()) == [
        ("b", 4), ("a", 9), ("c", 16)]
    assert fork_pool.process_map(square, zip("xy", [5, 6], strict=True), timeout=T) == {"x": 25, "y": 36}
    assert fork_pool.process_map(square, {"k": 3}.items(), timeout=T) == {"k": 9}


def test_process_map_other_mapping_types(fork_pool):
    """Any Mapping works (OrderedDict, a read-only mappingproxy)."""
    import types

    od = collections.OrderedDict([("y", 2), ("x", 3)])
    assert list(fork_pool.process_map(square, od, timeout=T).items()) == [("y", 4), ("x", 9)]
    proxy = types.MappingProxyType({"p": 4})
    assert fork_pool.process_map(square, proxy, timeout=T) == {"p": 16}


def test_process_map_empty(fork_pool):
    """An empty mapping or pair list gives an empty dict."""
    assert fork_pool.process_map(square, {}, timeout=T) == {}
    assert fork_pool.process_map(square, [], timeout=T) == {}
    assert fork_pool.process_map(square, iter(()), timeout=T) == {}


def test_process_map_none_and_falsy_values(fork_pool):
    """None values and results are kept in a process_map."""
    result = fork_pool.process_map(identity, {"a": None, "b": 0, "c": ""}, timeout=T)
    assert result == {"a": None, "b": 0, "c": ""}


@pytest.mark.parametrize(
    "bad",
    [5, None, 3.5, "ab", b"ab", object(),
     [("a", 1), ("b", 2, 3)], [1, 2], [("a",)], ["ab"]],
    ids=["int", "None", "float", "str", "bytes", "object",
         "triple", "scalars", "single", "strings"],
)
def test_process_map_rejects_what_is_not_a_mapping_naming_mapping(bad):
    """process_map with a non-iterable, a string, or items that are not
    (key, value) tuples raises TypeError naming 'mapping'."""
    p = WorkerPool(2, start_method="fork")
    try:
        with pytest.raises(TypeError) as info:
            p.process_map(square, bad)
        assert str(info.value).startswith("mapping")
    finally:
        p.shutdown()


def append_line(path, x):
    with open(path, "a") as f:
        f.write(f"{x}\n")
    return x


def test_process_map_rejects_unhashable_key_before_running(tmp_path, fork_pool):
    """An unhashable key in a pair list raises TypeError naming 'mapping' before any task runs."""
    log = tmp_path / "ran.txt"
    fn = functools.partial(append_line, str(log))
    with pytest.raises(TypeError) as info:
        fork_pool.process_map(fn, [(["unhashable"], 1), ("ok", 2)], timeout=T)
    assert str(info.value).startswith("mapping"), str(info.value)
    time.sleep(0.2)
    assert not log.exists(), f"tasks ran before the bad key was noticed: {log.read_text()!r}"


def test_process_map_rejects_non_callable_naming_fn():
    """process_map with a non-callable fn raises TypeError naming 'fn'."""
    p = WorkerPool(2, start_method="fork")
    try:
        with pytest.raises(TypeError) as info:
            p.process_map(42, {"a": 1})
        assert str(info.value).startswith("fn")
    finally:
        p.shutdown()


# --------------------------------------------------------------------------
# Argument validation
# --------------------------------------------------------------------------


class _Limiter:
    def try_acquire(self) -> float:
        return 0.0


@pytest.mark.parametrize(
    ("kwargs", "exc_type", "name"),
    [
        ({"workers": 0}, ValueError, "workers"),
        ({"workers": -1}, ValueError, "workers"),
        ({"workers": "2"}, TypeError, "workers"),
        ({"workers": 2.0}, TypeError, "workers"),
        ({"workers": True}, TypeError, "workers"),
        ({"buffer_size": 0}, ValueError, "buffer_size"),
        ({"buffer_size": "10"}, TypeError, "buffer_size"),
        ({"start_method": "bogus"}, ValueError, "start_method"),
        ({"ring_size": 100_000}, ValueError, "ring_size"),
        ({"ring_size": 3 * 65536}, ValueError, "ring_size"),
        ({"ring_size": 1024}, ValueError, "ring_size"),
        ({"ring_size": "big"}, TypeError, "ring_size"),
        ({"max_attempts": 0}, ValueError, "max_attempts"),
        ({"max_attempts": 1.5}, TypeError, "max_attempts"),
        ({"task_timeout": -1}, ValueError, "task_timeout"),
        ({"task_timeout": "1"}, TypeError, "task_timeout"),
        ({"task_timeout": float("nan")}, ValueError, "task_timeout"),
        ({"rate_limit": 5, "rate_limiter": TokenBucket(5)}, ValueError, "rate_limit"),
        ({"rate_limit": 0}, ValueError, "rate_limit"),
        ({"rate_limit": -1}, ValueError, "rate_limit"),
        ({"rate_limit": "5"}, TypeError, "rate_limit"),
        ({"rate_limit": 5, "burst": 0}, ValueError, "burst"),
        ({"initial_delay": -1}, ValueError, "initial_delay"),
        ({"max_delay": -0.5}, ValueError, "max_delay"),
        ({"multiplier": 0.5}, ValueError, "multiplier"),
        ({"jitter": 2}, ValueError, "jitter"),
        ({"retry_on": "ValueError"}, TypeError, "retry_on"),
        ({"rate_limiter": object()}, TypeError, "rate_limiter"),
        ({"max_tasks_per_worker": 0}, ValueError, "max_tasks_per_worker"),
        ({"retry": 3}, TypeError, "retry"),
        ({"on_worker_start": 1}, TypeError, "on_worker_start"),
        ({"on_worker_stop": "x"}, TypeError, "on_worker_stop"),
        ({"on_task_start": 1}, TypeError, "on_task_start"),
        ({"on_task_end": 1}, TypeError, "on_task_end"),
        ({"on_error": 1}, TypeError, "on_error"),
        ({"on_retry": 1}, TypeError, "on_retry"),
    ],
    ids=lambda v: (",".join(f"{k}={type(x).__name__ if hasattr(x, 'try_acquire') else x!r}"
                            for k, x in v.items())
                   if isinstance(v, dict) else v.__name__ if isinstance(v, type) else str(v)),
)
def test_pool_argument_validation(kwargs, exc_type, name):
    """A bad WorkerPool argument raises TypeError/ValueError whose message starts with its name."""
    with pytest.raises(exc_type) as info:
        WorkerPool(**kwargs)
    assert type(info.value) is exc_type
    assert str(info.value).startswith(name + " "), str(info.value)


def test_valid_edge_arguments_are_accepted():
    """The smallest valid values and a custom RateLimiter are accepted (no processes started)."""
    assert isinstance(_Limiter(), RateLimiter)
    p = WorkerPool(1, buffer_size=1, ring_size=65536, max_attempts=1, task_timeout=0.5,
                   rate_limiter=_Limiter(), start_method="fork",
                   retry=None, on_task_start=print)
    assert p.workers == 1
    assert p.buffer_size == 1
    p.shutdown()
    p2 = WorkerPool(1, retry=RetryPolicy(max_attempts=3), start_method="fork")
    assert p2.retry.max_attempts == 3
    p2.shutdown()


@pytest.mark.parametrize(
    ("args", "kwargs", "exc_type", "name"),
    [
        ((5, [1]), {}, TypeError, "fn"),
        ((None, [1]), {}, TypeError, "fn"),
        ((square, 5), {}, TypeError, "tasks"),
        ((square, None), {}, TypeError, "tasks"),
        ((square, "abc"), {}, TypeError, "tasks"),
        ((square, b"abc"), {}, TypeError, "tasks"),
        ((square, [1]), {"timeout": -1}, ValueError, "timeout"),
        ((square, [1]), {"timeout": "1"}, TypeError, "timeout"),
        ((square, [1]), {"cancel": True}, TypeError, "cancel"),
        ((square, [1]), {"retry": 2}, TypeError, "retry"),
    ],
    ids=["fn-int", "fn-None", "tasks-int", "tasks-None", "tasks-str", "tasks-bytes",
         "timeout-neg", "timeout-str", "cancel-bool", "retry-int"],
)
def test_process_argument_validation(args, kwargs, exc_type, name):
    """A bad process() argument raises TypeError/ValueError whose message starts with its name."""
    p = WorkerPool(2, start_method="fork")
    try:
        with pytest.raises(exc_type) as info:
            p.process(*args, **kwargs)
        assert type(info.value) is exc_type
        assert str(info.value).startswith(name + " "), str(info.value)
    finally:
        p.shutdown()


def test_process_rejects_zero_d_array_naming_tasks():
    """A 0-d numpy array is not a task list: TypeError naming 'tasks'."""
    np = pytest.importorskip("numpy")
    p = WorkerPool(2, start_method="fork")
    try:
        with pytest.raises(TypeError) as info:
            p.process(square, np.array(5))
        assert str(info.value).startswith("tasks ")
    finally:
        p.shutdown()


def test_rejected_call_does_not_break_pool(fork_pool):
    """After a call is rejected for a bad argument, the pool still works."""
    with pytest.raises(TypeError):
        fork_pool.process(square, "abc")
    with pytest.raises(ValueError):
        fork_pool.process(square, [1], timeout=-1)
    assert fork_pool.process(square, [1, 2], timeout=T) == [1, 4]


# --------------------------------------------------------------------------
# Lifecycle
# --------------------------------------------------------------------------


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def test_context_manager_starts_and_stops_workers(start_method):
    """with WorkerPool() runs work inside and stops every worker on exit."""
    with WorkerPool(2, start_method=start_method) as p:
        assert isinstance(p, WorkerPool)
        pids = set(p.process(sleep_then_pid, [0.05] * 6, timeout=T))
        assert pids and all(_alive(pid) for pid in pids)
    wait_until(lambda: not any(_alive(pid) for pid in pids), timeout=10)
    with pytest.raises(PoolClosedError):
        p.process(square, [1], timeout=T)


def test_start_and_shutdown(start_method):
    """start() returns the pool; shutdown() stops the workers; later calls raise PoolClosedError."""
    p = WorkerPool(2, start_method=start_method)
    assert p.start() is p
    pid = p.process(getpid, [0], timeout=T)[0]
    p.shutdown()
    assert not _alive(pid) or wait_until(lambda: not _alive(pid), timeout=10)
    with pytest.raises(PoolClosedError) as info:
        p.process(square, [1], timeout=T)
    assert isinstance(info.value, RuntimeError)
    assert isinstance(info.value, PoolError)


def test_pool_without_start_works():
    """A pool used without start() starts its workers on first use."""
    p = WorkerPool(2, start_method="fork")
    try:
        assert p.process(square, [1, 2, 3], timeout=T) == [1, 4, 9]
        assert p.process_map(square, {"a": 2}, timeout=T) == {"a": 4}
    finally:
        p.shutdown()


def test_start_twice_is_harmless():
    """Calling start() twice keeps the same workers."""
    p = WorkerPool(1, start_method="fork")
    try:
        p.start()
        pid = p.process(getpid, [0], timeout=T)[0]
        assert p.start() is p
        assert p.process(getpid, [0], timeout=T) == [pid]
    finally:
        p.shutdown()


def test_shutdown_twice_is_fine():
    """shutdown() twice, or without ever starting, raises nothing."""
    p = WorkerPool(2, start_method="fork")
    p.shutdown()
    p.shutdown()
    q = WorkerPool(2, start_method="fork")
    q.process(square, [1], timeout=T)
    q.shutdown()
    q.shutdown()
    q.shutdown(wait=False)


def test_calls_after_shutdown_raise_pool_closed():
    """Every entry point raises PoolClosedError (a RuntimeError) after shutdown."""
    p = WorkerPool(2, start_method="fork")
    p.process(square, [1], timeout=T)
    p.shutdown()
    for call in (
        lambda: p.process(square, [1], timeout=T),
        lambda: p.process(square, [], timeout=T),
        lambda: p.process_map(square, {"a": 1}, timeout=T),
        lambda: p.submit(square, 1),
        lambda: p.start(),
    ):
        with pytest.raises(PoolClosedError) as info:
            call()
        assert isinstance(info.value, RuntimeError)


def test_calls_after_shutdown_of_unstarted_pool_raise_pool_closed():
    """A pool shut down before it ever started refuses work with PoolClosedError."""
    p = WorkerPool(2, start_method="fork")
    p.shutdown()
    with pytest.raises(PoolClosedError):
        p.process(square, [1], timeout=T)
    with pytest.raises(PoolClosedError):
        p.start()


def test_context_manager_exit_on_error_terminates():
    """Leaving the with block by an exception stops the workers and re-raises."""
    with pytest.raises(ZeroDivisionError):
        with WorkerPool(2, start_method="fork") as p:
            pid = p.process(getpid, [0], timeout=T)[0]
            1 / 0  # noqa: B018
    wait_until(lambda: not _alive(pid), timeout=10)
    with pytest.raises(PoolClosedError):
        p.process(square, [1], timeout=T)


def test_terminate_kills_workers_and_closes_pool(start_method):
    """terminate() kills the workers at once and the pool refuses later calls."""
    p = WorkerPool(2, start_method=start_method)
    pids = set(p.process(sleep_then_pid, [0.05] * 4, timeout=T))
    t0 = time.monotonic()
    p.terminate()
    assert time.monotonic() - t0 < 5
    wait_until(lambda: not any(_alive(pid) for pid in pids), timeout=10)
    with pytest.raises(PoolClosedError):
        p.process(square, [1], timeout=T)
    p.terminate()  # twice is fine
    p.shutdown()  # and shutdown after terminate too


def test_terminate_unstarted_pool():
    """terminate() on a pool that never started is fine and closes it."""
    p = WorkerPool(2, start_method="fork")
    p.terminate()
    with pytest.raises(PoolClosedError):
        p.process(square, [1], timeout=T)


def test_shutdown_without_wait_stops_workers():
    """shutdown(wait=False) returns at once; the pool refuses work and its workers exit."""
    p = WorkerPool(2, start_method="fork")
    pids = set(p.process(sleep_then_pid, [0.05] * 4, timeout=T))
    p.shutdown(wait=False)
    with pytest.raises(PoolClosedError):
        p.process(square, [1], timeout=T)
    wait_until(lambda: not any(_alive(pid) for pid in pids), timeout=10)
    p.shutdown()


def test_dropped_pool_stops_its_workers():
    """A pool garbage-collected without shutdown still stops its workers."""
    import gc

    p = WorkerPool(2, start_method="fork")
    pids = set(p.process(sleep_then_pid, [0.05] * 4, timeout=T))
    del p
    gc.collect()
    wait_until(lambda: not any(_alive(pid) for pid in pids), timeout=10)


def test_terminate_fails_a_running_call():
    """terminate() from another thread makes a running process() raise PoolClosedError promptly."""
    p = WorkerPool(2, start_method="fork")
    p.start()
    outcome: list[BaseException | object] = []

    def run():
        try:
            outcome.append(p.process(time.sleep, [2.0] * 6, timeout=T))
        except BaseException as exc:  # noqa: BLE001 - recorded for the assertion
            outcome.append(exc)

    thread = threading.Thread(target=run)
    thread.start()
    time.sleep(0.3)
    t0 = time.monotonic()
    p.terminate()
    thread.join(timeout=10)
    assert not thread.is_alive()
    assert time.monotonic() - t0 < 3
    assert len(outcome) == 1
    assert isinstance(outcome[0], PoolClosedError)


def test_shutdown_waits_for_running_call():
    """shutdown() from another thread lets a running process() finish with all its results."""
    p = WorkerPool(2, start_method="fork")
    p.start()
    outcome: list[object] = []

    def run():
        try:
            outcome.append(p.process(sleep_then_pid, [0.1] * 6, timeout=T))
        except BaseException as exc:  # noqa: BLE001 - recorded for the assertion
            outcome.append(exc)

    thread = threading.Thread(target=run)
    thread.start()
    time.sleep(0.1)
    p.shutdown()
    thread.join(timeout=10)
    assert not thread.is_alive()
    assert len(outcome) == 1
    assert isinstance(outcome[0], list) and len(outcome[0]) == 6


# --------------------------------------------------------------------------
# Thread safety
# --------------------------------------------------------------------------


def test_concurrent_calls_from_threads_get_their_own_results(start_method):
    """Four threads calling process() with different lambdas on one pool each get their own results."""
    with WorkerPool(2, start_method=start_method) as p:
        results: dict[int, object] = {}
        barrier = threading.Barrier(4, timeout=T)

        def run(k):
            try:
                barrier.wait()
                fn = [lambda x: x * 2, lambda x: -x, lambda x: f"s{x}", lambda x: (x, x)][k]
                for _ in range(3):
                    got = p.process(fn, range(k * 1000, k * 1000 + 300), timeout=T)
                    results.setdefault(k, []).append(got)
            except BaseException as exc:  # noqa: BLE001 - recorded for the assertion
                results[k] = exc

        threads = [threading.Thread(target=run, args=(k,)) for k in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=T)
        assert not any(t.is_alive() for t in threads)
    expected = {
        0: [x * 2 for x in range(0, 300)],
        1: [-x for x in range(1000, 1300)],
        2: [f"s{x}" for x in range(2000, 2300)],
        3: [(x, x) for x in range(3000, 3300)],
    }
    for k in range(4):
        assert results[k] == [expected[k]] * 3, k


def test_concurrent_first_use_starts_one_set_of_workers():
    """Threads racing to make the first call on an unstarted pool share one set of workers."""
    p = WorkerPool(2, start_method="fork")
    try:
        outcome: dict[int, object] = {}
        barrier = threading.Barrier(4, timeout=T)

        def run(k):
            try:
                barrier.wait()
                outcome[k] = p.process(sleep_then_pid, [0.02] * 10, timeout=T)
            except BaseException as exc:  # noqa: BLE001
                outcome[k] = exc

        threads = [threading.Thread(target=run, args=(k,)) for k in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=T)
        assert not any(t.is_alive() for t in threads)
        assert all(isinstance(outcome[k], list) and len(outcome[k]) == 10 for k in range(4)), outcome
        all_pids = {pid for k in range(4) for pid in outcome[k]}
        assert len(all_pids) == 2
    finally:
        p.shutdown()


def test_concurrent_failing_and_succeeding_calls_stay_separate(fork_pool):
    """A failing call in one thread does not disturb calls of other threads."""
    outcome: dict[int, object] = {}

    def ok(x):
        return x + 1

    def bad(x):
        if x == 50:
            raise ValueError("thread-local failure")
        return x

    def run(k):
        fn = bad if k % 2 else ok
        try:
            outcome[k] = fork_pool.process(fn, range(200), timeout=T)
        except BaseException as exc:  # noqa: BLE001
            outcome[k] = exc

    threads = [threading.Thread(target=run, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=T)
    assert not any(t.is_alive() for t in threads)
    for k in (0, 2):
        assert outcome[k] == list(range(1, 201))
    for k in (1, 3):
        assert isinstance(outcome[k], TaskError)
        assert outcome[k].index == 50
        assert str(outcome[k].__cause__) == "thread-local failure"


def test_concurrent_same_function_different_data(fork_pool):
    """Threads sharing one function but different inputs never get each other's results."""
    outcome: dict[int, object] = {}

    def run(k):
        try:
            outcome[k] = fork_pool.process(square, range(k, k + 2000), timeout=T)
        except BaseException as exc:  # noqa: BLE001
            outcome[k] = exc

    threads = [threading.Thread(target=run, args=(k * 10_000,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=T)
    assert not any(t.is_alive() for t in threads)
    for k in range(4):
        start = k * 10_000
        assert outcome[start] == [x * x for x in range(start, start + 2000)]


def test_waking_a_shut_down_pool_never_writes_into_a_reused_descriptor():
    """Threads may still nudge a pool's engine after it shut down (a stream
    dropped late calls abort()); the descriptor numbers it closed are soon
    reused by other files, which must never receive its doorbell's bytes."""
    pool = WorkerPool(1, start_method="fork")
    assert pool.process(abs, [-1], timeout=T) == [1]
    engine = pool._engine
    pool.shutdown()
    # New files take the lowest free numbers: those the engine just closed.
    files = [os.memfd_create(f"probe-{k}") for k in range(8)]
    try:
        engine.wake()
        engine.abort(None, None)  # what a dropped stream does
        for fd in files:
            assert os.fstat(fd).st_size == 0, "the engine wrote into a reused descriptor"
    finally:
        for fd in files:
            os.close(fd)
