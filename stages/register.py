"""register: the distilled student into the MLflow Model Registry, with its lineage.

The student folder written by distill (safetensors, config, tokenizer) is logged in the stage's
run as the MLflow model ``student`` (a pyfunc carrying the folder untouched; see flexkd.registry)
and registered as a new version of ``tracking.registered_model_name`` (default
``<pipeline>-student``), tagged with where it came from:

    flexkd.teacher.name, flexkd.teacher.version   the teacher it was distilled from
    flexkd.importance_run                         the MLflow run of the score stage
    flexkd.student.init                           how the student started (random, pretrained,
                                                  prune_from_teacher)
    flexkd.pipeline, flexkd.pipeline_fingerprint  the pipeline and its resolved config
    metric.<name>                                 every evaluation metric (teacher.* and student.*)

Writes ``registered.json`` (the returned outputs): model name, version, the ``models:/`` URI and
``hf_subdir``, the folder of the downloaded model that ``from_pretrained`` loads
(flexkd.registry.download_registered_student returns it).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import mlflow

from flexkd.config.schema import PipelineConfig
from flexkd.models.plan import teacher_name
from flexkd.tracking.model_registry import hf_subdir, log_student


def run(config: PipelineConfig, inputs: dict[str, Path], output_dir: Path) -> dict[str, Any]:
    student_dir = (inputs["distill"] / "student").resolve()
    importance_run = _manifest(inputs["score"])["mlflow_run_id"]
    metrics = _manifest(inputs["evaluate"])["outputs"]["metrics"]
    model_name = config.tracking.registered_model_name or f"{config.name}-student"

    logged = log_student(student_dir, max_new_tokens=config.evaluation.max_new_tokens)
    # Tags given at registration, so no version is ever visible without its lineage.
    version = mlflow.register_model(logged.model_uri, model_name, tags=lineage_tags(config, importance_run, metrics))

    registered = {
        "model_name": model_name,
        "version": int(version.version),
        "model_uri": f"models:/{model_name}/{version.version}",
        "hf_subdir": hf_subdir(logged.flavors),
    }
    (output_dir / "registered.json").write_text(json.dumps(registered, indent=2))
    mlflow.set_tag("flexkd.registered_model", registered["model_uri"])
    return registered


def lineage_tags(config: PipelineConfig, importance_run: str, metrics: dict[str, float]) -> dict[str, str]:
    """The model-version tags that say what this student was distilled from and how well it did."""
    tags = {
        "flexkd.teacher.name": teacher_name(config),
        "flexkd.teacher.version": config.teacher.version or "",
        "flexkd.importance_run": importance_run,
        "flexkd.pipeline": config.name,
        "flexkd.pipeline_fingerprint": config.fingerprint(),
        "flexkd.student.init": config.student.init,
    }
    return tags | {f"metric.{name}": str(value) for name, value in metrics.items()}


def _manifest(stage_dir: Path) -> dict[str, Any]:
    return json.loads((stage_dir / "manifest.json").read_text())
