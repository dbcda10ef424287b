"""score: which teacher units matter for the task.

Ray Train workers hold the frozen teacher (FSDP2-sharded across them), each reads its shard of
the scoring data, and for every mapped teacher layer accumulates the per-unit importance
(default: the paper's mean |dL_task/dh| over examples and tokens) plus activation moments for
the variance baseline. Sums and counts are all-reduced, so 1 worker and N workers give the same
vector. The driver then orders the units and writes:

    importance/layer_<l>.npy   float32 [d_teacher], per teacher layer
    importance.png             sorted scores per layer
    selected.json              per layer: ordered indices, k, score, method, d_teacher
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import ray
import torch

from flexkd import distributed
from flexkd.config import PipelineConfig
from flexkd.data import collate_batch
from flexkd.importance import finalize_importance, hidden_state_gradients, unit_importance_sum
from flexkd.layers import forward_with_hidden_states
from flexkd.objective import summed_task_loss
from flexkd.plots import plot_importance
from flexkd.ray_jobs import run_workers
from flexkd.resolve import load_teacher, plan_models
from flexkd.selection import (
    activation_moments,
    select_random_units,
    select_top_k_units,
    select_variance_units,
    variance_from_moments,
)

log = logging.getLogger("flexkd")


def run(config: PipelineConfig, inputs: dict[str, Path], output_dir: Path) -> dict[str, Any]:
    plan = plan_models(config)
    tokenized = json.loads((inputs["tokenize"] / "manifest.json").read_text())
    raw_dir = output_dir / "raw"
    run_workers(
        "score", config, _score_worker,
        loop_config={"config": config, "layers": plan.teacher_layer_indices, "raw_dir": str(raw_dir),
                     "pad_token_id": tokenized["outputs"]["pad_token_id"],
                     "verbalizer_ids": tokenized["outputs"]["verbalizer_ids"]},
        datasets={"score": ray.data.read_parquet(str(inputs["tokenize"] / "score"))},
        run_name="score", storage=output_dir / "ray",
    )
    sums = torch.load(raw_dir / "sums.pt", weights_only=True)
    selected = _select(config, plan.k, plan.teacher_hidden, sums, data_fingerprint=tokenized["fingerprint"])

    importance_dir = output_dir / "importance"
    importance_dir.mkdir(exist_ok=True)
    importance = {}
    for layer in plan.teacher_layer_indices:
        importance[layer] = finalize_importance(sums["importance"][layer], sums["examples"]).numpy()
        np.save(importance_dir / f"layer_{layer}.npy", importance[layer].astype(np.float32))
    (output_dir / "selected.json").write_text(json.dumps(selected, indent=2))
    plot_importance(importance, plan.k, output_dir / "importance.png")

    import mlflow

    mlflow.log_artifacts(str(importance_dir), "importance")
    mlflow.log_artifact(str(output_dir / "importance.png"))
    mlflow.log_artifact(str(output_dir / "selected.json"))
    mlflow.log_metrics({"examples": float(sums["examples"]), "k": float(plan.k)})
    return {"examples": int(sums["examples"]), "k": plan.k, "layers": plan.teacher_layer_indices,
            "selection": config.selection.method, "score": config.scoring.score}


def _select(config: PipelineConfig, k: int, d_teacher: int, sums: dict, data_fingerprint: str) -> dict:
    """Ordered unit indices per teacher layer, for the configured selection method."""
    layers = {}
    for layer, unit_sum in sums["importance"].items():
        method = config.selection.method
        if method == "importance":
            indices = select_top_k_units(finalize_importance(unit_sum, sums["examples"]), k)
        elif method == "random":
            indices = select_random_units(d_teacher, k, seed=config.selection.seed + layer)
        else:
            moments = sums["moments"][layer]
            indices = select_variance_units(variance_from_moments(*moments), k)
        layers[str(layer)] = {"indices": indices.tolist(), "k": k, "method": method,
                              "score": config.scoring.score, "d_teacher": d_teacher}
    return {"layers": layers, "examples": int(sums["examples"]), "data_fingerprint": data_fingerprint}


def _score_worker(loop_config: dict[str, Any]) -> None:
    """One Ray Train worker: accumulate importance sums over this worker's data shard."""
    config: PipelineConfig = loop_config["config"]
    layers: list[int] = loop_config["layers"]
    distributed.use_threads(config.resources.threads_per_worker)
    device = distributed.device()
    teacher = distributed.shard_model(load_teacher(config).to(device), trainable=False)
    verbalizer_ids = loop_config["verbalizer_ids"]
    verbalizer_ids = torch.tensor(verbalizer_ids, device=device) if verbalizer_ids else None

    d_teacher = teacher.config.hidden_size
    importance = {layer: torch.zeros(d_teacher, dtype=torch.float32, device=device) for layer in layers}
    moments = {layer: [torch.zeros(d_teacher, dtype=torch.float64, device=device),
                       torch.zeros(d_teacher, dtype=torch.float64, device=device),
                       torch.zeros((), dtype=torch.float64, device=device)] for layer in layers}
    examples = torch.zeros((), dtype=torch.float64, device=device)

    shard = ray.train.get_dataset_shard("score")
    batches = shard.iter_batches(batch_size=config.scoring.batch_size, batch_format="numpy")
    last_rows = None
    for rows in _lockstep(batches):
        # A rank whose shard ran out still runs the forward (FSDP2 all-gathers are collective)
        # on its last batch, and adds nothing.
        weight = 0.0 if rows is None else 1.0
        rows = last_rows if rows is None else rows
        if rows is None:
            raise RuntimeError("a scoring worker got no data: use fewer workers than scoring examples")
        last_rows = rows
        batch = {key: value.to(device) for key, value in collate_batch(rows, loop_config["pad_token_id"]).items()}
        logits, hidden = forward_with_hidden_states(teacher, batch["input_ids"], batch["attention_mask"], layers)
        loss = summed_task_loss(config.task.kind, logits, batch, verbalizer_ids)
        gradients = hidden_state_gradients(loss, [hidden[layer] for layer in layers])
        if weight == 0.0:
            continue
        for layer, gradient in zip(layers, gradients):
            importance[layer] += unit_importance_sum(gradient, hidden[layer].detach(), batch["attention_mask"],
                                                     config.scoring.score)
            for total, part in zip(moments[layer], activation_moments(hidden[layer].detach(), batch["attention_mask"])):
                total += part.to(total.dtype)
        examples += batch["input_ids"].shape[0]

    for tensor in [examples, *importance.values(), *(m for parts in moments.values() for m in parts)]:
        distributed.all_reduce_sum_(tensor)
    if distributed.is_main_process():
        raw_dir = Path(loop_config["raw_dir"])
        raw_dir.mkdir(parents=True, exist_ok=True)
        torch.save({"examples": int(examples.item()),
                    "importance": {layer: value.cpu() for layer, value in importance.items()},
                    "moments": {layer: [m.cpu() for m in parts] for layer, parts in moments.items()}},
                   raw_dir / "sums.pt")


def _lockstep(batches):
    """Yield this rank's batches, then None until every rank has run out, so all ranks take
    the same number of collective steps."""
    iterator = iter(batches)
    while True:
        rows = next(iterator, None)
        still_running = torch.tensor([0.0 if rows is None else 1.0], device=distributed.device())
        distributed.all_reduce_sum_(still_running)
        if still_running.item() == 0:
            return
        yield rows
