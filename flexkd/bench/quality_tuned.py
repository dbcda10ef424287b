"""``flexkd bench quality --tune``: every method tuned alike on held-out rows, then compared on test.

    selection set  dev.tsv rows after the scoring rows, as many as test.tsv has (872): disjoint
                   from the training rows (train.tsv), the scoring rows (the first dev rows) and test
    sweeps         one ``flexkd tune`` sweep per method (flexkd.tune, Ray Tune) over the same
                   learning rates and the same number of trials; a feature method also tries the
                   feature-loss weight gamma and the layer map, logit-only kd the KD temperature
                   instead (it has no feature loss); one seed, no early stopping, every trial
                   scored on the selection set at its last step
    comparison     each method with its own best values, every seed, on test.tsv (run_quality),
                   kept as quality-<label> beside the main table

The main table gives every method the same values, which may suit one method better than another;
this variant answers whether the ranking survives giving each method its best values, picked on
rows the test never sees.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import yaml

from flexkd.bench.common import SHARED_DATA

log = logging.getLogger("flexkd")

LEARNING_RATES = (5e-4, 1e-3)
FEATURE_KNOBS = {"loss.gamma": [1.0, 3.0], "layer_map": ["uniform", "last"]}
KD_KNOBS = {"loss.temperature": [1.0, 2.0, 4.0]}


def search_space(method: str) -> dict[str, list[Any]]:
    """The grid a method is tuned over: learning rate x the knobs that method has."""
    from flexkd.bench.quality import METHODS

    feature = METHODS[method].get("loss.feature")
    knobs = KD_KNOBS if method == "kd" else {} if feature == "none" else FEATURE_KNOBS
    return {"training.learning_rate": list(LEARNING_RATES)} | knobs


def selection_set(score_rows: int, work_dir: Path) -> Path:
    """dev.tsv's rows after the first ``score_rows`` (which the importance is scored on), as many as
    test.tsv has, written as a TSV the pipeline reads as its eval split during the sweeps."""
    sst2 = SHARED_DATA / "sst2"
    header, *dev = (sst2 / "dev.tsv").read_text().splitlines()
    size = len((sst2 / "test.tsv").read_text().splitlines()) - 1
    rows = dev[score_rows:score_rows + size]
    if len(rows) < size:
        from flexkd.config import ConfigError

        raise ConfigError(f"--score-rows {score_rows}: dev.tsv has {len(dev)} rows, too few left for a "
                          f"{size}-row selection set after the scoring rows")
    path = work_dir / "selection" / f"dev-{score_rows}-{score_rows + size}.tsv"
    path.parent.mkdir(parents=True, exist_ok=True)
    text = "\n".join([header, *rows]) + "\n"
    if not path.is_file() or path.read_text() != text:
        path.write_text(text)
    return path


def sweep_config(settings, teacher_dir: Path, work_dir: Path, method: str, selection: Path):
    """The method's pipeline at the first seed, scored on ``selection``, with its tune section."""
    from flexkd.bench.quality import method_config

    tune = {"search_space": {path: {"grid": values} for path, values in search_space(method).items()},
            "num_samples": 1, "metric": "eval.accuracy", "mode": "max", "eval_every": settings.steps, "asha": None}
    return method_config(settings, teacher_dir, work_dir, method, settings.seeds[0],
                         extra={"data.eval.path": str(selection), "data.eval.limit": None, "tune": tune})


def tune_methods(settings, teacher_dir: Path, work_dir: Path, methods: tuple[str, ...]) -> dict[str, dict[str, Any]]:
    """One sweep per method; per method its grid, every trial's selection-set accuracy, and the best values."""
    from flexkd.tune import run_sweep

    selection = selection_set(settings.score_rows, work_dir)
    tuning = {}
    for method in methods:
        config = sweep_config(settings, teacher_dir, work_dir, method, selection)
        # run_sweep writes <pipeline>.best.yaml beside the file it is given.
        pipeline_file = work_dir / "sweeps" / f"{method.replace('+', '-')}.yaml"
        pipeline_file.parent.mkdir(parents=True, exist_ok=True)
        pipeline_file.write_text(yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False))
        log.info("bench quality --tune: sweeping %s over %s", method, search_space(method))
        result = run_sweep(config, pipeline_file)
        tuning[method] = {
            "search_space": search_space(method),
            "trials": [{"params": row["params"], "accuracy": _percent(row["metric"]), "status": row["status"]}
                       for row in result.trials],
            "best": result.best["params"], "best_accuracy": _percent(result.best["metric"]),
            "sweep_run_id": result.parent_run_id, "seconds": round(result.seconds, 1),
        }
        log.info("bench quality --tune: %s best %s (selection accuracy %.2f%%)", method, result.best["params"],
                 tuning[method]["best_accuracy"])
    return {"selection_set": str(selection.relative_to(work_dir)), "selection_rows": _rows(selection),
            "seed": settings.seeds[0], "methods": tuning}


def tuning_markdown(tuning: dict[str, Any]) -> list[str]:
    """The sweeps behind a tuned variant: what each method tried and what it kept."""
    lines = [f"**Tuned per method.** Each method ran its own sweep (`flexkd tune`, seed {tuning['seed']}, every trial to "
             f"its last step) and was scored on {tuning['selection_rows']} dev.tsv sentences that neither the training, "
             "the importance scoring nor the test set contains. Below, each method runs every seed with its own best "
             "values, which replace the learning rate, gamma, layer map and temperature above. Ties go to the "
             "first trial.", "",
             "| method | grid | trials | best values | selection accuracy of the best % | sweep min |",
             "|---|---|---|---|---|---|"]
    for method, sweep in tuning["methods"].items():
        grid = "; ".join(f"{path}: {', '.join(map(str, values))}" for path, values in sweep["search_space"].items())
        best = ", ".join(f"{path.split('.')[-1]} {value}" for path, value in sweep["best"].items())
        lines.append(f"| {method} | {grid} | {len(sweep['trials'])} | {best} | {sweep['best_accuracy']:.2f} | "
                     f"{sweep['seconds'] / 60:.1f} |")
    lines += ["", "Every trial (selection-set accuracy %):", ""]
    for method, sweep in tuning["methods"].items():
        trials = sorted(sweep["trials"], key=lambda trial: -(trial["accuracy"] or 0))
        lines.append(f"- {method}: " + "; ".join(
            ", ".join(f"{path.split('.')[-1]} {value}" for path, value in trial["params"].items())
            + f" -> {_cell(trial['accuracy'])}" for trial in trials))
    return lines + [""]


def _percent(value: float | None) -> float | None:
    return None if value is None else round(100 * value, 2)


def _cell(value: float | None) -> str:
    return "failed" if value is None else f"{value:.2f}"


def _rows(tsv: Path) -> int:
    return len(tsv.read_text().splitlines()) - 1
