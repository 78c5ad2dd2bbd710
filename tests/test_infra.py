"""Tests of the test infrastructure in conftest.py.

Each scenario runs in a separate pytest process that uses a copy of our
conftest, so a deliberate leak or hang there cannot harm this session.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

import pytest

CONFTEST = Path(__file__).with_name("conftest.py")

# One scenario file for everything that does not end the inner session.
SCENARIOS = r"""
import multiprocessing
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from conftest import SHM_DIR, wait_until

OUT = Path(os.environ["INFRA_OUT"])


def _exit_now():
    pass


def _state(pid):
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()[0]


def test_joined_children_are_fine(start_method):
    ctx = multiprocessing.get_context(start_method)
    proc = ctx.Process(target=_exit_now)
    proc.start()
    proc.join(timeout=30)
    assert proc.exitcode == 0


def test_exited_unwaited_popen_is_fine():
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    wait_until(lambda: _state(proc.pid) == "Z", timeout=10)


def test_leaks_sleeping_child():
    proc = subprocess.Popen(["sleep", "60"])
    (OUT / "child.pid").write_text(str(proc.pid))


def test_leaks_orphaned_grandchild():
    # The shell exits at once; its background sleep is orphaned.
    out = subprocess.run(
        ["sh", "-c", "sleep 60 >/dev/null 2>&1 & echo $!"],
        capture_output=True, text=True, timeout=10, check=True,
    )
    (OUT / "orphan.pid").write_text(out.stdout.strip())


def test_leaks_forkserver_worker():
    ctx = multiprocessing.get_context("forkserver")
    proc = ctx.Process(target=time.sleep, args=(60,), daemon=True)
    proc.start()
    (OUT / "worker.pid").write_text(str(proc.pid))


def test_leaks_unjoined_process():
    proc = multiprocessing.get_context("fork").Process(target=_exit_now)
    proc.start()
    wait_until(lambda: _state(proc.pid) == "Z", timeout=10)


def test_leaks_shm_entry():
    path = Path(SHM_DIR, f"poolme-infra-{os.getpid()}")
    path.write_bytes(b"x")
    (OUT / "shm.path").write_text(str(path))


def _blocked_helper(event):
    event.wait(60)


@pytest.mark.timeout(0.5)
def test_hangs_in_python():
    event = threading.Event()
    threading.Thread(target=_blocked_helper, args=(event,), daemon=True).start()
    try:
        event.wait(60)
    finally:
        event.set()
"""

# A hang pytest-timeout's SIGALRM cannot interrupt, as in C code.
C_LEVEL_HANG = r"""
import signal
import time

import pytest


@pytest.mark.timeout(0.5)
def test_hangs_where_signals_cannot_reach():
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGALRM})
    time.sleep(60)
"""


@dataclass
class InnerRun:
    """Outcome of one inner pytest session."""

    returncode: int
    output: str
    outcomes: dict[str, tuple[str, str]]  # test name -> (outcome, message)
    out_dir: Path


def _run_inner(tmp_path: Path, source: str, **env: str) -> InnerRun:
    """Run ``source`` as a test file under a copy of our conftest."""
    (tmp_path / "pytest.ini").write_text("[pytest]\n")  # Pins the rootdir here.
    (tmp_path / "conftest.py").write_text(CONFTEST.read_text())
    (tmp_path / "test_scenarios.py").write_text(textwrap.dedent(source))
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    junit = tmp_path / "junit.xml"
    cmd = [
        sys.executable,
        "-m",
        "pytest",
        "-p",
        "no:cacheprovider",
        "-rA",
        f"--junitxml={junit}",
        str(tmp_path),
    ]
    full_env = {
        **os.environ,
        "INFRA_OUT": str(out_dir),
        "POOLME_LEAK_GRACE": "0.3",
        **env,
    }
    proc = subprocess.run(
        cmd, cwd=tmp_path, env=full_env, capture_output=True, text=True, timeout=60
    )
    outcomes = _parse_junit(junit) if junit.exists() else {}
    return InnerRun(proc.returncode, proc.stdout + proc.stderr, outcomes, out_dir)


def _parse_junit(path: Path) -> dict[str, tuple[str, str]]:
    outcomes = {}
    for case in ET.parse(path).iter("testcase"):
        outcome, message = "passed", ""
        for child in case:
            if child.tag in ("failure", "error", "skipped"):
                outcome, message = (
                    child.tag,
                    child.get("message", "") + (child.text or ""),
                )
        outcomes[case.get("name", "")] = (outcome, message)
    return outcomes


def _is_alive(pid: int) -> bool:
    """True if ``pid`` exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


@pytest.fixture(scope="module")
def scenarios(tmp_path_factory: pytest.TempPathFactory) -> InnerRun:
    return _run_inner(tmp_path_factory.mktemp("scenarios"), SCENARIOS)


def test_clean_tests_pass(scenarios: InnerRun) -> None:
    """Joined children, mp helpers and reaped-late subprocesses are no leak."""
    clean = [
        f"test_joined_children_are_fine[{m}]" for m in ("fork", "forkserver", "spawn")
    ]
    clean.append("test_exited_unwaited_popen_is_fine")
    for test in clean:
        assert scenarios.outcomes[test][0] == "passed", scenarios.output


@pytest.mark.parametrize(
    ("test", "pid_file", "detail"),
    [
        ("test_leaks_sleeping_child", "child.pid", "still running"),
        ("test_leaks_orphaned_grandchild", "orphan.pid", "still running"),
        ("test_leaks_forkserver_worker", "worker.pid", "still running"),
        ("test_leaks_unjoined_process", None, "exited but never joined"),
    ],
)
def test_leaked_process_fails_and_is_killed(
    scenarios: InnerRun, test: str, pid_file: str | None, detail: str
) -> None:
    """A process left behind fails its test at teardown and gets killed."""
    outcome, message = scenarios.outcomes[test]
    assert outcome == "error", scenarios.output
    assert "test leaked resources" in message and detail in message
    if pid_file is not None:
        pid = int((scenarios.out_dir / pid_file).read_text())
        assert f"process {pid} " in message
        assert not _is_alive(pid)


def test_leaked_shm_entry_fails_and_is_removed(scenarios: InnerRun) -> None:
    """A new /dev/shm entry fails its test and is unlinked."""
    outcome, message = scenarios.outcomes["test_leaks_shm_entry"]
    path = (scenarios.out_dir / "shm.path").read_text()
    assert outcome == "error" and path in message, scenarios.output
    assert not os.path.exists(path)
    # Earlier tests leaked processes; they were killed, so none is blamed here.
    assert "process" not in message


def test_python_hang_dumps_all_threads(scenarios: InnerRun) -> None:
    """A test stuck in Python fails on timeout with every thread's stack."""
    outcome, message = scenarios.outcomes["test_hangs_in_python"]
    assert outcome == "failure" and "Timeout" in message, scenarios.output
    assert "_blocked_helper" in scenarios.output  # The other thread's stack.


def test_c_level_hang_dumps_stacks_and_exits(tmp_path: Path) -> None:
    """A hang that signals cannot break ends the run with a stack dump."""
    run = _run_inner(tmp_path, C_LEVEL_HANG, POOLME_WATCHDOG_GRACE="0.5")
    assert run.returncode != 0
    assert "most recent call first" in run.output, run.output
    assert "test_hangs_where_signals_cannot_reach" in run.output
