"""distill: train the student on the Flex-KD objective.

Ray Train workers hold the student (FSDP2-sharded, trainable) and the teacher (sharded, frozen,
no grad). Every step: teacher forward for logits and hidden states, gather the teacher's
selected units of each mapped layer, student forward, and

    L = alpha * task + beta * logit KD + gamma * sum over layer pairs of the feature loss.

Checkpoints (torch.distributed.checkpoint) go to ``checkpoints/step_*``; a restarted worker
group, or a rerun after the driver died, continues from the newest complete one. Outputs:

    student/        the distilled student, Hugging Face format (safetensors, config, tokenizer)
    metrics.json    final loss parts, tokens/s, steps, parameter counts
"""

from __future__ import annotations

import json
import math
import shutil
import time
from itertools import count
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import ray
import torch

from flexkd import distributed
from flexkd.config import PipelineConfig
from flexkd.data import collate_batch
from flexkd.layers import forward_with_hidden_states
from flexkd.losses import LinearProjector
from flexkd.models import parameter_count
from flexkd.objective import LayerPair, ObjectiveSettings, StudentWithObjective
from flexkd.ray_jobs import run_workers
from flexkd.resolve import build_student, load_pipeline_tokenizer, load_teacher, plan_models
from flexkd.tracking import WorkerMetricLogger, tracking_uri

KEEP_CHECKPOINTS = 2


def run(config: PipelineConfig, inputs: dict[str, Path], output_dir: Path) -> dict[str, Any]:
    import mlflow

    plan = plan_models(config)
    tokenized = json.loads((inputs["tokenize"] / "manifest.json").read_text())["outputs"]
    selected = json.loads((inputs["score"] / "selected.json").read_text())
    run_workers(
        "distill", config, _distill_worker,
        loop_config={
            "config": config, "output_dir": str(output_dir), "k": plan.k,
            "pairs": [list(pair) for pair in plan.layer_pairs],
            "selected": {int(layer): entry["indices"] for layer, entry in selected["layers"].items()},
            "pad_token_id": tokenized["pad_token_id"], "verbalizer_ids": tokenized["verbalizer_ids"],
            "tracking_uri": tracking_uri(config), "run_id": mlflow.active_run().info.run_id,
        },
        datasets={"train": ray.data.read_parquet(str(inputs["tokenize"] / "train"))},
        run_name="distill", storage=output_dir / "ray", max_failures=config.training.max_failures,
    )
    metrics = json.loads((output_dir / "metrics.json").read_text())
    mlflow.log_metrics({f"final.{key}": value for key, value in metrics.items() if isinstance(value, (int, float))})
    return {**metrics, "student_dir": str(output_dir / "student")}


def learning_rate_at(step: int, config: PipelineConfig) -> float:
    """Linear warmup, then cosine decay to a tenth of the peak."""
    training = config.training
    if step < training.warmup_steps:
        return training.learning_rate * (step + 1) / training.warmup_steps
    progress = (step - training.warmup_steps) / max(1, training.steps - training.warmup_steps)
    return training.learning_rate * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0))))


def _endless_batches(shard, batch_size: int, skip: int) -> Iterator[dict[str, np.ndarray]]:
    """Epoch after epoch over this worker's shard; the first ``skip`` batches are passed over
    so a resumed run sees the batches it would have seen."""
    seen = 0
    for _ in count():
        for rows in shard.iter_batches(batch_size=batch_size, batch_format="numpy", drop_last=True):
            seen += 1
            if seen > skip:
                yield rows


def _build(loop_config: dict[str, Any]):
    config: PipelineConfig = loop_config["config"]
    device = distributed.device()
    pairs = [LayerPair(teacher, student) for teacher, student in loop_config["pairs"]]
    settings = ObjectiveSettings(task=config.task.kind, k=loop_config["k"],
                                 **config.loss.model_dump(exclude={"feature"}), feature=config.loss.feature)
    torch.manual_seed(config.training.seed)
    student = build_student(config)
    teacher = load_teacher(config)
    projectors = {}
    if config.loss.feature == "projector":
        projectors = {f"{p.teacher_layer}-{p.student_layer}":
                      LinearProjector(student.config.hidden_size, teacher.config.hidden_size) for p in pairs}
    verbalizer_ids = loop_config["verbalizer_ids"]
    verbalizer_ids = torch.tensor(verbalizer_ids) if verbalizer_ids else None
    module = StudentWithObjective(student, settings, pairs, verbalizer_ids, projectors).to(device)
    module = distributed.shard_model(module, trainable=True)
    teacher = distributed.shard_model(teacher.to(device), trainable=False)
    return config, device, pairs, module, teacher, projectors


def _distill_worker(loop_config: dict[str, Any]) -> None:
    config, device, pairs, module, teacher, projectors = _build(loop_config)
    output_dir = Path(loop_config["output_dir"])
    checkpoints = output_dir / "checkpoints"
    optimizer = torch.optim.AdamW(module.parameters(), lr=config.training.learning_rate,
                                  weight_decay=config.training.weight_decay)
    start_step = 0
    latest = distributed.latest_checkpoint(checkpoints)
    if latest is not None:
        start_step = distributed.load_checkpoint(latest, module, optimizer)["step"]

    selected = {layer: torch.tensor(indices, device=device) for layer, indices in loop_config["selected"].items()}
    # The selection-free baselines compare whole hidden states; the others use the selected units.
    whole_hidden = config.loss.feature in ("cka", "projector")
    teacher_layers = sorted({pair.teacher_layer for pair in pairs})
    need_teacher = config.loss.beta > 0 or (config.loss.gamma > 0 and config.loss.feature != "none")
    per_rank_batch = max(1, config.training.batch_size // distributed.world_size())
    batches = _endless_batches(ray.train.get_dataset_shard("train"), per_rank_batch, skip=start_step)
    logger = WorkerMetricLogger(loop_config["tracking_uri"], loop_config["run_id"]) if distributed.is_main_process() else None
    progress = _progress_bar(start_step, config.training.steps)

    tokens, started, parts = 0, time.time(), {}
    for step in range(start_step, config.training.steps):
        batch = {key: value.to(device) for key, value in collate_batch(next(batches), loop_config["pad_token_id"]).items()}
        teacher_logits, teacher_features = None, {}
        if need_teacher:
            with torch.no_grad():
                teacher_logits, hidden = forward_with_hidden_states(teacher, batch["input_ids"], batch["attention_mask"], teacher_layers)
            teacher_features = {layer: value if whole_hidden else value.index_select(-1, selected[layer])
                                for layer, value in hidden.items()}
        for group in optimizer.param_groups:
            group["lr"] = learning_rate_at(step, config)
        parts = module(batch, teacher_logits, teacher_features)
        _refuse_non_finite(parts, step + 1)
        parts["total"].backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        tokens += int(batch["attention_mask"].sum()) * distributed.world_size()
        done = step + 1
        if progress is not None:
            progress.update(1)
        if done % config.training.log_every == 0 or done == config.training.steps:
            metrics = {name: float(value.detach()) for name, value in parts.items()}
            metrics |= {"tokens_per_second": tokens / max(time.time() - started, 1e-9), "learning_rate": learning_rate_at(step, config)}
            if logger is not None:
                logger.log({f"train.{key}": value for key, value in metrics.items()}, step=done)
            ray.train.report({"step": done, **metrics})
        if done % config.training.checkpoint_every == 0 or done == config.training.steps:
            distributed.save_checkpoint(checkpoints, module, optimizer, done)
            if distributed.is_main_process():
                _prune_checkpoints(checkpoints)

    _save_student(config, module, projectors, output_dir, tokens, time.time() - started, parts, start_step)


def _refuse_non_finite(parts: dict[str, torch.Tensor], step: int) -> None:
    for name, value in parts.items():
        if not torch.isfinite(value).all():
            raise FloatingPointError(f"non-finite {name} loss ({float(value)}) at step {step}; "
                                     "the last good checkpoint is kept")


def _progress_bar(start: int, total: int):
    if not distributed.is_main_process():
        return None
    from ray.experimental.tqdm_ray import tqdm

    bar = tqdm(total=total, desc="distill")
    bar.update(start)  # a resumed run starts part-way
    return bar


def _prune_checkpoints(directory: Path) -> None:
    complete = sorted(path for path in directory.glob("step_*") if (path / distributed.META_FILENAME).is_file())
    for stale in complete[:-KEEP_CHECKPOINTS]:
        shutil.rmtree(stale, ignore_errors=True)


def _save_student(config, module, projectors, output_dir: Path, tokens: int, seconds: float, parts, start_step: int) -> None:
    """Rank 0 writes the student in Hugging Face format (a fresh CPU copy loaded with the
    gathered weights, so the saved model knows nothing of FSDP)."""
    state = distributed.full_model_state_dict(module)
    if not distributed.is_main_process():
        return
    student = build_student(config)
    student.load_state_dict({key.removeprefix("student."): value for key, value in state.items()
                             if key.startswith("student.")})
    student.save_pretrained(output_dir / "student", safe_serialization=True)
    load_pipeline_tokenizer(config).save_pretrained(output_dir / "student")
    extra = sum(projector.extra_parameters for projector in projectors.values())
    metrics = {name: float(value.detach()) for name, value in parts.items()}
    metrics |= {"steps": config.training.steps, "resumed_from_step": start_step,
                "tokens_per_second": tokens / max(seconds, 1e-9), "student_parameters": parameter_count(student),
                "extra_trainable_parameters": extra}
    (output_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
