"""The pipeline end to end through a real local Ray and a real MLflow store: no mocks."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from mlflow.tracking import MlflowClient
from transformers import AutoModelForCausalLM

from flexkd.config.schema import ConfigError, apply_overrides, load_config, parse_config
from flexkd.data.sources import DataError
from flexkd.pipeline.runner import run_pipeline
from flexkd.tracking.model_registry import download_registered_student

PIPELINES = Path(__file__).resolve().parent.parent / "pipelines"


def debug_config(root: Path, **overrides):
    """The debug pipeline, its artifacts and MLflow store under ``root``."""
    raw = load_config(PIPELINES / "debug.yaml").model_dump(mode="json")
    raw = apply_overrides(
        raw, {"artifact_root": str(root), "tracking.tracking_uri": f"sqlite:///{root}/mlflow.db", **overrides}
    )
    return parse_config(raw)


def test_debug_pipeline_end_to_end(tmp_path, local_ray):
    config = debug_config(tmp_path)
    result = run_pipeline(config)

    assert [record.cached for record in result.stages.values()] == [False] * 5
    for record in result.stages.values():
        assert json.loads((record.directory / "manifest.json").read_text())["done"] is True

    score = result.stages["score"].directory
    selected = json.loads((score / "selected.json").read_text())
    assert set(selected["layers"]) == {"2", "4"}  # uniform map of a 2-block student onto 4 blocks
    for layer, entry in selected["layers"].items():
        importance = np.load(score / "importance" / f"layer_{layer}.npy")
        assert importance.shape == (64,) and importance.dtype == np.float32 and np.isfinite(importance).all()
        assert entry["k"] == 32 and entry["indices"] == np.argsort(-importance, kind="stable")[:32].tolist()
        # The energy diagnostics: k directions keep at least what any k units keep (they maximize it).
        assert 0 < entry["energy_units"] <= entry["energy_directions"] + 1e-6 <= 1 + 1e-6, entry
    assert result.stages["score"].outputs["directions"]["2"]["energy_units"] == selected["layers"]["2"]["energy_units"]

    metrics = result.stages["evaluate"].outputs["metrics"]
    assert 0 <= metrics["student.accuracy"] <= 1 and metrics["teacher.parameters"] > metrics["student.parameters"]

    # MLflow: one parent, one nested run per stage, the config, the plot, a registered student.
    client = MlflowClient(result.tracking_uri)
    parent = client.get_run(result.run_id)
    children = client.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{result.run_id}'")
    assert sorted(run.info.run_name for run in children) == sorted(result.stages)
    assert parent.data.params["loss.gamma"] == "1.0"
    assert "config.yaml" in [item.path for item in client.list_artifacts(result.run_id)]
    score_run = result.stages["score"].run_id
    assert "importance.png" in [item.path for item in client.list_artifacts(score_run)]
    score_metrics = client.get_run(score_run).data.metrics
    assert {f"directions.layer_{layer}.energy_units" for layer in (2, 4)} <= set(score_metrics)
    distill_metrics = client.get_metric_history(result.stages["distill"].run_id, "train.total")
    assert [m.step for m in distill_metrics] == [4, 8, 12]

    registered = result.stages["register"].outputs
    version = client.get_model_version(registered["model_name"], str(registered["version"]))
    assert version.tags["flexkd.importance_run"] == score_run
    assert version.tags["flexkd.pipeline_fingerprint"] == config.fingerprint()
    mlflow.set_tracking_uri(result.tracking_uri)
    folder = download_registered_student(registered["model_uri"], tmp_path / "download")
    student = AutoModelForCausalLM.from_pretrained(folder)
    assert student.config.hidden_size == 32

    # Same config again: every stage is reused. A new loss weight (here with bf16 autocast, which
    # the distill step alone reads) reruns distill onwards only.
    again = run_pipeline(config)
    assert all(record.cached for record in again.stages.values())
    reweighted = run_pipeline(debug_config(tmp_path, **{"loss.gamma": 0.5, "training.precision": "bf16"}))
    assert {name: record.cached for name, record in reweighted.stages.items()} == {
        "tokenize": True,
        "score": True,
        "distill": False,
        "evaluate": False,
        "register": False,
    }
    bf16_losses = client.get_metric_history(reweighted.stages["distill"].run_id, "train.total")
    assert [m.step for m in bf16_losses] == [4, 8, 12] and all(np.isfinite(m.value) for m in bf16_losses)


@pytest.mark.integration  # two score runs: about 1.5 min
def test_two_scoring_workers_give_the_same_importance(tmp_path, local_ray):
    """41 rows: an odd count, so the two workers' shards differ by one row and none is dropped."""
    vectors = {}
    for workers in (1, 2):
        config = debug_config(
            tmp_path / f"workers{workers}",
            **{
                "resources.num_workers": workers,
                "resources.cpus_per_worker": 0.5,
                "data.score": {"path": str(PIPELINES.parent / "flexkd/assets/samples/sst2_train.jsonl"), "limit": 41},
            },
        )
        result = run_pipeline(config, stages=("tokenize", "score"))
        assert result.stages["score"].outputs["examples"] == 41
        vectors[workers] = np.load(result.stages["score"].directory / "importance" / "layer_4.npy")
    np.testing.assert_allclose(vectors[2], vectors[1], rtol=1e-4, atol=1e-7)


def _wait_for(pattern: str, root: Path, process: subprocess.Popen, timeout: float = 900) -> Path:
    deadline = time.time() + timeout
    while time.time() < deadline:
        found = sorted(root.glob(pattern))
        if found:
            return found[0]
        assert process.poll() is None, f"the run ended (rc {process.returncode}) before {pattern} appeared"
        time.sleep(0.2)
    raise AssertionError(f"{pattern} did not appear within {timeout} s")


@pytest.mark.integration  # two pipeline runs: about 2.5 min
def test_a_killed_run_resumes_from_finished_stages_and_the_last_checkpoint(tmp_path, local_ray):
    overrides = {"training.steps": 240, "training.checkpoint_every": 20, "training.log_every": 20}
    config = debug_config(tmp_path, **overrides)
    pipeline_file = tmp_path / "pipeline.yaml"
    pipeline_file.write_text(config.to_yaml())

    # The driver runs as its own process on the test's Ray, and is killed with SIGKILL once
    # distill has written its first checkpoint: no chance to clean up.
    env = {**os.environ, "RAY_ADDRESS": local_ray.get_runtime_context().gcs_address}
    process = subprocess.Popen(
        [sys.executable, "-m", "flexkd.cli", "run", str(pipeline_file)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        _wait_for("debug/distill/*/checkpoints/step_*/meta.json", tmp_path, process)
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait()

    resumed = run_pipeline(load_config(pipeline_file))
    cached = {name: record.cached for name, record in resumed.stages.items()}
    assert cached["tokenize"] and cached["score"] and not cached["distill"]
    distill = resumed.stages["distill"].outputs
    assert distill["resumed_from_step"] >= 20, distill
    assert distill["steps"] == 240


@pytest.mark.integration  # tokenize to evaluate with the teacher cache, then distill with the online teacher: 1.5 min
def test_unlabeled_transfer_rows_go_through_the_cache_into_every_batch(tmp_path, local_ray):
    """data.transfer: rows without a label column are tokenized as unlabeled, cached with the
    teacher's outputs like the training rows, and mixed into every distill batch (2 labeled + 6
    unlabeled of 8 here), cache or online teacher; the losses stay finite."""
    samples = PIPELINES.parent / "flexkd" / "assets" / "samples" / "sst2_train.jsonl"
    unlabeled = [{"sentence": json.loads(line)["sentence"]} for line in samples.read_text().splitlines()[16:56]]
    transfer = tmp_path / "unlabeled.jsonl"
    transfer.write_text("".join(json.dumps(row) + "\n" for row in unlabeled))
    overrides = {
        "data.train.limit": 16,
        "data.transfer": {"path": str(transfer)},
        "training.teacher": "cache",
        "training.shuffle_buffer": 64,
    }
    result = run_pipeline(
        debug_config(tmp_path, **overrides), stages=("tokenize", "score", "targets", "distill", "evaluate")
    )

    assert result.stages["tokenize"].outputs["rows"] | {"eval": 0} == {
        "train": 16,
        "score": 16,
        "transfer": 40,
        "eval": 0,
    }
    for stage in ("tokenize", "targets"):
        rows = pq.read_table(result.stages[stage].directory / "transfer").to_pydict()
        assert set(rows["class_label"]) == {-1} and set(rows["reference"]) == {""}, stage
        assert sorted(rows["example_id"]) == list(range(40)), stage
    assert "teacher_class_logits" in rows and result.stages["targets"].outputs["transfer_rows"] == 40
    distilled = result.stages["distill"].outputs
    assert all(np.isfinite(distilled[part]) for part in ("total", "task", "logit", "feature"))
    assert 0 <= result.stages["evaluate"].outputs["metrics"]["student.accuracy"] <= 1

    online = run_pipeline(
        debug_config(tmp_path, **overrides | {"training.teacher": "online"}), stages=("tokenize", "score", "distill")
    )
    assert online.stages["tokenize"].cached and not online.stages["distill"].cached
    assert all(np.isfinite(online.stages["distill"].outputs[part]) for part in ("total", "task", "logit", "feature"))


def test_missing_column_is_refused_in_one_line_before_ray_starts(tmp_path):
    config = debug_config(tmp_path, **{"task.prompt_template": "Review: {text}\nSentiment:"})
    with pytest.raises(DataError) as caught:
        run_pipeline(config)
    assert str(caught.value) == (
        f"data.train ({config.data.train.path}): missing column 'text' (named by the prompt template); "
        "columns are: sentence, label"
    )
    assert not (tmp_path / "debug").exists()  # no stage started


def test_bad_k_is_refused_before_ray_starts_any_stage(tmp_path):
    with pytest.raises(ConfigError, match=r"^selection.k"):
        run_pipeline(debug_config(tmp_path, **{"selection.k": 64}))
    assert not (tmp_path / "debug").exists()


@pytest.mark.slow
def test_quickstart_student_loads_and_classifies(tmp_path, local_ray):
    """The README's quickstart with the real teacher; the registered student classifies."""
    raw = load_config(PIPELINES / "quickstart.yaml").model_dump(mode="json")
    config = parse_config(
        apply_overrides(
            raw, {"artifact_root": str(tmp_path), "tracking.tracking_uri": f"sqlite:///{tmp_path}/mlflow.db"}
        )
    )
    result = run_pipeline(config)
    mlflow.set_tracking_uri(result.tracking_uri)
    folder = download_registered_student(result.stages["register"].outputs["model_uri"], tmp_path / "student")
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    student = AutoModelForCausalLM.from_pretrained(folder)
    batch = tokenizer(["Review: a gorgeous, moving film\nSentiment:"], return_tensors="pt")
    with torch.no_grad():
        logits = student(**batch).logits[0, -1]
    verbalizers = [tokenizer(" negative").input_ids[0], tokenizer(" positive").input_ids[0]]
    assert torch.isfinite(logits[verbalizers]).all()
    metrics = result.stages["evaluate"].outputs["metrics"]
    assert 0 <= metrics["student.accuracy"] <= 1 and metrics["teacher.accuracy"] > 0.5
