"""Fault injection for reliability tests: off unless the environment turns it on.

    FLEXKD_FAULT_KILL_WORKER_AT_STEP=<step>   SIGKILL one Ray Train worker right after <step>
    FLEXKD_FAULT_KILL_WORKER_RANK=<rank>      which worker (default 0)

SIGKILL, not an exception: the worker dies the way an OOM-killed process or a lost node does,
with no chance to clean up, so what is tested is Ray Train's restart (``training.max_failures``)
and the resume from the last checkpoint, not an error path. The fault fires once per stage
directory: a marker file is created (atomically, O_EXCL) before the kill, and the restarted
worker finds it and runs on. The marker stays in the stage directory as the record of the fault.

Set the variables in the environment of the process that runs ``flexkd run``:
:func:`flexkd.cluster.local.ensure_ray` forwards them to the Ray job (:func:`runtime_env_vars`), so the
workers see them also when the driver joins an existing Ray. Under ``flexkd submit`` put them in
the job's runtime_env ``env_vars`` instead.
"""

from __future__ import annotations

import logging
import os
import signal
from pathlib import Path

log = logging.getLogger("flexkd")

FAULT_ENV_PREFIX = "FLEXKD_FAULT_"
KILL_WORKER_AT_STEP_ENV = f"{FAULT_ENV_PREFIX}KILL_WORKER_AT_STEP"
KILL_WORKER_RANK_ENV = f"{FAULT_ENV_PREFIX}KILL_WORKER_RANK"


def _int_env(name: str, default: int | None) -> int | None:
    text = os.environ.get(name, "").strip()
    if not text:
        return default
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"{name}={text!r}: expected an integer") from None


def marker_path(marker_dir: Path, step: int, rank: int) -> Path:
    """The file that records (and so disarms) the fault at ``step`` on ``rank``."""
    return Path(marker_dir) / f"fault-killed-worker-rank{rank}-step{step}"


def maybe_kill_worker(step: int, rank: int, marker_dir: Path) -> None:
    """Kill this process with SIGKILL if the environment asks for it at ``step`` on ``rank``.

    Call it on every rank after each finished optimizer step (``step`` counts finished steps).
    A no-op, costing one environment lookup, unless FLEXKD_FAULT_KILL_WORKER_AT_STEP is set.
    """
    at_step = _int_env(KILL_WORKER_AT_STEP_ENV, None)
    if at_step is None or step != at_step or rank != _int_env(KILL_WORKER_RANK_ENV, 0):
        return
    marker = marker_path(marker_dir, step, rank)
    try:
        descriptor = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:  # fired already: this is the restarted worker
        return
    os.write(descriptor, f"{KILL_WORKER_AT_STEP_ENV}={at_step}: rank {rank} killed after step {step}\n".encode())
    os.fsync(descriptor)  # the restarted worker must see the marker, or the fault would fire forever
    os.close(descriptor)
    log.warning("fault injection: killing rank %d (pid %d) after step %d", rank, os.getpid(), step)
    os.kill(os.getpid(), signal.SIGKILL)


def runtime_env_vars() -> dict[str, str]:
    """The FLEXKD_FAULT_* variables of this process, to forward to Ray workers (empty when off)."""
    return {name: value for name, value in os.environ.items() if name.startswith(FAULT_ENV_PREFIX)}
