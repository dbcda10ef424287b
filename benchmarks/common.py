"""What every benchmark shares: where it works, the machine it ran on and how loaded that was,
and how its results are written (JSON of raw numbers, a markdown table, a PNG plot, MLflow)."""

from __future__ import annotations

import json
import os
import platform
import re
import shlex
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
DEFAULT_WORK_DIR = REPO / "runs" / "bench"
SHARED_DATA = REPO.parent / "shared" / "data"


def command_line() -> str:
    """The command as the user typed it (``flexkd bench ...``), to print next to its numbers."""
    arguments = sys.argv[1:]
    if arguments and arguments[0] == "bench":
        return "flexkd " + shlex.join(arguments)
    return shlex.join(["flexkd", *arguments]) if arguments else "flexkd bench"


def machine() -> dict[str, Any]:
    """The machine the numbers came from."""
    import torch

    info = {
        "host": platform.node(),
        "cpus": os.cpu_count(),
        "cpu_model": _cpu_model(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "git_commit": _git("rev-parse", "--short", "HEAD"),
        "git_dirty": bool(_git("status", "--porcelain")),
    }
    try:
        import transformers

        info["transformers"] = transformers.__version__
    except ImportError:
        pass
    return info


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _git(*arguments: str) -> str:
    try:
        return subprocess.run(["git", *arguments], cwd=REPO, capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


class LoadMonitor:
    """Samples the machine's 1-minute load average every ``interval`` seconds while a benchmark
    runs: other processes share the cores, and the numbers are only as good as that load."""

    def __init__(self, interval: float = 15.0):
        self.interval, self.samples = interval, []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def __enter__(self) -> LoadMonitor:
        self.started = time.time()
        self._thread.start()
        return self

    def __exit__(self, *_) -> None:
        self._stop.set()
        self._thread.join()

    def _sample(self) -> None:
        while True:
            self.samples.append(os.getloadavg()[0])
            if self._stop.wait(self.interval):
                return

    def summary(self) -> dict[str, Any]:
        samples = self.samples or [os.getloadavg()[0]]
        return {
            "cpus": os.cpu_count(),
            "load1_mean": round(sum(samples) / len(samples), 2),
            "load1_max": round(max(samples), 2),
            "load1_min": round(min(samples), 2),
            "samples": len(samples),
            "seconds": round(time.time() - self.started, 1),
        }


def load_sentence(load: dict[str, Any]) -> str:
    return (
        f"machine load while it ran (1-min load average on {load['cpus']} CPUs, sampled every 15 s): "
        f"mean {load['load1_mean']}, min {load['load1_min']}, max {load['load1_max']} over {load['seconds']:.0f} s; "
        f"a load above {load['cpus']} means other processes were competing for the cores"
    )


def provenance_lines(results: dict[str, Any]) -> list[str]:
    """A section's command, finish time, wall time, machine, commit and load, as page lines."""
    machine = results["machine"]
    return [
        f"Command: `{results['command']}` (finished {results['finished_at']}, wall time "
        f"{results['wall_seconds'] / 60:.1f} min)",
        "",
        f"Machine: {machine['cpus']} CPUs ({machine['cpu_model']}), GPU: {machine['gpu']}, commit "
        f"{machine['git_commit']}. {load_sentence(results['load']).capitalize()}.",
        "",
    ]


def metric_name(key: str) -> str:
    """``key`` as MLflow accepts a metric name: method names such as kd+flexkd hold a '+'."""
    return re.sub(r"[^\w\-. /]", "_", key.replace("+", "_plus_"))


def write_results(
    name: str,
    results: dict[str, Any],
    markdown: str,
    plot_file: Path | None,
    tracking_uri: str | None,
    results_dir: Path = RESULTS,
) -> dict[str, Path]:
    """Write ``<name>.json`` and ``<name>.md`` (and the plot, already drawn) and log all of them,
    with the headline numbers as metrics, to one MLflow run in experiment ``flexkd-bench``; with
    ``tracking_uri`` None, only the files (a benchmark's partial results, logged when it ends)."""
    results_dir.mkdir(parents=True, exist_ok=True)
    paths = {"json": results_dir / f"{name}.json", "md": results_dir / f"{name}.md"}
    paths["json"].write_text(json.dumps(results, indent=2, default=str))
    paths["md"].write_text(markdown)
    if plot_file is not None:
        paths["png"] = plot_file
    if tracking_uri is None:
        return paths
    import mlflow

    mlflow.set_tracking_uri(tracking_uri)
    mlflow.set_experiment("flexkd-bench")
    with mlflow.start_run(run_name=f"bench-{name}") as run:
        mlflow.set_tags(
            {
                "benchmarks": name,
                "flexkd.command": results.get("command", ""),
                "flexkd.git_commit": results.get("machine", {}).get("git_commit", ""),
            }
        )
        mlflow.log_metrics(
            {
                metric_name(key): float(value)
                for key, value in results.get("headline", {}).items()
                if isinstance(value, (int, float))
            }
        )
        for path in paths.values():
            mlflow.log_artifact(str(path))
        results["mlflow_run_id"] = run.info.run_id
    paths["json"].write_text(json.dumps(results, indent=2, default=str))
    return paths


def stage_seconds(record) -> float:
    """A stage's own run time, also when this pipeline run reused it (read from its manifest)."""
    if not record.cached:
        return round(record.seconds, 1)
    manifest = json.loads((Path(record.directory) / "manifest.json").read_text())
    return round(float(manifest.get("seconds", 0.0)), 1)


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (n - 1; 0 for one value)."""
    n = len(values)
    mean = sum(values) / n
    std = (sum((v - mean) ** 2 for v in values) / (n - 1)) ** 0.5 if n > 1 else 0.0
    return mean, std
