"""Prompts batched for Hugging Face ``generate``, shared by every place that decodes: the teacher
writing SeqKD responses, the student sampling on-policy rows, the evaluation's greedy outputs."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor


def left_padded(
    prompts: Sequence[Sequence[int] | Tensor], pad_token_id: int, device: torch.device | None = None
) -> tuple[Tensor, Tensor]:
    """``prompts`` (token ids, of any lengths) as one batch that ends where each prompt ends.

    ``generate`` appends every row's new tokens after the batch's last column, so a prompt must
    end there: the padding goes on the left, masked out.

    Returns:
        ``input_ids`` and ``attention_mask``, both [B, W] long on ``device``, W the longest prompt:
        row i is ``pad_token_id`` (mask 0) then ``prompts[i]`` (mask 1).
    """
    width = max(len(prompt) for prompt in prompts)
    # Built where the prompts are (lists: the CPU) and moved once: a row at a time onto a GPU
    # would be one copy per row.
    home = prompts[0].device if isinstance(prompts[0], Tensor) else torch.device("cpu")
    input_ids = torch.full((len(prompts), width), pad_token_id, dtype=torch.long, device=home)
    attention_mask = torch.zeros_like(input_ids)
    for row, prompt in enumerate(prompts):
        input_ids[row, width - len(prompt) :] = torch.as_tensor(prompt, dtype=torch.long, device=home)
        attention_mask[row, width - len(prompt) :] = 1
    return input_ids.to(device), attention_mask.to(device)
