"""The Flex-KD training objective, assembled from the pure losses:

    L = alpha * L_task(S) + beta * L_logit(S, T; tau) + gamma * sum_pairs L_feat

Inputs are model outputs, never models, so the same function serves an online teacher, a
teacher-target cache and anyone's own training loop.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from flexkd.method.layers import last_token_positions
from flexkd.method.losses import (
    causal_lm_loss,
    classification_loss,
    logit_distillation_loss,
    topk_logit_distillation_loss,
)
from flexkd.method.registry import FeatureLoss


@dataclass(frozen=True)
class ObjectiveSettings:
    """The weights and choices of the objective. The pipeline builds them from its config's ``loss``
    section (``LossConfig.objective_settings``), which holds the defaults.

    logit: one of :data:`flexkd.method.losses.LOGIT_LOSSES`; feature: the feature loss itself
    (:data:`flexkd.method.registry.FEATURE_LOSSES`), None for none; k: distilled units per layer pair.
    """

    task: Literal["classification", "generation"]
    alpha: float
    beta: float
    gamma: float
    temperature: float
    logit: str
    jsd_beta: float
    skew_alpha: float
    feature: FeatureLoss | None
    k: int


@dataclass(frozen=True)
class LayerPair:
    """Student block ``student_layer`` learns from teacher block ``teacher_layer``; ``k``: the
    units (directions) distilled at this pair, where it differs per layer (selection.k 'auto');
    None: the settings' k."""

    teacher_layer: int
    student_layer: int
    k: int | None = None

    @property
    def key(self) -> str:
        """``"<teacher>-<student>"``: the name of this pair's trained feature module."""
        return f"{self.teacher_layer}-{self.student_layer}"


@dataclass(frozen=True)
class CachedTeacherLogits:
    """The teacher's logit targets read from a teacher-target cache instead of a teacher forward.

    Classification: ``class_scores`` [B, C], the verbalizer logits, exact. Generation, at the N
    response positions of the batch in row-major order (those of :func:`response_logits`):
    ``topk_logits`` [N, K] the teacher's K largest raw logits, ``topk_ids`` [N, K] their token
    ids, ``logsumexp`` [N] the log-normalizer ``logsumexp(z / t)`` over all V raw logits at the
    temperature ``logsumexp_temperature`` = t (V: the vocabulary teacher and student share).
    """

    class_scores: Tensor | None = None
    topk_logits: Tensor | None = None
    topk_ids: Tensor | None = None
    logsumexp: Tensor | None = None
    logsumexp_temperature: float = 1.0


def cached_topk_logprobs(
    topk_logits: Tensor, logsumexp: Tensor, vocab_size: int, temperature: float, logsumexp_temperature: float = 1.0
) -> Tensor:
    """Teacher log-probs at temperature tau of the cached top-K tokens: [N, K], [N] -> [N, K].

    Exact when tau is the temperature t of the stored normalizer: ``z_i / t - logsumexp``.
    Otherwise the normalizer at tau needs the V - K logits the cache dropped; they are taken
    as equal, together holding the rest mass they hold at t (the one thing the cache knows
    about them). Spreading the tail evenly overestimates its mass for tau > t and
    underestimates it for tau < t (power-mean inequality); the error grows with the rest mass
    and with the distance from t, so a cache stores the normalizers of the temperatures a
    sweep tries (``targets.temperatures``).
    """
    z = topk_logits.to(torch.float64 if topk_logits.dtype == torch.float64 else torch.float32)
    anchor = logsumexp_temperature
    lse = logsumexp.to(z.dtype).unsqueeze(-1)
    if temperature == anchor:
        return z / temperature - lse
    topk_mass = torch.logsumexp(z / anchor - lse, dim=-1, keepdim=True).exp()
    # log of the rest mass at the anchor; rounding can make the top K hold "all" of it.
    rest = lse + torch.log1p(-topk_mass.clamp(max=1.0 - torch.finfo(z.dtype).eps))
    tail_count = max(vocab_size - z.shape[-1], 1)
    tail_logit = anchor * (rest - math.log(tail_count))  # each dropped token's raw logit, were all equal
    normalizer = torch.logsumexp(
        torch.cat([z / temperature, tail_logit / temperature + math.log(tail_count)], dim=-1), dim=-1, keepdim=True
    )
    return z / temperature - normalizer


def class_logits(logits: Tensor, attention_mask: Tensor, verbalizer_ids: Tensor) -> Tensor:
    """Verbalizer scores at the last prompt token.

    Args:
        logits: [B, T, V] causal-LM logits, or [B, 1, V] those of each row's last token only
            (:func:`forward_scored`). attention_mask: [B, T], right-padded.
        verbalizer_ids: [C] the first token of each label name.
    Returns: [B, C].
    """
    if logits.shape[1] == 1:
        return logits[:, 0][:, verbalizer_ids]
    rows = torch.arange(logits.shape[0], device=logits.device)
    return logits[rows, last_token_positions(attention_mask)][:, verbalizer_ids]


def response_logits(logits: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """Next-token logits at the positions whose target is a response token.

    Args: logits [B, T, V], or [N, V] already only at those positions (:func:`forward_scored`);
        labels [B, T] with -100 where there is no target.
    Returns: the selected logits [N, V] and the boolean position mask [B, T-1] that picked them.
    """
    targets = labels[:, 1:] != -100
    return (logits if logits.ndim == 2 else logits[:, :-1][targets]), targets


def scored_positions(task: str, batch: dict[str, Tensor]) -> Tensor:
    """The positions whose logits the objective reads, as Hugging Face's ``logits_to_keep``:
    [B, 1] each row's last token (classification), or bool [B, T] the positions whose next token
    is a response token (generation)."""
    if task == "classification":
        return last_token_positions(batch["attention_mask"]).unsqueeze(1)
    labels = batch["labels"]
    return torch.cat([labels[:, 1:] != -100, torch.zeros_like(labels[:, :1], dtype=torch.bool)], dim=1)


def forward_scored(
    model: torch.nn.Module, batch: dict[str, Tensor], task: str, layers: list[int]
) -> tuple[Tensor, dict[int, Tensor]]:
    """One forward that projects onto the vocabulary only where the objective reads logits.

    The vocabulary projection of every position is most of a small model's step (V is 49k for
    SmolLM2), and classification reads one position per row. Needs a model that takes
    ``logits_to_keep`` (Hugging Face causal LMs).

    Returns: logits [B, 1, V] (classification) or [N, V] (generation, the positions of
        :func:`response_logits` in row-major order), and hidden states {layer: [B, T, d]}.
    """
    outputs = model(
        input_ids=batch["input_ids"],
        attention_mask=batch["attention_mask"],
        output_hidden_states=True,
        use_cache=False,
        logits_to_keep=scored_positions(task, batch),
    )
    return outputs.logits, {layer: outputs.hidden_states[layer] for layer in layers}


def distillation_loss(
    settings: ObjectiveSettings,
    batch: dict[str, Tensor],
    student_logits: Tensor,
    student_hidden: dict[int, Tensor],
    teacher_logits: Tensor | CachedTeacherLogits | None,
    teacher_features: dict[int, Tensor],
    pairs: list[LayerPair],
    verbalizer_ids: Tensor | None = None,
    feature_modules: dict[str, torch.nn.Module] | None = None,
) -> dict[str, Tensor]:
    """All loss parts for one batch.

    Args:
        batch: ``input_ids``/``attention_mask``/``labels`` [B, T] and ``class_label`` [B].
        student_logits: [B, T, V], or only the scored positions (:func:`forward_scored`).
        student_hidden: student layer -> [B, T, d_S].
        teacher_logits: as student_logits; or the same targets read from a cache (:class:`CachedTeacherLogits`,
            whose generation part is compared on K + 1 bins by ``topk_logit_distillation_loss``);
            or None when beta == 0.
        teacher_features: teacher layer -> [B, T, k'] selected units in importance order (k' >= k), or
            [B, T, d_T] the whole hidden state for a loss that reads it (``FeatureLoss.whole_hidden``).
        feature_modules: ``LayerPair.key`` -> the module the feature loss trains for that pair, if any.
    Returns: ``task``, ``logit``, ``feature`` and the weighted ``total``, each a scalar.
    """
    zero = student_logits.new_zeros((), dtype=torch.promote_types(student_logits.dtype, torch.float32))
    mask = batch["attention_mask"]
    cached = isinstance(teacher_logits, CachedTeacherLogits)
    if settings.task == "classification":
        student_scores = class_logits(student_logits, mask, verbalizer_ids)
        task = classification_loss(student_scores, batch["class_label"])
        if cached:
            teacher_scores = teacher_logits.class_scores
        else:
            teacher_scores = None if teacher_logits is None else class_logits(teacher_logits, mask, verbalizer_ids)
    else:
        student_scores, targets = response_logits(student_logits, batch["labels"])
        if student_logits.ndim == 3:
            task = causal_lm_loss(student_logits, batch["labels"])
        else:  # the same mean next-token cross-entropy, from the scored positions only
            task = (
                F.cross_entropy(student_scores.float(), batch["labels"][:, 1:][targets].long())
                if student_scores.shape[0]
                else student_scores.sum() * 0.0
            )
        teacher_scores = (
            None if teacher_logits is None or cached else response_logits(teacher_logits, batch["labels"])[0]
        )

    logit = zero
    if settings.beta > 0 and student_scores.numel():
        if cached and settings.task == "generation":
            logit = _cached_topk_logit_loss(settings, student_scores, teacher_logits)
        elif teacher_scores is not None:
            logit = logit_distillation_loss(
                settings.logit,
                student_scores,
                teacher_scores.detach(),
                settings.temperature,
                settings.jsd_beta,
                settings.skew_alpha,
            )

    feature = zero
    if settings.gamma > 0 and settings.feature is not None:
        for pair in pairs:
            feature = feature + settings.feature(
                student_hidden[pair.student_layer],
                teacher_features[pair.teacher_layer].detach(),
                mask,
                settings.k if pair.k is None else pair.k,
                (feature_modules or {}).get(pair.key),
            )

    total = settings.alpha * task + settings.beta * logit + settings.gamma * feature
    return {"total": total, "task": task, "logit": logit, "feature": feature}


def _cached_topk_logit_loss(
    settings: ObjectiveSettings, student_scores: Tensor, teacher: CachedTeacherLogits
) -> Tensor:
    """[N, V] student logits at the response positions against the cached top-K teacher -> []."""
    if teacher.topk_logits is None or teacher.topk_logits.shape[0] != student_scores.shape[0]:
        cached_positions = None if teacher.topk_logits is None else teacher.topk_logits.shape[0]
        raise ValueError(
            f"the cache has {cached_positions} response positions for this batch, "
            f"the batch has {student_scores.shape[0]}: the targets belong to other rows"
        )
    log_probs = cached_topk_logprobs(
        teacher.topk_logits,
        teacher.logsumexp,
        student_scores.shape[-1],
        settings.temperature,
        teacher.logsumexp_temperature,
    )
    return topk_logit_distillation_loss(
        settings.logit,
        student_scores,
        log_probs,
        teacher.topk_ids,
        settings.temperature,
        settings.jsd_beta,
        settings.skew_alpha,
    )


def summed_task_loss(task: str, logits: Tensor, batch: dict[str, Tensor], verbalizer_ids: Tensor | None) -> Tensor:
    """Sum over examples of each example's own task loss: the loss that importance is scored on.

    A sum, not a mean, so that the gradient w.r.t. an example's hidden states is exactly
    dL(x)/dh for that example, whatever the batch size.

    Args: logits [B, T, V]; batch as in :func:`distillation_loss`. Returns a scalar.
    """
    if task == "classification":
        scores = class_logits(logits, batch["attention_mask"], verbalizer_ids).float()
        return torch.nn.functional.cross_entropy(scores, batch["class_label"], reduction="sum")
    targets = batch["labels"][:, 1:]
    token_losses = torch.nn.functional.cross_entropy(
        logits[:, :-1].float().transpose(1, 2), targets, ignore_index=-100, reduction="none"
    )
    counted = (targets != -100).sum(dim=1).clamp(min=1)
    return (token_losses.sum(dim=1) / counted).sum()


class StudentWithObjective(torch.nn.Module):
    """The student, the modules its feature loss trains (a projector per layer pair, say) and the
    objective, as one module; :func:`objective_module` builds it.

    Under FSDP2 the loss must be computed inside the root module's forward: that is when the
    root's parameters (embeddings, final norm, feature modules) are gathered.
    """

    def __init__(
        self,
        student: torch.nn.Module,
        settings: ObjectiveSettings,
        pairs: list[LayerPair],
        verbalizer_ids: Tensor | None,
        feature_modules: dict[str, torch.nn.Module] | None = None,
    ):
        super().__init__()
        self.student = student
        self.feature_modules = torch.nn.ModuleDict(feature_modules or {})
        # Counted before any sharding: what the feature loss adds to the student (metrics.json reports it).
        self.extra_trainable_parameters = sum(parameter.numel() for parameter in self.feature_modules.parameters())
        self.settings = settings
        self.pairs = pairs
        self.student_layers = sorted({pair.student_layer for pair in pairs})
        self.register_buffer("verbalizer_ids", verbalizer_ids, persistent=False)

    def forward(
        self,
        batch: dict[str, Tensor],
        teacher_logits: Tensor | CachedTeacherLogits | None,
        teacher_features: dict[int, Tensor],
        on_policy: bool = False,
        with_student: Callable[[torch.nn.Module], Any] | None = None,
    ) -> dict[str, Tensor] | Any:
        """The loss parts of one batch. ``on_policy``: the batch's responses are the student's own
        samples (:mod:`flexkd.method.on_policy`), so the task loss, whose targets would be its own
        guesses, is left out of the total. ``with_student``: instead, return
        ``with_student(student)``: how anything but the loss (the student sampling, say) runs a
        sharded student, since FSDP2 gathers the root's parameters only inside this forward."""
        if with_student is not None:
            return with_student(self.student)
        logits, hidden = forward_scored(self.student, batch, self.settings.task, self.student_layers)
        settings = replace(self.settings, alpha=0.0) if on_policy else self.settings
        # The losses in float32 even under bf16 autocast, which would run a projector's and CKA's
        # matmuls in bf16: too coarse for features this close to their targets.
        with torch.autocast(logits.device.type, enabled=False):
            return distillation_loss(
                settings,
                batch,
                logits,
                hidden,
                teacher_logits,
                teacher_features,
                self.pairs,
                self.verbalizer_ids,
                dict(self.feature_modules),
            )


def objective_module(
    student: torch.nn.Module,
    settings: ObjectiveSettings,
    pairs: list[LayerPair],
    verbalizer_ids: Tensor | None,
    d_teacher: int,
) -> StudentWithObjective:
    """The student with its objective and, when the feature loss trains a module, one freshly
    initialized module per layer pair (``FeatureLoss.module(d_S, d_T)``, d_S the student's width).

    Every caller (the distill stage, the speed benchmark's plain loop) builds the module here, so
    they train the same parameters from the same torch seed.
    """
    make = settings.feature.module if settings.feature is not None else None
    d_student = student.config.hidden_size
    modules = {pair.key: make(d_student, d_teacher) for pair in pairs} if make is not None else {}
    return StudentWithObjective(student, settings, pairs, verbalizer_ids, modules)
