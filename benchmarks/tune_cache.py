"""Wall time of a 4-trial sweep of the quickstart setup: teacher-target cache against online teacher.

    python benchmarks/tune_cache.py [--steps 20] [--work-dir /tmp/flexkd-tune-cache]

One run of this script does both sweeps on the same local Ray, same trials (k in {64, 192} x
gamma in {0.5, 2}), same data, same concurrency, ASHA off (so both run every trial to the end):

    shared    tokenize and score, run once before either sweep (both sweeps need them)
    online    each trial's Ray Train worker loads SmolLM2-135M-Instruct and runs it every step
    cache     the targets stage runs the teacher once over the training rows; trials read it

and writes benchmarks/results/tune_cache.json and .md: wall times, the ratio (with and without
the one-time cache build), teacher loads inside trials, and the machine's load while it ran.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results"


def pipeline(work_dir: Path, steps: int) -> Path:
    """The quickstart pipeline, made small enough for a 2-core machine, with a 4-trial sweep."""
    from flexkd.config.schema import apply_overrides, load_config

    raw = load_config(REPO / "pipelines" / "quickstart.yaml").model_dump(mode="json")
    raw = apply_overrides(
        raw,
        {
            "name": "quickstart-bench",
            "artifact_root": str(work_dir / "runs"),
            "tracking.tracking_uri": f"sqlite:///{work_dir}/mlflow.db",
            "data.train.limit": 256,
            "data.eval.limit": 64,
            "data.score.limit": 128,
            "training.steps": steps,
            "training.warmup_steps": 2,
            "training.log_every": steps // 2,
            "training.checkpoint_every": steps,
            "tune": {
                "search_space": {"selection.k": {"grid": [64, 192]}, "loss.gamma": {"grid": [0.5, 2.0]}},
                "num_samples": 1,
                "eval_every": steps // 2,
                "asha": None,
                "max_concurrent_trials": 2,
            },
        },
    )
    path = work_dir / "quickstart-bench.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def timed_sweep(config, path: Path, teacher: str) -> dict:
    from flexkd.sweep.tune import run_sweep

    load_before, started = os.getloadavg(), time.time()
    result = run_sweep(config, path, teacher=teacher)
    seconds = time.time() - started
    return {
        "seconds": round(seconds, 1),
        "load_before": [round(x, 1) for x in load_before],
        "load_after": [round(x, 1) for x in os.getloadavg()],
        "teacher_loads_in_trials": result.teacher_loads_in_trials,
        "trial_seconds": {row["trial_id"]: round(row["seconds"], 1) for row in result.trials},
        "best": {"params": result.best["params"], "metric": result.best["metric"]},
        "metrics": {row["trial_id"]: [row["params"], row["metric"]] for row in result.trials},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20, help="distill steps per trial")
    parser.add_argument("--work-dir", type=Path, default=Path("/tmp/flexkd-tune-cache"))
    args = parser.parse_args()

    from flexkd.cluster.local import ensure_ray
    from flexkd.config.schema import load_config
    from flexkd.pipeline.runner import run_pipeline

    shutil.rmtree(args.work_dir, ignore_errors=True)  # every run measures from scratch
    args.work_dir.mkdir(parents=True)
    path = pipeline(args.work_dir, args.steps)
    config = load_config(path)
    ensure_ray()
    started = time.time()
    run_pipeline(config, stages=("tokenize", "score"))
    shared = time.time() - started
    online = timed_sweep(config, path, "online")
    cache = timed_sweep(config, path, "cache")
    targets_manifest = next((args.work_dir / "runs" / config.name / "targets").glob("*/manifest.json"))
    build = json.loads(targets_manifest.read_text())
    cache["targets_build_seconds"] = round(build["seconds"], 1)
    cache["trials_seconds"] = round(cache["seconds"] - build["seconds"], 1)
    cache["cache_megabytes"] = round(build["outputs"]["bytes"] / 2**20, 1)

    results = {
        "setup": {
            "teacher": "SmolLM2-135M-Instruct (d=576, 30 layers)",
            "student": "d=192, 4 layers",
            "train_rows": 256,
            "eval_rows": 64,
            "steps_per_trial": args.steps,
            "batch_size": 16,
            "trials": 4,
            "max_concurrent_trials": 2,
            "asha": "off",
            "machine": f"{os.cpu_count()} CPUs, {platform.processor() or platform.machine()}",
        },
        "shared_tokenize_score_seconds": round(shared, 1),
        "online": online,
        "cache": cache,
        "speedup_trials_only": round(online["seconds"] / cache["trials_seconds"], 2),
        "speedup_including_cache_build": round(online["seconds"] / cache["seconds"], 2),
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "tune_cache.json").write_text(json.dumps(results, indent=2))
    (RESULTS / "tune_cache.md").write_text(report(results))
    print(report(results))


def report(results: dict) -> str:
    online, cache, setup = results["online"], results["cache"], results["setup"]
    return f"""## Sweep wall time: teacher-target cache vs online teacher

`python benchmarks/tune_cache.py --steps {setup["steps_per_trial"]}` (one run, both sweeps), {setup["machine"]}.

Setup: quickstart ({setup["teacher"]} -> student {setup["student"]}), {setup["train_rows"]} training
rows, {setup["eval_rows"]} eval rows, {setup["trials"]} trials (selection.k in {{64, 192}} x loss.gamma in
{{0.5, 2}}), {setup["steps_per_trial"]} steps of batch {setup["batch_size"]} per trial, {setup["max_concurrent_trials"]} trials at a time, ASHA off.
tokenize + score ran once before both sweeps ({results["shared_tokenize_score_seconds"]} s, not counted below).

| sweep | wall time (s) | teacher loads in trials | load average (1/5/15 min) before -> after |
|---|---|---|---|
| online teacher | {online["seconds"]} | {online["teacher_loads_in_trials"]} | {online["load_before"]} -> {online["load_after"]} |
| cache, trials only | {cache["trials_seconds"]} | {cache["teacher_loads_in_trials"]} | |
| cache, incl. building it (targets stage: {cache["targets_build_seconds"]} s, {cache["cache_megabytes"]} MB) | {cache["seconds"]} | | {cache["load_before"]} -> {cache["load_after"]} |

Speedup: **{results["speedup_trials_only"]}x** on the trials (the cache already built, as in every
sweep after the first), **{results["speedup_including_cache_build"]}x** including the one-time cache build.

Per-trial wall time (s): online {sorted(online["trial_seconds"].values())}, cache {sorted(cache["trial_seconds"].values())}.
Best trial: online {online["best"]}, cache {cache["best"]}.

The load averages above are the whole machine's (2 cores): the sweep's own trials (2 at a time,
2 torch threads each) make a load of about 4; more than that means other jobs shared the cores.
"""


if __name__ == "__main__":
    main()
