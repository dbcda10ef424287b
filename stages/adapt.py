"""adapt: fine-tune the teacher on the task before anything scores it (``teacher.adapt``).

Flex-KD ranks the teacher's units by the gradients of its task loss, which say which units matter
only if the teacher knows the task (a base model prompted for SST-2 is near chance). This stage
trains the teacher on the task's training rows with that same loss
(flexkd.method.objective.summed_task_loss, averaged over a batch's rows): classification through
the verbalizer logits at the last prompt token, generation as SFT on the response tokens.

Ray Train workers (``resources.num_workers``) hold the teacher, FSDP2-sharded over them. Each
worker reads the tokenized training rows itself and takes its slice of every global batch of
``teacher.adapt.batch_size`` rows (one seeded permutation per epoch, the same on every rank), so
N workers take the steps one worker takes. The last rows of the training split are held out
(``heldout_rows``, or ``heldout_fraction``, default a tenth): they are measured before training,
after every epoch and after the last step, and the best measurement's weights are kept
(classification: accuracy, then loss; generation: loss). This early stopping may keep the base
teacher, when no epoch beats it.

``trainable``: ``all`` (every weight), ``top_blocks`` (the last ``top_blocks`` blocks, the final
norm and the output layer) or ``head`` (the output layer). The output layer is untied from the
input embeddings first, so the embeddings stay as they were; the classification loss reads only
the verbalizer rows of it, so only those rows change. Training runs in float32 (with bf16 autocast
for a bf16 teacher), whatever ``teacher.dtype`` later stages load it in.

Writes:

    teacher/      the adapted teacher, Hugging Face format (safetensors, config, tokenizer); every
                  later stage loads it as the teacher (flexkd.models.plan.adapted_teacher_config)
    history.json  the held-out metrics of every measurement (step, epoch) and the kept one
    adapt.json    base teacher, data fingerprint, held-out metrics before and after, kept epoch,
                  the teacher's name and registered version (what later stages record as lineage)

The adapted teacher is registered as a version of ``<pipeline>-teacher`` in the MLflow Model
Registry (unless ``register: false``), tagged with its base teacher, data fingerprint and
held-out metrics before and after.
"""

from __future__ import annotations

import json
import math
import sys
from dataclasses import dataclass
from itertools import count
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from transformers import PreTrainedModel

from flexkd import distributed
from flexkd.cluster.train_workers import run_workers
from flexkd.config.schema import PipelineConfig
from flexkd.data.rows import collate_batch
from flexkd.data.shards import shard_files
from flexkd.errors import StageError
from flexkd.method.objective import class_logits, scored_positions, summed_task_loss
from flexkd.models.loading import untie_output_embeddings
from flexkd.models.plan import (
    ADAPT_RECORD,
    ADAPTED_TEACHER_DIR,
    load_pipeline_tokenizer,
    load_teacher,
    teacher_name,
)
from flexkd.progress import Progress, progress_bars_wanted
from flexkd.tracking.model_registry import log_student

HISTORY = "history.json"


@dataclass(frozen=True)
class AdaptLoop:
    """What every worker needs, made on the driver."""

    config: PipelineConfig
    rows_dir: Path  # the tokenize stage's train/ shards
    heldout_rows: int  # the last this many rows are held out
    pad_token_id: int
    verbalizer_ids: list[int] | None
    output_dir: Path
    progress_bars: bool  # the driver's output is a terminal (flexkd.progress)


def run(config: PipelineConfig, inputs: dict[str, Path], output_dir: Path) -> dict[str, Any]:
    settings = config.teacher.adapt
    tokenize_manifest = json.loads((inputs["tokenize"] / "manifest.json").read_text())
    tokenized = tokenize_manifest["outputs"]
    rows = tokenized["rows"]["train"]
    heldout = settings.heldout_count(rows)
    if rows - heldout < settings.batch_size:
        raise StageError(
            f"adapt: {rows} training rows less {heldout} held out leave fewer than one batch of "
            f"teacher.adapt.batch_size = {settings.batch_size}"
        )
    loop = AdaptLoop(
        config=config,
        rows_dir=inputs["tokenize"] / "train",
        heldout_rows=heldout,
        pad_token_id=tokenized["pad_token_id"],
        verbalizer_ids=tokenized["verbalizer_ids"],
        output_dir=output_dir,
        progress_bars=progress_bars_wanted(),
    )
    run_workers(
        "adapt",
        config,
        _adapt_worker,
        loop_config={"loop": loop},
        datasets={},
        run_name="adapt",
        storage=output_dir / "ray",
    )
    history = json.loads((output_dir / HISTORY).read_text())
    before, after = history["measurements"][0], history["kept"]
    for entry in history["measurements"]:
        mlflow.log_metrics({f"heldout.{name}": entry[name] for name in _metric_names(config)}, step=entry["step"])
    mlflow.log_metrics({f"heldout.before.{name}": before[name] for name in _metric_names(config)})
    mlflow.log_metrics({f"heldout.after.{name}": after[name] for name in _metric_names(config)})
    record = {
        "base_teacher": teacher_name(config),
        "base_teacher_version": config.teacher.version,
        "data_fingerprint": tokenize_manifest["fingerprint"],
        "trainable": settings.trainable,
        "train_rows": rows - heldout,
        "heldout_rows": heldout,
        "steps": history["steps"],
        "kept_epoch": after["epoch"],
        "kept_step": after["step"],
        "heldout_before": {name: before[name] for name in _metric_names(config)},
        "heldout_after": {name: after[name] for name in _metric_names(config)},
        "teacher_dir": str(output_dir / ADAPTED_TEACHER_DIR),
    }
    mlflow.set_tags({"flexkd.base_teacher": record["base_teacher"], "flexkd.kept_epoch": str(after["epoch"])})
    if settings.register_model:
        record |= _register(config, output_dir, record)
    else:
        # Named after the base and this stage's fingerprint (its directory), so two adaptations differ.
        record |= {"teacher_name": f"{record['base_teacher']}-adapted-{output_dir.name[:8]}", "teacher_version": None}
    (output_dir / ADAPT_RECORD).write_text(json.dumps(record, indent=2))
    mlflow.log_artifact(str(output_dir / ADAPT_RECORD))
    mlflow.log_artifact(str(output_dir / HISTORY))
    return record


def _metric_names(config: PipelineConfig) -> tuple[str, ...]:
    return ("accuracy", "loss") if config.task.kind == "classification" else ("loss", "perplexity")


def _register(config: PipelineConfig, output_dir: Path, record: dict[str, Any]) -> dict[str, Any]:
    """Register the adapted teacher as a version of ``<pipeline>-teacher``, with its lineage."""
    model_name = f"{config.name}-teacher"
    logged = log_student(output_dir / ADAPTED_TEACHER_DIR, config.evaluation.max_new_tokens, name="teacher")
    tags = {
        "flexkd.base_teacher.name": record["base_teacher"],
        "flexkd.base_teacher.version": record["base_teacher_version"] or "",
        "flexkd.data_fingerprint": record["data_fingerprint"],
        "flexkd.adapt_run": mlflow.active_run().info.run_id,
        "flexkd.pipeline": config.name,
        "flexkd.trainable": record["trainable"],
        "flexkd.kept_epoch": str(record["kept_epoch"]),
    }
    tags |= {f"heldout.before.{name}": str(value) for name, value in record["heldout_before"].items()}
    tags |= {f"heldout.after.{name}": str(value) for name, value in record["heldout_after"].items()}
    version = mlflow.register_model(logged.model_uri, model_name, tags=tags)
    mlflow.set_tag("flexkd.registered_model", f"models:/{model_name}/{version.version}")
    return {
        "teacher_name": model_name,
        "teacher_version": str(version.version),
        "model_uri": f"models:/{model_name}/{version.version}",
    }


def trainable_teacher(config: PipelineConfig) -> PreTrainedModel:
    """The base teacher on the CPU in float32, in train mode, with ``requires_grad`` on the part
    ``teacher.adapt.trainable`` trains (and the output layer untied unless everything trains)."""
    settings = config.teacher.adapt
    float32 = config.model_copy(update={"teacher": config.teacher.model_copy(update={"dtype": "float32"})})
    model = load_teacher(float32)  # frozen
    if settings.trainable == "all":
        return model.requires_grad_(True).train()
    untie_output_embeddings(model)
    model.get_output_embeddings().weight.requires_grad_(True)
    if settings.trainable == "top_blocks":
        body = getattr(model, "model", None)
        blocks, norm = getattr(body, "layers", None), getattr(body, "norm", None)
        if blocks is None or norm is None:
            raise ValueError(
                f"teacher.adapt.trainable 'top_blocks': a {type(model).__name__} has no model.layers and "
                "model.norm (a Llama-style decoder); use 'all' or 'head'"
            )
        if settings.top_blocks > len(blocks):
            raise ValueError(f"teacher.adapt.top_blocks = {settings.top_blocks}: the teacher has {len(blocks)} blocks")
        for block in list(blocks)[-settings.top_blocks :]:
            block.requires_grad_(True)
        norm.requires_grad_(True)
    return model.train()


def _adapt_worker(loop_config: dict[str, AdaptLoop]) -> None:
    adapt_teacher(loop_config["loop"])


def adapt_teacher(loop: AdaptLoop) -> None:
    """The training loop of one worker (also runs as a plain single process); rank 0 writes
    ``teacher/`` and ``history.json``."""
    config, settings = loop.config, loop.config.teacher.adapt
    distributed.use_threads(config.resources.threads_per_worker)
    device, world, rank = distributed.device(), distributed.world_size(), distributed.rank()
    rows = _read_rows(loop.rows_dir)
    total_rows = len(rows["example_id"])
    train_rows = total_rows - loop.heldout_rows
    verbalizers = torch.tensor(loop.verbalizer_ids, device=device) if loop.verbalizer_ids else None
    torch.manual_seed(settings.seed)
    model = distributed.shard_model(trainable_teacher(config).to(device), trainable=True)
    optimizer = torch.optim.AdamW(
        [parameter for parameter in model.parameters() if parameter.requires_grad],
        lr=settings.learning_rate,
        weight_decay=0.0,  # with zero gradients (the rows a classification loss never reads) nothing moves
    )
    precision = distributed.autocast(config.teacher.dtype, device)
    per_rank = settings.batch_size // world
    steps_per_epoch = train_rows // settings.batch_size
    total_steps = settings.steps or (settings.epochs or 1) * steps_per_epoch

    def forward_loss(indices: np.ndarray) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        """Summed task loss of the rows ``indices`` and the logits it read."""
        batch = {key: value.to(device) for key, value in collate_batch(_take(rows, indices), loop.pad_token_id).items()}
        # Classification reads one position per row: project only there (V is 49k for SmolLM2).
        keep = scored_positions("classification", batch) if config.task.kind == "classification" else 0
        with precision:
            logits = model(
                input_ids=batch["input_ids"],
                attention_mask=batch["attention_mask"],
                use_cache=False,
                logits_to_keep=keep,
            ).logits
        return summed_task_loss(config.task.kind, logits, batch, verbalizers), logits, batch

    @torch.no_grad()
    def measure(step: int, epoch: int) -> dict[str, float]:
        """Held-out metrics, over every rank's share (all ranks run as many forwards)."""
        model.eval()
        mine = np.arange(train_rows + rank, total_rows, world)
        batches = math.ceil(math.ceil(loop.heldout_rows / world) / settings.batch_size)
        sums = torch.zeros(3, dtype=torch.float64, device=device)  # loss, correct, rows
        for index in range(batches):
            indices = mine[index * settings.batch_size : (index + 1) * settings.batch_size]
            weight = 1.0 if len(indices) else 0.0  # a rank out of rows still runs the collective forward
            loss, logits, batch = forward_loss(indices if len(indices) else np.array([train_rows]))
            sums[0] += weight * float(loss)
            if config.task.kind == "classification":
                predicted = class_logits(logits, batch["attention_mask"], verbalizers).argmax(dim=-1)
                sums[1] += weight * float((predicted == batch["class_label"]).sum())
            sums[2] += weight * len(indices)
        distributed.all_reduce_sum_(sums)
        model.train()
        mean_loss = float(sums[0] / sums[2])
        if config.task.kind == "classification":
            metrics = {"accuracy": float(sums[1] / sums[2]), "loss": mean_loss}
        else:
            metrics = {"loss": mean_loss, "perplexity": math.exp(min(mean_loss, 700.0))}
        if distributed.is_main_process():
            # To the process's own stdout, as distill does (Ray Train would print it twice).
            print(
                f"adapt step {step}/{total_steps} (epoch {epoch}): held-out "
                + ", ".join(f"{name} {value:.4g}" for name, value in metrics.items()),
                file=sys.__stdout__,
                flush=True,
            )
        return {"step": step, "epoch": epoch, **metrics}

    def score(metrics: dict[str, float]) -> tuple[float, ...]:
        if config.task.kind == "classification":
            return metrics["accuracy"], -metrics["loss"]
        return (-metrics["loss"],)

    measurements = [measure(0, 0)]
    kept, kept_state = measurements[0], _full_state(model)
    step = 0
    # An epoch of a few thousand rows takes minutes on a CPU: a line at least every 30 s meanwhile.
    progress = (
        Progress("adapt", total_steps, terminal=loop.progress_bars, unit="steps")
        if distributed.is_main_process()
        else None
    )
    for epoch in count(1):
        order = np.random.default_rng(np.random.SeedSequence([settings.seed, epoch])).permutation(train_rows)
        for start in range(0, steps_per_epoch * settings.batch_size, settings.batch_size):
            if step == total_steps:
                break
            indices = order[start + rank * per_rank : start + (rank + 1) * per_rank]
            loss, _, _ = forward_loss(indices)
            loss = loss / len(indices)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"adapt: non-finite task loss ({float(loss)}) at step {step + 1}")
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            if progress is not None:
                progress.update(1)
        measurements.append(measure(step, epoch))
        if score(measurements[-1]) > score(kept):  # every rank decides alike: the metrics are all-reduced
            kept, kept_state = measurements[-1], _full_state(model)
        if step == total_steps:
            break

    if not distributed.is_main_process():
        return
    progress.close()
    output_dir = loop.output_dir
    teacher = trainable_teacher(config)
    teacher.load_state_dict(kept_state)
    teacher.save_pretrained(output_dir / ADAPTED_TEACHER_DIR, safe_serialization=True)
    load_pipeline_tokenizer(config).save_pretrained(output_dir / ADAPTED_TEACHER_DIR)
    history = {"steps": step, "measurements": measurements, "kept": kept}
    (output_dir / HISTORY).write_text(json.dumps(history, indent=2))


def _full_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The whole state on rank 0's CPU (collective under FSDP2); a copy, since training goes on."""
    if distributed.world_size() == 1:
        return {name: value.detach().to("cpu", copy=True) for name, value in model.state_dict().items()}
    return distributed.full_model_state_dict(model)


def _read_rows(rows_dir: Path) -> dict[str, list]:
    """Every tokenized row of ``rows_dir``, in the tokenize stage's order (its shards sort by name)."""
    files = shard_files(rows_dir)
    if not files:
        raise FileNotFoundError(f"adapt: no parquet shards in {rows_dir}")
    return pa.concat_tables([pq.read_table(file) for file in files]).to_pydict()


def _take(rows: dict[str, list], indices: np.ndarray) -> dict[str, list]:
    return {name: [column[int(i)] for i in indices] for name, column in rows.items()}
