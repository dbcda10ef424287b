"""The pipeline runner: chains the stages, skips what is already done, tracks it all in MLflow.

Each stage writes into its own directory ``<artifact_root>/<pipeline>/<stage>/<fingerprint>/``.
The fingerprint hashes the config sections the stage reads and the fingerprints of its inputs,
so a changed loss weight reruns distill onwards but reuses tokenize and score. A stage is done
when its ``manifest.json`` says so; the manifest is written last, atomically, so a crash never
leaves a stage that looks done.
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mlflow

from flexkd import __version__
from flexkd.config import PipelineConfig, stable_hash
from flexkd.errors import StageError
from flexkd.resolve import preflight
from flexkd.storage import check_artifact_root
from flexkd.tracking import log_config, tracking_uri, ui_command, use_experiment

log = logging.getLogger("flexkd")

STAGES = ("tokenize", "score", "distill", "evaluate", "register")

# What each stage reads: upstream stages, and the config sections that change its output.
STAGE_INPUTS: dict[str, tuple[str, ...]] = {
    "tokenize": (),
    "score": ("tokenize",),
    "distill": ("tokenize", "score"),
    "evaluate": ("tokenize", "distill"),
    "register": ("score", "distill", "evaluate"),
}
STAGE_CONFIG: dict[str, tuple[str, ...]] = {
    "tokenize": ("teacher", "data", "task"),
    "score": ("teacher", "student", "scoring", "selection", "layer_map"),
    "distill": ("student", "loss", "training"),
    "evaluate": ("evaluation",),
    "register": ("name", "tracking"),
}


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


def stage_fingerprint(config: PipelineConfig, stage: str, input_fingerprints: dict[str, str]) -> str:
    sections = config.model_dump(mode="json", include=set(STAGE_CONFIG[stage]))
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


def ensure_ray() -> None:
    """Join the cluster named by RAY_ADDRESS (as a Ray job does), else start Ray on this machine.

    A local Ray binds to 127.0.0.1, its dashboard too: nothing is exposed to the network.
    """
    import ray

    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):
        ray.init(address=os.environ["RAY_ADDRESS"], log_to_driver=True)
    else:
        ray.init(_node_ip_address="127.0.0.1", dashboard_host="127.0.0.1", log_to_driver=True)


def run_pipeline(config: PipelineConfig, stages: tuple[str, ...] = STAGES, force: tuple[str, ...] = ()) -> PipelineResult:
    """Run ``stages`` in order; stages already done (same fingerprint) are skipped unless forced."""
    preflight(config)  # refuse a bad k, layer map, model path or tokenizer before any work starts
    ensure_ray()
    check_artifact_root(config.artifact_root)  # on a multi-node cluster, refuse node-local storage
    uri = tracking_uri(config)
    experiment_id = use_experiment(config)
    pipeline_dir = Path(config.artifact_root) / config.name
    with mlflow.start_run(experiment_id=experiment_id, run_name=config.name) as parent:
        mlflow.set_tags({"flexkd.pipeline": config.name, "flexkd.fingerprint": config.fingerprint(),
                         "flexkd.version": __version__})
        log_config(config)
        result = PipelineResult(config, parent.info.run_id, uri)
        for stage in STAGES:
            if stage not in stages:
                continue
            missing = [name for name in STAGE_INPUTS[stage] if name not in result.stages]
            for name in missing:  # a partial run still needs its inputs' directories
                result.stages[name] = _locate_done(config, name, result, pipeline_dir)
            result.stages[stage] = _run_stage(config, stage, result, pipeline_dir, force=stage in force)
        mlflow.log_metrics({f"seconds.{name}": record.seconds for name, record in result.stages.items()})
    return result


def _inputs(stage: str, result: PipelineResult) -> tuple[dict[str, Path], dict[str, str]]:
    records = [result.stages[name] for name in STAGE_INPUTS[stage]]
    return {r.name: r.directory for r in records}, {r.name: r.fingerprint for r in records}


def _locate_done(config: PipelineConfig, stage: str, result: PipelineResult, pipeline_dir: Path) -> StageRecord:
    for name in STAGE_INPUTS[stage]:
        if name not in result.stages:
            result.stages[name] = _locate_done(config, name, result, pipeline_dir)
    _, fingerprints = _inputs(stage, result)
    fingerprint = stage_fingerprint(config, stage, fingerprints)
    directory = pipeline_dir / stage / fingerprint
    manifest = read_manifest(directory)
    if manifest is None:
        raise StageError(f"{stage}: needed as an input but not done yet for this config; run it first")
    return StageRecord(stage, directory, fingerprint, manifest["outputs"], 0.0, True, manifest.get("mlflow_run_id"))


def _run_stage(config: PipelineConfig, stage: str, result: PipelineResult, pipeline_dir: Path, force: bool) -> StageRecord:
    inputs, fingerprints = _inputs(stage, result)
    fingerprint = stage_fingerprint(config, stage, fingerprints)
    directory = pipeline_dir / stage / fingerprint
    manifest = None if force else read_manifest(directory)
    if manifest is not None:
        log.info("%s: done already (%s), skipped", stage, directory)
        mlflow.set_tag(f"flexkd.{stage}", f"cached from run {manifest.get('mlflow_run_id')}")
        return StageRecord(stage, directory, fingerprint, manifest["outputs"], 0.0, True, manifest.get("mlflow_run_id"))

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
    write_manifest(directory, {
        "stage": stage, "done": True, "fingerprint": fingerprint, "flexkd": __version__,
        "inputs": {name: {"path": str(path), "fingerprint": fingerprints[name]} for name, path in inputs.items()},
        "outputs": outputs, "files": sorted(str(p.relative_to(directory)) for p in directory.rglob("*") if p.is_file()),
        "config": config.model_dump(mode="json"), "mlflow_run_id": run.info.run_id,
        "pipeline_run_id": result.run_id, "seconds": seconds, "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    })
    return StageRecord(stage, directory, fingerprint, outputs, seconds, False, run.info.run_id)


def summary_table(result: PipelineResult) -> str:
    """What a user wants to see when the pipeline ends."""
    lines = [f"pipeline {result.config.name}  (MLflow run {result.run_id})", "",
             "| stage | status | seconds | directory |", "|---|---|---|---|"]
    for record in result.stages.values():
        status = "cached" if record.cached else "ran"
        lines.append(f"| {record.name} | {status} | {record.seconds:.1f} | {record.directory} |")
    evaluation = result.stages.get("evaluate")
    if evaluation is not None:
        metrics = evaluation.outputs.get("metrics", {})
        lines += ["", "| metric | teacher | student |", "|---|---|---|"]
        for name in sorted({key.split(".", 1)[1] for key in metrics if "." in key}):
            lines.append(f"| {name} | {metrics.get('teacher.' + name, float('nan')):.4g} | {metrics.get('student.' + name, float('nan')):.4g} |")
    registered = result.stages.get("register")
    if registered is not None:
        lines += ["", f"registered: {registered.outputs.get('model_uri')}"]
    lines += ["", f"open the runs: {ui_command(result.tracking_uri)}"]
    return "\n".join(lines)
