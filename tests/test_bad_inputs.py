"""Bad inputs: each is refused in one line that says where, and no stage is marked done.

One test per row of docs/FAILURES.md that is not already proved elsewhere (unknown key, wrong
type, k too large, layer out of range and tokenizer mismatch are in tests/test_config.py;
missing file, empty file and missing column in tests/test_tokenize_stage.py).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from flexkd.cli import main
from flexkd.config.schema import ConfigError, apply_overrides, load_config, parse_config
from flexkd.errors import StageError
from flexkd.pipeline.runner import run_pipeline
from flexkd.tracking.runs import TrackingError

REPO_ROOT = Path(__file__).resolve().parents[1]
PIPELINES = REPO_ROOT / "pipelines"


def debug_config(root: Path, **overrides):
    raw = load_config(PIPELINES / "debug.yaml").model_dump(mode="json")
    raw = apply_overrides(
        raw, {"artifact_root": str(root), "tracking.tracking_uri": f"sqlite:///{root}/mlflow.db", **overrides}
    )
    return parse_config(raw)


def assert_nothing_done(root: Path) -> None:
    """No stage of the pipeline under ``root`` has a manifest that says done."""
    done = [path for path in (root / "debug").rglob("manifest.json") if json.loads(path.read_text()).get("done")]
    assert done == [], done


def one_line(error: BaseException) -> str:
    message = str(error)
    assert message and "\n" not in message, message
    return message


def test_a_missing_pipeline_file_is_one_line(tmp_path, capsys):
    assert main(["run", str(tmp_path / "nope.yaml")]) == 2
    assert capsys.readouterr().err.strip() == f"flexkd: config error: {tmp_path / 'nope.yaml'}: pipeline file not found"


def test_a_teacher_folder_that_does_not_exist_is_refused_before_any_stage(tmp_path):
    config = debug_config(
        tmp_path,
        **{
            "teacher.source": "hf",
            "teacher.path": str(tmp_path / "no-teacher"),
            "teacher.architecture": None,
            "teacher.tokenizer": None,
        },
    )
    with pytest.raises(ConfigError) as caught:
        run_pipeline(config)
    assert one_line(caught.value) == f"teacher.path: {tmp_path / 'no-teacher'} does not exist"
    assert not (tmp_path / "debug").exists()


def test_a_teacher_missing_from_the_registry_is_one_line(tmp_path):
    config = debug_config(
        tmp_path,
        **{"teacher.source": "mlflow", "teacher.path": "models:/no-such-teacher/1", "teacher.architecture": None},
    )
    with pytest.raises(ConfigError) as caught:
        run_pipeline(config)
    assert one_line(caught.value).startswith("teacher.path: models:/no-such-teacher/1")
    assert_nothing_done(tmp_path)


def test_an_unreachable_tracking_server_is_refused_in_seconds_without_its_password(tmp_path, local_ray):
    config = debug_config(tmp_path, **{"tracking.tracking_uri": "http://alice:s3cret@127.0.0.1:9"})
    started = time.monotonic()
    with pytest.raises(TrackingError) as caught:
        run_pipeline(config)
    assert time.monotonic() - started < 30  # MLflow's own retries take minutes
    assert one_line(caught.value) == (
        "tracking: cannot reach the MLflow tracking server at http://alice:***@127.0.0.1:9: Connection refused; "
        "start it, or fix tracking.tracking_uri / MLFLOW_TRACKING_URI"
    )
    assert_nothing_done(tmp_path)


def test_an_unreachable_ray_address_is_refused_in_seconds(tmp_path):
    """A separate driver: this test process is already connected to the session's Ray."""
    pipeline = tmp_path / "pipeline.yaml"
    pipeline.write_text(debug_config(tmp_path).to_yaml())
    env = {**os.environ, "RAY_ADDRESS": "127.0.0.1:9"}
    started = time.monotonic()
    run = subprocess.run(
        [sys.executable, "-m", "flexkd.cli", "run", str(pipeline)], env=env, capture_output=True, text=True, timeout=300
    )
    assert run.returncode == 1
    assert run.stderr.strip().splitlines()[-1] == (
        "flexkd: ray: cannot reach the Ray cluster at RAY_ADDRESS=127.0.0.1:9: Connection refused; "
        "start it, or unset RAY_ADDRESS to run on a local Ray"
    )
    assert "Traceback" not in run.stderr
    assert time.monotonic() - started < 240  # imports included; Ray's own GCS retries take minutes
    assert_nothing_done(tmp_path)


@pytest.mark.parametrize(
    "rows, expected",
    [
        ([], "the split is empty"),
        (
            [{"sentence": "fine", "label": 1}, {"sentence": "odd", "label": 7}],
            "example 1: task.label_column 'label': label 7 is not in the label set 0..1 / negative, positive",
        ),
    ],
    ids=["empty", "label-outside-the-label-set"],
)
def test_a_bad_train_split_fails_tokenize_and_marks_nothing_done(tmp_path, local_ray, rows, expected):
    train = tmp_path / "train.jsonl"
    train.write_text("".join(json.dumps(row) + "\n" for row in rows))
    config = debug_config(tmp_path, **{"data.train": {"path": str(train)}})
    with pytest.raises(StageError) as caught:
        run_pipeline(config)
    assert one_line(caught.value) == f"tokenize: data.train ({train}): {expected}"
    assert_nothing_done(tmp_path)
    assert not (tmp_path / "debug" / "score").exists()


@pytest.fixture
def tiny_disk(tmp_path):
    """A 16 MiB tmpfs: a real file system that really fills up (ENOSPC from the kernel)."""
    mount_point = tmp_path / "disk"
    mount_point.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(mount_point)], capture_output=True, text=True
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", "--lazy", str(mount_point)], check=False)


def _fill(disk: Path) -> None:
    """Take every free byte of ``disk``."""
    with (disk / "ballast").open("wb") as ballast:
        block = b"\0" * (1 << 16)
        try:
            while True:
                ballast.write(block)
                ballast.flush()
        except OSError:
            pass


def test_a_full_disk_under_the_mlflow_artifacts_is_one_line(tmp_path, tiny_disk, local_ray):
    """The MLflow store's artifacts on a full disk: logging the config is the first write."""
    config = debug_config(tiny_disk, **{"tracking.tracking_uri": f"sqlite:///{tmp_path}/mlflow.db"})
    _fill(tiny_disk)
    with pytest.raises(TrackingError) as caught:
        run_pipeline(config)
    message = one_line(caught.value)
    assert message.startswith("tracking: cannot write config.yaml to the MLflow artifact store file://"), message
    assert message.endswith(": No space left on device"), message
    assert not (tiny_disk / "debug").exists()


def test_a_full_disk_while_a_stage_writes_its_artifacts_is_one_line_and_marks_nothing_done(
    tmp_path, tiny_disk, local_ray
):
    """artifact_root on a full tmpfs (the MLflow store and its artifacts stay on the real disk):
    tokenize cannot write its token shards."""
    import mlflow

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    mlflow.set_tracking_uri(uri)
    mlflow.create_experiment("flexkd", artifact_location=(tmp_path / "mlartifacts").as_uri())
    config = debug_config(tiny_disk, **{"tracking.tracking_uri": uri})
    (tiny_disk / "debug").mkdir()
    _fill(tiny_disk)
    with pytest.raises(StageError) as caught:
        run_pipeline(config)
    message = one_line(caught.value)
    assert message.startswith("tokenize: ") and "No space left on device" in message, message
    assert_nothing_done(tiny_disk)
