"""score: which teacher units matter for the task.

Ray Train workers hold the frozen teacher (FSDP2-sharded across them), each reads its shard of
the scoring data (every row reaches one worker, ``split_every_row``), and for every mapped
teacher layer accumulates the per-unit importance (default: the paper's mean |dL_task/dh| over
examples and tokens) plus activation moments for the variance baseline. Sums and counts are all-reduced, so 1 worker and N workers give the same
vector. The driver then orders the units and writes:

    importance/layer_<l>.npy   float32 [d_teacher], per teacher layer
    importance.png             sorted scores per layer
    selected.json              per layer: ordered indices, k, score, method, d_teacher

The same forward also measures the teacher on the scoring rows (the manifest's ``teacher``:
accuracy and loss, or loss and perplexity): a classifier within CHANCE_MARGIN of chance, or below
``teacher.min_accuracy``, gets one warning line suggesting ``teacher.adapt``, or with
``teacher.require_competent`` stops the stage, since its task gradients say little.

With ``selection.method: directions`` the same backward also sums, per mapped layer, the Gram
G_l = sum g g^T of the task gradients (float64, all-reduced like the importance), and the driver
keeps its top eigenvectors instead of units (flexkd.method.directions):

    directions/layer_<l>.safetensors   basis [d_T, k_max] and spectrum [d_T] (flexkd.data.directions_files)
    selected.json              per layer: k (per layer with k 'auto'), k_max, the energy share of
                               tr(G) the k directions hold and the share the top-k units by
                               importance would hold (the same comparison, in MLflow metrics and
                               on importance.png)

With ``student.init: prune_from_teacher`` the same backward also feeds a
:class:`~flexkd.pruning_scores.PruningScoreCollector` (importance of every block's output units,
MLP channels and key/value groups, and each block's change of the hidden state; sums all-reduced
like the importance), and rank 0 cuts the student out of the teacher:

    pruning/scores.safetensors  the collector's summed scores (residual [L, d], mlp [L, I],
                                attention [L, KV], block_change [L], examples, tokens); with
                                student.layer_selection 'perplexity' also skip_loss [L] (the
                                summed task loss with each block skipped, one more no-grad forward
                                per block and batch) and task_loss (with none skipped)
    pruning/selection.json      kept teacher blocks, kept residual units (ordered: student unit i
                                is teacher unit hidden_units[i]), target sizes, layer pairs (and
                                each block's loss increase when skipped, per row)
    pruned_student/             the pruned student, Hugging Face format: distill starts from it

The residual units are ranked by their importance summed over every block the student keeps
(each block's output is one row of the collector's ``residual``). With the default selection
'identity', selected.json pairs student unit i with teacher unit hidden_units[i] at every mapped
layer, so the feature loss holds each unit to the one it was cut from.

FSDP2 and the collector's hooks: the hooks sit on the blocks and on their ``o_proj`` and
``down_proj`` and read activations, never parameters, so a sharded teacher scores exactly like a
whole one (tests/test_pruning_distributed.py). Pruning itself slices every full weight of a plain
module, which a sharded teacher does not hold: with one worker the teacher is never sharded and is
pruned as it is; with several, rank 0 loads a plain copy after the scoring pass.
"""

from __future__ import annotations

import json
import logging
import math
from contextlib import nullcontext
from dataclasses import asdict
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import torch
from safetensors.torch import save_file

from flexkd import distributed
from flexkd.cluster.train_workers import every_row_batches, run_workers, split_every_row
from flexkd.config.schema import PipelineConfig
from flexkd.data.directions_files import distilled_ks, write_directions
from flexkd.data.rows import collate_batch
from flexkd.data.shards import read_shards
from flexkd.errors import StageError
from flexkd.method.directions import direction_energy_share, gradient_gram, top_directions, unit_energy_share
from flexkd.method.importance import finalize_importance, hidden_state_gradients, unit_importance_sum
from flexkd.method.layers import forward_with_hidden_states
from flexkd.method.objective import class_logits, summed_task_loss
from flexkd.method.selection import (
    activation_moments,
    select_random_units,
    select_top_k_units,
    select_variance_units,
    variance_from_moments,
)
from flexkd.models.plan import (
    PRUNED_STUDENT_DIR,
    PRUNING_SELECTION,
    load_pipeline_tokenizer,
    load_sharded_teacher,
    load_teacher,
    plan_models,
    prune_targets,
)
from flexkd.progress import Progress, progress_bars_wanted
from flexkd.prune.scores import PruningScoreCollector, skipped_block_loss_sums
from flexkd.prune.student import (
    BLOCK_SCORE_KEYS,
    hidden_units_by_importance,
    kept_layer_indices,
    prune_llama,
    pruned_student_layer_map,
)
from flexkd.tracking.plots import plot_importance

log = logging.getLogger("flexkd")

# The Gram of the task gradient is d_T x d_T float64 per scored layer (32 MB at 2,048 units). Up to
# this width it is summed for every selection, so each user sees how much energy the chosen units
# keep against as many directions; above it, only with selection.method directions, which needs it.
GRAM_DIAGNOSTICS_MAX_WIDTH = 2048

# A classification teacher whose accuracy on its scoring rows is below chance plus this margin is
# warned about (teacher.require_competent: refused): it does not know the task.
CHANCE_MARGIN = 0.05


def run(config: PipelineConfig, inputs: dict[str, Path], output_dir: Path) -> dict[str, Any]:
    plan = plan_models(config)
    prune = config.student.init == "prune_from_teacher"
    # Blocks chosen by their scores are not known yet: score every block's output, keep the mapped.
    layers = list(range(1, plan.teacher_layers + 1)) if plan.layer_pairs is None else plan.teacher_layer_indices
    tokenized = json.loads((inputs["tokenize"] / "manifest.json").read_text())
    raw_dir = output_dir / "raw"
    run_workers(
        "score",
        config,
        _score_worker,
        loop_config={
            "config": config,
            "layers": layers,
            "raw_dir": str(raw_dir),
            "output_dir": str(output_dir),
            "prune": prune,
            "skip_loss": config.student.layer_selection == "perplexity",  # only a pruned student's
            "gram": config.selection.method == "directions" or plan.teacher_hidden <= GRAM_DIAGNOSTICS_MAX_WIDTH,
            "pad_token_id": tokenized["outputs"]["pad_token_id"],
            "verbalizer_ids": tokenized["outputs"]["verbalizer_ids"],
            "rows": tokenized["outputs"]["rows"]["score"],
            "progress_bars": progress_bars_wanted(),
        },
        datasets=split_every_row(
            "score",
            read_shards(inputs["tokenize"] / "score"),
            tokenized["outputs"]["rows"]["score"],
            config.resources.num_workers,
        ),
        run_name="score",
        storage=output_dir / "ray",
    )
    sums = torch.load(raw_dir / "sums.pt", weights_only=True)
    competence = check_teacher_competence(config, sums["competence"], sums["examples"])
    hidden_units = None
    if prune:  # now the kept blocks, and so the layer pairs, are known
        plan = plan_models(config, output_dir)
        hidden_units = json.loads((output_dir / PRUNING_SELECTION).read_text())["hidden_units"]
    if config.selection.method == "directions":
        selected, directions = _select_directions(
            config, plan.k, plan.teacher_hidden, sums, plan.teacher_layer_indices, tokenized["fingerprint"]
        )
        for layer, (basis, spectrum) in directions.items():
            write_directions(output_dir, layer, basis, spectrum)
    else:
        selected = _select(
            config,
            plan.k,
            plan.teacher_hidden,
            sums,
            plan.teacher_layer_indices,
            hidden_units,
            data_fingerprint=tokenized["fingerprint"],
        )
        directions = _unit_energy_diagnostics(selected, sums, plan.k)
    chosen = {  # the energy numbers, for the plot, MLflow and the runner's summary
        layer: {key: selected["layers"][str(layer)][key] for key in ("k", "energy_directions", "energy_units")}
        for layer in directions
    }

    importance_dir = output_dir / "importance"
    importance_dir.mkdir(exist_ok=True)
    importance = {}
    for layer in plan.teacher_layer_indices:
        importance[layer] = finalize_importance(sums["importance"][layer], sums["examples"]).numpy()
        np.save(importance_dir / f"layer_{layer}.npy", importance[layer].astype(np.float32))
    (output_dir / "selected.json").write_text(json.dumps(selected, indent=2))
    spectra = {layer: spectrum.numpy() for layer, (_, spectrum) in directions.items()}
    plot_importance(importance, plan.k, output_dir / "importance.png", spectra, chosen)

    mlflow.log_artifacts(str(importance_dir), "importance")
    mlflow.log_artifact(str(output_dir / "importance.png"))
    mlflow.log_artifact(str(output_dir / "selected.json"))
    mlflow.log_metrics({"examples": float(sums["examples"]), "k": float(plan.k)})
    if config.selection.method == "directions":
        mlflow.log_artifacts(str(output_dir / "directions"), "directions")
    if chosen:
        mlflow.log_metrics(
            {
                f"directions.layer_{layer}.{key}": float(value)
                for layer, row in chosen.items()
                for key, value in row.items()
            }
        )
    mlflow.set_tag("flexkd.student.init", config.student.init)
    outputs = {
        "examples": int(sums["examples"]),
        "k": plan.k,
        "layers": plan.teacher_layer_indices,
        "selection": config.selection.method,
        "score": config.scoring.score,
        "student_init": config.student.init,
        "teacher": competence,
    }
    if chosen:
        outputs["directions"] = {str(layer): row for layer, row in chosen.items()}
    if prune:
        mlflow.log_artifacts(str(output_dir / PRUNING_SELECTION.parent), "pruning")
        kept = json.loads((output_dir / PRUNING_SELECTION).read_text())["kept_layers"]
        outputs |= {
            "pruned_student_dir": str(output_dir / PRUNED_STUDENT_DIR),
            "kept_layers": kept,
            "layer_pairs": [list(pair) for pair in plan.layer_pairs],
        }
    return outputs


def check_teacher_competence(config: PipelineConfig, sums: torch.Tensor, examples: int) -> dict[str, Any]:
    """The teacher on its scoring rows, from the worker's sums [summed task loss, correct rows]:
    accuracy and loss (classification) or loss and perplexity (generation), logged to MLflow as
    ``teacher.<metric>``. A classification teacher within CHANCE_MARGIN of chance, or below
    ``teacher.min_accuracy``, gets one warning line and the tag ``flexkd.teacher_warning`` (on this
    run and the pipeline's), or, with ``teacher.require_competent``, stops the stage."""
    loss = float(sums[0]) / max(examples, 1)
    if config.task.kind == "generation":
        metrics = {"loss": loss, "perplexity": math.exp(min(loss, 700.0))}
    else:
        metrics = {"accuracy": float(sums[1]) / max(examples, 1), "loss": loss}
    metrics = {name: round(value, 6) for name, value in metrics.items()}
    mlflow.log_metrics({f"teacher.{name}": value for name, value in metrics.items()})
    warning = competence_warning(
        metrics.get("accuracy"), len(config.task.label_names or []), config.teacher.min_accuracy, examples
    )
    if warning is None:
        return metrics
    if config.teacher.require_competent:
        raise StageError(f"score: {warning} (teacher.require_competent)")
    log.warning("score: %s", warning)
    mlflow.set_tag("flexkd.teacher_warning", warning)
    parent = mlflow.active_run().data.tags.get("mlflow.parentRunId")
    if parent:
        mlflow.MlflowClient().set_tag(parent, "flexkd.teacher_warning", warning)
    return metrics | {"warning": warning}


def competence_warning(accuracy: float | None, classes: int, min_accuracy: float | None, rows: int) -> str | None:
    """One line saying the teacher does not know the task, or None: its accuracy is within
    CHANCE_MARGIN of chance (1/classes) or below ``min_accuracy``."""
    if accuracy is None:
        return None
    advice = "its task gradients say little about which units matter; fine-tune it first with teacher.adapt"
    chance = 1 / classes
    if min_accuracy is not None and accuracy < min_accuracy:
        return (
            f"the teacher's accuracy on its {rows} scoring rows is {accuracy:.3f}, below teacher.min_accuracy "
            f"{min_accuracy:g}: {advice}"
        )
    if accuracy < chance + CHANCE_MARGIN:
        return (
            f"the teacher's accuracy on its {rows} scoring rows is {accuracy:.3f}, within {CHANCE_MARGIN:g} of "
            f"chance ({chance:.3f} for {classes} classes): {advice}"
        )
    return None


def _select(
    config: PipelineConfig,
    k: int,
    d_teacher: int,
    sums: dict,
    layers_mapped: list[int],
    hidden_units: list[int] | None,
    data_fingerprint: str,
) -> dict:
    """Ordered unit indices per mapped teacher layer, for the configured selection method."""
    layers = {}
    for layer in layers_mapped:
        unit_sum, method = sums["importance"][layer], config.selection.method
        if method == "identity":  # student unit i is the teacher unit it was cut from
            indices = torch.tensor(hidden_units[:k])
        elif method == "importance":
            indices = select_top_k_units(finalize_importance(unit_sum, sums["examples"]), k)
        elif method == "random":
            indices = select_random_units(d_teacher, k, seed=config.selection.seed + layer)
        else:
            moments = sums["moments"][layer]
            indices = select_variance_units(variance_from_moments(*moments), k)
        layers[str(layer)] = {
            "indices": indices.tolist(),
            "k": k,
            "method": method,
            "score": config.scoring.score,
            "d_teacher": d_teacher,
        }
    return {"layers": layers, "examples": int(sums["examples"]), "data_fingerprint": data_fingerprint}


def _unit_energy_diagnostics(selected: dict, sums: dict, k: int) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """For a unit selection, how much of the task gradient's energy tr(G) the chosen units keep,
    beside what as many top directions would keep; recorded in ``selected`` in place. Returns the
    layers' (basis, spectrum) for the plot; none where G was not summed (a wide teacher)."""
    found = {}
    for layer, entry in selected["layers"].items():
        gram = sums["gram"].get(int(layer))
        if gram is None:
            continue
        basis, spectrum = top_directions(gram, k)
        entry["energy_units"] = round(unit_energy_share(gram, torch.tensor(entry["indices"])), 6)
        entry["energy_directions"] = round(direction_energy_share(spectrum, entry["k"]), 6)
        found[int(layer)] = (basis, spectrum)
    return found


def _select_directions(
    config: PipelineConfig, k: int, d_teacher: int, sums: dict, layers_mapped: list[int], data_fingerprint: str
) -> tuple[dict, dict[int, tuple[torch.Tensor, torch.Tensor]]]:
    """Per mapped teacher layer, the task gradient's top-k directions ([d_T, k] basis and [d_T]
    spectrum), and the selected.json that records them beside the units importance would pick."""
    layers, directions = {}, {}
    for layer in layers_mapped:
        gram = sums["gram"][layer]
        basis, spectrum = top_directions(gram, k)
        layer_k = distilled_ks(config.selection, k, {layer: spectrum})[layer]
        units = select_top_k_units(finalize_importance(sums["importance"][layer], sums["examples"]), layer_k)
        directions[layer] = (basis, spectrum)
        layers[str(layer)] = {
            "k": layer_k,
            "k_max": k,
            "method": "directions",
            "energy": config.selection.energy if config.selection.k == "auto" else None,
            "energy_directions": round(direction_energy_share(spectrum, layer_k), 6),
            "energy_units": round(unit_energy_share(gram, units), 6),
            "units_by_importance": units.tolist(),
            "score": config.scoring.score,
            "d_teacher": d_teacher,
        }
    return {"layers": layers, "examples": int(sums["examples"]), "data_fingerprint": data_fingerprint}, directions


def _score_worker(loop_config: dict[str, Any]) -> None:
    """One Ray Train worker: accumulate importance sums over this worker's data shard."""
    config: PipelineConfig = loop_config["config"]
    layers: list[int] = loop_config["layers"]
    distributed.use_threads(config.resources.threads_per_worker)
    device = distributed.device()
    # Activation checkpointing would rerun the forward hooks of the pruning collector in the backward.
    checkpointed = config.training.activation_checkpointing and not loop_config["prune"]
    teacher = load_sharded_teacher(config, device, activation_checkpointing=checkpointed)
    verbalizer_ids = loop_config["verbalizer_ids"]
    verbalizer_ids = torch.tensor(verbalizer_ids, device=device) if verbalizer_ids else None
    collector = PruningScoreCollector(teacher) if loop_config["prune"] else None

    def task_loss(logits: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return summed_task_loss(config.task.kind, logits, batch, verbalizer_ids)

    # student.layer_selection 'perplexity': the summed task loss with each block skipped in turn.
    skip_loss = torch.zeros(teacher.config.num_hidden_layers, dtype=torch.float64, device=device)

    d_teacher = teacher.config.hidden_size
    importance = {layer: torch.zeros(d_teacher, dtype=torch.float32, device=device) for layer in layers}
    moments = {
        layer: [
            torch.zeros(d_teacher, dtype=torch.float64, device=device),
            torch.zeros(d_teacher, dtype=torch.float64, device=device),
            torch.zeros((), dtype=torch.float64, device=device),
        ]
        for layer in layers
    }
    # Float64: G sums squares of many tokens' gradients, and its eigenvalues span many decades.
    grams = {
        layer: torch.zeros(d_teacher, d_teacher, dtype=torch.float64, device=device)
        for layer in (layers if loop_config["gram"] else [])
    }
    examples = torch.zeros((), dtype=torch.float64, device=device)
    # The teacher's own competence on these rows: summed task loss and (classification) correct rows.
    competence = torch.zeros(2, dtype=torch.float64, device=device)

    batches = every_row_batches("score", config.scoring.batch_size)
    last_rows = None
    progress = (
        Progress("score", loop_config["rows"], terminal=loop_config["progress_bars"])
        if distributed.is_main_process()
        else None
    )
    with collector or nullcontext():
        for rows, step_rows in _lockstep(batches):
            # A rank whose shard ran out still runs the forward and backward (FSDP2 all-gathers
            # are collective) on its last batch, and adds nothing.
            weight = 0.0 if rows is None else 1.0
            rows = last_rows if rows is None else rows
            if rows is None:
                raise RuntimeError("a scoring worker got no data: use at most as many workers as scoring rows")
            last_rows = rows
            batch = {key: value.to(device) for key, value in collate_batch(rows, loop_config["pad_token_id"]).items()}
            logits, hidden = forward_with_hidden_states(teacher, batch["input_ids"], batch["attention_mask"], layers)
            loss = task_loss(logits, batch)
            # One backward serves both: the collector's activations are asked for with the hidden states.
            pruning_activations = collector.activations() if collector is not None else []
            gradients = hidden_state_gradients(loss, [hidden[layer] for layer in layers] + pruning_activations)
            if weight:
                competence[0] += float(loss.detach())
                if verbalizer_ids is not None:
                    predicted = class_logits(logits.detach(), batch["attention_mask"], verbalizer_ids).argmax(dim=-1)
                    competence[1] += float((predicted == batch["class_label"]).sum())
                for layer, gradient in zip(layers, gradients):
                    importance[layer] += unit_importance_sum(
                        gradient, hidden[layer].detach(), batch["attention_mask"], config.scoring.score
                    )
                    for total, part in zip(
                        moments[layer], activation_moments(hidden[layer].detach(), batch["attention_mask"])
                    ):
                        total += part.to(total.dtype)
                    if layer in grams:
                        grams[layer] += gradient_gram(gradient, batch["attention_mask"])
                if collector is not None:
                    collector.accumulate(batch["attention_mask"])
                examples += batch["input_ids"].shape[0]
            if loop_config["skip_loss"]:
                # Every rank, its shard run out or not, runs them (each block's all-gather is
                # collective), after the step's graph is freed: its logits and states stay out of the peak.
                del logits, hidden, gradients, loss, pruning_activations
                with collector.paused():  # the collector scores the whole teacher, not these forwards
                    skip_loss += weight * skipped_block_loss_sums(teacher, batch, task_loss).to(device)
            if progress is not None:  # the step's work is done, on every rank
                progress.update(step_rows)
    if progress is not None:
        progress.close()

    pruning_sums = [*collector.sums.values(), skip_loss] if collector is not None else []
    moment_sums = [m for parts in moments.values() for m in parts]
    for tensor in [examples, competence, *importance.values(), *moment_sums, *grams.values(), *pruning_sums]:
        distributed.all_reduce_sum_(tensor)
    if distributed.is_main_process():
        raw_dir = Path(loop_config["raw_dir"])
        raw_dir.mkdir(parents=True, exist_ok=True)
        torch.save(
            {
                "examples": int(examples.item()),
                "competence": competence.cpu(),
                "importance": {layer: value.cpu() for layer, value in importance.items()},
                "moments": {layer: [m.cpu() for m in parts] for layer, parts in moments.items()},
                "gram": {layer: value.cpu() for layer, value in grams.items()},
            },
            raw_dir / "sums.pt",
        )
        if collector is not None:
            if distributed.world_size() > 1:  # a sharded teacher holds 1/N of each weight: prune a whole one
                del teacher
                teacher = load_teacher(config)
            scores = collector.state()
            if loop_config["skip_loss"]:
                scores |= {"skip_loss": skip_loss.cpu(), "task_loss": competence[0].cpu()}
            _prune_student(config, teacher, scores, Path(loop_config["output_dir"]))


def _prune_student(config: PipelineConfig, teacher, scores: dict[str, torch.Tensor], output_dir: Path) -> None:
    """Choose what the student keeps, cut it out of ``teacher`` and write it with its scores."""
    teacher_config = teacher.config
    targets = prune_targets(config, teacher_config)
    block_key = BLOCK_SCORE_KEYS.get(targets.layer_selection)
    kept = kept_layer_indices(
        teacher_config.num_hidden_layers,
        targets.num_layers,
        targets.layer_selection,
        scores[block_key] if block_key is not None else None,
    )
    if config.layer_map == "source":
        pairs = pruned_student_layer_map(kept)
    else:
        pairs = plan_models(config).layer_pairs
    # Every block the student keeps reads and writes the one residual stream, so its units are
    # ranked at all of them, whatever the feature loss maps. Ranked at the last block alone (as
    # layer_map 'last' once did), a 504-wide, 30-block cut of SmolLM2 starts at a perplexity of 80.5
    # on 60 SAMSum references, against 59.6 (benchmarks/results/prune_shapes.md).
    hidden_units = hidden_units_by_importance({block: scores["residual"][block] for block in kept}, targets.hidden_size)
    student = prune_llama(teacher, hidden_units, targets, scores)
    student.save_pretrained(output_dir / PRUNED_STUDENT_DIR, safe_serialization=True)
    load_pipeline_tokenizer(config).save_pretrained(output_dir / PRUNED_STUDENT_DIR)

    pruning_dir = output_dir / PRUNING_SELECTION.parent
    pruning_dir.mkdir(parents=True, exist_ok=True)
    save_file({name: value.contiguous() for name, value in scores.items()}, pruning_dir / "scores.safetensors")
    selection = {
        "kept_layers": kept,
        "hidden_units": hidden_units.tolist(),
        "layer_pairs": [list(pair) for pair in pairs],
        "layer_selection": targets.layer_selection,
        "targets": asdict(targets),
        "examples": int(scores["examples"]),
        "tokens": int(scores["tokens"]),
    }
    if "skip_loss" in scores:  # what each block is worth, per scoring row, for the MLflow artifact
        increase = (scores["skip_loss"] - scores["task_loss"]) / scores["examples"]
        selection["loss_increase_when_skipped"] = [round(float(value), 5) for value in increase]
    (output_dir / PRUNING_SELECTION).write_text(json.dumps(selection, indent=1))


def _lockstep(batches):
    """Yield this rank's batches, then None until every rank has run out, so all ranks take
    the same number of collective steps; each with the rows all ranks' batches of this step hold."""
    iterator = iter(batches)
    while True:
        rows = next(iterator, None)
        # [ranks still running, rows of this step], summed over the ranks in one all-reduce
        counts = [0.0, 0.0] if rows is None else [1.0, float(len(rows["input_ids"]))]
        step = torch.tensor(counts, dtype=torch.float64, device=distributed.device())
        distributed.all_reduce_sum_(step)
        if step[0].item() == 0:
            return
        yield rows, int(step[1].item())
