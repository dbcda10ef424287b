"""``flexkd bench generation``: instruction following and summarization, ROUGE-L of teacher and
students, through the real pipeline.

    teacher   SmolLM2-135M-Instruct as is (the demo teacher)
    student   cut out of the teacher (``student.init: prune_from_teacher``). On the CPU the
              recipe table's best (benchmarks/generation_recipe.py): the teacher's width, 27 of its
              30 blocks, the three cut being those whose skipping costs its loss least
              (``layer_selection: perplexity``); on a GPU 504 wide and every block
    train     SeqKD: the teacher's sampled responses (the ``generate`` stage) to T0 prompts
              (/work/shared/data/t0_mix; on the CPU only its summary and dialogue prompts), chat template
    eval      SAMSum (200 dialogues) and Self-Instruct (252 user-oriented tasks) in one eval split
              (benchmarks/results keeps which row is which); greedy decoding, ROUGE-L F1 x100 per
              set, computed from the evaluate stage's own predictions of every row
    methods   kd, kd+projector, kd+projector_std, kd+flexkd and kd+flexkd-dir on the final hidden
              states (layer_map last; cached teacher targets), the same steps, learning rate, data
              and seeds for all. kd+flexkd is Flex-KD's correlation loss between each of the
              student's 384 units and one of the teacher's 384 most important units at that layer
              (``selection: importance``, the pairing the method learns, not the pruned student's
              default ``identity``); kd+flexkd-dir pairs them with the teacher's coordinates on its
              top 384 task-gradient directions (``selection: directions``, a cache of its own).
    fluency   a student's comparison counts only if its outputs pass a bar (FLUENCY_BAR):
              distinct-2 >= 0.5, no output one repeated n-gram, SAMSum ROUGE-L >= half the teacher's
    judged    per eval set, kd+flexkd(-dir) against kd and both projectors: the paired (same seed)
              difference of ROUGE-L, its mean and std, and a 95% bootstrap interval of the mean
              (benchmarks.stats)
    baseline  the pruned student before any distillation, scored by the same evaluation code

Writes benchmarks/results/generation.{json,md,png} and logs them to MLflow.
"""

from __future__ import annotations

import json
import logging
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
from benchmarks.stats import bootstrap_mean_interval, paired_differences, verdict_word

log = logging.getLogger("flexkd")

PIPELINE = REPO / "pipelines" / "instruct_samsum.yaml"
METHODS: dict[str, dict[str, Any]] = {
    "kd": {"loss.gamma": 0.0, "loss.feature": "none"},
    "kd+projector": {"loss.feature": "projector"},  # the paper's: MSE on the raw teacher features
    # MSE on per-unit standardized teacher features: "kd+projector" in results recorded before it had its own name.
    "kd+projector_std": {"loss.feature": "projector_std"},
    # Flex-KD, units: selection.method importance for every method (pipeline_overrides).
    "kd+flexkd": {"loss.feature": "correlation"},
    # Flex-KD, directions: the schema refuses directions with a full-width cache (their coordinates
    # are not columns of it), so this method builds a cache of its own, and its own score stage.
    "kd+flexkd-dir": {"loss.feature": "correlation", "selection.method": "directions", "targets.full_width": False},
}
# The default methods; the logit-loss variants below run when --methods names them.
DEFAULT_METHODS = tuple(METHODS)
# Better logit losses than forward KL (reverse KL, DistiLLM's skew KL, GKD-style JSD), each under kd
# and kd+flexkd: whether Flex-KD's gain adds to the logit loss's, compared at the same logit loss.
LOGIT_VARIANTS = ("reverse_kl", "skew_kl", "jsd")
METHODS |= {
    f"{base}-{logit}": METHODS[base] | {"loss.logit": logit} for logit in LOGIT_VARIANTS for base in ("kd", "kd+flexkd")
}
# On-policy distillation (GKD's mixed variant, training.on_policy), under kd and kd+flexkd: half
# the steps on the student's own samples, scored by the teacher online (no cache then).
ON_POLICY = {"training.on_policy": 0.5, "training.teacher": "online"}
METHODS |= {f"{base}-onpolicy": METHODS[base] | ON_POLICY for base in ("kd", "kd+flexkd")}
SEQKD_TOP_P = 0.9  # nucleus of a sampling SeqKD teacher (GenerationSettings.seqkd_temperature)
QUERY_HEADS_PER_KV_GROUP = 3  # the teacher's 9 query heads share its 3 key/value heads
TEACHER_WIDTH = 576  # SmolLM2-135M-Instruct's hidden size
PRUNED_START = "pruned, no distillation"
EVAL_SETS = ("samsum", "self_instruct")
EVAL_SET_NAMES = {"samsum": "SAMSum", "self_instruct": "Self-Instruct"}
SHARED_STAGES = ("tokenize", "score", "targets")
BASELINES = ("kd", "kd+projector", "kd+projector_std")
COMPARISONS = (
    tuple((a, b) for a in ("kd+flexkd", "kd+flexkd-dir") for b in BASELINES)
    + tuple((f"kd+flexkd-{logit}", f"kd-{logit}") for logit in LOGIT_VARIANTS)
    + (("kd+flexkd-onpolicy", "kd-onpolicy"), ("kd-onpolicy", "kd"))
)
# The T0 prompts a student may train on, by template name: a template's rows are kept when its name
# starts with one of the first tuple and with none of the second. "summaries": news summaries and
# headlines (XSum, Gigaword) and dialogues read (DREAM); not the templates that go the other way (a
# headline into an article) nor Multi-News, whose instruction comes first and is cut off with the
# start of its 1,000-token documents (prompts keep their end).
TRAIN_PROMPTS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "t0": (("",), ()),
    "summaries": (("xsum_", "gigaword_", "dream_"), ("gigaword_reverse_writing", "gigaword_write_an_article")),
}
# The fluency bar (issue 20): a student whose outputs fail it does not count in a comparison.
MIN_DISTINCT_2 = 0.5
MIN_SHARE_OF_TEACHER_SAMSUM = 0.5  # of the teacher's SAMSum ROUGE-L
FIRST_OUTPUTS = 2  # outputs of each model shown per eval set
FLUENCY_MEASURES = ("distinct_2", "repeated_ngram_outputs")  # the evaluate stage's metric names


@dataclass(frozen=True)
class GenerationSettings:
    train_rows: int
    score_rows: int
    steps: int
    batch_size: int
    max_length: int
    max_new_tokens: int
    num_layers: int
    seeds: tuple[int, ...]
    # The student's shape, cut out of the teacher's 576 wide, 30 blocks, MLP 1536, 3 KV groups.
    hidden_size: int = 384
    num_key_value_heads: int = 2  # of the teacher's 3; each keeps its QUERY_HEADS_PER_KV_GROUP query heads
    intermediate_size: int = 1024
    # Sequence-level KD: the generate stage's teacher responses, up to this many tokens, replace
    # the T0 completions as the training targets (0: train on the completions).
    seqkd_max_new_tokens: int = 0
    # Which T0 prompts train the student (TRAIN_PROMPTS): all of the mixture, or only those that ask
    # for a summary of a text or read a dialogue, the eval's domain (SAMSum has no train split here).
    train_prompts: str = "t0"
    generate_batch_size: int = 16  # prompts per teacher generate call
    # SeqKD's teacher samples its responses at this temperature (top_p SEQKD_TOP_P); 0: greedy.
    seqkd_temperature: float = 0.0
    # SeqKD leaves out the teacher's responses cut at seqkd_max_new_tokens (generate.drop_truncated).
    seqkd_drop_truncated: bool = False
    # On-policy distillation (training.on_policy, GKD's lambda): the share of steps on the student's
    # own samples, scored by the teacher online (no teacher-target cache then).
    on_policy: float = 0.0
    # A pruned student starts from the teacher's weights: a small step size keeps what it inherits.
    learning_rate: float = 2e-4
    layer_selection: str = "importance"
    use_gpu: bool = False
    precision: str = "float32"  # training.precision
    cpus_per_worker: float = 1  # the other CPU stays free for Ray Data
    threads_per_worker: int = 1  # see QualitySettings: one thread is faster on an oversubscribed machine

    @classmethod
    def cpu(cls) -> GenerationSettings:
        # The recipe table's closest student to the fluency bar (benchmarks/results/notes.md, session
        # 17: ROUGE-L 95% of the teacher's on 60 dialogues, distinct-2 0.498, 3 loops). Too long for
        # one sitting on 2 cores, about 7 h (measured per part: perplexity scoring 20 min, sampled
        # SeqKD 14, the full-width cache 5, each run's 100 steps 15 and its 452 greedy outputs 9,
        # times 5 methods and 3 seeds, and directions' own scoring and cache). Every finished
        # stage is reused by fingerprint, so the same command, run again, goes on where it stopped.
        return cls(
            train_rows=660,  # every summary and dialogue prompt of the mixture
            score_rows=64,
            steps=100,
            batch_size=8,
            max_length=256,
            max_new_tokens=64,
            num_layers=27,
            seeds=(0, 1, 2),
            hidden_size=576,
            num_key_value_heads=3,
            intermediate_size=1536,
            seqkd_max_new_tokens=64,
            train_prompts="summaries",
            seqkd_temperature=0.7,
            layer_selection="perplexity",
            threads_per_worker=2,
        )

    @classmethod
    def gpu(cls) -> GenerationSettings:
        # The recipe table's 504-wide, 30-block student on the teacher's own responses (100 CPU steps
        # left it looping), trained ten times longer on five times the prompts. Narrower than the
        # teacher, unlike the 576-wide MLP-1024 cut that starts better (benchmarks/results/
        # prune_shapes.md), so the projectors have a width to bridge and Flex-KD's pairing has units
        # to choose, as in the paper. Not yet timed on a GPU: no GPU has been lent.
        return cls(
            train_rows=4000,
            score_rows=256,
            steps=1000,
            batch_size=16,
            max_length=384,
            max_new_tokens=128,
            num_layers=30,
            seeds=(0, 1, 2),
            hidden_size=504,
            num_key_value_heads=3,
            intermediate_size=1536,
            seqkd_max_new_tokens=128,
            generate_batch_size=128,
            use_gpu=True,
            precision="bf16",
            cpus_per_worker=4,
            threads_per_worker=4,
        )

    def with_overrides(self, **values: Any) -> GenerationSettings:
        return replace(self, **{key: value for key, value in values.items() if value is not None})


def tracking_uri(work_dir: Path) -> str:
    return f"sqlite:///{work_dir / 'mlflow.db'}"


def write_eval_set(work_dir: Path, samsum_only: int | None = None) -> tuple[Path, list[str]]:
    """SAMSum and Self-Instruct as one jsonl of prompt / response, and the source of each row;
    ``samsum_only``: the first that many SAMSum dialogues and nothing else."""
    rows = [
        {"prompt": f"Summarize this dialogue.\n{row['dialogue']}", "response": row["summary"], "source": "samsum"}
        for row in map(json.loads, (SHARED_DATA / "samsum" / "samsum.jsonl").read_text().splitlines())
    ]
    if samsum_only is not None:
        path = work_dir / f"generation_eval_samsum_{samsum_only}.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(json.dumps(row) + "\n" for row in rows[:samsum_only]))
        return path, ["samsum"] * len(rows[:samsum_only])
    for line in (SHARED_DATA / "self_instruct" / "user_oriented_instructions.jsonl").read_text().splitlines():
        task = json.loads(line)
        instance = task["instances"][0]
        prompt = task["instruction"] + (f"\n\n{instance['input']}" if instance["input"].strip() else "")
        rows.append({"prompt": prompt, "response": instance["output"], "source": "self_instruct"})
    path = work_dir / "generation_eval.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path, [row["source"] for row in rows]


def write_train_set(work_dir: Path, train_prompts: str) -> Path:
    """The T0 mixture's rows of the ``train_prompts`` set (TRAIN_PROMPTS), in the mixture's order:
    the mixture file itself for "t0", else a jsonl of its kept rows in ``work_dir``."""
    t0 = SHARED_DATA / "t0_mix" / "train.jsonl"
    if train_prompts == "t0":
        return t0
    kept, left_out = TRAIN_PROMPTS[train_prompts]
    rows = [
        line
        for line in t0.read_text(encoding="utf-8").split("\n")  # not splitlines: text holds U+2028
        if line and (template := json.loads(line)["template"]).startswith(kept) and not template.startswith(left_out)
    ]
    path = work_dir / f"t0_{train_prompts}.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(line + "\n" for line in rows))
    return path


def pipeline_overrides(settings: GenerationSettings, work_dir: Path, eval_path: Path, eval_rows: int) -> dict[str, Any]:
    t0 = str(SHARED_DATA / "t0_mix" / "train.jsonl")
    return {
        "name": "bench-generation" + ("-gpu" if settings.use_gpu else ""),
        "artifact_root": str(work_dir / "runs"),
        "tracking.tracking_uri": tracking_uri(work_dir),
        "tracking.experiment": "flexkd-bench-generation",
        "student.init": "prune_from_teacher",
        "student.layer_selection": settings.layer_selection,
        "student.architecture": {
            "hidden_size": settings.hidden_size,
            "num_hidden_layers": settings.num_layers,
            "num_attention_heads": QUERY_HEADS_PER_KV_GROUP * settings.num_key_value_heads,
            "num_key_value_heads": settings.num_key_value_heads,
            "intermediate_size": settings.intermediate_size,
        },
        "data.train": {
            "path": str(write_train_set(work_dir, settings.train_prompts)),
            "limit": settings.train_rows,
            "prompt_template": "{prompt}",
            "response_column": "completion",
        },
        "data.score": {
            "path": t0,
            "limit": settings.score_rows,
            "prompt_template": "{prompt}",
            "response_column": "completion",
        },
        "data.eval": {"path": str(eval_path), "prompt_template": "{prompt}", "response_column": "response"},
        "data.max_length": settings.max_length,
        # The paper's default pairing (final hidden states) rather than the pruned student's every
        # block with its source: it keeps the full-width cache one layer deep (16 would take gigabytes).
        "layer_map": "last",
        # The pairing Flex-KD learns: the teacher's most important units at that layer, not the pruned
        # student's default ``identity`` (each unit with the one it was cut from, decided by the pruning).
        # The schema allows it with the full-width cache the projectors need. Set for every method:
        # only the correlation loss reads the selection (kd has no feature loss, the projectors read
        # every unit in index order), so one score stage and one cache serve kd, both projectors and
        # kd+flexkd. Risk worth watching: a pruned student's unit i is then held to a teacher unit
        # other than the one its weights came from.
        "selection.method": "importance",
        "training.steps": settings.steps,
        "training.batch_size": settings.batch_size,
        "training.learning_rate": settings.learning_rate,
        "training.warmup_steps": 25,
        "training.log_every": 25,
        "training.checkpoint_every": settings.steps,
        "training.teacher": "online" if settings.on_policy else "cache",
        "training.on_policy": settings.on_policy,
        "training.precision": settings.precision,
        "targets.full_width": True,
        "targets.batch_size": 8,
        "targets.temperatures": [1.0],
        "evaluation": {"batch_size": 16, "max_new_tokens": settings.max_new_tokens, "samples": eval_rows},
        "resources.num_workers": 1,
        "resources.cpus_per_worker": settings.cpus_per_worker,
        "resources.use_gpu": settings.use_gpu,
        "resources.threads_per_worker": settings.threads_per_worker,
    } | (
        {
            "generate": {"max_new_tokens": settings.seqkd_max_new_tokens, "batch_size": settings.generate_batch_size}
            | (
                {"do_sample": True, "temperature": settings.seqkd_temperature, "top_p": SEQKD_TOP_P}
                if settings.seqkd_temperature
                else {}
            )
            | ({"drop_truncated": True} if settings.seqkd_drop_truncated else {})
        }
        if settings.seqkd_max_new_tokens
        else {}
    )


def pipeline_stages(settings: GenerationSettings) -> tuple[str, ...]:
    """The stages each run needs: with SeqKD, generate first (its responses become the train rows)."""
    training = ("tokenize", "score", "targets", "distill", "evaluate")
    return ("generate", *training) if settings.seqkd_max_new_tokens else training


def run_generation(
    settings: GenerationSettings,
    work_dir: Path = DEFAULT_WORK_DIR,
    methods: tuple[str, ...] = DEFAULT_METHODS,
    results_dir: Path = RESULTS,
) -> dict[str, Any]:
    from flexkd.config.schema import load_config
    from flexkd.pipeline.runner import run_pipeline

    command, started = command_line(), time.time()
    eval_path, sources = write_eval_set(work_dir)
    planned = len(settings.seeds) * len(methods)
    runs = []
    pruned_start: dict[str, Any] = {}
    shared: dict[str, dict[str, Any]] = {}
    with LoadMonitor() as load:
        for seed in settings.seeds:
            for method in methods:
                overrides = pipeline_overrides(settings, work_dir, eval_path, len(sources)) | METHODS[method]
                config = load_config(PIPELINE, overrides | {"student.seed": seed, "training.seed": seed})
                result = run_pipeline(config, stages=pipeline_stages(settings))
                if not pruned_start:
                    pruned_start = pruned_start_scores(config, result.stages, sources, work_dir)
                # Every method of one selection reuses these by fingerprint (directions have their own score
                # and cache); an earlier invocation may have built them.
                for stage in SHARED_STAGES:
                    key = stage if stage == "tokenize" else f"{stage}/{config.selection.method}"
                    if stage in result.stages and key not in shared:  # an online teacher has no targets stage
                        shared[key] = {
                            "seconds": stage_seconds(result.stages[stage]),
                            "reused": result.stages[stage].cached,
                        }
                distill, evaluate = result.stages["distill"], result.stages["evaluate"]
                metrics = evaluate.outputs["metrics"]
                predictions = read_predictions(evaluate.directory / "predictions.jsonl", sources)
                scores = rouge_by_source(predictions, sources)
                runs.append(
                    {
                        "method": method,
                        "seed": seed,
                        "rougeL": scores,
                        "rougeL_all": {role: metrics[f"{role}.rougeL"] for role in ("teacher", "student")},
                        "perplexity": {role: metrics[f"{role}.perplexity"] for role in ("teacher", "student")},
                        # Over every eval row, both sets (flexkd.evaluation.metrics.fluency_scores).
                        "fluency": {
                            role: {name: metrics[f"{role}.{name}"] for name in FLUENCY_MEASURES}
                            for role in ("teacher", "student")
                        },
                        "extra_trainable_parameters": distill.outputs["extra_trainable_parameters"],
                        "student_parameters": distill.outputs["student_parameters"],
                        "distill_seconds": round(distill.seconds, 1),
                        "evaluate_seconds": round(evaluate.seconds, 1),
                        "pipeline_run_id": result.run_id,
                        "first_outputs": first_outputs(predictions, sources),
                    }
                )
                (work_dir / "generation.partial.json").write_text(json.dumps(runs, indent=1))
                if len(runs) < planned:
                    # Hours on the CPU: the page shows what has finished, so a run cut short still
                    # leaves its numbers, and the same command, run again, goes on from there.
                    partial = generation_results(command, started, load, settings, pruned_start, runs, shared, planned)
                    _write(partial, None, results_dir)
        results = generation_results(command, started, load, settings, pruned_start, runs, shared, planned)
    _write(results, tracking_uri(work_dir), results_dir)
    return results


def generation_results(
    command: str,
    started: float,
    load: LoadMonitor,
    settings: GenerationSettings,
    pruned_start: dict[str, Any],
    runs: list[dict[str, Any]],
    shared: dict[str, dict[str, Any]],
    planned: int,
) -> dict[str, Any]:
    """The benchmark's results from the runs finished so far (``planned``: how many it will run)."""
    results = {
        "benchmark": "generation",
        "command": command,
        "machine": machine(),
        "load": load.summary(),
        "settings": asdict(settings),
        "pipeline": str(PIPELINE.relative_to(REPO)),
        "methods": METHODS,
        "student_init": "prune_from_teacher",
        "pruned_start": pruned_start,
        "runs": runs,
        "runs_planned": planned,
        "shared_stage_seconds": shared,
        "wall_seconds": round(time.time() - started, 1),
        "finished_at": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }
    results["table"] = table(runs, pruned_start)
    results["comparisons"] = compare(runs)
    results["headline"] = {
        f"rougeL.{name}.{role}": row[role]
        for name, row in results["table"].items()
        for role in ("samsum", "self_instruct")
    }
    return results


def _write(results: dict[str, Any], tracking: str | None, results_dir: Path) -> None:
    """The page section, its json and plot; logged to MLflow (``tracking``) once the table is whole."""
    plot = plot_generation(results, results_dir / "generation.png")
    write_results("generation", results, generation_markdown(results), plot, tracking, results_dir)


def pruned_start_scores(config, stages: dict[str, Any], sources: list[str], work_dir: Path) -> dict[str, Any]:
    """``evaluate_pruned_start``, kept in ``work_dir`` under the fingerprints of the eval rows and
    the pruning it reads and a hash of the decoding settings: an invocation that goes on from an
    earlier one does not decode again."""
    from flexkd.config.schema import stable_hash

    tokenize, score = stages["tokenize"], stages["score"]
    decoding = stable_hash(config.evaluation.model_dump(mode="json"), 8)
    saved = work_dir / f"pruned_start_{tokenize.fingerprint}_{score.fingerprint}_{decoding}.json"
    if saved.is_file():
        return json.loads(saved.read_text())
    scores = evaluate_pruned_start(config, Path(tokenize.directory), Path(score.directory), sources)
    saved.write_text(json.dumps(scores))
    return scores


def evaluate_pruned_start(config, tokenize_dir: Path, score_dir: Path, sources: list[str]) -> dict[str, Any]:
    """The pruned student as the score stage wrote it, before any distillation, scored by the
    evaluate stage's own code on every eval row: what distillation has to improve on."""
    import torch

    from flexkd.evaluation.metrics import fluency_scores, generate_and_score, read_eval_rows
    from flexkd.models.loading import load_model, parameter_count
    from flexkd.models.plan import PRUNED_STUDENT_DIR, load_pipeline_tokenizer

    started = time.time()
    pad_token_id = json.loads((tokenize_dir / "manifest.json").read_text())["outputs"]["pad_token_id"]
    table_rows = read_eval_rows(tokenize_dir / "eval")
    device = torch.device("cuda" if config.resources.use_gpu and torch.cuda.is_available() else "cpu")
    model = load_model(score_dir / PRUNED_STUDENT_DIR).eval().to(device)
    # No progress bar: the evaluate stage's is Ray's, which in the driver keeps redrawing after it ends.
    log.info("bench generation: greedy decoding of %d eval rows by the pruned start", table_rows.num_rows)
    with torch.no_grad():
        scores, outputs = generate_and_score(
            model, table_rows, config, load_pipeline_tokenizer(config), pad_token_id, device
        )
    row_sources = [sources[i] for i in table_rows.column("example_id").to_pylist()]
    by_source = rouge_per_source(table_rows.column("reference").to_pylist(), outputs, row_sources)
    return {
        "rougeL": by_source,
        "rougeL_all": scores["rougeL"],
        "perplexity": scores["perplexity"],
        "fluency": fluency_scores(outputs),
        "parameters": parameter_count(model),
        "seconds": round(time.time() - started, 1),
        "first_outputs": {
            source: [output for output, row_source in zip(outputs, row_sources) if row_source == source][:FIRST_OUTPUTS]
            for source in EVAL_SETS
            if source in row_sources
        },
    }


def read_predictions(predictions_file: Path, sources: list[str]) -> list[dict[str, Any]]:
    """The evaluate stage's predictions, one per eval row (``sources`` names each row's eval set)."""
    rows = [json.loads(line) for line in predictions_file.read_text().splitlines()]
    if len(rows) != len(sources):
        raise ValueError(f"{predictions_file}: {len(rows)} predictions for {len(sources)} eval rows")
    return rows


def first_outputs(
    rows: list[dict[str, Any]], sources: list[str], count: int = FIRST_OUTPUTS
) -> dict[str, list[dict[str, str]]]:
    """The first ``count`` predictions of each eval set: reference, teacher and student, to read
    beside the scores."""
    first: dict[str, list[dict[str, str]]] = {}
    for row in rows:
        kept = first.setdefault(sources[row["example_id"]], [])
        if len(kept) < count:
            kept.append({key: row[key] for key in ("reference", "teacher", "student")})
    return first


def rouge_per_source(references: list[str], outputs: list[str], row_sources: list[str]) -> dict[str, float]:
    """ROUGE-L F1 x100 of ``outputs`` per eval set (those present)."""
    from rouge_score.rouge_scorer import RougeScorer

    scorer = RougeScorer(["rougeL"], use_stemmer=True)
    scores = {}
    for source in (name for name in EVAL_SETS if name in row_sources):
        values = [
            scorer.score(reference, output)["rougeL"].fmeasure
            for reference, output, row_source in zip(references, outputs, row_sources)
            if row_source == source
        ]
        scores[source] = round(100 * sum(values) / len(values), 2)
    return scores


def rouge_by_source(rows: list[dict[str, Any]], sources: list[str]) -> dict[str, dict[str, float]]:
    """ROUGE-L F1 x100 per eval set, for teacher and student, from the evaluate stage's predictions."""
    references, row_sources = [row["reference"] for row in rows], [sources[row["example_id"]] for row in rows]
    return {
        role: rouge_per_source(references, [row[role] for row in rows], row_sources) for role in ("teacher", "student")
    }


def table_cell(text: str, width: int) -> str:
    """A model output as one markdown table cell: whitespace folded, cut to ``width`` characters."""
    text = " ".join(text.split())
    return (text[:width] + "..." if len(text) > width else text).replace("|", "\\|")


def fluency_failures(fluency: dict[str, float], samsum_rouge: float, teacher_samsum_rouge: float) -> list[str]:
    """The parts of the fluency bar a model misses, in words; none: it passes. ``fluency``: the
    evaluate stage's measures of its outputs (FLUENCY_MEASURES); ``samsum_rouge``: its ROUGE-L on
    SAMSum, held against ``teacher_samsum_rouge``."""
    failures = []
    if fluency["distinct_2"] < MIN_DISTINCT_2:
        failures.append(f"distinct-2 below {MIN_DISTINCT_2}")
    if fluency["repeated_ngram_outputs"] > 0:
        failures.append(f"{fluency['repeated_ngram_outputs']:.0f} outputs one repeated n-gram")
    if samsum_rouge < MIN_SHARE_OF_TEACHER_SAMSUM * teacher_samsum_rouge:
        failures.append("SAMSum ROUGE-L below half the teacher's")
    return failures


def _run_failures(run: dict[str, Any]) -> list[str]:
    """The fluency bar's failures of one (method, seed) run's student."""
    rouge = run["rougeL"]
    return fluency_failures(run["fluency"]["student"], rouge["student"]["samsum"], rouge["teacher"]["samsum"])


def fluency_rows(runs: list[dict[str, Any]], pruned_start: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """Per model (the teacher, the pruned start, every method and seed): its fluency measures,
    SAMSum ROUGE-L and the bar's failures."""
    if not runs:
        return []
    teacher_samsum = runs[0]["rougeL"]["teacher"]["samsum"]
    models = [("teacher", None, runs[0]["fluency"]["teacher"], teacher_samsum)]
    if pruned_start:
        models.append((PRUNED_START, None, pruned_start["fluency"], pruned_start["rougeL"]["samsum"]))
    models += [
        (run["method"], run["seed"], run["fluency"]["student"], run["rougeL"]["student"]["samsum"]) for run in runs
    ]
    return [
        {
            "model": name,
            "seed": seed,
            **{measure: fluency[measure] for measure in FLUENCY_MEASURES},
            "samsum": samsum,
            "failures": fluency_failures(fluency, samsum, teacher_samsum),
        }
        for name, seed, fluency, samsum in models
    ]


def table(runs: list[dict[str, Any]], pruned_start: dict[str, Any] | None = None) -> dict[str, dict[str, Any]]:
    rows: dict[str, dict[str, Any]] = {}
    fluency = {(row["model"], row["seed"]): row for row in fluency_rows(runs, pruned_start)}
    teacher = runs[0]["rougeL"]["teacher"] if runs else {}
    rows["teacher"] = {
        **teacher,
        "seeds": 1,
        "extra_trainable_parameters": 0,
        "parameters": None,
        "perplexity": runs[0]["perplexity"]["teacher"] if runs else None,
        "fluent_seeds": int(not fluency[("teacher", None)]["failures"]) if runs else 0,
    }
    if pruned_start:
        rows[PRUNED_START] = {
            **pruned_start["rougeL"],
            "seeds": 1,
            "extra_trainable_parameters": 0,
            "parameters": pruned_start["parameters"],
            "perplexity": pruned_start["perplexity"],
            "fluent_seeds": int(not fluency[(PRUNED_START, None)]["failures"]) if runs else 0,
        }
    for method in dict.fromkeys(run["method"] for run in runs):
        mine = [run for run in runs if run["method"] == method]
        rows[method] = {
            source: round(mean_std([run["rougeL"]["student"][source] for run in mine])[0], 2) for source in EVAL_SETS
        }
        rows[method] |= {
            f"{source}_std": round(mean_std([run["rougeL"]["student"][source] for run in mine])[1], 2)
            for source in EVAL_SETS
        }
        rows[method] |= {
            "seeds": len(mine),
            "extra_trainable_parameters": mine[0]["extra_trainable_parameters"],
            "parameters": mine[0]["student_parameters"],
            "perplexity": mean_std([run["perplexity"]["student"] for run in mine])[0],
            "fluent_seeds": sum(not fluency[(method, run["seed"])]["failures"] for run in mine),
        }
    return rows


def compare(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per eval set and comparison (A, B) of COMPARISONS that both ran: the paired (same seed)
    differences of the students' ROUGE-L, their mean and std, a 95% bootstrap interval of the mean
    and its verdict (from two seeds on: one seed gives neither), and the compared students that
    fail the fluency bar (the comparison does not count while any does)."""
    rouge = {
        (run["method"], run["seed"], source): run["rougeL"]["student"][source] for run in runs for source in EVAL_SETS
    }
    failing = {(run["method"], run["seed"]) for run in runs if _run_failures(run)}
    comparisons = []
    for source in EVAL_SETS:
        for a, b in COMPARISONS:
            per_seed = [
                {seed: value for (method, seed, where), value in rouge.items() if method == name and where == source}
                for name in (a, b)
            ]
            paired = paired_differences(*per_seed)
            if not paired:
                continue
            mean, std = mean_std(list(paired.values()))
            interval = bootstrap_mean_interval(list(paired.values())) if len(paired) > 1 else None
            comparisons.append(
                {
                    "eval_set": source,
                    "a": a,
                    "b": b,
                    "seeds": len(paired),
                    "paired_difference": {seed: round(value, 2) for seed, value in paired.items()},
                    "paired_difference_mean": round(mean, 2),
                    "paired_difference_std": round(std, 2),
                    "ci95": [round(bound, 2) for bound in interval] if interval else None,
                    "ci_excludes_zero": interval is not None and (interval[0] > 0 or interval[1] < 0),
                    "a_wins_seeds": sum(value > 0 for value in paired.values()),
                    "verdict": verdict_word(interval) if interval else None,
                    "not_fluent": [
                        f"{name} seed {seed}" for name in (a, b) for seed in paired if (name, seed) in failing
                    ],
                }
            )
    return comparisons


def comparison_sentence(comparison: dict[str, Any]) -> str:
    """One comparison in words: the verdict follows the 95% interval (beats / trails where it
    excludes 0 on that side, ties otherwise), then the numbers behind it."""
    a, b, seeds = comparison["a"], comparison["b"], comparison["seeds"]
    where, mean = EVAL_SET_NAMES[comparison["eval_set"]], comparison["paired_difference_mean"]
    if comparison["ci95"] is None:
        sentence = (
            f"**{where}: {a} against {b}, one seed**: difference {mean:+.2f} ROUGE-L points; one seed gives "
            "no interval and no verdict"
        )
    else:
        low, high = comparison["ci95"]
        sentence = (
            f"**{where}: {a} {comparison['verdict']} {b}**: paired difference {mean:+.2f} ± "
            f"{comparison['paired_difference_std']:.2f} ROUGE-L points over {seeds} seeds, 95% bootstrap CI "
            f"[{low:+.2f}, {high:+.2f}], which {'excludes' if comparison['ci_excludes_zero'] else 'includes'} 0; "
            f"{a} ahead on {comparison['a_wins_seeds']} of {seeds} seeds"
        )
    if comparison["not_fluent"]:
        sentence += f"; it does not count, since these fail the fluency bar: {', '.join(comparison['not_fluent'])}"
    return sentence + "."


def standing_sentence(comparisons: list[dict[str, Any]], eval_set: str, a: str) -> str | None:
    """Whether ``a`` beats every baseline it is compared with (COMPARISONS: kd and both projectors,
    or kd at the same logit loss) on ``eval_set``, plainly; None where ``a`` was not compared there."""
    mine = {c["b"]: c for c in comparisons if c["eval_set"] == eval_set and c["a"] == a}
    if not mine:
        return None
    where = EVAL_SET_NAMES[eval_set]
    if any(c["verdict"] is None for c in mine.values()):
        return f"On {where}, {a} ran one seed: no interval, so no verdict against {', '.join(mine)}."
    baselines = [b for compared, b in COMPARISONS if compared == a]
    missing = [b for b in baselines if b not in mine]
    beats_all = not missing and all(c["verdict"] == "beats" for c in mine.values())
    parts = [
        f"{c['verdict']} {b} (CI {'excludes' if c['ci_excludes_zero'] else 'includes'} 0)" for b, c in mine.items()
    ]
    sentence = (
        f"On {where}, {a} {'beats' if beats_all else 'does not beat'} "
        f"{'every baseline' if len(baselines) > 1 else 'its baseline'} ({', '.join(baselines)}): it {', '.join(parts)}"
    )
    if missing:
        sentence += f"; {', '.join(missing)} did not run"
    if any(c["not_fluent"] for c in mine.values()):
        sentence += "; not a finding while a compared student fails the fluency bar"
    return sentence + "."


def student_sentence(settings: dict[str, Any]) -> str:
    """The page's paragraph on the teacher, the students, their data and their decoding."""
    width, heads = settings["hidden_size"], QUERY_HEADS_PER_KV_GROUP * settings["num_key_value_heads"]
    prompts = "T0-mixture" if settings["train_prompts"] == "t0" else f"T0 ({settings['train_prompts']})"
    decoding = (
        f"sampled at temperature {settings['seqkd_temperature']}, top_p {SEQKD_TOP_P}"
        if settings["seqkd_temperature"]
        else "greedy"
    )
    data = (
        f"the teacher's own responses ({decoding}; the generate stage, SeqKD, at most "
        f"{settings['seqkd_max_new_tokens']} tokens) to {settings['train_rows']} {prompts} prompts"
        if settings["seqkd_max_new_tokens"]
        else f"{settings['train_rows']} {prompts} prompt/completion pairs"
    )
    # At the teacher's width the selection keeps every unit: it only decides the pairing.
    every_unit = " (at the teacher's width: every unit, in that order)" if width == TEACHER_WIDTH else ""
    return (
        "Teacher SmolLM2-135M-Instruct as is (576 wide, 30 blocks). Students **cut out of the teacher** "
        f"(`student.init: prune_from_teacher`): hidden {width}, {settings['num_layers']} blocks "
        f"(layer_selection {settings['layer_selection']}), MLP {settings['intermediate_size']}, {heads} heads / "
        f"{settings['num_key_value_heads']} KV groups; pruning and selection scored on {settings['score_rows']} T0 "
        "rows. Feature losses on the final hidden states (layer_map last); "
        f"kd+flexkd is the correlation loss between each of the student's {width} units and one of the teacher's "
        f"{width} most important units there{every_unit} (`selection: importance`, the task gradient's mean "
        "magnitude: student unit i with the i-th most important, not with the unit it was cut from), kd+flexkd-dir between them and "
        f"the teacher's coordinates on its top {width} task-gradient directions (`selection: directions`); "
        f"kd+projector and kd+projector_std learn a {width} -> {TEACHER_WIDTH} map, regressing the raw and the per-unit "
        "standardized teacher features. The logit loss is forward KL, except in a method named after another "
        f"(kd-jsd, kd+flexkd-jsd, ...: `loss.logit`). Distilled on {data} (chat template, max length "
        f"{settings['max_length']}), {settings['steps']} steps of batch {settings['batch_size']}, lr "
        f"{settings['learning_rate']}, teacher-target cache; seeds {list(settings['seeds'])}. Greedy decoding, "
        f"at most {settings['max_new_tokens']} new tokens; ROUGE-L F1 x100."
    )


def generation_markdown(results: dict[str, Any]) -> str:
    settings, load, command = results["settings"], results["load"], results["command"]
    lines = [
        "## Generation: SAMSum and Self-Instruct ROUGE-L",
        "",
        f"Command: `{command}` (finished {results['finished_at']}, wall time {results['wall_seconds'] / 60:.1f} min"
        f"{_reused_sentence(results.get('shared_stage_seconds') or {}, results['wall_seconds'])})",
        "",
        f"Machine: {results['machine']['cpus']} CPUs ({results['machine']['cpu_model']}), GPU: {results['machine']['gpu']}, "
        f"commit {results['machine']['git_commit']}.",
        f"{load_sentence(load).capitalize()}.",
        "",
        *_partial_lines(results),
        student_sentence(settings),
        "",
        "| model | ROUGE-L SAMSum (200) | ROUGE-L Self-Instruct (252) | perplexity of the references | seeds | "
        "extra trainable params | fluency bar passed |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, row in results["table"].items():
        lines.append(
            f"| {name} | {row['samsum']:.2f} | {row['self_instruct']:.2f} | {row['perplexity']:.4g} | "
            f"{row['seeds']} | {row['extra_trainable_parameters']:,} | {row['fluent_seeds']} of {row['seeds']} |"
        )
    lines += ["", "![generation](results/generation.png)", ""]
    lines += _fluency_table(fluency_rows(results["runs"], results.get("pruned_start")), command)
    lines += _comparisons_section(results.get("comparisons") or [], command)
    lines += _first_outputs_table(results)
    return "\n".join(lines)


def _partial_lines(results: dict[str, Any]) -> list[str]:
    """A line saying the table is not whole yet, when it is not: which runs finished."""
    finished, planned = len(results["runs"]), results.get("runs_planned", len(results["runs"]))
    if finished >= planned:
        return []
    done = ", ".join(f"{run['method']} seed {run['seed']}" for run in results["runs"]) or "none"
    return [
        f"**Partial: {finished} of {planned} runs (method x seed) finished when this was written ({done}). The same "
        "command, run again, reuses every finished stage by fingerprint and goes on.**",
        "",
    ]


def _fluency_table(rows: list[dict[str, Any]], command: str) -> list[str]:
    """The fluency bar's numbers and verdict for every model."""
    if not rows:
        return []
    half = MIN_SHARE_OF_TEACHER_SAMSUM * rows[0]["samsum"]
    lines = [
        f"Fluency bar per model, from `{command}`: a comparison counts only where each student's outputs have "
        f"distinct-2 of at least {MIN_DISTINCT_2}, none that is one n-gram repeated, and ROUGE-L on SAMSum at "
        f"least half the teacher's ({half:.2f}). Distinct-2 and the repeated outputs are the evaluate stage's, "
        "over every output of both sets.",
        "",
        f"| model | seed | distinct-2 (>= {MIN_DISTINCT_2}) | outputs one repeated n-gram (0) | "
        f"ROUGE-L SAMSum (>= {half:.2f}) | fluency bar |",
        "|---|---|---|---|---|---|",
    ]
    for row in rows:
        bar = "fail: " + "; ".join(row["failures"]) if row["failures"] else "pass"
        seed = "-" if row["seed"] is None else row["seed"]
        lines.append(
            f"| {row['model']} | {seed} | {row['distinct_2']:.3f} | {row['repeated_ngram_outputs']:.0f} | "
            f"{row['samsum']:.2f} | {bar} |"
        )
    return [*lines, ""]


def _comparisons_section(comparisons: list[dict[str, Any]], command: str) -> list[str]:
    """Per test set, whether each Flex-KD variant beats kd and both projectors, the table of the
    paired comparisons, and each one as a sentence."""
    if not comparisons:
        return []
    lines = [
        f"Flex-KD against kd and both projectors, from `{command}`: per test set the paired (same seed) "
        "differences of ROUGE-L (A minus B, points), their mean ± std, and a 95% percentile-bootstrap interval "
        "of the mean (10,000 resamples of the seeds; benchmarks/stats.py). The verdict is `beats` or `trails` "
        "where the interval excludes 0, `ties` where it does not.",
        "",
    ]
    for source in EVAL_SETS:
        for a in dict.fromkeys(c["a"] for c in comparisons):
            standing = standing_sentence(comparisons, source, a)
            if standing:
                lines.append(f"- {standing}")
    lines += [
        "",
        "| test set | A | B | A minus B per seed | mean ± std | 95% CI | A ahead (seeds) | verdict | fluency bar |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for c in comparisons:
        per_seed = ", ".join(f"seed {seed} {value:+.2f}" for seed, value in c["paired_difference"].items())
        interval = "-" if c["ci95"] is None else f"[{c['ci95'][0]:+.2f}, {c['ci95'][1]:+.2f}]"
        if c["ci95"] is not None:
            interval += " (excludes 0)" if c["ci_excludes_zero"] else " (includes 0)"
        lines.append(
            f"| {EVAL_SET_NAMES[c['eval_set']]} | {c['a']} | {c['b']} | {per_seed} | "
            f"{c['paired_difference_mean']:+.2f} ± {c['paired_difference_std']:.2f} | {interval} | "
            f"{c['a_wins_seeds']} of {c['seeds']} | {c['verdict'] or '-'} | "
            f"{'fail: ' + ', '.join(c['not_fluent']) if c['not_fluent'] else 'pass'} |"
        )
    lines += ["", *(f"- {comparison_sentence(c)}" for c in comparisons), ""]
    return lines


def _first_outputs_table(results: dict[str, Any], width: int = 90) -> list[str]:
    """The first greedy outputs of every model on each eval set beside the references, one table
    per set, cut to ``width`` characters."""
    runs = [run for run in results["runs"] if run.get("first_outputs") and run["seed"] == results["runs"][0]["seed"]]
    if not runs:
        return []

    def row(name: str, outputs: list[str]) -> str:
        return f"| {name} | " + " | ".join(table_cell(text, width) for text in outputs) + " |"

    pruned = (results.get("pruned_start") or {}).get("first_outputs")
    lines = []
    for source in EVAL_SETS:
        first = runs[0]["first_outputs"][source]
        lines += [
            f"First {len(first)} outputs on {EVAL_SET_NAMES[source]}, seed {runs[0]['seed']} (greedy; read beside "
            "the scores):",
            "",
            "| model | " + " | ".join(f"example {i + 1}" for i in range(len(first))) + " |",
            "|---|" + "---|" * len(first),
            row("reference", [example["reference"] for example in first]),
            row("teacher", [example["teacher"] for example in first]),
        ]
        if pruned:
            lines.append(row(PRUNED_START, pruned[source]))
        lines += [row(run["method"], [example["student"] for example in run["first_outputs"][source]]) for run in runs]
        lines.append("")
    return lines


def _reused_sentence(shared: dict[str, dict[str, Any]], wall_seconds: float) -> str:
    built = "; ".join(
        f"{stage} {entry['seconds']:.0f} s" + (" (reused)" if entry["reused"] else "")
        for stage, entry in shared.items()
    )
    if not built:
        return ""
    reused = sum(entry["seconds"] for entry in shared.values() if entry["reused"])
    sentence = f"; shared stages, run once for every method: {built}"
    if reused:
        sentence += (
            f"; it reused {reused / 60:.1f} min of them from an earlier invocation, so a run from scratch "
            f"takes about {(wall_seconds + reused) / 60:.0f} min"
        )
    return sentence


def plot_generation(results: dict[str, Any], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path.parent.mkdir(parents=True, exist_ok=True)
    names = list(results["table"])
    figure, axis = plt.subplots(figsize=(8, 4.5))
    width = 0.38
    for offset, source in zip((-width / 2, width / 2), EVAL_SETS):
        values = [results["table"][n][source] for n in names]
        axis.bar([i + offset for i in range(len(names))], values, width, label=EVAL_SET_NAMES[source])
    axis.set_xticks(range(len(names)), names, rotation=25, ha="right")  # the method names are long
    axis.set_ylabel("ROUGE-L F1 x100")
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path
