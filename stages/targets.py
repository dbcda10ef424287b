"""targets: one teacher pass over the training data, kept, so distillation never loads the teacher.

Runs only with ``training.teacher: cache``. A Ray Data actor pool holds the frozen teacher; each
actor runs forward passes (no gradient, so no FSDP: every actor holds a whole teacher, which fits
the teachers this runs on; a teacher too big for one device would need sharded inference) over
``<tokenize>/train`` (and ``<tokenize>/transfer``, the unlabeled rows of data.transfer, into
``transfer/``) and writes the training rows with the teacher's outputs attached:

    train/*.parquet   training rows + teacher columns (flexkd.teacher_targets: per mapped teacher
                      layer the first k_max selected units per token in float16; the class logits
                      (classification), or per response position the top-K logits, their ids
                      and the full logsumexp at each of targets.temperatures (generation))
    targets.json      what the cache holds and for what: teacher, data (the tokenize fingerprint),
                      selection, layers, k_max, unit order; checked before anything reads it

Because selection is ordered by importance, one cache serves every k <= k_max.

With ``selection.method: directions`` a layer's stored values are its coordinates on the score
stage's directions, U^T h (the first k_max of them; by default k_max is the largest k any layer
distills, so k 'auto' stores no more than it needs), and ``directions/`` (the bases and spectra)
is copied beside the cache, so a cache given as targets.path still knows each layer's k.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pyarrow as pa
import ray
import torch

from flexkd import distributed
from flexkd.cluster.local import ACTOR_POOL_OPTIONS
from flexkd.config.schema import ConfigError, PipelineConfig, stable_hash
from flexkd.data.directions_files import DIRECTIONS_DIR, distilled_ks, read_directions
from flexkd.data.rows import ROW_SCHEMA, TRANSFER_SPLIT, collate_batch
from flexkd.data.shards import ordered_execution, read_shards, shard_files, write_shards
from flexkd.data.teacher_targets import target_columns, units_column
from flexkd.method.objective import forward_scored
from flexkd.models.plan import load_pipeline_tokenizer, load_teacher, plan_models
from flexkd.progress import actor_progress

INFO_FILE = "targets.json"
CACHED_SPLITS = ("train", TRANSFER_SPLIT)  # the training rows, and the unlabeled rows of data.transfer if any


def run(config: PipelineConfig, inputs: dict[str, Path], output_dir: Path) -> dict[str, Any]:

    plan = plan_models(config, inputs["score"] if config.student.init == "prune_from_teacher" else None)
    tokenized = json.loads((inputs["tokenize"] / "manifest.json").read_text())
    selected = json.loads((inputs["score"] / "selected.json").read_text())["layers"]
    directions = (
        read_directions(inputs["score"], plan.teacher_layer_indices) if config.selection.method == "directions" else {}
    )
    distilled = max(selected[str(layer)]["k"] for layer in plan.teacher_layer_indices) if directions else plan.k
    k_max = config.targets.k_max or distilled
    if k_max > plan.k:
        raise ConfigError(
            f"targets.k_max = {k_max} exceeds the {plan.k} units the score stage selected "
            "(selection.k); raise selection.k"
        )
    unit_order = {}  # layer -> [u] unit indices, or [d_T, u] directions whose coordinates are stored
    for layer in plan.teacher_layer_indices:
        if directions:
            unit_order[layer] = directions[layer]["basis"][:, :k_max]
            continue
        order = selected[str(layer)]["indices"][:k_max]
        if config.targets.full_width:
            chosen = set(order)
            order = order + [unit for unit in range(plan.teacher_hidden) if unit not in chosen]
        unit_order[layer] = order
    top_k = min(config.targets.top_k_logits, len(load_pipeline_tokenizer(config)))
    temperatures = sorted(set(config.targets.temperatures))

    resources = config.resources
    written, shards = {}, []
    for split in CACHED_SPLITS:
        if split not in tokenized["outputs"]["rows"]:  # no data.transfer
            continue
        split_dir = output_dir / split
        rows_to_write = tokenized["outputs"]["rows"][split]
        # ordered: cache rows in the order of the training rows
        with ordered_execution(), actor_progress(f"targets {split}", rows_to_write) as counter:
            rows = read_shards(inputs["tokenize"] / split)
            with_targets = rows.map_batches(
                TeacherTargetWriter,
                batch_format="numpy",
                batch_size=config.targets.batch_size,
                fn_constructor_kwargs={
                    "config": config,
                    "unit_order": unit_order,
                    "top_k": top_k,
                    "temperatures": temperatures,
                    "pad_token_id": tokenized["outputs"]["pad_token_id"],
                    "verbalizer_ids": tokenized["outputs"]["verbalizer_ids"],
                    "counter": counter,
                },
                compute=ray.data.ActorPoolStrategy(size=resources.num_workers),
                num_cpus=resources.cpus_per_worker,
                num_gpus=1 if resources.use_gpu else 0,
                udf_modifying_row_count=False,
                **ACTOR_POOL_OPTIONS,
            )
            written[split] = write_shards(with_targets, split_dir, config.data.shard_rows)
        if written[split] != rows_to_write:
            raise RuntimeError(f"wrote {written[split]} cache rows for {rows_to_write} {split} rows")
        shards += shard_files(split_dir)
    if directions:
        shutil.rmtree(output_dir / DIRECTIONS_DIR, ignore_errors=True)
        shutil.copytree(inputs["score"] / DIRECTIONS_DIR, output_dir / DIRECTIONS_DIR)
    info = {
        "identity": cache_identity(config, tokenized["fingerprint"]),
        "k_max": k_max,
        "full_width": config.targets.full_width,
        "top_k_logits": top_k,
        "temperatures": temperatures,
        "task": config.task.kind,
        "layers": plan.teacher_layer_indices,
        "units": {str(layer): k_max if directions else len(order) for layer, order in unit_order.items()},
        "directions": bool(directions),
        # Directions: coordinates 0 .. k_max - 1 in order, on the bases in directions/.
        "unit_order": {str(layer): list(range(k_max)) if directions else order for layer, order in unit_order.items()},
        "rows": written["train"],
        "transfer_rows": written.get(TRANSFER_SPLIT, 0),
        "bytes": sum(shard.stat().st_size for shard in shards),
    }
    (output_dir / INFO_FILE).write_text(json.dumps(info, indent=1))
    mlflow.log_artifact(str(output_dir / INFO_FILE))
    mlflow.log_metrics({"rows": float(info["rows"]), "megabytes": info["bytes"] / 2**20, "k_max": float(k_max)})
    return {
        key: info[key] for key in ("k_max", "full_width", "top_k_logits", "layers", "rows", "transfer_rows", "bytes")
    }


class TeacherTargetWriter:
    """A Ray Data actor: loads the teacher once, then turns batches of training rows into cache rows
    (and counts them on ``counter``, a :class:`RowCounter`, if given)."""

    def __init__(
        self,
        config: PipelineConfig,
        unit_order: dict[int, list[int] | torch.Tensor],
        top_k: int,
        temperatures: list[float],
        pad_token_id: int,
        verbalizer_ids: list[int] | None,
        counter: ray.actor.ActorHandle | None = None,
    ):

        distributed.use_threads(config.resources.threads_per_worker)
        self.device = torch.device("cuda" if config.resources.use_gpu and torch.cuda.is_available() else "cpu")
        self.teacher = load_teacher(config).to(self.device)
        self.task = config.task.kind
        self.unit_order = {layer: torch.as_tensor(order, device=self.device) for layer, order in unit_order.items()}
        self.top_k, self.temperatures = top_k, temperatures
        self.pad_token_id = pad_token_id
        self.verbalizer_ids = torch.tensor(verbalizer_ids, device=self.device) if verbalizer_ids else None
        self.schema = _cache_schema(list(unit_order), self.task)
        self.counter = counter

    @torch.no_grad()
    def __call__(self, rows: dict[str, np.ndarray]) -> pa.Table:

        batch = {key: value.to(self.device) for key, value in collate_batch(rows, self.pad_token_id).items()}
        logits, hidden = forward_scored(self.teacher, batch, self.task, list(self.unit_order))
        columns = target_columns(
            logits, hidden, batch, self.unit_order, self.task, self.verbalizer_ids, self.top_k, self.temperatures
        )
        passthrough = {name: list(rows[name]) for name in ROW_SCHEMA.names}
        table = pa.Table.from_pydict(passthrough | columns, schema=self.schema)
        if self.counter is not None:
            self.counter.add.remote(table.num_rows)
        return table


def _cache_schema(layers: list[int], task: str) -> pa.Schema:
    fields = [(units_column(layer), pa.list_(pa.float16())) for layer in layers]
    if task == "classification":
        fields.append(("teacher_class_logits", pa.list_(pa.float32())))
    else:
        fields += [
            ("teacher_topk_logits", pa.list_(pa.float32())),
            ("teacher_topk_ids", pa.list_(pa.int32())),
            ("teacher_logsumexp", pa.list_(pa.float32())),
        ]
    return pa.schema(list(ROW_SCHEMA) + [pa.field(name, kind) for name, kind in fields])


def cache_identity(config: PipelineConfig, data_fingerprint: str) -> dict[str, Any]:
    """What a cache was made from; a reader's config must give the same."""
    teacher = config.teacher
    return {
        "teacher": stable_hash(teacher.model_dump(mode="json")),
        "teacher_name": teacher.name or teacher.path or f"{teacher.source} teacher",
        "data": data_fingerprint,
        "selection": {"method": config.selection.method, "score": config.scoring.score, "seed": config.selection.seed},
    }


def read_cache_info(targets_dir: Path) -> dict[str, Any]:
    path = Path(targets_dir) / INFO_FILE
    if not path.is_file():
        raise ConfigError(f"targets: {targets_dir} is not a teacher-target cache (no {INFO_FILE})")
    return json.loads(path.read_text())


def check_cache(
    config: PipelineConfig,
    targets_dir: Path,
    k: int,
    teacher_layers: list[int],
    data_fingerprint: str,
    where: str = "targets",
) -> dict[str, Any]:
    """Refuse, in one line, a cache this config cannot use; returns its targets.json.

    Checks that it was made for this teacher, this data (and tokenization), this selection (any
    selection, if it stores every unit: distill then reads the selected ones wherever they are), and
    that it holds every teacher layer the config maps, at least k units, and whole hidden states
    for a loss that reads them (cka, the projectors).
    """
    info = read_cache_info(targets_dir)
    made, wanted = info["identity"], cache_identity(config, data_fingerprint)
    if made["teacher"] != wanted["teacher"]:
        raise ConfigError(
            f"{where}: the cache at {targets_dir} was made for another teacher "
            f"({made['teacher_name']}, config {made['teacher'][:8]}), not this one "
            f"({wanted['teacher_name']}, config {wanted['teacher'][:8]})"
        )
    if made["data"] != wanted["data"]:
        raise ConfigError(
            f"{where}: the cache at {targets_dir} was made for another data set or tokenization "
            f"(tokenize fingerprint {made['data']}, this config gives {wanted['data']})"
        )
    # A full-width cache holds every unit, so it serves any unit selection; directions need their own coordinates.
    serves_any = info["full_width"] and wanted["selection"]["method"] != "directions"
    if made["selection"] != wanted["selection"] and not serves_any:
        raise ConfigError(
            f"{where}: the cache at {targets_dir} holds units selected with {made['selection']}, "
            f"this config selects with {wanted['selection']}"
        )
    missing = sorted(set(teacher_layers) - set(info["layers"]))
    if missing:
        raise ConfigError(
            f"{where}: the cache at {targets_dir} has teacher layers {info['layers']}, "
            f"not {missing} that layer_map {config.layer_map!r} needs"
        )
    if config.selection.k == "auto":  # each layer's k follows from the spectra kept beside the cache
        spectra = {layer: value["spectrum"] for layer, value in read_directions(targets_dir, teacher_layers).items()}
        for layer, layer_k in distilled_ks(config.selection, k, spectra).items():
            if layer_k > info["units"][str(layer)]:
                raise ConfigError(
                    f"{where}: selection.k 'auto' with energy {config.selection.energy} takes {layer_k} directions "
                    f"at teacher layer {layer}, the cache at {targets_dir} stores {info['units'][str(layer)]}; "
                    "raise targets.k_max"
                )
    elif k > info["k_max"]:
        raise ConfigError(f"{where}: selection.k = {k} exceeds k_max = {info['k_max']} of the cache at {targets_dir}")
    if config.loss.reads_whole_hidden and not info["full_width"]:
        raise ConfigError(
            f"{where}: loss.feature '{config.loss.feature}' needs whole teacher hidden states, "
            f"the cache at {targets_dir} is not full_width"
        )
    return info
