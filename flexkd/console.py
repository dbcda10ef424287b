"""What the console shows: without ``flexkd --verbose``, known-harmless noise is kept off it.

* Ray's ``core_worker.cc`` error that an actor's constructor arguments sit in the object store
  (ray-project/ray#53727, #57733): printed for Ray Train's own PreemptionWatcher and for Ray
  Data's actors, whatever their arguments. Lines a Ray worker prints reach the driver through Ray's
  log monitor, which skips lines matching RAY_DEDUP_LOGS_SKIP_REGEX; they stay in the worker's
  log file (``/tmp/ray/session_latest/logs/worker-*.err``).
* The raylet's warning that more Python workers started than its expected startup concurrency
  (2 on 2 CPUs): every pipeline starts Ray Data and Ray Train actors beside its tasks.
* DeprecationWarning and FutureWarning raised inside the libraries, e.g. Ray Train's
  ``DataConfig.default_ingest_options()`` setting the deprecated
  ``ExecutionOptions.exclude_resources`` (a RayDeprecationWarning in the driver and in Ray
  Train's DatasetManager). Ignored in this process and, through PYTHONWARNINGS in the
  runtime_env, in Ray's workers; a PYTHONWARNINGS of the user's own is left as it is.

A line Ray's driver process writes itself from C++ (the same core_worker error, for the tokenize
stage's Ray Data actors; giving them the tokenizer by reference does not avoid it) goes to the
console unfiltered: Ray has no switch for it short of RAY_BACKEND_LOG_LEVEL, which would drop
every error from its log files too.
"""

from __future__ import annotations

import os
import warnings

# Matched with re.search against each line a Ray worker or raylet prints.
HARMLESS_RAY_LINES = "|".join(
    (
        r"core_worker\.cc:\d+: Actor with class name: .* has constructor arguments in the object store",
        # A pipeline's Ray Data and Ray Train actors outnumber 2 CPUs' "expected startup concurrency".
        r"WARNING: \d+ PYTHON worker processes have been started on node",
    )
)
HIDDEN_WARNINGS = (DeprecationWarning, FutureWarning)
WORKER_PYTHONWARNINGS = ",".join(f"ignore::{category.__name__}" for category in HIDDEN_WARNINGS)

_quiet = False


def quiet() -> None:
    """Keep the harmless noise off this process's console and that of the Ray it starts or joins.

    Call it before ``import ray``: Ray reads RAY_DEDUP_LOGS_SKIP_REGEX when it is imported.
    """
    global _quiet
    _quiet = True
    os.environ.setdefault("RAY_DEDUP_LOGS_SKIP_REGEX", HARMLESS_RAY_LINES)
    hide_library_warnings()


def hide_library_warnings() -> None:
    """Ignore the hidden warning categories in this process, if :func:`quiet` was called.

    Called again once Ray is imported: its import puts a filter that shows each module's first
    RayDeprecationWarning ahead of these (unless Python was started with -W or PYTHONWARNINGS).
    """
    if _quiet:
        for category in HIDDEN_WARNINGS:
            warnings.filterwarnings("ignore", category=category)


def worker_env_vars() -> dict[str, str]:
    """The environment variables Ray's workers need for the same filters (runtime_env env_vars)."""
    if not _quiet or "PYTHONWARNINGS" in os.environ:
        return {}
    return {"PYTHONWARNINGS": WORKER_PYTHONWARNINGS}
