"""The evaluate and register stages for real: a tiny random teacher and student, a real local Ray,
and a SQLite MLflow store with its Model Registry, for a classification and a generation task."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import mlflow
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from mlflow import MlflowClient
from transformers import AutoModelForCausalLM, AutoTokenizer

from flexkd.config.schema import PipelineConfig, parse_config
from flexkd.data.rows import ROW_SCHEMA, verbalizer_token_ids
from flexkd.errors import StageError
from flexkd.evaluation.metrics import fluency_scores, macro_f1
from flexkd.models.loading import TINY_TOKENIZER_DIR, build_random_model, load_tokenizer, parameter_count
from flexkd.models.plan import load_teacher
from flexkd.stages import evaluate, register
from flexkd.tracking.model_registry import download_registered_student

TEACHER_ARCHITECTURE = {
    "model_type": "llama",
    "hidden_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "intermediate_size": 128,
}
STUDENT_ARCHITECTURE = {**TEACHER_ARCHITECTURE, "hidden_size": 32, "intermediate_size": 64}
LABEL_NAMES = ["negative", "positive"]
# The first prompt is the shortest, so in its batch it is the one padded the most.
REVIEWS = [
    ("dull", 0),
    ("a wonderful, moving film", 1),
    ("I walked out after an hour", 0),
    ("great cast, great script", 1),
    ("not worth the ticket price at all", 0),
    ("loved it", 1),
]
QUESTIONS = [
    ("Sky?", "The sky is blue."),
    ("What do cats drink when they are thirsty?", "Cats drink water."),
    ("Name a fruit.", "An apple is a fruit."),
    ("What is two plus two?", "Two plus two is four."),
    ("Where do fish live?", "Fish live in water."),
    ("What melts in the sun?", "Ice melts in the sun."),
]
EVALUATION = {"batch_size": 4, "max_new_tokens": 5, "samples": 3}


@pytest.fixture(scope="module")
def mlflow_store(tmp_path_factory):
    """A fresh SQLite store and experiment, made the default of every run started here (nested
    runs too: a nested run does not inherit its parent's experiment)."""
    root = tmp_path_factory.mktemp("mlflow")
    with pytest.MonkeyPatch.context() as patch:
        patch.delenv("MLFLOW_TRACKING_URI", raising=False)  # both restored when the module is done
        mlflow.set_tracking_uri(f"sqlite:///{root}/mlflow.db")
        # Artifacts beside the database, not in ./mlruns of whatever directory pytest runs in.
        experiment_id = mlflow.create_experiment("flexkd-tests", artifact_location=(root / "artifacts").as_uri())
        patch.setenv("MLFLOW_EXPERIMENT_ID", experiment_id)
        yield
        mlflow.set_tracking_uri(None)


def test_macro_f1_averages_per_class_f1_over_classes_seen():
    # Class 0: TP 1, FP 1 -> 2/3; class 1: TP 2, FN 1 -> 4/5; class 2: TP 1 -> 1.
    assert macro_f1([0, 0, 1, 1, 2], [0, 1, 1, 1, 2]) == pytest.approx((2 / 3 + 4 / 5 + 1) / 3)
    # A class that is only ever predicted counts, with F1 0 (as scikit-learn's macro average).
    assert macro_f1([0, 2], [0, 0]) == pytest.approx((2 / 3 + 0) / 2)
    assert macro_f1([1, 0, 1], [1, 0, 1]) == 1.0


def test_evaluate_names_the_workers_error(tmp_path, local_ray):
    _write_manifest(tmp_path / "tokenize", {"pad_token_id": 0, "verbalizer_ids": None})
    (tmp_path / "tokenize" / "eval").mkdir()
    with pytest.raises(StageError, match=r"^evaluate: FileNotFoundError: .*eval: no eval parquet shards$"):
        evaluate.run(
            _config("generation"), {"tokenize": tmp_path / "tokenize", "distill": tmp_path / "distill"}, tmp_path
        )


def test_classification_is_evaluated_and_the_student_registered(tmp_path, local_ray, mlflow_store):
    config = _config("classification")
    tokenizer = load_tokenizer(TINY_TOKENIZER_DIR)
    verbalizer_ids = verbalizer_token_ids(tokenizer, LABEL_NAMES)
    rows = [
        _row(
            index,
            tokenizer.encode(f"Review: {text}\nSentiment:", add_special_tokens=False),
            [],
            label,
            LABEL_NAMES[label],
        )
        for index, (text, label) in enumerate(REVIEWS)
    ]
    student = _write_stage_inputs(tmp_path, tokenizer, rows, verbalizer_ids)

    evaluated, runs = _run_stages(config, tmp_path)

    metrics, samples = evaluated["metrics"], _predictions(tmp_path)
    assert evaluated["examples"] == len(REVIEWS) and evaluated["primary_metric"] == "accuracy"
    assert set(metrics) == {
        f"{role}.{name}" for role in ("teacher", "student") for name in ("accuracy", "macro_f1", "parameters")
    }
    for role, model in {"teacher": load_teacher(config), "student": student}.items():
        # One unpadded example at a time: the batched, padded evaluation must agree.
        with torch.no_grad():
            predicted = [
                int(model(torch.tensor([row["input_ids"]])).logits[0, -1, verbalizer_ids].argmax()) for row in rows
            ]
        actual = [row["class_label"] for row in rows]
        assert metrics[f"{role}.accuracy"] == pytest.approx(sum(p == a for p, a in zip(predicted, actual)) / len(rows))
        assert metrics[f"{role}.macro_f1"] == pytest.approx(macro_f1(predicted, actual))
        assert 0 <= metrics[f"{role}.macro_f1"] <= 1
        assert metrics[f"{role}.parameters"] == parameter_count(model)
        assert [sample[role] for sample in samples] == [LABEL_NAMES[label] for label in predicted[: len(samples)]]
        # Every row's prediction is kept, beyond the sampled ones: what a paired test of two students reads.
        every = _every_prediction(tmp_path)
        assert [row["prediction" if role == "student" else "teacher"] for row in every] == [
            LABEL_NAMES[label] for label in predicted
        ]
    assert [(row["example_id"], row["label"]) for row in every] == [
        (row["example_id"], row["reference"]) for row in rows
    ]
    assert len(every) > EVALUATION["samples"]
    assert metrics["teacher.parameters"] > metrics["student.parameters"]
    _check_logged_and_registered(config, tmp_path, runs, evaluated, student)


def test_the_teachers_scores_are_kept_and_reused_for_the_next_student(tmp_path, local_ray, mlflow_store):
    config = _config("classification")
    tokenizer = load_tokenizer(TINY_TOKENIZER_DIR)
    verbalizer_ids = verbalizer_token_ids(tokenizer, LABEL_NAMES)
    rows = [
        _row(
            index,
            tokenizer.encode(f"Review: {text}\nSentiment:", add_special_tokens=False),
            [],
            label,
            LABEL_NAMES[label],
        )
        for index, (text, label) in enumerate(REVIEWS)
    ]
    _write_stage_inputs(tmp_path, tokenizer, rows, verbalizer_ids)
    inputs = {"tokenize": tmp_path / "tokenize", "distill": tmp_path / "distill"}
    with mlflow.start_run(run_name="first"):
        (tmp_path / "evaluate" / "a").mkdir(parents=True)
        first = evaluate.run(config, inputs, tmp_path / "evaluate" / "a")["metrics"]
    [kept] = (tmp_path / "evaluate" / "teacher_scores").glob("*.json")
    # Mark the kept scores: a second student's evaluation must report them, not rerun the teacher.
    marked = json.loads(kept.read_text())
    marked["scores"]["accuracy"] = -1.0
    kept.write_text(json.dumps(marked))
    with mlflow.start_run(run_name="second"):
        (tmp_path / "evaluate" / "b").mkdir()
        second = evaluate.run(config, inputs, tmp_path / "evaluate" / "b")["metrics"]
    assert second["teacher.accuracy"] == -1.0 and first["teacher.accuracy"] >= 0
    assert second["student.accuracy"] == first["student.accuracy"]
    assert second["teacher.parameters"] == first["teacher.parameters"]


def test_generation_is_evaluated_and_the_student_registered(tmp_path, local_ray, mlflow_store):
    config = _config("generation")
    tokenizer = load_tokenizer(TINY_TOKENIZER_DIR)
    rows = [
        _row(
            index,
            tokenizer.encode(f"Question: {question}\nAnswer:", add_special_tokens=False),
            tokenizer.encode(" " + answer, add_special_tokens=False) + [tokenizer.eos_token_id],
            -1,
            answer,
        )
        for index, (question, answer) in enumerate(QUESTIONS)
    ]
    student = _write_stage_inputs(tmp_path, tokenizer, rows, None)

    evaluated, runs = _run_stages(config, tmp_path)

    metrics = evaluated["metrics"]
    assert evaluated["examples"] == len(QUESTIONS) and evaluated["primary_metric"] == "rougeL"
    names = ("rougeL", "perplexity", "parameters", "distinct_2", "repeated_ngram_outputs")
    assert set(metrics) == {f"{role}.{name}" for role in ("teacher", "student") for name in names}
    every = _every_prediction(tmp_path)
    for role in ("teacher", "student"):
        assert 0 <= metrics[f"{role}.rougeL"] <= 100
        assert 1 < metrics[f"{role}.perplexity"] < math.inf
        outputs = [row["prediction" if role == "student" else "teacher"] for row in every]
        assert {name: metrics[f"{role}.{name}"] for name in names[3:]} == fluency_scores(outputs)
    # Perplexity: exp of the mean NLL over every response token, computed here row by row.
    summed_nll, tokens = 0.0, 0
    with torch.no_grad():
        for row in rows:
            logits = student(torch.tensor([row["input_ids"]])).logits[0, :-1]
            targets = torch.tensor(row["labels"][1:])
            summed_nll += torch.nn.functional.cross_entropy(logits, targets, ignore_index=-100, reduction="sum").item()
            tokens += int((targets != -100).sum())
        # Greedy decoding of the most left-padded prompt matches decoding it alone.
        prompt = torch.tensor([rows[0]["input_ids"][: rows[0]["prompt_length"]]])
        alone = student.generate(
            prompt,
            attention_mask=torch.ones_like(prompt),
            do_sample=False,
            max_new_tokens=EVALUATION["max_new_tokens"],
            pad_token_id=tokenizer.pad_token_id,
        )
    assert metrics["student.perplexity"] == pytest.approx(math.exp(summed_nll / tokens), rel=1e-4)
    samples = _predictions(tmp_path)
    assert samples[0]["student"] == tokenizer.decode(alone[0, prompt.shape[1] :], skip_special_tokens=True)
    assert samples[0]["prompt"] == f"Question: {QUESTIONS[0][0]}\nAnswer:"
    assert [sample["reference"] for sample in samples] == [answer for _, answer in QUESTIONS[: len(samples)]]
    _check_logged_and_registered(config, tmp_path, runs, evaluated, student)


def _config(kind: str) -> PipelineConfig:
    task = {"kind": kind, "label_names": LABEL_NAMES} if kind == "classification" else {"kind": kind}
    return parse_config(
        {
            "name": f"tiny-{kind}",
            "teacher": {
                "source": "random",
                "tokenizer": str(TINY_TOKENIZER_DIR),
                "architecture": TEACHER_ARCHITECTURE,
                "version": "7",
            },
            "student": {"architecture": STUDENT_ARCHITECTURE},
            "data": {"train": {"path": "unused.jsonl"}, "eval": {"path": "unused.jsonl"}},
            "task": task,
            "evaluation": EVALUATION,
        }
    )


def _row(
    index: int, prompt_ids: list[int], response_ids: list[int], class_label: int, reference: str
) -> dict[str, Any]:
    """One tokenized eval row in the tokenize stage's format (-100: not a target)."""
    return {
        "example_id": index,
        "input_ids": prompt_ids + response_ids,
        "labels": [-100] * len(prompt_ids) + response_ids,
        "prompt_length": len(prompt_ids),
        "class_label": class_label,
        "reference": reference,
    }


def _write_stage_inputs(root: Path, tokenizer, rows: list[dict[str, Any]], verbalizer_ids: list[int] | None):
    """tokenize/ (eval parquet in two shards + manifest) and distill/student/; returns the student."""
    eval_dir = root / "tokenize" / "eval"
    eval_dir.mkdir(parents=True)
    half = len(rows) // 2
    for shard, part in enumerate((rows[:half], rows[half:])):
        pq.write_table(pa.Table.from_pylist(part, schema=ROW_SCHEMA), eval_dir / f"part-{shard:05d}.parquet")
    _write_manifest(root / "tokenize", {"pad_token_id": tokenizer.pad_token_id, "verbalizer_ids": verbalizer_ids})
    student = build_random_model(
        STUDENT_ARCHITECTURE, vocab_size=len(tokenizer), seed=1, pad_token_id=tokenizer.pad_token_id
    )
    student.save_pretrained(root / "distill" / "student")
    tokenizer.save_pretrained(root / "distill" / "student")
    return student


def _write_manifest(directory: Path, outputs: dict[str, Any], run_id: str | None = None) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "manifest.json").write_text(json.dumps({"done": True, "outputs": outputs, "mlflow_run_id": run_id}))


def _run_stages(config: PipelineConfig, root: Path) -> tuple[dict[str, Any], dict[str, str]]:
    """score (an empty run, for lineage), evaluate and register as nested runs, as the runner does."""
    with mlflow.start_run(run_name=config.name):
        with mlflow.start_run(run_name="score", nested=True) as score_run:
            _write_manifest(root / "score", {}, score_run.info.run_id)
        with mlflow.start_run(run_name="evaluate", nested=True) as evaluate_run:
            (root / "evaluate").mkdir()
            evaluated = evaluate.run(
                config, {"tokenize": root / "tokenize", "distill": root / "distill"}, root / "evaluate"
            )
            _write_manifest(root / "evaluate", evaluated, evaluate_run.info.run_id)
        with mlflow.start_run(run_name="register", nested=True):
            (root / "register").mkdir()
            register.run(config, {name: root / name for name in ("score", "distill", "evaluate")}, root / "register")
    return evaluated, {"score": score_run.info.run_id, "evaluate": evaluate_run.info.run_id}


def _predictions(root: Path) -> list[dict[str, Any]]:
    lines = (root / "evaluate" / "predictions.jsonl").read_text().splitlines()
    assert len(lines) == EVALUATION["samples"]
    return [json.loads(line) for line in lines]


def _every_prediction(root: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (root / "evaluate" / "eval_predictions.jsonl").read_text().splitlines()]


def _check_logged_and_registered(
    config: PipelineConfig, root: Path, runs: dict[str, str], evaluated: dict[str, Any], student: torch.nn.Module
) -> None:
    client = MlflowClient()
    logged = client.get_run(runs["evaluate"]).data.metrics
    assert logged == pytest.approx(evaluated["metrics"])
    assert "predictions.json" in [artifact.path for artifact in client.list_artifacts(runs["evaluate"])]

    registered = json.loads((root / "register" / "registered.json").read_text())
    name = f"{config.name}-student"
    assert registered["model_name"] == name and registered["model_uri"] == f"models:/{name}/{registered['version']}"
    tags = client.get_model_version(name, str(registered["version"])).tags
    assert tags["flexkd.teacher.name"].startswith("random-") and tags["flexkd.teacher.version"] == "7"
    assert tags["flexkd.importance_run"] == runs["score"]
    assert tags["flexkd.pipeline"] == config.name and tags["flexkd.pipeline_fingerprint"] == config.fingerprint()
    for metric, value in evaluated["metrics"].items():
        assert float(tags[f"metric.{metric}"]) == pytest.approx(value)

    folder = download_registered_student(registered["model_uri"], root / "download")
    assert folder.as_posix().endswith("/" + registered["hf_subdir"])
    downloaded = AutoModelForCausalLM.from_pretrained(folder)
    for (key, expected), actual in zip(student.state_dict().items(), downloaded.state_dict().values(), strict=True):
        assert torch.equal(expected, actual), key
    tokenizer = AutoTokenizer.from_pretrained(folder)
    prompt = tokenizer("Question: Sky?\nAnswer:", return_tensors="pt")
    generated = downloaded.generate(
        **prompt, max_new_tokens=3, min_new_tokens=3, do_sample=False, pad_token_id=tokenizer.pad_token_id
    )
    assert generated.shape == (1, prompt["input_ids"].shape[1] + 3)
    # The same version also serves as a pyfunc: prompts in, completions out.
    completions = mlflow.pyfunc.load_model(registered["model_uri"]).predict(["Question: Sky?\nAnswer:", "Hi"])
    assert len(completions) == 2 and all(isinstance(text, str) for text in completions)


def test_evaluate_stays_on_the_cpu_without_use_gpu_where_cuda_exists(tmp_path, monkeypatch):
    """A CPU pipeline on a GPU machine: the task must not move the models to a GPU it never asked
    Ray for (and which another job may hold). Run in process; this CPU torch has no CUDA, so
    any move to "cuda" would fail."""
    config = _config("classification")
    tokenizer = load_tokenizer(TINY_TOKENIZER_DIR)
    verbalizer_ids = verbalizer_token_ids(tokenizer, LABEL_NAMES)
    rows = [
        _row(index, tokenizer.encode(f"Review: {text}\nSentiment:", add_special_tokens=False), [], label, "")
        for index, (text, label) in enumerate(REVIEWS)
    ]
    _write_stage_inputs(tmp_path, tokenizer, rows, verbalizer_ids)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    result = evaluate.evaluate_models(
        config,
        str(tmp_path / "tokenize" / "eval"),
        str(tmp_path / "distill" / "student"),
        tokenizer.pad_token_id,
        verbalizer_ids,
    )
    assert 0 <= result["metrics"]["student.accuracy"] <= 1 and result["examples"] == len(REVIEWS)
