"""worker_state: a dict per process that hooks and tasks share."""

from __future__ import annotations

from typing import Any


class WorkerState(dict[str, Any]):
    """A dict that is the same object for everything in one process.

    on_worker_start can put a model or a connection here and every task in
    that worker finds it.  A plain global of __main__ would not do: a
    function sent by value carries its own copy of the globals it uses.
    Pickling a WorkerState therefore sends a reference to the receiving
    process's own instance, never its contents.
    """

    def __reduce__(self) -> Any:
        return _this_process_state, ()


worker_state = WorkerState()

# True in a pool's worker processes (set as a worker starts).
in_worker_process = False


def _this_process_state() -> WorkerState:
    return worker_state
