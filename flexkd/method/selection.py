"""Choosing which teacher units to distil (docs/DESIGN.md section 1.2).

A selection is an ordered LongTensor [k]: student unit i is paired with
teacher unit ``indices[i]``. Orders are chosen so that the selection for a
smaller k is a prefix of the selection for a larger k.
"""

from __future__ import annotations

import torch
from torch import Tensor


def resolve_k(k: int | None, d_student: int, d_teacher: int) -> int:
    """Returns the number of distilled units, defaulting to the student's width.

    Args:
        k: requested ``selection.k``, or None for ``d_student``.
        d_student: student hidden size.
        d_teacher: teacher hidden size.

    Returns:
        k with ``1 <= k <= min(d_student, d_teacher)``.
    """
    bound = min(d_student, d_teacher)
    resolved = d_student if k is None else k
    source = f"selection.k (defaulted to d_student) = {resolved}" if k is None else f"selection.k = {resolved}"
    if resolved < 1:
        raise ValueError(f"{source} must be at least 1")
    if resolved > bound:
        raise ValueError(f"{source} exceeds min(d_student={d_student}, d_teacher={d_teacher}) = {bound}")
    return resolved


def _check_k(k: int, num_units: int) -> None:
    if not 1 <= k <= num_units:
        raise ValueError(f"k = {k} must be between 1 and the number of units {num_units}")


def select_top_k_units(importance: Tensor, k: int) -> Tensor:
    """Indices of the k most important units, most important first.

    Ties go to the lower index (stable sort), so the result for k is always a
    prefix of the result for k + 1.

    Args:
        importance: [d] finite scores.
        k: number of units to keep.

    Returns:
        [k] int64 indices into the d units.
    """
    if importance.ndim != 1:
        raise ValueError(f"importance must be 1-D [d], got shape {tuple(importance.shape)}")
    _check_k(k, importance.numel())
    if not torch.isfinite(importance).all():
        raise ValueError("importance contains NaN or inf; the ranking would be meaningless")
    order = torch.sort(importance, descending=True, stable=True).indices
    return order[:k]


def select_random_units(d_teacher: int, k: int, seed: int) -> Tensor:
    """k distinct teacher units drawn uniformly with a private seeded generator.

    Args:
        d_teacher: number of teacher units.
        k: number of units to draw.
        seed: generator seed; the same seed gives the same order on every machine.

    Returns:
        [k] int64 indices, a prefix of one random permutation of range(d_teacher).
    """
    _check_k(k, d_teacher)
    generator = torch.Generator().manual_seed(seed)
    return torch.randperm(d_teacher, generator=generator)[:k]


def activation_moments(hidden: Tensor, mask: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Per-unit first and second moment sums over valid tokens.

    Float64, so that ``E[x^2] - E[x]^2`` keeps its precision after summing many
    tokens (and after an all-reduce of the three outputs across ranks).

    Args:
        hidden: [B, T, d] hidden states.
        mask: [B, T] bool or 0/1, 1 = valid token.

    Returns:
        ([d] sum of x, [d] sum of x^2, [] number of valid tokens), all float64.
    """
    if hidden.ndim != 3 or mask.shape != hidden.shape[:2]:
        raise ValueError(f"expected hidden [B, T, d] and mask [B, T], got {tuple(hidden.shape)}, {tuple(mask.shape)}")
    valid = mask.to(device=hidden.device, dtype=torch.bool)
    values = hidden[valid].to(torch.float64)
    count = valid.sum().to(torch.float64)
    return values.sum(dim=0), values.square().sum(dim=0), count


def variance_from_moments(unit_sum: Tensor, unit_sum_sq: Tensor, count: Tensor) -> Tensor:
    """Population variance per unit from the sums of :func:`activation_moments`.

    Args:
        unit_sum: [d] sum of x.
        unit_sum_sq: [d] sum of x^2.
        count: [] number of tokens.

    Returns:
        [d] variance, clamped at 0 against rounding.
    """
    if float(count) <= 0:
        raise ValueError(f"count must be positive to compute a variance, got {float(count)}")
    mean = unit_sum / count
    return (unit_sum_sq / count - mean.square()).clamp_min(0.0)


def select_variance_units(variance: Tensor, k: int) -> Tensor:
    """The no-gradient baseline: top-k units by activation variance.

    Args:
        variance: [d] per-unit activation variance.
        k: number of units to keep.

    Returns:
        [k] int64 indices, highest variance first.
    """
    return select_top_k_units(variance, k)


def selection_overlap(a: Tensor, b: Tensor) -> float:
    """Jaccard similarity |a & b| / |a | b| of two index sets (order ignored).

    Args:
        a: [k_a] unit indices.
        b: [k_b] unit indices.

    Returns:
        Overlap in [0, 1]; 1.0 when both are empty.
    """
    set_a, set_b = set(a.tolist()), set(b.tolist())
    union = set_a | set_b
    return len(set_a & set_b) / len(union) if union else 1.0


def selection_rank_correlation(a: Tensor, b: Tensor) -> float:
    """Spearman rank correlation of two ordered selections over the union of their units.

    A unit's rank in a selection is its position (0 = most important). A unit that a selection
    does not contain is tied behind all of its selected units: it gets the mean of the ranks that
    selection leaves free (``len(a) .. |union| - 1``). The ranks are then correlated (Pearson),
    which is Spearman's rho with ties averaged. Identical orders give 1, reversed orders -1.

    Args:
        a: [k_a] ordered unit indices, most important first.
        b: [k_b] ordered unit indices.

    Returns:
        rho in [-1, 1]; 1.0 when the union holds a single unit (there is nothing to order).
    """
    units = sorted(set(a.tolist()) | set(b.tolist()))
    if len(units) < 2:
        return 1.0
    ranks_a, ranks_b = _union_ranks(a, units), _union_ranks(b, units)
    centred_a, centred_b = ranks_a - ranks_a.mean(), ranks_b - ranks_b.mean()
    denominator = centred_a.norm() * centred_b.norm()
    if denominator == 0:  # an empty selection orders nothing
        return 0.0
    return float((centred_a @ centred_b) / denominator)


def _union_ranks(selection: Tensor, units: list[int]) -> Tensor:
    """[len(units)] float64 ranks of ``units`` in ``selection``, unselected units tied last."""
    position = {unit: rank for rank, unit in enumerate(selection.tolist())}
    tied_rank = (len(position) + len(units) - 1) / 2  # mean of the free ranks len(position) .. len(units)-1
    return torch.tensor([float(position.get(unit, tied_rank)) for unit in units], dtype=torch.float64)
