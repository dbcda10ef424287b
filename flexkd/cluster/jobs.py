"""Run a pipeline on a Ray cluster through the Ray Jobs API, and follow, stop or inspect it.

The job is ``python -m flexkd.cli run <pipeline> [--set ...]`` started in the uploaded working
directory (the project root), so the cluster runs the code and pipeline files of this checkout.
``python -m`` rather than the ``flexkd`` script: it works on nodes where flexkd is not installed,
as long as its dependencies are (a cluster image, or ``--runtime-env clusters/runtime_env/*.yaml``).

Submission ids are deterministic, so submitting the same thing twice never runs it twice.
The id is ``flexkd-<pipeline name>-<config fingerprint>``; the fingerprint hashes the resolved
config after ``--set`` overrides, teacher source, path and version included. A retry of a failed
attempt is ``<id>-r2``, ``<id>-r3``, ... On submit, the latest attempt decides:

    none                 submit ``<id>``
    PENDING or RUNNING   attach to it (with --wait, stream its logs)
    SUCCEEDED            say so and exit 0; nothing is resubmitted
    FAILED or STOPPED    submit the next attempt; it resumes from the stages already done,
                         because their artifacts sit on the shared artifact_root
"""

from __future__ import annotations

import asyncio
import os
import re
import shlex
import socket
import sys
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import aiohttp
import yaml
from ray.exceptions import AuthenticationError
from ray.job_submission import JobSubmissionClient
from ray.util.state import list_nodes
from ray.util.state.exception import RayStateApiException

from flexkd import console
from flexkd.cluster.storage import refuse_uri
from flexkd.config.schema import ConfigError, PipelineConfig, parse_yaml, yaml_problem
from flexkd.errors import StageError
from flexkd.tracking.runs import refuse_sqlite_on_multi_node

# Never uploaded: environments, outputs, caches and weights (models belong on shared storage).
WORKING_DIR_EXCLUDES = [
    ".git",
    ".venv",
    "venv",
    "runs",
    "mlruns",
    "mlartifacts",
    "__pycache__",
    ".pytest_cache",
    "*.egg-info",
    "*.pyc",
    "*.gguf",
    "*.safetensors",
    "*.bin",
    "*.pt",
    "*.distcp",
]
CONNECT_TIMEOUT_S = 5.0
POLL_INTERVAL_S = 2.0


class JobError(StageError):
    """A job could not be submitted, reached or finished; the message is one line."""


def submission_id(config: PipelineConfig) -> str:
    return f"flexkd-{config.name}-{config.fingerprint()}"


def parse_address(address: str) -> tuple[str, str, int]:
    """``--address`` as (URL, host, port; the dashboard's 8265 by default), or ConfigError."""
    url = address if "://" in address else f"http://{address}"
    try:
        parts = urlparse(url)
        port = parts.port or 8265
    except ValueError as error:  # a port out of range or not a number, a broken [IPv6] host
        raise ConfigError(f"--address {address}: {error}; expected http://HOST:PORT") from None
    if not parts.hostname:
        raise ConfigError(f"--address {address}: no host; expected http://HOST:PORT")
    return url, parts.hostname, port


def connect(address: str):
    """A JobSubmissionClient for the dashboard at ``address``, or JobError within seconds."""

    address, host, port = parse_address(address)
    try:  # Ray's own check has no timeout: an unroutable host would hang for minutes
        socket.create_connection((host, port), timeout=CONNECT_TIMEOUT_S).close()
    except OSError as error:
        raise JobError(f"cannot reach a Ray cluster at {address}: {error}") from None
    # Ray lets $RAY_ADDRESS override an explicit address; the address given here must win.
    os.environ["RAY_API_SERVER_ADDRESS"] = address
    try:
        return JobSubmissionClient(address)
    except AuthenticationError:
        raise JobError(
            f"the Ray cluster at {address} requires its auth token: export RAY_AUTH_MODE=token and "
            "RAY_AUTH_TOKEN=<token> (or put it in ~/.ray/auth_token)"
        ) from None
    except (ConnectionError, RuntimeError) as error:
        raise JobError(f"cannot reach a Ray cluster at {address}: {str(error).splitlines()[0]}") from None


def build_runtime_env(working_dir: Path, base: dict[str, Any] | None = None) -> dict[str, Any]:
    """``base`` (a runtime_env file: pip, env_vars, ...) plus the working directory to upload."""
    runtime_env = dict(base or {})
    if "working_dir" in runtime_env:
        raise ConfigError("runtime_env: working_dir is set by flexkd submit (--working-dir); remove it")
    runtime_env["working_dir"] = str(working_dir)
    runtime_env["excludes"] = [*runtime_env.get("excludes", []), *WORKING_DIR_EXCLUDES]
    # Unbuffered, so `--wait` shows the pipeline's progress as it happens; the warning filters of
    # flexkd.console, which the job's workers then have as the job's driver does.
    runtime_env["env_vars"] = {
        "PYTHONUNBUFFERED": "1",
        **console.worker_env_vars(),
        **runtime_env.get("env_vars", {}),
    }
    return runtime_env


def entrypoint(pipeline: Path, working_dir: Path, overrides: list[str]) -> str:
    relative = pipeline.resolve().relative_to(working_dir.resolve())
    words = ["python", "-m", "flexkd.cli", "run", relative.as_posix()]
    for pair in overrides:
        words += ["--set", pair]
    return shlex.join(words)


def check_submittable(config: PipelineConfig, pipeline: Path, working_dir: Path) -> None:
    """Refuse, before uploading anything, what could only fail or mislead on the cluster."""
    working_dir = working_dir.resolve()
    if not pipeline.resolve().is_relative_to(working_dir):
        raise ConfigError(f"{pipeline}: the pipeline file must be inside the working directory {working_dir}")
    refuse_uri(config.artifact_root)
    if Path(config.artifact_root).is_relative_to(working_dir):
        raise ConfigError(
            f"artifact_root {config.artifact_root} is inside the uploaded working directory, so on the cluster it "
            "would be a temporary copy on one node; point it at shared storage, e.g. --set artifact_root=/mnt/shared/flexkd"
        )


def job_tracking_uri(config: PipelineConfig, runtime_env: dict[str, Any] | None) -> str | None:
    """The tracking URI the job will use, as far as the submitter can tell: the config's, else the
    runtime_env's $MLFLOW_TRACKING_URI; None: neither (a SQLite file, unless the cluster's own
    environment names a server; the job checks again there)."""
    env_vars = (runtime_env or {}).get("env_vars") or {}
    return config.tracking.tracking_uri or env_vars.get("MLFLOW_TRACKING_URI")


def cluster_shape(address: str) -> tuple[int, float]:
    """The alive nodes of the cluster behind the dashboard at ``address`` and the CPUs its head
    offers (Ray's state API; the Jobs API does not say)."""
    address = address if "://" in address else f"http://{address}"
    try:
        nodes = list_nodes(address=address, filters=[("state", "=", "ALIVE")], raise_on_missing_output=False)
    except (RayStateApiException, ConnectionError) as error:
        raise JobError(f"cannot list the nodes of the Ray cluster at {address}: {str(error).splitlines()[0]}") from None
    head = next((node for node in nodes if node.is_head_node), None)
    return len(nodes), (head.resources_total.get("CPU", 0.0) if head else 0.0)


def submit(
    address: str,
    pipeline: Path,
    config: PipelineConfig,
    overrides: list[str],
    working_dir: Path,
    runtime_env: dict[str, Any] | None,
    wait: bool,
) -> int:
    """Submit, attach to, or report the pipeline's job by the rule in the module docstring."""
    check_submittable(config, pipeline, working_dir)
    client = connect(address)
    refuse_sqlite_on_multi_node(job_tracking_uri(config, runtime_env), *cluster_shape(address))
    base_id = submission_id(config)
    latest = latest_attempt(client, base_id)
    if latest is not None and latest.status.value in ("PENDING", "RUNNING"):
        job_id = latest.submission_id
        print(f"attaching to {latest.status.value} job {job_id}")
    elif latest is not None and latest.status.value == "SUCCEEDED":
        print(f"job {latest.submission_id} already SUCCEEDED; not resubmitted")
        return 0
    else:
        job_id = base_id if latest is None else f"{base_id}-r{_attempt_number(base_id, latest.submission_id) + 1}"
        try:
            client.submit_job(
                entrypoint=entrypoint(pipeline, working_dir, overrides),
                submission_id=job_id,
                runtime_env=build_runtime_env(working_dir, runtime_env),
                metadata={"flexkd.pipeline": config.name, "flexkd.fingerprint": config.fingerprint()},
            )
        except (RuntimeError, ValueError, TypeError) as error:  # a bad runtime_env, an upload refused
            raise JobError(f"could not submit job {job_id}: {str(error).strip().splitlines()[0]}") from None
        print(f"submitted job {job_id}")
    if not wait:
        print(f"follow it with: flexkd logs {job_id} --follow --address {address}")
        return 0
    return follow(client, job_id)


def _attempt_number(base_id: str, job_id: str) -> int:
    match = re.fullmatch(re.escape(base_id) + r"(?:-r(\d+))?", job_id)
    if match is None:
        return 0
    return int(match.group(1) or 1)


def latest_attempt(client, base_id: str):
    """The cluster's newest job among ``base_id``, ``base_id-r2``, ...; None if there is none."""
    attempts = [job for job in client.list_jobs() if job.submission_id and _attempt_number(base_id, job.submission_id)]
    return max(attempts, key=lambda job: _attempt_number(base_id, job.submission_id), default=None)


def follow(client, job_id: str) -> int:
    """Stream the job's logs until it ends; 0 if it SUCCEEDED, else JobError with its cause."""

    try:
        asyncio.run(_stream_logs(client, job_id))
    except KeyboardInterrupt:
        print(f"\ndetached; job {job_id} keeps running (flexkd stop {job_id} stops it)", file=sys.stderr)
        return 130
    except (RuntimeError, aiohttp.ClientError):
        pass  # the log stream dropped; the job itself goes on, so poll for its end instead
    status = client.get_job_status(job_id)
    while not status.is_terminal():
        time.sleep(POLL_INTERVAL_S)
        status = client.get_job_status(job_id)
    if status.value == "SUCCEEDED":
        print(f"job {job_id} SUCCEEDED")
        return 0
    raise JobError(f"job {job_id} {status.value}: {_failure_cause(client, job_id)}")


async def _stream_logs(client, job_id: str) -> None:
    async for chunk in client.tail_job_logs(job_id):
        print(chunk, end="", flush=True)


def _failure_cause(client, job_id: str) -> str:
    """The pipeline's own one-line error if it printed one, else Ray's message for the job."""
    lines = client.get_job_logs(job_id).splitlines()
    own = [line.removeprefix("flexkd: ") for line in lines if line.startswith("flexkd: ")]
    if own:
        return own[-1]
    message = client.get_job_info(job_id).message or "no message"
    return message.splitlines()[0]


def _job_or_error(client, job_id: str):
    try:
        return client.get_job_info(job_id)
    except RuntimeError:
        raise JobError(f"no job {job_id} on this cluster") from None


def status(address: str, job_id: str) -> int:
    """Print the job's status; exit 1 if it FAILED or was STOPPED, so scripts can test it."""
    info = _job_or_error(connect(address), job_id)
    message = (info.message or "").strip().splitlines()
    print(f"{job_id}: {info.status.value}" + (f" ({message[0]})" if message else ""))
    return 1 if info.status.value in ("FAILED", "STOPPED") else 0


def logs(address: str, job_id: str, follow_logs: bool) -> int:
    client = connect(address)
    _job_or_error(client, job_id)
    if follow_logs:
        return follow(client, job_id)
    print(client.get_job_logs(job_id), end="")
    return 0


def stop(address: str, job_id: str) -> int:
    client = connect(address)
    info = _job_or_error(client, job_id)
    if info.status.is_terminal():
        print(f"job {job_id} already {info.status.value}")
    else:
        client.stop_job(job_id)
        print(f"stop requested for job {job_id}")
    return 0


def load_runtime_env(path: str | None) -> dict[str, Any] | None:
    if path is None:
        return None
    try:
        text = Path(path).read_text(encoding="utf-8")
        loaded = parse_yaml(text)
    except yaml.YAMLError as error:
        raise ConfigError(f"--runtime-env {path}: not valid YAML: {yaml_problem(error, text)}") from None
    except (OSError, UnicodeDecodeError) as error:
        raise ConfigError(f"--runtime-env {path}: {str(error).splitlines()[0]}") from None
    if not isinstance(loaded, dict):
        raise ConfigError(f"--runtime-env {path}: expected a mapping of runtime_env fields")
    return loaded
