"""poolme_mp: a process pool for CPU-bound Python work.

    from poolme_mp import WorkerPool
    with WorkerPool() as pool:
        results = pool.process(parse, paths)

See WorkerPool for the options and the error contract.
"""

try:
    from . import _dispatch  # noqa: F401
except ImportError as exc:
    raise ImportError(
        "poolme_mp's compiled dispatch core (poolme_mp._dispatch) is missing. "
        "Install the package with `pip install .` (needs a C compiler and Cython), "
        "or build it in place with `python setup.py build_ext --inplace`."
    ) from exc

from typing import TYPE_CHECKING

from ._dispatch import ResultStream
from ._errors import (
    BrokenPoolError,
    CallbackError,
    CallCancelledError,
    CallTimeoutError,
    PoolClosedError,
    PoolError,
    RemoteError,
    TaskError,
    TaskErrorGroup,
    TaskSerializationError,
    TaskTimeoutError,
    WorkerCrashedError,
)
from ._policies import RateLimiter, RetryPolicy, TokenBucket
from ._pool import UnpicklableFunctionError, WorkerPool
from ._state import WorkerState, worker_state

if TYPE_CHECKING:
    from ._shared import SharedArray, empty_shared, share


def __getattr__(name: str) -> object:
    # The shared-array helpers need numpy; import it only when asked.
    if name in ("share", "empty_shared", "SharedArray"):
        from . import _shared

        return getattr(_shared, name)
    raise AttributeError(f"module 'poolme_mp' has no attribute {name!r}")

__all__ = [
    "BrokenPoolError",
    "CallCancelledError",
    "CallTimeoutError",
    "CallbackError",
    "PoolClosedError",
    "PoolError",
    "RateLimiter",
    "RemoteError",
    "ResultStream",
    "RetryPolicy",
    "SharedArray",
    "TaskError",
    "TaskErrorGroup",
    "TaskSerializationError",
    "TaskTimeoutError",
    "TokenBucket",
    "UnpicklableFunctionError",
    "WorkerCrashedError",
    "WorkerPool",
    "WorkerState",
    "empty_shared",
    "share",
    "worker_state",
]

__version__ = "0.1.0"
