"""The Flex-KD training objective, assembled from the pure losses:

    L = alpha * L_task(S) + beta * L_logit(S, T; tau) + gamma * sum_pairs L_feat

Inputs are model outputs, never models, so the same function serves an online teacher, a
teacher-target cache and anyone's own training loop.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from flexkd.layers import forward_with_hidden_states, last_token_positions
from flexkd.losses import (
    causal_lm_loss,
    classification_loss,
    correlation_loss,
    linear_cka_loss,
    logit_distillation_loss,
    mse_feature_loss,
    projector_mse_loss,
)


@dataclass(frozen=True)
class ObjectiveSettings:
    """The weights and choices of the objective (mirrors the config's ``loss`` section)."""

    task: Literal["classification", "generation"]
    alpha: float = 1.0
    beta: float = 1.0
    gamma: float = 1.0
    temperature: float = 2.0
    logit: str = "forward_kl"
    jsd_beta: float = 0.5
    skew_alpha: float = 0.1
    feature: str = "correlation"
    k: int = 0


@dataclass(frozen=True)
class LayerPair:
    """Student block ``student_layer`` learns from teacher block ``teacher_layer``."""

    teacher_layer: int
    student_layer: int


def class_logits(logits: Tensor, attention_mask: Tensor, verbalizer_ids: Tensor) -> Tensor:
    """Verbalizer scores at the last prompt token.

    Args:
        logits: [B, T, V] causal-LM logits. attention_mask: [B, T], right-padded.
        verbalizer_ids: [C] the first token of each label name.
    Returns: [B, C].
    """
    rows = torch.arange(logits.shape[0], device=logits.device)
    return logits[rows, last_token_positions(attention_mask)][:, verbalizer_ids]


def response_logits(logits: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """Next-token logits at the positions whose target is a response token.

    Args: logits [B, T, V]; labels [B, T] with -100 where there is no target.
    Returns: the selected logits [N, V] and the boolean position mask [B, T-1] that picked them.
    """
    targets = labels[:, 1:] != -100
    return logits[:, :-1][targets], targets


def feature_loss(
    kind: str,
    student_hidden: Tensor,
    teacher_hidden: Tensor,
    attention_mask: Tensor,
    k: int,
    projector: torch.nn.Module | None = None,
) -> Tensor:
    """One mapped pair's feature loss.

    Args:
        student_hidden: [B, T, d_S]. Unit i of the student is paired with column i of teacher_hidden.
        teacher_hidden: [B, T, k'] the teacher's selected units in importance order (k' >= k),
            or its whole hidden state for the selection-free baselines (cka, projector).
        attention_mask: [B, T].
    """
    if kind == "correlation":
        return correlation_loss(student_hidden[..., :k], teacher_hidden[..., :k], attention_mask)
    if kind == "mse":
        return mse_feature_loss(student_hidden[..., :k], teacher_hidden[..., :k], attention_mask)
    if kind == "cka":
        return linear_cka_loss(student_hidden, teacher_hidden, attention_mask)
    if kind == "projector":
        if projector is None:
            raise ValueError("loss.feature 'projector' needs a LinearProjector per layer pair")
        return projector_mse_loss(projector, student_hidden, teacher_hidden, attention_mask)
    raise ValueError(f"unknown loss.feature {kind!r}")


def distillation_loss(
    settings: ObjectiveSettings,
    batch: dict[str, Tensor],
    student_logits: Tensor,
    student_hidden: dict[int, Tensor],
    teacher_logits: Tensor | None,
    teacher_features: dict[int, Tensor],
    pairs: list[LayerPair],
    verbalizer_ids: Tensor | None = None,
    projectors: dict[str, torch.nn.Module] | None = None,
) -> dict[str, Tensor]:
    """All loss parts for one batch.

    Args:
        batch: ``input_ids``/``attention_mask``/``labels`` [B, T] and ``class_label`` [B].
        student_logits: [B, T, V]. student_hidden: student layer -> [B, T, d_S].
        teacher_logits: [B, T, V], or None when beta == 0.
        teacher_features: teacher layer -> [B, T, k'] selected units (or [B, T, d_T], see feature_loss).
        projectors: ``"<teacher>-<student>"`` -> LinearProjector, for the projector baseline.
    Returns: ``task``, ``logit``, ``feature`` and the weighted ``total``, each a scalar.
    """
    zero = student_logits.new_zeros(())
    mask = batch["attention_mask"]
    if settings.task == "classification":
        student_scores = class_logits(student_logits, mask, verbalizer_ids)
        task = classification_loss(student_scores, batch["class_label"])
        teacher_scores = None if teacher_logits is None else class_logits(teacher_logits, mask, verbalizer_ids)
    else:
        task = causal_lm_loss(student_logits, batch["labels"])
        student_scores, targets = response_logits(student_logits, batch["labels"])
        teacher_scores = None if teacher_logits is None else teacher_logits[:, :-1][targets]

    logit = zero
    if settings.beta > 0 and teacher_scores is not None and student_scores.numel():
        logit = logit_distillation_loss(settings.logit, student_scores, teacher_scores.detach(),
                                        settings.temperature, settings.jsd_beta, settings.skew_alpha)

    feature = zero
    if settings.gamma > 0 and settings.feature != "none":
        for pair in pairs:
            projector = (projectors or {}).get(f"{pair.teacher_layer}-{pair.student_layer}")
            feature = feature + feature_loss(settings.feature, student_hidden[pair.student_layer],
                                             teacher_features[pair.teacher_layer].detach(), mask,
                                             settings.k, projector)

    total = settings.alpha * task + settings.beta * logit + settings.gamma * feature
    return {"total": total, "task": task, "logit": logit, "feature": feature}


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
        logits[:, :-1].float().transpose(1, 2), targets, ignore_index=-100, reduction="none")
    counted = (targets != -100).sum(dim=1).clamp(min=1)
    return (token_losses.sum(dim=1) / counted).sum()


class StudentWithObjective(torch.nn.Module):
    """The student, its projectors (projector baseline only) and the objective, as one module.

    Under FSDP2 the loss must be computed inside the root module's forward: that is when the
    root's parameters (embeddings, final norm, projectors) are gathered.
    """

    def __init__(self, student: torch.nn.Module, settings: ObjectiveSettings, pairs: list[LayerPair],
                 verbalizer_ids: Tensor | None, projectors: dict[str, torch.nn.Module] | None = None):
        super().__init__()
        self.student = student
        self.projectors = torch.nn.ModuleDict(projectors or {})
        self.settings = settings
        self.pairs = pairs
        self.student_layers = sorted({pair.student_layer for pair in pairs})
        self.register_buffer("verbalizer_ids", verbalizer_ids, persistent=False)

    def forward(self, batch: dict[str, Tensor], teacher_logits: Tensor | None,
                teacher_features: dict[int, Tensor]) -> dict[str, Tensor]:
        logits, hidden = forward_with_hidden_states(self.student, batch["input_ids"], batch["attention_mask"],
                                                    self.student_layers)
        return distillation_loss(self.settings, batch, logits, hidden, teacher_logits, teacher_features,
                                 self.pairs, self.verbalizer_ids, dict(self.projectors))
