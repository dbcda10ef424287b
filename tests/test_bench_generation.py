"""The generation benchmark's page without running it: results dicts built by hand (no Ray, no
models) go through the same summary and rendering as a real run, and the page must show the
fluency bar per model, each Flex-KD comparison with its statistics and verdict, and the first two
outputs of every model beside the references."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from types import SimpleNamespace

import pytest

from benchmarks import generation
from benchmarks.generation import (
    PRUNED_START,
    GenerationSettings,
    compare,
    first_outputs,
    fluency_failures,
    generation_markdown,
    read_predictions,
    table,
)

COMMAND = "flexkd bench generation --seeds 0,1,2"
TEACHER_SAMSUM = 20.0  # the bar's ROUGE-L floor is half of it: 10
# Student ROUGE-L per seed 0, 1, 2. On SAMSum kd+flexkd is +2 over kd at every seed, -1/+2/+2 against
# kd+projector (ahead on average, not at every seed) and -1 at every seed against kd+projector_std;
# on Self-Instruct it is ahead of all three by 2 to 6 points at every seed.
ROUGE = {
    "kd": {"samsum": (14.0, 15.0, 16.0), "self_instruct": (10.0, 10.0, 10.0)},
    "kd+projector": {"samsum": (17.0, 15.0, 16.0), "self_instruct": (9.0, 9.0, 9.0)},
    "kd+projector_std": {"samsum": (17.0, 18.0, 19.0), "self_instruct": (8.0, 8.0, 8.0)},
    "kd+flexkd": {"samsum": (16.0, 17.0, 18.0), "self_instruct": (12.0, 13.0, 14.0)},
}
FLUENT = {"distinct_2": 0.7, "repeated_ngram_outputs": 0.0}


def _outputs(method: str, seed: int) -> dict[str, list[dict[str, str]]]:
    return {
        source: [
            {"reference": f"ref {source} {i}", "teacher": f"teacher {source} {i}", "student": f"{method} {source} {i}"}
            for i in range(2)
        ]
        for source in ("samsum", "self_instruct")
    }


def _run(method: str, seed: int, fluency: dict[str, float] | None = None) -> dict:
    return {
        "method": method,
        "seed": seed,
        "rougeL": {
            "teacher": {"samsum": TEACHER_SAMSUM, "self_instruct": 15.0},
            "student": {source: values[seed] for source, values in ROUGE[method].items()},
        },
        "perplexity": {"teacher": 5.0, "student": 9.0},
        "fluency": {"teacher": {"distinct_2": 0.81, "repeated_ngram_outputs": 0.0}, "student": fluency or FLUENT},
        "extra_trainable_parameters": 221_760 if "projector" in method else 0,
        "student_parameters": 60_000_000,
        "first_outputs": _outputs(method, seed),
    }


def _results(runs: list[dict], pruned_samsum: float = 12.0) -> dict:
    pruned = {
        "rougeL": {"samsum": pruned_samsum, "self_instruct": 4.0},
        "perplexity": 40.0,
        "parameters": 60_000_000,
        "fluency": {"distinct_2": 0.6, "repeated_ngram_outputs": 0.0},
        "first_outputs": {
            source: [f"pruned {source} 0", f"pruned {source} 1"] for source in ("samsum", "self_instruct")
        },
    }
    settings = asdict(GenerationSettings.cpu()) | {"seeds": [0, 1, 2]}
    return {
        "command": COMMAND,
        "finished_at": "2025-01-01 00:00:00 UTC",
        "wall_seconds": 3600.0,
        "machine": {"cpus": 2, "cpu_model": "test", "gpu": None, "git_commit": "abc"},
        "load": {"cpus": 2, "load1_mean": 2.0, "load1_min": 1.0, "load1_max": 3.0, "seconds": 3600.0},
        "settings": settings,
        "pruned_start": pruned,
        "runs": runs,
        "table": table(runs, pruned),
        "comparisons": compare(runs),
        "shared_stage_seconds": {},
    }


def _three_seeds(failing: dict[tuple[str, int], dict[str, float]] | None = None) -> list[dict]:
    failing = failing or {}
    return [_run(method, seed, failing.get((method, seed))) for seed in range(3) for method in ROUGE]


def _comparison(comparisons: list[dict], source: str, b: str) -> dict:
    (found,) = [c for c in comparisons if c["eval_set"] == source and c["a"] == "kd+flexkd" and c["b"] == b]
    return found


def test_the_fluency_bar_fails_each_of_its_three_parts_and_passes_a_fluent_model():
    assert fluency_failures(FLUENT, 10.0, TEACHER_SAMSUM) == []
    assert fluency_failures({"distinct_2": 0.49, "repeated_ngram_outputs": 0.0}, 15.0, TEACHER_SAMSUM) == [
        "distinct-2 below 0.5"
    ]
    assert fluency_failures({"distinct_2": 0.9, "repeated_ngram_outputs": 3.0}, 15.0, TEACHER_SAMSUM) == [
        "3 outputs one repeated n-gram"
    ]
    assert fluency_failures(FLUENT, 9.99, TEACHER_SAMSUM) == ["SAMSum ROUGE-L below half the teacher's"]


def test_the_page_shows_every_models_fluency_numbers_and_whether_it_passes():
    degenerate = {"distinct_2": 0.31, "repeated_ngram_outputs": 4.0}
    results = _results(_three_seeds({("kd", 1): degenerate}), pruned_samsum=6.5)
    page = generation_markdown(results)

    assert (
        "| model | seed | distinct-2 (>= 0.5) | outputs one repeated n-gram (0) | ROUGE-L SAMSum (>= 10.00) |" in page
    )
    assert "| teacher | - | 0.810 | 0 | 20.00 | pass |" in page
    assert f"| {PRUNED_START} | - | 0.600 | 0 | 6.50 | fail: SAMSum ROUGE-L below half the teacher's |" in page
    assert "| kd | 1 | 0.310 | 4 | 15.00 | fail: distinct-2 below 0.5; 4 outputs one repeated n-gram |" in page
    assert "| kd | 0 | 0.700 | 0 | 14.00 | pass |" in page
    assert "| kd+flexkd | 2 | 0.700 | 0 | 18.00 | pass |" in page
    # Every trained model has its row: 4 methods x 3 seeds, plus the teacher and the pruned start.
    assert sum(line.startswith("| kd") and " | pass |" in line for line in page.splitlines()) == 11
    # The main table counts the seeds that pass, and the fluency numbers come with their command.
    assert "| 3 | 0 | 2 of 3 |" in page and "| 3 | 221,760 | 3 of 3 |" in page
    assert f"Fluency bar per model, from `{COMMAND}`" in page


def test_each_comparison_has_its_paired_differences_interval_and_verdict_per_test_set():
    comparisons = compare(_three_seeds())
    assert {(c["eval_set"], c["b"]) for c in comparisons} == {
        (source, b) for source in ("samsum", "self_instruct") for b in ("kd", "kd+projector", "kd+projector_std")
    }

    ahead = _comparison(comparisons, "samsum", "kd")
    assert ahead["paired_difference"] == {0: 2.0, 1: 2.0, 2: 2.0}
    # Every resample of a constant difference has that mean: the interval is the point itself.
    assert (ahead["paired_difference_mean"], ahead["paired_difference_std"], ahead["ci95"]) == (2.0, 0.0, [2.0, 2.0])
    assert (ahead["verdict"], ahead["ci_excludes_zero"], ahead["a_wins_seeds"]) == ("beats", True, 3)

    # With 3 seeds the resample of the smallest difference thrice has probability 1/27 > 2.5%, and so
    # has the largest's: a 95% percentile interval runs from the smallest difference to the largest.
    even = _comparison(comparisons, "samsum", "kd+projector")
    assert even["paired_difference"] == {0: -1.0, 1: 2.0, 2: 2.0} and even["ci95"] == [-1.0, 2.0]
    # Ahead by a point on average, but the interval holds 0: a tie, not a win.
    assert (even["verdict"], even["ci_excludes_zero"], even["a_wins_seeds"]) == ("ties", False, 2)

    behind = _comparison(comparisons, "samsum", "kd+projector_std")
    assert (behind["ci95"], behind["verdict"], behind["ci_excludes_zero"]) == ([-1.0, -1.0], "trails", True)

    instruct = _comparison(comparisons, "self_instruct", "kd")
    assert instruct["paired_difference"] == {0: 2.0, 1: 3.0, 2: 4.0}
    assert (instruct["paired_difference_std"], instruct["ci95"], instruct["verdict"]) == (1.0, [2.0, 4.0], "beats")


def test_the_page_says_per_test_set_whether_flexkd_beats_kd_and_both_projectors():
    page = generation_markdown(_results(_three_seeds()))

    assert (
        "- On SAMSum, kd+flexkd does not beat every baseline (kd, kd+projector, kd+projector_std): it beats kd "
        "(CI excludes 0), ties kd+projector (CI includes 0), trails kd+projector_std (CI excludes 0)." in page
    )
    assert (
        "- On Self-Instruct, kd+flexkd beats every baseline (kd, kd+projector, kd+projector_std): it beats kd" in page
    )
    assert (
        "**SAMSum: kd+flexkd beats kd**: paired difference +2.00 ± 0.00 ROUGE-L points over 3 seeds, "
        "95% bootstrap CI [+2.00, +2.00], which excludes 0; kd+flexkd ahead on 3 of 3 seeds." in page
    )
    assert "**SAMSum: kd+flexkd ties kd+projector**: paired difference +1.00 ± 1.73 ROUGE-L points" in page
    assert "95% bootstrap CI [-1.00, +2.00], which includes 0; kd+flexkd ahead on 2 of 3 seeds." in page
    assert "**SAMSum: kd+flexkd trails kd+projector_std**: paired difference -1.00 ± 0.00" in page
    assert (
        "| SAMSum | kd+flexkd | kd | seed 0 +2.00, seed 1 +2.00, seed 2 +2.00 | +2.00 ± 0.00 | "
        "[+2.00, +2.00] (excludes 0) | 3 of 3 | beats | pass |" in page
    )
    assert f"Flex-KD against kd and both projectors, from `{COMMAND}`" in page
    assert page.startswith("## Generation") and f"Command: `{COMMAND}`" in page


def test_a_comparison_with_a_student_below_the_fluency_bar_does_not_count():
    degenerate = {"distinct_2": 0.2, "repeated_ngram_outputs": 0.0}
    page = generation_markdown(_results(_three_seeds({("kd", 1): degenerate})))

    assert "it does not count, since these fail the fluency bar: kd seed 1." in page
    assert "| 3 of 3 | beats | fail: kd seed 1 |" in page
    on_samsum = next(line for line in page.splitlines() if line.startswith("- On SAMSum, kd+flexkd"))
    assert on_samsum.endswith("; not a finding while a compared student fails the fluency bar.")
    kept = next(line for line in page.splitlines() if line.startswith("- **SAMSum: kd+flexkd ties kd+projector**"))
    assert "does not count" not in kept


def test_one_seed_gives_a_difference_but_no_interval_and_no_verdict():
    runs = [_run(method, 0) for method in ROUGE]
    (one,) = [c for c in compare(runs) if c["eval_set"] == "samsum" and c["b"] == "kd"]
    assert (one["paired_difference_mean"], one["ci95"], one["verdict"], one["ci_excludes_zero"]) == (
        2.0,
        None,
        None,
        False,
    )
    page = generation_markdown(_results(runs))
    assert "**SAMSum: kd+flexkd against kd, one seed**: difference +2.00 ROUGE-L points" in page
    assert "On SAMSum, kd+flexkd ran one seed: no interval, so no verdict" in page
    assert "kd+flexkd beats" not in page


def test_the_page_shows_the_first_two_outputs_of_every_model_beside_the_references(tmp_path):
    predictions = tmp_path / "predictions.jsonl"
    rows = [{"example_id": i, "reference": f"r{i}", "teacher": f"t{i}", "student": f"s{i}"} for i in range(6)]
    rows[0]["reference"], rows[4]["student"] = "a | b", "x " * 100
    predictions.write_text("".join(json.dumps(row) + "\n" for row in rows))
    sources = ["samsum", "samsum", "samsum", "self_instruct", "self_instruct", "self_instruct"]
    first = first_outputs(read_predictions(predictions, sources), sources)
    assert [example["student"] for example in first["samsum"]] == ["s0", "s1"]
    assert [example["reference"] for example in first["self_instruct"]] == ["r3", "r4"]

    results = _results(_three_seeds())
    for run in results["runs"]:
        run["first_outputs"] = first if run["method"] == "kd" else _outputs(run["method"], run["seed"])
    page = generation_markdown(results)
    samsum = page[page.index("First 2 outputs on SAMSum, seed 0") : page.index("First 2 outputs on Self-Instruct")]
    instruct = page[page.index("First 2 outputs on Self-Instruct, seed 0") :]

    assert "| model | example 1 | example 2 |" in samsum and "| reference | a \\| b | r1 |" in samsum
    assert "| teacher | t0 | t1 |" in samsum and f"| {PRUNED_START} | pruned samsum 0 | pruned samsum 1 |" in samsum
    assert "| kd | s0 | s1 |" in samsum and "| kd+flexkd | kd+flexkd samsum 0 | kd+flexkd samsum 1 |" in samsum
    assert "| reference | r3 | r4 |" in instruct and "| kd | s3 | " + "x " * 45 + "... |" in instruct
    # One row per model of the first seed: the reference, the teacher, the pruned start and 4 methods.
    assert len([line for line in samsum.splitlines() if line.startswith("| ") and "example 1" not in line]) == 7


def _evaluate_dir_with_predictions(tmp_path: Path) -> Path:
    """An evaluate stage's folder with one prediction per row of the benchmark's eval set."""
    _, sources = generation.write_eval_set(tmp_path)
    evaluate_dir = tmp_path / "evaluate"
    evaluate_dir.mkdir()
    (evaluate_dir / "predictions.jsonl").write_text(
        "".join(
            json.dumps({"example_id": i, "reference": "the cat sat", "teacher": "the cat sat", "student": "the cat"})
            + "\n"
            for i in range(len(sources))
        )
    )
    return evaluate_dir


def _faked_result(evaluate_dir: Path, metrics: dict, student_parameters: int) -> SimpleNamespace:
    """What run_pipeline returns for one (method, seed) run, every stage in ``evaluate_dir``."""
    outputs = {
        "distill": {"extra_trainable_parameters": 0, "student_parameters": student_parameters},
        "evaluate": {"metrics": metrics},
    }
    stages = {
        name: SimpleNamespace(
            directory=evaluate_dir, outputs=outputs.get(name, {}), seconds=1.0, cached=False, fingerprint="f"
        )
        for name in ("tokenize", "score", "targets", "distill", "evaluate")
    }
    return SimpleNamespace(stages=stages, run_id="run")


def test_run_generation_reads_the_fluency_measures_from_the_evaluate_stage(tmp_path, monkeypatch):
    """The wiring, with the pipeline faked: the evaluate stage's metrics and predictions go to the page."""
    evaluate_dir = _evaluate_dir_with_predictions(tmp_path)
    metrics = {
        f"{role}.{name}": value
        for role, values in {"teacher": (0.9, 0.0, 17.0, 5.0), "student": (0.42, 7.0, 3.0, 80.0)}.items()
        for name, value in zip(("distinct_2", "repeated_ngram_outputs", "rougeL", "perplexity"), values)
    }

    def fake_pipeline(config, stages):
        return _faked_result(evaluate_dir, metrics, student_parameters=1000)

    pruned = {
        "rougeL": {"samsum": 1.0, "self_instruct": 1.0},
        "perplexity": 90.0,
        "parameters": 1000,
        "fluency": {"distinct_2": 0.1, "repeated_ngram_outputs": 9.0},
        "first_outputs": {"samsum": ["p0", "p1"], "self_instruct": ["p2", "p3"]},
    }
    written = {}
    monkeypatch.setattr("flexkd.pipeline.runner.run_pipeline", fake_pipeline)
    monkeypatch.setattr(generation, "evaluate_pruned_start", lambda *args: pruned)
    monkeypatch.setattr(generation, "plot_generation", lambda results, path: None)
    monkeypatch.setattr(generation, "write_results", lambda name, results, page, *args: written.update(page=page))
    settings = GenerationSettings.cpu().with_overrides(seeds=(0, 1))
    results = generation.run_generation(settings, tmp_path, ("kd", "kd+flexkd"), tmp_path)

    assert results["runs"][0]["fluency"]["student"] == {"distinct_2": 0.42, "repeated_ngram_outputs": 7.0}
    assert (
        "| kd | 1 | 0.420 | 7 | 80.00 | fail: distinct-2 below 0.5; 7 outputs one repeated n-gram |" in written["page"]
    )
    assert "| teacher | - | 0.900 | 0 | 100.00 | pass |" in written["page"]
    assert [c["b"] for c in results["comparisons"]] == ["kd", "kd"]
    assert results["comparisons"][0]["not_fluent"] == ["kd+flexkd seed 0", "kd+flexkd seed 1", "kd seed 0", "kd seed 1"]


def test_a_table_cut_short_leaves_the_finished_runs_on_the_page_and_logs_only_the_whole_one(tmp_path, monkeypatch):
    evaluate_dir = _evaluate_dir_with_predictions(tmp_path)
    metrics = {
        f"{role}.{name}": 1.0
        for role in ("teacher", "student")
        for name in ("distinct_2", "repeated_ngram_outputs", "rougeL", "perplexity")
    }
    calls = []

    def fake_pipeline(config, stages):
        calls.append(config.loss.feature)
        if len(calls) == 3 and config.training.seed == 1 and interrupt:
            raise KeyboardInterrupt  # the session ends in the third run
        return _faked_result(evaluate_dir, metrics, student_parameters=10)

    written = []
    monkeypatch.setattr("flexkd.pipeline.runner.run_pipeline", fake_pipeline)
    decoded = []  # the pruned start is decoded once, and read back by the invocation that goes on
    monkeypatch.setattr(generation, "evaluate_pruned_start", lambda *args: decoded.append(1) or {})
    monkeypatch.setattr(generation, "plot_generation", lambda results, path: None)
    monkeypatch.setattr(
        generation, "write_results", lambda name, results, page, plot, tracking, where: written.append((page, tracking))
    )
    settings = GenerationSettings.cpu().with_overrides(seeds=(0, 1))

    interrupt = True
    with pytest.raises(KeyboardInterrupt):
        generation.run_generation(settings, tmp_path, ("kd", "kd+flexkd"), tmp_path)
    assert [tracking for _, tracking in written] == [None, None]
    assert (
        "**Partial: 2 of 4 runs (method x seed) finished when this was written (kd seed 0, kd+flexkd seed 0)."
        in (written[-1][0])
    )

    interrupt, written[:] = False, []
    generation.run_generation(settings, tmp_path, ("kd", "kd+flexkd"), tmp_path)
    assert [tracking for _, tracking in written] == [None, None, None, generation.tracking_uri(tmp_path)]
    assert "Partial" not in written[-1][0] and "Partial: 3 of 4 runs" in written[-2][0]
    assert decoded == [1]


@pytest.mark.parametrize("method", ["kd+flexkd", "kd+flexkd-dir"])
def test_flexkd_learns_its_pairing_instead_of_the_pruned_students_identity(method, tmp_path):
    from flexkd.config.schema import load_config

    overrides = generation.pipeline_overrides(GenerationSettings.cpu(), tmp_path, Path("eval.jsonl"), 452)
    config = load_config(generation.PIPELINE, overrides | generation.METHODS[method])
    assert config.student.init == "prune_from_teacher" and config.loss.feature == "correlation"
    assert config.selection.method == ("directions" if method == "kd+flexkd-dir" else "importance")


@pytest.mark.parametrize("base", ["kd", "kd+flexkd"])
def test_an_on_policy_variant_is_its_base_method_with_half_the_steps_on_the_students_samples(base, tmp_path):
    from flexkd.config.schema import load_config

    overrides = generation.pipeline_overrides(GenerationSettings.cpu(), tmp_path, Path("eval.jsonl"), 452)
    variant = load_config(generation.PIPELINE, overrides | generation.METHODS[f"{base}-onpolicy"])
    plain = load_config(generation.PIPELINE, overrides | generation.METHODS[base])
    assert (variant.training.on_policy, variant.training.teacher) == (0.5, "online")
    assert (plain.training.on_policy, plain.training.teacher) == (0.0, "cache")
    assert variant.loss == plain.loss and f"{base}-onpolicy" not in generation.DEFAULT_METHODS
    assert ("kd+flexkd-onpolicy", "kd-onpolicy") in generation.COMPARISONS


@pytest.mark.parametrize("logit", generation.LOGIT_VARIANTS)
def test_a_logit_loss_variant_is_compared_with_kd_at_the_same_logit_loss(logit, tmp_path):
    from flexkd.config.schema import load_config

    overrides = generation.pipeline_overrides(GenerationSettings.cpu(), tmp_path, Path("eval.jsonl"), 452)
    for method, feature in ((f"kd-{logit}", "none"), (f"kd+flexkd-{logit}", "correlation")):
        config = load_config(generation.PIPELINE, overrides | generation.METHODS[method])
        assert (config.loss.logit, config.loss.feature) == (logit, feature)
    assert f"kd-{logit}" not in generation.DEFAULT_METHODS

    ROUGE_WITH_VARIANT = ROUGE | {
        f"kd-{logit}": {"samsum": (15.0, 16.0, 17.0), "self_instruct": (11.0, 11.0, 11.0)},
        f"kd+flexkd-{logit}": {"samsum": (15.0, 17.0, 17.5), "self_instruct": (13.0, 13.0, 13.0)},
    }
    runs = []
    for seed in range(3):
        for method, values in ROUGE_WITH_VARIANT.items():
            run = _run("kd", seed) | {"method": method}
            run["rougeL"]["student"] = {source: rouge[seed] for source, rouge in values.items()}
            runs.append(run)
    comparisons = compare(runs)
    mine = [c for c in comparisons if c["a"] == f"kd+flexkd-{logit}"]
    # Only against kd at the same logit loss: the forward-KL baselines are another question.
    assert {(c["eval_set"], c["b"]) for c in mine} == {
        (source, f"kd-{logit}") for source in ("samsum", "self_instruct")
    }
    samsum = next(c for c in mine if c["eval_set"] == "samsum")
    assert samsum["paired_difference"] == {0: 0.0, 1: 1.0, 2: 0.5} and samsum["verdict"] == "ties"

    page = generation_markdown(_results(runs))
    assert (
        f"- On Self-Instruct, kd+flexkd-{logit} beats its baseline (kd-{logit}): it beats kd-{logit} (CI excludes 0)."
        in page
    )
    assert f"- On SAMSum, kd+flexkd-{logit} does not beat its baseline (kd-{logit}): it ties kd-{logit}" in page


def test_the_page_describes_the_students_shape_and_data_from_the_settings():
    results = _results(_three_seeds())
    results["settings"] |= {
        "hidden_size": 504,
        "num_layers": 30,
        "num_key_value_heads": 3,
        "intermediate_size": 1536,
        "layer_selection": "importance",
        "train_rows": 800,
        "train_prompts": "t0",
        "seqkd_max_new_tokens": 0,
        "seqkd_temperature": 0.0,
    }
    completions = generation_markdown(results)
    assert "hidden 504, 30 blocks (layer_selection importance), MLP 1536, 9 heads / 3 KV groups" in completions
    assert "learn a 504 -> 576 map" in completions and "800 T0-mixture prompt/completion pairs" in completions
    assert "every unit, in that order" not in completions

    results["settings"]["seqkd_max_new_tokens"] = 64
    seqkd = generation_markdown(results)
    assert (
        "the teacher's own responses (greedy; the generate stage, SeqKD, at most 64 tokens) to 800 T0-mixture" in seqkd
    )
    assert "prompt/completion pairs" not in seqkd

    results["settings"] |= {"hidden_size": 576, "train_prompts": "summaries", "seqkd_temperature": 0.7}
    sampled = generation_markdown(results)
    assert (
        "(sampled at temperature 0.7, top_p 0.9; the generate stage, SeqKD, at most 64 tokens) to 800 T0 (summaries)"
        in sampled
    )
    # At the teacher's width Flex-KD's selection keeps every unit; the page says it only orders them.
    assert "576 most important units there (at the teacher's width: every unit, in that order)" in sampled


def test_the_gpu_setting_trains_the_recipe_tables_student_on_the_teachers_responses(tmp_path):
    from flexkd.config.schema import load_config

    settings = GenerationSettings.gpu()
    config = load_config(
        generation.PIPELINE, generation.pipeline_overrides(settings, tmp_path, Path("eval.jsonl"), 452)
    )
    shape = config.student.architecture
    assert (shape["hidden_size"], shape["num_hidden_layers"], shape["num_key_value_heads"]) == (504, 30, 3)
    assert (config.generate.max_new_tokens, config.generate.batch_size) == (128, 128)
    assert generation.pipeline_stages(settings)[0] == "generate"
    assert generation.pipeline_stages(GenerationSettings.cpu().with_overrides(seqkd_max_new_tokens=0))[0] == "tokenize"


def test_a_part_of_the_mixture_trains_only_its_templates_in_the_mixtures_order(tmp_path, monkeypatch):
    templates = ["xsum_tldr", "app_reviews_rate", "gigaword_reverse_writing", "dream_baseline", "gigaword_TLDR"]
    mixture = tmp_path / "shared" / "t0_mix" / "train.jsonl"
    mixture.parent.mkdir(parents=True)
    # A line separator inside a prompt is text, not the end of a row.
    rows = [
        {"template": name, "prompt": f"row {i}\u2028of {name}", "completion": "c"} for i, name in enumerate(templates)
    ]
    mixture.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")
    monkeypatch.setattr(generation, "SHARED_DATA", tmp_path / "shared")

    summaries = generation.write_train_set(tmp_path / "work", "summaries")
    kept = [json.loads(line) for line in summaries.read_text(encoding="utf-8").split("\n") if line]
    assert [row["template"] for row in kept] == ["xsum_tldr", "dream_baseline", "gigaword_TLDR"]
    assert kept[0]["prompt"] == "row 0\u2028of xsum_tldr"
    assert generation.write_train_set(tmp_path / "work", "t0") == mixture
    overrides = generation.pipeline_overrides(
        GenerationSettings.cpu().with_overrides(train_prompts="summaries"), tmp_path / "work", tmp_path / "e.jsonl", 3
    )
    assert overrides["data.train"]["path"] == str(summaries)
    assert overrides["data.score"]["path"] == str(mixture)  # the same pruned start as the whole mixture's


def test_a_sampling_seqkd_teacher_is_set_only_with_a_temperature(tmp_path):
    from flexkd.config.schema import load_config

    def generate(**changes):
        settings = GenerationSettings.cpu().with_overrides(seqkd_max_new_tokens=64, **changes)
        overrides = generation.pipeline_overrides(settings, tmp_path, tmp_path / "e.jsonl", 3)
        return load_config(generation.PIPELINE, overrides).generate

    assert generate(seqkd_temperature=0.0).do_sample is False
    sampled = generate(seqkd_temperature=0.7)
    assert (sampled.do_sample, sampled.temperature, sampled.top_p) == (True, 0.7, generation.SEQKD_TOP_P)
