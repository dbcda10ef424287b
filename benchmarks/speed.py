"""``flexkd bench speed``: throughput ratios measured side by side in one run.

    plain loop     distill-step tokens/s of the pipeline's distill stage (Ray Train worker) vs a
                   plain single-process PyTorch loop computing the same loss (the same
                   StudentWithObjective, AdamW, learning-rate schedule) on the same student
                   architecture, seed, cache rows and batch size, with as many torch threads
                   as the worker gets; and where a step's time goes in each,
                   phase by phase                                               goal >= 0.95
    feature cost   kd+flexkd (correlation on 4 layer pairs) vs kd (logit only), both distill
                   stages reading the same teacher-target cache                 goal < 5% slower
    score stage    the score stage's wall time vs one distillation epoch over the same rows
                   (online teacher, as a run without the cache pays it)
    workers        distill with 2 workers x 1 thread vs 1 worker x 1 thread (FSDP2 over gloo)
    TRL            the same logit-only KD job (generation, forward KL at T=1 on response
                   tokens, online teacher, no on-policy generation) in TRL's GKDTrainer
                   (lmbda=0, seq_kd off, beta=0) vs the flexkd distill stage     goal: flexkd >= TRL

Tokens are non-padding tokens of the batches (what the distill stage counts); tokens/s of a
loop is its steady state: every step but the first (data wait included; checkpoints, model
loading and Ray start-up not; the stage wall times are reported next to it). Writes benchmarks/results/speed.{json,md,png}.
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
    stage_seconds,
    write_results,
)

log = logging.getLogger("flexkd")

# Dense bf16 peak of the GPUs the --gpu setting is meant for (vendor datasheets), for MFU.
PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L4": 121e12}


@dataclass(frozen=True)
class SpeedSettings:
    steps: int
    generation_rows: int
    generation_steps: int
    generation_batch_size: int
    generation_max_length: int
    cpus: int = 1  # torch threads per process (see QualitySettings.threads_per_worker)
    use_gpu: bool = False

    @classmethod
    def cpu(cls) -> SpeedSettings:
        return cls(
            steps=30, generation_rows=64, generation_steps=12, generation_batch_size=4, generation_max_length=128
        )

    @classmethod
    def gpu(cls) -> SpeedSettings:
        return cls(
            steps=1000,
            generation_rows=4096,
            generation_steps=200,
            generation_batch_size=32,
            generation_max_length=384,
            cpus=8,
            use_gpu=True,
        )

    def with_overrides(self, **values: Any) -> SpeedSettings:
        return replace(self, **{key: value for key, value in values.items() if value is not None})


def tracking_uri(work_dir: Path) -> str:
    # Its own store: SQLite takes one writer, and the quality benchmark may be running beside it.
    return f"sqlite:///{work_dir / 'mlflow-speed.db'}"


def classification_config(settings: SpeedSettings, work_dir: Path, method: str = "kd+flexkd", **overrides: Any):
    """The quality benchmark's SST-2 pipeline (same adapted teacher, data, student and batch, so its
    tokenize, score and teacher-target stages are reused, not rerun), with this benchmark's steps."""
    from benchmarks.quality import QualitySettings, method_config, sst2_teacher

    quality = QualitySettings.gpu() if settings.use_gpu else QualitySettings.cpu()
    # The stored row order, as the plain loop it is compared with reads the cache.
    quality = replace(quality, shuffle_buffer=0)
    teacher_dir, _ = sst2_teacher(quality, work_dir)
    values = {
        "tracking.tracking_uri": tracking_uri(work_dir),
        "training.steps": settings.steps,
        "training.log_every": settings.steps,
        "training.checkpoint_every": settings.steps,
        "tracking.experiment": "flexkd-bench-speed",
        "resources.threads_per_worker": settings.cpus,
    } | overrides
    return method_config(quality, teacher_dir, work_dir, method, 0, extra=values)


def generation_config(settings: SpeedSettings, work_dir: Path, **overrides: Any):
    """The logit-only KD job that TRL runs too: T0 prompts and completions, online teacher."""
    from flexkd.config.schema import load_config

    t0 = str(short_t0_rows(work_dir, settings.generation_rows, settings.generation_max_length))
    values = {
        "name": "bench-speed-generation" + ("-gpu" if settings.use_gpu else ""),
        "artifact_root": str(work_dir / "runs"),
        "tracking.tracking_uri": tracking_uri(work_dir),
        "tracking.experiment": "flexkd-bench-speed",
        "student.architecture": {
            "hidden_size": 192,
            "num_hidden_layers": 4,
            "num_attention_heads": 3,
            "num_key_value_heads": 1,
            "intermediate_size": 512,
        },
        "data.train.path": t0,
        "data.train.limit": settings.generation_rows,
        "data.score": {"path": t0, "limit": 8, "prompt_template": "{prompt}", "response_column": "completion"},
        "data.eval.limit": 8,
        "data.max_length": settings.generation_max_length,
        "loss": {"alpha": 0.0, "beta": 1.0, "gamma": 0.0, "temperature": 1.0, "logit": "forward_kl", "feature": "none"},
        "training.steps": settings.generation_steps,
        "training.batch_size": settings.generation_batch_size,
        "training.warmup_steps": 0,
        "training.learning_rate": 5e-4,
        "training.log_every": settings.generation_steps,
        "training.checkpoint_every": settings.generation_steps,
        "training.teacher": "online",
        "training.precision": "bf16" if settings.use_gpu else "float32",
        "resources.num_workers": 1,
        "resources.cpus_per_worker": 1,
        "resources.use_gpu": settings.use_gpu,
        "resources.threads_per_worker": settings.cpus,
    }
    return load_config(REPO / "pipelines" / "instruct_samsum.yaml", values | overrides)


def short_t0_rows(work_dir: Path, rows: int, max_length: int) -> Path:
    """The first ``rows`` T0 pairs whose completion has at most ``max_length`` characters (about a
    quarter of the token window): TRL's ChatML collator refuses a row whose completion fills the
    window, so both trainers get the same rows, ones that fit."""
    # split("\n"), not splitlines(): completions hold U+2028 and other characters splitlines breaks at.
    kept = [
        line
        for line in (SHARED_DATA / "t0_mix" / "train.jsonl").read_text().split("\n")
        if line.strip() and len(json.loads(line)["completion"]) <= max_length
    ][:rows]
    path = work_dir / f"t0_short_{rows}_{max_length}.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(line + "\n" for line in kept))
    return path


def _distill(config) -> dict[str, Any]:
    from flexkd.pipeline.runner import run_pipeline

    result = run_pipeline(config, stages=("tokenize", "score", "targets", "distill"), force=("distill",))
    record = result.stages["distill"]
    return {
        "tokens_per_second": record.outputs["tokens_per_second"],
        "stage_seconds": round(record.seconds, 1),
        "student_parameters": record.outputs["student_parameters"],
        "steps": config.training.steps,
        "workers": config.resources.num_workers,
        "cpus_per_worker": config.resources.cpus_per_worker,
        "directory": str(record.directory),
        # Where a step's time goes, by phase (the plain loop's phases); the stage reports it on a CPU only.
        **({"ms_per_step": record.outputs["ms_per_step"]} if "ms_per_step" in record.outputs else {}),
        "stages": {
            name: {"seconds": stage_seconds(r), "cached": r.cached, "directory": str(r.directory)}
            for name, r in result.stages.items()
        },
    }


def plain_loop(config, targets_dir: Path, tokenize_dir: Path, threads: int) -> dict[str, Any]:
    """The same distillation loss, in one process, no Ray, no FSDP: the reference throughput, and
    where a step's time goes (``ms_per_step`` by phase, the distill stage's phases, timed alike:
    :class:`flexkd.stages.distill.StepProfile`; they add up to the step)."""
    import pyarrow.parquet as pq
    import torch

    from flexkd.data.rows import collate_batch
    from flexkd.data.teacher_targets import cached_teacher_outputs
    from flexkd.distributed import autocast
    from flexkd.method.objective import LayerPair, distillation_loss, forward_scored, objective_module
    from flexkd.models.plan import build_student, plan_models
    from flexkd.stages.distill import StepProfile, learning_rate_at
    from flexkd.stages.targets import read_cache_info

    previous_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        plan = plan_models(config)
        tokenized = json.loads((tokenize_dir / "manifest.json").read_text())["outputs"]
        info = read_cache_info(targets_dir)
        units = {layer: info["units"][str(layer)] for layer in plan.teacher_layer_indices}
        device = torch.device("cuda" if config.resources.use_gpu and torch.cuda.is_available() else "cpu")
        pairs = [LayerPair(t, s) for t, s in plan.layer_pairs]
        settings = config.loss.objective_settings(config.task.kind, plan.k)
        torch.manual_seed(config.training.seed)
        student = build_student(config)
        verbalizers = torch.tensor(tokenized["verbalizer_ids"])
        module = objective_module(student, settings, pairs, verbalizers, plan.teacher_hidden).to(device)
        optimizer = torch.optim.AdamW(
            module.parameters(), lr=config.training.learning_rate, weight_decay=config.training.weight_decay
        )
        table = pq.ParquetDataset(str(targets_dir / "train")).read()
        # Object arrays of numpy arrays, as Ray Data's numpy batches hand them to the distill stage.
        columns = {name: table.column(name).to_numpy(zero_copy_only=False) for name in table.column_names}
        rows_total, batch_size = table.num_rows, config.training.batch_size
        need_teacher = config.loss.uses_teacher
        feature_units = units if config.loss.uses_features else {}  # as the distill stage: kd decodes no unit
        if config.training.steps < 2:
            raise ValueError("plain_loop: the steady state leaves out the first step, so it needs at least 2 steps")
        tokens, seconds = 0, 0.0
        profile = StepProfile(device)  # as the distill stage's: CPU laps, no profile on a GPU
        mixed_precision = autocast(config.training.precision, device)
        for step in range(config.training.steps):
            step_started = profile.start()
            start = (step * batch_size) % (rows_total - rows_total % batch_size)
            rows = {name: values[start : start + batch_size] for name, values in columns.items()}
            batch = {key: value.to(device) for key, value in collate_batch(rows, tokenized["pad_token_id"]).items()}
            profile.lap("batch")
            with mixed_precision:  # as the distill stage
                teacher = (
                    cached_teacher_outputs(
                        rows,
                        batch,
                        config.task.kind,
                        feature_units,
                        plan.k,
                        None,
                        info["top_k_logits"],
                        device,
                        info["temperatures"],
                        config.loss.temperature,
                    )
                    if need_teacher
                    else (None, {})
                )
                profile.lap("teacher_targets")
                for group in optimizer.param_groups:
                    group["lr"] = learning_rate_at(step, config)
                # StudentWithObjective.forward, in its two halves, to time the loss apart from the model;
                # the loss in float32 (outside autocast), as there.
                logits, hidden = forward_scored(module.student, batch, settings.task, module.student_layers)
                profile.lap("student_forward")
            parts = distillation_loss(
                settings, batch, logits, hidden, *teacher, pairs, module.verbalizer_ids, dict(module.feature_modules)
            )
            profile.lap("loss")
            parts["total"].backward()
            profile.lap("backward")
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            profile.lap("optimizer")
            if step > 0:  # the steady state, as the distill stage counts it
                profile.count()
                tokens += int(batch["attention_mask"].sum())
                seconds += time.perf_counter() - step_started
        result = {
            "tokens_per_second": tokens / seconds,
            "seconds": round(seconds, 3),
            "tokens": tokens,
            "threads": threads,
            "steps": config.training.steps,
        }
        if (ms_per_step := profile.ms_per_step()) is not None:
            result["ms_per_step"] = ms_per_step
        return result
    finally:
        torch.set_num_threads(previous_threads)


def trl_gkd(config, settings: SpeedSettings, work_dir: Path) -> dict[str, Any]:
    """TRL's GKDTrainer on the same teacher, student architecture, data and batch size, lmbda=0."""
    import datasets
    import torch
    from transformers import TrainerCallback

    from flexkd.models.loading import parameter_count
    from flexkd.models.plan import build_student, load_pipeline_tokenizer, load_teacher

    try:
        from trl.experimental.gkd import GKDConfig, GKDTrainer
    except ImportError as error:
        return {"error": f"TRL not installed ({error}); pip install 'flexkd[bench]'"}

    rows = [
        json.loads(line) for line in Path(config.data.train.path).read_text().splitlines()[: settings.generation_rows]
    ]
    dataset = datasets.Dataset.from_list(
        [
            {
                "messages": [
                    {"role": "user", "content": row["prompt"]},
                    {"role": "assistant", "content": row["completion"]},
                ]
            }
            for row in rows
        ]
    )
    tokenizer = load_pipeline_tokenizer(config)
    torch.manual_seed(config.training.seed)
    student, teacher = build_student(config), load_teacher(config)

    step_tokens: list[int] = []  # per step (one compute_loss a step: no gradient accumulation)
    step_ends: list[float] = []

    class CountingGKD(GKDTrainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            step_tokens.append(int(inputs["attention_mask"].sum()))
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)

    class StepTimer(TrainerCallback):
        def on_step_end(self, *_, **__):
            step_ends.append(time.perf_counter())

    args = GKDConfig(
        output_dir=str(work_dir / "trl"),
        max_steps=config.training.steps,
        per_device_train_batch_size=config.training.batch_size,
        learning_rate=config.training.learning_rate,
        lr_scheduler_type="constant",
        warmup_steps=0,
        lmbda=0.0,
        beta=0.0,
        seq_kd=False,
        temperature=config.loss.temperature,
        max_length=config.data.max_length,
        gradient_checkpointing=False,
        # The precision flexkd's distill runs at: float32 on a CPU, bf16 autocast in the GPU setting.
        bf16=config.training.precision == "bf16",
        use_cpu=not settings.use_gpu,
        report_to="none",
        save_strategy="no",
        logging_steps=config.training.steps,
        dataloader_num_workers=0,
        disable_tqdm=True,
        seed=config.training.seed,
    )
    started = time.perf_counter()
    trainer = CountingGKD(
        model=student,
        teacher_model=teacher,
        args=args,
        train_dataset=dataset,
        processing_class=tokenizer,
        callbacks=[StepTimer()],
    )
    if config.training.steps < 2:
        raise ValueError("trl_gkd: the steady state leaves out the first step, so it needs at least 2 steps")
    trainer.train()
    # The steady state, as flexkd's distill stage counts it: from the end of the first step to the last.
    loop_seconds = step_ends[-1] - step_ends[0]
    tokens = sum(step_tokens[1:])
    return {
        "tokens_per_second": tokens / loop_seconds,
        "loop_seconds": round(loop_seconds, 1),
        "wall_seconds": round(time.perf_counter() - started, 1),
        "tokens": tokens,
        "steps": config.training.steps,
        "student_parameters": parameter_count(student),
        "torch_threads": torch.get_num_threads(),
        "trl": __import__("trl").__version__,
    }


PARTS = ("plain", "feature", "trl", "score", "workers")
# Touch <work dir>/speed.stop to skip the parts not started yet and write what was measured.
STOP_FILE = "speed.stop"


def run_speed(
    settings: SpeedSettings, work_dir: Path = DEFAULT_WORK_DIR, results_dir: Path = RESULTS, only: tuple[str, ...] = ()
) -> dict[str, Any]:
    """Measure every part (or, with ``only``, re-measure those parts and keep the others from
    the last results/speed.json), then write the results."""
    from flexkd.models.loading import parameter_count
    from flexkd.models.plan import build_student

    work_dir.mkdir(parents=True, exist_ok=True)
    command, started = command_line(), time.time()
    previous = json.loads((results_dir / "speed.json").read_text()) if only else {}
    measured: dict[str, Any] = dict(previous.get("measured", {}))
    commands: dict[str, str] = dict(
        previous.get("commands") or dict.fromkeys(PARTS, previous["command"]) if previous else {}
    )
    wanted = set(only or PARTS)

    def save(measured: dict[str, Any]) -> None:  # what is measured so far survives a later part's failure
        (work_dir / "speed.partial.json").write_text(json.dumps(measured, indent=1, default=str))

    stop_file = work_dir / STOP_FILE
    stop_file.unlink(missing_ok=True)
    done: set[str] = set()

    def go(*parts: str) -> bool:
        """Measure this part now? Not if unwanted, or if the stop file asks to end early."""
        if stop_file.exists() or not set(parts) & wanted:
            return False
        done.update(set(parts) & wanted)
        return True

    flexkd = classification_config(settings, work_dir, "kd+flexkd")
    with LoadMonitor() as load:
        if go("plain", "feature"):
            measured["flexkd_feature"] = _distill(flexkd)  # tokenize, score, targets: the quality benchmark's
            student = build_student(flexkd)
            measured["non_embedding_parameters"] = (
                parameter_count(student) - student.get_input_embeddings().weight.numel()
            )
        if "plain" in done:
            stages = measured["flexkd_feature"]["stages"]
            measured["plain_loop_feature"] = plain_loop(
                flexkd,
                Path(stages["targets"]["directory"]),
                Path(stages["tokenize"]["directory"]),
                threads=settings.cpus,
            )
        save(measured)
        if "feature" in done:
            logit_only = classification_config(settings, work_dir, "kd")
            measured["flexkd_logit_only"] = _distill(logit_only)
            stages = measured["flexkd_logit_only"]["stages"]
            measured["plain_loop_logit_only"] = plain_loop(
                logit_only,
                Path(stages["targets"]["directory"]),
                Path(stages["tokenize"]["directory"]),
                threads=settings.cpus,
            )
        save(measured)
        if go("trl"):
            generation = generation_config(settings, work_dir)
            measured["flexkd_generation_logit_kd"] = _distill(generation)
            measured["trl_gkd_logit_kd"] = trl_gkd(generation, settings, work_dir)
        save(measured)
        if go("score"):
            # One epoch over as many rows as the score stage read, with the teacher online (as a run
            # without the cache pays it): what scoring costs next to training on the same data.
            score_rows = flexkd.data.score.limit
            one_epoch = max(1, score_rows // flexkd.training.batch_size)
            measured["flexkd_online_one_epoch"] = _distill(
                classification_config(
                    settings,
                    work_dir,
                    "kd+flexkd",
                    **{
                        "training.teacher": "online",
                        "training.steps": one_epoch,
                        "training.log_every": one_epoch,
                        "training.checkpoint_every": one_epoch,
                    },
                )
            )
            measured["flexkd_online_one_epoch"]["rows"] = one_epoch * flexkd.training.batch_size
            measured["score_rows"] = score_rows
            measured["score_stage_seconds"] = measured["flexkd_online_one_epoch"]["stages"]["score"]["seconds"]
        save(measured)
        if not settings.use_gpu and go("workers"):  # one GPU has no second device to scale to
            # Half a CPU reserved per worker keeps one CPU free for Ray Data's reads with 2 workers too.
            single = {"resources.cpus_per_worker": 0.5, "resources.threads_per_worker": 1}
            measured["flexkd_1_worker"] = _distill(classification_config(settings, work_dir, "kd+flexkd", **single))
            measured["flexkd_2_workers"] = _distill(
                classification_config(settings, work_dir, "kd+flexkd", **single, **{"resources.num_workers": 2})
            )
    commands |= dict.fromkeys(done, command)
    loads = dict(previous.get("loads") or dict.fromkeys(PARTS, previous["load"]) if previous else {})
    loads |= {part: load.summary() for part in done}
    results = {
        "benchmark": "speed",
        "command": command,
        "commands": commands,
        "machine": machine(),
        "load": load.summary(),
        "loads": loads,
        "settings": asdict(settings),
        "classification": {"train_rows": flexkd.data.train.limit, "batch_size": flexkd.training.batch_size},
        "measured": measured,
        "wall_seconds": round(time.time() - started, 1),
        "finished_at": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }
    results["ratios"] = ratios(measured, settings)
    results["headline"] = {row["name"]: row["value"] for row in results["ratios"] if row["value"] is not None}
    plot = plot_speed(results, results_dir / "speed.png")
    write_results("speed", results, speed_markdown(results), plot, tracking_uri(work_dir), results_dir)
    return results


def ratios(measured: dict[str, Any], settings: SpeedSettings) -> list[dict[str, Any]]:
    def tps(name: str) -> float | None:
        return measured.get(name, {}).get("tokens_per_second")

    rows = []

    def add(name: str, part: str, what: str, value: float | None, goal: str, met: bool | None) -> None:
        rows.append(
            {
                "name": name,
                "part": part,
                "what": what,
                "value": None if value is None else round(value, 3),
                "goal": goal,
                "met": met,
            }
        )

    if tps("flexkd_feature") and tps("plain_loop_feature"):
        value = tps("flexkd_feature") / tps("plain_loop_feature")
        add(
            "flexkd_over_plain_loop",
            "plain",
            "distill-step tokens/s, flexkd distill stage / plain PyTorch loop (kd+flexkd, cache)",
            value,
            ">= 0.95",
            value >= 0.95,
        )
    if tps("flexkd_feature") and tps("flexkd_logit_only"):
        value = 1 - tps("flexkd_feature") / tps("flexkd_logit_only")
        add(
            "feature_loss_slowdown",
            "feature",
            "kd+flexkd vs kd (logit only), distill stages: 1 - tokens/s ratio",
            value,
            "< 0.05",
            value < 0.05,
        )
    if tps("plain_loop_feature") and tps("plain_loop_logit_only"):
        value = 1 - tps("plain_loop_feature") / tps("plain_loop_logit_only")
        add(
            "feature_loss_slowdown_plain",
            "feature",
            "kd+flexkd vs kd (logit only), plain loops: 1 - tokens/s ratio (the cost of the method itself, no Ray)",
            value,
            "< 0.05",
            value < 0.05,
        )
    if "flexkd_online_one_epoch" in measured:
        score_seconds = measured["score_stage_seconds"]
        epoch_seconds = measured["flexkd_online_one_epoch"]["stage_seconds"]
        add(
            "score_over_epoch",
            "score",
            f"score stage wall s ({score_seconds}, {measured['score_rows']} rows) / one "
            f"online-teacher distill epoch over as many rows, stage wall s ({epoch_seconds}, "
            f"{measured['flexkd_online_one_epoch']['rows']} rows)",
            score_seconds / epoch_seconds if epoch_seconds else None,
            "(report)",
            None,
        )
    if tps("flexkd_2_workers") and tps("flexkd_1_worker"):
        value = tps("flexkd_2_workers") / tps("flexkd_1_worker")
        add(
            "two_workers_over_one",
            "workers",
            "distill tokens/s, 2 workers x 1 thread / 1 worker x 1 thread",
            value,
            "(ideal 2.0)",
            None,
        )
    if tps("flexkd_feature") and "non_embedding_parameters" in measured:
        # 6 FLOPs per parameter per token (forward + backward), over the non-embedding parameters:
        # the embedding is a lookup, and the tied output layer runs at one position per row here.
        flops = 6 * measured["non_embedding_parameters"] * tps("flexkd_feature")
        peak = next((value for name, value in PEAK_BF16_FLOPS.items() if name in (gpu_name() or "")), None)
        add(
            "distill_model_gflops_per_second",
            "plain",
            "distill step model GFLOP/s (6 x non-embedding student "
            "parameters x tokens/s, kd+flexkd)"
            + (f"; MFU = {flops / peak:.4f} of the dense bf16 peak" if peak else "; MFU: no GPU"),
            flops / 1e9,
            "(report)",
            None,
        )
    trl = measured.get("trl_gkd_logit_kd", {})
    if trl.get("tokens_per_second"):
        value = tps("flexkd_generation_logit_kd") / trl["tokens_per_second"]
        add(
            "flexkd_over_trl",
            "trl",
            "logit-only KD tokens/s, flexkd distill stage / TRL GKDTrainer",
            value,
            ">= 1.0",
            value >= 1.0,
        )
    elif trl:
        add("flexkd_over_trl", "trl", f"TRL not measured: {trl.get('error')}", None, ">= 1.0", None)
    return rows


def gpu_name() -> str | None:
    import torch

    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else None


def speed_markdown(results: dict[str, Any]) -> str:
    measured, load, settings = results["measured"], results["load"], results["settings"]
    lines = [
        "## Speed",
        "",
        f"Command: `{results['command']}` (finished {results['finished_at']}, wall time {results['wall_seconds'] / 60:.1f} min)",
        "",
        f"Machine: {results['machine']['cpus']} CPUs ({results['machine']['cpu_model']}), GPU: {results['machine']['gpu']}, "
        f"torch {results['machine']['torch']}, commit {results['machine']['git_commit']}.",
        f"{load_sentence(load).capitalize()}.",
        "",
        f"Classification runs: the quality benchmark's SST-2 pipeline ({results['classification']['train_rows']} "
        f"training rows, its adapted teacher and cache), {settings['steps']} steps of batch "
        f"{results['classification']['batch_size']}, student d=192 / 4 layers, teacher-target cache, "
        f"{settings['cpus']} threads unless stated. Generation (TRL) runs: T0 mixture, {settings['generation_rows']} rows, "
        f"{settings['generation_steps']} steps of batch {settings['generation_batch_size']}, max length "
        f"{settings['generation_max_length']}, online teacher.",
        "",
        "| ratio | value | goal | met | measured by |",
        "|---|---|---|---|---|",
    ]
    commands = results.get("commands", {})
    for row in results["ratios"]:
        met = {True: "yes", False: "**no**", None: "-"}[row["met"]]
        value = "n/a" if row["value"] is None else f"{row['value']:.3f}"
        lines.append(
            f"| {row['what']} | {value} | {row['goal']} | {met} | `{commands.get(row['part'], results['command'])}` |"
        )
    lines += ["", "| run | tokens/s (in the loop) | stage / wall s |", "|---|---|---|"]
    for name, run in measured.items():
        if not isinstance(run, dict):
            continue
        seconds = run.get("stage_seconds", run.get("wall_seconds", run.get("seconds")))
        tokens = run.get("tokens_per_second")
        lines.append(f"| {name} | {'n/a' if tokens is None else f'{tokens:.0f}'} | {seconds} |")
    lines += profile_table(measured)
    lines += ["", "![speed](results/speed.png)", ""]
    return "\n".join(lines)


# Each distill stage profiled beside the plain loop computing the same loss: (loss, stage run, plain loop run).
PROFILE_PAIRS = (
    ("kd+flexkd", "flexkd_feature", "plain_loop_feature"),
    ("kd", "flexkd_logit_only", "plain_loop_logit_only"),
)


def profile_table(measured: dict[str, Any]) -> list[str]:
    """Where a step's time goes, in ms per step by phase: for each loss the distill stage, the plain
    loop and their difference (where the stage's extra time goes); no lines when nothing was profiled."""
    pairs = [
        (loss, measured.get(stage, {}).get("ms_per_step"), measured.get(plain, {}).get("ms_per_step"))
        for loss, stage, plain in PROFILE_PAIRS
    ]
    pairs = [(loss, stage or {}, plain or {}) for loss, stage, plain in pairs if stage or plain]
    if not pairs:
        return []
    # Rows: the phases in step order as the profiles list them (one measured by an older version may lack
    # some), then the whole step, their sum.
    phases = list(dict.fromkeys(phase for _, stage, plain in pairs for phase in [*stage, *plain]))
    rows = {phase.replace("_", " "): {phase} for phase in phases} | {"**step**": set(phases)}

    def ms(profile: dict[str, float], summed: set[str]) -> float | None:
        return sum(profile[phase] for phase in summed) if profile and summed <= profile.keys() else None

    def text(value: float | None, sign: str = "") -> str:
        return "n/a" if value is None else f"{value:{sign}.1f}"

    header = [f"{loss}: {column}" for loss, *_ in pairs for column in ("distill stage", "plain loop", "stage - plain")]
    lines = [
        "",
        "Where a step's time goes (ms per step, steady state; the phases add up to the step; teacher targets: "
        "read from the cache; loss: its task, logit and feature parts, in the stage with their finite check; "
        "no profile on a GPU):",
        "",
        "| phase | " + " | ".join(header) + " |",
        "|---|" + "---|" * len(header),
    ]
    for name, summed in rows.items():
        cells = []
        for _, stage, plain in pairs:
            stage_ms, plain_ms = ms(stage, summed), ms(plain, summed)
            extra = None if stage_ms is None or plain_ms is None else stage_ms - plain_ms
            cells += [text(stage_ms), text(plain_ms), text(extra, "+")]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines


def plot_speed(results: dict[str, Any], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path.parent.mkdir(parents=True, exist_ok=True)
    runs = {
        name: run["tokens_per_second"]
        for name, run in results["measured"].items()
        if isinstance(run, dict) and run.get("tokens_per_second")
    }
    figure, axis = plt.subplots(figsize=(8, 4))
    axis.barh(list(runs), list(runs.values()), color="#9ab")
    axis.set_xlabel("tokens/s (non-padding, in the training loop)")
    axis.set_title("flexkd bench speed")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path
