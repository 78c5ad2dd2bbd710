"""Benchmark workloads and runners shared by ``poolme-mp bench`` and benchmarks/.

The ``ast`` and ``images`` workloads run on real input that installed packages
ship (the running Python's standard library, scikit-image's bundled sample
images), so nobody on this team chose their task sizes; ``tiny`` squares a
million integers to expose per-task overhead.  The ``array-*`` workloads move
8 MB numpy arrays to the workers (and back), and ``typed`` maps a float
function over a numpy vector.  Every runner maps a module-level function over
a list of tasks and returns the results in input order; the serial runner's
results are the reference the pools must reproduce.

Beside the workloads: streaming throughput (``Pool.imap`` against
``process_stream``), the latency of one ``submit``, the cost of a progress
bar, and the time from constructing a pool to its first result.

The task functions live at module level here so that every peer pool, whatever
its start method, can pickle them by reference.
"""

from __future__ import annotations

import ast
import functools
import importlib
import importlib.util
import io
import multiprocessing
import multiprocessing.pool
import os
import platform
import statistics
import sys
import sysconfig
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, redirect_stderr
from dataclasses import dataclass, field
from typing import Any

Task = Any
Result = Any
TaskFn = Callable[[Task], Result]
#: A started pool's map: ``mapper(fn, tasks)`` returns ``[fn(t) for t in tasks]``
#: (a list, or for typed output a numpy array, which indexes like one).
Mapper = Callable[[TaskFn, Sequence[Task]], Sequence[Result]]
#: Whether a runner's results (first) match the serial ones (second).
ResultCheck = Callable[[Sequence[Result], Sequence[Result]], bool]


def import_untyped(module: str) -> Any:
    """Import a package whose functions carry no type hints, typed as ``Any``.

    Imported lazily, inside the functions that need them, so that a run of
    one workload needs only that workload's packages.
    """
    return importlib.import_module(module)


# --------------------------------------------------------------------------
# Workload (a): parse the standard library with ast
# --------------------------------------------------------------------------

#: Folders under the stdlib path that hold third-party code, not the stdlib.
_NOT_STDLIB_DIRS = frozenset({"site-packages", "dist-packages", "__pycache__"})
#: Marks a file that could not be read, decoded or parsed.  Returned instead of
#: raising so every runner skips the same files in the same way.
SKIPPED_FILE = (-1, -1)
#: At most this many files for ``--quick`` (about a tenth of CPython 3.11's), so
#: that the quick run, array workloads and all, stays within a minute.
_QUICK_AST_FILES = 200


def stdlib_python_files() -> list[str]:
    """Return the sorted paths of every ``.py`` file in the stdlib tree."""
    root = sysconfig.get_paths()["stdlib"]
    paths: list[str] = []
    for folder, subfolders, files in os.walk(root):
        subfolders[:] = [d for d in subfolders if d not in _NOT_STDLIB_DIRS]
        paths.extend(os.path.join(folder, f) for f in files if f.endswith(".py"))
    return sorted(paths)


def ast_tasks(quick: bool) -> list[str]:
    """Stdlib paths to parse; ``quick`` takes an evenly spaced subset.

    A stride rather than the first N files keeps the quick subset's mix of
    small and huge modules close to the full run's.
    """
    paths = stdlib_python_files()
    if quick:
        stride = -(-len(paths) // _QUICK_AST_FILES)  # ceiling division
        paths = paths[::stride]
    return paths


def parse_summary(path: str) -> tuple[int, int]:
    """Parse one source file; return ``(node count, function/class defs)``.

    Unreadable, undecodable and syntactically invalid files (the stdlib ships
    a few on purpose, for its own tests) give ``SKIPPED_FILE``.  Warnings are
    silenced: some test files draw SyntaxWarning or DeprecationWarning, and a
    process that turned warnings into errors would otherwise skip files that
    the others parse.
    """
    try:
        with open(path, "rb") as source_file:
            source = source_file.read()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            tree = ast.parse(source, filename=path)
    except (OSError, SyntaxError, ValueError, RecursionError):
        return SKIPPED_FILE
    definitions = (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)
    nodes = defs = 0
    for node in ast.walk(tree):
        nodes += 1
        defs += isinstance(node, definitions)
    return nodes, defs


# --------------------------------------------------------------------------
# Workload (b): filter tiles of scikit-image's bundled sample images
# --------------------------------------------------------------------------

#: ``skimage.data`` images that ship inside the scikit-image wheel and so load
#: offline.  The others (brain, cells3d, eagle, human_mitosis, kidney, lily,
#: nickel_solidification, palisades_of_vogt, protein_transport, skin, vortex)
#: need pooch and a download; lfw_subset and stereo_motorcycle are left out
#: because they are not single 2-D pictures.
BUNDLED_IMAGES = (
    "astronaut",
    "brick",
    "camera",
    "cat",
    "cell",
    "chelsea",
    "clock",
    "coffee",
    "coins",
    "colorwheel",
    "grass",
    "gravel",
    "horse",
    "hubble_deep_field",
    "immunohistochemistry",
    "logo",
    "microaneurysms",
    "moon",
    "page",
    "retina",
    "rocket",
    "text",
)
TILE_SIDE = 128
#: The eight rotations/flips of every tile make the full run ~8x the tiles of
#: the images alone, each one a distinct array; ``--quick`` keeps only the
#: tiles as they are, to stay within its minute.
_FULL_VARIANTS = 8
_QUICK_VARIANTS = 1
#: Sobel magnitude above which a pixel counts as an edge.
_EDGE_THRESHOLD = 0.05


def load_gray_images() -> tuple[dict[str, Any], dict[str, str]]:
    """Load the bundled sample images as 2-D uint8 arrays.

    Returns ``(images by name, reason by name of each one that failed)``; an
    image is skipped, never fetched, when this install cannot load it offline.
    """
    import numpy as np

    sample_data = import_untyped("skimage.data")
    images: dict[str, Any] = {}
    skipped: dict[str, str] = {}
    for name in BUNDLED_IMAGES:
        try:
            image = np.asarray(getattr(sample_data, name)())
        except Exception as error:  # noqa: BLE001 - any failure means "skip"
            skipped[name] = f"{type(error).__name__}: {error}"
            continue
        if image.dtype == bool:
            image = image.astype(np.uint8) * 255
        if image.ndim == 3:  # RGB or RGBA: average the colour channels
            image = image[..., :3].mean(axis=2).astype(np.uint8)
        images[name] = image
    return images, skipped


def split_into_tiles(image: Any, side: int = TILE_SIDE) -> list[Any]:
    """Cut an image into whole ``side`` x ``side`` tiles, dropping the ragged edge."""
    import numpy as np

    rows, cols = image.shape
    return [
        np.ascontiguousarray(image[y : y + side, x : x + side])
        for y in range(0, rows - side + 1, side)
        for x in range(0, cols - side + 1, side)
    ]


def _tile_variants(tile: Any, count: int) -> list[Any]:
    """The first ``count`` of a tile's eight rotations and mirror images."""
    import numpy as np

    variants = []
    for index in range(count):
        turned = np.rot90(tile, k=index % 4)
        variants.append(np.ascontiguousarray(turned.T if index >= 4 else turned))
    return variants


def image_tasks(quick: bool) -> list[Any]:
    """Tiles (uint8 arrays) of every bundled image, in a fixed order."""
    images, _skipped = load_gray_images()
    count = _QUICK_VARIANTS if quick else _FULL_VARIANTS
    return [
        variant
        for name in sorted(images)
        for tile in split_into_tiles(images[name])
        for variant in _tile_variants(tile, count)
    ]


def edge_summary(tile: Any) -> tuple[int, float]:
    """Gaussian blur then Sobel one tile; return ``(edge pixels, rounded sum)``.

    The sum is rounded so that a last-bit difference in float reduction order
    between processes cannot make an otherwise equal result compare unequal.
    """
    import numpy as np

    filters = import_untyped("skimage.filters")
    edges = filters.sobel(filters.gaussian(tile, sigma=2.0))
    return int(np.count_nonzero(edges > _EDGE_THRESHOLD)), round(float(edges.sum()), 6)


# --------------------------------------------------------------------------
# Workload (c): a million tiny tasks
# --------------------------------------------------------------------------

_FULL_TINY = 1_000_000
_QUICK_TINY = 200_000


def tiny_tasks(quick: bool) -> list[int]:
    """The integers to square: per-task overhead is all there is to measure."""
    return list(range(_QUICK_TINY if quick else _FULL_TINY))


def square(number: int) -> int:
    """Square a number: a task so small that only dispatch cost shows."""
    return number * number


# --------------------------------------------------------------------------
# Workloads (d)-(g): numpy arrays
# --------------------------------------------------------------------------

#: Elements of each array task: 1,000,000 float64 values, 8 MB.
ARRAY_ELEMENTS = 1_000_000
_FULL_SUM_ARRAYS = 100
_QUICK_SUM_ARRAYS = 24
_FULL_RETURN_ARRAYS = 50
_QUICK_RETURN_ARRAYS = 12
_FULL_TYPED = 2_000_000
_QUICK_TYPED = 500_000
#: Seeds the arrays, so every run and every runner sums the same numbers.
_ARRAY_SEED = 20_240_601


def random_arrays(count: int) -> list[Any]:
    """``count`` float64 arrays of ``ARRAY_ELEMENTS`` uniform values each."""
    import numpy as np

    generator = np.random.default_rng(_ARRAY_SEED)
    return [generator.random(ARRAY_ELEMENTS) for _ in range(count)]


def array_sum_tasks(quick: bool) -> list[Any]:
    """The arrays that ``array-sum`` and ``array-shared`` reduce."""
    return random_arrays(_QUICK_SUM_ARRAYS if quick else _FULL_SUM_ARRAYS)


def array_return_tasks(quick: bool) -> list[Any]:
    """The arrays that ``array-return`` doubles and sends back."""
    return random_arrays(_QUICK_RETURN_ARRAYS if quick else _FULL_RETURN_ARRAYS)


def typed_tasks(quick: bool) -> Any:
    """``np.arange(N, dtype=np.float64)``: one numpy vector, N scalar tasks."""
    import numpy as np

    return np.arange(_QUICK_TYPED if quick else _FULL_TYPED, dtype=np.float64)


def sum_array(array: Any) -> Any:
    """``np.sum(array)``; a module-level wrapper so this module imports numpy lazily.

    The same function runs on every side, so the float sums are bit-identical
    and compare exactly.
    """
    import numpy as np

    return np.sum(array)


def double(array: Any) -> Any:
    """``array * 2``: a new 8 MB array that has to travel back to the parent."""
    return array * 2


def half(number: float) -> float:
    """Halve one float: the scalar task of the ``typed`` workload."""
    return number * 0.5


def as_python_list(array: Any) -> list[Task]:
    """A numpy array's elements as Python scalars, what ``array.tolist()`` gives."""
    elements: list[Task] = array.tolist()
    return elements


def same_results(results: Sequence[Result], expected: Sequence[Result]) -> bool:
    """Plain equality: the check for workloads whose results are Python values."""
    return list(results) == list(expected)


def same_arrays(results: Sequence[Result], expected: Sequence[Result]) -> bool:
    """Equal length and each result ``np.array_equal`` to its serial one."""
    import numpy as np

    return len(results) == len(expected) and all(
        np.array_equal(got, want) for got, want in zip(results, expected, strict=True)
    )


def same_vector(results: Sequence[Result], expected: Sequence[Result]) -> bool:
    """The results, a list or a numpy array, equal the serial list element-wise."""
    import numpy as np

    return bool(np.array_equal(np.asarray(results), np.asarray(expected)))


@dataclass(frozen=True)
class Workload:
    """A named task function with the code that builds its tasks."""

    name: str
    description: str
    fn: TaskFn
    build_tasks: Callable[[bool], Sequence[Task]]
    #: How a runner's results are compared with the serial ones.
    check: ResultCheck = same_results
    #: The runners for this workload, serial first; ``None`` means ``RUNNERS``.
    runners: tuple[Runner, ...] | None = None


# --------------------------------------------------------------------------
# Runners: each opens a started pool and yields its map
# --------------------------------------------------------------------------


def stdlib_chunksize(task_count: int, workers: int) -> int:
    """The chunksize ``multiprocessing.Pool.map`` picks by default."""
    chunks, extra = divmod(task_count, workers * 4)
    return max(1, chunks + bool(extra))


@contextmanager
def open_serial(workers: int) -> Iterator[Mapper]:
    """No pool at all: the reference every other runner is checked against."""
    del workers  # the serial run always uses this one process

    def serial_map(fn: TaskFn, tasks: Sequence[Task]) -> list[Result]:
        return list(map(fn, tasks))

    yield serial_map


@contextmanager
def open_mp_pool(workers: int) -> Iterator[Mapper]:
    """``multiprocessing.Pool(workers).map`` with its default chunksize."""
    with multiprocessing.Pool(workers) as pool:
        yield pool.map


@contextmanager
def open_process_pool_executor(workers: int) -> Iterator[Mapper]:
    """``ProcessPoolExecutor.map`` with the chunksize ``Pool.map`` would pick.

    Its own default chunksize of 1 would make it look far worse than it has to.
    """
    # Imported here, like every peer: under spawn and forkserver each worker
    # re-imports the main module, and with it this one.
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(workers) as executor:

        def executor_map(fn: TaskFn, tasks: Sequence[Task]) -> list[Result]:
            chunksize = stdlib_chunksize(len(tasks), workers)
            return list(executor.map(fn, tasks, chunksize=chunksize))

        yield executor_map


@contextmanager
def open_joblib(workers: int) -> Iterator[Mapper]:
    """``joblib.Parallel`` (loky backend, automatic batching), kept open."""
    joblib = import_untyped("joblib")
    with joblib.Parallel(n_jobs=workers) as parallel:

        def joblib_map(fn: TaskFn, tasks: Sequence[Task]) -> list[Result]:
            return list(parallel(joblib.delayed(fn)(task) for task in tasks))

        yield joblib_map


@contextmanager
def open_mpire(workers: int) -> Iterator[Mapper]:
    """``mpire.WorkerPool.map``; ``keep_alive`` reuses the workers across maps.

    ``concatenate_numpy_output=False``: by default mpire joins array results
    into one array, where every other runner returns one array per task.
    """
    mpire = import_untyped("mpire")
    with mpire.WorkerPool(n_jobs=workers, keep_alive=True) as pool:

        def mpire_map(fn: TaskFn, tasks: Sequence[Task]) -> list[Result]:
            return list(pool.map(fn, tasks, concatenate_numpy_output=False))

        yield mpire_map


@contextmanager
def open_poolme_mp(workers: int) -> Iterator[Mapper]:
    """``poolme_mp.WorkerPool(workers).process``: the product under test."""
    from poolme_mp import WorkerPool

    with WorkerPool(workers) as pool:
        yield pool.process


@contextmanager
def open_poolme_mp_fork(workers: int) -> Iterator[Mapper]:
    """poolme_mp with ``start_method="fork"``: like for like with a fork Pool."""
    from poolme_mp import WorkerPool

    with WorkerPool(workers, start_method="fork") as pool:
        yield pool.process


@contextmanager
def open_poolme_mp_typed(workers: int) -> Iterator[Mapper]:
    """``pool.process(fn, array, dtype=np.float64)``: array in, shared array out.

    The input array reaches the workers through shared memory in row blocks,
    and each float result is written straight into a shared result array.
    """
    import numpy as np

    from poolme_mp import WorkerPool

    with WorkerPool(workers) as pool:

        def typed_map(fn: TaskFn, tasks: Sequence[Task]) -> Sequence[Result]:
            results: Sequence[Result] = pool.process(fn, tasks, dtype=np.float64)
            return results

        yield typed_map


def with_list_input(
    open_runner: Callable[[int], AbstractContextManager[Mapper]],
) -> Callable[[int], AbstractContextManager[Mapper]]:
    """A runner that maps over ``tasks.tolist()``, converted inside the timing.

    For the ``typed`` workload, whose input is a numpy vector: every peer but
    ``poolme_mp(dtype)`` takes it as a list of Python floats, and pays for the
    conversion as ``poolme_mp`` pays for its own.
    """

    @contextmanager
    def open_with_list_input(workers: int) -> Iterator[Mapper]:
        with open_runner(workers) as mapper:

            def list_map(fn: TaskFn, tasks: Sequence[Task]) -> Sequence[Result]:
                return mapper(fn, as_python_list(tasks))

            yield list_map

    return open_with_list_input


def share_arrays(arrays: Sequence[Task]) -> list[Task]:
    """``[poolme_mp.share(a) for a in arrays]``: one copy into shared memory each.

    Imported from ``poolme_mp._shared``: the lazy ``poolme_mp.share`` is typed
    ``object`` for mypy.
    """
    from poolme_mp._shared import share

    return [share(array) for array in arrays]


@dataclass(frozen=True)
class Runner:
    """How to start one peer pool, and whether it may be missing."""

    name: str
    open: Callable[[int], AbstractContextManager[Mapper]]
    #: A standard-library pool: the baseline the product is compared with.
    is_stdlib: bool = False
    #: Imported from an optional package; skipped, not failed, when absent.
    optional_module: str | None = None
    #: Turns the tasks into this runner's input once, before the clock starts;
    #: the time it takes is reported on its own (``setup_seconds``).
    prepare: Callable[[Sequence[Task]], Sequence[Task]] | None = None


SERIAL = Runner("serial", open_serial)
RUNNERS: tuple[Runner, ...] = (
    SERIAL,
    Runner("mp.Pool", open_mp_pool, is_stdlib=True),
    Runner("ProcessPoolExecutor", open_process_pool_executor, is_stdlib=True),
    Runner("joblib", open_joblib, optional_module="joblib"),
    Runner("mpire", open_mpire, optional_module="mpire"),
    Runner("poolme_mp", open_poolme_mp),
)


#: ``array-shared``: only poolme_mp has shared inputs (joblib memmaps per call).
SHARED_RUNNERS: tuple[Runner, ...] = (
    SERIAL,
    Runner("poolme_mp(shared)", open_poolme_mp, prepare=share_arrays),
)
#: ``typed``: the peers map over ``xs.tolist()``; ``poolme_mp(dtype)`` over ``xs``.
TYPED_RUNNERS: tuple[Runner, ...] = (
    Runner(SERIAL.name, with_list_input(open_serial)),
    Runner("mp.Pool", with_list_input(open_mp_pool), is_stdlib=True),
    Runner("poolme_mp", with_list_input(open_poolme_mp)),
    Runner("poolme_mp(dtype)", open_poolme_mp_typed),
)


def is_importable(module: str) -> bool:
    """Whether ``module`` is installed, found without importing it."""
    return importlib.util.find_spec(module) is not None


# --------------------------------------------------------------------------
# Registry of workloads
# --------------------------------------------------------------------------

_ARRAY_MB = ARRAY_ELEMENTS * 8 // 1_000_000

WORKLOADS: dict[str, Workload] = {
    workload.name: workload
    for workload in (
        Workload(
            "ast",
            "ast.parse the stdlib's .py files (task = path, uneven sizes)",
            parse_summary,
            ast_tasks,
        ),
        Workload(
            "images",
            f"gaussian+sobel on {TILE_SIDE}px tiles of skimage.data images",
            edge_summary,
            image_tasks,
        ),
        Workload(
            "tiny",
            "x * x over range(N): pure per-task overhead",
            square,
            tiny_tasks,
        ),
        Workload(
            "array-sum",
            f"np.sum of float64 arrays, {_ARRAY_MB} MB each: moving inputs",
            sum_array,
            array_sum_tasks,
            check=same_arrays,
        ),
        Workload(
            "array-return",
            f"a * 2 of float64 arrays, {_ARRAY_MB} MB each: moving inputs and results",
            double,
            array_return_tasks,
            check=same_arrays,
        ),
        Workload(
            "array-shared",
            "array-sum's arrays given to poolme_mp as poolme_mp.share() arrays",
            sum_array,
            array_sum_tasks,
            check=same_arrays,
            runners=SHARED_RUNNERS,
        ),
        Workload(
            "typed",
            "x * 0.5 over np.arange(N): scalar tasks from and to a numpy vector",
            half,
            typed_tasks,
            check=same_vector,
            runners=TYPED_RUNNERS,
        ),
    )
}


def runners_for(workload: Workload) -> tuple[Runner, ...]:
    """The runners that time ``workload``: its own, or the common ``RUNNERS``."""
    return RUNNERS if workload.runners is None else workload.runners


def reference_runner(workload: Workload) -> Runner:
    """The serial runner whose results the others must reproduce.

    The first of the workload's runners named ``serial`` (``typed`` has its
    own, mapping over a list), else ``SERIAL``.
    """
    return next((r for r in runners_for(workload) if r.name == SERIAL.name), SERIAL)


# --------------------------------------------------------------------------
# Timing
# --------------------------------------------------------------------------


#: Seconds each warm-up task idles after its work; see ``warm_up``.
_WARM_UP_PAUSE = 0.01


def call_then_pause(fn: TaskFn, task: Task) -> Result:
    """Run one task, then idle briefly (the warm-up job's task function)."""
    result = fn(task)
    time.sleep(_WARM_UP_PAUSE)
    return result


def warm_up(mapper: Mapper, fn: TaskFn, tasks: Sequence[Task], workers: int) -> None:
    """Run a small job so worker start-up and first imports are not timed.

    Four real tasks per worker, each followed by a short pause so that no
    worker can finish the whole job before the others have taken a task:
    every worker then has imported what the task function needs (skimage's
    filters load lazily) before the clock starts.
    """
    mapper(functools.partial(call_then_pause, fn), tasks[: 4 * workers])


def best_of(
    mapper: Mapper, fn: TaskFn, tasks: Sequence[Task], repeats: int
) -> tuple[list[float], Sequence[Result]]:
    """Time ``repeats`` map calls; return every wall time and the last results."""
    seconds: list[float] = []
    results: Sequence[Result] = []
    for _ in range(repeats):
        start = time.perf_counter()
        results = mapper(fn, tasks)
        seconds.append(time.perf_counter() - start)
    return seconds, results


@dataclass
class Measurement:
    """One runner on one workload."""

    workload: str
    runner: str
    tasks: int
    #: ``ok``, ``mismatch`` (results differ from serial), ``error`` or ``skipped``.
    status: str
    seconds: list[float] = field(default_factory=list)
    detail: str = ""
    speedup_vs_serial: float | None = None
    speed_vs_best_stdlib: float | None = None
    #: Seconds of the runner's one-time ``prepare`` step, not in ``seconds``.
    setup_seconds: float | None = None

    @property
    def best_seconds(self) -> float | None:
        """The fastest repeat, or ``None`` when the runner did not finish."""
        return min(self.seconds) if self.seconds else None

    @property
    def tasks_per_second(self) -> float | None:
        """Throughput of the fastest repeat."""
        best = self.best_seconds
        return self.tasks / best if best else None

    @property
    def failed(self) -> bool:
        """A wrong answer or a crash; a missing optional peer is not a failure."""
        return self.status in ("mismatch", "error")

    def as_dict(self) -> dict[str, Any]:
        """A JSON-ready view, derived numbers included."""
        return {
            "workload": self.workload,
            "runner": self.runner,
            "tasks": self.tasks,
            "status": self.status,
            "detail": self.detail,
            "best_seconds": self.best_seconds,
            "all_seconds": self.seconds,
            "tasks_per_second": self.tasks_per_second,
            "speedup_vs_serial": self.speedup_vs_serial,
            "speed_vs_best_stdlib": self.speed_vs_best_stdlib,
            "setup_seconds": self.setup_seconds,
        }


def measure_runner(
    runner: Runner,
    workload: Workload,
    tasks: Sequence[Task],
    expected: Sequence[Result],
    workers: int,
    repeats: int,
) -> Measurement:
    """Start ``runner``'s pool, warm it, time its map and check the results."""
    result = Measurement(workload.name, runner.name, len(tasks), "ok")
    if runner.optional_module and not is_importable(runner.optional_module):
        result.status, result.detail = "skipped", f"{runner.optional_module} missing"
        return result
    try:
        timed_tasks, result.setup_seconds = prepare_tasks(runner, tasks)
        with runner.open(workers) as mapper:
            warm_up(mapper, workload.fn, timed_tasks, workers)
            result.seconds, results = best_of(mapper, workload.fn, timed_tasks, repeats)
    except Exception as error:  # noqa: BLE001 - reported, and fails the run
        result.status, result.detail = "error", f"{type(error).__name__}: {error}"
        return result
    if not workload.check(results, expected):
        result.status, result.detail = "mismatch", describe_mismatch(results, expected)
    return result


def prepare_tasks(
    runner: Runner, tasks: Sequence[Task]
) -> tuple[Sequence[Task], float | None]:
    """The runner's input and the seconds its one-time ``prepare`` took, if any."""
    if runner.prepare is None:
        return tasks, None
    start = time.perf_counter()
    prepared = runner.prepare(tasks)
    return prepared, time.perf_counter() - start


def describe_mismatch(results: Sequence[Result], expected: Sequence[Result]) -> str:
    """Say where a pool's results first differ from the serial ones."""
    if len(results) != len(expected):
        return f"{len(results)} results for {len(expected)} tasks"
    index = next(
        (
            i
            for i, (a, b) in enumerate(zip(results, expected, strict=True))
            if _differ(a, b)
        ),
        None,
    )
    if index is None:
        return "equal values, but of another type than serial's"
    return f"task {index}: got {results[index]!r}, serial gave {expected[index]!r}"


def _differ(result: Result, expected: Result) -> bool:
    """Whether one result differs from its serial one; arrays compare by value."""
    numpy = sys.modules.get("numpy")
    if numpy is not None and isinstance(result, numpy.ndarray | numpy.generic):
        return not numpy.array_equal(result, expected)
    return bool(result != expected)


def add_relative_speeds(measurements: list[Measurement]) -> None:
    """Fill in speed-up over serial and speed relative to the best stdlib pool.

    Both are ``reference time / runner time``, so above 1 means faster.
    """
    serial = _best_time(m for m in measurements if m.runner == SERIAL.name)
    stdlib_names = {r.name for r in (*RUNNERS, *TYPED_RUNNERS) if r.is_stdlib}
    best_stdlib = _best_time(m for m in measurements if m.runner in stdlib_names)
    for measurement in measurements:
        best = measurement.best_seconds
        if best is None or measurement.status != "ok":
            continue
        if serial is not None:
            measurement.speedup_vs_serial = serial / best
        if best_stdlib is not None:
            measurement.speed_vs_best_stdlib = best_stdlib / best


def _best_time(measurements: Iterable[Measurement]) -> float | None:
    """The fastest correct time among ``measurements``, if any finished."""
    times = [
        m.best_seconds
        for m in measurements
        if m.status == "ok" and m.best_seconds is not None
    ]
    return min(times) if times else None


@dataclass
class WorkloadRun:
    """Every runner's measurement of one workload."""

    workload: Workload
    task_count: int
    measurements: list[Measurement]
    notes: dict[str, Any] = field(default_factory=dict)


def run_workload(
    workload: Workload,
    runners: Sequence[Runner],
    workers: int,
    quick: bool,
    repeats: int,
    progress: Callable[[str], None] = lambda _message: None,
) -> WorkloadRun:
    """Build the tasks, run them serially for reference, then through each pool.

    The reference is ``reference_runner(workload)``; it is not run again if it
    is among ``runners``.
    """
    tasks = workload.build_tasks(quick)
    reference = reference_runner(workload)
    progress(f"{workload.name}: {len(tasks)} tasks, serial reference")
    serial = Measurement(workload.name, SERIAL.name, len(tasks), "ok")
    with reference.open(workers) as serial_map:
        # Warm the serial run too: lazy imports and a cold page cache would
        # otherwise flatter every pool that runs after it.
        warm_up(serial_map, workload.fn, tasks, workers)
        serial.seconds, expected = best_of(serial_map, workload.fn, tasks, repeats)
    measurements = [serial]
    for runner in runners:
        if runner is reference:
            continue
        progress(f"{workload.name}: {runner.name}")
        measurements.append(
            measure_runner(runner, workload, tasks, expected, workers, repeats)
        )
    add_relative_speeds(measurements)
    notes = workload_notes(workload, tasks, expected)
    return WorkloadRun(workload, len(tasks), measurements, notes)


def workload_notes(
    workload: Workload, tasks: Sequence[Task], expected: Sequence[Result]
) -> dict[str, Any]:
    """Facts about a workload's input worth printing beside its numbers."""
    if workload.name == "images":
        images, skipped = load_gray_images()
        return {"images": sorted(images), "skipped_images": skipped}
    if workload.name == "ast":
        unparsable = [
            os.path.relpath(path, sysconfig.get_paths()["stdlib"])
            for path, summary in zip(tasks, expected, strict=True)
            if summary == SKIPPED_FILE
        ]
        return {"stdlib": sysconfig.get_paths()["stdlib"], "skipped_files": unparsable}
    if workload.name.startswith("array-"):
        return {"megabytes": sum(task.nbytes for task in tasks) / 1e6}
    return {}


# --------------------------------------------------------------------------
# Pool start to first result
# --------------------------------------------------------------------------


@contextmanager
def open_fork_pool(workers: int) -> Iterator[Mapper]:
    """A fork-context ``multiprocessing.Pool``: the cheapest stdlib start."""
    with multiprocessing.get_context("fork").Pool(workers) as pool:
        yield pool.map


STARTUP_RUNNERS: tuple[Runner, ...] = (
    Runner("mp.Pool(fork)", open_fork_pool, is_stdlib=True),
    Runner("poolme_mp", open_poolme_mp),
    Runner("poolme_mp(fork)", open_poolme_mp_fork),
)


@dataclass
class StartupMeasurement:
    """Seconds from constructing a pool to holding a 1-task map's result."""

    runner: str
    seconds: list[float] = field(default_factory=list)
    status: str = "ok"
    detail: str = ""

    def as_dict(self) -> dict[str, Any]:
        """A JSON-ready view with best and median."""
        return {
            "runner": self.runner,
            "status": self.status,
            "detail": self.detail,
            "best_seconds": min(self.seconds) if self.seconds else None,
            "median_seconds": statistics.median(self.seconds) if self.seconds else None,
            "all_seconds": self.seconds,
        }


def time_to_first_result(runner: Runner, workers: int) -> float:
    """Construct the pool, map one task; shutdown happens after the clock stops."""
    start = time.perf_counter()
    with runner.open(workers) as mapper:
        if mapper(square, [3]) != [9]:
            raise AssertionError(f"{runner.name} squared 3 wrongly")
        return time.perf_counter() - start


def measure_startup(workers: int, repeats: int) -> list[StartupMeasurement]:
    """Time ``repeats`` cold starts of each start-up peer."""
    measurements = []
    for runner in STARTUP_RUNNERS:
        measurement = StartupMeasurement(runner.name)
        try:
            for _ in range(repeats):
                measurement.seconds.append(time_to_first_result(runner, workers))
        except Exception as error:  # noqa: BLE001 - reported, and fails the run
            measurement.status = "error"
            measurement.detail = f"{type(error).__name__}: {error}"
        measurements.append(measurement)
    return measurements


# --------------------------------------------------------------------------
# Streaming, submit latency and progress-bar overhead
# --------------------------------------------------------------------------

#: ``Pool.imap`` chunksizes tried; the fastest is the one reported.
IMAP_CHUNKSIZES = (1, 16, 256, 4096, 16384)
#: Chunks each worker gets per chunksize tried: enough for a steady rate,
#: few enough that chunksize 1 does not take a minute.
_IMAP_CHUNKS_PER_WORKER = 1000
#: Inputs streamed through poolme_mp by the memory check (full run only).
RSS_STREAM_TASKS = 10_000_000
#: Submits timed one at a time, each after a short idle pause.
_FULL_SUBMITS = 200
_QUICK_SUBMITS = 100
_SUBMIT_PAUSE = 0.002
#: Plain and progress-bar maps timed alternately, so load drift hits both.
PROGRESS_PAIRS = 5


@dataclass
class Figure:
    """One number from the streaming, submit or progress measurements."""

    measure: str
    runner: str
    tasks: int
    #: The figure in ``unit``; ``None`` when the runner did not finish.
    value: float | None = None
    unit: str = ""
    #: Relative to the measure's reference; above 1 means better than it.
    vs_reference: float | None = None
    #: ``ok``, ``mismatch`` (wrong results), ``error`` or ``skipped``.
    status: str = "ok"
    detail: str = ""
    samples: list[float] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        """A JSON-ready view."""
        return {
            "measure": self.measure,
            "runner": self.runner,
            "tasks": self.tasks,
            "value": self.value,
            "unit": self.unit,
            "vs_reference": self.vs_reference,
            "status": self.status,
            "detail": self.detail,
            "samples": self.samples,
            **self.extra,
        }


def failed_figure(measure: str, runner: str, tasks: int, error: Exception) -> Figure:
    """The figure of a runner that raised: no value, the error as detail."""
    return Figure(
        measure,
        runner,
        tasks,
        status="error",
        detail=f"{type(error).__name__}: {error}",
    )


def time_repeats(run: Callable[[], Result], repeats: int) -> tuple[list[float], Result]:
    """Call ``run`` ``repeats`` times; every wall time and the last return value."""
    seconds: list[float] = []
    value: Result = None
    for _ in range(repeats):
        start = time.perf_counter()
        value = run()
        seconds.append(time.perf_counter() - start)
    return seconds, value


def sum_of_squares(count: int) -> int:
    """``sum(x * x for x in range(count))`` in closed form: the stream check."""
    return (count - 1) * count * (2 * count - 1) // 6


def stream_tasks(quick: bool) -> int:
    """How many inputs the stream throughput runs take: those of ``tiny``."""
    return _QUICK_TINY if quick else _FULL_TINY


def throughput_figure(
    measure: str, runner: str, tasks: int, seconds: list[float], total: int
) -> Figure:
    """Tasks per second of the fastest repeat, checked against the closed form."""
    figure = Figure(measure, runner, tasks, tasks / min(seconds), "tasks/s")
    figure.samples = seconds
    if total != sum_of_squares(tasks):
        figure.status = "mismatch"
        figure.detail = f"sum {total}, expected {sum_of_squares(tasks)}"
    return figure


def measure_serial_stream(tasks: int, repeats: int) -> Figure:
    """``sum(map(square, range(N)))`` in this process, for scale."""
    seconds, total = time_repeats(lambda: sum(map(square, range(tasks))), repeats)
    return throughput_figure("stream", "serial", tasks, seconds, total)


def imap_sweep_tasks(chunksize: int, workers: int, tasks: int) -> int:
    """Inputs for one chunksize tried: ``_IMAP_CHUNKS_PER_WORKER`` chunks each."""
    return min(tasks, chunksize * workers * _IMAP_CHUNKS_PER_WORKER)


def imap_sum(pool: multiprocessing.pool.Pool, count: int, chunksize: int) -> int:
    """``sum(pool.imap(square, range(count), chunksize))``: consume the stream."""
    return sum(pool.imap(square, range(count), chunksize=chunksize))


def measure_imap(workers: int, tasks: int, repeats: int) -> Figure:
    """``sum(Pool.imap(square, range(n), chunksize))`` at its best chunksize.

    Every chunksize in ``IMAP_CHUNKSIZES`` is timed on one pool; the fastest
    is reported, with every one's rate under ``sweep``.
    """
    figures = []
    with multiprocessing.Pool(workers) as pool:
        pool.map(square, range(4 * workers))
        for chunksize in IMAP_CHUNKSIZES:
            count = imap_sweep_tasks(chunksize, workers, tasks)
            run = functools.partial(imap_sum, pool, count, chunksize)
            seconds, total = time_repeats(run, repeats)
            name = f"mp.Pool.imap(chunksize={chunksize})"
            figures.append(throughput_figure("stream", name, count, seconds, total))
    bad = [figure for figure in figures if figure.status != "ok"]
    best = bad[0] if bad else max(figures, key=lambda figure: figure.value or 0.0)
    best.extra["sweep"] = [
        {"chunksize": size, "tasks": figure.tasks, "tasks_per_second": figure.value}
        for size, figure in zip(IMAP_CHUNKSIZES, figures, strict=True)
    ]
    return best


def measure_process_stream(workers: int, tasks: int, repeats: int) -> Figure:
    """``sum(pool.process_stream(square, range(N)))`` on a warm pool."""
    from poolme_mp import WorkerPool

    with WorkerPool(workers) as pool:
        sum(pool.process_stream(square, range(4 * workers)))
        seconds, total = time_repeats(
            lambda: sum(pool.process_stream(square, range(tasks))), repeats
        )
    return throughput_figure(
        "stream", "poolme_mp.process_stream", tasks, seconds, total
    )


def measure_stream(workers: int, quick: bool, repeats: int) -> list[Figure]:
    """Streaming throughput: serial, best ``Pool.imap``, ``process_stream``.

    ``vs_reference`` is throughput over the best ``imap`` chunksize's.
    """
    tasks = stream_tasks(quick)
    figures = [measure_serial_stream(tasks, repeats)]
    for runner, measure in (
        ("mp.Pool.imap", measure_imap),
        ("poolme_mp.process_stream", measure_process_stream),
    ):
        try:
            figures.append(measure(workers, tasks, repeats))
        except Exception as error:  # noqa: BLE001 - reported, and fails the run
            figures.append(failed_figure("stream", runner, tasks, error))
    imap = next((f for f in figures if f.runner.startswith("mp.Pool.imap")), None)
    reference = imap.value if imap is not None and imap.status == "ok" else None
    for figure in figures:
        if reference and figure.value is not None and figure.status == "ok":
            figure.vs_reference = figure.value / reference
    return figures


def reset_peak_rss() -> bool:
    """Lower this process's peak RSS to its current RSS; whether that worked.

    Linux resets it when ``5`` is written to ``/proc/self/clear_refs``; from
    then on ``ru_maxrss`` is the peak since the reset, not since the start.
    """
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as clear_refs:
            clear_refs.write("5")
    except OSError:
        return False
    return True


def peak_rss_kib() -> int:
    """``getrusage(RUSAGE_SELF).ru_maxrss``: peak RSS in KiB (on Linux)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def rss_growth_kib(run: Callable[[], Result]) -> tuple[int, int, Result]:
    """Peak RSS just before ``run`` and after it (reset first), and its result."""
    reset_peak_rss()
    before = peak_rss_kib()
    result = run()
    return before, peak_rss_kib(), result


def measure_stream_memory(workers: int, tasks: int = RSS_STREAM_TASKS) -> Figure:
    """Peak-RSS growth of this (parent) process while ``tasks`` inputs stream.

    The value is MiB of growth (``ru_maxrss`` after minus before), with the
    peak reset just before, so that earlier workloads' peaks do not hide it.
    ``process`` over a list of a tenth as many inputs follows, for contrast.
    """
    from poolme_mp import WorkerPool

    figure = Figure("stream-rss", "poolme_mp.process_stream", tasks, unit="MiB")
    if not reset_peak_rss():
        figure.status, figure.detail = "skipped", "cannot reset the peak RSS here"
        return figure
    listed = tasks // 10
    try:
        with WorkerPool(workers) as pool:
            sum(pool.process_stream(square, range(4 * workers)))
            start = time.perf_counter()
            before, after, total = rss_growth_kib(
                lambda: sum(pool.process_stream(square, range(tasks)))
            )
            seconds = time.perf_counter() - start
            list_before, list_after, results = rss_growth_kib(
                lambda: pool.process(square, list(range(listed)))
            )
    except Exception as error:  # noqa: BLE001 - reported, and fails the run
        return failed_figure(figure.measure, figure.runner, tasks, error)
    figure.value = (after - before) / 1024
    figure.extra = {
        "peak_rss_before_kib": before,
        "peak_rss_after_kib": after,
        "seconds": seconds,
        "list_tasks": listed,
        "list_peak_rss_growth_kib": list_after - list_before,
    }
    figure.detail = (
        f"peak RSS {before / 1024:.0f} -> {after / 1024:.0f} MiB over "
        f"{seconds:.1f} s; process() over a list of {listed:,} inputs: "
        f"+{(list_after - list_before) / 1024:.0f} MiB"
    )
    if total != sum_of_squares(tasks) or sum(results) != sum_of_squares(listed):
        figure.status, figure.detail = "mismatch", "wrong sum of squares"
    return figure


def submit_tries(quick: bool) -> int:
    """How many single submits the latency measurement times."""
    return _QUICK_SUBMITS if quick else _FULL_SUBMITS


def idle_pause() -> None:
    """Sleep briefly before a timed submit, so that it reaches an idle pool."""
    time.sleep(_SUBMIT_PAUSE)


def submit_latencies(submit: Callable[[], Result], tries: int) -> list[float]:
    """Seconds from each ``submit`` to its ``.result()``, one call at a time.

    Each try follows a short pause, so it reaches an idle pool, and checks
    that the trivial task (``square(3)``) came back right.
    """
    seconds = []
    for _ in range(tries):
        idle_pause()
        start = time.perf_counter()
        value = submit()
        seconds.append(time.perf_counter() - start)
        if value != 9:
            raise AssertionError(f"submit(square, 3) gave {value!r}")
    return seconds


def latency_figure(runner: str, seconds: list[float]) -> Figure:
    """Median latency in milliseconds, with the spread under ``extra``."""
    ordered = sorted(seconds)
    figure = Figure("submit", runner, len(seconds), statistics.median(seconds) * 1e3)
    figure.unit, figure.samples = "ms median", seconds
    figure.extra = {
        "min_ms": ordered[0] * 1e3,
        "p90_ms": ordered[int(0.9 * (len(ordered) - 1))] * 1e3,
    }
    figure.detail = (
        f"min {ordered[0] * 1e3:.3f} ms, p90 {figure.extra['p90_ms']:.3f} ms"
    )
    return figure


def measure_executor_submit(workers: int, tries: int) -> Figure:
    """``ProcessPoolExecutor.submit(square, 3).result()`` on a warm executor."""
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(workers) as executor:
        list(executor.map(square, range(4 * workers)))
        seconds = submit_latencies(lambda: executor.submit(square, 3).result(), tries)
    return latency_figure("ProcessPoolExecutor.submit", seconds)


def measure_poolme_submit(workers: int, tries: int) -> Figure:
    """``WorkerPool.submit(square, 3).result()`` on a warm pool."""
    from poolme_mp import WorkerPool

    with WorkerPool(workers) as pool:
        pool.process(square, range(4 * workers))
        seconds = submit_latencies(lambda: pool.submit(square, 3).result(), tries)
    return latency_figure("poolme_mp.submit", seconds)


def measure_submit(workers: int, quick: bool) -> list[Figure]:
    """Latency of one submit, poolme_mp against ``ProcessPoolExecutor``.

    ``vs_reference`` is the executor's median over this runner's: above 1 is
    quicker.
    """
    tries = submit_tries(quick)
    figures = []
    for runner, measure in (
        ("ProcessPoolExecutor.submit", measure_executor_submit),
        ("poolme_mp.submit", measure_poolme_submit),
    ):
        try:
            figures.append(measure(workers, tries))
        except Exception as error:  # noqa: BLE001 - reported, and fails the run
            figures.append(failed_figure("submit", runner, tries, error))
    reference = figures[0].value
    for figure in figures:
        if reference is not None and figure.value:
            figure.vs_reference = reference / figure.value
    return figures


def measure_progress(workers: int, quick: bool) -> list[Figure]:
    """Throughput of ``process`` on tiny tasks without and with ``progress=True``.

    The bar writes to a throwaway ``io.StringIO`` (``redirect_stderr``).  The
    two maps alternate ``PROGRESS_PAIRS`` times on one warm pool; the last
    figure is the bar's overhead in percent of the plain map's best time.
    """
    tasks = tiny_tasks(quick)
    try:
        seconds, results, bar_text = time_progress_pairs(workers, tasks)
    except Exception as error:  # noqa: BLE001 - reported, and fails the run
        return [failed_figure("progress", "poolme_mp.process", len(tasks), error)]
    expected = list(map(square, tasks))
    plain, with_bar = (
        throughput_of(runner, tasks, seconds[bar], results[bar], expected)
        for runner, bar in (
            ("poolme_mp.process", False),
            ("poolme_mp.process(progress=True)", True),
        )
    )
    with_bar.vs_reference = min(seconds[False]) / min(seconds[True])
    with_bar.detail = with_bar.detail or f"bar wrote {len(bar_text):,} characters"
    overhead = (min(seconds[True]) / min(seconds[False]) - 1) * 100
    return [
        plain,
        with_bar,
        Figure("progress", "overhead of progress=True", len(tasks), overhead, "%"),
    ]


def throughput_of(
    runner: str,
    tasks: Sequence[Task],
    seconds: list[float],
    results: Sequence[Result],
    expected: Sequence[Result],
) -> Figure:
    """A ``progress`` figure: tasks/s of the fastest map, results checked."""
    figure = Figure("progress", runner, len(tasks), len(tasks) / min(seconds))
    figure.unit, figure.samples = "tasks/s", seconds
    if list(results) != list(expected):
        figure.status = "mismatch"
        figure.detail = describe_mismatch(results, expected)
    return figure


def time_progress_pairs(
    workers: int, tasks: Sequence[int]
) -> tuple[dict[bool, list[float]], dict[bool, Sequence[Result]], str]:
    """Alternate plain and progress-bar maps on one warm pool.

    Returns the times and the last results, each keyed by ``progress``, and
    the text the bar wrote.
    """
    from poolme_mp import WorkerPool

    seconds: dict[bool, list[float]] = {False: [], True: []}
    results: dict[bool, Sequence[Result]] = {}
    with WorkerPool(workers) as pool, redirect_stderr(io.StringIO()) as bar_output:
        pool.process(square, tasks[: 4 * workers], progress=True)  # imports tqdm
        for _ in range(PROGRESS_PAIRS):
            for bar in (False, True):
                start = time.perf_counter()
                results[bar] = pool.process(square, tasks, progress=bar)
                seconds[bar].append(time.perf_counter() - start)
    return seconds, results, bar_output.getvalue()


# --------------------------------------------------------------------------
# The machine
# --------------------------------------------------------------------------


def usable_cpu_count() -> int:
    """CPUs this process may run on (affinity), not merely those installed."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo, or the platform's guess."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine_info() -> dict[str, Any]:
    """What the numbers were measured on."""
    return {
        "cpu_count": os.cpu_count(),
        "usable_cpus": usable_cpu_count(),
        "cpu_model": cpu_model(),
        "python": sys.version.split()[0],
        "implementation": platform.python_implementation(),
        "platform": platform.platform(),
        "default_start_method": multiprocessing.get_start_method(),
        "poolme_mp_start_method": poolme_mp_start_method(),
        "versions": package_versions(),
    }


def poolme_mp_start_method() -> str | None:
    """The start method a default ``poolme_mp.WorkerPool`` uses (not started)."""
    try:
        from poolme_mp import WorkerPool

        return WorkerPool(1).start_method
    except Exception:  # noqa: BLE001 - the report says "unknown" instead
        return None


def package_versions() -> dict[str, str | None]:
    """Installed versions of the product and the peers it is compared with."""
    from importlib import metadata

    import poolme_mp

    # The imported module, not the installed metadata: a source checkout on
    # PYTHONPATH may differ from whatever was last pip-installed.
    versions: dict[str, str | None] = {"poolme_mp": poolme_mp.__version__}
    for distribution in ("numpy", "scikit-image", "joblib", "mpire"):
        try:
            versions[distribution] = metadata.version(distribution)
        except metadata.PackageNotFoundError:
            versions[distribution] = None
    return versions
