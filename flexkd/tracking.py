"""MLflow: where runs go, how the config is logged, and how a Ray worker logs metrics.

Only the driver and rank 0 of a Ray Train job write, and never at the same time (the driver
waits on the job), so the default SQLite store sees one writer at a time.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import mlflow
from mlflow.entities import Metric
from mlflow.tracking import MlflowClient

from flexkd.config import PipelineConfig


def tracking_uri(config: PipelineConfig) -> str:
    """The config's URI, else ``$MLFLOW_TRACKING_URI``, else a SQLite store under artifact_root."""
    if config.tracking.tracking_uri:
        return config.tracking.tracking_uri
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    root = Path(config.artifact_root)
    root.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{root / 'mlflow.db'}"


def is_local_store(uri: str) -> bool:
    return uri.startswith(("sqlite:", "file:", "/"))


def ui_command(uri: str) -> str:
    return f"mlflow ui --backend-store-uri {uri}" if is_local_store(uri) else f"open {uri}"


def use_experiment(config: PipelineConfig) -> str:
    """Point MLflow at the pipeline's store and experiment; returns the experiment id."""
    uri = tracking_uri(config)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    experiment = mlflow.get_experiment_by_name(config.tracking.experiment)
    if experiment is None:
        # A local store keeps its artifacts beside the database, not in ./mlartifacts of the cwd.
        location = (Path(config.artifact_root) / "mlartifacts").resolve().as_uri() if is_local_store(uri) else None
        experiment_id = mlflow.create_experiment(config.tracking.experiment, artifact_location=location)
    else:
        experiment_id = experiment.experiment_id
    # Nested runs take the active experiment, not their parent's: make ours the active one.
    mlflow.set_experiment(experiment_id=experiment_id)
    return experiment_id


def flatten(value: Any, prefix: str = "") -> dict[str, str]:
    """``{"loss": {"gamma": 1}}`` -> ``{"loss.gamma": "1"}``; lists stay whole, as text."""
    if isinstance(value, dict):
        flat: dict[str, str] = {}
        for key, item in value.items():
            flat.update(flatten(item, f"{prefix}{key}."))
        return flat
    return {prefix.rstrip("."): str(value)[:6000]}


def log_config(config: PipelineConfig) -> None:
    """The resolved config as params (one per leaf) and as ``config.yaml``.

    Only the config is logged, never the environment, so tokens and keys cannot leak here.
    """
    mlflow.log_params(flatten(config.model_dump(mode="json")))
    mlflow.log_text(config.to_yaml(), "config.yaml")


class WorkerMetricLogger:
    """Logs metrics to an existing run from inside a Ray worker (rank 0 only)."""

    def __init__(self, uri: str | None, run_id: str | None):
        self._client = MlflowClient(uri) if uri and run_id else None
        self._run_id = run_id

    def log(self, metrics: dict[str, float], step: int) -> None:
        if self._client is None:
            return
        now = int(time.time() * 1000)
        self._client.log_batch(self._run_id, metrics=[Metric(key, float(value), now, step)
                                                      for key, value in metrics.items()])
