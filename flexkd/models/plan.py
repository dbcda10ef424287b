"""From a validated config to concrete models: where the teacher lives, the shapes of both
models, the layer pairs and k. Everything here needs only model *configs*, never weights, so a
bad k or layer index is refused in a second, before any stage starts.

A pruned student (``student.init: prune_from_teacher``) is the exception that proves the rule:
its shape is known from the configs, but its weights, and with a ranked ``student.layer_selection``
(importance, perplexity) the teacher blocks it keeps, come from the score stage, which writes them to
``<score>/pruned_student/`` and ``<score>/pruning/selection.json``. Every later stage reads them
from there (``score_dir`` below), so the teacher is pruned once, not once per worker."""

from __future__ import annotations

import difflib
import json
import logging
import os
import socket
import time
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from huggingface_hub.errors import StrictDataclassError
from mlflow.exceptions import MlflowException
from transformers import CONFIG_MAPPING, AutoConfig, PretrainedConfig, PreTrainedModel
from transformers.activations import ACT2FN

from flexkd import distributed
from flexkd.config.schema import ConfigError, PipelineConfig, stable_hash
from flexkd.method.layers import resolve_layer_map
from flexkd.method.selection import resolve_k
from flexkd.models.loading import (
    DEMO_TEACHER_GGUF,
    build_on_meta,
    build_random_model,
    fetch_demo_teacher,
    load_model,
    load_tokenizer,
    missing_weights,
    random_model_config,
)
from flexkd.prune.scores import check_supported_architecture
from flexkd.prune.student import PruneTargets, kept_layer_indices, pruned_model_config, pruned_student_layer_map
from flexkd.tracking.model_registry import download_registered_student

log = logging.getLogger("flexkd")


@dataclass(frozen=True)
class ModelPlan:
    """The shapes a pipeline works with, derived from the config and the model configs."""

    teacher_hidden: int
    teacher_layers: int
    student_hidden: int
    student_layers: int
    # None only for layer_map 'source' with a ranked student.layer_selection before the score
    # stage has chosen the teacher blocks (plan_models without score_dir).
    layer_pairs: tuple[tuple[int, int], ...] | None
    k: int

    @property
    def teacher_layer_indices(self) -> list[int]:
        if self.layer_pairs is None:
            raise ConfigError(
                "layer_map 'source' with student.layer_selection importance or perplexity: the layer pairs are "
                "the teacher blocks the score stage keeps, not known before it ran"
            )
        return sorted({teacher for teacher, _ in self.layer_pairs})


PRUNED_STUDENT_DIR = "pruned_student"
PRUNING_SELECTION = Path("pruning") / "selection.json"


def teacher_location(config: PipelineConfig) -> tuple[str | None, str | None]:
    """The teacher's folder and GGUF file name (both None for a random teacher)."""
    teacher = config.teacher
    if teacher.source == "demo":
        return str(fetch_demo_teacher()), None
    if teacher.source == "mlflow":
        # A registered model (models:/name/version) is downloaded once into the artifact root.

        destination = Path(config.artifact_root) / "teachers" / teacher.path.replace(":/", "_").replace("/", "_")
        marker = destination / "hf_folder.txt"
        if not marker.is_file():
            marker.parent.mkdir(parents=True, exist_ok=True)
            try:
                folder = download_registered_student(teacher.path, destination)
            except (MlflowException, FileNotFoundError) as error:
                reason = str(error).splitlines()[0] if str(error) else type(error).__name__
                raise ConfigError(f"teacher.path: {teacher.path}: {reason}") from None
            marker.write_text(str(folder))
        return marker.read_text(), None
    return teacher.path, teacher.gguf_file


# The adapt stage's output: the adapted teacher (a Hugging Face folder) and its record.
ADAPTED_TEACHER_DIR = "teacher"
ADAPT_RECORD = "adapt.json"


def adapted_teacher_config(config: PipelineConfig, adapt_dir: Path) -> PipelineConfig:
    """The config the stages after ``adapt`` run with: the teacher is the adapted folder in
    ``adapt_dir``, named as the adapt stage recorded it (the registered model, if any). The
    fingerprints are still computed from the config as written, whose ``teacher.adapt`` and the
    adapt stage's fingerprint say which teacher this is."""
    record = json.loads((Path(adapt_dir) / ADAPT_RECORD).read_text())
    teacher = config.teacher.model_copy(
        update={
            "source": "hf",
            "path": str(Path(adapt_dir) / ADAPTED_TEACHER_DIR),
            "gguf_file": None,
            "tokenizer": None,  # the folder holds the teacher's tokenizer
            "architecture": None,
            "name": record["teacher_name"],
            "version": record["teacher_version"],
        }
    )
    return config.model_copy(update={"teacher": teacher})


def teacher_name(config: PipelineConfig) -> str:
    """The configured teacher name, else one derived from where the teacher comes from."""
    teacher = config.teacher
    if teacher.name:
        return teacher.name
    if teacher.source == "random":
        # Random teachers differ only by shape and seed, so those are the name.
        return f"random-{stable_hash(teacher.architecture, length=8)}-seed{teacher.seed}"
    if teacher.source in ("demo", "gguf"):
        return Path(teacher.gguf_file or DEMO_TEACHER_GGUF).stem  # e.g. SmolLM2-135M-Instruct.Q4_1
    if teacher.source == "mlflow":
        return teacher.path  # models:/<name>/<version> names itself
    return Path(teacher.path).name


def load_pipeline_tokenizer(config: PipelineConfig):
    """The tokenizer every stage uses: the teacher's (the student must share it)."""
    path, gguf_file = teacher_location(config)
    tokenizer_path = config.teacher.tokenizer or path
    return load_tokenizer(
        tokenizer_path,
        gguf_file=None if config.teacher.tokenizer else gguf_file,
        trust_remote_code=config.teacher.trust_remote_code,
    )


# Config fields flexkd sets itself when it builds a random model (from the tokenizer, the task).
_SET_BY_FLEXKD = ("vocab_size", "pad_token_id", "bos_token_id", "eos_token_id", "num_labels")


def architecture_config(fields: dict[str, Any], where: str, written: Collection[str]) -> PretrainedConfig:
    """``AutoConfig.for_model`` of ``fields`` (``model_type`` default llama), refusing in one line
    naming ``where`` (``student.architecture``) what transformers would accept silently or with a
    traceback: a key of ``written`` (the keys the pipeline file gave) that the model's config class
    does not have (transformers keeps it as a stray attribute), a width the heads do not divide,
    query heads that are no whole number of key/value groups, a value of the wrong type."""
    fields = dict(fields)
    model_type = fields.pop("model_type", "llama")
    if model_type not in CONFIG_MAPPING:
        raise ConfigError(f"{where}.model_type = {model_type!r} is not a transformers model type")
    config_class = CONFIG_MAPPING[model_type]
    known = set(config_class().to_dict()) | set(config_class.attribute_map)  # gpt2: hidden_size is n_embd
    for key in written:
        if key in _SET_BY_FLEXKD:
            raise ConfigError(f"{where}.{key}: flexkd sets it (from the tokenizer and the task); remove it")
        if key not in known:
            close = difflib.get_close_matches(key, sorted(known), n=1)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            raise ConfigError(f"{where}.{key}: not a {config_class.__name__} field{hint}")
    activation = fields.get("hidden_act")
    if "hidden_act" in written and isinstance(activation, str) and activation not in ACT2FN:
        close = difflib.get_close_matches(activation, sorted(ACT2FN), n=1)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        raise ConfigError(f"{where}.hidden_act = {activation!r} is not an activation transformers has{hint}")
    hidden, heads, groups = (fields.get(key) for key in ("hidden_size", "num_attention_heads", "num_key_value_heads"))
    if all(isinstance(value, int) and value > 0 for value in (hidden, heads)):
        if "head_dim" not in written and {"hidden_size", "num_attention_heads"} & set(written) and hidden % heads:
            raise ConfigError(f"{where}: hidden_size = {hidden} is not a multiple of num_attention_heads = {heads}")
        if isinstance(groups, int) and groups > 0 and heads % groups:
            raise ConfigError(
                f"{where}: num_attention_heads = {heads} is not a multiple of num_key_value_heads = {groups}"
            )
    try:
        return AutoConfig.for_model(model_type, **fields)
    except (StrictDataclassError, ValueError, TypeError) as error:  # transformers' own validators
        raise ConfigError(f"{where}: {str(error.__cause__ or error).splitlines()[0]}") from None


def _pretrained_config(field: str, path: str, **options: Any) -> PretrainedConfig:
    if not Path(path).exists():
        raise ConfigError(f"{field}: {path} does not exist")
    try:
        return AutoConfig.from_pretrained(path, **options)
    except (OSError, ValueError) as error:  # no config.json, an unknown model_type
        raise ConfigError(f"{field}: {path}: {one_line(error)}") from None


def teacher_model_config(config: PipelineConfig) -> PretrainedConfig:
    teacher = config.teacher
    if teacher.source == "random":
        architecture = teacher.architecture or {}
        return architecture_config(architecture, "teacher.architecture", architecture.keys())
    path, gguf_file = teacher_location(config)
    return _pretrained_config("teacher.path", path, gguf_file=gguf_file, trust_remote_code=teacher.trust_remote_code)


def prune_targets(config: PipelineConfig, teacher: PretrainedConfig) -> PruneTargets:
    """A pruned student's shape: the sizes in student.architecture, the teacher's for the others.

    Heads go in whole key/value groups: given only ``num_attention_heads``, the groups follow
    from the teacher's query heads per group. Raises ConfigError naming the field.
    """
    try:
        check_supported_architecture(teacher)
    except ValueError as error:
        raise ConfigError(f"student.init 'prune_from_teacher': {error}") from None
    sizes = config.student.architecture
    per_group = teacher.num_attention_heads // teacher.num_key_value_heads
    heads, groups = sizes.get("num_attention_heads"), sizes.get("num_key_value_heads")
    if groups is None and isinstance(heads, int) and not isinstance(heads, bool):
        if heads % per_group:
            raise ConfigError(
                f"student.architecture.num_attention_heads = {heads} is not a multiple of the teacher's "
                f"{per_group} query heads per key/value head: heads are pruned as whole groups"
            )
        groups = heads // per_group
    try:
        targets = PruneTargets(
            hidden_size=sizes.get("hidden_size", teacher.hidden_size),
            num_layers=sizes.get("num_hidden_layers", teacher.num_hidden_layers),
            intermediate_size=sizes.get("intermediate_size", teacher.intermediate_size),
            num_key_value_heads=teacher.num_key_value_heads if groups is None else groups,
            layer_selection=config.student.layer_selection,
            num_attention_heads=heads,
        )
        targets.validate_for(teacher)
    except ValueError as error:
        raise ConfigError(str(error)) from None
    return targets


def student_model_config(config: PipelineConfig) -> PretrainedConfig:
    """A random student is the teacher's architecture with the student's overrides applied; a
    pruned one the teacher's cut to the target sizes, keeping the teacher's head_dim."""
    if config.student.init == "pretrained":
        return _pretrained_config("student.path", config.student.path)
    if config.student.init == "prune_from_teacher":
        teacher = teacher_model_config(config)
        targets = prune_targets(config, teacher)
        # Which blocks are kept changes only per-block fields (layer_types), not the shape.
        return pruned_model_config(teacher, targets, kept_layer_indices(teacher.num_hidden_layers, targets.num_layers))
    fields = teacher_model_config(config).to_dict()
    fields.update(config.student.architecture)
    fields.pop("quantization_config", None)
    overrides = config.student.architecture
    if "head_dim" not in overrides and ({"hidden_size", "num_attention_heads"} & overrides.keys()):
        # The teacher's head_dim belongs to the teacher's width; a narrower student derives its own.
        fields["head_dim"] = fields["hidden_size"] // fields["num_attention_heads"]
    return architecture_config(fields, "student.architecture", overrides.keys())


def plan_models(config: PipelineConfig, score_dir: Path | None = None) -> ModelPlan:
    """Resolve shapes, layer pairs and k; raises ConfigError naming the field at fault.

    ``score_dir``: the score stage's output, which holds the teacher blocks a pruned student
    keeps (needed for layer_map 'source' with a ranked student.layer_selection).
    """
    teacher, student = teacher_model_config(config), student_model_config(config)
    adapt = config.teacher.adapt
    if adapt is not None and adapt.top_blocks is not None and adapt.top_blocks > teacher.num_hidden_layers:
        raise ConfigError(
            f"teacher.adapt.top_blocks = {adapt.top_blocks}: the teacher has {teacher.num_hidden_layers} blocks"
        )
    if config.layer_map == "source":
        kept = kept_teacher_blocks(config, teacher.num_hidden_layers, student.num_hidden_layers, score_dir)
        pairs = None if kept is None else pruned_student_layer_map(kept)
    else:
        try:
            pairs = resolve_layer_map(config.layer_map, teacher.num_hidden_layers, student.num_hidden_layers)
        except ValueError as error:
            raise ConfigError(str(error)) from None
    for name, model in (("teacher", teacher), ("student", student)):
        positions = getattr(model, "max_position_embeddings", None)  # None: a config without the field
        if isinstance(positions, int) and config.data.max_length > positions:
            raise ConfigError(
                f"data.max_length: {config.data.max_length} exceeds the {name}'s max_position_embeddings "
                f"({positions}), the longest row it was built for"
            )
    # k 'auto': the most the student can take; the score stage chooses each layer's k up to it.
    requested = min(student.hidden_size, teacher.hidden_size) if config.selection.k == "auto" else config.selection.k
    try:
        k = resolve_k(requested, student.hidden_size, teacher.hidden_size)
    except ValueError as error:
        raise ConfigError(str(error)) from None
    return ModelPlan(
        teacher_hidden=teacher.hidden_size,
        teacher_layers=teacher.num_hidden_layers,
        student_hidden=student.hidden_size,
        student_layers=student.num_hidden_layers,
        layer_pairs=None if pairs is None else tuple(pairs),
        k=k,
    )


def kept_teacher_blocks(
    config: PipelineConfig, teacher_layers: int, student_layers: int, score_dir: Path | None
) -> list[int] | None:
    """The teacher blocks (0-based) a pruned student keeps: as the score stage chose them, else
    the uniform spread; None when they depend on block scores not collected yet."""
    if score_dir is not None:
        selection = Path(score_dir) / PRUNING_SELECTION
        if not selection.is_file():
            raise ConfigError(f"student.init 'prune_from_teacher': {selection} is missing; rerun the score stage")
        return json.loads(selection.read_text())["kept_layers"]
    if config.student.layer_selection == "uniform":
        return kept_layer_indices(teacher_layers, student_layers)
    return None


def one_line(error: BaseException) -> str:
    """The whole message on one line (transformers puts the advice on the later lines)."""
    return " ".join(str(error).split()) or type(error).__name__


TEACHER_LOADS_FILE = "teacher_loads.log"


def teacher_loads_log(config: PipelineConfig) -> Path:
    """Where :func:`load_teacher` appends one line per load: the sweep asserts that its trials
    add none, and anyone can see what the teacher cost."""
    return Path(config.artifact_root) / config.name / TEACHER_LOADS_FILE


def count_teacher_loads(config: PipelineConfig) -> int:
    log_file = teacher_loads_log(config)
    return len(log_file.read_text().splitlines()) if log_file.is_file() else 0


TEACHER_DTYPES = {"bf16": torch.bfloat16, "float32": torch.float32}


def load_teacher(config: PipelineConfig) -> PreTrainedModel:
    """The whole frozen teacher on the CPU, in ``teacher.dtype`` and eval mode. Every call is
    counted in :func:`teacher_loads_log`."""
    _count_teacher_load(config)
    return _whole_teacher(config)


def load_sharded_teacher(
    config: PipelineConfig, device: torch.device, activation_checkpointing: bool = False
) -> torch.nn.Module:
    """The frozen teacher of a Ray Train worker: on ``device``, in ``teacher.dtype``, FSDP2-sharded
    over the process group, loaded so that no rank ever holds the whole teacher on its device.

    With one rank it is the whole teacher, moved to ``device``. With several, every rank builds
    it on the meta device (no memory), shards it and allocates only its own shards; then a
    teacher in safetensors (hf, demo, mlflow) is read by each rank slice by slice, only its own
    shards (flexkd.distributed.load_safetensors_shards), and one that exists only whole (a GGUF
    file, a seeded random teacher) is built once in rank 0's CPU memory and broadcast tensor by
    tensor (flexkd.distributed.broadcast_from_rank0). Counted like :func:`load_teacher`, once per
    rank. ``activation_checkpointing``: for a teacher the stage backpropagates through (score).
    """
    if distributed.world_size() == 1:
        teacher = load_teacher(config).to(device)
        if activation_checkpointing:
            distributed.checkpoint_activations(teacher)
        return distributed.shard_model(teacher, trainable=False)
    _count_teacher_load(config)
    teacher = build_on_meta(_teacher_build_config(config), dtype=TEACHER_DTYPES[config.teacher.dtype])
    if activation_checkpointing:
        distributed.checkpoint_activations(teacher)
    distributed.materialize(distributed.shard_model(teacher, trainable=False), device)
    folder = _safetensors_folder(config)
    if folder is not None:
        distributed.load_safetensors_shards(teacher, folder)
    else:
        distributed.broadcast_from_rank0(
            teacher, _whole_teacher(config).state_dict() if distributed.rank() == 0 else {}
        )
    return teacher


def _count_teacher_load(config: PipelineConfig) -> None:
    teacher = config.teacher
    log.info("loading teacher (%s, %s)", teacher.name or teacher.path or teacher.source, teacher.dtype)
    log_file = teacher_loads_log(config)
    log_file.parent.mkdir(parents=True, exist_ok=True)
    with log_file.open("a") as file:  # one short append per load: atomic for concurrent writers
        file.write(f"{time.strftime('%Y-%m-%dT%H:%M:%S')} pid={os.getpid()} host={socket.gethostname()}\n")


def _whole_teacher(config: PipelineConfig) -> PreTrainedModel:
    teacher, dtype = config.teacher, TEACHER_DTYPES[config.teacher.dtype]
    if teacher.source == "random":
        tokenizer = load_pipeline_tokenizer(config)
        model = build_random_model(
            dict(teacher.architecture or {}),
            vocab_size=len(tokenizer),
            seed=teacher.seed,
            pad_token_id=tokenizer.pad_token_id,
            dtype=dtype,
        )
    else:
        path, gguf_file = teacher_location(config)
        model = load_model(path, gguf_file=gguf_file, trust_remote_code=teacher.trust_remote_code, dtype=dtype)
    model.requires_grad_(False)
    return model.eval()


def _teacher_build_config(config: PipelineConfig) -> PretrainedConfig:
    """The config the teacher's weights fit: for a random teacher, its architecture with the
    tokenizer's vocabulary, as :func:`_whole_teacher` builds it."""
    if config.teacher.source == "random":
        tokenizer = load_pipeline_tokenizer(config)
        return random_model_config(
            dict(config.teacher.architecture or {}), vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id
        )
    return teacher_model_config(config)


def _safetensors_folder(config: PipelineConfig) -> Path | None:
    """The teacher's Hugging Face folder when its weights are safetensors files, else None."""
    if config.teacher.source in ("random", "gguf"):
        return None
    folder = Path(teacher_location(config)[0])
    return folder if missing_weights(folder) is None else None


def build_student(config: PipelineConfig, score_dir: Path | str | None = None) -> PreTrainedModel:
    """The student before distillation: seeded random weights, a pretrained folder, or the
    teacher pruned by the score stage whose output is ``score_dir``."""
    if config.student.init == "pretrained":
        return load_model(config.student.path).train()
    if config.student.init == "prune_from_teacher":
        if score_dir is None:
            raise ValueError(
                "student.init 'prune_from_teacher': the pruned weights are the score stage's; pass its directory"
            )
        return load_model(Path(score_dir) / PRUNED_STUDENT_DIR).train()
    student_config = student_model_config(config)
    fields = {
        key: value
        for key, value in student_config.to_dict().items()
        if key in config.student.architecture or key in _ARCHITECTURE_FIELDS
    }
    fields["model_type"] = student_config.model_type
    tokenizer = load_pipeline_tokenizer(config)
    with torch.random.fork_rng():
        model = build_random_model(
            fields, vocab_size=len(tokenizer), seed=config.student.seed, pad_token_id=tokenizer.pad_token_id
        )
    return model.train()


# The fields that define a decoder's shape; a random student inherits these from the teacher
# unless the config overrides them (vocabulary comes from the shared tokenizer).
_ARCHITECTURE_FIELDS = (
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "intermediate_size",
    "head_dim",
    "hidden_act",
    "rms_norm_eps",
    "rope_theta",
    "rope_parameters",
    "tie_word_embeddings",
    "max_position_embeddings",
    "attention_bias",
    "mlp_bias",
)
