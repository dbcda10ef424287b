"""The pipeline runner: chains the stages, skips what is already done, tracks it all in MLflow.

Each stage writes into its own directory ``<artifact_root>/<pipeline>/<stage>/<fingerprint>/``.
The fingerprint hashes the config sections the stage reads, the content of the files it reads
and the fingerprints of its inputs, so a changed loss weight reruns distill onwards but reuses
tokenize and score, and a data file fixed in place reruns everything. A stage is done when its
``manifest.json`` says so; the manifest is written last, atomically, so a crash never leaves a
stage that looks done. What each stage reads is data: the list in flexkd/pipeline/stages.py.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mlflow

from flexkd import __version__
from flexkd.cluster.local import check_local_capacity, ensure_ray
from flexkd.cluster.storage import check_artifact_root
from flexkd.config.schema import PipelineConfig, as_hashed, stable_hash
from flexkd.errors import StageError
from flexkd.pipeline.content import content_fingerprints
from flexkd.pipeline.preflight import preflight
from flexkd.pipeline.stages import SPECS, STAGE_NAMES, STAGES
from flexkd.tracking.runs import log_config, public_config, tracking_uri, ui_command, use_experiment

log = logging.getLogger("flexkd")
# The workers a stage starts, each of resources.cpus_per_worker CPUs and, with use_gpu, a GPU;
# None: resources.num_workers. tokenize and register start none of that size.
WORKERS_OF_STAGE: dict[str, int | None] = dict.fromkeys(("generate", "adapt", "score", "targets", "distill")) | {
    "evaluate": 1
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


def pipeline_stages(config: PipelineConfig) -> tuple[str, ...]:
    """The stages this config runs, in order (targets only when distill reads the teacher cache)."""
    return tuple(spec.name for spec in STAGES if spec.enabled(config))


def stage_inputs(config: PipelineConfig, stage: str) -> tuple[str, ...]:
    """The upstream stages ``stage`` reads for this config; none for an output given elsewhere."""
    spec = SPECS[stage]
    if spec.given(config):
        return ()
    return tuple(name for name in spec.inputs if SPECS[name].enabled(config))


def stage_fingerprint(config: PipelineConfig, stage: str, input_fingerprints: dict[str, str]) -> str:
    """The stage's config sections, the content of the files it reads, its inputs' fingerprints
    and its code revision."""
    spec = SPECS[stage]
    sections = fingerprinted_config(config, stage)
    files = content_fingerprints({name: _config_value(config, name) for name in spec.files}, config.artifact_root)
    hashed = {"stage": stage, "flexkd": __version__, "config": sections, "files": files, "inputs": input_fingerprints}
    # Revision 0 adds nothing, so outputs written before revisions existed keep their fingerprints.
    return stable_hash(hashed | ({"revision": spec.revision} if spec.revision else {}))


def fingerprinted_config(config: PipelineConfig, stage: str) -> dict[str, Any]:
    """The config sections ``stage``'s fingerprint covers: its ``config_sections`` less its ignored
    fields, as the hashes see it (``as_hashed``: settings switched off left out, retired ones put back)."""
    spec = SPECS[stage]
    exclude = {section: set(fields) for section, fields in spec.ignored_fields.items()}
    sections = config.model_dump(mode="json", include=set(spec.config_sections), exclude=exclude or None)
    return as_hashed(sections, config)


def stage_config(config: PipelineConfig, stage: str, inputs: dict[str, Path]) -> PipelineConfig:
    """The config ``stage`` runs with: the written one, changed by the inputs that rewrite it (with
    ``teacher.adapt``, the teacher is the adapt stage's folder). Fingerprints use the written one."""
    for name in stage_inputs(config, stage):
        rewrite = SPECS[name].rewrites_config
        if rewrite is not None:
            config = rewrite(config, inputs[name])
    return config


def planned_fingerprint(config: PipelineConfig, stage: str) -> str:
    """The fingerprint ``stage`` has under this config, computed without running anything."""
    spec = SPECS[stage]
    if spec.given(config):
        return _given_fingerprint(Path(spec.given(config)))
    inputs = {name: planned_fingerprint(config, name) for name in stage_inputs(config, stage)}
    return stage_fingerprint(config, stage, inputs)


def _config_value(config: PipelineConfig, dotted: str) -> Any:
    value: Any = config
    for part in dotted.split("."):
        value = getattr(value, part, None)
    return value


def read_manifest(directory: Path) -> dict[str, Any] | None:
    """The stage's manifest if it says done; None if it is missing, unfinished or unreadable
    (a manifest cut short by a crash or a full disk means the stage reruns, with a warning)."""
    path = directory / "manifest.json"
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        log.warning("%s does not parse (%s); the stage runs again", path, error)
        return None
    return manifest if isinstance(manifest, dict) and manifest.get("done") else None


def write_manifest(directory: Path, manifest: dict[str, Any]) -> None:
    """Write, fsync, rename, fsync the folder: a crash leaves the old manifest or the new one."""
    temporary = directory / "manifest.json.tmp"
    with temporary.open("w") as handle:
        handle.write(json.dumps(manifest, indent=2, default=str))
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, directory / "manifest.json")
    folder = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(folder)
    finally:
        os.close(folder)


def run_pipeline(
    config: PipelineConfig, stages: tuple[str, ...] = STAGE_NAMES, force: tuple[str, ...] = ()
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
    if SPECS[stage].given(config):
        return _given(config, stage)
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


def _given(config: PipelineConfig, stage: str) -> StageRecord:
    """A stage output built elsewhere (e.g. targets.path); its stage checks it fits when it reads it."""
    directory = Path(SPECS[stage].given(config))
    manifest = read_manifest(directory) or {}
    return StageRecord(
        stage,
        directory,
        _given_fingerprint(directory),
        manifest.get("outputs", {}),
        0.0,
        True,
        manifest.get("mlflow_run_id"),
    )


def _given_fingerprint(directory: Path) -> str:
    manifest = read_manifest(directory) or {}
    return manifest.get("fingerprint") or stable_hash(
        content_fingerprints({"given": str(directory)}, str(directory.parent))
    )


def _run_stage(
    config: PipelineConfig, stage: str, result: PipelineResult, pipeline_dir: Path, force: bool
) -> StageRecord:
    if SPECS[stage].given(config):
        return _given(config, stage)
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
    if stage in WORKERS_OF_STAGE:  # checked only for a stage that will run: a cached one needs no workers
        resources = config.resources
        workers = WORKERS_OF_STAGE[stage] or resources.num_workers
        check_local_capacity(workers, resources.cpus_per_worker, resources.use_gpu)
    directory.mkdir(parents=True, exist_ok=True)
    log.info("%s: running -> %s", stage, directory)
    started = time.time()
    with mlflow.start_run(run_name=stage, nested=True) as run:
        mlflow.set_tags({"flexkd.stage": stage, "flexkd.fingerprint": fingerprint, "flexkd.directory": str(directory)})
        try:
            outputs = SPECS[stage].run(stage_config(config, stage, inputs), inputs, directory)
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
    energy = (result.stages["score"].outputs.get("directions") if "score" in result.stages else None) or {}
    if energy:  # how much of the task gradient's energy tr(G) the distilled subspace keeps
        lines += ["", "| teacher layer | k | energy kept by k units | by k directions |", "|---|---|---|---|"]
        for layer, row in sorted(energy.items(), key=lambda item: int(item[0])):
            lines.append(f"| {layer} | {row['k']} | {row['energy_units']:.2f} | {row['energy_directions']:.2f} |")
    adapted = result.stages.get("adapt")
    if adapted is not None:
        before, after = adapted.outputs.get("heldout_before", {}), adapted.outputs.get("heldout_after", {})
        change = ", ".join(f"{name} {before[name]:.4g} -> {after[name]:.4g}" for name in before if name in after)
        lines += ["", f"adapted teacher ({adapted.outputs.get('teacher_name')}), held out: {change}"]
    competence = result.stages["score"].outputs.get("teacher") if "score" in result.stages else None
    if competence:  # how well the scored teacher knows the task, on its scoring rows
        measured = ", ".join(f"{name} {value:.4g}" for name, value in competence.items() if name != "warning")
        lines += ["", f"teacher on its scoring rows: {measured}"]
        if "warning" in competence:
            lines.append(f"WARNING: {competence['warning']}")
    evaluation = result.stages.get("evaluate")
    if evaluation is not None:
        metrics = evaluation.outputs.get("metrics", {})
        lines += ["", "| metric | teacher | student |", "|---|---|---|"]
        for name in sorted({key.split(".", 1)[1] for key in metrics if "." in key}):
            lines.append(
                f"| {name} | {metrics.get('teacher.' + name, float('nan')):.4g} | {metrics.get('student.' + name, float('nan')):.4g} |"
            )
        primary = evaluation.outputs.get("primary_metric")  # higher is better: accuracy, rougeL
        teacher, student = metrics.get(f"teacher.{primary}"), metrics.get(f"student.{primary}")
        if teacher is not None and student is not None and student > teacher:
            lines += ["", f"the student beats the teacher on {primary}: {student:.4g} vs {teacher:.4g}"]
    registered = result.stages.get("register")
    if registered is not None:
        lines += ["", f"registered: {registered.outputs.get('model_uri')}"]
    lines += ["", f"open the runs: {ui_command(result.tracking_uri)}"]
    return "\n".join(lines)
