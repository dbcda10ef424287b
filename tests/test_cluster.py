"""flexkd submit/status/logs/stop and the storage check, against a real Ray cluster on 127.0.0.1.

The cluster is what a user starts: clusters/local/start-head.sh and start-worker.sh (one CPU per
node), stopped with clusters/local/stop.sh, which ends only the processes these scripts started.
Every node and client uses its own token and ports, so other Ray instances on the machine are
neither reached nor stopped.
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from flexkd import cli
from flexkd.cluster import jobs
from flexkd.cluster.jobs import build_runtime_env, check_submittable, entrypoint, submission_id
from flexkd.cluster.storage import StorageError, refuse_uri
from flexkd.config.schema import ConfigError, load_config
from flexkd.tracking import runs
from flexkd.tracking.runs import TrackingError, refuse_sqlite_on_multi_node

REPO_ROOT = Path(__file__).resolve().parents[1]
LOCAL = REPO_ROOT / "clusters" / "local"
DEBUG = REPO_ROOT / "pipelines" / "debug.yaml"
JOB_TIMEOUT_S = 600


def _free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    for sock in sockets:
        sock.bind(("127.0.0.1", 0))
    ports = [sock.getsockname()[1] for sock in sockets]
    for sock in sockets:
        sock.close()
    return ports


def _flexkd(env: dict[str, str], *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "flexkd.cli", *args],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _last_line(result: subprocess.CompletedProcess) -> str:
    return result.stderr.strip().splitlines()[-1]


# ---- without a cluster -------------------------------------------------------------------------


def test_submission_id_is_deterministic_and_follows_the_config(tmp_path):
    shared = {"artifact_root": str(tmp_path / "runs")}
    first, second = load_config(DEBUG, shared), load_config(DEBUG, shared)
    assert submission_id(first) == submission_id(second) == f"flexkd-debug-{first.fingerprint()}"
    assert submission_id(load_config(DEBUG, {**shared, "teacher.version": "7"})) != submission_id(first)


def test_runtime_env_uploads_the_project_without_outputs_or_environments():
    runtime_env = build_runtime_env(REPO_ROOT, {"pip": ["rouge-score"], "env_vars": {"A": "1"}})
    assert runtime_env["working_dir"] == str(REPO_ROOT)
    assert {".venv", "runs", ".git", "*.safetensors"} <= set(runtime_env["excludes"])
    assert runtime_env["pip"] == ["rouge-score"] and runtime_env["env_vars"]["A"] == "1"
    with pytest.raises(ConfigError, match="working_dir"):
        build_runtime_env(REPO_ROOT, {"working_dir": "s3://bucket/code.zip"})


def test_entrypoint_runs_the_pipeline_relative_to_the_working_dir():
    command = entrypoint(DEBUG, REPO_ROOT, ["name=a b", "loss.gamma=0.5"])
    assert command == "python -m flexkd.cli run pipelines/debug.yaml --set 'name=a b' --set loss.gamma=0.5"


def test_submit_refuses_storage_that_cannot_be_shared(tmp_path):
    inside = load_config(DEBUG)  # artifact_root ../runs lands inside the uploaded project
    with pytest.raises(ConfigError, match="inside the uploaded working directory"):
        check_submittable(inside, DEBUG, REPO_ROOT)
    with pytest.raises(StorageError, match="mount the bucket"):
        refuse_uri("s3://bucket/flexkd")
    check_submittable(load_config(DEBUG, {"artifact_root": str(tmp_path)}), DEBUG, REPO_ROOT)


def test_a_sqlite_store_is_refused_on_a_multi_node_cluster_only():
    refuse_sqlite_on_multi_node("sqlite:////shared/mlflow.db", nodes=1, head_cpus=4.0)  # one machine: fine
    refuse_sqlite_on_multi_node("http://mlflow:5000", nodes=8, head_cpus=0.0)  # a server: fine
    refuse_sqlite_on_multi_node(None, nodes=1, head_cpus=2.0)
    with pytest.raises(
        TrackingError, match=r"^tracking: a SQLite store \(sqlite:////shared/mlflow.db\) on a Ray cluster of 3 nodes: "
    ):
        refuse_sqlite_on_multi_node("sqlite:////shared/mlflow.db", nodes=3, head_cpus=4.0)
    # KubeRay's head offers no CPU: the stages run on worker nodes, even before any has started.
    with pytest.raises(TrackingError, match="no tracking URI .* whose head runs no work"):
        refuse_sqlite_on_multi_node(None, nodes=1, head_cpus=0.0)


class _NoSubmissions:
    def submit_job(self, **_):
        pytest.fail("a job was submitted")


def test_submit_refuses_sqlite_on_a_multi_node_cluster_in_one_line(monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(jobs, "connect", lambda address: _NoSubmissions())
    monkeypatch.setattr(jobs, "cluster_shape", lambda address: (2, 1.0))
    submit = ["submit", str(DEBUG), "--address", "http://head:8265", "--set", f"artifact_root={tmp_path}"]
    assert cli.main(submit) == 1
    [line] = capsys.readouterr().err.strip().splitlines()
    assert line.startswith(
        "flexkd: tracking: no tracking URI (a SQLite file under artifact_root) on a Ray cluster of 2 nodes"
    )
    assert cli.main([*submit, "--set", f"tracking.tracking_uri=sqlite:///{tmp_path}/mlflow.db"]) == 1
    assert "a SQLite store" in capsys.readouterr().err
    # A server named by the runtime_env's environment passes the check (and reaches the fake client).
    assert jobs.job_tracking_uri(load_config(DEBUG), {"env_vars": {"MLFLOW_TRACKING_URI": "http://m:5000"}}) == (
        "http://m:5000"
    )


def test_a_job_refuses_sqlite_when_its_ray_spans_several_nodes(monkeypatch, tmp_path):
    """Inside the job (a RayJob runs `flexkd run` on the cluster) the store is checked again."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setattr(runs.ray, "is_initialized", lambda: True)
    monkeypatch.setattr(runs, "cluster_shape", lambda: (4, 0.0))
    with pytest.raises(TrackingError, match="on a Ray cluster of 4 nodes"):
        runs.use_experiment(load_config(DEBUG, {"artifact_root": str(tmp_path)}))


def test_unreachable_address_fails_fast_with_one_line(tmp_path):
    started = time.monotonic()
    result = _flexkd(
        dict(os.environ),
        "submit",
        str(DEBUG),
        "--address",
        "http://127.0.0.1:9",
        "--set",
        f"artifact_root={tmp_path}",
        "--wait",
    )
    assert result.returncode == 1
    assert _last_line(result).startswith("flexkd: cannot reach a Ray cluster at http://127.0.0.1:9: ")
    assert "Traceback" not in result.stderr
    assert time.monotonic() - started < 60  # mostly Python start-up; no connection retries


# ---- against a two-node cluster ----------------------------------------------------------------


@dataclass
class LocalCluster:
    address: str
    gcs_address: str
    env: dict[str, str]
    shared: Path  # artifact_root: the same directory for every node, as on an NFS mount
    mlflow: str  # the MLflow server every node logs to (a multi-node cluster refuses SQLite)


def _script(name: str, env: dict[str, str], *args: str) -> None:
    result = subprocess.run([str(LOCAL / name), *args], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"{name}: {result.stdout}{result.stderr}"


@pytest.fixture(scope="module")
def cluster():
    base = Path(tempfile.mkdtemp(prefix="fkd-", dir="/tmp"))  # short: Ray's socket paths must fit 107 bytes
    ray_port, dashboard, client, head_agent, worker_agent, mlflow_port = _free_ports(6)
    env = {
        key: value
        for key, value in os.environ.items()
        if key not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", "MLFLOW_TRACKING_URI", "RAY_AUTH_TOKEN_PATH")
    }
    env.update(
        FLEXKD_CLUSTER_DIR=str(base / "nodes"),
        RAY_PORT=str(ray_port),
        DASHBOARD_PORT=str(dashboard),
        CLIENT_PORT=str(client),
        HEAD_AGENT_PORT=str(head_agent),
        WORKER_AGENT_PORT=str(worker_agent),
        MLFLOW_PORT=str(mlflow_port),
        NUM_CPUS="1",
        RAY_AUTH_MODE="token",
        RAY_AUTH_TOKEN=secrets.token_hex(32),
        PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
    )
    try:
        _script("start-head.sh", env)
        _script("start-worker.sh", env, "worker1")
        _script("start-mlflow.sh", env)
        yield LocalCluster(
            f"http://127.0.0.1:{dashboard}",
            f"127.0.0.1:{ray_port}",
            env,
            base / "shared",
            f"http://127.0.0.1:{mlflow_port}",
        )
    finally:
        subprocess.run([str(LOCAL / "stop.sh")], env=env, capture_output=True, timeout=120)
        shutil.rmtree(base, ignore_errors=True)


@pytest.mark.slow
def test_submit_attaches_succeeds_and_never_runs_twice(cluster):
    submit = [
        "submit",
        str(DEBUG),
        "--address",
        cluster.address,
        "--set",
        f"artifact_root={cluster.shared}/runs",
        "--set",
        f"tracking.tracking_uri={cluster.mlflow}",
    ]
    first = _flexkd(cluster.env, *submit)
    assert first.returncode == 0, first.stderr
    job_id = re.search(r"submitted job (\S+)", first.stdout).group(1)
    assert re.fullmatch(r"flexkd-debug-[0-9a-f]{16}", job_id)

    attached = _flexkd(cluster.env, *submit, "--wait", timeout=JOB_TIMEOUT_S)
    assert attached.returncode == 0, attached.stdout[-3000:] + attached.stderr[-3000:]
    assert re.search(rf"attaching to (RUNNING|PENDING) job {job_id}\n", attached.stdout)
    assert "the same storage on all 2 nodes" in attached.stdout  # the storage check ran on both nodes
    assert f"job {job_id} SUCCEEDED" in attached.stdout

    again = _flexkd(cluster.env, *submit, "--wait")
    assert again.returncode == 0 and f"job {job_id} already SUCCEEDED; not resubmitted" in again.stdout
    logs = _flexkd(cluster.env, "logs", job_id, "--address", cluster.address)
    assert "| register | ran |" in logs.stdout

    from mlflow.tracking import MlflowClient

    client = MlflowClient(cluster.mlflow)
    experiment = client.get_experiment_by_name("flexkd")
    runs = client.search_runs([experiment.experiment_id])
    parents = [run for run in runs if "mlflow.parentRunId" not in run.data.tags]
    assert len(parents) == 1 and parents[0].data.tags["flexkd.pipeline"] == "debug"
    stages = [run.data.tags.get("flexkd.stage") for run in runs if run not in parents]
    assert {"tokenize", "score", "distill", "evaluate", "register"} <= set(stages)
    assert len(stages) == len(set(stages))  # each stage ran once


@pytest.mark.slow
def test_failed_job_ends_with_one_line_and_a_retry_is_a_new_attempt(cluster):
    # k above the student's width passes the schema (checked at submit) but not preflight (on the cluster).
    submit = [
        "submit",
        str(DEBUG),
        "--address",
        cluster.address,
        "--set",
        f"artifact_root={cluster.shared}/runs",
        "--set",
        f"tracking.tracking_uri={cluster.mlflow}",
        "--set",
        "selection.k=1000",
    ]
    failed = _flexkd(cluster.env, *submit, "--wait", timeout=JOB_TIMEOUT_S)
    assert failed.returncode == 1
    match = re.fullmatch(
        r"flexkd: job (flexkd-debug-[0-9a-f]{16}) FAILED: config error: selection\.k = 1000 .*", _last_line(failed)
    )
    assert match, failed.stderr[-2000:]

    retry = _flexkd(cluster.env, *submit)
    retry_id = f"{match.group(1)}-r2"
    assert f"submitted job {retry_id}" in retry.stdout
    stop = _flexkd(cluster.env, "stop", retry_id, "--address", cluster.address)
    # Usually stopped while it starts; it may also have failed on its own first.
    assert stop.returncode == 0 and (
        f"stop requested for job {retry_id}" in stop.stdout or "already FAILED" in stop.stdout
    )
    deadline = time.monotonic() + 120
    while (status := _flexkd(cluster.env, "status", retry_id, "--address", cluster.address)).returncode == 0:
        assert time.monotonic() < deadline, status.stdout
        time.sleep(2)
    assert re.match(rf"{retry_id}: (STOPPED|FAILED)", status.stdout)


def _can_unshare_mounts() -> bool:
    command = ["unshare", "--mount", "--propagation", "private"] + ([] if os.geteuid() == 0 else ["--map-root-user"])
    try:
        return subprocess.run([*command, "true"], capture_output=True, timeout=10).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


@pytest.mark.slow
@pytest.mark.skipif(not _can_unshare_mounts(), reason="needs unshare --mount for a node with its own filesystem view")
def test_node_local_artifact_root_is_refused(cluster):
    # A third node sees an empty tmpfs where the others see the shared directory: the same path,
    # different storage, as when artifact_root is a local disk on each machine of a real cluster.
    cluster.shared.mkdir(parents=True, exist_ok=True)
    blind_env = {
        **cluster.env,
        "FLEXKD_CLUSTER_DIR": str(cluster.shared.parent / "blind"),
        "WORKER_AGENT_PORT": str(_free_ports(1)[0]),
    }
    unshare = ["unshare", "--mount", "--propagation", "private"] + ([] if os.geteuid() == 0 else ["--map-root-user"])
    mount_then_start = 'mount -t tmpfs tmpfs "$0" && exec "$1" blind'
    started = subprocess.run(
        [*unshare, "sh", "-c", mount_then_start, str(cluster.shared), str(LOCAL / "start-worker.sh")],
        env=blind_env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    try:
        assert started.returncode == 0, started.stdout + started.stderr
        result = _flexkd(
            {**cluster.env, "RAY_ADDRESS": cluster.gcs_address},
            "run",
            str(DEBUG),
            "--set",
            f"artifact_root={cluster.shared}/runs",
            timeout=300,
        )
        assert result.returncode == 1
        assert re.fullmatch(
            rf"flexkd: artifact_root {cluster.shared}/runs is node-local: 1 of 3 nodes cannot see it .*",
            _last_line(result),
        ), result.stderr[-2000:]
    finally:
        subprocess.run([str(LOCAL / "stop.sh")], env=blind_env, capture_output=True, timeout=120)
