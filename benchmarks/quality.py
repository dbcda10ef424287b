"""``flexkd bench quality``: the paper's SST-2 comparison, through the real pipeline.

    teacher   SmolLM2-135M-Instruct adapted to SST-2 by the pipeline's own adapt stage
              (``teacher.adapt``, TEACHER_ADAPT), made once and reused by its fingerprint; every
              method's ``teacher.path`` points at the folder it writes
    student   the teacher's tokenizer, hidden 192 (3x narrower), 4 layers; random init, or cut out
              of the teacher, with all rows labeled or few (``--regime``, benchmarks.regimes)
    methods   the regime's (by default kd+flexkd, kd+flexkd-dir, kd+projector, kd+projector_std, kd;
              also ft, kd+cka, kd+random, kd+variance): the same steps, learning rate, data order,
              loss weights and seeds for all; they differ only in the loss.feature / selection.method
              they set (METHODS)
    pipeline  pipelines/sst2.yaml with overrides, run by flexkd.runner.run_pipeline: tokenize,
              score and targets (the teacher-target cache, full width) run once per selection
              method and are reused by fingerprint by every seed and method; each (method, seed)
              runs only distill and evaluate. Seeds set student.seed and training.seed (the
              student's init, a projector's init, and the order of the shuffled training rows).
    judged    per comparison, the paired difference of test accuracy per seed, a 95% bootstrap
              interval of its mean, and an exact McNemar test on the per-sentence predictions of
              every seed (the evaluate stage's eval_predictions.jsonl; benchmarks.stats)

Writes benchmarks/results/quality-<regime>.{json,md,png}, or quality-<regime>-<label>.* for a
variant (another layer map, scoring set, k, loss weight or learning rate, applied alike to every
method it runs), and logs them to MLflow (experiment flexkd-bench).
"""

from __future__ import annotations

import json
import logging
import re
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from benchmarks.common import (
    DEFAULT_WORK_DIR,
    REPO,
    RESULTS,
    SHARED_DATA,
    LoadMonitor,
    command_line,
    load_sentence,
    machine,
    mean_std,
    stage_seconds,
    write_results,
)
from benchmarks.regimes import BASELINES
from benchmarks.stats import bootstrap_mean_interval, mcnemar_exact, paired_differences, verdict_word

log = logging.getLogger("flexkd")

PIPELINE = REPO / "pipelines" / "sst2.yaml"
SHARED_STAGES = ("tokenize", "score", "targets")
# Touch <work dir>/quality.stop to end after the current run and write the results of the runs done.
STOP_FILE = "quality.stop"
RUN_STAGES = (*SHARED_STAGES, "distill", "evaluate")

# What each method sets on top of the common config; everything else is the same for all.
METHODS: dict[str, dict[str, Any]] = {
    "ft": {"loss.beta": 0.0, "loss.gamma": 0.0, "loss.feature": "none"},
    "kd": {"loss.gamma": 0.0, "loss.feature": "none"},
    # The paper's projector baseline: a learned linear map, MSE on the raw teacher features.
    "kd+projector": {"loss.feature": "projector"},
    # MSE on per-unit standardized teacher features: what results recorded before it had its own
    # name (benchmarks/results/*.json before the registry) call "kd+projector".
    "kd+projector_std": {"loss.feature": "projector_std"},
    "kd+cka": {"loss.feature": "cka"},
    "kd+random": {"loss.feature": "correlation", "selection.method": "random"},
    "kd+variance": {"loss.feature": "correlation", "selection.method": "variance"},
    # Flex-KD, units: each student unit with one of the teacher's most important units.
    "kd+flexkd": {"loss.feature": "correlation", "selection.method": "importance"},
    # Flex-KD, directions: each student unit with the teacher's coordinate on one of its task-gradient
    # directions; those coordinates are a cache of their own, not columns of the full-width one.
    "kd+flexkd-dir": {"loss.feature": "correlation", "selection.method": "directions", "targets.full_width": False},
    # A pruned student only: each student unit with the teacher unit it was cut from.
    "kd+flexkd-id": {"loss.feature": "correlation", "selection.method": "identity"},
}
KEY_METHODS = ("kd+flexkd", "kd+flexkd-dir", "kd+projector", "kd+projector_std", "kd")
# Every Flex-KD variant against every baseline (benchmarks.regimes), then the ablations of the
# selection and the logit-only step, where they ran.
COMPARISONS = (
    *((a, b) for a in ("kd+flexkd-id", "kd+flexkd", "kd+flexkd-dir") for b in BASELINES),
    ("kd+flexkd", "kd+random"),
    ("kd+flexkd", "kd+variance"),
    ("kd+flexkd", "kd+cka"),
    ("kd", "ft"),
)
# The selection the shared full-width teacher-target cache is built for (by kd+flexkd's config):
# a run selecting other units reads its columns there instead of building a cache of its own.
SHARED_CACHE_SELECTION = "importance"


@dataclass(frozen=True)
class QualitySettings:
    """The sizes of one benchmark run; ``cpu()`` fits 60 minutes on 2 cores, ``gpu()`` is the larger one."""

    train_rows: int
    score_rows: int
    teacher_rows: int
    steps: int
    batch_size: int
    seeds: tuple[int, ...]
    regime: str = "random-init"  # benchmarks.regimes
    labeled_rows: int | None = None  # low-label: the first rows keep their labels, the rest are transfer rows
    shuffle_buffer: int = 1024  # training.shuffle_buffer: the order of the training rows follows the seed
    learning_rate: float = 1e-3
    warmup_steps: int = 25
    gamma: float = 1.0
    beta: float = 1.0
    temperature: float = 2.0
    layer_map: str = "uniform"
    k: int | None = None  # selected teacher units per mapped layer; None: the student's hidden size
    use_gpu: bool = False
    precision: str = "float32"  # training.precision
    # One CPU reserved (the other stays free for Ray Data's read tasks) and one torch thread: on a
    # machine where other jobs keep more runnable threads than cores, two threads per process were
    # measured 5-10x slower than one (each step waits at a barrier for a descheduled thread).
    cpus_per_worker: float = 1
    threads_per_worker: int = 1

    @classmethod
    def cpu(cls) -> QualitySettings:
        # Sized for 2 cores shared with other jobs (measured: the teacher forward ran at about 2
        # sentences/s under a load average of 15-30; a run of 150 steps and its evaluation about
        # 2 min): 25 runs of 120 steps, the shared stages and the teacher fit 60 minutes.
        return cls(
            train_rows=1000,
            score_rows=96,
            teacher_rows=3000,
            steps=120,
            batch_size=32,
            seeds=(0, 1, 2, 3, 4),
            warmup_steps=10,
        )

    @classmethod
    def for_regime(cls, name: str, gpu: bool = False) -> QualitySettings:
        """The CPU or GPU setting with what regime ``name`` changes in it."""
        from benchmarks.regimes import regime

        chosen = regime(name)
        return replace(cls.gpu() if gpu else cls.cpu(), regime=name, **(chosen.gpu if gpu else chosen.cpu))

    @classmethod
    def gpu(cls) -> QualitySettings:
        return cls(
            train_rows=60614,
            score_rows=2048,
            teacher_rows=20000,
            steps=4000,
            batch_size=64,
            seeds=(0, 1, 2, 3, 4),
            shuffle_buffer=8192,
            use_gpu=True,
            precision="bf16",
            cpus_per_worker=4,
            threads_per_worker=4,
        )


def pipeline_overrides(settings: QualitySettings, teacher_dir: Path, work_dir: Path) -> dict[str, Any]:
    """pipelines/sst2.yaml made into the benchmark's common config (before method and seed), in
    the settings' regime."""
    from benchmarks.regimes import student_overrides, transfer_set_path

    labeled = settings.labeled_rows or settings.train_rows
    return {
        "name": "bench-quality" + ("-gpu" if settings.use_gpu else ""),
        "artifact_root": str(work_dir / "runs"),
        "tracking.tracking_uri": tracking_uri(work_dir),
        "tracking.experiment": "flexkd-bench-quality",
        "teacher": {"source": "hf", "path": str(teacher_dir), "name": "SmolLM2-135M-Instruct+sst2-verbalizer"},
        **student_overrides(settings.regime),
        "data.train.path": str(SHARED_DATA / "sst2" / "train.tsv"),
        "data.train.limit": labeled,
        **(
            {"data.transfer": {"path": str(transfer_set_path(work_dir, labeled, settings.train_rows))}}
            if labeled < settings.train_rows
            else {}
        ),
        "data.eval.path": str(SHARED_DATA / "sst2" / "test.tsv"),
        "data.score.path": str(SHARED_DATA / "sst2" / "dev.tsv"),
        "data.score.limit": settings.score_rows,
        "layer_map": settings.layer_map,
        "selection.k": settings.k,
        "loss.alpha": 1.0,
        "loss.beta": settings.beta,
        "loss.gamma": settings.gamma,
        "loss.temperature": settings.temperature,
        "training.steps": settings.steps,
        "training.batch_size": settings.batch_size,
        "training.learning_rate": settings.learning_rate,
        "training.warmup_steps": settings.warmup_steps,
        "training.precision": settings.precision,
        "training.shuffle_buffer": settings.shuffle_buffer,
        "training.log_every": 50,
        "training.checkpoint_every": settings.steps,
        "training.teacher": "cache",
        "targets.full_width": True,
        "targets.batch_size": 32,
        "evaluation.batch_size": 64,
        "evaluation.samples": 20,
        "resources.num_workers": 1,
        "resources.cpus_per_worker": settings.cpus_per_worker,
        "resources.use_gpu": settings.use_gpu,
        "resources.threads_per_worker": settings.threads_per_worker,
    }


def tracking_uri(work_dir: Path) -> str:
    return f"sqlite:///{work_dir / 'mlflow.db'}"


def method_config(
    settings: QualitySettings,
    teacher_dir: Path,
    work_dir: Path,
    method: str,
    seed: int,
    cache_dir: Path | None = None,
    extra: dict[str, Any] | None = None,
):
    """The pipeline of one (method, seed). ``cache_dir``: the full-width teacher-target cache that
    a method selecting other units than SHARED_CACHE_SELECTION reads instead of building its own;
    ``extra``: further overrides (the speed benchmark's, a tuned method's best values)."""
    from flexkd.config.schema import load_config

    overrides = pipeline_overrides(settings, teacher_dir, work_dir) | METHODS[method]
    overrides |= {"student.seed": seed, "training.seed": seed} | (extra or {})
    config = load_config(PIPELINE, overrides)
    # Decided on the resolved config: a pruned student selects 'identity' unless its method says otherwise.
    if cache_dir is not None and config.targets.full_width and config.selection.method != SHARED_CACHE_SELECTION:
        config = load_config(PIPELINE, overrides | {"targets.path": str(cache_dir)})
    return config


# The teacher's adaptation (teacher.adapt, the adapt stage): SmolLM2's top 4 of 30 blocks, its final
# norm and its verbalizer rows, on the first ``teacher_rows`` SST-2 training sentences, the last
# tenth held out to keep the best epoch. Not registered: the benchmark points every method at the folder.
TEACHER_ADAPT = {
    "trainable": "top_blocks",
    "top_blocks": 4,
    "learning_rate": 5e-5,
    "epochs": 3,
    "batch_size": 32,
    "heldout_fraction": 0.1,
    "register": False,
}


def teacher_config(settings: QualitySettings, work_dir: Path):
    """pipelines/sst2.yaml's base teacher with ``teacher.adapt``, on the teacher's training rows."""
    from flexkd.config.schema import load_config

    return load_config(
        PIPELINE,
        {
            "name": "bench-quality-teacher" + ("-gpu" if settings.use_gpu else ""),
            "artifact_root": str(work_dir / "runs"),
            "tracking.tracking_uri": tracking_uri(work_dir),
            "tracking.experiment": "flexkd-bench-quality",
            "teacher.adapt": TEACHER_ADAPT,
            "data.train.path": str(SHARED_DATA / "sst2" / "train.tsv"),
            "data.train.limit": settings.teacher_rows,
            "data.eval.path": str(SHARED_DATA / "sst2" / "test.tsv"),
            "data.score.path": str(SHARED_DATA / "sst2" / "dev.tsv"),
            "resources.num_workers": 1,
            "resources.cpus_per_worker": settings.cpus_per_worker,
            "resources.use_gpu": settings.use_gpu,
            "resources.threads_per_worker": settings.threads_per_worker,
        },
    )


def sst2_teacher(settings: QualitySettings, work_dir: Path) -> tuple[Path, dict[str, Any]]:
    """The SST-2-adapted teacher's folder, from the pipeline's own adapt stage (run on first use,
    reused by its fingerprint after), and the stage's record plus ``made_now`` and ``seconds``."""
    from flexkd.pipeline.runner import run_pipeline

    adapted = run_pipeline(teacher_config(settings, work_dir), stages=("tokenize", "adapt")).stages["adapt"]
    seconds = stage_seconds(adapted)
    record = adapted.outputs | {"made_now": not adapted.cached, "seconds": seconds, "settings": TEACHER_ADAPT}
    return Path(adapted.outputs["teacher_dir"]), record


def results_name(regime: str, label: str | None = None) -> str:
    """``quality-<regime>``, or ``quality-<regime>-<label>`` for a variant (an investigation run) kept beside it."""
    if label is None:
        return f"quality-{regime}"
    if not re.fullmatch(r"[a-z0-9][a-z0-9-]*", label):
        from flexkd.config.schema import ConfigError

        raise ConfigError(f"--label {label!r}: use lower-case letters, digits and '-' (it names results files)")
    return f"quality-{regime}-{label}"


def run_quality(
    settings: QualitySettings,
    work_dir: Path = DEFAULT_WORK_DIR,
    methods: tuple[str, ...] | None = None,
    results_dir: Path = RESULTS,
    label: str | None = None,
    tune: bool = False,
) -> dict[str, Any]:
    """Every (method, seed) of ``settings`` (methods: by default the regime's); writes
    ``results_dir/<results_name(regime, label)>.{json,md,png}``. ``tune``: each method first finds
    its own values on held-out rows (benchmarks.quality_tuned)."""
    from benchmarks.quality_tuned import tune_methods
    from benchmarks.regimes import regime, write_transfer_set
    from flexkd.models.plan import plan_models
    from flexkd.pipeline.runner import run_pipeline
    from flexkd.stages.evaluate import EVAL_PREDICTIONS

    chosen = regime(settings.regime)
    methods = methods or chosen.methods
    name = results_name(settings.regime, label)
    if tune and label is None:
        from flexkd.config.schema import ConfigError

        raise ConfigError("--tune makes a variant: name it with --label NAME")

    work_dir.mkdir(parents=True, exist_ok=True)
    command = command_line()
    started = time.time()
    if settings.labeled_rows is not None:
        write_transfer_set(work_dir, settings.labeled_rows, settings.train_rows)
    with LoadMonitor() as load:
        teacher_dir, teacher_record = sst2_teacher(settings, work_dir)
        runs: list[dict[str, Any]] = []
        shared_seconds: dict[str, float] = {}
        score_dirs: dict[str, Path] = {}
        reused_seconds = 0.0 if teacher_record.get("made_now") else teacher_record["seconds"]
        # One teacher pass for every method: the importance selection's full-width cache.
        prepared = run_pipeline(
            method_config(settings, teacher_dir, work_dir, "kd+flexkd", settings.seeds[0]), stages=SHARED_STAGES
        )
        cache_dir = Path(prepared.stages["targets"].directory)
        # A pruned student's layer pairs are known once the score stage has chosen its blocks.
        layer_pairs = plan_models(prepared.config, Path(prepared.stages["score"].directory)).layer_pairs
        rows = prepared.stages["tokenize"].outputs["rows"]
        for stage in SHARED_STAGES:
            key = stage if stage == "tokenize" else f"{stage}/{prepared.config.selection.method}"
            shared_seconds[key] = stage_seconds(prepared.stages[stage])
            if prepared.stages[stage].cached:  # built by an earlier invocation
                reused_seconds += shared_seconds[key]
        tuning = tune_methods(settings, teacher_dir, work_dir, methods) if tune else None
        best = {method: sweep["best"] for method, sweep in tuning["methods"].items()} if tuning else {}
        stop_file = work_dir / STOP_FILE
        stop_file.unlink(missing_ok=True)
        for seed, method in run_order(methods, settings.seeds, chosen.methods):
            if stop_file.exists():
                log.warning("bench quality: %s found, stopping after %d runs", stop_file, len(runs))
                break
            config = method_config(settings, teacher_dir, work_dir, method, seed, cache_dir, best.get(method))
            result = run_pipeline(config, stages=RUN_STAGES)
            # The importance selection described is kd+flexkd's (kd and the projector score at their own,
            # possibly tuned, layer maps too, and run after it).
            if method == "kd+flexkd" or config.selection.method not in score_dirs:
                score_dirs[config.selection.method] = Path(result.stages["score"].directory)
            for stage in SHARED_STAGES:
                key = stage if stage == "tokenize" else f"{stage}/{config.selection.method}"
                if key not in shared_seconds and not (stage == "targets" and config.targets.path):
                    shared_seconds[key] = stage_seconds(result.stages[stage])
                    if result.stages[stage].cached:  # built by an earlier invocation
                        reused_seconds += shared_seconds[key]
            distill, evaluate = result.stages["distill"], result.stages["evaluate"]
            metrics = evaluate.outputs["metrics"]
            runs.append(
                {
                    "method": method,
                    "seed": seed,
                    "accuracy": metrics["student.accuracy"],
                    # Per test sentence in example_id order, "1" where the student is right: McNemar's input.
                    "correct": correctness(Path(evaluate.directory) / EVAL_PREDICTIONS),
                    "macro_f1": metrics["student.macro_f1"],
                    "teacher_accuracy": metrics["teacher.accuracy"],
                    "extra_trainable_parameters": distill.outputs["extra_trainable_parameters"],
                    "student_parameters": distill.outputs["student_parameters"],
                    "tokens_per_second": distill.outputs["tokens_per_second"],
                    "distill_seconds": round(distill.seconds, 1),
                    "evaluate_seconds": round(evaluate.seconds, 1),
                    "final_losses": {k: distill.outputs[k] for k in ("total", "task", "logit", "feature")},
                    "pipeline_run_id": result.run_id,
                    "distill_dir": str(distill.directory),
                }
            )
            log.info("bench quality: %s seed %d: accuracy %.4f", method, seed, metrics["student.accuracy"])
            (work_dir / "quality.partial.json").write_text(json.dumps(runs, indent=1))
    results = {
        "benchmark": name,
        "label": label,
        "command": command,
        "machine": machine(),
        "load": load.summary(),
        "settings": asdict(settings),
        "regime": {"name": chosen.name, "student": chosen.student, "budget": chosen.budget},
        "rows": rows,
        "layer_pairs": [list(pair) for pair in layer_pairs],
        "pipeline": str(PIPELINE.relative_to(REPO)),
        "common_overrides": pipeline_overrides(settings, Path("<adapted teacher>"), Path("<work dir>")),
        "methods": METHODS,
        "tuning": tuning,
        "teacher": teacher_record | {"folder": str(teacher_dir)},
        "shared_stage_seconds": shared_seconds,
        "runs": runs,
        "wall_seconds": round(time.time() - started, 1),
        "reused_seconds": round(reused_seconds, 1),
        "finished_at": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }
    results["selection_diagnostics"] = selection_diagnostics(score_dirs)
    results |= summarize(runs, methods)
    plot = plot_quality(results, results_dir / f"{name}.png")
    write_results(name, results, quality_markdown(results), plot, tracking_uri(work_dir), results_dir)
    return results


def run_order(
    methods: tuple[str, ...], seeds: tuple[int, ...], key: tuple[str, ...] = KEY_METHODS
) -> list[tuple[int, str]]:
    """The headline comparison first (the ``key`` methods at every seed, seed-major), then the other
    methods, seed-major: a benchmark ended early (STOP_FILE) on a slow machine still answers the
    main question with a seed spread."""
    first = [m for m in key if m in methods]
    rest = [m for m in methods if m not in first]
    return [(seed, m) for seed in seeds for m in first] + [(seed, m) for seed in seeds for m in rest]


def correctness(predictions_file: Path) -> str:
    """The evaluate stage's eval_predictions.jsonl as one character per eval row in example_id
    order: "1" where the student's prediction is the label, "0" where not."""
    rows = sorted(
        (json.loads(line) for line in predictions_file.read_text().splitlines()), key=lambda row: row["example_id"]
    )
    return "".join("1" if row["prediction"] == row["label"] else "0" for row in rows)


def summarize(runs: list[dict[str, Any]], methods: tuple[str, ...]) -> dict[str, Any]:
    """Per method: mean and std over seeds; per comparison (A, B): the paired (same seed)
    differences of accuracy, a 95% bootstrap interval of their mean, and an exact McNemar test on
    the per-sentence correctness of every common seed, pooled (benchmarks.stats)."""
    table, accuracy = {}, {}
    for method in methods:
        mine = [run for run in runs if run["method"] == method]
        if not mine:
            continue
        accuracy[method] = {run["seed"]: 100 * run["accuracy"] for run in mine}
        mean, std = mean_std(list(accuracy[method].values()))
        table[method] = {
            "accuracy_mean": round(mean, 2),
            "accuracy_std": round(std, 2),
            "seeds": len(mine),
            "per_seed": {seed: round(value, 2) for seed, value in accuracy[method].items()},
            "extra_trainable_parameters": mine[0]["extra_trainable_parameters"],
            "distill_seconds_mean": round(mean_std([run["distill_seconds"] for run in mine])[0], 1),
            "tokens_per_second_mean": round(mean_std([run["tokens_per_second"] for run in mine])[0], 1),
        }
    correct = {(run["method"], run["seed"]): run.get("correct") for run in runs}
    comparisons = []
    for a, b in COMPARISONS:
        if a not in table or b not in table:
            continue
        paired = paired_differences(accuracy[a], accuracy[b])
        if not paired:
            continue
        paired_mean, paired_std = mean_std(list(paired.values()))
        low, high = bootstrap_mean_interval(list(paired.values()))
        comparison = {
            "a": a,
            "b": b,
            "seeds": len(paired),
            "paired_difference": {seed: round(value, 2) for seed, value in paired.items()},
            "paired_difference_mean": round(paired_mean, 2),
            "paired_difference_std": round(paired_std, 2),
            "ci95": [round(low, 2), round(high, 2)],
            "ci_excludes_zero": low > 0 or high < 0,
            "a_wins_seeds": sum(value > 0 for value in paired.values()),
            "verdict": verdict_word((low, high)),
        }
        if all(correct.get((method, seed)) for method in (a, b) for seed in paired):
            test = mcnemar_exact(
                [c == "1" for seed in paired for c in correct[(a, seed)]],
                [c == "1" for seed in paired for c in correct[(b, seed)]],
            )
            comparison["mcnemar"] = {"a_only": test.a_only, "b_only": test.b_only, "p": test.p}
        comparisons.append(comparison)
    teacher = [run["teacher_accuracy"] for run in runs]
    headline = {f"accuracy.{m}": v["accuracy_mean"] for m, v in table.items()}
    if teacher:
        headline["accuracy.teacher"] = round(100 * teacher[0], 2)
    return {"table": table, "comparisons": comparisons, "headline": headline}


def selection_diagnostics(score_dirs: dict[str, Path]) -> dict[str, dict[str, float]]:
    """Per mapped teacher layer: how concentrated the importance is (the share of the summed
    importance that the selected units hold, against k / d for a flat score) and how many of the
    importance-selected units the variance and random selections also pick."""
    import numpy as np

    if "importance" not in score_dirs:
        return {}
    selected = {
        method: json.loads((directory / "selected.json").read_text())["layers"]
        for method, directory in score_dirs.items()
    }
    diagnostics = {}
    for layer, entry in selected["importance"].items():
        importance = np.load(score_dirs["importance"] / "importance" / f"layer_{layer}.npy")
        chosen = set(entry["indices"])
        row = {
            "k": entry["k"],
            "d_teacher": entry["d_teacher"],
            "importance_share_of_top_k": round(float(importance[entry["indices"]].sum() / importance.sum()), 3),
            "flat_share": round(entry["k"] / entry["d_teacher"], 3),
        }
        for method in ("variance", "random"):
            if layer in selected.get(method, {}):  # absent where that selection ran at another layer map
                row[f"overlap_with_{method}"] = round(
                    len(chosen & set(selected[method][layer]["indices"])) / entry["k"], 3
                )
        diagnostics[layer] = row
    return diagnostics


def verdict(comparison: dict[str, Any]) -> str:
    """The comparison as a sentence: the word follows the 95% interval (beats / trails when it
    excludes 0 on that side, ties otherwise), then the numbers behind it."""
    a, b, seeds = comparison["a"], comparison["b"], comparison["seeds"]
    low, high = comparison["ci95"]
    sentence = (
        f"**{a} {comparison['verdict']} {b}**: paired difference {comparison['paired_difference_mean']:+.2f} "
        f"± {comparison['paired_difference_std']:.2f} points over {seeds} seeds, 95% CI [{low:+.2f}, {high:+.2f}], "
        f"which {'excludes' if comparison['ci_excludes_zero'] else 'includes'} 0; {a} ahead on "
        f"{comparison['a_wins_seeds']} of {seeds} seeds"
    )
    test = comparison.get("mcnemar")
    if test:
        sentence += (
            f"; McNemar over the sentences of those seeds: {test['a_only']} right only with {a}, "
            f"{test['b_only']} only with {b}, p = {_p_value(test['p'])}"
        )
    return sentence


def _p_value(p: float) -> str:
    return "< 0.0001" if p < 1e-4 else f"{p:.3g}"


def comparisons_table(comparisons: list[dict[str, Any]]) -> list[str]:
    """The comparisons as a markdown table, one row each."""
    lines = [
        "| A | B | paired difference (mean ± std, points) | 95% CI | A ahead (seeds) | McNemar: A only / B only | p | verdict |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for c in comparisons:
        test = c.get("mcnemar")
        mcnemar = f"{test['a_only']} / {test['b_only']} | {_p_value(test['p'])}" if test else "- | -"
        excludes = "excludes 0" if c["ci_excludes_zero"] else "includes 0"
        lines.append(
            f"| {c['a']} | {c['b']} | {c['paired_difference_mean']:+.2f} ± {c['paired_difference_std']:.2f} | "
            f"[{c['ci95'][0]:+.2f}, {c['ci95'][1]:+.2f}] ({excludes}) | {c['a_wins_seeds']} of {c['seeds']} | "
            f"{mcnemar} | {c['verdict']} |"
        )
    return lines


def _adapt_sentence(teacher: dict[str, Any]) -> str:
    """What the adapt stage did to the teacher, from its record (flexkd/stages/adapt.py)."""
    adapt = teacher["settings"]
    trained = {
        "top_blocks": f"the top {adapt.get('top_blocks')} blocks, the final norm and the verbalizer rows",
        "head": "the verbalizer rows",
        "all": "every weight",
    }[adapt["trainable"]]
    before, after = teacher["heldout_before"]["accuracy"], teacher["heldout_after"]["accuracy"]
    kept = f"epoch {teacher['kept_epoch']}" if teacher["kept_epoch"] else "the base teacher (no epoch beat it)"
    return (
        f"`teacher.adapt`: {trained} trained at learning rate {adapt['learning_rate']:g}, batch "
        f"{adapt['batch_size']}, {teacher['steps']} steps over {adapt.get('epochs') or 1} epochs of "
        f"{teacher['train_rows']} SST-2 training sentences; on the {teacher['heldout_rows']} held out after them "
        f"{100 * before:.2f}% before and {100 * after:.2f}% after, kept {kept}, which those rows chose, "
        f"so that number leans high"
    )


def quality_markdown(results: dict[str, Any]) -> str:
    settings, teacher, load, regime = results["settings"], results["teacher"], results["load"], results["regime"]
    name, label = results["benchmark"], results.get("label")
    lines = [
        f"## Quality: SST-2 classification, regime `{regime['name']}`" + (f", variant `{label}`" if label else ""),
        "",
        f"Command: `{results['command']}` (finished {results['finished_at']}, wall time {results['wall_seconds'] / 60:.1f} min; "
        f"it reused {results['reused_seconds'] / 60:.1f} min of teacher adaptation and shared stages built by an earlier "
        f"invocation, so a run from scratch takes about {(results['wall_seconds'] + results['reused_seconds']) / 60:.0f} min)",
        "",
        f"Machine: {results['machine']['cpus']} CPUs ({results['machine']['cpu_model']}), GPU: {results['machine']['gpu']}, "
        f"torch {results['machine']['torch']}, commit {results['machine']['git_commit']}"
        f"{' (uncommitted changes)' if results['machine']['git_dirty'] else ''}.",
        f"{load_sentence(load).capitalize()}.",
        "",
        f"Teacher: SmolLM2-135M-Instruct through the pipeline's adapt stage ({_adapt_sentence(teacher)}); "
        f"**test accuracy {results['headline'].get('accuracy.teacher', float('nan')):.2f}%** (evaluate stage, 872 sentences).",
        "",
        f"Regime `{regime['name']}`. {_student_sentence(results)}",
        "",
        f"{settings['train_rows']} training sentences, "
        f"{settings['steps']} steps of batch {settings['batch_size']}, AdamW lr {settings['learning_rate']} "
        f"(warmup {settings['warmup_steps']}, cosine), loss = task + {settings['beta']} x KL(T={settings['temperature']}) "
        f"+ {settings['gamma']} x feature loss summed over the {settings['layer_map']} layer map "
        f"(teacher block -> student block: {', '.join(f'{t}->{s}' for t, s in results['layer_pairs'])}), "
        "identical for every method; importance scored on "
        f"{settings['score_rows']} dev sentences at those teacher layers; the selections keep "
        f"{settings.get('k') or 192} of the teacher's 576 units (or directions) per layer. Distill precision "
        f"{settings.get('precision', 'float32')}. Seeds {list(settings['seeds'])}: a seed sets the student's init, "
        f"a projector's init and the order of the training rows (a seeded shuffle of {settings['shuffle_buffer']} rows "
        "each epoch), the same for every method at that seed. Accuracy on test.tsv (872 sentences). "
        f"{regime['budget']}",
        "",
    ]
    if results.get("tuning"):
        from benchmarks.quality_tuned import tuning_markdown

        lines += tuning_markdown(results["tuning"])
    lines += [
        "| method | accuracy % (mean ± std) | per seed | extra trainable params | distill s / run |",
        "|---|---|---|---|---|",
    ]
    for method, row in results["table"].items():
        per_seed = ", ".join(f"{v:.2f}" for v in row["per_seed"].values())
        lines.append(
            f"| {method} | {row['accuracy_mean']:.2f} ± {row['accuracy_std']:.2f} (n={row['seeds']}) | {per_seed} | "
            f"{row['extra_trainable_parameters']:,} | {row['distill_seconds_mean']:.0f} |"
        )
    lines += ["", f"![{name}](results/{name}.png)", ""]
    if results["comparisons"]:
        lines += [
            "Comparisons, paired by seed (A minus B, accuracy points): the mean and std of the per-seed "
            "differences, a 95% percentile-bootstrap interval of their mean (10,000 resamples of the seeds, "
            "RNG seed 0; with 5 seeds it runs narrow), and an exact McNemar test on the test sentences of every "
            "seed pooled (the pairs where exactly one of A and B is right; it takes each (sentence, seed) pair "
            "as independent). The verdict follows the interval: beats or trails when it excludes 0, ties otherwise "
            "(benchmarks/stats.py).",
            "",
            *comparisons_table(results["comparisons"]),
            "",
        ]
        lines += [f"- {verdict(c)}." for c in results["comparisons"]]
    else:
        lines.append("No two of the compared methods ran in this invocation: read it against the main table.")
    diagnostics = results.get("selection_diagnostics") or {}
    if diagnostics:
        lines += [
            "",
            "Selected teacher units (k of d per mapped layer): the share of the summed importance the top-k "
            "hold (a flat score gives k/d), and the fraction of them the variance and random selections also pick:",
            "",
            "| teacher layer | importance share of top-k | k/d | overlap with variance | overlap with random |",
            "|---|---|---|---|---|",
        ]
        lines += [
            f"| {layer} | {row['importance_share_of_top_k']:.3f} | {row['flat_share']:.3f} | "
            f"{_share(row.get('overlap_with_variance'))} | {_share(row.get('overlap_with_random'))} |"
            for layer, row in diagnostics.items()
        ]
    shared = ", ".join(f"{k} {v:.0f} s" for k, v in results["shared_stage_seconds"].items())
    lines += [
        "",
        f"Shared stages (each run once, then reused by fingerprint by every method and seed; their own "
        f"run times, possibly from an earlier invocation): {shared}. Teacher adaptation: {teacher['seconds']:.0f} s.",
        "",
    ]
    return "\n".join(lines)


def _student_sentence(results: dict[str, Any]) -> str:
    """The regime's sentence on the student and its data, its numbers filled in."""
    from flexkd.stages.distill import transfer_rows_per_batch

    settings, rows = results["settings"], results.get("rows", {})
    labeled, transfer = rows.get("train", settings["train_rows"]), rows.get("transfer", 0)
    transfer_per_batch = transfer_rows_per_batch(settings["batch_size"], labeled, transfer) if transfer else 0
    return results["regime"]["student"].format(
        labeled_rows=labeled,
        transfer_rows=transfer,
        batch_size=settings["batch_size"],
        labeled_per_batch=settings["batch_size"] - transfer_per_batch,
        transfer_per_batch=transfer_per_batch,
    )


def _share(value: float | None) -> str:
    """A fraction for the diagnostics table; a dash where that selection did not run."""
    return "-" if value is None else f"{value:.3f}"


def plot_quality(results: dict[str, Any], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path.parent.mkdir(parents=True, exist_ok=True)
    methods = list(results["table"])
    means = [results["table"][m]["accuracy_mean"] for m in methods]
    stds = [results["table"][m]["accuracy_std"] for m in methods]
    figure, axis = plt.subplots(figsize=(8, 4))
    axis.bar(methods, means, yerr=stds, capsize=4, color="#9ab")
    for index, method in enumerate(methods):
        seeds = list(results["table"][method]["per_seed"].values())
        axis.scatter([index] * len(seeds), seeds, color="k", s=10, zorder=3)
    teacher = results["headline"].get("accuracy.teacher")
    if teacher:
        axis.axhline(teacher, color="tab:red", linestyle="--", label=f"teacher {teacher:.1f}")
        axis.legend(loc="lower right")
    low = min(min(seeds) for seeds in (list(r["per_seed"].values()) for r in results["table"].values()))
    axis.set_ylim(max(0, low - 3), max([*means, teacher or 0]) + 3)
    axis.set_ylabel("SST-2 test accuracy (%)")
    seeds = sorted({row["seeds"] for row in results["table"].values()})
    axis.set_title(
        f"{results['regime']['name']}: student d=192, 4 layers; mean ± std over seeds "
        f"(n = {', '.join(map(str, seeds))}), dots: seeds"
    )
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


def with_overrides(settings: QualitySettings, **values: Any) -> QualitySettings:
    return replace(settings, **{key: value for key, value in values.items() if value is not None})
