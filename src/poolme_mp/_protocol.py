"""Frame kinds and fixed headers shared by the engine and the workers.

Task ring (parent to worker):
    TASKS  TASK_HEADER, function bytes (fn_len, only the first time this
           worker sees fn_id), then a task envelope (see _codec): the
           pickled list of tasks of this frame
    STOP   empty: finish the frames before this one, run on_worker_stop,
           exit with status 0

Result ring (worker to parent):
    READY         the worker finished on_worker_start; payload: pid (q)
    START_FAILED  on_worker_start raised; payload: an error record
    RESULTS       RESULT_HEADER, the results envelope (results_len bytes),
                  then the error records (a list), pinned and unpinned arena
                  offsets, as an envelope (see _codec)
    LOG           a pickled logging record dictionary
    HOOK_FAILED   on_worker_stop raised; payload: an error record

An error record is the tuple (offset, exception pickle or None, type
name, message, traceback text, direction), where direction is None for an
exception the task raised, "result" when its result could not be pickled,
and "task" when its argument could not be unpickled.
"""

from __future__ import annotations

import struct

TASKS = 1
STOP = 2

READY = 10
START_FAILED = 11
RESULTS = 12
LOG = 13
HOOK_FAILED = 14

# call id, function id, function bytes length, invocation mode, flags
TASK_HEADER = struct.Struct("<qIIBB2x")
FLAG_STOP_ON_ERROR = 1
FLAG_TIMED = 2      # publish each task's start time (task_timeout is set)
FLAG_TYPED_OUTPUT = 4  # the envelope is (tasks, output view): write results there

# call id, elapsed ns, first offset not run (-1: all ran), status,
# results envelope length
RESULT_HEADER = struct.Struct("<qqiiI")
STATUS_OK = 0
STATUS_DECODE_FAILED = 1
STATUS_FUNCTION_FAILED = 2

PID = struct.Struct("<q")

# Both sides keep the last this-many functions by id; the parent mirrors
# each worker's cache so it knows when a function must be sent again.
FUNCTION_CACHE_SIZE = 64
