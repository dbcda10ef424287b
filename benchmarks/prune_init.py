"""Does starting the student from the pruned teacher help? SmolLM2-135M-Instruct -> d=384 on SAMSum.

    python benchmarks/prune_init.py [--steps 60] [--layers 20] [--layer-selection importance] [--eval-rows 50]

SAMSum (../shared/data/samsum, a 200-dialogue sample) is split: the first --eval-rows dialogues
are the test set, the next --train-rows the training set. Two runs of the instruct_samsum pipeline, same data,
same loss, same steps, same teacher-target cache settings, same layer pairs:

    pruned   student.init: prune_from_teacher (hidden 384, --layers of the teacher's 30 blocks
             chosen by --layer-selection,
             MLP 1024, 2 of 3 KV groups = 6 heads of the teacher's width 64); layer_map 'source',
             selection 'identity' (the pruned student's defaults)
    random   student.init: random with exactly that shape; the pruned run's layer pairs, spelled
             out; selection 'importance' (the Flex-KD default), k = 384

Each is evaluated by the evaluate stage's own code (ROUGE-L of greedy summaries and perplexity of
the reference summaries under teacher forcing): the pruned student before distillation (the
score stage's pruned_student/), both students after --steps steps, and the teacher. Writes
benchmarks/results/prune_init.json and .md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results"
SAMSUM = REPO.parent / "shared" / "data" / "samsum" / "samsum.jsonl"
TEACHER_LAYERS = 30


def split_samsum(work_dir: Path, eval_rows: int) -> tuple[Path, Path]:
    """The first ``eval_rows`` dialogues for testing, the others for training (disjoint)."""
    lines = SAMSUM.read_text().splitlines()
    data = work_dir / "data"
    data.mkdir(parents=True, exist_ok=True)
    (data / "test.jsonl").write_text("\n".join(lines[:eval_rows]) + "\n")
    (data / "train.jsonl").write_text("\n".join(lines[eval_rows:]) + "\n")  # data.train.limit takes the first
    return data / "train.jsonl", data / "test.jsonl"


def pipelines(work_dir: Path, args: argparse.Namespace) -> dict[str, dict]:
    """Raw configs of both runs (the random run's layer_map is filled in after the pruned run)."""
    from flexkd.config.schema import apply_overrides

    train, test = split_samsum(work_dir, args.eval_rows)
    raw = yaml.safe_load((REPO / "pipelines" / "instruct_samsum.yaml").read_text())
    summarize = {"prompt_template": "Summarize this dialogue.\n{dialogue}", "response_column": "summary"}
    common = {
        "artifact_root": str(work_dir / "runs"),
        "tracking.tracking_uri": f"sqlite:///{work_dir}/mlflow.db",
        "data.train": {"path": str(train), "limit": args.train_rows, **summarize},
        "data.eval": {"path": str(test), **summarize},
        "data.score": {"path": str(train), "limit": args.score_rows, **summarize},
        "data.max_length": args.max_length,
        "scoring.batch_size": 8,
        "training": {
            "steps": args.steps,
            "batch_size": args.batch_size,
            "learning_rate": args.learning_rate,
            "warmup_steps": max(1, args.steps // 10),
            "log_every": max(1, args.steps // 10),
            "checkpoint_every": args.steps,
            "teacher": "cache",
        },
        "targets": {"top_k_logits": 32, "temperatures": [1.0], "batch_size": 8},
        "evaluation": {"batch_size": 8, "max_new_tokens": args.max_new_tokens, "samples": 10},
        "resources": {"num_workers": 1, "cpus_per_worker": 1, "threads_per_worker": args.threads},
    }
    sizes = {"hidden_size": 384, "num_hidden_layers": args.layers, "intermediate_size": 1024, "num_key_value_heads": 2}
    pruned = apply_overrides(
        raw,
        {
            **common,
            "name": "prune-init-pruned",
            "layer_map": "source",
            "student": {"init": "prune_from_teacher", "architecture": sizes, "layer_selection": args.layer_selection},
        },
    )
    # The same shape: 6 heads of the teacher's width 64 (a pruned student keeps it).
    random = apply_overrides(
        raw,
        {
            **common,
            "name": "prune-init-random",
            "student": {"init": "random", "architecture": {**sizes, "num_attention_heads": 6, "head_dim": 64}},
        },
    )
    return {"pruned": pruned, "random": random}


def evaluate_folder(config, tokenize_dir: Path, model_dir: Path) -> dict[str, float]:
    """ROUGE-L and perplexity of one model folder on the eval split, by the evaluate stage's code."""
    import torch

    from flexkd.evaluation.metrics import generate_and_score, read_eval_rows
    from flexkd.models.loading import load_model, parameter_count
    from flexkd.models.plan import load_pipeline_tokenizer

    pad_token_id = json.loads((tokenize_dir / "manifest.json").read_text())["outputs"]["pad_token_id"]
    model = load_model(model_dir).eval()
    scores, predictions = generate_and_score(
        model,
        read_eval_rows(tokenize_dir / "eval"),
        config,
        load_pipeline_tokenizer(config),
        pad_token_id,
        torch.device("cpu"),
        model_dir.name,
    )
    return {**scores, "parameters": parameter_count(model), "first_prediction": predictions[0]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    # The defaults fit a 2-core machine that others share (load average 10-30 while this was written).
    parser.add_argument("--steps", type=int, default=60, help="distill steps of each student")
    parser.add_argument("--layers", type=int, default=20, help="teacher blocks the student keeps (of 30)")
    # Measured on the teacher alone (16 SAMSum summaries): 20 blocks kept uniformly give perplexity
    # 48,000, the 20 that change the hidden state most 140 (the teacher: 19).
    parser.add_argument("--layer-selection", choices=("uniform", "importance", "perplexity"), default="importance")
    parser.add_argument("--eval-rows", type=int, default=50, help="SAMSum test dialogues")
    parser.add_argument("--train-rows", type=int, default=64, help="SAMSum training dialogues (cached teacher targets)")
    parser.add_argument("--score-rows", type=int, default=16, help="training dialogues the score stage reads")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--learning-rate", type=float, default=5e-4)
    parser.add_argument("--max-length", type=int, default=128, help="tokens per row; long dialogues lose their start")
    parser.add_argument("--max-new-tokens", type=int, default=24)
    parser.add_argument("--threads", type=int, default=2, help="torch threads of the Ray Train worker")
    parser.add_argument("--work-dir", type=Path, default=Path("/tmp/flexkd-prune-init"))
    args = parser.parse_args()

    from flexkd.cluster.local import ensure_ray
    from flexkd.config.schema import apply_overrides, parse_config
    from flexkd.pipeline.runner import run_pipeline

    started = time.time()
    shutil.rmtree(args.work_dir, ignore_errors=True)  # every run measures from scratch
    args.work_dir.mkdir(parents=True)
    raws = pipelines(args.work_dir, args)
    ensure_ray()
    load_before = os.getloadavg()

    pruned_config = parse_config(raws["pruned"], source="prune-init-pruned")
    pruned_run = run_pipeline(pruned_config, stages=("tokenize", "score", "targets", "distill", "evaluate"))
    tokenize_dir, score_dir = pruned_run.stages["tokenize"].directory, pruned_run.stages["score"].directory
    layer_pairs = pruned_run.stages["score"].outputs["layer_pairs"]
    timings = {f"pruned.{name}": round(record.seconds, 1) for name, record in pruned_run.stages.items()}

    random_raw = apply_overrides(raws["random"], {"layer_map": layer_pairs})
    random_config = parse_config(random_raw, source="prune-init-random")
    random_run = run_pipeline(random_config, stages=("tokenize", "score", "targets", "distill"))
    timings |= {f"random.{name}": round(record.seconds, 1) for name, record in random_run.stages.items()}
    for name, raw in (("pruned", raws["pruned"]), ("random", random_raw)):
        (args.work_dir / f"{name}.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))

    evaluated = time.time()
    metrics = pruned_run.stages["evaluate"].outputs["metrics"]
    rows = {
        "teacher": {
            "rougeL": metrics["teacher.rougeL"],
            "perplexity": metrics["teacher.perplexity"],
            "parameters": metrics["teacher.parameters"],
        },
        "pruned, before distillation": evaluate_folder(pruned_config, tokenize_dir, score_dir / "pruned_student"),
        f"pruned, after {args.steps} steps": {
            "rougeL": metrics["student.rougeL"],
            "perplexity": metrics["student.perplexity"],
            "parameters": metrics["student.parameters"],
        },
        f"random init, after {args.steps} steps": evaluate_folder(
            random_config, tokenize_dir, random_run.stages["distill"].directory / "student"
        ),
    }
    timings["evaluate_folders"] = round(time.time() - evaluated, 1)
    selection = json.loads((score_dir / "pruning" / "selection.json").read_text())
    distill = {
        name: {key: run.stages["distill"].outputs[key] for key in ("total", "task", "logit", "feature")}
        for name, run in (("pruned", pruned_run), ("random", random_run))
    }
    results = {
        "command": "python benchmarks/prune_init.py "
        + " ".join(f"--{key.replace('_', '-')} {value}" for key, value in vars(args).items()),
        "setup": {
            "teacher": "SmolLM2-135M-Instruct (d=576, 30 blocks, 9 heads / 3 KV, MLP 1536)",
            "student": f"d=384, {args.layers} blocks, 6 heads / 2 KV of width 64, MLP 1024",
            "train_dialogues": min(args.train_rows, 200 - args.eval_rows),
            "test_dialogues": args.eval_rows,
            "score_dialogues": args.score_rows,
            "steps": args.steps,
            "batch_size": args.batch_size,
            "learning_rate": args.learning_rate,
            "max_length": args.max_length,
            "max_new_tokens": args.max_new_tokens,
            "kept_teacher_blocks": selection["kept_layers"],
            "layer_selection": args.layer_selection,
            "layer_pairs": layer_pairs,
            "machine": f"{os.cpu_count()} CPUs, {platform.processor() or platform.machine()}, shared",
        },
        "results": rows,
        "final_train_losses": distill,
        "seconds": timings,
        "total_seconds": round(time.time() - started, 1),
        "load_average": {"before": [round(x, 1) for x in load_before], "after": [round(x, 1) for x in os.getloadavg()]},
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "prune_init.json").write_text(json.dumps(results, indent=2))
    (RESULTS / "prune_init.md").write_text(report(results))
    print(report(results))


def report(results: dict) -> str:
    setup = results["setup"]
    table = "\n".join(
        f"| {name} | {row['rougeL']:.2f} | {row['perplexity']:.4g} | {row['parameters'] / 1e6:.1f}M |"
        for name, row in results["results"].items()
    )
    losses = "\n".join(
        f"| {name} | " + " | ".join(f"{value:.4g}" for value in parts.values()) + " |"
        for name, parts in results["final_train_losses"].items()
    )
    return f"""## Student initialization: pruned from the teacher vs random, SAMSum

`{results["command"]}`

{setup["machine"]}; the whole script took {results["total_seconds"] / 60:.1f} min (load average
{results["load_average"]["before"]} before, {results["load_average"]["after"]} after: the machine is shared).

Teacher {setup["teacher"]}; student {setup["student"]}. SAMSum sample split into
{setup["train_dialogues"]} training and {setup["test_dialogues"]} test dialogues (disjoint); pruning
scores from {setup["score_dialogues"]} training dialogues. Both students: {setup["steps"]} distill steps of
batch {setup["batch_size"]}, learning rate {setup["learning_rate"]}, max length {setup["max_length"]},
the instruct_samsum loss (task + forward KL + correlation), teacher targets from the cache (top-32 logits),
the same {len(setup["layer_pairs"])} layer pairs {setup["layer_pairs"]} (each student block with the teacher
block it was cut from; teacher blocks kept by `student.layer_selection: {setup["layer_selection"]}`:
{setup["kept_teacher_blocks"]}). The pruned student pairs
each unit with the teacher unit it was cut from; the random one uses Flex-KD importance selection.

| model | ROUGE-L (test, greedy, {setup["max_new_tokens"]} new tokens) | perplexity of reference summaries | parameters |
|---|---|---|---|
{table}

Final training losses (last step):

| student | total | task | logit | feature |
|---|---|---|---|---|
{losses}

Stage seconds: {results["seconds"]}.
One run, one seed, {setup["test_dialogues"]} test dialogues: differences of a point or two of ROUGE-L are
within noise.
"""


if __name__ == "__main__":
    main()
