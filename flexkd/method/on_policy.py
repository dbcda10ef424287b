"""On-policy distillation (GKD; Agarwal et al., 2024): some steps train on the student's own
sampled responses to the batch's prompts instead of the dataset's, with the teacher scoring each
token the student chose. A student trained only on fixed responses never sees the states its own
mistakes lead to (a sentence it has begun to repeat, say) and so never learns the way out of them;
on its own samples the teacher's distribution at exactly those states is the target.

Plain PyTorch on batches of token ids; the student is any causal LM with Hugging Face's
``generate``.
"""

from __future__ import annotations

import random

import torch
from torch import Tensor

from flexkd.method.decoding import left_padded
from flexkd.method.losses import IGNORE_INDEX, UNLABELED


def is_on_policy_step(seed: int, step: int, fraction: float) -> bool:
    """Whether training step ``step`` (0-based) trains on the student's own responses: a seeded
    draw with probability ``fraction`` (GKD's lambda), the same on every rank and on a rerun of
    that step after a restart."""
    if fraction <= 0:
        return False
    return random.Random(f"{seed}-{step}").random() < fraction


@torch.no_grad()
def sample_on_policy_batch(
    student,
    batch: dict[str, Tensor],
    max_length: int,
    max_new_tokens: int,
    temperature: float,
    pad_token_id: int,
    eos_token_id: int,
    seed: int,
    synced: bool = False,
) -> dict[str, Tensor]:
    """The batch's prompts with the student's sampled responses in place of the dataset's.

    Args:
        student: a causal LM (Hugging Face ``generate``), on the batch's device.
        batch: right-padded training rows: ``input_ids`` [B, T], ``prompt_length`` [B] (the prompt
            is ``input_ids[i, :prompt_length[i]]``) and ``example_id`` [B].
        max_length: the longest row: a prompt keeps its last ``max_length - max_new_tokens``
            tokens (as the data's rows, it is cut from the left), so no row outgrows the batches
            the run was sized for or the model's positions.
        max_new_tokens: the longest response sampled (below ``max_length``); one that has not
            ended by then is kept as it is, with no eos (the teacher scores the tokens it has).
        temperature: of the student's sampling, over its whole distribution (no top-k, no top-p).
        seed: seeds the sampling (the caller gives each step its own).
        synced: several ranks sample in lockstep (Hugging Face's ``synced_gpus``): a sharded
            model's every forward is collective, so a rank done early must go on stepping.
    Returns:
        A batch as ``flexkd.data.rows.collate_batch`` makes: ``input_ids``, ``attention_mask``,
        ``labels`` [B, T' <= max_length] right-padded (labels -100 on the prompt and the padding,
        the response and its eos otherwise), ``prompt_length`` [B] (after the cut),
        ``example_id`` [B] as given, ``class_label`` [B] all -1. The global random state is left
        as it was.
    """
    device = batch["input_ids"].device
    budget = max_length - max_new_tokens
    prompts = [row[:length][-budget:] for row, length in zip(batch["input_ids"], batch["prompt_length"].tolist())]
    prompt_ids, attention_mask = left_padded(prompts, pad_token_id, device)
    # Seeded without touching the training's own random state (a dropout mask, a shuffle).
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        generated = student.generate(
            input_ids=prompt_ids,
            attention_mask=attention_mask,
            max_new_tokens=max_new_tokens,
            do_sample=True,
            temperature=temperature,
            top_k=0,
            top_p=1.0,
            pad_token_id=pad_token_id,
            eos_token_id=eos_token_id,
            synced_gpus=synced,
        )[:, prompt_ids.shape[1] :].tolist()
    responses = [ids[: ids.index(eos_token_id) + 1] if eos_token_id in ids else ids for ids in generated]
    longest = max(len(prompt) + len(response) for prompt, response in zip(prompts, responses))
    input_ids = torch.full((len(prompts), longest), pad_token_id, dtype=torch.long)
    labels = torch.full_like(input_ids, IGNORE_INDEX)
    mask = torch.zeros_like(input_ids)
    for row, (prompt, response) in enumerate(zip(prompts, responses)):
        end = len(prompt) + len(response)
        input_ids[row, : len(prompt)] = prompt.cpu()
        input_ids[row, len(prompt) : end] = torch.tensor(response, dtype=torch.long)
        labels[row, len(prompt) : end] = torch.tensor(response, dtype=torch.long)
        mask[row, :end] = 1
    return {
        "input_ids": input_ids.to(device),
        "attention_mask": mask.to(device),
        "labels": labels.to(device),
        "prompt_length": torch.tensor([len(prompt) for prompt in prompts], device=device),
        "class_label": torch.full_like(batch["prompt_length"], UNLABELED),
        "example_id": batch["example_id"],
    }
