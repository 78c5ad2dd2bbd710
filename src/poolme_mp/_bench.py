"""Benchmark workloads and runners shared by ``poolme-mp bench`` and benchmarks/.

The ``ast`` and ``images`` workloads run on real input that installed packages
ship (the running Python's standard library, scikit-image's bundled sample
images), so nobody on this team chose their task sizes; ``tiny`` squares a
million integers to expose per-task overhead.  Every runner maps a
module-level function over a list of tasks and returns the results in input
order; the serial runner's results are the reference the pools must reproduce.

The task functions live at module level here so that every peer pool, whatever
its start method, can pickle them by reference.
"""

from __future__ import annotations

import ast
import functools
import importlib
import importlib.util
import multiprocessing
import os
import platform
import sys
import sysconfig
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field
from typing import Any

Task = Any
Result = Any
TaskFn = Callable[[Task], Result]
#: A started pool's map: ``mapper(fn, tasks)`` returns ``[fn(t) for t in tasks]``.
Mapper = Callable[[TaskFn, Sequence[Task]], list[Result]]


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
#: At most this many files for ``--quick`` (about a fifth of CPython 3.11's).
_QUICK_AST_FILES = 400


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
#: the images alone, each one a distinct array; ``--quick`` keeps two.
_FULL_VARIANTS = 8
_QUICK_VARIANTS = 2
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
# Registry of workloads
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class Workload:
    """A named task function with the code that builds its tasks."""

    name: str
    description: str
    fn: TaskFn
    build_tasks: Callable[[bool], Sequence[Task]]


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
    )
}


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
    """``mpire.WorkerPool.map``; ``keep_alive`` reuses the workers across maps."""
    mpire = import_untyped("mpire")
    with mpire.WorkerPool(n_jobs=workers, keep_alive=True) as pool:

        def mpire_map(fn: TaskFn, tasks: Sequence[Task]) -> list[Result]:
            return list(pool.map(fn, tasks))

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


@dataclass(frozen=True)
class Runner:
    """How to start one peer pool, and whether it may be missing."""

    name: str
    open: Callable[[int], AbstractContextManager[Mapper]]
    #: A standard-library pool: the baseline the product is compared with.
    is_stdlib: bool = False
    #: Imported from an optional package; skipped, not failed, when absent.
    optional_module: str | None = None


SERIAL = Runner("serial", open_serial)
RUNNERS: tuple[Runner, ...] = (
    SERIAL,
    Runner("mp.Pool", open_mp_pool, is_stdlib=True),
    Runner("ProcessPoolExecutor", open_process_pool_executor, is_stdlib=True),
    Runner("joblib", open_joblib, optional_module="joblib"),
    Runner("mpire", open_mpire, optional_module="mpire"),
    Runner("poolme_mp", open_poolme_mp),
)


def is_importable(module: str) -> bool:
    """Whether ``module`` is installed, found without importing it."""
    return importlib.util.find_spec(module) is not None


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
) -> tuple[list[float], list[Result]]:
    """Time ``repeats`` map calls; return every wall time and the last results."""
    seconds: list[float] = []
    results: list[Result] = []
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
        }


def measure_runner(
    runner: Runner,
    workload: Workload,
    tasks: Sequence[Task],
    expected: list[Result],
    workers: int,
    repeats: int,
) -> Measurement:
    """Start ``runner``'s pool, warm it, time its map and check the results."""
    result = Measurement(workload.name, runner.name, len(tasks), "ok")
    if runner.optional_module and not is_importable(runner.optional_module):
        result.status, result.detail = "skipped", f"{runner.optional_module} missing"
        return result
    try:
        with runner.open(workers) as mapper:
            warm_up(mapper, workload.fn, tasks, workers)
            result.seconds, results = best_of(mapper, workload.fn, tasks, repeats)
    except Exception as error:  # noqa: BLE001 - reported, and fails the run
        result.status, result.detail = "error", f"{type(error).__name__}: {error}"
        return result
    if results != expected:
        result.status, result.detail = "mismatch", describe_mismatch(results, expected)
    return result


def describe_mismatch(results: list[Result], expected: list[Result]) -> str:
    """Say where a pool's results first differ from the serial ones."""
    if len(results) != len(expected):
        return f"{len(results)} results for {len(expected)} tasks"
    index = next(
        i for i, (a, b) in enumerate(zip(results, expected, strict=True)) if a != b
    )
    return f"task {index}: got {results[index]!r}, serial gave {expected[index]!r}"


def add_relative_speeds(measurements: list[Measurement]) -> None:
    """Fill in speed-up over serial and speed relative to the best stdlib pool.

    Both are ``reference time / runner time``, so above 1 means faster.
    """
    serial = _best_time(m for m in measurements if m.runner == SERIAL.name)
    stdlib_names = {r.name for r in RUNNERS if r.is_stdlib}
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
    """Build the tasks, run them serially for reference, then through each pool."""
    tasks = workload.build_tasks(quick)
    progress(f"{workload.name}: {len(tasks)} tasks, serial reference")
    serial = Measurement(workload.name, SERIAL.name, len(tasks), "ok")
    with SERIAL.open(workers) as serial_map:
        # Warm the serial run too: lazy imports and a cold page cache would
        # otherwise flatter every pool that runs after it.
        warm_up(serial_map, workload.fn, tasks, workers)
        serial.seconds, expected = best_of(serial_map, workload.fn, tasks, repeats)
    measurements = [serial]
    for runner in runners:
        if runner is SERIAL:
            continue
        progress(f"{workload.name}: {runner.name}")
        measurements.append(
            measure_runner(runner, workload, tasks, expected, workers, repeats)
        )
    add_relative_speeds(measurements)
    notes = workload_notes(workload, tasks, expected)
    return WorkloadRun(workload, len(tasks), measurements, notes)


def workload_notes(
    workload: Workload, tasks: Sequence[Task], expected: list[Result]
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
        import statistics

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
