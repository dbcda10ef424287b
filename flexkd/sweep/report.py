"""The sweep's report: a table of trials (values, metric, steps, wall time) and the metric
plotted against k and against gamma, the two knobs Flex-KD users ask about first."""

from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # headless: the driver may have no display
import matplotlib.pyplot as plt


def trial_rows(results, plan, config) -> list[dict[str, Any]]:
    """One row per trial of a Tune ResultGrid: id, swept values, last metric, steps, seconds, status."""
    rows = []
    for result in results:
        metrics = result.metrics or {}
        steps = int(metrics.get("step", 0))
        error = str(result.error).strip().splitlines()[-1][:300] if result.error is not None else ""
        status = "error" if error else ("completed" if steps >= config.training.steps else "stopped early")
        rows.append(
            {
                "trial_id": metrics.get("trial_id") or Path(result.path).name,
                "params": {path: result.config.get(path) for path in plan.search_space},
                "metric": metrics.get(plan.metric),
                "steps": steps,
                "seconds": float(metrics.get("time_total_s", float("nan"))),
                "status": status,
                "error": error,
            }
        )
    return sorted(rows, key=lambda row: row["trial_id"])


def write_report(
    trials: list[dict[str, Any]], plan, best: dict[str, Any], directory: Path, teacher_loads_in_trials: int
) -> Path:
    """report.md, trials.csv and report.png in ``directory``; returns it."""
    paths = list(plan.search_space)
    header = ["trial", *paths, plan.metric, "steps", "seconds", "status"]
    table = [
        [
            row["trial_id"],
            *(_cell(row["params"][path]) for path in paths),
            _number(row["metric"]),
            row["steps"],
            f"{row['seconds']:.1f}",
            row["status"] + (" (best)" if row is best else ""),
        ]
        for row in trials
    ]
    lines = [
        f"# Sweep {plan.name}",
        "",
        f"{len(trials)} trials, {plan.metric} ({plan.mode}), teacher: {plan.teacher}, "
        f"k_max = {plan.k_max}, teacher loads inside trials: {teacher_loads_in_trials}",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
    ]
    lines += ["| " + " | ".join(str(cell) for cell in cells) + " |" for cells in table]
    lines += ["", f"best: trial {best['trial_id']}, {plan.metric} = {_number(best['metric'])}"]
    errors = [f"- {row['trial_id']}: {row['error']}" for row in trials if row["error"]]
    lines += ["", "errors:", *errors] if errors else []
    (directory / "report.md").write_text("\n".join(lines) + "\n")
    with (directory / "trials.csv").open("w", newline="") as file:
        csv.writer(file).writerows([header, *table])
    _plot(trials, plan, directory / "report.png")
    return directory


def _plot(trials: list[dict[str, Any]], plan, path: Path) -> None:
    figure, axes = plt.subplots(1, 2, figsize=(10, 4))
    for axis, knob, label in ((axes[0], "selection.k", "k (units per layer)"), (axes[1], "loss.gamma", "gamma")):
        points = [
            (_value(row, knob, plan), row["metric"], row["status"])
            for row in trials
            if row["metric"] is not None and math.isfinite(row["metric"])
        ]
        for status, marker in (("completed", "o"), ("stopped early", "x")):
            chosen = [(x, y) for x, y, s in points if s == status and x is not None]
            if chosen:
                axis.scatter(*zip(*chosen), marker=marker, label=status)
        if knob == "loss.gamma" and all(x and x > 0 for x, _, _ in points):
            axis.set_xscale("log")
        axis.set_xlabel(label + ("" if knob in plan.search_space else " (not swept)"))
        axis.set_ylabel(plan.metric)
        axis.legend(fontsize=8)
    figure.suptitle(f"{plan.name}: {plan.metric} per trial (last report)")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def _value(row: dict[str, Any], path: str, plan) -> float | None:
    if path in row["params"]:
        value = row["params"][path]
    else:
        value = plan.trial_base
        for key in path.split("."):
            value = value[key]
    if path == "selection.k" and value in (None, "auto"):  # 'auto' differs per layer: plotted at k_max
        return plan.k_max
    return value


def _number(value) -> str:
    return "n/a" if value is None else f"{value:.4g}"


def _cell(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)
