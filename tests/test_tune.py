"""``flexkd tune``: bad sweeps are refused in one line before anything runs; a 4-trial sweep of the
debug pipeline runs on local Ray from the teacher-target cache, with one MLflow parent and a
child run per trial, and never loads the teacher inside a trial."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient

from flexkd.cli import main
from flexkd.config.schema import ConfigError, apply_overrides, load_config, parse_config
from flexkd.models.plan import count_teacher_loads
from flexkd.pipeline.runner import stage_fingerprint
from flexkd.stages.targets import INFO_FILE, cache_identity
from flexkd.sweep.tune import failed_trials_sentence, plan_sweep, run_sweep

PIPELINES = Path(__file__).resolve().parent.parent / "pipelines"
SPACE = {
    "selection.k": {"grid": [8, 16]},
    "layer_map": {"grid": ["last", "uniform"]},
    "loss.gamma": {"loguniform": [0.3, 3.0]},
}


def sweep_file(root: Path, space=None, **overrides) -> Path:
    """The debug pipeline with a tune section, written (absolute paths) under ``root``."""
    raw = load_config(PIPELINES / "debug.yaml").model_dump(mode="json")
    raw = apply_overrides(
        raw,
        {
            "artifact_root": str(root),
            "tracking.tracking_uri": f"sqlite:///{root}/mlflow.db",
            "resources.cpus_per_worker": 0.5,  # two trials at once on 2 CPUs, one CPU left for Ray Data
            "tune": {
                "search_space": space or SPACE,
                "num_samples": 1,
                "eval_every": 4,
                "max_concurrent_trials": 2,
                "asha": {"grace_period": 4, "reduction_factor": 2},
            },
            **overrides,
        },
    )
    path = root / "sweep.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def refusal(path: Path) -> str:
    with pytest.raises(ConfigError) as caught:
        run_sweep(load_config(path), path)
    message = str(caught.value)
    assert "\n" not in message, message
    assert not (path.parent / "debug").exists()  # refused before any stage or trial ran
    return message


def test_unknown_parameter_is_one_line_from_the_cli(tmp_path, capsys):
    path = sweep_file(tmp_path, {"loss.gama": {"grid": [1.0, 2.0]}})
    assert main(["tune", str(path)]) == 2
    error = capsys.readouterr().err.strip()
    assert "\n" not in error and "unknown parameter 'loss.gama'" in error, error


def test_a_value_the_schema_refuses_names_parameter_and_value(tmp_path):
    message = refusal(sweep_file(tmp_path, {"loss.feature": {"choice": ["correlation", "cosine"]}}))
    assert message.startswith("tune.search_space.loss.feature = 'cosine':"), message


def test_k_above_the_caches_k_max_is_refused(tmp_path):
    message = refusal(sweep_file(tmp_path, {"selection.k": {"grid": [8, 32]}}, **{"targets.k_max": 16}))
    assert "selection.k" in message and "32" in message and "16" in message, message


def _foreign_cache(root: Path, config, **changes) -> Path:
    """A targets directory whose targets.json says it was made from a changed config."""
    other = parse_config(apply_overrides(config.model_dump(mode="json"), changes))
    directory = root / "foreign_cache"
    directory.mkdir()
    info = {
        "identity": cache_identity(other, stage_fingerprint(other, "tokenize", {})),
        "k_max": 32,
        "full_width": False,
        "top_k_logits": 32,
        "temperatures": [1.0, 2.0],
        "layers": [2, 4],
        "units": {"2": 32, "4": 32},
        "unit_order": {},
        "rows": 0,
        "bytes": 0,
    }
    (directory / INFO_FILE).write_text(json.dumps(info))
    return directory


@pytest.mark.parametrize(
    "changes, expected", [({"teacher.seed": 1}, "another teacher"), ({"data.train.limit": 64}, "another data set")]
)
def test_a_cache_made_for_another_teacher_or_data_set_is_refused(tmp_path, changes, expected):
    config = load_config(sweep_file(tmp_path, {"loss.gamma": {"grid": [0.5, 1.0]}}))
    path = sweep_file(
        tmp_path,
        {"loss.gamma": {"grid": [0.5, 1.0]}},
        **{"training.teacher": "cache", "targets.path": str(_foreign_cache(tmp_path, config, **changes))},
    )
    message = refusal(path)
    assert message.startswith("targets.path") and expected in message, message


def test_unknown_metric_is_refused(tmp_path):
    with pytest.raises(ConfigError, match=r"^tune.metric: 'eval.bleu'"):
        plan_sweep(load_config(sweep_file(tmp_path, **{"tune.metric": "eval.bleu"})))


def test_plan_caches_the_largest_k_and_every_mapped_layer(tmp_path):
    plan = plan_sweep(load_config(sweep_file(tmp_path)))
    (prepare,) = plan.prepare.values()
    assert plan.k_max == 16 and prepare["selection"]["k"] == 16 and prepare["targets"]["k_max"] == 16
    # "last" maps teacher layer 4; "uniform" maps teacher layers 2 and 4 (a 2-block student on 4 blocks)
    assert sorted({teacher for teacher, _ in prepare["layer_map"]}) == [2, 4]
    assert plan.metric == "eval.accuracy" and plan.mode == "max"


def test_some_failed_trials_are_said_in_one_line_with_the_first_error():
    def trial(layer_map: str, error: str = "") -> dict:
        return {"params": {"layer_map": layer_map, "loss.gamma": 1.0}, "error": error}

    assert failed_trials_sentence([trial("uniform"), trial("last")]) is None
    sentence = failed_trials_sentence(
        [trial("uniform"), trial("last", "ValueError: columns differ"), trial("last", "x")]
    )
    assert sentence == (
        "tune: 2 of 3 trials failed, so the best is picked from the other 1 only; "
        "first (layer_map = last, loss.gamma = 1.0): ValueError: columns differ"
    )


@pytest.mark.slow  # about 1.5 min of Ray Train runs: `make test-slow`
def test_four_trial_sweep_runs_from_the_cache_and_resumes(tmp_path, local_ray):
    path = sweep_file(tmp_path)
    config = load_config(path)
    result = run_sweep(config, path)

    assert len(result.trials) == 4 and all(row["status"] != "error" for row in result.trials), result.trials
    assert result.teacher_loads_in_trials == 0  # trials read the cache; the teacher was loaded only to build it
    assert count_teacher_loads(config) >= 1

    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    parent = client.get_run(result.parent_run_id)
    children = client.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{result.parent_run_id}'")
    assert len(children) == 4 and all(run.info.run_name.startswith("trial-") for run in children)
    assert {run.data.tags["flexkd.trial_id"] for run in children} == {row["trial_id"] for row in result.trials}
    for run in children:
        assert client.get_metric_history(run.info.run_id, "eval.accuracy")  # ASHA's metric, per trial
        assert {"selection.k", "layer_map", "loss.gamma"} <= set(run.data.params)
    artifacts = {item.path for item in client.list_artifacts(result.parent_run_id)}
    assert {"sweep.best.yaml", "report.md", "report.png", "trials.csv"} <= artifacts
    assert parent.data.metrics["teacher_loads_in_trials"] == 0

    best = load_config(result.best_config_path)  # runnable pipeline, next to the pipeline file
    assert result.best_config_path == tmp_path / "sweep.best.yaml" and best.tune is None
    assert best.selection.k == result.best["params"]["selection.k"]
    assert best.loss.gamma == pytest.approx(result.best["params"]["loss.gamma"])
    report = result.report_path.read_text()
    assert sum(line.startswith("| ") for line in report.splitlines()) == 5  # header + 4 trials

    again = run_sweep(load_config(path), path)  # the same sweep: restored, nothing new runs
    assert again.parent_run_id == result.parent_run_id
    assert {row["trial_id"] for row in again.trials} == {row["trial_id"] for row in result.trials}
    assert (
        len(client.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{result.parent_run_id}'")) == 4
    )
    assert again.teacher_loads_in_trials == 0


@pytest.mark.slow
def test_an_interrupted_sweep_resumes(tmp_path, local_ray):
    """The driver is killed once a trial has checkpointed; the same command finishes the sweep."""
    path = sweep_file(tmp_path, **{"training.steps": 24, "training.checkpoint_every": 4})
    env = {**os.environ, "RAY_ADDRESS": local_ray.get_runtime_context().gcs_address}
    process = subprocess.Popen(
        [sys.executable, "-m", "flexkd.cli", "tune", str(path)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.time() + 900
        while not list(tmp_path.glob("debug/tune/*/distill/*/checkpoints/step_*/meta.json")):
            assert process.poll() is None and time.time() < deadline, "no trial checkpointed"
            time.sleep(0.5)
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait()
    result = run_sweep(load_config(path), path)
    assert len(result.trials) == 4 and all(row["status"] != "error" for row in result.trials)
    assert result.teacher_loads_in_trials == 0


@pytest.mark.integration  # a 2-trial sweep on local Ray: about 3 min
def test_a_sweep_over_the_layer_map_with_unlabeled_transfer_rows_runs_every_trial(tmp_path, local_ray):
    """The trials share one read of the cache's training rows (every mapped layer's units) and read
    their own transfer rows (their layers' units only): a trial that maps fewer layers, or a kd
    trial that reads none, must join batches of the same columns. It failed every such trial."""
    samples = PIPELINES.parent / "flexkd" / "assets" / "samples" / "sst2_train.jsonl"
    transfer = tmp_path / "unlabeled.jsonl"
    transfer.write_text(
        "".join(
            json.dumps({"sentence": json.loads(line)["sentence"]}) + "\n"
            for line in samples.read_text().splitlines()[16:48]
        )
    )
    space = {"layer_map": {"grid": ["uniform", "last"]}}  # the shared read has both layers' units
    overrides = {"data.train.limit": 16, "data.transfer": {"path": str(transfer)}, "training.teacher": "cache"}
    path = sweep_file(tmp_path, space, **overrides | {"tune.asha": None})
    result = run_sweep(load_config(path), path)

    assert len(result.trials) == 2 and all(row["status"] != "error" for row in result.trials), result.trials
