"""``flexkd bench generation-recipe`` without running it: every recipe is a valid pipeline, and a
run with the pipeline faked puts each model's fluency numbers and the bar's verdict on the page,
with one pruned-start row per distinct pruning."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from benchmarks import generation, generation_recipe
from benchmarks.generation_recipe import RECIPES, recipe_settings
from flexkd.cli import build_parser
from flexkd.models.plan import PRUNING_SELECTION


@pytest.mark.parametrize("name", list(RECIPES))
def test_every_recipe_is_a_pipeline_the_schema_accepts(name, tmp_path):
    from flexkd.config.schema import load_config

    recipe = recipe_settings().with_overrides(**RECIPES[name].changes)
    overrides = generation.pipeline_overrides(recipe, tmp_path, Path("eval.jsonl"), 60) | generation.METHODS["kd"]
    config = load_config(generation.PIPELINE, overrides)
    architecture = config.student.architecture
    assert (architecture["hidden_size"], architecture["num_hidden_layers"]) == (recipe.hidden_size, recipe.num_layers)
    # Heads go as whole KV groups of the teacher's 3 query heads each.
    assert architecture["num_attention_heads"] == 3 * architecture["num_key_value_heads"]
    seqkd = "seqkd_max_new_tokens" in RECIPES[name].changes
    assert (config.generate is not None) == seqkd == ("generate" in generation.pipeline_stages(recipe))
    if seqkd:
        assert config.generate.max_new_tokens == 64
        assert config.generate.drop_truncated == recipe.seqkd_drop_truncated
    assert config.loss.gamma == 0.0 and config.training.steps == recipe.steps
    # On-policy steps need the teacher online; otherwise the cache serves every step.
    assert config.training.on_policy == recipe.on_policy
    assert config.training.teacher == ("online" if recipe.on_policy else "cache")


def test_the_generation_tables_cpu_student_is_the_recipe_it_names():
    # The table runs the recipe as measured (--train-rows 660), on three seeds: the two must not drift apart.
    measured = recipe_settings().with_overrides(train_rows=660, **RECIPES["576x27-ppl-seqkd-summaries-sampled"].changes)
    assert generation.GenerationSettings.cpu() == measured.with_overrides(seeds=(0, 1, 2))


def _stage(directory: Path, outputs: dict | None = None) -> SimpleNamespace:
    return SimpleNamespace(directory=directory, outputs=outputs or {}, seconds=2.0, cached=False)


def test_a_run_shows_each_models_fluency_and_verdict_and_one_row_per_pruned_start(tmp_path, monkeypatch):
    """The first two recipes cut the same student (one pruned-start row for both); the third
    another. The first distilled student fails the bar on distinct-2, the others pass."""
    # selection.json of each cut: the 384-wide student keeps 16 of the 30 blocks, the 504-wide all.
    selections = {
        384: json.dumps({"kept_layers": [*range(15), 29]}),
        504: json.dumps({"kept_layers": list(range(30))}),
    }
    student_metrics = iter([(0.3, 0.0, 30.0), (0.7, 0.0, 12.0), (0.8, 0.0, 15.0)])
    evaluated = []

    def fake_pipeline(config, stages):
        width = config.student.architecture["hidden_size"]
        score_dir = tmp_path / f"score-{width}-{len(evaluated)}"
        (score_dir / PRUNING_SELECTION).parent.mkdir(parents=True)
        (score_dir / PRUNING_SELECTION).write_text(selections[width])
        distinct, repeated, perplexity = next(student_metrics)
        metrics = {"teacher.distinct_2": 0.9, "teacher.repeated_ngram_outputs": 0.0, "teacher.perplexity": 11.0}
        metrics |= {"student.distinct_2": distinct, "student.repeated_ngram_outputs": repeated}
        metrics["student.perplexity"] = perplexity
        evaluate_dir = tmp_path / f"evaluate-{len(evaluated)}"
        evaluate_dir.mkdir()
        student = "Amanda bakes cookies" if distinct > 0.5 else "the the the"
        row = {"reference": "Amanda baked cookies", "teacher": "Amanda baked cookies", "student": student}
        (evaluate_dir / "predictions.jsonl").write_text(
            "".join(json.dumps({"example_id": i} | row) + "\n" for i in range(3))
        )
        evaluated.append(tuple(stages))
        found = {stage: _stage(tmp_path) for stage in stages}
        if "generate" in found:
            found["generate"] = _stage(tmp_path, {"rows": 300, "looping_responses": 10, "truncated_responses": 120})
        return SimpleNamespace(
            stages=found | {"score": _stage(score_dir), "evaluate": _stage(evaluate_dir, {"metrics": metrics})}
        )

    def fake_start(config, tokenize_dir, score_dir, sources):
        width = config.student.architecture["hidden_size"]
        return {
            "rougeL": {"samsum": 1.0},
            "perplexity": 900.0 if width == 384 else 50.0,
            "parameters": width * 100_000,
            "fluency": {"distinct_2": 0.2, "repeated_ngram_outputs": 2.0},
            "first_outputs": {"samsum": [f"pruned {width}"]},
        }

    written = {}
    monkeypatch.setattr("flexkd.pipeline.runner.run_pipeline", fake_pipeline)
    monkeypatch.setattr(generation_recipe, "evaluate_pruned_start", fake_start)
    monkeypatch.setattr(
        generation_recipe, "write_results", lambda name, results, page, *args: written.update(name=name, page=page)
    )
    recipes = ("384x16-t0", "384x16-seqkd", "504x30-seqkd")
    results = generation_recipe.run_generation_recipe(recipe_settings(), tmp_path, recipes, eval_dialogues=3)

    assert evaluated[0][0] == "tokenize" and evaluated[1][0] == evaluated[2][0] == "generate"
    assert [(row["recipe"].split(",")[0], row["steps"]) for row in results["rows"]] == [
        ("384 wide", 0),
        ("384 wide", 100),
        ("384 wide", 100),
        ("504 wide", 0),
        ("504 wide", 100),
    ]
    page = written["page"]
    # Not every recipe ran: a section of its own, named by the recipes it holds.
    assert written["name"] == "generation-recipe_384x16-t0_384x16-seqkd_504x30-seqkd"
    assert page.startswith("### Generation: a student that can speak (the recipe: 384 wide, 16 blocks, T0 comp")
    assert "504 wide, 30 blocks, teacher responses, 100 steps on 320 prompts)\n" in page
    assert "| teacher | - | 134.5M | 100.00 | 11.0 | 0.90 | 0 | - | Amanda baked cookies |" in page
    assert (
        "| 384 wide, 16 blocks, T0 completions | 100 | 38.4M | 0.00 | 30.0 | 0.30 | 0 | fails: distinct-2 below 0.5; "
        "SAMSum ROUGE-L below half the teacher's | the the the |"
    ) in page
    assert "| 504 wide, 30 blocks, teacher responses | 100 | 50.4M | 100.00 | 15.0 | 0.80 | 0 | passes |" in page
    assert "fails: distinct-2 below 0.5; 2 outputs one repeated n-gram; SAMSum ROUGE-L below half" in page
    # The blocks each pruned start cut, once per start.
    assert page.count("Teacher blocks cut (0-based)") == 2
    assert "Teacher blocks cut (0-based) for 384 wide, 16 blocks, T0 completions: 15, 16, 17, 18, 19, 20, " in page
    assert "Teacher blocks cut (0-based) for 504 wide, 30 blocks, teacher responses: none.\n" in page
    # The SeqKD recipes' teacher responses, and only theirs (the T0 recipe has no generate stage).
    assert page.count("Teacher responses of") == 2
    assert (
        "Teacher responses of 504 wide, 30 blocks, teacher responses: 300 trained on; 120 cut at 64 tokens "
        "kept; 10 that were one n-gram repeated left out.\n"
    ) in page
    assert page.endswith(
        "Distilled recipes that pass the bar: **384 wide, 16 blocks, teacher responses**, "
        "**504 wide, 30 blocks, teacher responses**.\n"
    )


def test_the_recipe_benchmark_refuses_the_options_it_does_not_take(monkeypatch):
    from benchmarks import cli as bench_cli
    from flexkd.config.schema import ConfigError

    monkeypatch.setattr(torch, "set_num_threads", lambda threads: None)
    captured = {}
    monkeypatch.setattr(
        generation_recipe,
        "run_generation_recipe",
        lambda settings, work_dir, recipes: captured.update(s=settings, recipes=recipes),
    )
    monkeypatch.setattr(bench_cli, "write_results_page", lambda: Path(__file__))
    for option in (["--gpu"], ["--seeds", "0,1"], ["--methods", "kd"]):
        with pytest.raises(ConfigError, match="generation-recipe runs plain kd, seed 0, on the CPU"):
            bench_cli.run_benchmark(build_parser().parse_args(["bench", "generation-recipe", *option]))
    bench_cli.run_benchmark(build_parser().parse_args(["bench", "generation-recipe", "--steps", "7"]))
    assert captured["s"].steps == 7 and captured["s"].train_rows == recipe_settings().train_rows
    assert captured["recipes"] == tuple(RECIPES)
    bench_cli.run_benchmark(build_parser().parse_args(["bench", "generation-recipe", "--only", "504x30-seqkd"]))
    assert captured["recipes"] == ("504x30-seqkd",)
    with pytest.raises(ConfigError, match="unknown name '504x30'; known: 384x16-t0, "):
        bench_cli.run_benchmark(build_parser().parse_args(["bench", "generation-recipe", "--only", "504x30"]))


def test_a_run_of_every_recipe_writes_the_full_table_and_of_some_or_other_settings_a_section_of_its_own():
    default = recipe_settings()
    assert generation_recipe.section_name(tuple(reversed(RECIPES)), default) == "generation-recipe"
    # In the table's order, whatever order --only named them in.
    assert (
        generation_recipe.section_name(("576x30-mlp1024-seqkd", "384x16-t0"), default)
        == "generation-recipe_384x16-t0_576x30-mlp1024-seqkd"
    )
    # Other steps or prompts: their own section, so one run does not overwrite another's numbers.
    assert (
        generation_recipe.section_name(("576x27-seqkd",), default.with_overrides(steps=200, train_rows=1000))
        == "generation-recipe_576x27-seqkd_steps200_rows1000"
    )
    assert generation_recipe.section_name(tuple(RECIPES), default.with_overrides(steps=150)) == (
        "generation-recipe_steps150"
    )


def test_a_sections_heading_names_its_recipes_and_its_steps_and_prompts_unless_it_is_the_full_default_table():
    def heading(recipes, **settings):
        results = {
            "settings": asdict(recipe_settings().with_overrides(**settings)),
            "recipes": list(recipes),
            "teacher": {
                "samsum": 10.0,
                "perplexity": 9.0,
                "distinct_2": 0.6,
                "repeated_ngram_outputs": 0,
                "first_output": "x",
            },
            "rows": [],
            "eval_dialogues": 3,
            "reference": "y",
            "command": "c",
            "machine": {"cpus": 2, "cpu_model": "m", "gpu": None, "git_commit": "abc"},
            "finished_at": "t",
            "wall_seconds": 60.0,
            "load": {"cpus": 2, "load1_mean": 1.0, "load1_min": 1.0, "load1_max": 1.0, "seconds": 60.0},
        }
        return generation_recipe.recipe_markdown(results).splitlines()[0]

    assert heading(RECIPES) == "### Generation: a student that can speak (the recipe)"
    assert (
        heading(RECIPES, steps=150) == "### Generation: a student that can speak (the recipe: 150 steps on 320 prompts)"
    )
    assert heading(["576x27-seqkd"], train_rows=1000) == (
        "### Generation: a student that can speak (the recipe: 576 wide, 27 blocks, teacher responses, "
        "100 steps on 1000 prompts)"
    )
