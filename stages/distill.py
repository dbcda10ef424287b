"""distill: train the student on the Flex-KD objective.

Ray Train workers hold the student (FSDP2-sharded, trainable). The teacher's side of each step
comes from one of two places (``training.teacher``):

    online   the teacher, sharded, frozen, no grad: a forward for logits and hidden states, then
             the selected units of each mapped layer (selection.method directions: the
             coordinates on its first k directions, U_k^T h)
    cache    the targets stage's rows (flexkd.teacher_targets): the cached units [..., :k] and
             the class logits or top-K logits; the teacher is never loaded

With selection.method directions and k 'auto', k differs per layer: each layer pair distills the
k its layer's spectrum gives (flexkd.data.directions_files.distilled_ks), into the student's first k units.

Every step: student forward, and

    L = alpha * task + beta * logit KD + gamma * sum over layer pairs of the feature loss.

With ``data.transfer`` every batch also holds unlabeled rows, as many as their share of all rows
(at least one row of each kind): the logit and feature losses read every row, the task loss only
the labeled ones. ``training.shuffle_buffer`` draws each epoch's batches from a seeded local
shuffle (Ray Data's) instead of the stored order.

Checkpoints (torch.distributed.checkpoint) go to ``checkpoints/step_*``; a restarted worker
group, or a rerun after the driver died, continues from the newest complete one. A Tune trial
(flexkd.tune) also evaluates the student every ``eval_every`` steps and reports the metrics.
Outputs:

    student/        the distilled student, Hugging Face format (safetensors, config, tokenizer)
    metrics.json    final loss parts, tokens/s (steady state, see the loop), steps, parameter counts,
                    and on a CPU where a step's time goes (``ms_per_step``, see StepProfile)
"""

from __future__ import annotations

import json
import logging
import math
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from itertools import count
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import ray
import torch

from flexkd import distributed
from flexkd.cluster.train_workers import run_workers
from flexkd.config.schema import ConfigError, PipelineConfig
from flexkd.data.directions_files import distilled_ks, read_directions
from flexkd.data.rows import ROW_SCHEMA, TRANSFER_SPLIT, collate_batch
from flexkd.data.shards import read_shards
from flexkd.data.splits import transfer_rows_per_batch
from flexkd.data.teacher_targets import cached_teacher_outputs, online_teacher_outputs, units_column
from flexkd.evaluation.periodic import StudentEvaluator
from flexkd.method.objective import LayerPair, ObjectiveSettings, StudentWithObjective, objective_module
from flexkd.method.on_policy import is_on_policy_step, sample_on_policy_batch
from flexkd.models.loading import parameter_count
from flexkd.models.plan import build_student, load_pipeline_tokenizer, load_sharded_teacher, plan_models
from flexkd.progress import Progress, progress_bars_wanted
from flexkd.stages.targets import check_cache
from flexkd.testing import faults
from flexkd.tracking.runs import WorkerMetricLogger, tracking_uri

log = logging.getLogger("flexkd")

KEEP_CHECKPOINTS = 2

# The phases of a training step, in order; the speed benchmark's plain loop times the same ones.
STEP_PHASES = ("batch", "teacher_targets", "student_forward", "loss", "backward", "optimizer")


class StepProfile:
    """Where a training step's time goes: wall-clock laps between the phases of STEP_PHASES, summed
    over the counted steps (the steady state: a run's first step is not counted, as for tokens/s).

    Always on: a lap is one ``time.perf_counter()`` call and a dict update (about a microsecond a
    step, against steps of milliseconds). On a CPU a phase ends when its Python call returns. On a
    GPU kernels run asynchronously, so a lap times their launch only, and a synchronize per phase
    would slow the very step it measures: there is no profile there (``ms_per_step`` is None).
    """

    def __init__(self, device: torch.device):
        self.device = device
        self.seconds = dict.fromkeys(STEP_PHASES, 0.0)  # per phase, over the counted steps
        self.steps = 0
        self._step = dict.fromkeys(STEP_PHASES, 0.0)
        self._mark = 0.0

    def start(self) -> float:
        """A step begins; returns its start (a ``time.perf_counter()`` reading)."""
        self._step = dict.fromkeys(STEP_PHASES, 0.0)
        self._mark = time.perf_counter()
        return self._mark

    def lap(self, phase: str) -> None:
        """``phase`` ends now: the time since the last lap (or the step's start) is its."""
        now = time.perf_counter()
        self._step[phase] += now - self._mark
        self._mark = now

    def count(self) -> None:
        """Add this step's laps to the profile."""
        for phase, seconds in self._step.items():
            self.seconds[phase] += seconds
        self.steps += 1

    def ms_per_step(self) -> dict[str, float] | None:
        """Milliseconds per counted step, by phase (they add up to the step); None on a GPU or
        before any step was counted."""
        if self.device.type != "cpu" or not self.steps:
            return None
        return {phase: round(1000 * seconds / self.steps, 2) for phase, seconds in self.seconds.items()}


@dataclass(frozen=True)
class CachedTargets:
    """How a step reads its teacher side from the teacher-target cache (training.teacher 'cache')."""

    units: dict[int, int]  # teacher layer -> units the cache stores per token
    top_k: int  # generation: teacher logits stored per response position
    temperatures: list[float]  # those of the stored log-normalizers
    positions: dict[int, list[int]] | None  # see _stored_positions


@dataclass(frozen=True)
class DistillLoop:
    """Everything the worker loop needs, made on the driver; Ray Train hands it to every worker.

    ``settings`` carries the feature loss itself (not its name), so a worker never looks a loss up
    in its own process's registry.
    """

    config: PipelineConfig
    settings: ObjectiveSettings
    pairs: list[LayerPair]
    d_teacher: int
    output_dir: Path
    score_dir: Path | None  # a pruned student starts from the weights the score stage cut out of the teacher
    eval_dir: Path
    pad_token_id: int
    eos_token_id: int | None  # training.on_policy: where a sampled response ends
    verbalizer_ids: list[int] | None
    tracking_uri: str | None
    run_id: str | None
    eval_every: int | None
    placement_group_file: Path | None
    progress_bars: bool
    cache: CachedTargets | None  # training.teacher 'cache'
    # training.teacher 'online': teacher layer -> selected unit indices, or (selection.method directions)
    # the [d_T, k] basis the step projects onto
    selected: dict[int, list[int] | torch.Tensor] | None
    transfer_split: tuple[int, int] | None  # data.transfer: (labeled rows, unlabeled rows)


def run(config: PipelineConfig, inputs: dict[str, Path], output_dir: Path) -> dict[str, Any]:

    metrics = train_student(config, inputs, output_dir, tracking_run_id=mlflow.active_run().info.run_id)
    mlflow.log_metrics({f"final.{key}": value for key, value in metrics.items() if isinstance(value, (int, float))})
    mlflow.log_metrics({f"profile.{phase}_ms": ms for phase, ms in metrics.get("ms_per_step", {}).items()})
    return {**metrics, "student_dir": str(output_dir / "student"), "student_init": config.student.init}


def train_student(
    config: PipelineConfig,
    inputs: dict[str, Path],
    output_dir: Path,
    *,
    tracking_run_id: str | None = None,
    eval_every: int | None = None,
    callbacks: list | None = None,
    run_name: str = "distill",
    train_data: ray.data.Dataset | None = None,
    placement_group_file: Path | None = None,
) -> dict[str, Any]:
    """Distill on Ray Train workers into ``output_dir``; returns metrics.json.

    ``eval_every`` adds student metrics on the eval split (``eval.<metric>``) every that many
    steps, and only those steps are reported to Ray (what Tune's schedulers read).
    ``train_data``: the training rows (or cache rows) already read, e.g. materialized once for
    all the trials of a sweep; by default they are read from ``inputs``. ``placement_group_file``
    gets the id of the workers' placement group, so whoever kills this run can free it.
    """
    plan = plan_models(config, inputs.get("score") if config.student.init == "prune_from_teacher" else None)
    tokenized = json.loads((inputs["tokenize"] / "manifest.json").read_text())["outputs"]
    cache, selected_units = None, None
    layer_k: dict[int, int] = {}
    directions = {}
    if config.selection.method == "directions":  # a cache keeps a copy of the directions it was made with
        source = inputs["targets"] if config.training.teacher == "cache" else inputs["score"]
        directions = read_directions(source, plan.teacher_layer_indices)
        layer_k = distilled_ks(config.selection, plan.k, {layer: d["spectrum"] for layer, d in directions.items()})
    if config.training.teacher == "cache":
        data_fingerprint = json.loads((inputs["tokenize"] / "manifest.json").read_text())["fingerprint"]
        info = check_cache(config, inputs["targets"], plan.k, plan.teacher_layer_indices, data_fingerprint, "distill")
        units = {layer: info["units"][str(layer)] for layer in plan.teacher_layer_indices}
        # A sweep over a given cache (targets.path) has no score stage: the cache's order is the selection.
        selected = json.loads((inputs["score"] / "selected.json").read_text())["layers"] if "score" in inputs else None
        cache = CachedTargets(
            units=units,
            top_k=info["top_k_logits"],
            temperatures=info["temperatures"],
            positions=_stored_positions(config, info, selected, plan.k, units),
        )
        if config.task.kind == "generation" and config.loss.temperature not in info["temperatures"]:
            log.warning(
                "distill: loss.temperature %s is not one of the cache's exact temperatures %s: the teacher's "
                "rest-mass normalizer is approximated",
                config.loss.temperature,
                info["temperatures"],
            )
        unit_columns = [units_column(layer) for layer in units] if config.loss.uses_features else []
        columns = [*ROW_SCHEMA.names, *unit_columns, *_cache_logit_columns(config.task.kind)]
        rows_dir = inputs["targets"]
    else:
        if directions:  # [d_T, k] per layer: the step projects onto them
            selected_units = {layer: d["basis"][:, : layer_k[layer]] for layer, d in directions.items()}
        else:
            selected = json.loads((inputs["score"] / "selected.json").read_text())
            selected_units = {int(layer): entry["indices"] for layer, entry in selected["layers"].items()}
        columns, rows_dir = None, inputs["tokenize"]
    train = training_rows(rows_dir / "train", columns, train_data)
    datasets = {"train": train}
    transfer_split = None
    if config.data.transfer is not None:
        # Unlabeled rows: every batch holds their share of all rows (transfer_rows_per_batch).
        datasets[TRANSFER_SPLIT] = read_shards(rows_dir / TRANSFER_SPLIT, columns)
        transfer_split = (tokenized["rows"]["train"], tokenized["rows"][TRANSFER_SPLIT])
        # A batch too small for both kinds of rows is refused here, not in a worker.
        transfer_rows_per_batch(config.training.batch_size, *transfer_split, config.resources.num_workers)
    loop = DistillLoop(
        config=config,
        settings=config.loss.objective_settings(config.task.kind, plan.k),
        pairs=[LayerPair(teacher, student, layer_k.get(teacher)) for teacher, student in plan.layer_pairs],
        d_teacher=plan.teacher_hidden,
        output_dir=output_dir,
        score_dir=inputs.get("score"),
        eval_dir=inputs["tokenize"] / "eval",
        pad_token_id=tokenized["pad_token_id"],
        eos_token_id=load_pipeline_tokenizer(config).eos_token_id if config.training.on_policy else None,
        verbalizer_ids=tokenized["verbalizer_ids"],
        tracking_uri=tracking_uri(config) if tracking_run_id else None,
        run_id=tracking_run_id,
        eval_every=eval_every,
        placement_group_file=placement_group_file,
        progress_bars=progress_bars_wanted(),
        cache=cache,
        selected=selected_units,
        transfer_split=transfer_split,
    )
    run_workers(
        "distill",
        config,
        _distill_worker,
        # Ray Train wants a dict; its one entry is the typed loop.
        loop_config={"loop": loop},
        datasets=datasets,
        run_name=run_name,
        storage=output_dir / "ray",
        max_failures=config.training.max_failures,
        callbacks=callbacks,
    )
    return json.loads((output_dir / "metrics.json").read_text())


def _stored_positions(
    config: PipelineConfig, info: dict[str, Any], selected: dict[str, Any] | None, k: int, units: dict[int, int]
) -> dict[int, list[int]] | None:
    """Which stored cache units a step reads, per layer, in the order the loss pairs them; None:
    the first k (the cache was built for this selection).

    The whole-hidden baselines read every unit in index order. A full-width cache built for
    another selection (say importance) serves this one (random, variance) too: the step reads
    this selection's units wherever the cache stored them, so one teacher pass serves all.
    """
    if info.get("directions"):  # coordinates on the directions, in order: the first k are the k directions
        return None
    inverse = {layer: np.argsort(info["unit_order"][str(layer)]) for layer in units}
    if config.loss.reads_whole_hidden:
        return {layer: order.tolist() for layer, order in inverse.items()}
    if selected is None:
        return None
    wanted = {layer: selected[str(layer)]["indices"][:k] for layer in units}
    if all(info["unit_order"][str(layer)][:k] == wanted[layer] for layer in units):
        return None
    if not info["full_width"]:
        raise ConfigError(
            f"distill: the teacher-target cache stores other units than selection "
            f"'{config.selection.method}' picks, and not all of them (targets.full_width)"
        )
    return {layer: inverse[layer][wanted[layer]].tolist() for layer in units}


def _cache_logit_columns(task: str) -> tuple[str, ...]:
    if task == "classification":
        return ("teacher_class_logits",)
    return ("teacher_topk_logits", "teacher_topk_ids", "teacher_logsumexp")


def learning_rate_at(step: int, config: PipelineConfig) -> float:
    """Linear warmup, then cosine decay to a tenth of the peak."""
    training = config.training
    if step < training.warmup_steps:
        return training.learning_rate * (step + 1) / training.warmup_steps
    progress = (step - training.warmup_steps) / max(1, training.steps - training.warmup_steps)
    return training.learning_rate * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0))))


def training_rows(directory: Path, columns: list[str] | None, rows: ray.data.Dataset | None = None) -> ray.data.Dataset:
    """The training rows of ``directory`` with only ``columns`` (None: all). ``rows``: those rows
    already read with every column (a sweep reads them once for all its trials), narrowed here to
    the columns this run reads, as its transfer rows are: a batch joins both kinds of row."""
    if rows is None:
        return read_shards(directory, columns)
    return rows if columns is None else rows.select_columns(columns)


def joined_batch(first: dict[str, Any], second: dict[str, Any]) -> dict[str, list]:
    """Two numpy batches of the same columns as one (rows of ``first``, then of ``second``); as
    lists of rows, since a list column may come as a 2-D array in one and ragged in the other."""
    if first.keys() != second.keys():
        raise ValueError(f"joined_batch: columns {sorted(first)} and {sorted(second)} differ")
    return {name: [*first[name], *second[name]] for name in first}


def _endless_batches(
    shard, batch_size: int, skip: int, shuffle_buffer: int = 0, seed: int = 0
) -> Iterator[dict[str, np.ndarray]]:
    """Epoch after epoch over this worker's shard; the first ``skip`` batches are passed over
    so a resumed run sees the batches it would have seen. ``shuffle_buffer`` > 0: each epoch's
    rows are shuffled within consecutive windows of that many rows by a generator seeded by
    (seed, epoch), so a rerun (and a resumed run) sees the same order. Ray Data's own local
    shuffle is not used: its order depends on which block arrives first."""
    seen = 0
    for epoch in count():
        seen_before = seen
        rows = iter(shard.iter_batches(batch_size=batch_size, batch_format="numpy", drop_last=True))
        if shuffle_buffer:
            generator = np.random.default_rng(np.random.SeedSequence([seed, epoch]))
            rows = _window_shuffled(rows, batch_size, shuffle_buffer, generator)
        for batch in rows:
            seen += 1
            if seen > skip:
                yield batch
        if seen == seen_before:  # another pass would yield nothing either: fail, do not spin
            raise ValueError(
                f"distill: this worker's data shard holds fewer than one batch of {batch_size} rows; "
                "use more training rows, a smaller training.batch_size or fewer workers"
            )


def _window_shuffled(
    batches: Iterator[dict[str, np.ndarray]], batch_size: int, window: int, generator: np.random.Generator
) -> Iterator[dict[str, np.ndarray]]:
    """The rows of ``batches`` regrouped into batches of ``batch_size``, permuted within windows of
    at least ``window`` rows (whole batches); a last short batch is dropped, as drop_last does."""
    pending: list[dict[str, np.ndarray]] = []
    ended = False
    while not ended:
        while sum(len(next(iter(b.values()))) for b in pending) < window:
            try:
                pending.append(next(batches))
            except StopIteration:
                ended = True
                break
        if not pending:
            return
        joined = {name: np.concatenate([b[name] for b in pending]) for name in pending[0]}
        order = generator.permutation(len(next(iter(joined.values()))))
        pending = []
        for start in range(0, len(order) - batch_size + 1, batch_size):
            picked = order[start : start + batch_size]
            yield {name: column[picked] for name, column in joined.items()}


def _build(loop: DistillLoop) -> torch.nn.Module:
    """The student with its objective, on this worker's device, sharded."""
    torch.manual_seed(loop.config.training.seed)
    student = build_student(loop.config, loop.score_dir)
    verbalizer_ids = torch.tensor(loop.verbalizer_ids) if loop.verbalizer_ids else None
    module = objective_module(student, loop.settings, loop.pairs, verbalizer_ids, loop.d_teacher)
    if loop.config.training.activation_checkpointing:
        distributed.checkpoint_activations(module)
    return distributed.shard_model(
        module.to(distributed.device()),
        trainable=True,
        mixed_precision=distributed.BF16_MIXED_PRECISION if loop.config.training.precision == "bf16" else None,
        full_precision=list(module.feature_modules.values()),
    )


def _teacher_outputs(loop: DistillLoop, device: torch.device):
    """The step's teacher side, ``(rows, batch) -> (teacher logits, teacher features)``: read from
    the cache, or computed by a teacher loaded (and sharded) here."""
    config, cache = loop.config, loop.cache
    if cache is not None:
        positions = (
            {layer: torch.tensor(order) for layer, order in cache.positions.items()}
            if cache.positions is not None
            else None
        )
        # Without a feature loss (kd) no cached unit is read: decoding them would be wasted work.
        units = cache.units if config.loss.uses_features else {}
        return lambda rows, batch: cached_teacher_outputs(
            rows,
            batch,
            config.task.kind,
            units,
            loop.settings.k,
            positions,
            cache.top_k,
            device,
            cache.temperatures,
            config.loss.temperature,
        )
    teacher = load_sharded_teacher(config, device)
    selected = {layer: torch.as_tensor(value, device=device) for layer, value in loop.selected.items()}
    layers = sorted({pair.teacher_layer for pair in loop.pairs})
    whole_hidden = loop.settings.feature is not None and loop.settings.feature.whole_hidden
    return lambda rows, batch: online_teacher_outputs(teacher, batch, config.task.kind, layers, selected, whole_hidden)


def _distill_worker(loop_config: dict[str, DistillLoop]) -> None:
    loop = loop_config["loop"]
    config = loop.config
    distributed.use_threads(config.resources.threads_per_worker)
    device = distributed.device()
    placement_group = ray.util.get_current_placement_group()
    if loop.placement_group_file and placement_group and distributed.is_main_process():
        loop.placement_group_file.write_text(placement_group.id.hex())
    module = _build(loop)
    checkpoints = loop.output_dir / "checkpoints"
    optimizer = torch.optim.AdamW(
        module.parameters(), lr=config.training.learning_rate, weight_decay=config.training.weight_decay
    )
    start_step = 0
    latest = distributed.latest_checkpoint(checkpoints)
    if latest is not None:
        start_step = distributed.load_checkpoint(latest, module, optimizer)["step"]

    need_teacher = config.loss.uses_teacher
    teacher_outputs = _teacher_outputs(loop, device) if need_teacher else None
    evaluator = (
        StudentEvaluator(config, device, loop.eval_dir, loop.pad_token_id, loop.verbalizer_ids, loop.score_dir)
        if loop.eval_every
        else None
    )
    per_rank_batch = max(1, config.training.batch_size // distributed.world_size())
    transfer_rows = (
        transfer_rows_per_batch(config.training.batch_size, *loop.transfer_split, distributed.world_size())
        if loop.transfer_split
        else 0
    )
    order = {"skip": start_step, "shuffle_buffer": config.training.shuffle_buffer, "seed": config.training.seed}
    batches = _endless_batches(ray.train.get_dataset_shard("train"), per_rank_batch - transfer_rows, **order)
    if transfer_rows:
        unlabeled = _endless_batches(ray.train.get_dataset_shard(TRANSFER_SPLIT), transfer_rows, **order)
        batches = (joined_batch(labeled, more) for labeled, more in zip(batches, unlabeled))
    logger = WorkerMetricLogger(loop.tracking_uri, loop.run_id) if distributed.is_main_process() else None
    progress = (
        Progress("distill", config.training.steps, terminal=loop.progress_bars, unit="steps", initial=start_step)
        if distributed.is_main_process()
        else None
    )
    mixed_precision = distributed.autocast(config.training.precision, device)  # checked once, entered every step

    # Throughput is the steady state: every step but this run's first (which waits for Ray Data's
    # first block and warms the kernels), data wait included, checkpoints and evaluation excluded.
    tokens, step_seconds, parts = 0, 0.0, {}
    profile = StepProfile(device)

    # The loss is computed inside the module's forward (FSDP2 gathers the root's parameters there):
    # the student's own forward returning is where the student forward ends and the loss begins.
    def student_forward_ends(student: torch.nn.Module, *_) -> None:
        # Not while it samples its own responses (training.on_policy, in eval mode): each token's
        # forward would end the phase again, and that time is the batch's.
        if student.training:
            profile.lap("student_forward")

    module.student.register_forward_hook(student_forward_ends)
    for step in range(start_step, config.training.steps):
        step_started = profile.start()
        rows = next(batches)
        batch = {key: value.to(device) for key, value in collate_batch(rows, loop.pad_token_id).items()}
        on_policy = is_on_policy_step(config.training.seed, step, config.training.on_policy)
        if on_policy:  # the step's batch: the student's own responses to its prompts (counted as "batch")
            with mixed_precision:  # sampled with the numerics it trains with
                batch = _on_policy_batch(loop, module, batch, step)
        profile.lap("batch")
        for group in optimizer.param_groups:
            group["lr"] = learning_rate_at(step, config)
        with mixed_precision:
            teacher_logits, teacher_features = teacher_outputs(rows, batch) if need_teacher else (None, {})
            profile.lap("teacher_targets")
            parts = module(batch, teacher_logits, teacher_features, on_policy=on_policy)
        _refuse_non_finite(parts, step + 1)
        profile.lap("loss")  # with its finite check (a few scalars)
        parts["total"].backward()
        profile.lap("backward")
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        profile.lap("optimizer")
        if step > start_step:
            profile.count()
            tokens += int(batch["attention_mask"].sum()) * distributed.world_size()
            step_seconds += time.perf_counter() - step_started
        done = step + 1
        if progress is not None:
            progress.update(1)
        last = done == config.training.steps
        log_now = done % config.training.log_every == 0 or last
        evaluate_now = evaluator is not None and (done % loop.eval_every == 0 or last)
        if log_now or evaluate_now:
            metrics = {f"train.{name}": float(value.detach()) for name, value in parts.items()}
            metrics |= {
                "train.tokens_per_second": tokens / max(step_seconds, 1e-9),
                "train.learning_rate": learning_rate_at(step, config),
            }
            if evaluate_now:
                metrics |= evaluator(module)
            if logger is not None:
                logger.log(metrics, step=done)
                if not loop.progress_bars:  # no terminal to draw a bar on: one line per logged step too
                    # To the process's own stdout: Ray Train's patched print would also log the line
                    # when stdout is wrapped, and the driver would show it twice.
                    print(
                        f"distill step {done}/{config.training.steps}: "
                        + ", ".join(f"{name.removeprefix('train.')} {value:.4g}" for name, value in metrics.items()),
                        file=sys.__stdout__,
                        flush=True,
                    )
            if evaluate_now:  # only Tune reads reports; each one is a barrier across the workers
                ray.train.report({"step": done, **metrics})
        if done % config.training.checkpoint_every == 0 or last:
            distributed.save_checkpoint(checkpoints, module, optimizer, done)
            if distributed.is_main_process():
                distributed.prune_checkpoints(checkpoints, KEEP_CHECKPOINTS)
        faults.maybe_kill_worker(done, distributed.rank(), loop.output_dir)
    if progress is not None:
        progress.close()

    _save_student(loop, module, tokens, step_seconds, parts, start_step, profile.ms_per_step())


def _on_policy_batch(
    loop: DistillLoop, module: torch.nn.Module, batch: dict[str, torch.Tensor], step: int
) -> dict[str, torch.Tensor]:
    """The batch's prompts with the student's sampled responses (training.on_policy). Run through
    the module's forward, where a sharded student's root parameters are gathered; every rank
    samples in lockstep, since each forward of a sharded block is collective."""
    training = loop.config.training

    def sample(student: torch.nn.Module) -> dict[str, torch.Tensor]:
        student.eval()
        try:
            return sample_on_policy_batch(
                student,
                batch,
                loop.config.data.max_length,
                training.on_policy_max_new_tokens,
                training.on_policy_temperature,
                loop.pad_token_id,
                loop.eos_token_id,
                seed=training.seed * 1_000_003 + step * distributed.world_size() + distributed.rank(),
                synced=distributed.world_size() > 1,
            )
        finally:
            student.train()

    with torch.no_grad():
        return module(batch, None, {}, with_student=sample)


def _refuse_non_finite(parts: dict[str, torch.Tensor], step: int) -> None:
    for name, value in parts.items():
        if not torch.isfinite(value).all():
            raise FloatingPointError(
                f"non-finite {name} loss ({float(value)}) at step {step}; the last good checkpoint is kept"
            )


def _save_student(
    loop: DistillLoop,
    module: StudentWithObjective,
    tokens: int,
    seconds: float,
    parts: dict[str, torch.Tensor],
    start_step: int,
    ms_per_step: dict[str, float] | None,
) -> None:
    """Rank 0 writes the student in Hugging Face format (a fresh CPU copy loaded with the
    gathered weights, so the saved model knows nothing of FSDP)."""
    config, output_dir = loop.config, loop.output_dir
    state = distributed.full_model_state_dict(module)
    if not distributed.is_main_process():
        return
    student = build_student(config, loop.score_dir)
    student.load_state_dict(
        {key.removeprefix("student."): value for key, value in state.items() if key.startswith("student.")}
    )
    student.save_pretrained(output_dir / "student", safe_serialization=True)
    load_pipeline_tokenizer(config).save_pretrained(output_dir / "student")
    metrics = {name: float(value.detach()) for name, value in parts.items()}
    metrics |= {
        "steps": config.training.steps,
        "resumed_from_step": start_step,
        "tokens_per_second": tokens / max(seconds, 1e-9),
        "student_parameters": parameter_count(student),
        "extra_trainable_parameters": module.extra_trainable_parameters,
        "on_policy_steps": sum(
            is_on_policy_step(config.training.seed, step, config.training.on_policy)
            for step in range(config.training.steps)
        ),
    }
    if ms_per_step is not None:
        metrics["ms_per_step"] = ms_per_step
    (output_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
