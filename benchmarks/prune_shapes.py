"""How hard to prune: SmolLM2-135M-Instruct cut to many shapes, each scored before any training.

    python benchmarks/prune_shapes.py [--work-dir /tmp/gr] [--eval-dialogues 60]

The first lever of a student that can speak (issue 20) is how much of the teacher it keeps. Every
shape here is cut from one scoring pass, the score stage of the generation-recipe pipeline (blocks
by importance, residual units ranked over the kept blocks), so shapes differ only in what they keep.
Each pruned start is scored as the evaluate stage scores a student, on the first SAMSum dialogues:
ROUGE-L of greedy summaries, perplexity of the references, distinct-2 and outputs that are one
repeated n-gram. A start with a lower perplexity has less to relearn: on these CPUs every distill
step counts, so the recipe table trains the shapes at the front of this one. One row cuts a shape
with its units ranked at the last block alone, the score stage's rule before revision 1.
Writes benchmarks/results/prune_shapes.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks.common import LoadMonitor, machine, provenance_lines, write_results
from benchmarks.generation import (
    METHODS,
    PIPELINE,
    QUERY_HEADS_PER_KV_GROUP,
    table_cell,
    tracking_uri,
    write_eval_set,
)
from benchmarks.generation import pipeline_overrides as generation_overrides
from benchmarks.generation_recipe import RECIPES, recipe_settings

SCORING_RECIPE = "576x30-mlp1024-seqkd"  # whose score stage's scores every shape is cut from


@dataclass(frozen=True)
class Shape:
    hidden_size: int
    num_layers: int
    intermediate_size: int
    num_key_value_heads: int = 3
    ranked_at_last_block: bool = False

    @property
    def name(self) -> str:
        name = f"{self.hidden_size} wide, {self.num_layers} blocks, MLP {self.intermediate_size}"
        name += f", {self.num_key_value_heads} KV groups" if self.num_key_value_heads != 3 else ""
        return name + (", units ranked at the last block" if self.ranked_at_last_block else "")


SHAPES = (
    Shape(576, 27, 1536),
    Shape(576, 24, 1536),
    Shape(576, 20, 1536),
    Shape(576, 30, 1024),
    Shape(576, 24, 1024),
    Shape(504, 30, 1536),
    Shape(504, 30, 1536, ranked_at_last_block=True),
    Shape(432, 30, 1536),
    Shape(384, 16, 1024, 2),  # the CPU generation table's student
)


def run_prune_shapes(work_dir: Path, eval_dialogues: int) -> dict[str, Any]:
    import torch
    from safetensors.torch import load_file

    from flexkd.config.schema import load_config
    from flexkd.evaluation.metrics import fluency_scores, generate_and_score, read_eval_rows
    from flexkd.models.loading import parameter_count
    from flexkd.models.plan import PRUNING_SELECTION, load_pipeline_tokenizer, load_teacher
    from flexkd.pipeline.runner import run_pipeline
    from flexkd.prune.student import PruneTargets, hidden_units_by_importance, kept_layer_indices, prune_llama

    command, started = shlex.join(["python", "benchmarks/prune_shapes.py", *sys.argv[1:]]), time.time()
    torch.set_num_threads(2)
    settings = recipe_settings().with_overrides(**RECIPES[SCORING_RECIPE].changes)
    eval_path, sources = write_eval_set(work_dir, samsum_only=eval_dialogues)
    overrides = generation_overrides(settings, work_dir, eval_path, len(sources)) | METHODS["kd"]
    config = load_config(PIPELINE, overrides | {"name": "bench-generation-recipe"})
    stages = run_pipeline(config, stages=("generate", "tokenize", "score")).stages
    score_dir, tokenize_dir = Path(stages["score"].directory), Path(stages["tokenize"].directory)
    scores = load_file(score_dir / PRUNING_SELECTION.parent / "scores.safetensors")
    pad_token_id = json.loads((tokenize_dir / "manifest.json").read_text())["outputs"]["pad_token_id"]
    eval_rows, tokenizer = read_eval_rows(tokenize_dir / "eval"), load_pipeline_tokenizer(config)
    teacher = load_teacher(config).eval()
    teacher_layers = teacher.config.num_hidden_layers

    def scored(model, name: str) -> dict[str, Any]:
        clock = time.time()
        with torch.no_grad():
            measured, outputs = generate_and_score(
                model, eval_rows, config, tokenizer, pad_token_id, torch.device("cpu")
            )
        row = {"shape": name, "parameters": parameter_count(model), "rougeL": measured["rougeL"]}
        row |= {"perplexity": measured["perplexity"], **fluency_scores(outputs), "first_output": outputs[0]}
        print(json.dumps(row | {"seconds": round(time.time() - clock)}), flush=True)
        return row

    with LoadMonitor() as load:
        rows = [scored(teacher, "teacher (nothing cut)")]
        for shape in SHAPES:
            targets = PruneTargets(
                shape.hidden_size,
                shape.num_layers,
                shape.intermediate_size,
                shape.num_key_value_heads,
                "importance",
                QUERY_HEADS_PER_KV_GROUP * shape.num_key_value_heads,
            )
            kept = kept_layer_indices(teacher_layers, shape.num_layers, "importance", scores["block_change"])
            ranked_at = [teacher_layers - 1] if shape.ranked_at_last_block else kept
            units = hidden_units_by_importance(
                {block: scores["residual"][block] for block in ranked_at}, shape.hidden_size
            )
            rows.append(scored(prune_llama(teacher, units, targets, scores).eval(), shape.name))
    results = {
        "benchmark": "prune_shapes",
        "command": command,
        "machine": machine(),
        "load": load.summary(),
        "scored_by": str(score_dir),
        "scoring_examples": int(scores["examples"]),
        "eval_dialogues": eval_dialogues,
        "max_new_tokens": settings.max_new_tokens,
        "rows": rows,
        "wall_seconds": round(time.time() - started, 1),
        "finished_at": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }
    results["headline"] = {f"perplexity.{row['shape']}": row["perplexity"] for row in rows}
    write_results("prune_shapes", results, prune_shapes_markdown(results), None, tracking_uri(work_dir))
    return results


def prune_shapes_markdown(results: dict[str, Any]) -> str:
    lines = [
        "## How hard to prune: the pruned starts of SmolLM2, before any training",
        "",
        *provenance_lines(results),
        f"Every shape is cut from one scoring pass of the teacher ({results['scoring_examples']} T0 rows; "
        "blocks kept by importance, residual units ranked over the kept blocks unless the row says "
        f"otherwise) and scored, untrained, on the first {results['eval_dialogues']} SAMSum dialogues "
        f"by the evaluate stage's code (greedy, at most {results['max_new_tokens']} new tokens, as the recipe "
        "table). A lower perplexity of the references leaves distillation less to relearn.",
        "",
        "| shape | params | SAMSum ROUGE-L | perplexity of the references | distinct-2 | one-n-gram outputs "
        "| first output |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in results["rows"]:
        lines.append(
            f"| {row['shape']} | {row['parameters'] / 1e6:.1f}M | {row['rougeL']:.2f} | {row['perplexity']:.1f} | "
            f"{row['distinct_2']:.2f} | {row['repeated_ngram_outputs']:.0f} | {table_cell(row['first_output'], 70)} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work-dir", default="runs/bench", help="artifacts and MLflow store (default: runs/bench)")
    parser.add_argument("--eval-dialogues", type=int, default=60, help="SAMSum dialogues scored per shape")
    args = parser.parse_args()
    run_prune_shapes(Path(args.work_dir).resolve(), args.eval_dialogues)
    from benchmarks.page import write_results_page

    write_results_page()


if __name__ == "__main__":
    main()
