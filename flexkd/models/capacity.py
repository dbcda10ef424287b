"""What a pipeline needs from a GPU cluster, by arithmetic over model configs: the peak memory of
one rank in each stage, the teacher-target cache on disk, and the FLOPs of a step.

Parameters are counted on models built on the meta device (no weights, no memory), so a 70B
teacher is planned in a second on a laptop. Everything else is a formula over the shapes, stated
here so a reader can check it; the numbers are estimates of the peak, not measurements
(``scripts/gpu_smoke.sh`` records measured peaks to compare with).

Memory of one rank (bytes; N ranks share a stage's models when FSDP shards them, else N = 1):

* weights: parameters x bytes per parameter / N. A frozen teacher in ``teacher.dtype``; the
  student's float32 master weights (FSDP2 keeps the sharded parameters float32 under bf16
  mixed precision).
* grads + optimizer: the student's float32 gradients (4) and AdamW's two float32 moments (8),
  per parameter, / N.
* gathered: the FSDP units unsharded at one time, in compute dtype: the root (embeddings, LM
  head, final norm), the block computing and the block prefetched. 0 without sharding.
* activations, per token of the rank's batch: a Llama-shaped block keeps ``8h + 3kv + 4I``
  values for its backward (norm inputs and outputs, q, k, v and their rotated copies, the
  attention output, the residual, and gate, up, act(gate) and their product; SDPA attention keeps
  no T x T scores), in compute dtype. x layers without activation checkpointing; with it, only
  each block's input (``h``) x layers, plus one block's full set while it is recomputed; and 3h
  for the final norm and the LM head (a forward's saved tensors, measured, agree within a few
  percent: tests/test_capacity.py). A
  forward without gradient (targets, evaluate, the online teacher) holds one block's set
  transiently plus every hidden state the forward returns (``output_hidden_states``).
* logits: [rows, positions, V] tensors at the step's peak. Positions: 1 per row where the
  stage reads one (classification in distill, targets and evaluate), every position otherwise
  (score always computes them all; generation reads the responses, at most every position).
  Bytes per value: the model's output in compute dtype, plus for a loss a float32 copy, its
  log-softmax and its gradient (12), for a teacher's targets a float32 copy and log-softmax (8);
  score's classification loss reads only the class logits, so there it is the output and its
  gradient.

FLOPs of a step (the whole job): 2 x parameters x tokens for a forward, 6 x for a training step
(forward, and backward for activations and weights), 4 x for score's backward to the hidden
states without weight gradients; activation checkpointing adds one forward (2 x). Attention's
own FLOPs (about 4 x layers x T x h per token) are left out, as in the usual 6 x P x tokens.

The cache (stage targets, ``training.teacher: cache``), per token: the stored units of each
mapped teacher layer in float16, the row's input_ids and labels (int32), and for generation the
top-K logits (float32), their ids (int32) and one logsumexp per temperature (float32). Parquet's
compression is not counted: float16 activations barely compress.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace

from transformers import PretrainedConfig

from flexkd.config.schema import ConfigError, PipelineConfig
from flexkd.models.loading import build_on_meta
from flexkd.models.plan import (
    TEACHER_DTYPES,
    load_pipeline_tokenizer,
    plan_models,
    student_model_config,
    teacher_model_config,
)

GB = 1e9
H100_BF16_DENSE_FLOPS = 989e12  # H100 SXM, dense bf16 tensor cores
DEFAULT_MFU = 0.40
# Kept free on every GPU for the CUDA context, NCCL's buffers and the allocator's fragmentation.
RESERVED_FRACTION = 0.10
STAGES = ("score", "targets", "distill", "evaluate")


@dataclass(frozen=True)
class ModelShape:
    """What the formulas need of one model, read from its config and counted on the meta device."""

    parameters: int  # tied weights counted once
    root_parameters: int  # outside the decoder blocks: the FSDP root unit
    block_parameters: int  # the largest decoder block
    layers: int
    hidden: int
    kv_dim: int
    intermediate: int
    vocab: int

    @classmethod
    def of(cls, config: PretrainedConfig) -> ModelShape:
        model = build_on_meta(config)
        blocks = model.get_decoder().layers
        block_sizes = [sum(parameter.numel() for parameter in block.parameters()) for block in blocks]
        parameters = sum(parameter.numel() for parameter in model.parameters())
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        return cls(
            parameters=parameters,
            root_parameters=parameters - sum(block_sizes),
            block_parameters=max(block_sizes),
            layers=config.num_hidden_layers,
            hidden=config.hidden_size,
            kv_dim=config.num_key_value_heads * head_dim,
            intermediate=config.intermediate_size,
            vocab=config.vocab_size,
        )

    @property
    def block_activation_values(self) -> int:
        """Values one block keeps per token for its backward (see the module docstring)."""
        return 8 * self.hidden + 3 * self.kv_dim + 4 * self.intermediate

    def kept_values_per_token(self, checkpointing: bool) -> int:
        """Values per token a forward keeps for its backward: every block's set, or with
        checkpointing only each block's input; plus the final norm's input and output and the
        LM head's input (3h). tests/test_capacity.py measures it on a real forward."""
        per_block = self.hidden if checkpointing else self.block_activation_values
        return self.layers * per_block + 3 * self.hidden

    def gathered(self, compute_bytes: int) -> float:
        """FSDP units unsharded at once: the root, the block computing and the one prefetched."""
        return (self.root_parameters + 2 * self.block_parameters) * compute_bytes


@dataclass(frozen=True)
class Hardware:
    gpus: int
    memory: float  # bytes per GPU
    peak_flops: float = H100_BF16_DENSE_FLOPS
    mfu: float = DEFAULT_MFU

    @property
    def usable(self) -> float:
        return self.memory * (1 - RESERVED_FRACTION)


@dataclass(frozen=True)
class StagePlan:
    stage: str
    ranks: int  # GPUs the stage runs on at once (FSDP ranks, or one per actor/task)
    rows: int  # per rank and step
    sequence: int
    memory: dict[str, float]  # bytes per rank at the step's peak, by part
    flops: float  # one step of the whole job
    runs: bool = True
    note: str = ""

    @property
    def total(self) -> float:
        return sum(self.memory.values())

    def fits(self, hardware: Hardware) -> bool:
        return self.total <= hardware.usable

    def seconds_per_step(self, hardware: Hardware) -> float:
        return self.flops / (self.ranks * hardware.peak_flops * hardware.mfu)


@dataclass(frozen=True)
class PipelinePlan:
    source: str
    hardware: Hardware
    teacher: ModelShape
    student: ModelShape
    stages: list[StagePlan]
    cache_bytes_per_token: float
    cache_parts: str
    settings: dict[str, str] = field(default_factory=dict)

    def not_fitting(self) -> list[StagePlan]:
        return [stage for stage in self.stages if stage.runs and not stage.fits(self.hardware)]


def _activations(
    shape: ModelShape, tokens: int, compute_bytes: int, checkpointing: bool, backward: bool, kept_hidden: int = 0
) -> float:
    """Activation bytes of one rank: a training-like pass (``backward``) or a forward without
    gradient that returns ``kept_hidden`` hidden states."""
    if not backward:
        return tokens * (shape.block_activation_values + kept_hidden * shape.hidden) * compute_bytes
    recomputed = shape.block_activation_values if checkpointing else 0  # one block's set, in the backward
    return tokens * (shape.kept_values_per_token(checkpointing) + recomputed) * compute_bytes


def plan_score(
    teacher: ModelShape,
    hardware: Hardware,
    rows: int,
    sequence: int,
    teacher_bytes: int,
    task: str,
    checkpointing: bool,
    sharded: bool = True,
    skipped_block_forwards: bool = False,
) -> StagePlan:
    """Score: the frozen teacher, FSDP-sharded over every GPU, forward and backward to its hidden
    states; ``rows`` per rank (scoring.batch_size is per worker). ``skipped_block_forwards``
    (student.layer_selection perplexity): one more no-grad forward per block, each with that block
    skipped, after the step's graph is freed, so they add time and not memory."""
    shards = hardware.gpus if sharded else 1
    tokens = rows * sequence
    logit_bytes = 2 * teacher_bytes if task == "classification" else 2 * teacher_bytes + 12
    memory = {
        "weights": teacher.parameters * teacher_bytes / shards,
        "grads+optimizer": 0.0,
        "gathered": teacher.gathered(teacher_bytes) if shards > 1 else 0.0,
        "activations": _activations(teacher, tokens, teacher_bytes, checkpointing, backward=True),
        "logits": tokens * teacher.vocab * logit_bytes,
    }
    factor = 4 + (2 if checkpointing else 0) + (2 * teacher.layers if skipped_block_forwards else 0)
    note = f"+ {teacher.layers} forwards with a block skipped" if skipped_block_forwards else ""
    return StagePlan(
        "score", hardware.gpus, rows, sequence, memory, factor * teacher.parameters * tokens * hardware.gpus, note=note
    )


def plan_distill(
    student: ModelShape,
    teacher: ModelShape | None,
    hardware: Hardware,
    rows: int,
    sequence: int,
    student_compute_bytes: int,
    teacher_bytes: int,
    task: str,
    checkpointing: bool,
    sharded: bool = True,
) -> StagePlan:
    """Distill: the student trained with FSDP over every GPU, and with ``teacher`` (online) the
    frozen teacher sharded beside it; None: the teacher's side is read from the cache. ``rows``
    per rank (training.batch_size / GPUs)."""
    shards = hardware.gpus if sharded else 1
    tokens = rows * sequence
    positions = rows if task == "classification" else tokens
    student_activations = _activations(student, tokens, student_compute_bytes, checkpointing, backward=True)
    memory = {
        "weights": student.parameters * 4 / shards,
        "grads+optimizer": student.parameters * 12 / shards,
        "gathered": student.gathered(student_compute_bytes) if shards > 1 else 0.0,
        "activations": student_activations,
        "logits": positions * student.vocab * (student_compute_bytes + 12),
    }
    flops = (6 + (2 if checkpointing else 0)) * student.parameters * tokens * hardware.gpus
    if teacher is not None:
        memory["weights"] += teacher.parameters * teacher_bytes / shards
        if shards > 1:  # the teacher's units are gathered and freed before the student's forward
            memory["gathered"] = max(memory["gathered"], teacher.gathered(teacher_bytes))
        teacher_forward = _activations(
            teacher, tokens, teacher_bytes, False, backward=False, kept_hidden=teacher.layers + 1
        )
        memory["activations"] = max(student_activations, teacher_forward)
        memory["logits"] += positions * teacher.vocab * (teacher_bytes + 8)
        flops += 2 * teacher.parameters * tokens * hardware.gpus
    return StagePlan("distill", hardware.gpus, rows, sequence, memory, flops)


def plan_targets(teacher: ModelShape, hardware: Hardware, rows: int, sequence: int, teacher_bytes: int, task: str):
    """Targets: a Ray Data actor per GPU, each with the whole teacher (no sharding), forwards
    without gradient over ``rows`` rows (targets.batch_size)."""
    tokens = rows * sequence
    positions = rows if task == "classification" else tokens
    memory = {
        "weights": teacher.parameters * teacher_bytes,
        "grads+optimizer": 0.0,
        "gathered": 0.0,
        "activations": _activations(teacher, tokens, teacher_bytes, False, False, kept_hidden=teacher.layers + 1),
        "logits": positions * teacher.vocab * (teacher_bytes + 8),
    }
    return StagePlan("targets", hardware.gpus, rows, sequence, memory, 2 * teacher.parameters * tokens * hardware.gpus)


def plan_evaluate(
    teacher: ModelShape,
    student: ModelShape,
    hardware: Hardware,
    rows: int,
    sequence: int,
    new_tokens: int,
    teacher_bytes: int,
    task: str,
) -> StagePlan:
    """Evaluate: one Ray task on one GPU, the whole teacher, then the whole float32 student;
    the larger of the two. Generation also decodes ``new_tokens`` with a KV cache and scores
    perplexity over every position."""
    candidates = []
    for shape, weight_bytes in ((teacher, teacher_bytes), (student, 4)):
        tokens = rows * sequence
        if task == "classification":
            activations = _activations(shape, tokens, weight_bytes, False, False)
            logits = rows * shape.vocab * (weight_bytes + 8)
        else:
            kv_cache = rows * (sequence + new_tokens) * shape.layers * 2 * shape.kv_dim * weight_bytes
            activations = kv_cache + _activations(shape, tokens, weight_bytes, False, False)
            logits = tokens * shape.vocab * (weight_bytes + 8)
        candidates.append(
            {
                "weights": shape.parameters * weight_bytes,
                "grads+optimizer": 0.0,
                "gathered": 0.0,
                "activations": activations,
                "logits": logits,
            }
        )
    memory = max(candidates, key=lambda parts: sum(parts.values()))
    decoded = rows * (sequence + (new_tokens if task == "generation" else 0))
    flops = 2 * (teacher.parameters + student.parameters) * decoded
    return StagePlan("evaluate", 1, rows, sequence, memory, flops, note="one GPU, one model at a time")


def cache_bytes_per_token(mapped_layers: int, units: int, task: str, top_k: int, temperatures: int) -> float:
    """Bytes the teacher-target cache stores per training token (see the module docstring)."""
    per_token = mapped_layers * units * 2 + 4 + 4  # float16 units; input_ids and labels as int32
    if task == "generation":
        per_token += top_k * (4 + 4) + 4 * temperatures
    return per_token


def parse_memory(text: str) -> float:
    """'80GB', '80 GB', '141GiB', '80' (GB) -> bytes; ConfigError otherwise."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(GB|GiB|G)?\s*", text, flags=re.IGNORECASE)
    if match is None:
        raise ConfigError(f"--gpu-memory {text!r}: expected a size such as 80GB or 141GiB")
    unit = (match.group(2) or "GB").lower()
    return float(match.group(1)) * (2**30 if unit == "gib" else GB)


def model_shapes(config: PipelineConfig) -> tuple[ModelShape, ModelShape]:
    """The teacher's and the student's shapes; both with the shared tokenizer's vocabulary when the
    teacher is random (a random teacher's config has none of its own)."""
    teacher_config, student_config = teacher_model_config(config), student_model_config(config)
    if config.teacher.source == "random":
        vocab = len(load_pipeline_tokenizer(config))
        teacher_config.vocab_size = vocab
    student_config.vocab_size = teacher_config.vocab_size
    return ModelShape.of(teacher_config), ModelShape.of(student_config)


def plan_pipeline(config: PipelineConfig, hardware: Hardware, source: str = "<config>") -> PipelinePlan:
    """Every stage of ``config`` on ``hardware`` (its GPUs are the score and distill ranks)."""
    teacher, student = model_shapes(config)
    teacher_bytes = TEACHER_DTYPES[config.teacher.dtype].itemsize
    student_bytes = 2 if config.training.precision == "bf16" else 4
    task, sequence = config.task.kind, config.data.max_length
    checkpointing = config.training.activation_checkpointing
    # Activation checkpointing stays off for a pruning score stage (see stages/score.py).
    score_checkpointing = checkpointing and config.student.init != "prune_from_teacher"
    cached = config.training.teacher == "cache"
    distill_rows = max(1, config.training.batch_size // hardware.gpus)
    targets = plan_targets(teacher, hardware, config.targets.batch_size, sequence, teacher_bytes, task)
    stages = [
        plan_score(
            teacher,
            hardware,
            config.scoring.batch_size,
            sequence,
            teacher_bytes,
            task,
            score_checkpointing,
            skipped_block_forwards=config.student.layer_selection == "perplexity",  # only a pruned student's
        ),
        replace(targets, runs=cached, note="" if cached else "runs with training.teacher: cache"),
        plan_distill(
            student,
            None if cached else teacher,
            hardware,
            distill_rows,
            sequence,
            student_bytes,
            teacher_bytes,
            task,
            checkpointing,
        ),
        plan_evaluate(
            teacher,
            student,
            hardware,
            config.evaluation.batch_size,
            sequence,
            config.evaluation.max_new_tokens,
            teacher_bytes,
            task,
        ),
    ]
    models = plan_models(config)
    mapped = (
        len(models.teacher_layer_indices) if models.layer_pairs is not None else models.student_layers
    )  # blocks an importance-pruned student keeps: known after score, as many as the student's
    units = models.teacher_hidden if config.targets.full_width else (config.targets.k_max or models.k)
    top_k = min(config.targets.top_k_logits, teacher.vocab)
    temperatures = len(set(config.targets.temperatures))
    parts = f"{mapped} layers x {units} units float16"
    if task == "generation":
        parts += f" + top-{top_k} logits"
    return PipelinePlan(
        source=source,
        hardware=hardware,
        teacher=teacher,
        student=student,
        stages=stages,
        cache_bytes_per_token=cache_bytes_per_token(mapped, units, task, top_k, temperatures),
        cache_parts=parts,
        settings={
            "teacher": f"{_count(teacher.parameters)} parameters, {config.teacher.dtype}",
            "student": f"{_count(student.parameters)} parameters, {config.training.precision}",
            "sequence": str(sequence),
            "activation checkpointing": "on" if checkpointing else "off",
        },
    )


def _size(value: float) -> str:
    """GB with as many decimals as a small model needs."""
    if value == 0:
        return "-"
    value /= GB
    return (
        f"{value:.0f}"
        if value >= 100
        else f"{value:.1f}"
        if value >= 1
        else f"{value:.2f}"
        if value >= 0.01
        else "<0.01"
    )


def _number(value: float) -> str:
    return f"{value:,.0f}" if value >= 100 else f"{value:.3g}"


def _count(parameters: int) -> str:
    return f"{parameters / 1e9:.2f}B" if parameters >= 1e9 else f"{parameters / 1e6:.1f}M"


def format_plan(plan: PipelinePlan) -> str:
    """The plan as a table: one row per stage, sizes in GB (10^9 bytes) per rank."""
    hardware = plan.hardware
    lines = [
        f"{plan.source}: {hardware.gpus} GPU(s) of {hardware.memory / GB:.0f} GB "
        f"({hardware.usable / GB:.1f} GB usable, {RESERVED_FRACTION:.0%} kept for CUDA, NCCL and fragmentation); "
        f"{hardware.peak_flops / 1e12:.0f} TFLOP/s peak at {hardware.mfu:.0%} MFU",
        "; ".join(f"{name} {value}" for name, value in plan.settings.items()),
        f"{'stage':<9}{'GPUs':>5}{'rows':>6}{'weights':>9}{'grad+opt':>9}{'gathered':>9}{'activ.':>8}"
        f"{'logits':>8}{'total':>8}  fits  {'TFLOP/step':>10}{'s/step':>8}",
    ]
    for stage in plan.stages:
        memory = stage.memory
        fits = ("yes" if stage.fits(hardware) else "NO ") if stage.runs else "  - "
        lines.append(
            f"{stage.stage:<9}{stage.ranks:>5}{stage.rows:>6}{_size(memory['weights']):>9}"
            f"{_size(memory['grads+optimizer']):>9}{_size(memory['gathered']):>9}{_size(memory['activations']):>8}"
            f"{_size(memory['logits']):>8}{_size(stage.total):>8}  {fits}  {_number(stage.flops / 1e12):>10}"
            f"{_number(stage.seconds_per_step(hardware)):>8}" + (f"  ({stage.note})" if stage.note else "")
        )
    per_token = plan.cache_bytes_per_token
    lines.append(
        f"teacher-target cache: {per_token / 1e3:.3g} kB per token ({plan.cache_parts}), "
        f"{per_token * 1e9 / 1e12:.3g} TB per 1B tokens"
    )
    return "\n".join(lines)


def fit_warning(plan: PipelinePlan) -> str | None:
    """One line naming the first stage that does not fit, or None."""
    misfits = plan.not_fitting()
    if not misfits:
        return None
    stage = misfits[0]
    largest = max(stage.memory, key=stage.memory.get)
    return (
        f"the plan does not fit {plan.hardware.memory / GB:.0f} GB per GPU: {stage.stage} needs "
        f"{stage.total / GB:.1f} GB per rank ({largest} {stage.memory[largest] / GB:.1f} GB); "
        f"see flexkd plan {plan.source}"
    )
