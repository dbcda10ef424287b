"""Distillation and task losses as plain tensor functions (docs/DESIGN.md sections 1.3 and 1.4).

Everything is computed in float32, or float64 when given float64. Teacher
tensors are used as given: produce them under ``torch.no_grad()``.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F
from torch import Tensor

UNLABELED = -1  # the class label of a row without one (data.transfer): the task loss leaves it out
IGNORE_INDEX = -100  # a label that is not a target (prompt, padding), as Hugging Face's
LOGIT_LOSSES = ("forward_kl", "reverse_kl", "jsd", "skew_kl", "tvd")


def _compute_dtype(*tensors: Tensor) -> torch.dtype:
    return functools.reduce(torch.promote_types, [tensor.dtype for tensor in tensors], torch.float32)


def _valid_tokens(student: Tensor, teacher: Tensor, mask: Tensor, same_width: bool) -> tuple[Tensor, Tensor]:
    """[B, T, d_s], [B, T, d_t], [B, T] mask -> [M, d_s], [M, d_t] rows of the M valid tokens."""
    shapes = f"student {tuple(student.shape)}, teacher {tuple(teacher.shape)}, mask {tuple(mask.shape)}"
    if student.ndim != 3 or teacher.ndim != 3 or not student.shape[:2] == teacher.shape[:2] == mask.shape:
        raise ValueError(f"expected features [B, T, d] and mask [B, T], got {shapes}")
    if same_width and student.shape != teacher.shape:
        raise ValueError(f"student and teacher features must have the same shape, got {shapes}")
    dtype = _compute_dtype(student, teacher)
    # Indexing (not multiplying by the mask) keeps padded values, even inf/NaN, out of forward and backward.
    valid = mask.to(device=student.device, dtype=torch.bool)
    return student[valid].to(dtype), teacher[valid].to(dtype)


def correlation_loss(student: Tensor, teacher: Tensor, mask: Tensor, eps: float = 1e-6) -> Tensor:
    """Flex-KD feature loss ``1 - mean_i corr_i``, Pearson per unit over the batch's valid tokens.

    ``corr_i = cov_i / sqrt((var_s_i + eps) * (var_t_i + eps))``: eps on each variance keeps
    value and gradient finite for a constant unit (whose corr is then 0).

    Args:
        student: [B, T, k] the student's first k units; teacher: [B, T, k] the selected teacher
            units in pairing order; mask: [B, T] bool or 0/1, 1 = valid token.

    Returns:
        [] loss in [0, 2]; 0 (attached to the graph) if no token is valid.
    """
    s, t = _valid_tokens(student, teacher, mask, same_width=True)
    if s.shape[0] == 0:
        return s.sum() * 0.0
    s, t = s - s.mean(dim=0), t - t.mean(dim=0)
    cov = (s * t).mean(dim=0)
    corr = cov / torch.sqrt((s.square().mean(dim=0) + eps) * (t.square().mean(dim=0) + eps))
    return 1.0 - corr.mean()


def mse_feature_loss(student: Tensor, teacher: Tensor, mask: Tensor) -> Tensor:
    """[B, T, k], [B, T, k], mask [B, T] -> [] mean squared error over valid tokens and units (0 if none)."""
    s, t = _valid_tokens(student, teacher, mask, same_width=True)
    squared_error = (s - t).square()
    return squared_error.sum() / max(squared_error.numel(), 1)


def linear_cka_loss(student: Tensor, teacher: Tensor, mask: Tensor, eps: float = 1e-12) -> Tensor:
    """``1 - linear CKA`` (Kornblith et al. 2019) of the centered valid-token features.

    CKA = ||Y^T X||_F^2 / (||X^T X||_F ||Y^T Y||_F) compares Gram structure, so d_s != d_t
    needs no projector. eps keeps value and gradient finite for constant features (CKA 0).

    Args:
        student: [B, T, d_s]; teacher: [B, T, d_t]; mask: [B, T], 1 = valid token.

    Returns:
        [] loss in [0, 1].
    """
    x, y = _valid_tokens(student, teacher, mask, same_width=False)
    x, y = x - x.mean(dim=0), y - y.mean(dim=0)
    # CKA is scale invariant; unit Frobenius norm first keeps the 4th-power terms from overflowing float32.
    x = x / torch.sqrt(x.square().sum() + eps)
    y = y / torch.sqrt(y.square().sum() + eps)
    cross = (y.T @ x).square().sum()
    return 1.0 - cross / torch.sqrt((x.T @ x).square().sum() * (y.T @ y).square().sum() + eps)


class LinearProjector(torch.nn.Module):
    """Learned linear map d_s -> d_t with bias, the usual projector baseline: [..., d_s] -> [..., d_t]."""

    def __init__(self, d_student: int, d_teacher: int) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(d_student, d_teacher)

    def forward(self, student: Tensor) -> Tensor:
        return self.linear(student)


def _projected_squared_error(projector: torch.nn.Module, student: Tensor, teacher: Tensor) -> Tensor:
    """[M, d_s] student rows, [M, d_t] targets -> [] mean squared error of the projected rows (0 if M == 0)."""
    projected = projector(student.to(next(projector.parameters()).dtype)).to(teacher.dtype)
    squared_error = (projected - teacher).square()
    return squared_error.sum() / max(squared_error.numel(), 1)


def projector_mse_loss(projector: torch.nn.Module, student: Tensor, teacher: Tensor, mask: Tensor) -> Tensor:
    """The paper's projector baseline: MSE between projected student features and the raw, detached
    teacher features, mean over valid tokens and teacher units.

    Args:
        projector: maps [M, d_s] -> [M, d_t], e.g. :class:`LinearProjector`.
        student: [B, T, d_s]; teacher: [B, T, d_t]; mask: [B, T], 1 = valid token.

    Returns:
        [] loss; 0 (attached to the graph) if no token is valid.
    """
    s, t = _valid_tokens(student, teacher.detach(), mask, same_width=False)
    return _projected_squared_error(projector, s, t)


def standardized_projector_mse_loss(
    projector: torch.nn.Module, student: Tensor, teacher: Tensor, mask: Tensor, eps: float = 1e-6
) -> Tensor:
    """MSE between projected student features and per-unit standardized, detached teacher features.

    Standardizing over the batch's valid tokens stops the teacher's few huge-magnitude
    units from dominating the MSE; eps is the variance floor.

    Args:
        projector: maps [M, d_s] -> [M, d_t], e.g. :class:`LinearProjector`.
        student: [B, T, d_s]; teacher: [B, T, d_t]; mask: [B, T], 1 = valid token.

    Returns:
        [] loss; 0 (attached to the graph) if no token is valid.
    """
    s, t = _valid_tokens(student, teacher.detach(), mask, same_width=False)
    t = (t - t.mean(dim=0)) / torch.sqrt(t.var(dim=0, unbiased=False) + eps)
    return _projected_squared_error(projector, s, t)


def _safe_log_probs(log_probs: Tensor) -> Tensor:
    # A finite floor instead of -inf (masked vocabulary, fp16 cache underflow) avoids 0 * inf = NaN.
    return log_probs.clamp_min(math.log(torch.finfo(log_probs.dtype).tiny))


def _kl_per_position(log_p: Tensor, log_q: Tensor) -> Tensor:
    """KL(p || q) along the last axis: [N, V] log-probs -> [N]."""
    return (log_p.exp() * (log_p - log_q)).sum(dim=-1)


def _log_mixture(log_p: Tensor, log_q: Tensor, weight_p: float) -> Tensor:
    """log(w * p + (1 - w) * q) for 0 < w < 1 without leaving log space: [N, V] -> [N, V]."""
    log_weights = torch.tensor([weight_p, 1.0 - weight_p], dtype=log_p.dtype, device=log_p.device).log()
    return torch.logsumexp(torch.stack([log_p, log_q]) + log_weights.view(2, 1, 1), dim=0)


def _divergence_per_position(kind: str, log_t: Tensor, log_s: Tensor, beta: float, alpha: float) -> Tensor:
    """[N, V] teacher and student log-probs -> [N] divergence of the given kind."""
    if kind == "forward_kl" or (kind == "jsd" and beta == 0.0) or (kind == "skew_kl" and alpha == 0.0):
        return _kl_per_position(log_t, log_s)
    if kind == "reverse_kl" or (kind == "jsd" and beta == 1.0):
        return _kl_per_position(log_s, log_t)
    if kind == "jsd":
        log_m = _log_mixture(log_t, log_s, beta)
        return beta * _kl_per_position(log_t, log_m) + (1.0 - beta) * _kl_per_position(log_s, log_m)
    if kind == "skew_kl":
        return _kl_per_position(log_t, _log_mixture(log_t, log_s, alpha))
    return 0.5 * (log_t.exp() - log_s.exp()).abs().sum(dim=-1)


def _check_logit_loss_args(kind: str, temperature: float, jsd_beta: float, skew_alpha: float) -> None:
    if kind not in LOGIT_LOSSES:
        raise ValueError(f"logit loss {kind!r} is not one of {LOGIT_LOSSES}")
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    if not 0.0 <= jsd_beta <= 1.0:
        raise ValueError(f"jsd_beta must be in [0, 1], got {jsd_beta}")
    if not 0.0 <= skew_alpha < 1.0:
        raise ValueError(f"skew_alpha must be in [0, 1), got {skew_alpha}")


def _mean_over_positions(per_position: Tensor, temperature: float) -> Tensor:
    # tau^2 keeps gradient magnitudes comparable across temperatures (Hinton et al. 2015).
    return per_position.sum() / max(per_position.shape[0], 1) * temperature**2


def logit_distillation_loss(
    kind: str,
    student_logits: Tensor,
    teacher_logits: Tensor,
    temperature: float = 1.0,
    jsd_beta: float = 0.5,
    skew_alpha: float = 0.1,
) -> Tensor:
    """Logit KD of the given kind on ``softmax(logits / tau)``, mean over positions, times tau^2.

    With p_T the teacher's and p_S the student's distribution: ``forward_kl`` KL(p_T||p_S);
    ``reverse_kl`` KL(p_S||p_T); ``jsd`` the generalized JSD of TRL's GKDTrainer,
    beta*KL(p_T||m) + (1-beta)*KL(p_S||m) with m = beta*p_T + (1-beta)*p_S, and, as in
    TRL, exactly forward KL at beta=0 and reverse KL at beta=1 (where the formula itself
    vanishes); ``skew_kl`` DistiLLM's KL(p_T || alpha*p_T + (1-alpha)*p_S); ``tvd``
    0.5*sum|p_T - p_S|. Ranges: tau > 0, jsd_beta in [0, 1], skew_alpha in [0, 1).

    Args:
        kind: one of :data:`LOGIT_LOSSES`.
        student_logits: [N, V]; teacher_logits: [N, V], at the already-selected positions.

    Returns:
        [] loss; 0 (attached to the graph) if N == 0.
    """
    _check_logit_loss_args(kind, temperature, jsd_beta, skew_alpha)
    if student_logits.ndim != 2 or student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"expected student and teacher logits [N, V] over one vocabulary, got "
            f"{tuple(student_logits.shape)}, {tuple(teacher_logits.shape)}"
        )
    dtype = _compute_dtype(student_logits, teacher_logits)
    log_p_student = _safe_log_probs(F.log_softmax(student_logits.to(dtype) / temperature, dim=-1))
    log_p_teacher = _safe_log_probs(F.log_softmax(teacher_logits.to(dtype) / temperature, dim=-1))
    per_position = _divergence_per_position(kind, log_p_teacher, log_p_student, jsd_beta, skew_alpha)
    return _mean_over_positions(per_position, temperature)


def forward_kl(student_logits: Tensor, teacher_logits: Tensor, temperature: float = 1.0) -> Tensor:
    """KL(p_T || p_S): [N, V], [N, V] -> []; see :func:`logit_distillation_loss`."""
    return logit_distillation_loss("forward_kl", student_logits, teacher_logits, temperature)


def reverse_kl(student_logits: Tensor, teacher_logits: Tensor, temperature: float = 1.0) -> Tensor:
    """KL(p_S || p_T): [N, V], [N, V] -> []; see :func:`logit_distillation_loss`."""
    return logit_distillation_loss("reverse_kl", student_logits, teacher_logits, temperature)


def generalized_jsd(
    student_logits: Tensor, teacher_logits: Tensor, temperature: float = 1.0, beta: float = 0.5
) -> Tensor:
    """TRL/GKD generalized JSD(beta): [N, V], [N, V] -> []; see :func:`logit_distillation_loss`."""
    return logit_distillation_loss("jsd", student_logits, teacher_logits, temperature, jsd_beta=beta)


def skew_kl(student_logits: Tensor, teacher_logits: Tensor, temperature: float = 1.0, alpha: float = 0.1) -> Tensor:
    """KL(p_T || alpha*p_T + (1-alpha)*p_S): [N, V], [N, V] -> []; see :func:`logit_distillation_loss`."""
    return logit_distillation_loss("skew_kl", student_logits, teacher_logits, temperature, skew_alpha=alpha)


def total_variation(student_logits: Tensor, teacher_logits: Tensor, temperature: float = 1.0) -> Tensor:
    """0.5 * sum|p_T - p_S|: [N, V], [N, V] -> []; see :func:`logit_distillation_loss`."""
    return logit_distillation_loss("tvd", student_logits, teacher_logits, temperature)


def teacher_topk(teacher_logits: Tensor, k: int, temperature: float = 1.0) -> tuple[Tensor, Tensor]:
    """[N, V] logits -> the teacher's K most likely tokens: ([N, K] log-probs at tau, descending; [N, K] ids).

    The log-probs are ``log_softmax(teacher_logits / tau)``, what the top-K loss expects.
    """
    if not 1 <= k <= teacher_logits.shape[-1]:
        raise ValueError(f"top-K k = {k} must be between 1 and the vocabulary size {teacher_logits.shape[-1]}")
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    log_probs = F.log_softmax(teacher_logits.to(_compute_dtype(teacher_logits)) / temperature, dim=-1)
    top = torch.topk(log_probs, k, dim=-1)
    return top.values, top.indices


def topk_logit_distillation_loss(
    kind: str,
    student_logits: Tensor,
    teacher_topk_logprobs: Tensor,
    teacher_topk_ids: Tensor,
    temperature: float = 1.0,
    jsd_beta: float = 0.5,
    skew_alpha: float = 0.1,
) -> Tensor:
    """Logit KD against a cached top-K teacher, on K+1 bins: the K tokens plus "the rest".

    Temperature convention: ``teacher_topk_logprobs`` are already at tau, i.e. from
    ``log_softmax(teacher_logits / tau)`` as :func:`teacher_topk` returns them; only the
    student is divided by tau here. The teacher's rest bin holds max(0, 1 - sum of its K
    probs), the student's its exact mass outside the K ids. Divergences, tau^2 and the mean
    are those of :func:`logit_distillation_loss`; with K == V the two losses agree.

    Args:
        kind: one of :data:`LOGIT_LOSSES`; student_logits: [N, V].
        teacher_topk_logprobs: [N, K]; teacher_topk_ids: [N, K] integer ids, distinct within a row.

    Returns:
        [] loss; 0 (attached to the graph) if N == 0.
    """
    _check_logit_loss_args(kind, temperature, jsd_beta, skew_alpha)
    if student_logits.ndim != 2 or teacher_topk_logprobs.shape != teacher_topk_ids.shape:
        shapes = [tuple(t.shape) for t in (student_logits, teacher_topk_logprobs, teacher_topk_ids)]
        raise ValueError(f"expected student logits [N, V] and teacher top-K log-probs and ids [N, K], got {shapes}")
    dtype = _compute_dtype(student_logits, teacher_topk_logprobs)
    scaled = student_logits.to(dtype) / temperature
    log_normalizer = torch.logsumexp(scaled, dim=-1, keepdim=True)
    ids = teacher_topk_ids.long()  # caches may store int32
    student_in_topk = scaled.gather(-1, ids) - log_normalizer
    # A finite stand-in for -inf at the K ids keeps logsumexp's gradient finite even when K == V.
    outside_topk = scaled.scatter(-1, ids, torch.finfo(dtype).min)
    student_rest = torch.logsumexp(outside_topk, dim=-1, keepdim=True) - log_normalizer
    teacher_in_topk = teacher_topk_logprobs.to(dtype)
    # Rounding can push the teacher's rest mass to or below 0; the clamp also keeps log's gradient finite.
    teacher_rest_mass = -torch.expm1(torch.logsumexp(teacher_in_topk, dim=-1, keepdim=True))
    teacher_rest = teacher_rest_mass.clamp_min(torch.finfo(dtype).tiny).log()
    log_p_student = _safe_log_probs(torch.cat([student_in_topk, student_rest], dim=-1))
    log_p_teacher = _safe_log_probs(torch.cat([teacher_in_topk, teacher_rest], dim=-1))
    per_position = _divergence_per_position(kind, log_p_teacher, log_p_student, jsd_beta, skew_alpha)
    return _mean_over_positions(per_position, temperature)


def causal_lm_loss(logits: Tensor, labels: Tensor) -> Tensor:
    """Next-token cross-entropy: [B, T, V] logits, [B, T] labels -> [] mean over counted tokens.

    logits[:, :-1] predict labels[:, 1:]; labels are -100 at prompt and padding positions
    and are not counted. 0 (attached to the graph) if no token is counted.
    """
    shifted_logits = logits[:, :-1].reshape(-1, logits.shape[-1]).to(_compute_dtype(logits))
    shifted_labels = labels[:, 1:].reshape(-1)
    summed = F.cross_entropy(shifted_logits, shifted_labels, ignore_index=-100, reduction="sum")
    return summed / (shifted_labels != -100).sum().clamp_min(1)


def classification_loss(class_logits: Tensor, labels: Tensor) -> Tensor:
    """Cross-entropy over classes, the mean over the labeled rows: [B, C] logits, [B] int64 labels -> [].

    A row labeled ``UNLABELED`` (an unlabeled transfer row) adds nothing; a batch of only such rows
    gives 0 (with a zero gradient), not the NaN of a mean over no rows."""
    summed = F.cross_entropy(
        class_logits.to(_compute_dtype(class_logits)), labels, ignore_index=UNLABELED, reduction="sum"
    )
    return summed / (labels != UNLABELED).sum().clamp(min=1)
