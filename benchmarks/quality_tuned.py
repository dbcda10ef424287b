"""``flexkd bench quality --tune``: every method tuned alike on held-out rows, then compared on test.

    selection set  dev.tsv rows after the scoring rows, as many as test.tsv has (872): no row of
                   it is a training row (train.tsv is another part of the re-split), a scoring row
                   (the first dev rows) or a test row, though SST-2 repeats a few short phrases
    sweeps         one ``flexkd tune`` sweep per method (flexkd.tune, Ray Tune), 8 trials each over
                   the same learning rates; a feature method also tries the feature-loss weight
                   gamma and the layer map, logit-only kd four KD temperatures instead (it has no
                   feature loss); no early stopping, every trial scored on the selection set at its
                   last step; the seed is one the comparison does not use, so no test score comes
                   from the very run that won its sweep
    comparison     each method with its own best values, every seed, on test.tsv (run_quality),
                   kept as quality-<regime>-<label> beside the regime's table

Each sweep tokenizes the selection set as its eval split, so it builds its own tokenize, score and
targets stages (a teacher pass, about 2.5 min on 2 cores); a best layer map other than the main
table's scores and caches once more in the comparison.

The main table gives every method the same values, which may suit one method better than another;
this variant answers whether the ranking survives giving each method its best values, picked on
rows the test never sees.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import yaml

from benchmarks.common import SHARED_DATA

log = logging.getLogger("flexkd")

# The same learning rates and 8 trials for every method. gamma and the layer map are the knobs the
# main table's variants (benchmarks/RESULTS.md) found to matter; they were chosen after those
# variants had run on test.tsv, which the page says.
LEARNING_RATES = (5e-4, 1e-3)
FEATURE_KNOBS = {"loss.gamma": [1.0, 3.0], "layer_map": ["uniform", "last"]}
KD_KNOBS = {"loss.temperature": [1.0, 2.0, 4.0, 8.0]}


def search_space(method: str) -> dict[str, list[Any]]:
    """The grid a method is tuned over: learning rate x the knobs that method has."""
    from benchmarks.quality import METHODS

    if METHODS[method].get("loss.feature") == "none" and method != "kd":
        from flexkd.config.schema import ConfigError

        raise ConfigError(
            f"--tune: {method} has only the learning rate to tune, so it would get fewer trials "
            "than the others; compare it in the main table"
        )
    return {"training.learning_rate": list(LEARNING_RATES)} | (KD_KNOBS if method == "kd" else FEATURE_KNOBS)


def tuning_seed(seeds: tuple[int, ...]) -> int:
    """A seed the comparison does not run: a test score of the run that won its sweep would lean high."""
    return max(seeds) + 1


def selection_set(score_rows: int, work_dir: Path) -> Path:
    """dev.tsv's rows after the first ``score_rows`` (which the importance is scored on), as many as
    test.tsv has, written as a TSV the pipeline reads as its eval split during the sweeps."""
    sst2 = SHARED_DATA / "sst2"
    header, *dev = (sst2 / "dev.tsv").read_text().splitlines()
    size = len((sst2 / "test.tsv").read_text().splitlines()) - 1
    rows = dev[score_rows : score_rows + size]
    if len(rows) < size:
        from flexkd.config.schema import ConfigError

        raise ConfigError(
            f"--score-rows {score_rows}: dev.tsv has {len(dev)} rows, too few left for a "
            f"{size}-row selection set after the scoring rows"
        )
    path = work_dir / "selection" / f"dev-{score_rows}-{score_rows + size}.tsv"
    path.parent.mkdir(parents=True, exist_ok=True)
    text = "\n".join([header, *rows]) + "\n"
    if not path.is_file() or path.read_text() != text:
        path.write_text(text)
    return path


def sweep_config(settings, teacher_dir: Path, work_dir: Path, method: str, selection: Path):
    """The method's pipeline at the tuning seed, scored on ``selection``, with its tune section."""
    from benchmarks.quality import method_config

    tune = {
        "search_space": {path: {"grid": values} for path, values in search_space(method).items()},
        "num_samples": 1,
        "metric": "eval.accuracy",
        "mode": "max",
        "eval_every": settings.steps,
        "asha": None,
    }
    return method_config(
        settings,
        teacher_dir,
        work_dir,
        method,
        tuning_seed(settings.seeds),
        extra={"data.eval.path": str(selection), "data.eval.limit": None, "tune": tune},
    )


def check_every_trial_finished(method: str, trials: list[dict[str, Any]]) -> None:
    """Raises StageError if a trial of ``method``'s sweep failed: its best would come from less of
    the grid than the other methods', and they would no longer be tuned alike."""
    from flexkd.errors import StageError
    from flexkd.sweep.tune import failed_trials_sentence

    failed = failed_trials_sentence(trials)
    if failed:
        raise StageError(f"bench quality --tune: {method} was not tuned over its whole grid: {failed}")


def tune_methods(settings, teacher_dir: Path, work_dir: Path, methods: tuple[str, ...]) -> dict[str, dict[str, Any]]:
    """One sweep per method; per method its grid, every trial's selection-set accuracy, and the best values."""
    from flexkd.sweep.tune import run_sweep

    selection = selection_set(settings.score_rows, work_dir)
    for method in methods:  # refused before any sweep runs
        search_space(method)
    tuning = {}
    for method in methods:
        config = sweep_config(settings, teacher_dir, work_dir, method, selection)
        # run_sweep writes <pipeline>.best.yaml beside the file it is given.
        pipeline_file = work_dir / "sweeps" / f"{method.replace('+', '-')}.yaml"
        pipeline_file.parent.mkdir(parents=True, exist_ok=True)
        pipeline_file.write_text(yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False))
        log.info("bench quality --tune: sweeping %s over %s", method, search_space(method))
        result = run_sweep(config, pipeline_file)
        check_every_trial_finished(method, result.trials)
        tuning[method] = {
            "search_space": search_space(method),
            "trials": [
                {"params": row["params"], "accuracy": _percent(row["metric"]), "status": row["status"]}
                for row in result.trials
            ],
            "completed": sum(row["status"] == "completed" for row in result.trials),
            "best": result.best["params"],
            "best_accuracy": _percent(result.best["metric"]),
            "sweep_run_id": result.parent_run_id,
            "seconds": round(result.seconds, 1),
        }
        log.info(
            "bench quality --tune: %s best %s (selection accuracy %.2f%%)",
            method,
            result.best["params"],
            tuning[method]["best_accuracy"],
        )
    completed = {method: sweep["completed"] for method, sweep in tuning.items()}
    if len(set(completed.values())) > 1:
        log.warning("bench quality --tune: the methods completed different numbers of trials: %s", completed)
    return {
        "selection_set": str(selection.relative_to(work_dir)),
        "selection_rows": _rows(selection),
        "seed": tuning_seed(settings.seeds),
        "methods": tuning,
    }


def tuning_markdown(tuning: dict[str, Any]) -> list[str]:
    """The sweeps behind a tuned variant: what each method tried and what it kept."""
    lines = [
        f"**Tuned per method.** Each method ran its own sweep (`flexkd tune`, every trial to its last step, "
        f"seed {tuning['seed']}, which the comparison below does not use) and was scored on "
        f"{tuning['selection_rows']} dev.tsv sentences, rows that are not training, scoring or test rows. Below, "
        "each method runs every seed with its own best values, which replace the learning rate, gamma, layer "
        "map and temperature above. Ties go to the first trial. The grid's gamma and layer-map values are the "
        "ones the earlier variants on this page had found to matter, on test.tsv.",
        "",
        "| method | grid | trials completed | best values | selection accuracy of the best % | sweep min |",
        "|---|---|---|---|---|---|",
    ]
    for method, sweep in tuning["methods"].items():
        grid = "; ".join(f"{path}: {', '.join(map(str, values))}" for path, values in sweep["search_space"].items())
        best = ", ".join(f"{path.split('.')[-1]} {value}" for path, value in sweep["best"].items())
        lines.append(
            f"| {method} | {grid} | {sweep['completed']} of {len(sweep['trials'])} | {best} | {sweep['best_accuracy']:.2f} | "
            f"{sweep['seconds'] / 60:.1f} |"
        )
    lines += ["", "Every trial (selection-set accuracy %):", ""]
    for method, sweep in tuning["methods"].items():
        trials = sorted(sweep["trials"], key=lambda trial: -(trial["accuracy"] or 0))
        lines.append(
            f"- {method}: "
            + "; ".join(
                ", ".join(f"{path.split('.')[-1]} {value}" for path, value in trial["params"].items())
                + f" -> {_cell(trial['accuracy'])}"
                for trial in trials
            )
        )
    return lines + [""]


def _percent(value: float | None) -> float | None:
    return None if value is None else round(100 * value, 2)


def _cell(value: float | None) -> str:
    return "failed" if value is None else f"{value:.2f}"


def _rows(tsv: Path) -> int:
    return len(tsv.read_text().splitlines()) - 1
