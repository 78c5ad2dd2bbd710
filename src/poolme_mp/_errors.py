"""The exception family of poolme_mp.

Every error the pool raises derives from PoolError.  Errors that are also a
standard kind of error inherit that too (a call timeout is a TimeoutError,
a closed pool a RuntimeError, a broken pool concurrent.futures'
BrokenExecutor), so existing ``except`` clauses keep working.
"""

from __future__ import annotations

import concurrent.futures
import signal
from collections.abc import Hashable, Sequence
from typing import Any


class PoolError(Exception):
    """Base class of every error raised by poolme_mp."""


def describe_task(index: int | None, key: Any = None, *, keyed: bool = False) -> str:
    """'task 3' or "task with key 'a'": how messages name a task."""
    if keyed:
        return f"task with key {key!r}"
    if index is None:
        return "the task"
    return f"task {index}"


def describe_exit(exitcode: int | None) -> str:
    """Decode a process exit status: 'SIGKILL (-9)' or 'exit code 7'."""
    if exitcode is None:
        return "an unknown status"
    if exitcode < 0:
        try:
            name = signal.Signals(-exitcode).name
        except ValueError:
            name = f"signal {-exitcode}"
        return f"{name} ({exitcode})"
    return f"exit code {exitcode}"


class TaskError(PoolError):
    """A task failed.

    ``index`` is the task's position in the input (``key`` its key in
    process_map), ``attempts`` how many times it ran, ``worker_pid`` the
    process of the last attempt.  The original exception is ``__cause__``;
    ``remote_traceback`` holds the worker's traceback text.
    """

    def __init__(
        self,
        message: str,
        *,
        index: int | None = None,
        key: Hashable | None = None,
        attempts: int = 1,
        worker_pid: int | None = None,
        remote_traceback: str = "",
    ) -> None:
        super().__init__(message)
        self.index = index
        self.key = key
        self.attempts = attempts
        self.worker_pid = worker_pid
        self.remote_traceback = remote_traceback

    def __reduce__(self) -> Any:
        # Keep the attributes when a TaskError is itself pickled (for
        # example by a nested pool returning it as a result).
        state = dict(self.__dict__)
        return (_rebuild_task_error, (type(self), self.args, state))

    def __str__(self) -> str:
        text = super().__str__()
        if self.remote_traceback:
            text += "\n\nWorker traceback:\n" + self.remote_traceback.rstrip()
        return text


def _rebuild_task_error(cls: type[TaskError], args: tuple[Any, ...], state: dict[str, Any]) -> TaskError:
    error = cls.__new__(cls)
    Exception.__init__(error, *args)
    error.__dict__.update(state)
    return error


class WorkerCrashedError(TaskError):
    """The worker process running a task died (signal, os._exit, OOM kill).

    ``exitcode`` is the worker's exit status, negative for a signal.
    """

    def __init__(self, message: str, *, exitcode: int | None = None, **kwargs: Any) -> None:
        super().__init__(message, **kwargs)
        self.exitcode = exitcode


class TaskTimeoutError(TaskError, TimeoutError):
    """A task ran past task_timeout; its worker was killed and replaced."""


class TaskSerializationError(TaskError):
    """A task's argument or result could not be pickled or unpickled.

    ``direction`` is "task" (parent to worker) or "result" (worker to parent).
    """

    def __init__(self, message: str, *, direction: str = "task", **kwargs: Any) -> None:
        super().__init__(message, **kwargs)
        self.direction = direction


def input_failure(index: int, exc: BaseException) -> TaskError:
    """The error of a call whose input iterator raised exc after index
    tasks had been read from it (its __cause__ is exc)."""
    error = TaskError(f"reading the input raised {type(exc).__name__}: {exc} "
                      f"(after {index} tasks had been read)", index=index)
    error.__cause__ = exc
    return error


class TaskErrorGroup(ExceptionGroup[TaskError], PoolError):
    """Every failure of a call run with continue_on_error, in task order.

    ``results`` holds the call's full output: each success in its place and
    the TaskError in place of each failure (a dict for process_map).
    """

    results: Any

    def __new__(cls, message: str, errors: Sequence[TaskError], results: Any = None) -> TaskErrorGroup:
        group = super().__new__(cls, message, list(errors))
        group.results = results
        return group

    def __init__(self, message: str, errors: Sequence[TaskError], results: Any = None) -> None:
        super().__init__(message, list(errors))

    def derive(self, excs: Sequence[TaskError]) -> TaskErrorGroup:  # type: ignore[override]
        return TaskErrorGroup(self.message, [e for e in excs if isinstance(e, TaskError)], self.results)


class CallTimeoutError(PoolError, TimeoutError):
    """A call's timeout= passed before all its tasks finished."""


class CallCancelledError(PoolError):
    """A call's cancel token was set before all its tasks finished."""


class PoolClosedError(PoolError, RuntimeError):
    """The pool was shut down; it accepts no more work."""


class BrokenPoolError(PoolError, concurrent.futures.BrokenExecutor):
    """Workers cannot be started (for example on_worker_start keeps failing)."""


class CallbackError(PoolError):
    """A parent-side callback (on_task_start, on_task_end, on_error,
    on_retry) raised; the original exception is ``__cause__``."""


class RemoteError(Exception):
    """Stand-in for a worker's exception that could not be rebuilt here.

    ``type_name`` is the original's qualified type name, ``message`` its
    text and ``remote_traceback`` the worker's traceback.
    """

    def __init__(self, type_name: str, message: str, remote_traceback: str = "") -> None:
        super().__init__(f"{type_name}: {message}")
        self.type_name = type_name
        self.message = message
        self.remote_traceback = remote_traceback
