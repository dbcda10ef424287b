"""Task-gradient importance of teacher hidden units (Flex-KD, docs/DESIGN.md section 1.1).

The paper's score for layer l and unit j is
``I_l[j] = (1/N) * sum_x sum_t |dL_task(x) / dh_{l,t,j}|``.
Sums and example counts are kept apart so that a distributed caller can
all-reduce both before dividing once with :func:`finalize_importance`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

IMPORTANCE_SCORES = ("grad", "grad_x_act", "fisher")


def unit_importance_sum(grad: Tensor, hidden: Tensor, mask: Tensor, score: str = "grad") -> Tensor:
    """Sums a per-token importance score over examples and valid tokens.

    Args:
        grad: [B, T, d] gradient of the task loss w.r.t. ``hidden``.
        hidden: [B, T, d] hidden states (only read by ``"grad_x_act"``).
        mask: [B, T] bool or 0/1, 1 = valid token.
        score: ``"grad"`` |g| (the paper's score), ``"grad_x_act"`` |g*h|
            (first-order Taylor) or ``"fisher"`` g^2.

    Returns:
        [d] unnormalised sum, float32 (float64 if the gradient is float64).
    """
    if score not in IMPORTANCE_SCORES:
        raise ValueError(f"importance score {score!r} is not one of {IMPORTANCE_SCORES}")
    if grad.shape != hidden.shape or grad.ndim != 3 or mask.shape != grad.shape[:2]:
        raise ValueError(
            f"expected grad and hidden [B, T, d] and mask [B, T], got "
            f"{tuple(grad.shape)}, {tuple(hidden.shape)}, {tuple(mask.shape)}"
        )
    dtype = torch.promote_types(grad.dtype, torch.float32)
    grad = grad.to(dtype)
    if score == "grad":
        per_token = grad.abs()
    elif score == "grad_x_act":
        per_token = (grad * hidden.to(dtype)).abs()
    else:
        per_token = grad.square()
    # where, not multiply: padded positions may hold inf/NaN and 0 * inf is NaN.
    valid = mask.to(device=grad.device, dtype=torch.bool).unsqueeze(-1)
    return torch.where(valid, per_token, 0.0).sum(dim=(0, 1))


def finalize_importance(unit_sum: Tensor, num_examples: int | Tensor) -> Tensor:
    """Turns an (all-reduced) importance sum into the per-example mean.

    Args:
        unit_sum: [d] output of :func:`unit_importance_sum`, summed over batches/ranks.
        num_examples: N, the number of scored examples (int or 0-d tensor).

    Returns:
        [d] importance ``unit_sum / N``.
    """
    if float(num_examples) <= 0:
        raise ValueError(f"num_examples must be positive to average importance, got {float(num_examples)}")
    return unit_sum / torch.as_tensor(num_examples, dtype=unit_sum.dtype, device=unit_sum.device)


def hidden_state_gradients(loss: Tensor, hidden_states: Sequence[Tensor]) -> list[Tensor]:
    """Gradients of a scalar loss w.r.t. hidden states, leaving parameter ``.grad`` untouched.

    Build ``loss`` as a SUM over examples of per-example losses (e.g.
    ``reduction="sum"``), not a mean: examples do not interact in a forward
    pass, so each example's slice of the result is then exactly its own
    dL(x)/dh, which is what the importance score averages. The hidden states
    must be in the autograd graph; with a frozen teacher that means making the
    input embeddings require grad.

    Args:
        loss: [] scalar task loss.
        hidden_states: tensors of shape [B, T, d_l], e.g. HF ``hidden_states[l]``.

    Returns:
        One [B, T, d_l] gradient per hidden state, in the same order.
    """
    if loss.ndim != 0:
        raise ValueError(f"loss must be a scalar, got shape {tuple(loss.shape)}")
    return list(torch.autograd.grad(loss, list(hidden_states)))
