"""evaluate: the teacher and the distilled student on the same held-out examples.

One Ray task (on a cluster it lands on a worker, so the driver stays light) reads the eval
parquet written by tokenize, then loads each model in turn and scores it:

    classification  accuracy and macro-F1 of the verbalizer scores at the last prompt token
    generation      ROUGE-L F1 (x100) of greedy continuations of the prompt against the
                    reference, perplexity of the reference responses under teacher forcing,
                    and the continuations' fluency: distinct-2 and the count of outputs that
                    are one n-gram repeated (flexkd.evaluation.metrics.fluency_scores)
    both            parameter count

The driver logs the metrics to MLflow as ``teacher.<metric>`` / ``student.<metric>``, logs the
first ``evaluation.samples`` predictions as the table ``predictions.json``, and writes:

    predictions.jsonl       per sampled example: prompt, reference, teacher and student output
    eval_predictions.jsonl  per eval row, every one: example_id, label (the reference: label name
                            or response), prediction (the student's) and teacher; what a paired
                            test of two students on the same rows reads (benchmarks/stats.py)

The teacher's scores and outputs are kept in ``<artifact_root>/<pipeline>/evaluate/teacher_scores/``, keyed
by teacher, task, evaluation settings and eval rows, so the students of a comparison (every
method and seed) pay for one teacher pass, not one each.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import mlflow
import ray

from flexkd import distributed
from flexkd.config.schema import PipelineConfig, as_hashed, stable_hash
from flexkd.errors import StageError
from flexkd.evaluation.metrics import classify, fluency_scores, generate_and_score, read_eval_rows
from flexkd.models.loading import load_model, parameter_count
from flexkd.models.plan import load_pipeline_tokenizer, load_teacher
from flexkd.progress import progress_bars_wanted

# The teacher's kept scores, beside the evaluate stage's fingerprint folders.
TEACHER_SCORES_DIR = "teacher_scores"
EVAL_PREDICTIONS = "eval_predictions.jsonl"


def run(config: PipelineConfig, inputs: dict[str, Path], output_dir: Path) -> dict[str, Any]:

    tokenized = json.loads((inputs["tokenize"] / "manifest.json").read_text())["outputs"]
    resources = config.resources
    evaluate_task = ray.remote(num_cpus=resources.cpus_per_worker, num_gpus=1 if resources.use_gpu else 0)(
        evaluate_models
    )
    eval_dir, student_dir = inputs["tokenize"] / "eval", inputs["distill"] / "student"
    try:
        result = ray.get(
            evaluate_task.remote(
                config,
                str(eval_dir),
                str(student_dir),
                tokenized["pad_token_id"],
                tokenized["verbalizer_ids"],
                str(output_dir.parent / TEACHER_SCORES_DIR),
                progress_bars_wanted(),
            )
        )
    except ray.exceptions.RayTaskError as error:
        # Name the task's own error: the first line of Ray's wrapper only names the task's pid.
        raise StageError(f"evaluate: {type(error.cause).__name__}: {error.cause}".splitlines()[0]) from error

    metrics, predictions = result["metrics"], result["predictions"]
    with (output_dir / "predictions.jsonl").open("w") as file:
        file.writelines(json.dumps(row) + "\n" for row in predictions)
    with (output_dir / EVAL_PREDICTIONS).open("w") as file:
        file.writelines(json.dumps(row) + "\n" for row in result["every_prediction"])
    mlflow.log_metrics(metrics)
    if predictions:
        mlflow.log_table(
            {column: [row[column] for row in predictions] for column in predictions[0]},
            artifact_file="predictions.json",
        )
    primary = "accuracy" if config.task.kind == "classification" else "rougeL"
    return {"metrics": metrics, "examples": result["examples"], "primary_metric": primary}


def evaluate_models(
    config: PipelineConfig,
    eval_dir: str,
    student_dir: str,
    pad_token_id: int,
    verbalizer_ids: list[int] | None,
    teacher_scores_dir: str | None = None,
    progress_bars: bool = False,
) -> dict[str, Any]:
    """The body of the Ray task: metrics of both models, their first sampled predictions and every
    row's prediction.
    ``teacher_scores_dir``: where the teacher's scores are kept and looked up (None: not kept)."""
    distributed.use_threads(config.resources.threads_per_worker)
    table = read_eval_rows(Path(eval_dir))
    tokenizer = load_pipeline_tokenizer(config)
    device = distributed.task_device(config.resources.use_gpu)
    loaders = {"teacher": lambda: load_teacher(config), "student": lambda: load_model(student_dir)}
    metrics: dict[str, float] = {}
    outputs: dict[str, list[str]] = {}
    teacher_file = teacher_results_file(config, eval_dir, Path(teacher_scores_dir)) if teacher_scores_dir else None
    for role, load in loaders.items():
        if role == "teacher" and teacher_file is not None and teacher_file.is_file():
            # The teacher's scores depend on the teacher and the eval rows only: every student
            # of a comparison (each method, each seed) is judged against one teacher pass.
            saved = json.loads(teacher_file.read_text())
            scores, outputs[role] = saved["scores"], saved["outputs"]
        else:
            # One model in memory at a time: the teacher may be far larger than the student.
            model = load().to(device)
            progress = {"progress_label": f"evaluate {role}", "progress_bars": progress_bars}
            if config.task.kind == "classification":
                scores, outputs[role] = classify(model, table, config, pad_token_id, verbalizer_ids, device, **progress)
            else:
                scores, outputs[role] = generate_and_score(
                    model, table, config, tokenizer, pad_token_id, device, **progress
                )
            scores["parameters"] = parameter_count(model)
            del model
            if role == "teacher" and teacher_file is not None:
                teacher_file.parent.mkdir(parents=True, exist_ok=True)
                temporary = teacher_file.with_suffix(f".{os.getpid()}.tmp")
                temporary.write_text(json.dumps({"scores": scores, "outputs": outputs[role]}))
                os.replace(temporary, teacher_file)
        if config.task.kind == "generation":  # from the outputs, so kept teacher scores get them too
            scores = scores | fluency_scores(outputs[role])
        metrics |= {f"{role}.{name}": value for name, value in scores.items()}

    samples = table.slice(0, config.evaluation.samples).to_pylist()
    predictions = [
        {
            "example_id": row["example_id"],
            "prompt": tokenizer.decode(row["input_ids"][: row["prompt_length"]]),
            "reference": row["reference"],
            "teacher": outputs["teacher"][index],
            "student": outputs["student"][index],
        }
        for index, row in enumerate(samples)
    ]
    every_prediction = [
        {"example_id": example_id, "label": reference, "prediction": student, "teacher": teacher}
        for example_id, reference, student, teacher in zip(
            table.column("example_id").to_pylist(),
            table.column("reference").to_pylist(),
            outputs["student"],
            outputs["teacher"],
            strict=True,
        )
    ]
    return {
        "metrics": metrics,
        "predictions": predictions,
        "every_prediction": every_prediction,
        "examples": table.num_rows,
    }


def teacher_results_file(config: PipelineConfig, eval_dir: str, directory: Path) -> Path:
    """Where in ``directory`` the teacher's eval scores are kept, keyed by everything they depend
    on: the teacher, the task, the evaluation settings and the eval rows (whose folder is named
    by the tokenize fingerprint)."""
    key = stable_hash(
        {
            "teacher": config.teacher.model_dump(mode="json"),
            "task": as_hashed({"task": config.task.model_dump(mode="json")}, config)["task"],
            "evaluation": config.evaluation.model_dump(mode="json"),
            "eval_dir": str(eval_dir),
        }
    )
    return directory / f"{key}.json"
