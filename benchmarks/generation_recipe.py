"""``flexkd bench generation-recipe``: which pruned student can speak once distilled on these CPUs.

Before the generation comparison means anything, its students must pass the fluency bar (issue
20; ``benchmarks.generation.fluency_failures``). This benchmark holds the levers against it:

    pruning   how much of SmolLM2-135M-Instruct (576 wide, 30 blocks, MLP 1536, 3 KV groups)
              the student keeps (``student.init: prune_from_teacher``, blocks by importance)
    data      the T0 completions (median 2 tokens: most rows teach a one-word answer) or the
              teacher's own responses to the same prompts (SeqKD, the ``generate`` stage), to all
              the mixture's prompts or to those of the eval's domain only (``TRAIN_PROMPTS``)
    steps     the pruned start (0 steps) and after the recipe's distill steps, plain kd

Each recipe runs the real pipeline (kd, seed 0) and is scored by the evaluate stage's code on the
first SAMSum dialogues: ROUGE-L, perplexity of the references, distinct-2 and outputs that are one
repeated n-gram, with the bar's verdict. Writes benchmarks/results/generation-recipe.{json,md}, or
with ``--only``, ``--steps`` or ``--train-rows`` a section of its own,
generation-recipe_<ids>_steps<N>_rows<M>.{json,md} (``section_name``).
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from benchmarks.common import (
    RESULTS,
    LoadMonitor,
    command_line,
    machine,
    provenance_lines,
    stage_seconds,
    write_results,
)
from benchmarks.generation import (
    FLUENCY_MEASURES,
    METHODS,
    PIPELINE,
    GenerationSettings,
    evaluate_pruned_start,
    fluency_failures,
    pipeline_overrides,
    pipeline_stages,
    read_predictions,
    rouge_by_source,
    table_cell,
    tracking_uri,
    write_eval_set,
)


@dataclass(frozen=True)
class Recipe:
    name: str  # as the table shows it
    changes: dict[str, Any]  # the GenerationSettings fields it changes


SEQKD = {"seqkd_max_new_tokens": 64}
SHAPE_576X27 = {"hidden_size": 576, "num_layers": 27, "num_key_value_heads": 3, "intermediate_size": 1536}
# The three blocks cut by perplexity, sampled SeqKD on the summary prompts: the closest recipe to
# the bar, and the base of those that vary it.
PPL_SAMPLED = (
    SHAPE_576X27 | SEQKD | {"train_prompts": "summaries", "seqkd_temperature": 0.7, "layer_selection": "perplexity"}
)
# id (for --only) -> recipe. The first is recipe_settings() itself; 576x27-ppl-seqkd-summaries-sampled
# is the generation table's CPU student (GenerationSettings.cpu).
RECIPES: dict[str, Recipe] = {
    "384x16-t0": Recipe("384 wide, 16 blocks, T0 completions", {}),
    "384x16-seqkd": Recipe("384 wide, 16 blocks, teacher responses", dict(SEQKD)),
    "504x30-seqkd": Recipe(
        "504 wide, 30 blocks, teacher responses",
        {"hidden_size": 504, "num_layers": 30, "num_key_value_heads": 3, "intermediate_size": 1536} | SEQKD,
    ),
    # The teacher's width and depth, a third of each MLP cut: MLP channels cost the pruned start
    # the least perplexity per parameter removed (the cheapest cut on these CPUs to train long).
    "576x30-mlp1024-seqkd": Recipe(
        "576 wide, 30 blocks, MLP 1024, teacher responses",
        {"hidden_size": 576, "num_layers": 30, "num_key_value_heads": 3, "intermediate_size": 1024} | SEQKD,
    ),
    # Three blocks cut and nothing else: the best pruned start of benchmarks/results/prune_shapes.md
    # (perplexity 25.2 against the teacher's 13.6, ROUGE-L already above half the teacher's).
    "576x27-seqkd": Recipe("576 wide, 27 blocks, teacher responses", SHAPE_576X27 | SEQKD),
    # The same student and SeqKD, on the T0 prompts of the eval's domain only (TRAIN_PROMPTS
    # "summaries"): whether the stock phrases the mixture's responses teach give way to summaries.
    "576x27-seqkd-summaries": Recipe(
        "576 wide, 27 blocks, teacher responses to summary and dialogue prompts",
        SHAPE_576X27 | SEQKD | {"train_prompts": "summaries"},
    ),
    # And the teacher's responses sampled rather than greedy: greedy responses repeat the teacher's
    # most likely phrasing across prompts, which a student imitates the more closely it trains.
    "576x27-seqkd-summaries-sampled": Recipe(
        "576 wide, 27 blocks, sampled teacher responses (temperature 0.7) to summary and dialogue prompts",
        SHAPE_576X27 | SEQKD | {"train_prompts": "summaries", "seqkd_temperature": 0.7},
    ),
    # And the three blocks cut by what skipping each costs the teacher's loss (layer_selection
    # perplexity) rather than by how little each changes the hidden state.
    "576x27-ppl-seqkd-summaries-sampled": Recipe(
        "576 wide, 27 blocks chosen by perplexity, sampled teacher responses (temperature 0.7) to summary "
        "and dialogue prompts",
        PPL_SAMPLED,
    ),
    # And only the responses that ended within the 64 tokens: the cut ones, followed by eos like
    # every response, teach the student to stop mid-sentence and never where a summary ends.
    "576x27-ppl-seqkd-summaries-sampled-ended": Recipe(
        "576 wide, 27 blocks chosen by perplexity, sampled teacher responses (temperature 0.7) to summary "
        "and dialogue prompts, only those that ended within 64 tokens",
        PPL_SAMPLED | {"seqkd_drop_truncated": True},
    ),
    # And half the steps on the student's own samples (GKD, training.on_policy 0.5), the teacher
    # scoring them online: its loops begin in states that only its own outputs reach.
    "576x27-ppl-seqkd-summaries-sampled-onpolicy": Recipe(
        "576 wide, 27 blocks chosen by perplexity, sampled teacher responses (temperature 0.7) to summary "
        "and dialogue prompts, half the steps on the student's own samples",
        PPL_SAMPLED | {"on_policy": 0.5},
    ),
}
RESPONSE_COUNTS = ("rows", "looping_responses", "truncated_responses")  # the generate stage's, per SeqKD recipe
EVAL_DIALOGUES = 60  # SAMSum rows scored per model: five models' greedy decoding within the 90 minutes


def recipe_settings() -> GenerationSettings:
    """What every recipe changes: the 384-wide, 16-block student on 320 T0 completions, 100 steps,
    seed 0, two threads (the generation table's CPU setting when the recipes began). The first
    five recipes, SeqKD's teacher responses included, run in about 90 minutes on 2 cores."""
    return GenerationSettings(
        train_rows=320,
        score_rows=64,
        steps=100,
        batch_size=8,
        max_length=256,
        max_new_tokens=64,
        num_layers=16,
        seeds=(0,),
        threads_per_worker=2,
    )


def run_generation_recipe(
    settings: GenerationSettings,
    work_dir: Path,
    recipes: tuple[str, ...] = tuple(RECIPES),
    eval_dialogues: int = EVAL_DIALOGUES,
    results_dir: Path = RESULTS,
) -> dict[str, Any]:
    from flexkd.config.schema import load_config
    from flexkd.models.plan import PRUNING_SELECTION, teacher_model_config
    from flexkd.pipeline.runner import run_pipeline

    command, started = command_line(), time.time()
    eval_path, sources = write_eval_set(work_dir, samsum_only=eval_dialogues)
    rows: list[dict[str, Any]] = []
    teacher: dict[str, Any] = {}
    starts: dict[str, dict[str, Any]] = {}  # the pruning's selection.json -> its start's scores
    with LoadMonitor() as load:
        for recipe_id in recipes:
            name, changes = RECIPES[recipe_id].name, RECIPES[recipe_id].changes
            recipe = settings.with_overrides(**changes)
            overrides = pipeline_overrides(recipe, work_dir, eval_path, len(sources)) | METHODS["kd"]
            overrides["name"] = "bench-generation-recipe"
            seed = recipe.seeds[0]
            config = load_config(PIPELINE, overrides | {"student.seed": seed, "training.seed": seed})
            result = run_pipeline(config, stages=pipeline_stages(recipe))
            stages = result.stages
            # Recipes that differ only after pruning (the data, the steps) share their pruned start.
            score_dir = Path(stages["score"].directory)
            pruned = (score_dir / PRUNING_SELECTION).read_text()
            if pruned not in starts:
                starts[pruned] = evaluate_pruned_start(config, Path(stages["tokenize"].directory), score_dir, sources)
                start = starts[pruned] | {"new": True}
            else:
                start = starts[pruned] | {"new": False}
            metrics = stages["evaluate"].outputs["metrics"]
            predictions = read_predictions(stages["evaluate"].directory / "predictions.jsonl", sources)
            rouge = rouge_by_source(predictions, sources)
            fluency = {
                role: {measure: metrics[f"{role}.{measure}"] for measure in FLUENCY_MEASURES}
                for role in ("teacher", "student")
            }
            teacher = teacher or {
                "samsum": rouge["teacher"]["samsum"],
                "perplexity": metrics["teacher.perplexity"],
                **fluency["teacher"],
                "first_output": predictions[0]["teacher"],
            }
            common = {
                "recipe": name,
                "parameters": start["parameters"],
                "settings": changes,
                "cut_blocks": sorted(
                    set(range(teacher_model_config(config).num_hidden_layers)) - set(json.loads(pruned)["kept_layers"])
                ),
            }
            if start["new"]:
                rows.append(
                    common
                    | {
                        "steps": 0,
                        "samsum": start["rougeL"]["samsum"],
                        "perplexity": start["perplexity"],
                        **start["fluency"],
                        "first_output": start["first_outputs"]["samsum"][0],
                    }
                )
            rows.append(
                common
                | {
                    "steps": recipe.steps,
                    "samsum": rouge["student"]["samsum"],
                    "perplexity": metrics["student.perplexity"],
                    **fluency["student"],
                    "first_output": predictions[0]["student"],
                    "seconds": {stage: stage_seconds(record) for stage, record in stages.items()},
                    "teacher_responses": (
                        {count: stages["generate"].outputs[count] for count in RESPONSE_COUNTS}
                        | {
                            "drop_looping": config.generate.drop_looping,
                            "drop_truncated": config.generate.drop_truncated,
                        }
                        if "generate" in stages
                        else None
                    ),
                }
            )
            (work_dir / "generation-recipe.partial.json").write_text(json.dumps(rows, indent=1))
    for row in rows:
        row["failures"] = fluency_failures(row, row["samsum"], teacher["samsum"])
    results = {
        "benchmark": "generation-recipe",
        "command": command,
        "machine": machine(),
        "load": load.summary(),
        "settings": asdict(settings),
        "recipes": list(recipes),
        "eval_dialogues": eval_dialogues,
        "reference": predictions[0]["reference"],
        "teacher": teacher,
        "rows": rows,
        "wall_seconds": round(time.time() - started, 1),
        "finished_at": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }
    results["headline"] = {f"rougeL.{row['recipe']}.{row['steps']}": row["samsum"] for row in rows}
    write_results(
        section_name(recipes, settings), results, recipe_markdown(results), None, tracking_uri(work_dir), results_dir
    )
    return results


def section_name(recipes: tuple[str, ...], settings: GenerationSettings) -> str:
    """The results file of a run of ``recipes`` (ids) under ``settings``: the full table's at the
    default settings, else a section of its own beside it, named by the ids in the table's order
    and by the steps and training prompts that differ from ``recipe_settings()``, so that a run
    with other settings does not overwrite another's numbers."""
    parts = ["generation-recipe"]
    if set(recipes) != set(RECIPES):
        parts += [recipe for recipe in RECIPES if recipe in recipes]
    return "_".join(parts + _changed_settings(settings.steps, settings.train_rows))


def _changed_settings(steps: int, train_rows: int) -> list[str]:
    """The steps and training prompts of a run that differ from ``recipe_settings()``, as name parts."""
    default = recipe_settings()
    return [
        f"{name}{value}"
        for name, value, default_value in (("steps", steps, default.steps), ("rows", train_rows, default.train_rows))
        if value != default_value
    ]


def recipe_markdown(results: dict[str, Any]) -> str:
    settings, teacher = results["settings"], results["teacher"]
    passing = [row for row in results["rows"] if not row["failures"] and row["steps"]]
    # As section_name: a section other than the full table at the default settings names its scope.
    subset = set(results["recipes"]) != set(RECIPES)
    scope = ["; ".join(RECIPES[i].name for i in results["recipes"])] if subset else []
    if subset or _changed_settings(settings["steps"], settings["train_rows"]):
        scope.append(f"{settings['steps']} steps on {settings['train_rows']} prompts")
    some = ": " + ", ".join(scope) if scope else ""
    lines = [
        f"### Generation: a student that can speak (the recipe{some})",
        "",
        *provenance_lines(results),
        f"Each recipe is one run of the generation pipeline with plain kd, seed 0: the student cut out of "
        f"SmolLM2-135M-Instruct (blocks chosen by importance unless the recipe says otherwise), the first {settings['train_rows']} T0 prompts "
        "(of the whole mixture unless the recipe names a part of it), "
        f"{settings['steps']} steps of batch {settings['batch_size']}, lr {settings['learning_rate']}, "
        f"max length {settings['max_length']}. Scored on the first {results['eval_dialogues']} SAMSum "
        f"dialogues, greedy, at most {settings['max_new_tokens']} new tokens. The fluency bar: distinct-2 "
        "at least 0.5, no output that is one repeated n-gram, ROUGE-L at least half the teacher's.",
        "",
        "| recipe | steps | params | SAMSum ROUGE-L | perplexity of the references | distinct-2 "
        "| one-n-gram outputs | fluency bar | first output |",
        "|---|---|---|---|---|---|---|---|---|",
        f"| teacher | - | 134.5M | {teacher['samsum']:.2f} | {teacher['perplexity']:.1f} | "
        f"{teacher['distinct_2']:.2f} | {teacher['repeated_ngram_outputs']:.0f} | - | "
        f"{table_cell(teacher['first_output'], 70)} |",
    ]
    for row in results["rows"]:
        verdict = "passes" if not row["failures"] else "fails: " + "; ".join(row["failures"])
        lines.append(
            f"| {row['recipe']} | {row['steps']} | {row['parameters'] / 1e6:.1f}M | {row['samsum']:.2f} | "
            f"{row['perplexity']:.1f} | {row['distinct_2']:.2f} | {row['repeated_ngram_outputs']:.0f} | "
            f"{verdict} | {table_cell(row['first_output'], 70)} |"
        )
    lines += [
        "",
        f"Reference of the first dialogue: {table_cell(results['reference'], 200)}",
        "",
        *(
            f"Teacher blocks cut (0-based) for {row['recipe']}: {', '.join(map(str, row['cut_blocks'])) or 'none'}.\n"
            for row in results["rows"]
            if row["steps"] == 0 and "cut_blocks" in row
        ),
        *(
            f"Teacher responses of {row['recipe']}: {counts['rows']} trained on; {counts['truncated_responses']} cut "
            f"at {row['settings']['seqkd_max_new_tokens']} tokens "
            f"{'left out' if counts.get('drop_truncated') else 'kept'}; {counts['looping_responses']} that "
            f"were one n-gram repeated {'left out' if counts['drop_looping'] else 'kept'}.\n"
            for row in results["rows"]
            if (counts := row.get("teacher_responses"))
        ),
        (
            "Distilled recipes that pass the bar: " + ", ".join(f"**{row['recipe']}**" for row in passing) + "."
            if passing
            else "**No distilled recipe passes the bar.**"
        ),
        "",
    ]
    return "\n".join(lines)
