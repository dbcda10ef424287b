"""Soak: the debug pipeline five times in a row in one process on one Ray, as a long
``flexkd watch`` would run it; the driver must not keep memory, files or MLflow runs behind.

Each run changes ``training.seed``, so distill, evaluate and register really run every time
(tokenize and score are reused after the first). The first run pays for imports, caches and
connection pools, so the baseline is taken after it; runs 2..5 must not grow the driver.

Bounds, from a measurement on the shared 2-core machine (runs 1..5, driver after gc):
RSS 886.5, 887.0, 887.4, 887.5, 887.8 MiB; open descriptors 50, 51, 51, 51, 51; threads 37
throughout. So: descriptors may grow by at most 3 over the four runs after the first (one leaked
file or socket per run gives 4), and RSS by at most 48 MiB (about 40 times what was measured, for
allocator noise; a teacher, a student or a dataset kept per run is caught within a few runs, and
a long watch does hundreds).
The secrets check of tests/test_safety.py runs here over every stage (it runs only tokenize there).
"""

from __future__ import annotations

import gc
import json
import os
from pathlib import Path

import mlflow
import psutil
import pytest

from flexkd.config.schema import apply_overrides, load_config, parse_config
from flexkd.pipeline.runner import run_pipeline

PIPELINES = Path(__file__).resolve().parents[1] / "pipelines"
RUNS = 5
MAX_FD_GROWTH = 3
MAX_RSS_GROWTH_MIB = 48
SECRETS = {"HF_TOKEN": "hf_soak_secret_8b5c", "AWS_SECRET_ACCESS_KEY": "aws_soak_secret_9c6d"}


def debug_config(root: Path, **overrides):
    raw = load_config(PIPELINES / "debug.yaml").model_dump(mode="json")
    raw = apply_overrides(
        raw, {"artifact_root": str(root), "tracking.tracking_uri": f"sqlite:///{root}/mlflow.db", **overrides}
    )
    return parse_config(raw)


def _driver_usage() -> dict[str, float]:
    gc.collect()
    process = psutil.Process()
    return {"rss_mib": process.memory_info().rss / 2**20, "fds": process.num_fds(), "threads": process.num_threads()}


@pytest.mark.slow
def test_five_pipelines_in_one_process_leak_no_memory_files_or_runs(tmp_path, local_ray, monkeypatch):
    for name, value in SECRETS.items():
        monkeypatch.setenv(name, value)
    usage = []
    for run in range(RUNS):
        config = debug_config(
            tmp_path,
            **{"training.seed": run, "training.steps": 8, "training.log_every": 4, "training.checkpoint_every": 8},
        )
        result = run_pipeline(config)
        ran = {name for name, record in result.stages.items() if not record.cached}
        assert {"distill", "evaluate", "register"} <= ran, ran
        assert mlflow.active_run() is None
        usage.append(_driver_usage())
    print("driver usage after each run:", json.dumps(usage))

    baseline, final = usage[0], usage[-1]
    assert final["fds"] - baseline["fds"] <= MAX_FD_GROWTH, usage
    assert final["rss_mib"] - baseline["rss_mib"] <= MAX_RSS_GROWTH_MIB, usage
    assert final["threads"] - baseline["threads"] <= 2, usage  # no thread (logger, progress bar) per run
    # Every pipeline and stage run was closed, FINISHED, and registered its student.
    client = mlflow.tracking.MlflowClient(config.tracking.tracking_uri)
    runs = client.search_runs([client.get_experiment_by_name(config.tracking.experiment).experiment_id])
    assert {run.info.status for run in runs} == {"FINISHED"}
    assert len(client.search_model_versions(f"name = '{config.name}-student'")) == RUNS

    from test_safety import files_containing

    assert files_containing(tmp_path, list(SECRETS.values())) == []
    assert os.environ["HF_TOKEN"] == SECRETS["HF_TOKEN"]  # the scan looked for values that were set
