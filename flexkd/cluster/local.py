"""A Ray for this pipeline: join the cluster named by RAY_ADDRESS (as a Ray job does), or start
one on this machine that listens on the loopback interface only."""

from __future__ import annotations

import logging
import os
import socket
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import ray
import ray.data
from ray._private import ray_constants

from flexkd import console
from flexkd.errors import StageError
from flexkd.testing import faults

log = logging.getLogger("flexkd")

RAY_CONNECT_TIMEOUT_S = 5.0
# The options of every Ray Data actor pool a stage starts (tokenize, generate, targets). Not
# restarted: an actor made from object-store arguments (Ray Data puts its map function there) and
# allowed restarts makes Ray print an error-looking core_worker line on every run. A lost actor
# fails its stage; a rerun redoes that stage only, since the stages before it are cached.
ACTOR_POOL_OPTIONS: dict[str, Any] = {"max_restarts": 0}
# Ray's switch for local-only clusters on macOS and Windows: while it is "0", Ray takes the
# loopback address as this node's IP instead of the address of the default route.
_RAY_LOCAL_ONLY_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"
# Whether this process started the Ray it uses (start_local_ray), rather than joining one that an
# autoscaler may grow: only then does check_local_capacity know the Ray's size is final.
_started_here = False


def ensure_ray() -> None:
    """Join the cluster named by RAY_ADDRESS (as a Ray job does), else start Ray on this machine.

    A Ray started here listens on the loopback interface only: GCS, raylet, object manager,
    workers, dashboard, dashboard agent and runtime-env agent (see :func:`_loopback_only`), with
    Ray's token authentication left on (its default for a local cluster). The one listener
    beyond loopback is PyTorch's, not Ray's: the rendezvous store of a Ray Train stage (see
    docs/FAILURES.md). An unreachable
    RAY_ADDRESS is refused within seconds, in one line. FLEXKD_FAULT_* variables
    (flexkd.faults) are forwarded to the job's workers.
    """
    console.hide_library_warnings()  # again: importing Ray put its own filter ahead
    if ray.is_initialized():
        return
    if not sys.stdout.isatty():
        # Into a log file (CI, a Ray job, `| tee`) Ray Data's bars become a block of lines every
        # 10 s per dataset; the stages log their own start, end and step lines instead.
        ray.data.DataContext.get_current().enable_progress_bars = False
    runtime_env = _forwarded_runtime_env()
    address = os.environ.get("RAY_ADDRESS", "").strip()
    if address:
        _check_ray_reachable(address)
        # Ray rewrites a loopback address to this machine's external IP before connecting,
        # which misses a cluster that, like ours, listens on loopback only.
        with _loopback_only(_is_loopback(address)):
            ray.init(address=address, log_to_driver=True, runtime_env=runtime_env)
        return
    start_local_ray(log_to_driver=True, runtime_env=runtime_env)


def check_local_capacity(num_workers: int, cpus_per_worker: float, use_gpu: bool) -> None:
    """On a Ray that flexkd started on this machine (no autoscaler to add nodes), refuse workers
    that do not fit in it: Ray would wait for their CPUs or GPUs forever, and say so only in a log
    line every few seconds. Raises StageError naming the resources settings."""
    if not _started_here:
        return
    have = ray.cluster_resources()
    needs = {"CPU": (num_workers * cpus_per_worker, f"{cpus_per_worker:g} CPUs (resources.cpus_per_worker)")}
    if use_gpu:
        needs["GPU"] = (num_workers, "1 GPU (resources.use_gpu)")
    for resource, (need, each) in needs.items():
        if need > have.get(resource, 0):
            raise StageError(
                f"resources: {num_workers} workers (resources.num_workers) x {each} need {need:g} {resource}s; "
                f"the Ray on this machine has {have.get(resource, 0):g}; use fewer or smaller workers, or a "
                "cluster (RAY_ADDRESS, flexkd submit)"
            )


def start_local_ray(**options: Any) -> None:
    """Start a new Ray on this machine that listens on 127.0.0.1 only (``options`` go to
    ``ray.init``), even if ``ray start`` left another one running here."""
    if os.environ.get("RAY_AUTH_MODE", "").lower() == "disabled":
        log.warning("RAY_AUTH_MODE=disabled: the local Ray accepts unauthenticated clients on 127.0.0.1")
    global _started_here
    options = {"dashboard_host": "127.0.0.1", **options}
    with _loopback_only(True):
        ray.init(address="local", _node_ip_address="127.0.0.1", **options)
    _started_here = True
    _restrict_token_file()


def _restrict_token_file() -> None:
    """Make Ray's auth token file readable by its owner only.

    Ray writes a new token with the process umask (usually world-readable). On a shared machine
    the loopback servers are reachable by every local user, and the token is then all that
    keeps them out.
    """
    path = Path(os.environ.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token")
    try:
        status = path.stat()
        if status.st_uid == os.getuid() and status.st_mode & 0o077:
            path.chmod(0o600)
    except FileNotFoundError:  # the token comes from RAY_AUTH_TOKEN, or auth is off
        return
    except OSError as error:
        log.warning("could not make %s private: %s", path, error)


@contextmanager
def _loopback_only(enabled: bool) -> Iterator[None]:
    """Make Ray take 127.0.0.1 as this node's IP while it starts or connects.

    On Linux, ray.init replaces a loopback ``_node_ip_address`` (and a loopback address to
    connect to) with the IP of the default route, and every Ray server then binds to all
    interfaces. Ray keeps loopback only where local clusters are the rule (macOS, Windows),
    under RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0; with it, each server binds to the node IP, here
    127.0.0.1. The environment variable reaches the processes Ray starts now; Ray reads it into
    ``ray_constants.ENABLE_RAY_CLUSTER`` at import, so that constant is set for this process.
    Both are restored afterwards, so a later connection to a real cluster is unaffected.
    tests/test_safety.py lists every listening socket of such a Ray and fails if any is not
    on loopback, which is what would catch a Ray upgrade that drops this switch.
    """
    if not enabled:
        yield
        return
    previous_env = os.environ.get(_RAY_LOCAL_ONLY_ENV)
    previous_constant = ray_constants.ENABLE_RAY_CLUSTER
    os.environ[_RAY_LOCAL_ONLY_ENV] = "0"
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = previous_constant
        if previous_env is None:
            os.environ.pop(_RAY_LOCAL_ONLY_ENV, None)
        else:
            os.environ[_RAY_LOCAL_ONLY_ENV] = previous_env


def _ray_host_port(address: str) -> tuple[str, int] | None:
    """Host and port of ``host:port``, ``[v6]:port`` or ``ray://host:port``; None for auto/local."""
    if address in ("auto", "local"):
        return None
    parts = urlsplit(address if "://" in address else f"//{address}")
    try:
        port = parts.port
    except ValueError:
        port = None
    if not parts.hostname or port is None:
        raise StageError(f"ray: RAY_ADDRESS={address}: expected host:port (or ray://host:port)")
    return parts.hostname, port


def _is_loopback(address: str) -> bool:
    host_port = _ray_host_port(address)
    return host_port is not None and (
        host_port[0] == "localhost" or host_port[0].startswith("127.") or host_port[0] == "::1"
    )


def _check_ray_reachable(address: str) -> None:
    """Ray retries an unreachable GCS for a minute or more; one TCP connect answers in seconds."""
    host_port = _ray_host_port(address)
    if host_port is None:
        return
    try:
        socket.create_connection(host_port, timeout=RAY_CONNECT_TIMEOUT_S).close()
    except OSError as error:
        reason = error.strerror or str(error) or type(error).__name__
        raise StageError(
            f"ray: cannot reach the Ray cluster at RAY_ADDRESS={address}: {reason}; "
            "start it, or unset RAY_ADDRESS to run on a local Ray"
        ) from None


def _forwarded_runtime_env() -> dict[str, Any] | None:
    """The job runtime_env that carries FLEXKD_FAULT_* and the warning filters of
    flexkd.console to the workers; None when there are none, or when this driver is itself a Ray
    job (its runtime_env already sets them, and setting the same variables twice is a conflict
    Ray refuses)."""
    env_vars = faults.runtime_env_vars() | console.worker_env_vars()
    if not env_vars or "RAY_JOB_CONFIG_JSON_ENV_VAR" in os.environ:
        return None
    return {"env_vars": env_vars}
