"""The pipeline runner: chains the stages, skips what is already done, tracks it all in MLflow.

Each stage writes into its own directory ``<artifact_root>/<pipeline>/<stage>/<fingerprint>/``.
The fingerprint hashes the config sections the stage reads and the fingerprints of its inputs,
so a changed loss weight reruns distill onwards but reuses tokenize and score. A stage is done
when its ``manifest.json`` says so; the manifest is written last, atomically, so a crash never
leaves a stage that looks done.

The ``targets`` stage (the teacher's outputs, kept so distill never loads the teacher) belongs to
a pipeline only with ``training.teacher: cache``; distill then reads it instead of the teacher.
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import shutil
import socket
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import mlflow

from flexkd import __version__
from flexkd.cluster.storage import check_artifact_root
from flexkd.config.schema import PipelineConfig, stable_hash
from flexkd.errors import StageError
from flexkd.models.plan import preflight
from flexkd.testing import faults
from flexkd.tracking.runs import log_config, public_config, tracking_uri, ui_command, use_experiment

log = logging.getLogger("flexkd")

STAGES = ("tokenize", "score", "targets", "distill", "evaluate", "register")

# What each stage reads: upstream stages, and the config sections that change its output.
STAGE_INPUTS: dict[str, tuple[str, ...]] = {
    "tokenize": (),
    "score": ("tokenize",),
    "targets": ("tokenize", "score"),
    "distill": ("tokenize", "score"),  # and targets, with training.teacher: cache (stage_inputs)
    "evaluate": ("tokenize", "distill"),
    "register": ("score", "distill", "evaluate"),
}
STAGE_CONFIG: dict[str, tuple[str, ...]] = {
    "tokenize": ("teacher", "data", "task"),
    "score": ("teacher", "student", "scoring", "selection", "layer_map"),
    "targets": ("teacher", "targets"),
    "distill": ("student", "loss", "training"),
    "evaluate": ("evaluation",),
    "register": ("name", "tracking"),
}
# Fields inside those sections that a stage's output does not depend on. Scoring reads the
# student's shape (k, layer pairs), never its seed, so the seeds of a comparison share one
# scoring pass and one teacher-target cache.
STAGE_IGNORES: dict[str, dict[str, set[str]]] = {"score": {"student": {"seed"}}}


@dataclass
class StageRecord:
    name: str
    directory: Path
    fingerprint: str
    outputs: dict[str, Any]
    seconds: float
    cached: bool
    run_id: str | None


@dataclass
class PipelineResult:
    config: PipelineConfig
    run_id: str
    tracking_uri: str
    stages: dict[str, StageRecord] = field(default_factory=dict)


def pipeline_stages(config: PipelineConfig) -> tuple[str, ...]:
    """The stages this config runs: targets only when distill reads the teacher from the cache."""
    return tuple(stage for stage in STAGES if stage != "targets" or config.training.teacher == "cache")


def stage_inputs(config: PipelineConfig, stage: str) -> tuple[str, ...]:
    if stage == "targets" and config.targets.path:  # a cache built elsewhere needs nothing here
        return ()
    if stage == "distill" and config.training.teacher == "cache":
        return (*STAGE_INPUTS[stage], "targets")
    return STAGE_INPUTS[stage]


def stage_fingerprint(config: PipelineConfig, stage: str, input_fingerprints: dict[str, str]) -> str:
    sections = config.model_dump(mode="json", include=set(STAGE_CONFIG[stage]), exclude=STAGE_IGNORES.get(stage))
    return stable_hash({"stage": stage, "flexkd": __version__, "config": sections, "inputs": input_fingerprints})


def read_manifest(directory: Path) -> dict[str, Any] | None:
    path = directory / "manifest.json"
    if not path.is_file():
        return None
    manifest = json.loads(path.read_text())
    return manifest if manifest.get("done") else None


def write_manifest(directory: Path, manifest: dict[str, Any]) -> None:
    temporary = directory / "manifest.json.tmp"
    temporary.write_text(json.dumps(manifest, indent=2, default=str))
    os.replace(temporary, directory / "manifest.json")


RAY_CONNECT_TIMEOUT_S = 5.0
# Ray's switch for local-only clusters on macOS and Windows: while it is "0", Ray takes the
# loopback address as this node's IP instead of the address of the default route.
_RAY_LOCAL_ONLY_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


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
    import ray
    import ray.data

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


def start_local_ray(**options: Any) -> None:
    """Start a new Ray on this machine that listens on 127.0.0.1 only (``options`` go to
    ``ray.init``), even if ``ray start`` left another one running here."""
    import ray

    if os.environ.get("RAY_AUTH_MODE", "").lower() == "disabled":
        log.warning("RAY_AUTH_MODE=disabled: the local Ray accepts unauthenticated clients on 127.0.0.1")
    options = {"dashboard_host": "127.0.0.1", **options}
    with _loopback_only(True):
        ray.init(address="local", _node_ip_address="127.0.0.1", **options)
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
    from ray._private import ray_constants

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
    """The job runtime_env that carries FLEXKD_FAULT_* to the workers; None when there are none,
    or when this driver is itself a Ray job (its runtime_env already sets them, and setting the
    same variables twice is a conflict Ray refuses)."""
    env_vars = faults.runtime_env_vars()
    if not env_vars or "RAY_JOB_CONFIG_JSON_ENV_VAR" in os.environ:
        return None
    return {"env_vars": env_vars}


def run_pipeline(
    config: PipelineConfig, stages: tuple[str, ...] = STAGES, force: tuple[str, ...] = ()
) -> PipelineResult:
    """Run ``stages`` in order; stages already done (same fingerprint) are skipped unless forced."""
    preflight(config)  # refuse a bad k, layer map, model path or tokenizer before any work starts
    ensure_ray()
    check_artifact_root(config.artifact_root)  # on a multi-node cluster, refuse node-local storage
    uri = tracking_uri(config)
    experiment_id = use_experiment(config)
    pipeline_dir = Path(config.artifact_root) / config.name
    with mlflow.start_run(experiment_id=experiment_id, run_name=config.name) as parent:
        mlflow.set_tags(
            {
                "flexkd.pipeline": config.name,
                "flexkd.fingerprint": config.fingerprint(),
                "flexkd.version": __version__,
                "flexkd.student.init": config.student.init,
            }
        )
        log_config(config)
        result = PipelineResult(config, parent.info.run_id, uri)
        for stage in pipeline_stages(config):
            if stage not in stages:
                continue
            missing = [name for name in stage_inputs(config, stage) if name not in result.stages]
            for name in missing:  # a partial run still needs its inputs' directories
                result.stages[name] = _locate_done(config, name, result, pipeline_dir)
            result.stages[stage] = _run_stage(config, stage, result, pipeline_dir, force=stage in force)
        mlflow.log_metrics({f"seconds.{name}": record.seconds for name, record in result.stages.items()})
    return result


def _inputs(stage: str, result: PipelineResult) -> tuple[dict[str, Path], dict[str, str]]:
    records = [result.stages[name] for name in stage_inputs(result.config, stage)]
    return {r.name: r.directory for r in records}, {r.name: r.fingerprint for r in records}


def _locate_done(config: PipelineConfig, stage: str, result: PipelineResult, pipeline_dir: Path) -> StageRecord:
    if stage == "targets" and config.targets.path:
        return _given_targets(config)
    for name in stage_inputs(config, stage):
        if name not in result.stages:
            result.stages[name] = _locate_done(config, name, result, pipeline_dir)
    _, fingerprints = _inputs(stage, result)
    fingerprint = stage_fingerprint(config, stage, fingerprints)
    directory = pipeline_dir / stage / fingerprint
    manifest = read_manifest(directory)
    if manifest is None:
        raise StageError(f"{stage}: needed as an input but not done yet for this config; run it first")
    return StageRecord(stage, directory, fingerprint, manifest["outputs"], 0.0, True, manifest.get("mlflow_run_id"))


def _given_targets(config: PipelineConfig) -> StageRecord:
    """A teacher-target cache built elsewhere (targets.path), once it proves it fits this config."""
    from flexkd.models.plan import plan_models
    from flexkd.stages.targets import check_cache

    plan = plan_models(config)
    directory = Path(config.targets.path)
    check_cache(config, directory, plan.k, plan.teacher_layer_indices, where="targets.path")
    manifest = read_manifest(directory) or {}
    fingerprint = manifest.get("fingerprint") or stable_hash(json.loads((directory / "targets.json").read_text()))
    return StageRecord(
        "targets", directory, fingerprint, manifest.get("outputs", {}), 0.0, True, manifest.get("mlflow_run_id")
    )


def _run_stage(
    config: PipelineConfig, stage: str, result: PipelineResult, pipeline_dir: Path, force: bool
) -> StageRecord:
    if stage == "targets" and config.targets.path:
        return _given_targets(config)
    inputs, fingerprints = _inputs(stage, result)
    fingerprint = stage_fingerprint(config, stage, fingerprints)
    directory = pipeline_dir / stage / fingerprint
    manifest = None if force else read_manifest(directory)
    if manifest is not None:
        log.info("%s: done already (%s), skipped", stage, directory)
        mlflow.set_tag(f"flexkd.{stage}", f"cached from run {manifest.get('mlflow_run_id')}")
        return StageRecord(stage, directory, fingerprint, manifest["outputs"], 0.0, True, manifest.get("mlflow_run_id"))

    if force and directory.exists():
        # A forced stage starts over: left in place, a finished run's checkpoints would make
        # distill "resume" at its last step and redo nothing.
        shutil.rmtree(directory)
    directory.mkdir(parents=True, exist_ok=True)
    module = importlib.import_module(f"flexkd.stages.{stage}")
    log.info("%s: running -> %s", stage, directory)
    started = time.time()
    with mlflow.start_run(run_name=stage, nested=True) as run:
        mlflow.set_tags({"flexkd.stage": stage, "flexkd.fingerprint": fingerprint, "flexkd.directory": str(directory)})
        try:
            outputs = module.run(config, inputs, directory)
        except StageError:
            raise
        except Exception as error:  # name the stage; the traceback stays in the MLflow run's log
            raise StageError(f"{stage}: {type(error).__name__}: {error}".splitlines()[0]) from error
        seconds = time.time() - started
        mlflow.log_metric("seconds", seconds)
    write_manifest(
        directory,
        {
            "stage": stage,
            "done": True,
            "fingerprint": fingerprint,
            "flexkd": __version__,
            "inputs": {name: {"path": str(path), "fingerprint": fingerprints[name]} for name, path in inputs.items()},
            "outputs": outputs,
            "files": sorted(str(p.relative_to(directory)) for p in directory.rglob("*") if p.is_file()),
            "config": public_config(config),
            "mlflow_run_id": run.info.run_id,
            "pipeline_run_id": result.run_id,
            "seconds": seconds,
            "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        },
    )
    return StageRecord(stage, directory, fingerprint, outputs, seconds, False, run.info.run_id)


def summary_table(result: PipelineResult) -> str:
    """What a user wants to see when the pipeline ends."""
    lines = [
        f"pipeline {result.config.name}  (MLflow run {result.run_id})",
        "",
        "| stage | status | seconds | directory |",
        "|---|---|---|---|",
    ]
    for record in result.stages.values():
        status = "cached" if record.cached else "ran"
        lines.append(f"| {record.name} | {status} | {record.seconds:.1f} | {record.directory} |")
    evaluation = result.stages.get("evaluate")
    if evaluation is not None:
        metrics = evaluation.outputs.get("metrics", {})
        lines += ["", "| metric | teacher | student |", "|---|---|---|"]
        for name in sorted({key.split(".", 1)[1] for key in metrics if "." in key}):
            lines.append(
                f"| {name} | {metrics.get('teacher.' + name, float('nan')):.4g} | {metrics.get('student.' + name, float('nan')):.4g} |"
            )
    registered = result.stages.get("register")
    if registered is not None:
        lines += ["", f"registered: {registered.outputs.get('model_uri')}"]
    lines += ["", f"open the runs: {ui_command(result.tracking_uri)}"]
    return "\n".join(lines)
