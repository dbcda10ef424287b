"""The task gradient's dominant directions: Flex-KD's functional subspace in a rotated basis.

Unit importance scores each coordinate of a teacher hidden state on its own. When the task
gradient g = dL_task/dh_l spreads over many units but lies in few *directions*, no set of units
holds it, while the top eigenvectors of

    G_l = sum over examples x and valid tokens t of g g^T          [d, d]

do: the directions u with the largest u^T G u are where a change of the hidden state changes the
task loss most (on average, to first order). Distilling the coordinates U_k^T h of those
directions into the student's first k units is the rotated counterpart of distilling the top-k
units. ``u^T G u`` over ``tr(G)`` is the share of the gradient's energy a direction holds; for a
unit j it is ``G[j, j] / tr(G)``, so units and directions are compared in one currency.

G is summed (never averaged) in float64, so sums over batches and ranks can be all-reduced
before :func:`top_directions` decomposes it once.
"""

from __future__ import annotations

import torch
from torch import Tensor


def gradient_gram(grad: Tensor, mask: Tensor) -> Tensor:
    """Sum of the outer products g g^T of the gradients at the valid tokens.

    Args:
        grad: [B, T, d] gradient of the task loss w.r.t. a hidden state.
        mask: [B, T] bool or 0/1, 1 = valid token.

    Returns:
        [d, d] float64 ``sum_{valid b, t} grad[b, t] grad[b, t]^T``, symmetric positive semidefinite.
    """
    if grad.ndim != 3 or mask.shape != grad.shape[:2]:
        raise ValueError(f"expected grad [B, T, d] and mask [B, T], got {tuple(grad.shape)}, {tuple(mask.shape)}")
    # Boolean indexing, not a multiply: padded positions may hold inf/NaN and 0 * inf is NaN.
    valid = grad[mask.to(device=grad.device, dtype=torch.bool)].to(torch.float64)  # [N, d]
    return valid.T @ valid


def top_directions(gram: Tensor, k_max: int) -> tuple[Tensor, Tensor]:
    """The k_max directions holding most of the gradient energy, and the whole spectrum.

    Eigenvectors come out of ``eigh`` with an arbitrary sign; each is flipped so that its entry of
    largest magnitude (the first such, on a tie) is positive, so one G gives one basis everywhere.

    Args:
        gram: [d, d] symmetric positive semidefinite (:func:`gradient_gram`, summed).
        k_max: number of directions to return, 1 <= k_max <= d.

    Returns:
        basis [d, k_max] float64 orthonormal columns, by eigenvalue descending (ties keep
        ``eigh``'s order); spectrum [d] float64 all eigenvalues, descending, clamped at 0
        against rounding.
    """
    if gram.ndim != 2 or gram.shape[0] != gram.shape[1]:
        raise ValueError(f"expected a square [d, d] matrix, got shape {tuple(gram.shape)}")
    if not 1 <= k_max <= gram.shape[0]:
        raise ValueError(f"k_max = {k_max} must be between 1 and d = {gram.shape[0]}")
    if not torch.isfinite(gram).all():
        raise ValueError("the gradient Gram matrix contains NaN or inf")
    eigenvalues, eigenvectors = torch.linalg.eigh(gram.to(torch.float64))  # ascending
    spectrum = eigenvalues.flip(0).clamp_min(0.0)
    basis = eigenvectors.flip(1)[:, :k_max]
    largest = basis.abs().argmax(dim=0)  # [k_max]
    signs = torch.sign(basis[largest, torch.arange(k_max, device=basis.device)])
    return basis * signs, spectrum


def _total_energy(spectrum: Tensor) -> Tensor:
    total = spectrum.sum()
    if not total > 0:
        raise ValueError("the task gradient is zero at this layer: no direction carries any energy")
    return total


def direction_energy_share(spectrum: Tensor, k: int) -> float:
    """Share of tr(G) the top-k directions hold: ``sum(spectrum[:k]) / sum(spectrum)``.

    Args:
        spectrum: [d] eigenvalues of G, descending (:func:`top_directions`).
        k: number of directions, 1 <= k <= d.

    Returns:
        The share in [0, 1].
    """
    if not 1 <= k <= spectrum.numel():
        raise ValueError(f"k = {k} must be between 1 and d = {spectrum.numel()}")
    return float(spectrum[:k].sum() / _total_energy(spectrum))


def unit_energy_share(gram: Tensor, units: Tensor) -> float:
    """Share of tr(G) a set of coordinate units holds: ``sum_j G[j, j] / tr(G)`` over the units.

    Args:
        gram: [d, d] (:func:`gradient_gram`, summed).
        units: [k] distinct unit indices.

    Returns:
        The share in [0, 1]; never more than :func:`direction_energy_share` at the same k.
    """
    diagonal = gram.diagonal().to(torch.float64)
    return float(diagonal[units.to(gram.device)].sum() / _total_energy(diagonal))


def auto_k(spectrum: Tensor, energy: float, k_max: int) -> int:
    """The smallest k whose top-k directions hold ``energy`` of tr(G), at most ``k_max``.

    Args:
        spectrum: [d] eigenvalues of G, descending.
        energy: wanted share, 0 < energy <= 1.
        k_max: the cap, e.g. the student's width.

    Returns:
        k with 1 <= k <= k_max.
    """
    if not 0 < energy <= 1:
        raise ValueError(f"energy = {energy} must be in (0, 1]")
    if k_max < 1:
        raise ValueError(f"k_max = {k_max} must be at least 1")
    shares = spectrum.to(torch.float64).cumsum(0) / _total_energy(spectrum)
    # The cumulative share reaches 1 only up to rounding: a relative 1e-12 slack lets energy 1.0
    # stop at the gradient's rank instead of running to d.
    short = int((shares < energy - 1e-12).sum())
    return min(short + 1, k_max)


def project_onto_directions(hidden: Tensor, basis: Tensor) -> Tensor:
    """Coordinates of hidden states on the directions: ``U^T h`` per token.

    Computed in float32 at least, autocast or not: each coordinate sums d products, which bf16
    would round to about two digits. A basis for k_max directions serves every k <= k_max, as
    ``result[..., :k]`` equals the projection on ``basis[:, :k]``.

    Args:
        hidden: [B, T, d] hidden states.
        basis: [d, k] orthonormal directions (:func:`top_directions`).

    Returns:
        [B, T, k] coordinates, float32 (float64 if either input is float64).
    """
    if hidden.shape[-1] != basis.shape[0] or basis.ndim != 2:
        raise ValueError(f"hidden [..., d] and basis [d, k] disagree: {tuple(hidden.shape)}, {tuple(basis.shape)}")
    dtype = torch.promote_types(torch.promote_types(hidden.dtype, basis.dtype), torch.float32)
    with torch.autocast(hidden.device.type, enabled=False):
        return hidden.to(dtype) @ basis.to(device=hidden.device, dtype=dtype)
