"""``flexkd tune``: a Ray Tune sweep of distill trials that share one teacher pass.

    prepare   tokenize, score and targets run once through the pipeline runner (cached as
              usual), with k_max = the largest k of the search space and the teacher layers
              of every layer map it tries (one cache per selection it tries)
    trials    each a Tune function trial that drives a Ray Train distill run (Train V2: the
              trainable launches the TorchTrainer, and TuneReportCallback forwards the workers'
              reports) reading the cache, never loading the teacher; the student is evaluated
              every tune.eval_every steps, and ASHA stops the trials that trail
    tracking  one MLflow parent run for the sweep, one nested run per trial, all written from
              this driver (Tune callbacks), so a SQLite store has one writer
    result    ``<pipeline>.best.yaml`` next to the pipeline file, a runnable pipeline with the
              best trial's values; a report (table and plots) logged to the parent run

Every bad input (an unknown parameter, a value the schema refuses, k above the cache's k_max, a
cache made for another teacher or data set) is refused in one line before any trial starts.
Running the same command again resumes an interrupted sweep (``Tuner.restore``).
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow
import ray
import yaml
from mlflow.entities import Metric
from mlflow.tracking import MlflowClient
from ray import tune
from ray._raylet import PlacementGroupID
from ray.tune import Callback
from ray.tune.integration.ray_train import TuneReportCallback
from ray.tune.schedulers import ASHAScheduler
from ray.util.placement_group import PlacementGroup, placement_group_table, remove_placement_group

from flexkd.cluster.local import ensure_ray
from flexkd.config.schema import (
    ConfigError,
    PipelineConfig,
    SearchDimension,
    apply_overrides,
    as_hashed,
    load_config,
    parse_config,
    stable_hash,
)
from flexkd.data.shards import ordered_execution, read_shards
from flexkd.errors import StageError
from flexkd.evaluation.periodic import EVAL_METRICS
from flexkd.method.registry import reads_whole_hidden
from flexkd.models.plan import count_teacher_loads, plan_models
from flexkd.pipeline.runner import planned_fingerprint, run_pipeline, stage_config
from flexkd.stages.distill import train_student
from flexkd.stages.targets import check_cache
from flexkd.sweep.report import trial_rows, write_report
from flexkd.tracking.runs import flatten, log_config, tracking_uri, use_experiment

log = logging.getLogger("flexkd")

# Parameters that change which units the score stage selects: each value needs its own cache.
CACHE_PARAMETERS = ("selection.method", "selection.seed", "scoring.score")
TRAIN_METRICS = ("train.total", "train.task", "train.logit", "train.feature")
MAXIMIZED = ("eval.accuracy", "eval.macro_f1", "eval.rougeL")
PLACEMENT_GROUP_FILE = "placement_group"


@dataclass(frozen=True)
class SweepPlan:
    """Everything the trials share, fixed before the first one starts."""

    name: str  # Tune experiment name: the same config resumes the same sweep
    trial_base: dict[str, Any]  # resolved config of every trial before its sampled values
    search_space: dict[str, SearchDimension]
    metric: str
    mode: str
    k_max: int
    prepare: dict[str, dict[str, Any]]  # cache key -> the config that builds that cache
    eval_every: int
    teacher: str


@dataclass
class SweepResult:
    parent_run_id: str
    experiment_dir: Path
    best_config_path: Path
    best: dict[str, Any]
    trials: list[dict[str, Any]]
    teacher_loads_in_trials: int
    seconds: float
    report_path: Path


def plan_sweep(config: PipelineConfig, teacher: str = "cache") -> SweepPlan:
    """Validate the tune section against the schema and the models; one line per refusal."""
    if config.tune is None:
        raise ConfigError("tune: the pipeline has no tune section (tune.search_space)")
    sweep, space = config.tune, config.tune.search_space
    metric = sweep.metric or ("eval.accuracy" if config.task.kind == "classification" else "eval.rougeL")
    reported = {f"eval.{name}" for name in EVAL_METRICS[config.task.kind]} | set(TRAIN_METRICS)
    if metric not in reported:
        raise ConfigError(
            f"tune.metric: '{metric}' is not reported by a trial; choose one of {', '.join(sorted(reported))}"
        )
    for path in CACHE_PARAMETERS:
        if path in space and (space[path].grid or space[path].choice) is None:
            raise ConfigError(f"tune.search_space.{path}: needs grid or choice (each value builds its own cache)")
        if path in space and config.targets.path and teacher == "cache":
            raise ConfigError(f"tune.search_space.{path}: targets.path gives one cache, made with one selection")

    base = config.model_dump(mode="json", exclude={"tune"}) | {"tune": None}
    base["training"]["teacher"] = teacher

    def tried(path: str) -> list[Any]:
        return space[path].values() if path in space else [_get(base, path)]

    base["targets"]["full_width"] = config.targets.full_width or any(map(reads_whole_hidden, tried("loss.feature")))
    base["targets"]["temperatures"] = _cached_temperatures(config)
    # Each value is validated alone on top of the pipeline's own config: schema, shapes, k, layers.
    corners = {
        (path, json.dumps(value)): _trial_config(base, {path: value}, f"tune.search_space.{path} = {value!r}")
        for path, dimension in space.items()
        for value in dimension.values()
    }

    def configs_trying(path: str) -> list[PipelineConfig]:
        return [corners[(path, json.dumps(value))] for value in space[path].values()] if path in space else [config]

    ks = {plan_models(trial).k for trial in configs_trying("selection.k")}
    k_max = config.targets.k_max or max(ks)
    if max(ks) > k_max:
        raise ConfigError(f"tune.search_space.selection.k: k = {max(ks)} exceeds targets.k_max = {k_max} of the cache")
    base["targets"]["k_max"] = k_max

    prepare_base = apply_overrides(base, {"training.teacher": "cache"})
    if k_max != plan_models(config).k:  # else keep the pipeline's own selection, and reuse its score stage
        prepare_base["selection"]["k"] = k_max
    if "layer_map" in space:  # score and cache the teacher layers of every map tried
        pairs = {pair for trial in configs_trying("layer_map") for pair in plan_models(trial).layer_pairs}
        prepare_base["layer_map"] = [list(pair) for pair in sorted(pairs)]
    prepare = {}
    for combination in itertools.product(*(tried(path) for path in CACHE_PARAMETERS)):
        values = dict(zip(CACHE_PARAMETERS, combination))
        prepare[_cache_key(values)] = apply_overrides(prepare_base, values)

    if config.targets.path and teacher == "cache":  # a given cache must fit every trial: checked now
        for (path, value), trial in corners.items():
            trial_plan = plan_models(trial)
            check_cache(
                trial,
                Path(config.targets.path),
                trial_plan.k,
                trial_plan.teacher_layer_indices,
                planned_fingerprint(trial, "tokenize"),
                where=f"targets.path (tune.search_space.{path} = {json.loads(value)!r})",
            )
    eval_every = sweep.eval_every or config.training.log_every
    name = "sweep-" + stable_hash(
        {
            "base": as_hashed(base, config),
            "space": {p: d.model_dump() for p, d in space.items()},
            "tune": sweep.model_dump(mode="json", exclude={"storage_path"}),
        },
        10,
    )
    return SweepPlan(
        name,
        base,
        dict(space),
        metric,
        sweep.mode or ("max" if metric in MAXIMIZED else "min"),
        k_max,
        prepare,
        eval_every,
        teacher,
    )


def run_sweep(config: PipelineConfig, pipeline_file: Path, teacher: str = "cache") -> SweepResult:
    """Prepare the shared stages, run (or resume) the sweep, write the best pipeline and the report."""

    plan = plan_sweep(config, teacher)
    ensure_ray()
    inputs = {key: _prepare(parse_config(raw), teacher) for key, raw in plan.prepare.items()}
    # Read once, here, for every trial: trials that each start a Ray Data read at the same time
    # can starve each other of the CPUs a small cluster has left beside their Train workers.
    with ordered_execution():
        rows = {
            key: read_shards(Path(dirs["targets" if teacher == "cache" else "tokenize"]) / "train").materialize()
            for key, dirs in inputs.items()
        }
    storage = Path(config.tune.storage_path or Path(config.artifact_root) / config.name / "tune")
    experiment_dir = storage / plan.name
    experiment_dir.mkdir(parents=True, exist_ok=True)
    state_file = experiment_dir / "sweep.json"
    state = json.loads(state_file.read_text()) if state_file.is_file() else {}

    experiment_id = use_experiment(config)
    started = time.time()
    with mlflow.start_run(
        run_id=state.get("parent_run_id"),
        experiment_id=experiment_id,
        run_name=None if state else f"{config.name}-sweep",
    ) as parent:
        if not state:
            state_file.write_text(json.dumps({"parent_run_id": parent.info.run_id}))
            mlflow.set_tags({"flexkd.pipeline": config.name, "flexkd.sweep": plan.name, "flexkd.teacher": teacher})
            log_config(config)
            mlflow.log_params({"sweep.metric": plan.metric, "sweep.mode": plan.mode, "sweep.k_max": plan.k_max})
        context = _TrialContext(plan.trial_base, inputs, rows, str(experiment_dir / "distill"), plan.eval_every)
        # The trial function only drives Ray Train: it takes no CPU (Train's workers do), and a
        # sliver of the head node keeps it on a node that is not preempted with the workers.
        trainable = tune.with_resources(
            tune.with_parameters(_run_trial, context=context), {"node:__internal_head__": 0.001}
        )
        loads_before = count_teacher_loads(config)
        if tune.Tuner.can_restore(str(experiment_dir)):
            log.info("tune: resuming %s", experiment_dir)
            tuner = tune.Tuner.restore(str(experiment_dir), trainable, resume_unfinished=True, resume_errored=True)
        else:
            tuner = tune.Tuner(
                trainable,
                param_space=_tune_space(plan.search_space),
                tune_config=tune.TuneConfig(
                    metric=plan.metric,
                    mode=plan.mode,
                    num_samples=config.tune.num_samples,
                    scheduler=_scheduler(config, plan),
                    max_concurrent_trials=config.tune.max_concurrent_trials
                    or default_concurrency(config, ray.cluster_resources()),
                ),
                run_config=tune.RunConfig(
                    name=plan.name,
                    storage_path=str(storage),
                    verbose=1,
                    callbacks=[
                        MlflowTrialRuns(tracking_uri(config), experiment_id, parent.info.run_id, config.training.steps),
                        FreeStoppedTrials(context.trials_dir),
                    ],
                ),
            )
        results = tuner.fit()
        loads_in_trials = count_teacher_loads(config) - loads_before

        trials = trial_rows(results, plan, config)
        finished = [row for row in trials if row["metric"] is not None and math.isfinite(row["metric"])]
        if not finished:
            first_error = next((row["error"] for row in trials if row["error"]), "no trial reported the metric")
            raise StageError(f"tune: every trial failed; first: {first_error}")
        failed = failed_trials_sentence(trials)
        if failed:
            log.warning("%s", failed)
            mlflow.set_tag("flexkd.failed_trials", failed)
        best = (max if plan.mode == "max" else min)(finished, key=lambda row: row["metric"])
        best_path = write_best_pipeline(pipeline_file, best, plan, parent.info.run_id)
        report = write_report(trials, plan, best, experiment_dir, loads_in_trials)
        mlflow.log_artifact(str(best_path))
        mlflow.log_artifact(str(report / "report.md"))
        mlflow.log_artifact(str(report / "report.png"))
        mlflow.log_artifact(str(report / "trials.csv"))
        mlflow.log_metrics(
            {
                f"best.{plan.metric}": best["metric"],
                "teacher_loads_in_trials": float(loads_in_trials),
                "trials": float(len(trials)),
                "seconds": time.time() - started,
            }
        )
        mlflow.set_tag("flexkd.best_trial", best["trial_id"])
    return SweepResult(
        parent.info.run_id,
        experiment_dir,
        best_path,
        best,
        trials,
        loads_in_trials,
        time.time() - started,
        report / "report.md",
    )


def failed_trials_sentence(trials: list[dict[str, Any]]) -> str | None:
    """One line when some trials failed: the best is then picked from the others only, over less of
    the search space than was asked for. None when none failed."""
    errors = [row for row in trials if row["error"]]
    if not errors:
        return None
    values = ", ".join(f"{key} = {value}" for key, value in errors[0]["params"].items())
    return (
        f"tune: {len(errors)} of {len(trials)} trials failed, so the best is picked from the other "
        f"{len(trials) - len(errors)} only; first ({values}): {errors[0]['error']}"
    )


def default_concurrency(config: PipelineConfig, cluster: dict[str, float]) -> int:
    """Trials whose Ray Train workers fit the cluster at once, keeping a CPU for Ray Data ingest."""
    resources = config.resources
    if resources.use_gpu:
        return max(1, int(cluster.get("GPU", 0) // resources.num_workers))
    return max(1, int((cluster.get("CPU", 1) - 1) // (resources.num_workers * resources.cpus_per_worker)))


def write_best_pipeline(pipeline_file: Path, best: dict[str, Any], plan: SweepPlan, parent_run_id: str) -> Path:
    """``<pipeline>.best.yaml`` beside the pipeline: the user's file (relative paths as written)
    with the best values and without the tune section, so ``flexkd run`` runs it."""
    raw = yaml.safe_load(Path(pipeline_file).read_text())
    raw.pop("tune", None)
    raw = apply_overrides(raw, best["params"])
    path = Path(pipeline_file).with_suffix(".best.yaml")
    header = (
        f"# Best trial {best['trial_id']} of sweep {plan.name} (MLflow run {parent_run_id}):\n"
        f"# {plan.metric} = {best['metric']:.4g} after {best['steps']} steps with "
        + ", ".join(f"{key} = {value}" for key, value in best["params"].items())
        + "\n"
    )
    path.write_text(header + yaml.safe_dump(raw, sort_keys=False))
    load_config(path)  # it must be a valid pipeline
    return path


@dataclass(frozen=True)
class _TrialContext:
    trial_base: dict[str, Any]
    inputs: dict[str, dict[str, str]]  # cache key -> stage -> directory
    rows: dict[str, Any]  # cache key -> its training (or cache) rows, a materialized Dataset
    trials_dir: str
    eval_every: int


def _run_trial(params: dict[str, Any], context: _TrialContext) -> None:
    """One Tune trial: a distill run on Ray Train with this trial's values, its reports forwarded to Tune."""

    trial_id = tune.get_context().get_trial_id()
    config = parse_config(apply_overrides(context.trial_base, params), source=f"trial {trial_id}")
    values = {path: _get(config.model_dump(mode="json"), path) for path in CACHE_PARAMETERS}
    key = _cache_key(values)
    inputs = {stage: Path(directory) for stage, directory in context.inputs[key].items()}
    output_dir = Path(context.trials_dir) / trial_id
    output_dir.mkdir(parents=True, exist_ok=True)
    # Same (storage, name) after a restore: Ray Train resumes it, and distill its checkpoints.
    train_student(
        stage_config(config, "distill", inputs),  # with teacher.adapt, the adapted teacher
        inputs,
        output_dir,
        eval_every=context.eval_every,
        callbacks=[TuneReportCallback()],
        run_name=f"distill-{trial_id}",
        train_data=context.rows[key],
        placement_group_file=output_dir / PLACEMENT_GROUP_FILE,
    )


class MlflowTrialRuns(Callback):
    """Tune callback: one MLflow run per trial, nested under the sweep's parent run, written from
    the driver. Found again by its trial id after a restore."""

    def __init__(self, uri: str, experiment_id: str, parent_run_id: str, steps: int):
        self.uri, self.experiment_id, self.parent_run_id, self.steps = uri, experiment_id, parent_run_id, steps
        self._runs: dict[str, str] = {}

    def __getstate__(self) -> dict[str, Any]:  # pickled with the Tuner; run ids are looked up again
        return {**self.__dict__, "_runs": {}}

    def _run_id(self, trial) -> str:

        if trial.trial_id in self._runs:
            return self._runs[trial.trial_id]
        client = MlflowClient(self.uri)
        found = client.search_runs(
            [self.experiment_id],
            f"tags.`mlflow.parentRunId` = '{self.parent_run_id}' and tags.`flexkd.trial_id` = '{trial.trial_id}'",
        )
        if found:
            run_id = found[0].info.run_id
        else:
            run = client.create_run(
                self.experiment_id,
                run_name=f"trial-{trial.trial_id}",
                tags={"mlflow.parentRunId": self.parent_run_id, "flexkd.trial_id": trial.trial_id},
            )
            run_id = run.info.run_id
            client.log_batch(
                run_id, params=[mlflow.entities.Param(key, value) for key, value in flatten(trial.config).items()]
            )
        self._runs[trial.trial_id] = run_id
        return run_id

    def on_trial_start(self, iteration, trials, trial, **info) -> None:
        self._run_id(trial)

    def on_trial_result(self, iteration, trials, trial, result, **info) -> None:

        now, step = int(time.time() * 1000), int(result.get("step", 0))
        metrics = [
            Metric(key, float(value), now, step)
            for key, value in result.items()
            if key.startswith(("train.", "eval.")) and isinstance(value, (int, float))
        ]
        MlflowClient(self.uri).log_batch(self._run_id(trial), metrics=metrics)

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:

        steps = int((trial.last_result or {}).get("step", 0))
        client = MlflowClient(self.uri)
        run_id = self._run_id(trial)
        client.set_tag(run_id, "flexkd.status", "completed" if steps >= self.steps else "stopped early")
        client.set_terminated(run_id, "FINISHED")

    def on_trial_error(self, iteration, trials, trial, **info) -> None:

        client = MlflowClient(self.uri)
        client.set_tag(self._run_id(trial), "flexkd.status", "error")
        client.set_terminated(self._run_id(trial), "FAILED")


class FreeStoppedTrials(Callback):
    """Tune callback: free the Ray Train workers' placement group of a trial that has ended.

    A trial that ASHA stops is killed with its Train run, which then cannot remove its own
    placement group; Ray Train's cleaner actor would, but it needs the State API (the
    dashboard), which a local Ray may run without. Its CPUs would stay reserved for the rest
    of the sweep, so the driver removes it (a no-op once Train has done so itself).
    """

    def __init__(self, trials_dir: str):
        self.trials_dir = trials_dir

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        self._free(trial)

    def on_trial_error(self, iteration, trials, trial, **info) -> None:
        self._free(trial)

    def _free(self, trial) -> None:

        record = Path(self.trials_dir) / trial.trial_id / PLACEMENT_GROUP_FILE
        if not record.is_file():
            return
        group = PlacementGroup(PlacementGroupID(bytes.fromhex(record.read_text().strip())))
        if placement_group_table(group).get("state") not in (None, "REMOVED"):
            log.info("tune: freeing the placement group of stopped trial %s", trial.trial_id)
            remove_placement_group(group)


def _prepare(config: PipelineConfig, teacher: str) -> dict[str, str]:
    """Run (or reuse) the stages the trials read; returns their directories."""

    stages = (
        ("generate", "tokenize", "adapt", "score")
        if teacher == "online"
        else (
            ("generate", "tokenize", "targets")
            if config.targets.path
            else ("generate", "tokenize", "adapt", "score", "targets")
        )
    )
    result = run_pipeline(config, stages=stages)
    return {name: str(record.directory) for name, record in result.stages.items()}


def _trial_config(base: dict[str, Any], values: dict[str, Any], where: str) -> PipelineConfig:
    try:
        config = parse_config(apply_overrides(base, values), source="<trial>")
        plan_models(config)
    except ConfigError as error:
        first = str(error).splitlines()[0].removeprefix("<trial>: ").removeprefix("<top level>: ")
        raise ConfigError(f"{where}: {first}") from None
    return config


def _cached_temperatures(config: PipelineConfig) -> list[float]:
    """The temperatures whose exact normalizers the cache stores: the pipeline's and every one the
    sweep lists; a range gets five points, geometrically spaced, so none is far from a stored one."""
    temperatures = set(config.targets.temperatures) | {config.loss.temperature}
    dimension = config.tune.search_space.get("loss.temperature")
    if dimension is not None and (dimension.grid or dimension.choice):
        temperatures |= {float(value) for value in dimension.values()}
    elif dimension is not None:
        low, high = dimension.values()
        temperatures |= {round(low * (high / low) ** (step / 4), 6) for step in range(5)}
    return sorted(temperatures)


def _tune_space(space: dict[str, SearchDimension]) -> dict[str, Any]:

    converted = {}
    for path, dimension in space.items():
        if dimension.grid is not None:
            converted[path] = tune.grid_search(dimension.grid)
        elif dimension.choice is not None:
            converted[path] = tune.choice(dimension.choice)
        elif dimension.uniform is not None:
            converted[path] = tune.uniform(*dimension.uniform)
        else:
            converted[path] = tune.loguniform(*dimension.loguniform)
    return converted


def _scheduler(config: PipelineConfig, plan: SweepPlan):

    asha = config.tune.asha
    if asha is None:
        return None
    # stop_last_trials=False: a trial that reaches the last step ends by itself; stopped there,
    # it would be killed while its Train run shuts down.
    return ASHAScheduler(
        time_attr="step",
        max_t=config.training.steps,
        grace_period=min(asha.grace_period or plan.eval_every, config.training.steps),
        reduction_factor=asha.reduction_factor,
        stop_last_trials=False,
    )


def _get(raw: dict[str, Any], path: str) -> Any:
    for key in path.split("."):
        raw = raw[key]
    return raw


def _cache_key(values: dict[str, Any]) -> str:
    return json.dumps(values, sort_keys=True)
