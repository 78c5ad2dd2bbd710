"""The ``poolme-mp`` console script.

``poolme-mp bench`` runs the workloads of :mod:`poolme_mp._bench` through the
serial baseline, the standard-library pools, the optional peers that are
installed, and poolme_mp, then the streaming, submit-latency, progress-bar and
start-up measurements, and prints tables (or JSON with ``--json``).  It exits
non-zero when any pool's results differ from the serial ones or a pool
crashes, so it doubles as an end-to-end check.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import sys
import time
from collections.abc import Sequence
from typing import Any

from poolme_mp import _bench

#: Best-of repeats per runner; ``--quick`` must finish in a minute on 2 cores.
FULL_REPEATS = 3
QUICK_REPEATS = 2
#: Cold starts timed by the start-to-first-result measurement.
FULL_STARTS = 5
QUICK_STARTS = 3
#: The measurements beside the workloads, also selectable with ``--only``.
MEASURES = ("stream", "submit", "progress")
#: What the fork server imports before it forks poolme_mp's workers, so each
#: worker starts with them loaded instead of importing them itself.
FORKSERVER_PRELOAD = ["__main__", "poolme_mp._worker", "poolme_mp._bench", "numpy"]
#: When this module was imported: the origin of the progress lines' clock.
_STARTED = time.perf_counter()


def main(argv: Sequence[str] | None = None) -> int:
    """Parse the command line and run the chosen subcommand; return the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help(sys.stderr)
        return 2
    exit_code: int = args.handler(args)
    return exit_code


def build_parser() -> argparse.ArgumentParser:
    """The ``poolme-mp`` parser with its ``bench`` subcommand."""
    parser = argparse.ArgumentParser(
        prog="poolme-mp", description="poolme_mp process pool tools."
    )
    commands = parser.add_subparsers(dest="command")
    bench = commands.add_parser(
        "bench",
        help="compare poolme_mp with the standard-library pools and peers",
        description=(
            "Time real workloads through serial map, multiprocessing.Pool, "
            "ProcessPoolExecutor, joblib and mpire (when installed) and "
            "poolme_mp; fail if any pool's results differ from serial."
        ),
    )
    bench.add_argument(
        "--quick", action="store_true", help="smaller inputs, fewer repeats (<60 s)"
    )
    bench.add_argument(
        "--json", action="store_true", help="print machine-readable JSON on stdout"
    )
    bench.add_argument(
        "--workers",
        type=_positive_int,
        default=_bench.usable_cpu_count(),
        metavar="N",
        help="worker processes per pool (default: usable CPUs, %(default)s here)",
    )
    bench.add_argument(
        "--only",
        action="append",
        choices=[*_bench.WORKLOADS, *MEASURES],
        metavar="NAME",
        help="run only this workload or measurement; repeatable "
        f"({', '.join([*_bench.WORKLOADS, *MEASURES])})",
    )
    bench.add_argument(
        "--no-forkserver-preload",
        dest="forkserver_preload",
        action="store_false",
        help="do not preload numpy and the bench module in the fork server",
    )
    bench.add_argument(
        "--repeats",
        type=_positive_int,
        metavar="N",
        help=f"timed repeats per runner, best kept "
        f"(default {FULL_REPEATS}, {QUICK_REPEATS} with --quick)",
    )
    bench.set_defaults(handler=run_bench)
    return parser


def _positive_int(text: str) -> int:
    """An argparse type for counts that must be at least 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def run_bench(args: argparse.Namespace) -> int:
    """Run the benchmark and report it; 1 if any pool failed, else 0."""
    preloaded = args.forkserver_preload and preload_forkserver(FORKSERVER_PRELOAD)
    repeats = args.repeats or (QUICK_REPEATS if args.quick else FULL_REPEATS)
    names = _deduplicated(args.only or [*_bench.WORKLOADS, *MEASURES])
    runs = [
        _bench.run_workload(
            _bench.WORKLOADS[name],
            _bench.runners_for(_bench.WORKLOADS[name]),
            args.workers,
            args.quick,
            repeats,
            progress=_progress,
        )
        for name in names
        if name in _bench.WORKLOADS
    ]
    figures = run_measures([name for name in names if name in MEASURES], args, repeats)
    _progress("pool start to first result")
    starts = QUICK_STARTS if args.quick else FULL_STARTS
    startup = _bench.measure_startup(args.workers, starts)
    preload = FORKSERVER_PRELOAD if preloaded else None
    report = build_report(args, repeats, runs, figures, startup, preload)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(format_report(report))
    failures = list_failures(report)
    for failure in failures:
        print(f"FAIL {failure}", file=sys.stderr)
    return 1 if failures else 0


def preload_forkserver(modules: Sequence[str]) -> bool:
    """Have the fork server import ``modules`` before it forks any worker.

    Only while no fork server runs: a running one would not import them, and
    replacing its list would hide what it really holds.  Returns whether the
    preload list was set.
    """
    if "forkserver" not in multiprocessing.get_all_start_methods():
        return False
    from multiprocessing import forkserver

    if getattr(forkserver._forkserver, "_forkserver_pid", None) is not None:
        return False
    multiprocessing.set_forkserver_preload(list(modules))
    return True


def run_measures(
    names: Sequence[str], args: argparse.Namespace, repeats: int
) -> list[_bench.Figure]:
    """The streaming, submit and progress figures that ``names`` ask for.

    The 10-million-input memory check runs in the full run only.
    """
    figures: list[_bench.Figure] = []
    for name in names:
        _progress(name)
        if name == "stream":
            figures.extend(_bench.measure_stream(args.workers, args.quick, repeats))
            if not args.quick:
                _progress(f"stream: {_bench.RSS_STREAM_TASKS:,} inputs, peak RSS")
                figures.append(_bench.measure_stream_memory(args.workers))
        elif name == "submit":
            figures.extend(_bench.measure_submit(args.workers, args.quick))
        elif name == "progress":
            figures.extend(_bench.measure_progress(args.workers, args.quick))
    return figures


def _deduplicated(names: Sequence[str]) -> list[str]:
    """``names`` in first-seen order, each once (``--only ast --only ast``)."""
    return list(dict.fromkeys(names))


def _progress(message: str) -> None:
    """Tell the person waiting what runs now, on stderr so stdout stays clean."""
    elapsed = time.perf_counter() - _STARTED
    print(f"... [{elapsed:6.1f} s] {message}", file=sys.stderr, flush=True)


def build_report(
    args: argparse.Namespace,
    repeats: int,
    runs: Sequence[_bench.WorkloadRun],
    figures: Sequence[_bench.Figure],
    startup: Sequence[_bench.StartupMeasurement],
    preload: Sequence[str] | None = None,
) -> dict[str, Any]:
    """Everything measured, as the JSON document ``--json`` prints.

    ``preload`` is what the fork server was told to import, if anything.
    """
    return {
        "machine": _bench.machine_info(),
        "config": {
            "quick": args.quick,
            "workers": args.workers,
            "repeats": repeats,
            "workloads": [run.workload.name for run in runs],
            "forkserver_preload": list(preload) if preload else None,
        },
        "workloads": [
            {
                "name": run.workload.name,
                "description": run.workload.description,
                "tasks": run.task_count,
                "notes": run.notes,
            }
            for run in runs
        ],
        "results": [m.as_dict() for run in runs for m in run.measurements],
        "figures": [figure.as_dict() for figure in figures],
        "startup": [m.as_dict() for m in startup],
        "legend": (
            "x serial (speedup_vs_serial in --json) and x best stdlib "
            "(speed_vs_best_stdlib) are reference seconds divided by this "
            "runner's seconds: above 1 means faster; best stdlib is the faster "
            "of mp.Pool and ProcessPoolExecutor."
        ),
        "figures_note": FIGURES_NOTE,
        "startup_note": (
            "Seconds from constructing a pool to the result of a 1-task map, "
            "shutdown not included. Measured after the workloads, so a "
            "forkserver that poolme_mp launched for them is already running "
            "and its one-off launch is not counted. "
            + (
                f"The fork server preloaded {', '.join(preload)}."
                if preload
                else "The fork server preloaded only what poolme_mp asks for."
            )
        ),
    }


def list_failures(report: dict[str, Any]) -> list[str]:
    """One line per pool that crashed or returned results unlike serial's."""
    failures = [
        f"{r['workload']}/{r['runner']}: {r['status']}: {r['detail']}"
        for r in report["results"]
        if r["status"] in ("mismatch", "error")
    ]
    failures.extend(
        f"{f['measure']}/{f['runner']}: {f['status']}: {f['detail']}"
        for f in report["figures"]
        if f["status"] in ("mismatch", "error")
    )
    failures.extend(
        f"startup/{s['runner']}: {s['status']}: {s['detail']}"
        for s in report["startup"]
        if s["status"] != "ok"
    )
    return failures


FIGURES_NOTE = (
    "x reference: stream, throughput over the best mp.Pool.imap chunksize's; "
    "submit, ProcessPoolExecutor's median latency over this one's; progress, "
    "plain process() time over the time with the bar. Above 1 means faster."
)


# --------------------------------------------------------------------------
# The text report
# --------------------------------------------------------------------------

RESULT_COLUMNS = (
    "workload",
    "runner",
    "tasks",
    "wall s",
    "tasks/s",
    "x serial",
    "x best stdlib",
    "status",
)
STARTUP_COLUMNS = ("runner", "best ms", "median ms", "status")
FIGURE_COLUMNS = (
    "measure",
    "runner",
    "tasks",
    "value",
    "unit",
    "x reference",
    "status",
)
#: How each figure's value is printed, by unit.
VALUE_FORMATS = {"tasks/s": "{:,.0f}", "ms median": "{:.3f}", "MiB": "{:.1f}"}


def format_report(report: dict[str, Any]) -> str:
    """The human-readable report: machine, results table, start-up table."""
    sections = [
        format_machine(report["machine"], report["config"]),
        format_table(RESULT_COLUMNS, [_result_row(r) for r in report["results"]]),
        report["legend"],
        format_notes(report["workloads"]),
        format_setup_notes(report["results"]),
        format_figures(report["figures"]),
        f"Pool start to first result ({_start_count(report)} cold starts each). "
        + report["startup_note"],
        format_table(STARTUP_COLUMNS, [_startup_row(s) for s in report["startup"]]),
        format_problems(report),
    ]
    return "\n\n".join(section for section in sections if section)


def _start_count(report: dict[str, Any]) -> int:
    """How many cold starts each start-up runner was timed over."""
    return max(len(startup["all_seconds"]) for startup in report["startup"])


def format_machine(machine: dict[str, Any], config: dict[str, Any]) -> str:
    """Two lines saying what ran where."""
    versions = ", ".join(
        f"{name} {version}" for name, version in machine["versions"].items() if version
    )
    return (
        f"Machine: {machine['usable_cpus']} usable of {machine['cpu_count']} CPUs, "
        f"{machine['cpu_model']}; {machine['implementation']} {machine['python']} "
        f"on {machine['platform']}; start methods: multiprocessing "
        f"{machine['default_start_method']}, poolme_mp "
        f"{machine['poolme_mp_start_method'] or 'unknown'}\n"
        f"Run: {config['workers']} workers, best of {config['repeats']} "
        f"{'(quick) ' if config['quick'] else ''}| {versions}"
    )


def format_problems(report: dict[str, Any]) -> str:
    """Why each runner that has no numbers has none (failed, or skipped)."""
    rows = [*report["results"], *report["figures"], *report["startup"]]
    lines = [
        f"  {row.get('workload', row.get('measure', 'startup'))}/{row['runner']}: "
        f"{row['status']}: {row['detail']}"
        for row in rows
        if row["status"] != "ok"
    ]
    return "\n".join(["Not measured:", *lines]) if lines else ""


def format_notes(workloads: list[dict[str, Any]]) -> str:
    """One line per workload: what its tasks were and what was skipped."""
    lines = []
    for workload in workloads:
        line = (
            f"{workload['name']}: {workload['tasks']} tasks, {workload['description']}"
        )
        notes = workload["notes"]
        if "skipped_files" in notes:
            line += f"; {len(notes['skipped_files'])} unparsable files skipped"
        if "images" in notes:
            line += f"; {len(notes['images'])} images: {', '.join(notes['images'])}"
        if notes.get("skipped_images"):
            line += f"; could not load {', '.join(notes['skipped_images'])}"
        lines.append(line)
    return "\n".join(lines)


def format_setup_notes(results: list[dict[str, Any]]) -> str:
    """One line per runner whose one-time input preparation was timed apart."""
    return "\n".join(
        f"{r['workload']}/{r['runner']}: one-time poolme_mp.share() of {r['tasks']} "
        f"arrays took {r['setup_seconds']:.3f} s, not included in wall s"
        for r in results
        if r.get("setup_seconds") is not None
    )


def format_figures(figures: list[dict[str, Any]]) -> str:
    """The streaming, submit and progress table with its notes, if any ran."""
    if not figures:
        return ""
    table = format_table(FIGURE_COLUMNS, [_figure_row(f) for f in figures])
    notes = [
        f"{f['measure']}/{f['runner']}: {f['detail']}"
        for f in figures
        if f["detail"] and f["status"] == "ok"
    ]
    notes.extend(_sweep_line(f) for f in figures if "sweep" in f)
    return "\n\n".join(part for part in (table, FIGURES_NOTE, "\n".join(notes)) if part)


def _sweep_line(figure: dict[str, Any]) -> str:
    """The imap chunksizes tried, each with its rate, on one line."""
    rates = ", ".join(
        f"{tried['chunksize']}: {_number(tried['tasks_per_second'], '{:,.0f}')} "
        f"({tried['tasks']:,} tasks)"
        for tried in figure["sweep"]
    )
    return f"stream/mp.Pool.imap chunksizes tried, tasks/s: {rates}"


def _figure_row(figure: dict[str, Any]) -> list[str]:
    """One row of the streaming, submit and progress table."""
    value_format = VALUE_FORMATS.get(figure["unit"], "{:+.1f}")
    return [
        figure["measure"],
        figure["runner"],
        str(figure["tasks"]),
        _number(figure["value"], value_format),
        figure["unit"],
        _number(figure["vs_reference"], "{:.2f}"),
        figure["status"],
    ]


def _result_row(result: dict[str, Any]) -> list[str]:
    """One results-table row; ``-`` where a runner produced no number."""
    return [
        result["workload"],
        result["runner"],
        str(result["tasks"]),
        _number(result["best_seconds"], "{:.3f}"),
        _number(result["tasks_per_second"], "{:,.0f}"),
        _number(result["speedup_vs_serial"], "{:.2f}"),
        _number(result["speed_vs_best_stdlib"], "{:.2f}"),
        result["status"],
    ]


def _startup_row(startup: dict[str, Any]) -> list[str]:
    """One start-up-table row, in milliseconds."""
    return [
        startup["runner"],
        _number(startup["best_seconds"], "{:.1f}", scale=1000),
        _number(startup["median_seconds"], "{:.1f}", scale=1000),
        startup["status"],
    ]


def _number(value: float | None, template: str, scale: float = 1.0) -> str:
    """Format a measurement, or ``-`` when there is none."""
    return "-" if value is None else template.format(value * scale)


def format_table(columns: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """Left-align text columns and right-align numeric ones in a plain table."""
    widths = [
        max(len(column), *(len(row[i]) for row in rows)) if rows else len(column)
        for i, column in enumerate(columns)
    ]
    numeric = [
        bool(rows) and all(_looks_numeric(row[i]) for row in rows)
        for i in range(len(columns))
    ]

    def line(cells: Sequence[str]) -> str:
        padded = (
            cell.rjust(width) if is_number else cell.ljust(width)
            for cell, width, is_number in zip(cells, widths, numeric, strict=True)
        )
        return "  ".join(padded).rstrip()

    rule = "  ".join("-" * width for width in widths)
    return "\n".join([line(columns), rule, *(line(row) for row in rows)])


def _looks_numeric(cell: str) -> bool:
    """Whether a cell is a number (or the ``-`` placeholder for one)."""
    digits = cell[1:] if cell[:1] in ("+", "-") and len(cell) > 1 else cell
    return cell == "-" or digits.replace(",", "").replace(".", "", 1).isdigit()


if __name__ == "__main__":
    sys.exit(main())
