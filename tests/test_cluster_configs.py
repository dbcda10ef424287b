"""Every file in clusters/ parses and carries what Ray's cluster launcher, KubeRay and Ray's
runtime_env require. Launcher files go through Ray's own prepare_config/validate_config, the
same schema check `ray up` runs; KubeRay manifests are checked against the fields the RayCluster
and RayJob CRDs (ray.io/v1) mark required; runtime envs are validated by ray.runtime_env.RuntimeEnv.
"""

from __future__ import annotations

import re
import shlex
import subprocess
import tomllib
from pathlib import Path

import pytest
import yaml
from ray.scripts.scripts import start

from flexkd.cli import build_parser
from flexkd.config.schema import load_config

REPO_ROOT = Path(__file__).resolve().parents[1]
CLUSTERS = REPO_ROOT / "clusters"
SHARED_MOUNT = "/mnt/shared"


def _files(folder: str, pattern: str) -> list[Path]:
    return sorted((CLUSTERS / folder).glob(pattern))


def _project_requirements() -> list[str]:
    dependencies = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    return [requirement for requirement in dependencies if not requirement.startswith("ray")]


def test_every_file_in_clusters_is_checked_here():
    checked = {
        *_files("vm", "*.yaml"),
        *_files("kuberay", "*.yaml"),
        *_files("runtime_env", "*.yaml"),
        *_files("local", "*.sh"),
        *_files("schedule", "*"),
        CLUSTERS / "README.md",
    }
    assert {path for path in CLUSTERS.rglob("*") if path.is_file()} == checked
    assert len(_files("vm", "*.yaml")) >= 2 and len(_files("kuberay", "*.yaml")) >= 3


# ---- clusters/vm: the Ray cluster launcher -----------------------------------------------------


@pytest.mark.parametrize("path", _files("vm", "*.yaml"), ids=lambda path: path.name)
def test_launcher_config_passes_rays_own_validation(path):
    from ray.autoscaler._private.util import prepare_config, validate_config

    raw = yaml.safe_load(path.read_text())
    assert raw["cluster_name"] and raw["provider"]["type"] in ("aws", "local")
    prepared = prepare_config(raw)
    validate_config(prepared)  # jsonschema: ray/autoscaler/ray-schema.json
    assert prepared["head_node_type"] in prepared["available_node_types"]

    head_start = " ; ".join(prepared["head_start_ray_commands"])
    worker_start = " ; ".join(prepared["worker_start_ray_commands"])
    assert "ray start --head" in head_start and "--dashboard-host=127.0.0.1" in head_start
    assert "ray start --address=$RAY_HEAD_IP:6379" in worker_start
    setup = " ; ".join(prepared["setup_commands"])
    assert "mount" in setup and SHARED_MOUNT in setup  # artifact_root lives on storage every node mounts
    assert "-e ~/flexkd" in setup and prepared["file_mounts"]["~/flexkd"] == "."


def test_aws_config_has_cpu_and_gpu_worker_types():
    node_types = yaml.safe_load((CLUSTERS / "vm" / "aws.yaml").read_text())["available_node_types"]
    instance_types = {name: spec["node_config"]["InstanceType"] for name, spec in node_types.items()}
    assert instance_types["gpu_worker"].startswith(("g", "p")) and instance_types["cpu_worker"].startswith(("m", "c"))


# ---- clusters/kuberay: RayCluster and RayJob ---------------------------------------------------


def _kuberay_documents() -> dict[str, dict]:
    documents = {}
    for path in _files("kuberay", "*.yaml"):
        for document in yaml.safe_load_all(path.read_text()):
            documents[document["kind"]] = document
    return documents


def _pod_specs(cluster_spec: dict) -> list[dict]:
    return [
        cluster_spec["headGroupSpec"]["template"]["spec"],
        *(group["template"]["spec"] for group in cluster_spec["workerGroupSpecs"]),
    ]


def _check_ray_cluster_spec(spec: dict) -> None:
    head = spec["headGroupSpec"]
    groups = spec["workerGroupSpecs"]
    for group in [head, *groups]:  # KubeRay: map[string]string, so every value must be quoted text
        assert all(isinstance(value, str) for value in group["rayStartParams"].values())
    assert len({group["groupName"] for group in groups}) == len(groups)
    for group in groups:
        assert all(isinstance(group[key], int) for key in ("replicas", "minReplicas", "maxReplicas"))
        assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
    python_tags = set()
    for pod in _pod_specs(spec):
        container = pod["containers"][0]
        # Pinned: Ray's version, a Python and, on a GPU, a CUDA version; never a floating alias.
        image = re.fullmatch(
            rf"rayproject/ray(-llm)?:{re.escape(spec['rayVersion'])}-(py3\d+)-(cpu|cu\d+)", container["image"]
        )
        assert container["name"] and image, container["image"]
        python_tags.add(image.group(2))
        claims = {volume["name"]: volume.get("persistentVolumeClaim", {}).get("claimName") for volume in pod["volumes"]}
        mounts = {mount["mountPath"]: mount["name"] for mount in container["volumeMounts"]}
        assert claims[mounts[SHARED_MOUNT]] == "flexkd-shared"
    assert len(python_tags) == 1, f"Ray needs one Python version on every node, got {sorted(python_tags)}"
    gpu_groups = _gpu_groups(spec)
    assert gpu_groups and len(gpu_groups) < len(groups), "want a CPU and a GPU worker group"
    # The GPU image carries CUDA and torch, so a job's runtime_env never reinstalls torch.
    assert all(_container(group)["image"].startswith("rayproject/ray-llm:") for group in gpu_groups)


def _container(group: dict) -> dict:
    return group["template"]["spec"]["containers"][0]


def _gpu_groups(cluster_spec: dict) -> list[dict]:
    return [
        group
        for group in cluster_spec["workerGroupSpecs"]
        if "nvidia.com/gpu" in _container(group)["resources"]["limits"]
    ]


def _mlflow_service_uri() -> str:
    """The in-cluster address of clusters/kuberay/mlflow.yaml's server, checked to be what it serves."""
    from mlflow.cli import server

    documents = _kuberay_documents()
    service, deployment = documents["Service"], documents["Deployment"]
    [port] = service["spec"]["ports"]
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    assert service["spec"]["selector"].items() <= deployment["spec"]["template"]["metadata"]["labels"].items()
    assert container["ports"][0]["containerPort"] == port["targetPort"]
    # The server command, parsed by the installed MLflow's own CLI (a renamed option fails here).
    shell = container["command"][2]
    options = server.make_context("server", shlex.split(shell.split("exec mlflow server", 1)[1])).params
    assert options["port"] == port["targetPort"] and options["backend_store_uri"].startswith(
        f"sqlite:///{SHARED_MOUNT}/"
    )
    assert options["serve_artifacts"] and options["artifacts_destination"].startswith(SHARED_MOUNT)
    uri = f"{service['metadata']['name']}:{port['port']}"
    assert uri in options["allowed_hosts"].split(","), "the server must answer the Host header its clients send"
    return f"http://{uri}"


def test_kuberay_manifests_have_the_kinds_and_versions_kuberay_serves():
    documents = _kuberay_documents()
    assert set(documents) == {"RayCluster", "RayJob", "PersistentVolumeClaim", "Deployment", "Service"}
    assert documents["RayCluster"]["apiVersion"] == documents["RayJob"]["apiVersion"] == "ray.io/v1"
    claim = documents["PersistentVolumeClaim"]
    assert claim["apiVersion"] == "v1" and claim["metadata"]["name"] == "flexkd-shared"
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]  # every pod writes the same artifacts


def test_raycluster_has_head_cpu_and_gpu_groups_on_shared_storage():
    _check_ray_cluster_spec(_kuberay_documents()["RayCluster"]["spec"])


def test_rayjob_runs_a_valid_flexkd_pipeline_on_its_own_cluster():
    from ray.runtime_env import RuntimeEnv

    spec = _kuberay_documents()["RayJob"]["spec"]
    _check_ray_cluster_spec(spec["rayClusterSpec"])
    assert spec["submissionMode"] in ("K8sJobMode", "HTTPMode")
    assert spec["shutdownAfterJobFinishes"] is True and isinstance(spec["ttlSecondsAfterFinished"], int)

    words = shlex.split(spec["entrypoint"])
    assert words[:4] == ["python", "-m", "flexkd.cli", "run"]
    args = build_parser().parse_args(words[3:])
    overrides = dict(pair.split("=", 1) for pair in args.set)
    config = load_config(REPO_ROOT / args.pipeline, {key: yaml.safe_load(value) for key, value in overrides.items()})
    assert config.artifact_root.startswith(SHARED_MOUNT) and config.resources.use_gpu
    gpu_workers = sum(group["replicas"] for group in _gpu_groups(spec["rayClusterSpec"]))
    assert config.resources.num_workers <= gpu_workers
    # A cluster of several pods logs to the MLflow server; flexkd would refuse SQLite there.
    assert config.tracking.tracking_uri == _mlflow_service_uri()

    runtime_env = yaml.safe_load(spec["runtimeEnvYAML"])
    RuntimeEnv(**runtime_env)
    assert re.fullmatch(r"https://\S+\.zip", runtime_env["working_dir"])  # no laptop: the code comes from a URL
    assert runtime_env["pip"]["packages"] == _project_requirements()


# ---- clusters/runtime_env -----------------------------------------------------------------------


@pytest.mark.parametrize("path", _files("runtime_env", "*.yaml"), ids=lambda path: path.name)
def test_runtime_env_is_valid_and_installs_the_projects_requirements(path):
    from ray.runtime_env import RuntimeEnv

    runtime_env = yaml.safe_load(path.read_text())
    RuntimeEnv(**runtime_env)
    assert "working_dir" not in runtime_env  # flexkd submit sets it
    assert runtime_env["pip"]["packages"] == _project_requirements()


def _commented_command(path: Path, program: str) -> list[str]:
    """The words of the ``program ...`` command shown in a file's header comment (with ``\\``
    continuation lines), as a user would paste it."""
    lines = [line.removeprefix("#").strip() for line in path.read_text().splitlines() if line.startswith("#")]
    start = next(index for index, line in enumerate(lines) if line.startswith(program))
    command = []
    for line in lines[start:]:
        command.append(line.removesuffix("\\").strip())
        if not line.endswith("\\"):
            break
    return shlex.split(" ".join(command))


def test_the_gpu_runtime_env_command_fills_the_rayclusters_gpu_group():
    """The documented GPU submit asks for as many FSDP ranks as the RayCluster's GPU group has GPUs."""
    words = _commented_command(CLUSTERS / "runtime_env" / "gpu.yaml", "flexkd submit")
    args = build_parser().parse_args(words[1:])
    assert args.runtime_env == "clusters/runtime_env/gpu.yaml"
    overrides = {key: yaml.safe_load(value) for key, value in (pair.split("=", 1) for pair in args.set)}
    config = load_config(REPO_ROOT / args.pipeline, overrides)
    assert config.resources.use_gpu and config.tracking.tracking_uri == _mlflow_service_uri()
    [gpu_group] = _gpu_groups(_kuberay_documents()["RayCluster"]["spec"])
    gpus = gpu_group["maxReplicas"] * int(_container(gpu_group)["resources"]["limits"]["nvidia.com/gpu"])
    assert config.resources.num_workers == gpus, (
        f"gpu.yaml's command asks for {config.resources.num_workers} GPU workers, "
        f"raycluster.yaml's GPU group holds {gpus} GPUs"
    )


def test_cpu_runtime_env_takes_the_cpu_build_of_torch():
    options = yaml.safe_load((CLUSTERS / "runtime_env" / "cpu.yaml").read_text())["pip"]["pip_install_options"]
    assert "https://download.pytorch.org/whl/cpu" in options


# ---- clusters/schedule: flexkd watch from cron, systemd and Kubernetes ----------------------------


def _check_watch_command(words: list[str]) -> None:
    """A `flexkd watch --once` of a shipped pipeline that has a watch section."""
    args = build_parser().parse_args(words)
    assert args.command == "watch" and args.once
    overrides = dict(pair.split("=", 1) for pair in args.set)
    config = load_config(REPO_ROOT / args.pipeline, {key: yaml.safe_load(value) for key, value in overrides.items()})
    assert config.watch is not None and config.teacher.source == "mlflow"


def test_cron_line_polls_once_under_a_lock():
    [line] = [
        line
        for line in (CLUSTERS / "schedule" / "crontab").read_text().splitlines()
        if line.strip() and not line.startswith("#") and "=" not in line.split()[0]
    ]
    fields = line.split(None, 5)
    assert len(fields) == 6 and all(re.fullmatch(r"[\d*/,-]+", field) for field in fields[:5])
    command = shlex.split(fields[5].split(">>")[0])
    assert "flock" in command and "-n" in command
    _check_watch_command(command[command.index("watch") :])


def test_systemd_timer_starts_a_oneshot_watch():
    import configparser

    units = {}
    for name in ("flexkd-watch@.service", "flexkd-watch@.timer"):
        units[name] = configparser.ConfigParser(strict=False, interpolation=None)
        units[name].optionxform = str  # systemd keys are case-sensitive
        units[name].read_string((CLUSTERS / "schedule" / name).read_text())
    service, timer = units["flexkd-watch@.service"], units["flexkd-watch@.timer"]
    assert service["Service"]["Type"] == "oneshot"
    assert timer["Timer"]["OnCalendar"] and timer["Install"]["WantedBy"] == "timers.target"
    command = shlex.split(service["Service"]["ExecStart"].replace("%i", "sst2_watch"))
    _check_watch_command(command[1:])


def test_kubernetes_cronjob_submits_each_release_to_the_raycluster():
    job = yaml.safe_load((CLUSTERS / "schedule" / "cronjob.yaml").read_text())
    assert (job["apiVersion"], job["kind"]) == ("batch/v1", "CronJob")
    assert len(job["spec"]["schedule"].split()) == 5 and job["spec"]["concurrencyPolicy"] == "Forbid"
    pod = job["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    assert pod["restartPolicy"] == "Never"
    command = pod["containers"][0]["command"]
    assert command[:3] == ["python", "-m", "flexkd.cli"]
    _check_watch_command(command[3:])
    args = build_parser().parse_args(command[3:])
    head_service = _kuberay_documents()["RayCluster"]["metadata"]["name"] + "-head-svc"
    assert args.address == f"http://{head_service}:8265"
    overrides = dict(pair.split("=", 1) for pair in args.set)
    assert overrides["artifact_root"].startswith(SHARED_MOUNT)  # what the cluster's stages share
    claims = {volume["persistentVolumeClaim"]["claimName"] for volume in pod["volumes"]}
    assert claims == {"flexkd-shared"}


# ---- clusters/local and the README --------------------------------------------------------------


@pytest.mark.parametrize("path", _files("local", "*.sh"), ids=lambda path: path.name)
def test_local_scripts_parse(path):
    assert subprocess.run(["bash", "-n", str(path)], capture_output=True).returncode == 0
    if path.name.startswith(("start-", "stop")):
        assert path.stat().st_mode & 0o111, f"{path.name} is not executable"
        assert 'source "$(dirname "$0")/env.sh"' in path.read_text()


def test_readme_names_only_files_that_exist():
    text = (CLUSTERS / "README.md").read_text()
    named = set(re.findall(r"(?<![\w/])(clusters/[\w./-]+\.(?:yaml|sh|md))", text))
    assert named, "the README should point at the files it explains"
    assert [name for name in sorted(named) if not (REPO_ROOT / name).is_file()] == []


def _local_defaults() -> dict[str, int]:
    """The ports clusters/local/env.sh uses when nothing overrides them."""
    pattern = re.compile(r"^(\w+_PORT)=\$\{\1:-(\d+)\}", re.MULTILINE)
    return {name: int(port) for name, port in pattern.findall((CLUSTERS / "local" / "env.sh").read_text())}


def test_local_cluster_default_ports_stay_out_of_rays_own_ranges():
    """`ray start` refuses a port inside its worker-port range (10002-19999 by default), the
    failure the documented local cluster once hit; the defaults are read from the installed Ray."""

    options = {option.name: option.default for option in start.params}
    worker_ports = range(options["min_worker_port"], options["max_worker_port"] + 1)
    defaults = _local_defaults()
    assert {"RAY_PORT", "DASHBOARD_PORT", "CLIENT_PORT", "HEAD_AGENT_PORT", "WORKER_AGENT_PORT"} <= set(defaults)
    ray_ports = {name: port for name, port in defaults.items() if name != "MLFLOW_PORT"}
    assert [name for name, port in ray_ports.items() if port in worker_ports] == []
    assert len(set(defaults.values())) == len(defaults), defaults  # no two services on one port
