"""Reliability: a killed worker, a non-finite loss, damaged checkpoints.

The driver-crash case (the driver SIGKILLed during distill, the same command rerun) is
tests/test_pipeline.py::test_a_killed_run_resumes_from_finished_stages_and_the_last_checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest
import torch
from mlflow.entities import RunStatus
from mlflow.tracking import MlflowClient

from flexkd import distributed as fd
from flexkd.config.schema import apply_overrides, load_config, parse_config
from flexkd.errors import StageError
from flexkd.pipeline.runner import read_manifest, run_pipeline, stage_fingerprint
from flexkd.testing import faults

REPO_ROOT = Path(__file__).resolve().parents[1]
TESTS_DIR = REPO_ROOT / "tests"
PIPELINES = REPO_ROOT / "pipelines"
TO_DISTILL = ("tokenize", "score", "distill")


def debug_config(root: Path, **overrides):
    """The debug pipeline, its artifacts and MLflow store under ``root``."""
    raw = load_config(PIPELINES / "debug.yaml").model_dump(mode="json")
    raw = apply_overrides(
        raw, {"artifact_root": str(root), "tracking.tracking_uri": f"sqlite:///{root}/mlflow.db", **overrides}
    )
    return parse_config(raw)


def distill_dir(config, upstream) -> Path:
    """Where distill of ``config`` writes, given a result whose tokenize and score it reuses."""
    fingerprints = {name: upstream.stages[name].fingerprint for name in ("tokenize", "score")}
    return Path(config.artifact_root) / config.name / "distill" / stage_fingerprint(config, "distill", fingerprints)


def runs_of_stage_dir(tracking_uri: str, directory: Path):
    """The MLflow run of the stage that wrote ``directory``, and its parent pipeline run."""
    client = MlflowClient(tracking_uri)
    experiments = [experiment.experiment_id for experiment in client.search_experiments()]
    (stage_run,) = client.search_runs(experiments, f"tags.`flexkd.directory` = '{directory}'")
    return stage_run, client.get_run(stage_run.data.tags["mlflow.parentRunId"])


# --------------------------------------------------------------------------- checkpoints, one process


def _tiny_model_and_optimizer(seed: int = 0) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    loss = model(torch.ones(4, 8)).square().mean()
    loss.backward()
    optimizer.step()  # AdamW state exists, as in any real checkpoint
    optimizer.zero_grad()
    return model, optimizer


def _two_checkpoints(directory: Path) -> tuple[Path, Path]:
    model, optimizer = _tiny_model_and_optimizer()
    first = fd.save_checkpoint(directory, model, optimizer, step=2)
    second = fd.save_checkpoint(directory, model, optimizer, step=4)
    return first, second


def _a_shard(checkpoint: Path) -> Path:
    return sorted(checkpoint.glob("*.distcp"))[0]


def test_meta_records_the_size_and_sha256_of_every_file(tmp_path):
    first, _ = _two_checkpoints(tmp_path)
    meta = json.loads((first / fd.META_FILENAME).read_text())
    files = {path.relative_to(first).as_posix() for path in first.rglob("*") if path.name != fd.META_FILENAME}
    assert set(meta["files"]) == files and ".metadata" in files and any(name.endswith(".distcp") for name in files)
    shard = _a_shard(first)
    assert meta["files"][shard.name] == {
        "size": shard.stat().st_size,
        "sha256": hashlib.sha256(shard.read_bytes()).hexdigest(),
    }


def test_a_truncated_newest_checkpoint_is_skipped_with_a_warning_naming_it(tmp_path, caplog):
    first, second = _two_checkpoints(tmp_path)
    shard = _a_shard(second)
    size = shard.stat().st_size
    with shard.open("r+b") as handle:
        handle.truncate(size // 2)

    with caplog.at_level(logging.WARNING, logger="flexkd"):
        assert fd.latest_checkpoint(tmp_path) == first
    assert f"checkpoint {second}: {shard.name} has {size // 2} bytes, expected {size} (truncated?)" in caplog.text

    with pytest.raises(fd.CorruptCheckpointError) as caught:
        fd.load_checkpoint(second, *_tiny_model_and_optimizer(seed=1))
    assert str(caught.value) == f"checkpoint {second}: {shard.name} has {size // 2} bytes, expected {size} (truncated?)"

    # The previous one still loads, and gives the saved weights.
    saved, _ = _tiny_model_and_optimizer()
    model, optimizer = _tiny_model_and_optimizer(seed=1)
    assert fd.load_checkpoint(first, model, optimizer) == {"step": 2, "extra": {}, "world_size": 1}
    for key, value in model.state_dict().items():
        assert torch.equal(value, saved.state_dict()[key]), key


def test_a_flipped_byte_is_caught_by_the_digest(tmp_path):
    first, second = _two_checkpoints(tmp_path)
    shard = _a_shard(second)
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size: only the digest can tell
    shard.write_bytes(bytes(data))
    assert fd.latest_checkpoint(tmp_path) == first
    with pytest.raises(fd.CorruptCheckpointError, match=re.escape(f"{shard.name} does not match its SHA-256")):
        fd.load_checkpoint(second, *_tiny_model_and_optimizer(seed=1))


def test_a_missing_file_and_a_garbled_meta_are_named(tmp_path):
    first, second = _two_checkpoints(tmp_path)
    (second / ".metadata").unlink()
    with pytest.raises(fd.CorruptCheckpointError, match=re.escape(f"checkpoint {second}: .metadata is missing")):
        fd.verify_checkpoint(second)
    (first / fd.META_FILENAME).write_text('{"step": 2, "files": ')
    with pytest.raises(fd.CorruptCheckpointError, match=re.escape(f"checkpoint {first}: meta.json is not valid")):
        fd.verify_checkpoint(first)


def test_when_no_checkpoint_is_intact_resuming_refuses_naming_each(tmp_path):
    first, second = _two_checkpoints(tmp_path)
    for checkpoint in (first, second):
        with _a_shard(checkpoint).open("r+b") as handle:
            handle.truncate(10)
    with pytest.raises(fd.CorruptCheckpointError) as caught:
        fd.latest_checkpoint(tmp_path)
    message = str(caught.value)
    assert "\n" not in message and message.startswith(f"no intact checkpoint in {tmp_path}: ")
    assert str(first) in message and str(second) in message and "delete the checkpoints directory" in message
    # An interrupted save (no meta.json) is not "a checkpoint exists": a fresh start is fine.
    assert fd.latest_checkpoint(tmp_path / "elsewhere") is None
    (tmp_path / "fresh" / "step_00000002").mkdir(parents=True)
    assert fd.latest_checkpoint(tmp_path / "fresh") is None


def test_saving_over_a_stale_step_directory_starts_clean(tmp_path):
    """A crashed save at step 4 left files; the retry at step 4 must not inherit them."""
    stale = tmp_path / "step_00000004"
    stale.mkdir()
    (stale / "__9_0.distcp").write_bytes(b"left over")
    model, optimizer = _tiny_model_and_optimizer()
    path = fd.save_checkpoint(tmp_path, model, optimizer, step=4)
    assert not (path / "__9_0.distcp").exists()
    assert "__9_0.distcp" not in json.loads((path / fd.META_FILENAME).read_text())["files"]


def test_prune_keeps_the_newest_intact_checkpoints_and_drops_corrupt_ones(tmp_path):
    model, optimizer = _tiny_model_and_optimizer()
    paths = [fd.save_checkpoint(tmp_path, model, optimizer, step=step) for step in (2, 4, 6)]
    with _a_shard(paths[2]).open("r+b") as handle:
        handle.truncate(10)
    deleted = fd.prune_checkpoints(tmp_path, keep=1)
    assert sorted(deleted) == [paths[0], paths[2]]
    assert fd.latest_checkpoint(tmp_path) == paths[1]


# --------------------------------------------------------------------------- the fault hook


def test_the_fault_hook_is_off_by_default_and_checks_its_input(tmp_path, monkeypatch):
    monkeypatch.delenv(faults.KILL_WORKER_AT_STEP_ENV, raising=False)
    faults.maybe_kill_worker(3, 0, tmp_path)  # still alive: nothing asked for a fault
    monkeypatch.setenv(faults.KILL_WORKER_AT_STEP_ENV, "3")
    faults.maybe_kill_worker(2, 0, tmp_path)  # another step
    faults.maybe_kill_worker(3, 1, tmp_path)  # another rank (default rank 0)
    assert not list(tmp_path.iterdir())
    assert faults.runtime_env_vars() == {faults.KILL_WORKER_AT_STEP_ENV: "3"}
    monkeypatch.setenv(faults.KILL_WORKER_AT_STEP_ENV, "three")
    with pytest.raises(ValueError, match="FLEXKD_FAULT_KILL_WORKER_AT_STEP='three': expected an integer"):
        faults.maybe_kill_worker(3, 0, tmp_path)


def test_the_fault_kills_the_process_once(tmp_path):
    """SIGKILL the first time; the marker makes the second process (the restart) run on."""
    call = f"from flexkd.testing import faults; faults.maybe_kill_worker(5, 1, {str(tmp_path)!r}); print('survived')"
    env = {**os.environ, faults.KILL_WORKER_AT_STEP_ENV: "5", faults.KILL_WORKER_RANK_ENV: "1"}
    first = subprocess.run([sys.executable, "-c", call], env=env, capture_output=True, text=True, timeout=120)
    assert first.returncode == -9 and "survived" not in first.stdout
    assert faults.marker_path(tmp_path, 5, 1).read_text().startswith("FLEXKD_FAULT_KILL_WORKER_AT_STEP=5")
    second = subprocess.run([sys.executable, "-c", call], env=env, capture_output=True, text=True, timeout=120)
    assert second.returncode == 0 and "survived" in second.stdout


STEPS, CHECKPOINT_EVERY, KILL_AT = 6, 2, 3


def _resumable_loop(config: dict) -> None:
    """Plain PyTorch, as distill is written: resume from the newest checkpoint, train, checkpoint
    every 2 steps, and call the fault hook after every step (identical replicas on each rank)."""
    if "RAY_TRAIN_WORKER" in config:  # a Ray Train worker on a small machine
        torch.set_num_threads(1)
    out = Path(config["out"])
    model, optimizer = _tiny_model_and_optimizer()
    start = 0
    latest = fd.latest_checkpoint(out / "checkpoints")
    if latest is not None:
        start = fd.load_checkpoint(latest, model, optimizer)["step"]
    if fd.is_main_process():
        with (out / "attempts.txt").open("a") as attempts:
            attempts.write(f"{start}\n")
    inputs = torch.linspace(-1, 1, 32).reshape(4, 8)
    for step in range(start, STEPS):
        loss = (model(inputs) - inputs.sum(dim=1, keepdim=True)).square().mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        done = step + 1
        if done % CHECKPOINT_EVERY == 0:
            fd.save_checkpoint(out / "checkpoints", model, optimizer, done)
        faults.maybe_kill_worker(done, fd.rank(), out)
    if fd.is_main_process():
        torch.save(model.state_dict(), out / "final.pt")


def _fit_on_ray(out: str, max_failures: int) -> str | None:
    """Runs as a Ray task: its runtime_env (the fault switch) is inherited by the trainer's actors."""
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    trainer = TorchTrainer(
        _resumable_loop,
        train_loop_config={"out": out, "RAY_TRAIN_WORKER": True},
        scaling_config=ScalingConfig(num_workers=1, resources_per_worker={"CPU": 1}),
        run_config=RunConfig(
            name="fault", storage_path=str(Path(out) / "ray"), failure_config=FailureConfig(max_failures=max_failures)
        ),
    )
    try:
        result = trainer.fit()
    except Exception as error:
        return str(error)
    return None if result.error is None else str(result.error)


def test_a_killed_worker_is_restarted_and_resumes_from_the_last_checkpoint(tmp_path, local_ray):
    """The worker is SIGKILLed after step 3; Ray Train restarts the group, which resumes from the
    step-2 checkpoint and ends with the weights of a run without the fault (to float rounding:
    the worker runs one thread). One worker keeps this cheap; which rank dies does not change
    what Ray Train does (the whole group restarts)."""
    reference = tmp_path / "reference"
    reference.mkdir()
    _resumable_loop({"out": str(reference)})  # in this process: no Ray, no fault

    out = tmp_path / "faulty"
    out.mkdir()
    env_vars = {
        faults.KILL_WORKER_AT_STEP_ENV: str(KILL_AT),
        faults.KILL_WORKER_RANK_ENV: "0",
        "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), str(TESTS_DIR)]),
    }
    fit = local_ray.remote(num_cpus=0, max_retries=0)(_fit_on_ray)
    error = local_ray.get(fit.options(runtime_env={"env_vars": env_vars}).remote(str(out), 1))

    assert error is None, error
    assert faults.marker_path(out, KILL_AT, 0).is_file()  # the fault did fire
    assert (out / "attempts.txt").read_text().split() == ["0", "2"]  # restarted from step 2
    expected = torch.load(reference / "final.pt", weights_only=True)
    for key, value in torch.load(out / "final.pt", weights_only=True).items():
        torch.testing.assert_close(value, expected[key], rtol=0, atol=1e-6)


# --------------------------------------------------------------------------- the pipeline


@pytest.fixture(scope="module")
def six_steps(tmp_path_factory, local_ray):
    """tokenize, score and 6 distill steps of the debug pipeline: a good step-6 checkpoint."""
    root = tmp_path_factory.mktemp("reliability")
    config = debug_config(root, **{"training.steps": 6, "training.checkpoint_every": 6, "training.log_every": 6})
    result = run_pipeline(config, stages=TO_DISTILL)
    checkpoint = result.stages["distill"].directory / "checkpoints" / "step_00000006"
    assert fd.latest_checkpoint(checkpoint.parent) == checkpoint
    return root, result, checkpoint


def _resume_from(good: Path, directory: Path) -> Path:
    """Give a distill directory the good step-6 checkpoint, as if it had written it itself."""
    target = directory / "checkpoints" / good.name
    shutil.copytree(good, target)
    return target


@pytest.mark.integration  # with its six_steps fixture: about 2.5 min for the three
def test_a_non_finite_loss_stops_the_run_keeps_the_checkpoint_and_fails_the_mlflow_run(six_steps):
    """Resumed at step 6 with an absurd learning rate, step 7's update overflows the weights and
    step 8's loss is not finite."""
    root, upstream, good = six_steps
    config = debug_config(
        root,
        **{
            "training.steps": 12,
            "training.checkpoint_every": 6,
            "training.log_every": 2,
            "training.learning_rate": 1e38,
        },
    )
    directory = distill_dir(config, upstream)
    kept = _resume_from(good, directory)

    with pytest.raises(StageError) as caught:
        run_pipeline(config, stages=TO_DISTILL)
    message = str(caught.value)
    assert "\n" not in message
    assert re.fullmatch(
        r"distill: (FloatingPointError: )?non-finite (task|logit|feature|total) loss \((nan|inf|-inf)\) at step 8; "
        r"the last good checkpoint is kept",
        message,
    ), message

    assert read_manifest(directory) is None and not (directory / "manifest.json").exists()
    assert fd.latest_checkpoint(directory / "checkpoints") == kept  # intact, and still the newest
    assert not (directory / "checkpoints" / "step_00000012").exists()
    stage_run, pipeline_run = runs_of_stage_dir(config.tracking.tracking_uri, directory)
    assert stage_run.info.status == RunStatus.to_string(RunStatus.FAILED)
    assert pipeline_run.info.status == RunStatus.to_string(RunStatus.FAILED)
    assert mlflow.active_run() is None  # nothing left open for the next run in this process


@pytest.mark.integration  # with its six_steps fixture: about 2.5 min for the three
def test_a_corrupt_newest_checkpoint_is_passed_over_and_the_previous_one_resumed(six_steps):
    root, upstream, good = six_steps
    config = debug_config(
        root, **{"training.steps": 12, "training.checkpoint_every": 6, "training.log_every": 6, "training.seed": 1}
    )
    directory = distill_dir(config, upstream)
    _resume_from(good, directory)
    corrupt = directory / "checkpoints" / "step_00000009"
    shutil.copytree(good, corrupt)
    with _a_shard(corrupt).open("r+b") as handle:
        handle.truncate(100)

    result = run_pipeline(config, stages=TO_DISTILL)
    outputs = result.stages["distill"].outputs
    assert outputs["resumed_from_step"] == 6 and outputs["steps"] == 12
    assert read_manifest(directory)["done"] is True


@pytest.mark.integration  # with its six_steps fixture: about 2.5 min for the three
def test_distill_refuses_to_resume_when_every_checkpoint_is_corrupt(six_steps):
    root, upstream, good = six_steps
    config = debug_config(
        root, **{"training.steps": 12, "training.checkpoint_every": 6, "training.log_every": 6, "training.seed": 2}
    )
    directory = distill_dir(config, upstream)
    corrupt = _resume_from(good, directory)
    shard = _a_shard(corrupt)
    size = shard.stat().st_size
    with shard.open("r+b") as handle:
        handle.truncate(100)

    with pytest.raises(StageError) as caught:
        run_pipeline(config, stages=TO_DISTILL)
    message = str(caught.value)
    assert "\n" not in message
    assert re.fullmatch(
        rf"distill: (flexkd\.distributed\.)?(CorruptCheckpointError: )?no intact checkpoint in {re.escape(str(corrupt.parent))}: "
        rf"checkpoint {re.escape(str(corrupt))}: {re.escape(shard.name)} has 100 bytes, expected {size} \(truncated\?\); "
        r"delete the checkpoints directory to start this stage over",
        message,
    ), message
    assert read_manifest(directory) is None
    assert corrupt.is_dir()  # nothing deleted: the user decides
    stage_run, pipeline_run = runs_of_stage_dir(config.tracking.tracking_uri, directory)
    assert stage_run.info.status == pipeline_run.info.status == RunStatus.to_string(RunStatus.FAILED)


# --------------------------------------------------------------------------- a worker killed in distill


def _finished_distill(tracking_uri: str, directory: Path):
    stage_run, pipeline_run = runs_of_stage_dir(tracking_uri, directory)
    return stage_run, pipeline_run, json.loads((directory / "metrics.json").read_text())


@pytest.mark.slow  # about 1.5 min of Ray Train runs: `make test-slow`
def test_distill_survives_a_killed_worker_and_matches_a_run_without_it(tmp_path, local_ray):
    """Rank 0 of distill is SIGKILLed after step 8 (checkpoint at 6); with max_failures 1 the
    worker group restarts, resumes from step 6 and finishes. Final loss parts agree with an
    undisturbed run to rtol 1e-4 (same batches, same state: they agree to float rounding)."""
    overrides = {
        "training.steps": 12,
        "training.checkpoint_every": 6,
        "training.log_every": 4,
        "training.max_failures": 1,
    }
    clean = debug_config(tmp_path / "clean", **overrides)
    clean_result = run_pipeline(clean, stages=TO_DISTILL)

    # Same config in a second root that reuses tokenize and score (copied), so only distill runs;
    # the fault is set in the environment of a separate driver, as a user would set it.
    faulty = debug_config(tmp_path / "faulty", **overrides)
    for stage in ("tokenize", "score"):
        shutil.copytree(tmp_path / "clean" / "debug" / stage, tmp_path / "faulty" / "debug" / stage)
    pipeline_file = tmp_path / "faulty.yaml"
    pipeline_file.write_text(faulty.to_yaml())
    gcs_port = local_ray.get_runtime_context().gcs_address.rsplit(":", 1)[1]
    env = {**os.environ, "RAY_ADDRESS": f"127.0.0.1:{gcs_port}", faults.KILL_WORKER_AT_STEP_ENV: "8"}
    run = subprocess.run(
        [sys.executable, "-m", "flexkd.cli", "run", str(pipeline_file), "--stages", ",".join(TO_DISTILL)],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert run.returncode == 0, run.stderr[-3000:]

    directory = distill_dir(faulty, clean_result)
    assert faults.marker_path(directory, 8, 0).is_file(), "the fault did not fire"
    stage_run, pipeline_run, metrics = _finished_distill(faulty.tracking.tracking_uri, directory)
    assert stage_run.info.status == pipeline_run.info.status == RunStatus.to_string(RunStatus.FINISHED)
    assert stage_run.data.metrics["final.resumed_from_step"] == 6  # the restart, as MLflow records it
    assert metrics["steps"] == 12
    reference = json.loads((clean_result.stages["distill"].directory / "metrics.json").read_text())
    for part in ("task", "logit", "feature", "total"):
        if part in reference:
            assert metrics[part] == pytest.approx(reference[part], rel=1e-4), part
