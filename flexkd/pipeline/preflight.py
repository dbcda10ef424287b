"""Everything a pipeline can be refused for before Ray starts, each in one line naming the field
or the file. ``flexkd validate`` runs it alone; ``flexkd run`` runs it first."""

from __future__ import annotations

import logging
from pathlib import Path

from flexkd.cluster.storage import check_local_folder
from flexkd.config.schema import ConfigError, PipelineConfig
from flexkd.data.rows import render_prompt, template_columns
from flexkd.data.splits import check_data, pipeline_splits, split_task
from flexkd.models.loading import load_tokenizer, missing_weights
from flexkd.models.plan import (
    ModelPlan,
    load_pipeline_tokenizer,
    one_line,
    plan_models,
    student_model_config,
    teacher_location,
    teacher_model_config,
)
from flexkd.models.preflight import TokenizerMismatchError, check_same_tokenizer

log = logging.getLogger("flexkd")


def preflight(config: PipelineConfig) -> ModelPlan:
    """Everything that can be refused before Ray starts, each in one line naming the field or
    the file: the artifact root, the model configs (architecture keys, shapes, k, layer map),
    the pretrained models' weights and vocabularies, the tokenizers, the verbalizers, and every
    data split read in full (``check_data``).

    A random student is built on the teacher's tokenizer; a pretrained one brings its own,
    which must match exactly, since logit KD and token-aligned feature KD compare token by token.
    """
    check_local_folder(config.artifact_root)
    plan = plan_models(config)
    tokenizer = _loaded_tokenizer(config)
    if config.student.init == "pretrained":
        try:
            check_same_tokenizer(tokenizer, load_tokenizer(config.student.path))
        except TokenizerMismatchError as error:
            raise ConfigError(f"student.path: {error}") from None
        except (OSError, ValueError) as error:
            raise ConfigError(f"student.path: {config.student.path}: {one_line(error)}") from None
    training = config.training
    if training.warmup_steps > training.steps:
        log.warning(
            "training.warmup_steps = %d is above training.steps = %d: the learning rate ends at %.3g, never reaching "
            "training.learning_rate (%g)",
            training.warmup_steps,
            training.steps,
            training.learning_rate * training.steps / training.warmup_steps,
            training.learning_rate,
        )
    _check_pretrained_models(config, len(tokenizer))
    _check_prompt_room(config, tokenizer)
    check_data(config, tokenizer)
    return plan


def _check_pretrained_models(config: PipelineConfig, tokens: int) -> None:
    """Refuse a pretrained model (a Hugging Face teacher folder, a pretrained student) that would
    fail only once a stage loads it: no safetensors weights, or an embedding table smaller than
    the ``tokens`` of the pipeline's tokenizer, whose ids past it would index out of range."""
    models = []
    if config.teacher.source != "random":
        path, gguf_file = teacher_location(config)
        # A registered teacher: what the user wrote, then the folder it was downloaded to.
        shown = f"{config.teacher.path}, downloaded to {path}" if config.teacher.source == "mlflow" else path
        models.append(("teacher.path", path, shown, gguf_file, teacher_model_config(config)))
    if config.student.init == "pretrained":
        path = config.student.path
        models.append(("student.path", path, path, None, student_model_config(config)))
    for field, path, shown, gguf_file, model_config in models:
        problem = None if gguf_file else missing_weights(Path(path))
        if problem:
            raise ConfigError(f"{field}: {shown}: {problem}")
        vocab_size = getattr(model_config, "vocab_size", None)
        if isinstance(vocab_size, int) and vocab_size < tokens:
            tokenizer = "teacher.tokenizer" if config.teacher.tokenizer else "the teacher's tokenizer"
            raise ConfigError(
                f"{field}: vocab_size {vocab_size} is below the {tokens} tokens of {tokenizer}: the ids from "
                f"{vocab_size} on have no embedding"
            )


def _check_prompt_room(config: PipelineConfig, tokenizer) -> None:
    """Refuse a data.max_length that no row's text survives: prompts are cut from the left, so
    the end of a split's template after its last column (with the chat template's end) is always
    kept. Also refuses task.chat_template with a tokenizer that has none."""
    max_length = config.data.max_length
    # A generation row keeps up to half of max_length for its response (flexkd.data.rows).
    room = max_length if config.task.kind == "classification" else max_length - max_length // 2
    marker = "\u2063row\u2063"  # text no template holds: where the row's text would be
    for split, source in pipeline_splits(config).items():
        task = split_task(config.task, source)
        try:
            columns = template_columns(task.prompt_template)
            rendered = render_prompt(
                task.prompt_template, dict.fromkeys(columns, marker), tokenizer, task.chat_template
            )
        except ValueError as error:
            raise ConfigError(str(error)) from None
        end = len(tokenizer(rendered.rsplit(marker, 1)[1], add_special_tokens=False)["input_ids"])
        if end >= room:
            field = f"data.{split}.prompt_template" if source.prompt_template else "task.prompt_template"
            raise ConfigError(
                f"data.max_length: {max_length} leaves a prompt {room} tokens, and the end of {field} after its "
                f"last column takes {end}: no row's text would be left; raise data.max_length or shorten the template"
            )


def _loaded_tokenizer(config: PipelineConfig):
    """The pipeline's tokenizer, or ConfigError naming the field it comes from."""
    try:
        return load_pipeline_tokenizer(config)
    except ConfigError:
        raise
    except (OSError, ValueError) as error:  # a missing folder, one without tokenizer files
        field = "teacher.tokenizer" if config.teacher.tokenizer else "teacher.path"
        raise ConfigError(f"{field}: cannot load a tokenizer: {one_line(error)}") from None
