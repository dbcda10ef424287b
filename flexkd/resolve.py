"""From a validated config to concrete models: where the teacher lives, the shapes of both
models, the layer pairs and k. Everything here needs only model *configs*, never weights, so a
bad k or layer index is refused in a second, before any stage starts."""

from __future__ import annotations

import logging
import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoConfig, PretrainedConfig, PreTrainedModel

from flexkd.config import ConfigError, PipelineConfig
from flexkd.layers import resolve_layer_map
from flexkd.models import build_random_model, fetch_demo_teacher, load_model, load_tokenizer
from flexkd.preflight import TokenizerMismatchError, check_same_tokenizer
from flexkd.selection import resolve_k

log = logging.getLogger("flexkd")


@dataclass(frozen=True)
class ModelPlan:
    """The shapes a pipeline works with, derived from the config and the model configs."""

    teacher_hidden: int
    teacher_layers: int
    student_hidden: int
    student_layers: int
    layer_pairs: tuple[tuple[int, int], ...]
    k: int

    @property
    def teacher_layer_indices(self) -> list[int]:
        return sorted({teacher for teacher, _ in self.layer_pairs})


def teacher_location(config: PipelineConfig) -> tuple[str | None, str | None]:
    """The teacher's folder and GGUF file name (both None for a random teacher)."""
    teacher = config.teacher
    if teacher.source == "demo":
        return str(fetch_demo_teacher()), None
    if teacher.source == "mlflow":
        # A registered model (models:/name/version) is downloaded once into the artifact root.
        from flexkd.registry import download_registered_student

        destination = Path(config.artifact_root) / "teachers" / teacher.path.replace(":/", "_").replace("/", "_")
        marker = destination / "hf_folder.txt"
        if not marker.is_file():
            from mlflow.exceptions import MlflowException

            marker.parent.mkdir(parents=True, exist_ok=True)
            try:
                folder = download_registered_student(teacher.path, destination)
            except (MlflowException, FileNotFoundError) as error:
                reason = str(error).splitlines()[0] if str(error) else type(error).__name__
                raise ConfigError(f"teacher.path: {teacher.path}: {reason}") from None
            marker.write_text(str(folder))
        return marker.read_text(), None
    return teacher.path, teacher.gguf_file


def load_pipeline_tokenizer(config: PipelineConfig):
    """The tokenizer every stage uses: the teacher's (the student must share it)."""
    path, gguf_file = teacher_location(config)
    tokenizer_path = config.teacher.tokenizer or path
    return load_tokenizer(tokenizer_path, gguf_file=None if config.teacher.tokenizer else gguf_file,
                          trust_remote_code=config.teacher.trust_remote_code)


def teacher_model_config(config: PipelineConfig) -> PretrainedConfig:
    teacher = config.teacher
    if teacher.source == "random":
        fields = dict(teacher.architecture or {})
        return AutoConfig.for_model(fields.pop("model_type", "llama"), **fields)
    path, gguf_file = teacher_location(config)
    if not Path(path).exists():
        raise ConfigError(f"teacher.path: {path} does not exist")
    return AutoConfig.from_pretrained(path, gguf_file=gguf_file, trust_remote_code=teacher.trust_remote_code)


def student_model_config(config: PipelineConfig) -> PretrainedConfig:
    """A random student is the teacher's architecture with the student's overrides applied."""
    if config.student.init == "pretrained":
        return AutoConfig.from_pretrained(config.student.path)
    fields = teacher_model_config(config).to_dict()
    fields.update(config.student.architecture)
    fields.pop("quantization_config", None)
    overrides = config.student.architecture
    if "head_dim" not in overrides and ({"hidden_size", "num_attention_heads"} & overrides.keys()):
        # The teacher's head_dim belongs to the teacher's width; a narrower student derives its own.
        fields["head_dim"] = fields["hidden_size"] // fields["num_attention_heads"]
    return AutoConfig.for_model(fields.pop("model_type", "llama"), **fields)


def plan_models(config: PipelineConfig) -> ModelPlan:
    """Resolve shapes, layer pairs and k; raises ConfigError naming the field at fault."""
    teacher, student = teacher_model_config(config), student_model_config(config)
    try:
        pairs = resolve_layer_map(config.layer_map, teacher.num_hidden_layers, student.num_hidden_layers)
    except ValueError as error:
        raise ConfigError(str(error)) from None
    try:
        k = resolve_k(config.selection.k, student.hidden_size, teacher.hidden_size)
    except ValueError as error:
        raise ConfigError(str(error)) from None
    return ModelPlan(
        teacher_hidden=teacher.hidden_size,
        teacher_layers=teacher.num_hidden_layers,
        student_hidden=student.hidden_size,
        student_layers=student.num_hidden_layers,
        layer_pairs=tuple(pairs),
        k=k,
    )


def preflight(config: PipelineConfig) -> ModelPlan:
    """Everything that can be refused before any stage runs: shapes, k, layer map, tokenizers.

    A random student is built on the teacher's tokenizer; a pretrained one brings its own,
    which must match exactly, since logit KD and token-aligned feature KD compare token by token.
    """
    plan = plan_models(config)
    if config.student.init == "pretrained":
        try:
            check_same_tokenizer(load_pipeline_tokenizer(config), load_tokenizer(config.student.path))
        except TokenizerMismatchError as error:
            raise ConfigError(f"student.path: {error}") from None
    return plan


TEACHER_LOADS_FILE = "teacher_loads.log"


def teacher_loads_log(config: PipelineConfig) -> Path:
    """Where :func:`load_teacher` appends one line per load: the sweep asserts that its trials
    add none, and anyone can see what the teacher cost."""
    return Path(config.artifact_root) / config.name / TEACHER_LOADS_FILE


def count_teacher_loads(config: PipelineConfig) -> int:
    log_file = teacher_loads_log(config)
    return len(log_file.read_text().splitlines()) if log_file.is_file() else 0


def load_teacher(config: PipelineConfig) -> PreTrainedModel:
    """The frozen teacher, in eval mode. Every call is counted in :func:`teacher_loads_log`."""
    teacher = config.teacher
    log.info("loading teacher (%s)", teacher.name or teacher.path or teacher.source)
    log_file = teacher_loads_log(config)
    log_file.parent.mkdir(parents=True, exist_ok=True)
    with log_file.open("a") as file:  # one short append per load: atomic for concurrent writers
        file.write(f"{time.strftime('%Y-%m-%dT%H:%M:%S')} pid={os.getpid()} host={socket.gethostname()}\n")
    if teacher.source == "random":
        tokenizer = load_pipeline_tokenizer(config)
        model = build_random_model(dict(teacher.architecture or {}), vocab_size=len(tokenizer),
                                   seed=teacher.seed, pad_token_id=tokenizer.pad_token_id)
    else:
        path, gguf_file = teacher_location(config)
        model = load_model(path, gguf_file=gguf_file, trust_remote_code=teacher.trust_remote_code)
    model.requires_grad_(False)
    return model.eval()


def build_student(config: PipelineConfig) -> PreTrainedModel:
    """The student before distillation: seeded random weights or a pretrained folder."""
    if config.student.init == "pretrained":
        return load_model(config.student.path).train()
    student_config = student_model_config(config)
    fields = {key: value for key, value in student_config.to_dict().items()
              if key in config.student.architecture or key in _ARCHITECTURE_FIELDS}
    fields["model_type"] = student_config.model_type
    tokenizer = load_pipeline_tokenizer(config)
    with torch.random.fork_rng():
        model = build_random_model(fields, vocab_size=len(tokenizer), seed=config.student.seed,
                                   pad_token_id=tokenizer.pad_token_id)
    return model.train()


# The fields that define a decoder's shape; a random student inherits these from the teacher
# unless the config overrides them (vocabulary comes from the shared tokenizer).
_ARCHITECTURE_FIELDS = (
    "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
    "intermediate_size", "head_dim", "hidden_act", "rms_norm_eps", "rope_theta", "rope_parameters",
    "tie_word_embeddings", "max_position_embeddings", "attention_bias", "mlp_bias",
)
