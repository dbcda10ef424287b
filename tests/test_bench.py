"""The benchmark harness without running a benchmark: its configs validate, every method differs
from the others only where it should, seeds share the teacher-side stages, the summary and the
verdict say what the numbers say, and the teacher comes from the pipeline's adapt stage."""

from __future__ import annotations

import json
import math
import time
import typing
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from benchmarks.common import mean_std
from benchmarks.page import write_results_page
from benchmarks.quality import METHODS, QualitySettings, method_config, summarize, verdict
from benchmarks.regimes import REGIMES
from flexkd.cli import build_parser
from flexkd.config.schema import SelectionConfig
from flexkd.method.registry import FEATURE_LOSSES
from flexkd.pipeline.runner import stage_fingerprint
from flexkd.stages.distill import STEP_PHASES, StepProfile

SETTINGS = QualitySettings.cpu()
TMP = Path("/tmp/flexkd-bench-test")


def _config(method: str, seed: int = 0, tmp: Path = TMP, settings: QualitySettings = SETTINGS, cache_dir=None):
    return method_config(settings, tmp / "teacher", tmp, method, seed, cache_dir)


def _schema_knows(method: str) -> bool:
    """Whether this checkout's config schema has the method's loss and selection: projector_std and
    the directions selection come from other branches, and their configs validate once merged."""
    values = METHODS[method]
    selections = typing.get_args(SelectionConfig.model_fields["method"].annotation)
    return (
        values.get("loss.feature", "correlation") in (*FEATURE_LOSSES, "none")
        and values.get("selection.method", "importance") in selections
    )


def _methods_of(regime: str) -> list[str]:
    """The methods that validate in ``regime`` on this checkout (identity pairing: a pruned student's only)."""
    return [
        method
        for method in METHODS
        if _schema_knows(method) and (regime == "pruned" or METHODS[method].get("selection.method") != "identity")
    ]


@pytest.mark.parametrize("regime", list(REGIMES))
def test_every_method_validates_and_shares_everything_but_its_loss_and_selection(regime):
    settings = QualitySettings.for_regime(regime)
    base = _config("kd+flexkd", settings=settings).model_dump(mode="json")
    methods = _methods_of(regime)
    assert {"kd+flexkd", "kd+projector", "kd"} <= set(methods)
    for method in methods:
        config = _config(method, settings=settings).model_dump(mode="json")
        assert config["training"] == base["training"] and config["data"] == base["data"], method
        assert config["teacher"] == base["teacher"] and config["student"] == base["student"], method
        assert config["layer_map"] == base["layer_map"], method
        differing = {section for section in base if config[section] != base[section]}
        # A directions run caches its coordinates, not every unit (targets.full_width false).
        assert differing <= {"loss", "selection", "targets"}, (method, differing)
        assert config["targets"]["full_width"] is (METHODS[method].get("selection.method") != "directions"), method


def test_each_regime_sets_its_student_and_its_data(tmp_path):
    from benchmarks.regimes import STUDENT_SHAPE, transfer_set_path

    random_init, pruned, low_label = (QualitySettings.for_regime(name) for name in REGIMES)
    assert (random_init.steps, len(random_init.seeds)) == (120, 5) and random_init.labeled_rows is None
    student = _config("kd", settings=random_init).student
    assert student.init == "random" and student.architecture == STUDENT_SHAPE | {"tie_word_embeddings": True}

    config = _config("kd", settings=pruned)
    assert (config.student.init, config.student.layer_selection) == ("prune_from_teacher", "uniform")
    assert config.student.architecture == STUDENT_SHAPE and config.layer_map == "source"
    assert config.selection.method == "identity" and config.training.learning_rate == 5e-4
    # With the shared full-width cache (built for importance), every other unit pairing reads it.
    cache = tmp_path / "cache"
    targets = {
        method: _config(method, settings=pruned, cache_dir=cache).targets.path for method in _methods_of("pruned")
    }
    # kd+flexkd builds the shared cache; a directions run caches its own coordinates.
    assert targets.pop("kd+flexkd") is None and targets.pop("kd+flexkd-dir", None) is None
    assert set(targets.values()) == {str(cache)}
    assert _config("kd+flexkd-id", settings=pruned).selection.method == "identity"

    config = _config("kd+flexkd", settings=low_label)
    assert low_label.labeled_rows == 256 and config.data.train.limit == 256
    assert config.data.transfer.path == str(transfer_set_path(TMP, 256, 1000))
    assert _config("kd+flexkd", settings=random_init).data.transfer is None
    assert QualitySettings.for_regime("low-label", gpu=True).labeled_rows == 1024

    # A seed changes the distill stage only, in every regime (a pruned student is cut once for all).
    for settings in (pruned, low_label):
        fingerprints = {}
        for stage in ("tokenize", "score", "targets", "distill"):
            inputs = {name: fingerprints[name] for name in ("tokenize", "score") if name in fingerprints}
            one, two = (stage_fingerprint(_config("kd", seed, settings=settings), stage, inputs) for seed in (0, 1))
            fingerprints[stage] = one
            assert (one == two) == (stage != "distill"), (settings.regime, stage)


def test_the_low_label_transfer_set_is_the_next_training_rows_without_their_labels(shared_data, tmp_path):
    from benchmarks.regimes import transfer_set_path, write_transfer_set
    from flexkd.config.schema import ConfigError

    path = write_transfer_set(tmp_path, 256, 1000)
    assert path == transfer_set_path(tmp_path, 256, 1000)
    header, *rows = path.read_text().splitlines()
    train = (shared_data / "sst2" / "train.tsv").read_text().splitlines()[1:]
    assert header == "sentence" and len(rows) == 744
    assert rows == [line.split("\t")[0] for line in train[256:1000]]
    assert not any("\t" in row for row in rows)
    with pytest.raises(ConfigError, match="1000 labeled rows"):
        write_transfer_set(tmp_path, 1000, 1000)


def test_the_gpu_setting_distills_in_bf16_and_the_cpu_setting_in_float32(shared_data, tmp_path):
    from benchmarks.generation import GenerationSettings
    from benchmarks.speed import SpeedSettings, generation_config

    gpu = method_config(QualitySettings.gpu(), tmp_path / "teacher", tmp_path, "kd+flexkd", 0)
    assert (gpu.training.precision, _config("kd+flexkd").training.precision) == ("bf16", "float32")
    assert GenerationSettings.gpu().precision == "bf16" and GenerationSettings.cpu().precision == "float32"
    assert generation_config(SpeedSettings.gpu(), tmp_path).training.precision == "bf16"
    assert generation_config(SpeedSettings.cpu(), tmp_path).training.precision == "float32"


def test_seeds_share_tokenize_score_and_targets_but_not_distill():
    one, two = _config("kd+flexkd", seed=0), _config("kd+flexkd", seed=1)
    fingerprints = {}
    for stage in ("tokenize", "score", "targets", "distill"):
        inputs = {
            name: fingerprints[name] for name in ("tokenize", "score") if name in fingerprints and stage != "tokenize"
        }
        first, second = stage_fingerprint(one, stage, inputs), stage_fingerprint(two, stage, inputs)
        fingerprints[stage] = first
        assert (first == second) == (stage != "distill"), stage


def test_selection_method_changes_the_score_stage():
    assert stage_fingerprint(_config("kd+flexkd"), "score", {"tokenize": "x"}) != stage_fingerprint(
        _config("kd+random"), "score", {"tokenize": "x"}
    )


def test_summary_and_verdict_follow_the_numbers():
    accuracies = {"kd": [0.70, 0.72, 0.74], "kd+flexkd": [0.75, 0.76, 0.77], "kd+projector": [0.76, 0.75, 0.79]}
    # Per test sentence: kd+flexkd is right on one sentence per seed that kd gets wrong.
    correct = {"kd": "1000", "kd+flexkd": "1100", "kd+projector": "1011"}
    runs = [
        {
            "method": method,
            "seed": seed,
            "accuracy": accuracy,
            "correct": correct[method],
            "teacher_accuracy": 0.82,
            "extra_trainable_parameters": 0,
            "distill_seconds": 1.0,
            "tokens_per_second": 1.0,
        }
        for method, values in accuracies.items()
        for seed, accuracy in enumerate(values)
    ]
    summary = summarize(runs, tuple(accuracies))
    assert summary["table"]["kd"]["accuracy_mean"] == pytest.approx(72.0)
    assert summary["table"]["kd"]["accuracy_std"] == pytest.approx(2.0)
    comparisons = {(c["a"], c["b"]): c for c in summary["comparisons"]}
    assert set(comparisons) == {("kd+flexkd", "kd"), ("kd+flexkd", "kd+projector")}
    against_kd = comparisons[("kd+flexkd", "kd")]
    assert against_kd["paired_difference"] == {0: 5.0, 1: 4.0, 2: 3.0}
    assert (against_kd["paired_difference_mean"], against_kd["paired_difference_std"]) == (4.0, 1.0)
    low, high = against_kd["ci95"]
    assert 3.0 <= low <= 4.0 <= high <= 5.0 and against_kd["ci_excludes_zero"] and against_kd["a_wins_seeds"] == 3
    assert against_kd["verdict"] == "beats"
    # One discordant sentence per seed, always kd+flexkd's: 3 of 3, two-sided p = 2 / 2^3.
    assert against_kd["mcnemar"] == {"a_only": 3, "b_only": 0, "p": 0.25}
    sentence = verdict(against_kd)
    assert sentence.startswith("**kd+flexkd beats kd**: paired difference +4.00 ± 1.00 points over 3 seeds")
    assert "which excludes 0" in sentence and "3 right only with kd+flexkd, 0 only with kd, p = 0.25" in sentence
    # Differences -1, +1, -2 points: the interval holds 0, whatever the mean.
    against_projector = comparisons[("kd+flexkd", "kd+projector")]
    assert against_projector["verdict"] == "ties" and not against_projector["ci_excludes_zero"]
    assert against_projector["mcnemar"] == {"a_only": 3, "b_only": 6, "p": pytest.approx(0.5078125)}
    assert "which includes 0" in verdict(against_projector)


def test_mean_std_is_the_sample_std():
    assert mean_std([1.0, 3.0]) == (2.0, pytest.approx(2**0.5))
    assert mean_std([5.0]) == (5.0, 0.0)


def test_the_teacher_is_the_adapt_stages_on_the_teachers_rows(tmp_path, monkeypatch):
    from benchmarks import quality
    from flexkd.pipeline.runner import PipelineResult, StageRecord, pipeline_stages

    settings = QualitySettings.cpu()
    config = quality.teacher_config(settings, tmp_path)
    assert pipeline_stages(config)[:2] == ("tokenize", "adapt")
    assert config.teacher.adapt.trainable == "top_blocks" and config.teacher.adapt.top_blocks == 4
    assert config.data.train.limit == settings.teacher_rows and config.teacher.source == "demo"
    ran = []

    def adapt_only(config, stages):
        ran.append(stages)
        record = StageRecord("adapt", tmp_path, "f", {"teacher_dir": str(tmp_path / "teacher")}, 9.0, False, "r")
        return PipelineResult(config, "run", "uri", {"adapt": record})

    monkeypatch.setattr("flexkd.pipeline.runner.run_pipeline", adapt_only)
    folder, record = quality.sst2_teacher(settings, tmp_path)
    assert ran == [("tokenize", "adapt")] and folder == tmp_path / "teacher"
    assert record["made_now"] and record["seconds"] == 9.0 and record["settings"] == quality.TEACHER_ADAPT


def test_bench_command_parses_and_the_page_lists_every_section(tmp_path):
    args = build_parser().parse_args(["bench", "quality", "--seeds", "0,1", "--steps", "10"])
    assert (args.benchmark, args.seeds, args.steps, args.gpu) == ("quality", "0,1", 10, False)
    (tmp_path / "quality.md").write_text("## Quality: SST-2 classification\n\nnumbers\n")
    page = write_results_page(tmp_path, tmp_path / "RESULTS.md").read_text()
    assert "numbers" in page and "## Speed\n\nNot run yet." in page and "## Generation\n\nNot run yet." in page
    (tmp_path / "quality-last-layer.md").write_text("## Quality: variant last-layer\n")
    page = write_results_page(tmp_path, tmp_path / "RESULTS.md").read_text()
    assert page.index("numbers") < page.index("variant last-layer") < page.index("## Generation")


def test_a_quality_variant_is_kept_beside_the_main_table_and_its_options_belong_to_quality():
    from benchmarks.cli import run_benchmark
    from benchmarks.quality import results_name
    from flexkd.config.schema import ConfigError

    args = build_parser().parse_args(
        ["bench", "quality", "--layer-map", "last", "--score-rows", "872", "--label", "last"]
    )
    assert (args.layer_map, args.score_rows, args.label) == ("last", 872, "last")
    assert _config("kd+flexkd").selection.k is None
    fewer = method_config(replace(SETTINGS, k=96), Path("/tmp/t"), Path("/tmp/w"), "kd+flexkd", 0)
    assert fewer.selection.k == 96
    assert results_name("random-init") == "quality-random-init"
    assert results_name("pruned", "last-layer") == "quality-pruned-last-layer"
    with pytest.raises(ConfigError, match="--label"):
        results_name("pruned", "../escape")
    with pytest.raises(ConfigError, match="--gamma is an option of 'flexkd bench quality' only"):
        run_benchmark(build_parser().parse_args(["bench", "speed", "--gamma", "2"]))


def test_a_full_width_cache_serves_another_selection_and_a_partial_one_refuses():
    from flexkd.config.schema import ConfigError
    from flexkd.stages.distill import _stored_positions

    order = [5, 2, 7, 0, 1, 3, 4, 6]  # importance order of 8 teacher units, as the cache stored them
    info = {"unit_order": {"3": order}, "full_width": True}
    correlation, cka = _config("kd+random"), _config("kd+cka")
    same = {"3": {"indices": order}}
    other = {"3": {"indices": [4, 0, 6, 2]}}
    assert _stored_positions(correlation, info, same, 3, {3: 8}) is None  # the cache's first k are these
    assert _stored_positions(correlation, info, None, 3, {3: 8}) is None  # no score stage: the cache decides
    positions = _stored_positions(correlation, info, other, 3, {3: 8})[3]
    assert [order[p] for p in positions] == [4, 0, 6]  # the selected units, in the selection's order
    whole = _stored_positions(cka, info, other, 3, {3: 8})[3]
    assert [order[p] for p in whole] == list(range(8))  # index order for the whole-hidden baselines
    with pytest.raises(ConfigError, match="full_width"):
        _stored_positions(correlation, {"unit_order": {"3": order[:3]}, "full_width": False}, other, 3, {3: 3})


def test_the_headline_methods_run_first_at_every_seed():
    from benchmarks.quality import run_order

    key = ("kd+flexkd", "kd+flexkd-dir", "kd+projector", "kd+projector_std", "kd")
    order = run_order(tuple(METHODS), (0, 1))
    assert order[:10] == [(seed, method) for seed in (0, 1) for method in key]
    assert sorted(order) == sorted((seed, method) for seed in (0, 1) for method in METHODS)
    pruned = REGIMES["pruned"].methods
    assert run_order(("kd", "kd+flexkd-id"), (0,), pruned) == [(0, "kd+flexkd-id"), (0, "kd")]


def test_speed_page_puts_each_ratio_next_to_its_goal_and_both_profiles_side_by_side():
    from benchmarks.speed import SpeedSettings, ratios, speed_markdown

    plain = {phase: float(i + 1) for i, phase in enumerate(STEP_PHASES)}  # 1 .. 6 ms: a 21 ms step
    stage = plain | {"batch": 1.5}
    measured = {
        "flexkd_feature": {"tokens_per_second": 95.0, "ms_per_step": stage},
        "plain_loop_feature": {"tokens_per_second": 100.0, "ms_per_step": plain},
        "flexkd_logit_only": {"tokens_per_second": 96.0},  # measured where no profile was kept (a GPU)
        "plain_loop_logit_only": {"tokens_per_second": 110.0, "ms_per_step": plain},
    }
    rows = {row["name"]: row for row in ratios(measured, SpeedSettings.cpu())}
    assert rows["flexkd_over_plain_loop"]["value"] == 0.95 and rows["flexkd_over_plain_loop"]["met"] is True
    measured["flexkd_feature"]["tokens_per_second"] = 94.0
    below = {row["name"]: row for row in ratios(measured, SpeedSettings.cpu())}["flexkd_over_plain_loop"]
    assert below["met"] is False and below["goal"] == ">= 0.95"
    assert (
        rows["feature_loss_slowdown"]["value"] == round(1 - 95 / 96, 3) and rows["feature_loss_slowdown"]["met"] is True
    )
    assert rows["feature_loss_slowdown_plain"]["value"] == round(1 - 100 / 110, 3)
    page = speed_markdown(
        {
            "measured": measured,
            "ratios": list(rows.values()),
            "command": "flexkd bench speed",
            "finished_at": "now",
            "wall_seconds": 60,
            "load": {"cpus": 2, "load1_mean": 1, "load1_min": 1, "load1_max": 1, "seconds": 60},
            "settings": vars(SpeedSettings.cpu()),
            "classification": {"train_rows": 10, "batch_size": 2},
            "machine": {"cpus": 2, "cpu_model": "x", "gpu": None, "torch": "t", "git_commit": "c"},
        }
    )
    assert "| 0.950 | >= 0.95 | yes |" in page
    # Per loss: the distill stage, the plain loop, the stage's extra time; the step row is the phases' sum.
    assert "| phase | kd+flexkd: distill stage | kd+flexkd: plain loop | kd+flexkd: stage - plain | kd: distill" in page
    assert "| batch | 1.5 | 1.0 | +0.5 | n/a | 1.0 | n/a |" in page
    assert "| teacher targets | 2.0 | 2.0 | +0.0 | n/a | 2.0 | n/a |" in page
    assert "| **step** | 21.5 | 21.0 | +0.5 | n/a | 21.0 | n/a |" in page


def test_a_step_profile_tiles_the_counted_steps_phase_by_phase():
    profile = StepProfile(torch.device("cpu"))
    sleeps = {phase: 0.001 * (i + 1) for i, phase in enumerate(STEP_PHASES)}
    counted_seconds = 0.0
    for step in range(3):
        started = profile.start()
        for phase, seconds in sleeps.items():
            time.sleep(seconds + (0.05 if step == 0 else 0.0))  # the first step, slow, is not counted
            profile.lap(phase)
        if step > 0:
            profile.count()
            counted_seconds += time.perf_counter() - started
    ms_per_step = profile.ms_per_step()
    assert list(ms_per_step) == list(STEP_PHASES)
    assert all(ms_per_step[phase] >= 1000 * seconds for phase, seconds in sleeps.items())
    step_ms = 1000 * counted_seconds / 2
    assert abs(sum(ms_per_step.values()) - step_ms) <= 0.01 * step_ms + 0.1  # rounding and the last lap
    # Laps time only the launch of asynchronous GPU kernels: no profile there.
    assert StepProfile(torch.device("cuda")).ms_per_step() is None


@pytest.mark.integration  # the debug pipeline on local Ray, the distill stage 6 steps: about 1.5 min
def test_the_plain_loop_and_the_distill_stage_profile_the_same_phases_and_they_add_up(tmp_path, local_ray):
    import mlflow

    from benchmarks.speed import plain_loop
    from flexkd.config.schema import apply_overrides, load_config, parse_config
    from flexkd.pipeline.runner import run_pipeline

    raw = load_config(Path(__file__).resolve().parent.parent / "pipelines" / "debug.yaml").model_dump(mode="json")
    config = parse_config(
        apply_overrides(
            raw,
            {
                "artifact_root": str(tmp_path),
                "training.teacher": "cache",
                "tracking.tracking_uri": f"sqlite:///{tmp_path}/mlflow.db",
                "training.steps": 6,
            },
        )
    )
    stages = run_pipeline(config, stages=("tokenize", "score", "targets", "distill")).stages
    measured = plain_loop(config, stages["targets"].directory, stages["tokenize"].directory, threads=1)
    assert measured["tokens"] > 0 and measured["tokens_per_second"] > 0
    assert list(measured["ms_per_step"]) == list(STEP_PHASES)
    distill = stages["distill"].outputs["ms_per_step"]
    assert list(distill) == list(STEP_PHASES)
    # Each phase timed: without the student's forward hook, student_forward would be 0 (the loss holding it).
    assert all(ms > 0 for ms in distill.values())
    logged = mlflow.MlflowClient(config.tracking.tracking_uri).get_run(stages["distill"].run_id).data.metrics
    assert {name: logged[f"profile.{name}_ms"] for name in STEP_PHASES} == distill
    step_ms = 1000 * measured["seconds"] / (config.training.steps - 1)
    # The phases tile the step; only the token count and the rounding (1 ms, 0.01 ms a phase) lie outside them.
    assert abs(sum(measured["ms_per_step"].values()) - step_ms) <= 0.05 * step_ms + 1.0
    logit_only = parse_config(
        apply_overrides(config.model_dump(mode="json"), {"loss.gamma": 0.0, "loss.feature": "none"})
    )
    assert plain_loop(logit_only, stages["targets"].directory, stages["tokenize"].directory, threads=1)["tokens"] > 0


def test_method_names_become_metric_names_mlflow_accepts(tmp_path):
    import mlflow

    from benchmarks.common import metric_name

    assert metric_name("accuracy.kd+flexkd") == "accuracy.kd_plus_flexkd"
    # Its own client and store: the module-level tracking URI and experiment belong to other tests.
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    run = client.create_run(client.create_experiment("metric-names"))
    names = [metric_name(name) for name in ("accuracy.kd+flexkd", "rougeL.kd+projector.samsum")]
    client.log_batch(run.info.run_id, metrics=[mlflow.entities.Metric(name, 1.0, 0, 0) for name in names])
    assert set(client.get_run(run.info.run_id).data.metrics) == set(names)


def test_generation_students_are_pruned_from_the_teacher_and_unit_selections_share_every_teacher_side_stage(tmp_path):
    from benchmarks.generation import METHODS as GENERATION_METHODS
    from benchmarks.generation import PIPELINE, GenerationSettings, pipeline_overrides
    from flexkd.config.schema import load_config

    overrides = pipeline_overrides(GenerationSettings.cpu(), tmp_path, tmp_path / "eval.jsonl", 452)
    configs = {method: load_config(PIPELINE, overrides | extra) for method, extra in GENERATION_METHODS.items()}
    for method, config in configs.items():
        assert (config.student.init, config.student.layer_selection) == (
            "prune_from_teacher",
            GenerationSettings.cpu().layer_selection,
        ), method
        selection = "directions" if method == "kd+flexkd-dir" else "importance"
        assert config.layer_map == "last" and config.selection.method == selection, method
    assert configs["kd"].loss.uses_features is False and configs["kd+flexkd"].loss.feature == "correlation"
    # Directions have a score stage and a cache of their own; every unit selection shares one.
    del configs["kd+flexkd-dir"]
    fingerprints = {}
    for stage in ("tokenize", "score", "targets"):
        inputs = {name: fingerprints[name] for name in ("tokenize", "score") if name in fingerprints}
        per_method = {stage_fingerprint(config, stage, inputs) for config in configs.values()}
        assert len(per_method) == 1, stage
        fingerprints[stage] = per_method.pop()


def test_generation_rouge_is_kept_apart_per_eval_set():
    from benchmarks.generation import rouge_per_source

    scores = rouge_per_source(["the cat sat", "a b c d"], ["the cat sat", "x y"], ["samsum", "self_instruct"])
    assert scores == {"samsum": 100.0, "self_instruct": 0.0}


def test_generation_page_counts_shared_stages_an_earlier_invocation_built():
    from benchmarks.generation import _reused_sentence

    shared = {
        "tokenize": {"seconds": 30, "reused": True},
        "targets": {"seconds": 420, "reused": True},
        "score": {"seconds": 90, "reused": False},
    }
    sentence = _reused_sentence(shared, wall_seconds=1800)
    assert "reused 7.5 min" in sentence and "about 38 min" in sentence
    assert "from scratch" not in _reused_sentence({"score": {"seconds": 90, "reused": False}}, 1800)


def test_every_quality_variant_option_reaches_the_settings_and_a_variant_needs_a_label(monkeypatch, tmp_path):
    from benchmarks import cli as bench_cli
    from benchmarks import quality
    from flexkd.config.schema import ConfigError

    captured = {}
    monkeypatch.setattr(
        quality,
        "run_quality",
        lambda settings, work_dir, methods, label=None, tune=False: captured.update(
            settings=settings, methods=methods, label=label, tune=tune
        ),
    )
    page = tmp_path / "RESULTS.md"
    page.write_text("page")
    monkeypatch.setattr(bench_cli, "write_results_page", lambda: page)
    monkeypatch.setattr(torch, "set_num_threads", lambda threads: None)
    arguments = [
        "bench",
        "quality",
        "--methods",
        "kd+flexkd,kd+projector",
        "--layer-map",
        "last",
        "--score-rows",
        "872",
        "--k",
        "96",
        "--gamma",
        "3",
        "--learning-rate",
        "0.003",
        "--label",
        "everything",
    ]
    bench_cli.run_benchmark(build_parser().parse_args(arguments))
    settings = captured["settings"]
    assert (settings.layer_map, settings.score_rows, settings.k, settings.gamma, settings.learning_rate) == (
        "last",
        872,
        96,
        3.0,
        0.003,
    )
    assert captured["methods"] == ("kd+flexkd", "kd+projector") and captured["label"] == "everything"
    assert captured["tune"] is False and settings.regime == "random-init"
    # --regime picks the regime's settings (and, by default, its methods) and needs no label.
    bench_cli.run_benchmark(build_parser().parse_args(["bench", "quality", "--regime", "pruned", "--seeds", "3"]))
    settings = captured["settings"]
    assert (settings.regime, settings.layer_map, settings.steps, settings.seeds) == ("pruned", "source", 100, (3,))
    assert captured["methods"] is None and captured["label"] is None
    bench_cli.run_benchmark(build_parser().parse_args(["bench", "quality", "--regime", "low-label", "--gpu"]))
    assert (captured["settings"].labeled_rows, captured["settings"].use_gpu) == (1024, True)
    with pytest.raises(ConfigError, match="--regime 'tiny': known regimes are random-init, pruned, low-label"):
        bench_cli.run_benchmark(build_parser().parse_args(["bench", "quality", "--regime", "tiny"]))
    with pytest.raises(ConfigError, match="--regime is an option of 'flexkd bench quality' only"):
        bench_cli.run_benchmark(build_parser().parse_args(["bench", "generation", "--regime", "pruned"]))
    with pytest.raises(ConfigError, match="--gamma makes a variant: name it with --label"):
        bench_cli.run_benchmark(build_parser().parse_args(["bench", "quality", "--gamma", "3"]))
    # --tune tunes the regime's methods unless told which.
    bench_cli.run_benchmark(build_parser().parse_args(["bench", "quality", "--tune", "--label", "tuned"]))
    assert captured["tune"] is True and captured["methods"] is None
    with pytest.raises(ConfigError, match="--tune makes a variant"):
        bench_cli.run_benchmark(build_parser().parse_args(["bench", "quality", "--tune"]))
    with pytest.raises(ConfigError, match="--tune is an option of 'flexkd bench quality' only"):
        bench_cli.run_benchmark(build_parser().parse_args(["bench", "speed", "--tune"]))
    with pytest.raises(ConfigError, match="--gamma is tuned per method under --tune"):
        bench_cli.run_benchmark(
            build_parser().parse_args(["bench", "quality", "--tune", "--gamma", "3", "--label", "x"])
        )


def test_tuned_runs_use_each_methods_own_best_values(monkeypatch, tmp_path):
    """run_quality(tune=True) with the teacher, the sweeps and the pipeline runs stubbed: every
    (method, seed) run gets that method's best values and nothing of another method's."""
    from types import SimpleNamespace

    from benchmarks import quality, quality_tuned
    from flexkd.models import plan
    from flexkd.pipeline import runner

    best = {
        "kd+flexkd": {"training.learning_rate": 0.0005, "loss.gamma": 3.0, "layer_map": "last"},
        "kd": {"training.learning_rate": 0.001, "loss.temperature": 4.0},
    }
    monkeypatch.setattr(
        quality, "sst2_teacher", lambda settings, work_dir: (tmp_path / "teacher", {"made_now": True, "seconds": 1.0})
    )
    monkeypatch.setattr(
        quality_tuned,
        "tune_methods",
        lambda settings, teacher_dir, work_dir, methods: {
            "seed": 3,
            "selection_rows": 872,
            "methods": {method: {"best": best[method]} for method in methods},
        },
    )
    seen = []

    (tmp_path / "evaluate").mkdir()
    (tmp_path / "evaluate" / "eval_predictions.jsonl").write_text(
        "".join(
            json.dumps({"example_id": i, "label": "positive", "prediction": p, "teacher": "positive"}) + "\n"
            for i, p in [(1, "negative"), (0, "positive"), (2, "positive")]
        )
    )

    def fake_run(config, stages):
        seen.append((config, stages))

        def record(name, **outputs):
            return SimpleNamespace(directory=tmp_path / name, seconds=1.0, cached=False, outputs=outputs)

        stage_records = {name: record(name) for name in ("tokenize", "score", "targets")}
        stage_records["tokenize"].outputs["rows"] = {"train": 1000, "eval": 3, "score": 96}
        stage_records["distill"] = record(
            "distill",
            extra_trainable_parameters=0,
            student_parameters=1,
            tokens_per_second=1.0,
            total=1.0,
            task=1.0,
            logit=0.0,
            feature=0.0,
        )
        stage_records["evaluate"] = record(
            "evaluate", metrics={"student.accuracy": 0.6, "student.macro_f1": 0.6, "teacher.accuracy": 0.8}
        )
        return SimpleNamespace(stages=stage_records, run_id="r", config=config)

    monkeypatch.setattr(runner, "run_pipeline", fake_run)
    monkeypatch.setattr(plan, "plan_models", lambda config, score_dir=None: SimpleNamespace(layer_pairs=((30, 4),)))
    monkeypatch.setattr(quality, "selection_diagnostics", lambda score_dirs: {})
    monkeypatch.setattr(quality, "write_results", lambda *args: None)
    monkeypatch.setattr(quality, "quality_markdown", lambda results: "")
    monkeypatch.setattr(quality, "plot_quality", lambda results, path: path)
    settings = replace(SETTINGS, seeds=(0, 1))
    results = quality.run_quality(settings, tmp_path, ("kd+flexkd", "kd"), tmp_path, label="tuned", tune=True)

    runs = [config for config, stages in seen if "distill" in stages]
    assert len(runs) == 4 and results["tuning"]["methods"]["kd"]["best"] == best["kd"]
    assert results["benchmark"] == "quality-random-init-tuned" and results["layer_pairs"] == [[30, 4]]
    assert [run["correct"] for run in results["runs"]] == ["101"] * 4  # example_id order, not file order
    for config in runs:
        method = "kd" if config.loss.feature == "none" else "kd+flexkd"
        assert config.training.learning_rate == best[method]["training.learning_rate"], method
        if method == "kd":
            assert config.loss.temperature == 4.0 and config.layer_map == SETTINGS.layer_map
        else:
            assert (config.loss.gamma, config.layer_map, config.loss.temperature) == (3.0, "last", SETTINGS.temperature)


def test_each_method_is_tuned_over_the_same_learning_rates_and_as_many_trials(shared_data, tmp_path):
    from benchmarks.quality import QualitySettings
    from benchmarks.quality_tuned import search_space, selection_set, sweep_config
    from flexkd.config.schema import ConfigError

    spaces = {method: search_space(method) for method in ("kd", "kd+projector", "kd+flexkd", "kd+cka")}
    trials = {method: math.prod(len(values) for values in space.values()) for method, space in spaces.items()}
    assert set(trials.values()) == {8} and spaces["kd+projector"] == spaces["kd+flexkd"]
    assert {"loss.gamma", "layer_map"} <= set(spaces["kd+flexkd"]) and "loss.gamma" not in spaces["kd"]
    assert "loss.temperature" in spaces["kd"]
    assert all(space["training.learning_rate"] == spaces["kd"]["training.learning_rate"] for space in spaces.values())
    with pytest.raises(ConfigError, match="--tune: ft has only the learning rate"):
        search_space("ft")

    # The selection rows: after the scoring rows of dev.tsv, as many as test.tsv, in neither.
    settings = QualitySettings.cpu()
    path = selection_set(settings.score_rows, tmp_path)
    header, *rows = path.read_text().splitlines()
    dev = (shared_data / "sst2" / "dev.tsv").read_text().splitlines()
    test = set((shared_data / "sst2" / "test.tsv").read_text().splitlines()[1:])
    assert header == dev[0] and len(rows) == 872 and rows[0] == dev[1 + settings.score_rows]
    assert not set(rows) & set(dev[1 : 1 + settings.score_rows])
    assert not set(rows) & test
    assert selection_set(settings.score_rows, tmp_path) == path  # the same file again

    config = sweep_config(settings, tmp_path / "teacher", tmp_path, "kd+flexkd", path)
    assert config.data.eval.path == str(path) and config.tune.asha is None
    assert config.tune.eval_every == settings.steps and config.training.seed not in settings.seeds
    assert config.student.seed == config.training.seed
    assert {name: dimension.grid for name, dimension in config.tune.search_space.items()} == spaces["kd+flexkd"]
    with pytest.raises(ConfigError, match="--score-rows 6500"):
        selection_set(6500, tmp_path)


def test_the_tuned_page_shows_each_methods_grid_best_values_and_every_trial():
    from benchmarks.quality_tuned import tuning_markdown

    tuning = {
        "selection_set": "selection/dev-96-968.tsv",
        "selection_rows": 872,
        "seed": 0,
        "methods": {
            "kd": {
                "search_space": {"training.learning_rate": [0.0005, 0.001], "loss.temperature": [1.0, 2.0]},
                "trials": [
                    {
                        "params": {"training.learning_rate": 0.001, "loss.temperature": 2.0},
                        "accuracy": 66.5,
                        "status": "completed",
                    },
                    {
                        "params": {"training.learning_rate": 0.0005, "loss.temperature": 1.0},
                        "accuracy": None,
                        "status": "error",
                    },
                ],
                "completed": 1,
                "best": {"training.learning_rate": 0.001, "loss.temperature": 2.0},
                "best_accuracy": 66.5,
                "sweep_run_id": "r",
                "seconds": 600.0,
            }
        },
    }
    text = "\n".join(tuning_markdown(tuning))
    assert (
        "| kd | training.learning_rate: 0.0005, 0.001; loss.temperature: 1.0, 2.0 | 1 of 2 | learning_rate 0.001, "
        "temperature 2.0 | 66.50 | 10.0 |" in text
    )
    assert "learning_rate 0.0005, temperature 1.0 -> failed" in text and "872 dev.tsv sentences" in text


def test_the_regime_page_shows_its_command_table_and_every_comparison_with_its_statistics(tmp_path):
    from benchmarks.quality import TEACHER_ADAPT, plot_quality, quality_markdown

    runs = [
        {
            "method": method,
            "seed": seed,
            "accuracy": 0.70 + 0.01 * seed + shift,
            "correct": "1100" if shift else "1000",
            "teacher_accuracy": 0.82,
            "extra_trainable_parameters": 444672 if method == "kd+projector" else 0,
            "distill_seconds": 80.0,
            "tokens_per_second": 1000.0,
        }
        for method, shift in {"kd+flexkd": 0.02, "kd+projector": 0.0, "kd": 0.0}.items()
        for seed in range(5)
    ]
    teacher = {
        "train_rows": 2700,
        "heldout_rows": 300,
        "steps": 252,
        "kept_epoch": 2,
        "heldout_before": {"accuracy": 0.553, "loss": 0.9},
        "heldout_after": {"accuracy": 0.85, "loss": 0.35},
        "settings": TEACHER_ADAPT,
        "seconds": 176.0,
    }
    settings = QualitySettings.for_regime("low-label")
    results = {
        "benchmark": "quality-low-label",
        "command": "flexkd bench quality --regime low-label",
        "finished_at": "now",
        "wall_seconds": 3000.0,
        "reused_seconds": 0.0,
        "machine": {"cpus": 2, "cpu_model": "x", "gpu": None, "torch": "t", "git_commit": "c", "git_dirty": False},
        "load": {"cpus": 2, "load1_mean": 2, "load1_min": 1, "load1_max": 3, "seconds": 3000},
        "teacher": teacher,
        "settings": vars(settings) | {"seeds": list(settings.seeds)},
        "regime": {"name": "low-label", **{k: getattr(REGIMES["low-label"], k) for k in ("student", "budget")}},
        "rows": {"train": 256, "transfer": 744, "eval": 872, "score": 96},
        "layer_pairs": [[8, 1], [15, 2], [23, 3], [30, 4]],
        "shared_stage_seconds": {"tokenize": 18.0},
        "runs": runs,
    } | summarize(runs, ("kd+flexkd", "kd+projector", "kd"))
    page = quality_markdown(results)
    assert page.startswith("## Quality: SST-2 classification, regime `low-label`")
    assert "Command: `flexkd bench quality --regime low-label`" in page
    assert "through the pipeline's adapt stage (`teacher.adapt`: the top 4 blocks, the final norm" in page
    assert "252 steps over 3 epochs of 2700 SST-2 training sentences" in page
    assert "55.30% before and 85.00% after, kept epoch 2" in page
    assert "first 256 training sentences are labeled; the next 744" in page and "8 labeled and 24 unlabeled" in page
    assert "8->1, 15->2, 23->3, 30->4" in page and "120 distill steps" in page
    assert "| kd+projector | 72.00 ± 1.58 (n=5) | 70.00, 71.00, 72.00, 73.00, 74.00 | 444,672 | 80 |" in page
    # Both comparisons, in the table and as sentences: +2 points at every seed, 5 of 5 discordant sentences.
    assert (
        page.count(
            "| kd+flexkd | kd+projector | +2.00 ± 0.00 | [+2.00, +2.00] (excludes 0) | 5 of 5 | 5 / 0 | 0.0625 | beats |"
        )
        == 1
    )
    assert "**kd+flexkd beats kd**: paired difference +2.00" in page
    assert plot_quality(results, tmp_path / "page.png").is_file()


def test_a_method_whose_sweep_lost_trials_stops_the_tuned_comparison():
    from benchmarks.quality_tuned import check_every_trial_finished
    from flexkd.errors import StageError

    finished = [{"params": {"layer_map": "uniform"}, "error": ""}, {"params": {"layer_map": "last"}, "error": ""}]
    check_every_trial_finished("kd", finished)
    finished[1]["error"] = "ValueError: joined_batch: columns differ"
    with pytest.raises(StageError, match=r"^bench quality --tune: kd was not tuned over its whole grid: tune: 1 of 2"):
        check_every_trial_finished("kd", finished)
