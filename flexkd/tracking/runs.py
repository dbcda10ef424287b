"""MLflow: where runs go, how the config is logged, and how a Ray worker logs metrics.

Only the driver and rank 0 of a Ray Train job write, and never at the same time (the driver
waits on the job), so the default SQLite store sees one writer at a time. That holds on one
machine only: on a multi-node cluster rank 0 runs on another node than the driver, and SQLite's
file locks are not reliable over NFS or a mounted bucket, so a multi-node cluster must log to an
MLflow server (:func:`refuse_sqlite_on_multi_node`).
"""

from __future__ import annotations

import os
import re
import socket
import time
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import mlflow
import ray
import yaml
from mlflow.entities import Metric
from mlflow.tracking import MlflowClient

from flexkd.config.schema import PipelineConfig
from flexkd.errors import StageError

REDACTED = "***"
CONNECT_TIMEOUT_S = 5.0
# A key names a secret when its last word is one of these (``hf_token``, ``db_password``), or it
# ends in an API/access/secret/private key; ``tokenizer`` and ``pad_token_id`` do not.
_SECRET_WORDS = {"password", "passwd", "secret", "token", "credential", "credentials", "apikey", "signature", "sig"}
_SECRET_KEY = re.compile(r"(?:^|[_\-.])(?:api|access|secret|private)[_\-]?key$", re.IGNORECASE)
_URL_WITH_USERINFO = re.compile(r"^[A-Za-z][A-Za-z0-9+.\-]*://[^/?#]*@")


class TrackingError(StageError):
    """The MLflow tracking server cannot be reached, or its artifact store cannot be written;
    the message is one line and shows no password."""


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


def refuse_sqlite_on_multi_node(uri: str | None, nodes: int, head_cpus: float) -> None:
    """Refuse, in one line, a SQLite tracking store on a multi-node Ray cluster.

    Multi-node: more than one alive node, or a head that offers no CPU (KubeRay's ``num-cpus:
    "0"``), whose stages therefore run on worker nodes even before the autoscaler has started
    them. ``uri`` None: none given, so the job falls back to a SQLite file under artifact_root.
    Pure, so it is tested without a cluster; :func:`cluster_shape` and
    ``flexkd.cluster.jobs.cluster_shape`` read the two numbers.
    """
    if uri is not None and not uri.startswith("sqlite:"):
        return
    if nodes > 1:
        where = f"a Ray cluster of {nodes} nodes"
    elif head_cpus == 0:
        where = "a Ray cluster whose head runs no work (the stages run on worker nodes)"
    else:
        return
    store = f"a SQLite store ({redact_value(uri)})" if uri else "no tracking URI (a SQLite file under artifact_root)"
    raise TrackingError(
        f"tracking: {store} on {where}: ranks on other nodes cannot share a SQLite file; set "
        "tracking.tracking_uri (or MLFLOW_TRACKING_URI) to an MLflow server, e.g. http://mlflow:5000"
    )


def cluster_shape() -> tuple[int, float]:
    """The connected Ray cluster's alive nodes and the CPUs its head offers to work."""
    alive = [node for node in ray.nodes() if node["Alive"]]
    head = next((node for node in alive if "node:__internal_head__" in node["Resources"]), None)
    return len(alive), (head["Resources"].get("CPU", 0.0) if head else 0.0)


def ui_command(uri: str) -> str:
    """How to look at the runs. ``--host 127.0.0.1`` is spelled out, though it is MLflow's
    default, so a copied command never serves the runs to the network."""
    if is_local_store(uri):
        return f"mlflow ui --backend-store-uri {uri} --host 127.0.0.1"
    return f"open {redact_value(uri)}"


def check_tracking_server(uri: str) -> None:
    """Refuse within seconds a tracking server that does not accept connections.

    MLflow's own client retries a refused connection with backoff for minutes before it gives
    up with a multi-line error; a TCP connect with a timeout answers at once.
    """
    parts = urlsplit(uri)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        socket.create_connection((parts.hostname, port), timeout=CONNECT_TIMEOUT_S).close()
    except OSError as error:
        reason = error.strerror or str(error) or type(error).__name__
        raise TrackingError(
            f"tracking: cannot reach the MLflow tracking server at {redact_value(uri)}: {reason}; "
            "start it, or fix tracking.tracking_uri / MLFLOW_TRACKING_URI"
        ) from None


def use_experiment(config: PipelineConfig) -> str:
    """Point MLflow at the pipeline's store and experiment; returns the experiment id.

    With Ray connected (as in ``flexkd run``, also inside a submitted job or a KubeRay RayJob),
    a SQLite store on a multi-node cluster is refused first.
    """
    uri = tracking_uri(config)
    if ray.is_initialized():
        refuse_sqlite_on_multi_node(uri, *cluster_shape())
    check_tracking_server(uri)
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


def is_secret_key(key: str) -> bool:
    words = re.split(r"[_\-.]", key.lower())
    return words[-1] in _SECRET_WORDS or bool(_SECRET_KEY.search(key))


def redact_value(text: str) -> str:
    """A URI without its password (``http://user:pw@host`` -> ``http://user:***@host``; a
    userinfo with no colon is taken to be a token and hidden whole) and without the values of
    secret-looking query parameters (``?token=``, ``X-Amz-Signature=``). Other text is returned
    unchanged."""
    if "://" not in text:
        return text
    try:
        parts = urlsplit(text)
    except ValueError:
        return text
    netloc = parts.netloc
    if _URL_WITH_USERINFO.match(text):
        userinfo, _, host = netloc.rpartition("@")
        user, colon, _ = userinfo.partition(":")
        netloc = f"{user}:{REDACTED}@{host}" if colon else f"{REDACTED}@{host}"
    query = parts.query
    if query:
        pairs = parse_qsl(query, keep_blank_values=True)
        if any(is_secret_key(name) for name, _ in pairs):
            query = urlencode([(name, REDACTED if is_secret_key(name) else value) for name, value in pairs], safe="*")
    if (netloc, query) == (parts.netloc, parts.query):
        return text  # rebuilding would change it (sqlite:////abs/path loses a slash)
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


def redact(value: Any, key: str = "") -> Any:
    """A copy of a JSON-like value with secrets masked: values under secret-looking keys, and
    passwords or tokens inside URIs (:func:`redact_value`)."""
    if isinstance(value, dict):
        return {name: redact(item, str(name)) for name, item in value.items()}
    if isinstance(value, list):
        return [redact(item, key) for item in value]
    if key and is_secret_key(key) and value not in (None, ""):
        return REDACTED
    return redact_value(value) if isinstance(value, str) else value


def public_config(config: PipelineConfig) -> dict[str, Any]:
    """The resolved config as it may be shown, logged or written next to artifacts."""
    return redact(config.model_dump(mode="json"))


def flatten(value: Any, prefix: str = "") -> dict[str, str]:
    """``{"loss": {"gamma": 1}}`` -> ``{"loss.gamma": "1"}``; lists stay whole, as text."""
    if isinstance(value, dict):
        flat: dict[str, str] = {}
        for key, item in value.items():
            flat.update(flatten(item, f"{prefix}{key}."))
        return flat
    return {prefix.rstrip("."): str(value)[:6000]}


def log_config(config: PipelineConfig) -> None:
    """The resolved config as params (one per leaf) and as ``config.yaml``, secrets masked.

    Only the config is logged, never the environment, so tokens and keys in environment
    variables cannot leak here; a password inside a config value (a tracking URI
    ``http://user:pw@host``) is masked by :func:`public_config`.
    """
    public = public_config(config)
    mlflow.log_params(flatten(public))
    try:
        mlflow.log_text(yaml.safe_dump(public, sort_keys=False), "config.yaml")
    except OSError as error:  # a full or read-only artifact store: say so in one line
        raise TrackingError(
            f"tracking: cannot write config.yaml to the MLflow artifact store "
            f"{redact_value(mlflow.get_artifact_uri())}: {error.strerror or error}"
        ) from None


class WorkerMetricLogger:
    """Logs metrics to an existing run from inside a Ray worker (rank 0 only)."""

    def __init__(self, uri: str | None, run_id: str | None):
        self._client = MlflowClient(uri) if uri and run_id else None
        self._run_id = run_id

    def log(self, metrics: dict[str, float], step: int) -> None:
        if self._client is None:
            return
        now = int(time.time() * 1000)
        self._client.log_batch(
            self._run_id, metrics=[Metric(key, float(value), now, step) for key, value in metrics.items()]
        )
