"""evaluate: the teacher and the distilled student on the same held-out examples.

One Ray task (on a cluster it lands on a worker, so the driver stays light) reads the eval
parquet written by tokenize, then loads each model in turn and scores it:

    classification  accuracy and macro-F1 of the verbalizer scores at the last prompt token
    generation      ROUGE-L F1 (x100) of greedy continuations of the prompt against the
                    reference, and perplexity of the reference responses under teacher forcing
    both            parameter count

The driver logs the metrics to MLflow as ``teacher.<metric>`` / ``student.<metric>``, logs the
first ``evaluation.samples`` predictions as the table ``predictions.json``, and writes:

    predictions.jsonl   per sampled example: prompt, reference, teacher and student output

The teacher's scores and outputs are kept in ``<artifact_root>/<pipeline>/evaluate/teacher_scores/``, keyed
by teacher, task, evaluation settings and eval rows, so the students of a comparison (every
method and seed) pay for one teacher pass, not one each.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import ray
import torch
import torch.nn.functional as F
from ray.experimental.tqdm_ray import tqdm
from rouge_score.rouge_scorer import RougeScorer

from flexkd import distributed
from flexkd.config import PipelineConfig, stable_hash
from flexkd.data import collate_batch
from flexkd.errors import StageError
from flexkd.models import load_model, parameter_count
from flexkd.objective import class_logits, scored_positions
from flexkd.ray_jobs import progress_bars_wanted
from flexkd.resolve import load_pipeline_tokenizer, load_teacher

# The teacher's kept scores, beside the evaluate stage's fingerprint folders.
TEACHER_SCORES_DIR = "teacher_scores"
# The row columns that collate_batch turns into tensors; `reference` stays text.
TOKEN_COLUMNS = ("example_id", "input_ids", "labels", "prompt_length", "class_label")


def run(config: PipelineConfig, inputs: dict[str, Path], output_dir: Path) -> dict[str, Any]:
    import mlflow  # here, not at the top: the Ray worker imports this module and needs no MLflow

    tokenized = json.loads((inputs["tokenize"] / "manifest.json").read_text())["outputs"]
    resources = config.resources
    evaluate_task = ray.remote(num_cpus=resources.cpus_per_worker,
                               num_gpus=1 if resources.use_gpu else 0)(evaluate_models)
    eval_dir, student_dir = inputs["tokenize"] / "eval", inputs["distill"] / "student"
    try:
        result = ray.get(evaluate_task.remote(config, str(eval_dir), str(student_dir), tokenized["pad_token_id"],
                                              tokenized["verbalizer_ids"], str(output_dir.parent / TEACHER_SCORES_DIR),
                                              progress_bars_wanted()))
    except ray.exceptions.RayTaskError as error:
        # Name the task's own error: the first line of Ray's wrapper only names the task's pid.
        raise StageError(f"evaluate: {type(error.cause).__name__}: {error.cause}".splitlines()[0]) from error

    metrics, predictions = result["metrics"], result["predictions"]
    with (output_dir / "predictions.jsonl").open("w") as file:
        file.writelines(json.dumps(row) + "\n" for row in predictions)
    mlflow.log_metrics(metrics)
    if predictions:
        mlflow.log_table({column: [row[column] for row in predictions] for column in predictions[0]},
                         artifact_file="predictions.json")
    primary = "accuracy" if config.task.kind == "classification" else "rougeL"
    return {"metrics": metrics, "examples": result["examples"], "primary_metric": primary}


def evaluate_models(config: PipelineConfig, eval_dir: str, student_dir: str, pad_token_id: int,
                    verbalizer_ids: list[int] | None, teacher_scores_dir: str | None = None,
                    progress_bars: bool = False) -> dict[str, Any]:
    """The body of the Ray task: metrics of both models and their first sampled predictions.
    ``teacher_scores_dir``: where the teacher's scores are kept and looked up (None: not kept)."""
    distributed.use_threads(config.resources.threads_per_worker)
    table = read_eval_rows(Path(eval_dir))
    tokenizer = load_pipeline_tokenizer(config)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
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
            progress_label = f"evaluate {role}" if progress_bars else None
            if config.task.kind == "classification":
                scores, outputs[role] = classify(model, table, config, pad_token_id, verbalizer_ids, device,
                                                 progress_label)
            else:
                scores, outputs[role] = generate_and_score(model, table, config, tokenizer, pad_token_id, device,
                                                           progress_label)
            scores["parameters"] = parameter_count(model)
            del model
            if role == "teacher" and teacher_file is not None:
                teacher_file.parent.mkdir(parents=True, exist_ok=True)
                temporary = teacher_file.with_suffix(f".{os.getpid()}.tmp")
                temporary.write_text(json.dumps({"scores": scores, "outputs": outputs[role]}))
                os.replace(temporary, teacher_file)
        metrics |= {f"{role}.{name}": value for name, value in scores.items()}

    samples = table.slice(0, config.evaluation.samples).to_pylist()
    predictions = [{"example_id": row["example_id"],
                    "prompt": tokenizer.decode(row["input_ids"][:row["prompt_length"]]),
                    "reference": row["reference"],
                    "teacher": outputs["teacher"][index], "student": outputs["student"][index]}
                   for index, row in enumerate(samples)]
    return {"metrics": metrics, "predictions": predictions, "examples": table.num_rows}


def teacher_results_file(config: PipelineConfig, eval_dir: str, directory: Path) -> Path:
    """Where in ``directory`` the teacher's eval scores are kept, keyed by everything they depend
    on: the teacher, the task, the evaluation settings and the eval rows (whose folder is named
    by the tokenize fingerprint)."""
    key = stable_hash({"teacher": config.teacher.model_dump(mode="json"), "task": config.task.model_dump(mode="json"),
                       "evaluation": config.evaluation.model_dump(mode="json"), "eval_dir": str(eval_dir)})
    return directory / f"{key}.json"


def read_eval_rows(eval_dir: Path) -> pa.Table:
    """All eval rows, shard by shard in file-name order (the eval split is small)."""
    shards = sorted(eval_dir.glob("*.parquet"))
    if not shards:
        raise FileNotFoundError(f"{eval_dir}: no eval parquet shards")
    table = pa.concat_tables([pq.read_table(shard) for shard in shards])
    if table.num_rows == 0:
        raise ValueError(f"{eval_dir}: the eval split has no rows")
    return table


@torch.no_grad()
def classify(model, table: pa.Table, config: PipelineConfig, pad_token_id: int, verbalizer_ids: list[int],
             device: torch.device, progress_label: str | None = None) -> tuple[dict[str, float], list[str]]:
    """Accuracy and macro-F1 of the argmax verbalizer score, and the predicted label names.
    ``progress_label``: the progress bar's label; None draws no bar."""
    verbalizers = torch.tensor(verbalizer_ids, device=device)
    predicted: list[int] = []
    for chunk in _batches(table, config.evaluation.batch_size, progress_label):
        batch = _collate(chunk, pad_token_id, device)
        # Only the last prompt token's logits are read: projecting every position onto the
        # vocabulary would be most of the forward's cost.
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                       logits_to_keep=scored_positions("classification", batch)).logits
        predicted += class_logits(logits, batch["attention_mask"], verbalizers).argmax(dim=-1).tolist()
    actual = table.column("class_label").to_pylist()
    scores = {"accuracy": float(np.mean(np.equal(predicted, actual))), "macro_f1": macro_f1(predicted, actual)}
    return scores, [config.task.label_names[label] for label in predicted]


@torch.no_grad()
def generate_and_score(model, table: pa.Table, config: PipelineConfig, tokenizer, pad_token_id: int,
                       device: torch.device, progress_label: str | None = None) -> tuple[dict[str, float], list[str]]:
    """ROUGE-L of greedy continuations and response perplexity, and the continuations."""
    continuations: list[str] = []
    summed_nll, response_tokens = 0.0, 0
    for chunk in _batches(table, config.evaluation.batch_size, progress_label):
        generated = greedy_continuations(model, chunk, pad_token_id, config.evaluation.max_new_tokens, device)
        continuations += tokenizer.batch_decode(generated, skip_special_tokens=True)
        batch = _collate(chunk, pad_token_id, device)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        # Position t predicts token t + 1; labels are -100 on the prompt and on padding.
        targets = batch["labels"][:, 1:]
        summed_nll += F.cross_entropy(logits[:, :-1].float().transpose(1, 2), targets,
                                      ignore_index=-100, reduction="sum").item()
        response_tokens += int((targets != -100).sum())

    scorer = RougeScorer(["rougeL"], use_stemmer=True)
    references = table.column("reference").to_pylist()
    rouge = [scorer.score(reference, text)["rougeL"].fmeasure for reference, text in zip(references, continuations)]
    # Corpus perplexity: the mean NLL over all response tokens, not a mean of per-example values.
    perplexity = math.exp(summed_nll / response_tokens) if response_tokens else float("nan")
    return {"rougeL": 100.0 * float(np.mean(rouge)), "perplexity": perplexity}, continuations


def greedy_continuations(model, chunk: pa.Table, pad_token_id: int, max_new_tokens: int,
                         device: torch.device) -> torch.Tensor:
    """Greedy new tokens after each row's prompt, [B, <= max_new_tokens] (pad after an early stop)."""
    prompts = [ids[:length] for ids, length in zip(chunk.column("input_ids").to_pylist(),
                                                   chunk.column("prompt_length").to_pylist())]
    width = max(len(prompt) for prompt in prompts)
    # generate appends after the last column, so every prompt must end there: pad on the left.
    input_ids = torch.full((len(prompts), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    for row, prompt in enumerate(prompts):
        input_ids[row, width - len(prompt):] = torch.tensor(prompt, dtype=torch.long)
        attention_mask[row, width - len(prompt):] = 1
    generated = model.generate(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device),
                               max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad_token_id)
    return generated[:, width:]


def macro_f1(predicted: Sequence[int], actual: Sequence[int]) -> float:
    """Unweighted mean over classes of F1 = 2TP / (2TP + FP + FN), over the classes that occur in
    either sequence (as scikit-learn's ``f1_score(average="macro")``)."""
    predicted, actual = np.asarray(predicted), np.asarray(actual)
    scores = []
    for label in np.union1d(predicted, actual):
        true_positives = np.sum((predicted == label) & (actual == label))
        errors = np.sum((predicted == label) != (actual == label))  # false positives + false negatives
        scores.append(2 * true_positives / (2 * true_positives + errors))
    return float(np.mean(scores))


def _batches(table: pa.Table, batch_size: int, progress_label: str | None):
    # Ray's tqdm: a plain tqdm bar in a Ray task reaches the driver as garbled log lines.
    starts = range(0, table.num_rows, batch_size)
    for start in (starts if progress_label is None else tqdm(starts, total=len(starts), desc=progress_label)):
        yield table.slice(start, batch_size)


def _collate(chunk: pa.Table, pad_token_id: int, device: torch.device) -> dict[str, torch.Tensor]:
    batch = collate_batch(chunk.select(TOKEN_COLUMNS).to_pydict(), pad_token_id)
    return {name: batch[name].to(device) for name in ("input_ids", "attention_mask", "labels")}
