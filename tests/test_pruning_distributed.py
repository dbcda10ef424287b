"""Pruning scores from an FSDP2-sharded teacher, as the score stage collects them on two ranks.

The collector hooks the blocks and their ``o_proj`` / ``down_proj``. Under FSDP2 each block is a
``fully_shard`` unit whose parameters are gathered in its own pre-forward hook and freed after
it, and re-gathered for the backward. The collector reads activations only, so the sharded
teacher must give the same sums as a whole one; this fails if a hook saw a sharded tensor, fired
in the wrong order, or lost its gradient. The loss with each block skipped (layer_selection
'perplexity') runs every block, skipped or not, so its all-gathers stay in step on both ranks.
"""

from __future__ import annotations

from pathlib import Path

import torch
from gloo_ranks import run_on_two_ranks
from transformers import LlamaConfig, LlamaForCausalLM

from flexkd import distributed as fd
from flexkd.method.layers import forward_with_hidden_states
from flexkd.prune.scores import (
    SCORE_KEYS,
    PruningScoreCollector,
    collect_pruning_scores,
    skipped_block_loss_sums,
)


def _teacher() -> LlamaForCausalLM:
    config = LlamaConfig(
        vocab_size=128,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    return LlamaForCausalLM(config).requires_grad_(False).eval()


def _batch() -> dict[str, torch.Tensor]:
    """4 rows of 12 tokens; rows 1 and 3 are right-padded."""
    input_ids = torch.randint(0, 128, (4, 12), generator=torch.Generator().manual_seed(7))
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, 8:] = 0
    attention_mask[3, 5:] = 0
    return {"input_ids": input_ids, "attention_mask": attention_mask}


def _lm_loss(logits: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    targets = torch.where(batch["attention_mask"][:, 1:].bool(), batch["input_ids"][:, 1:], -100)
    return torch.nn.functional.cross_entropy(
        logits[:, :-1].transpose(1, 2), targets, ignore_index=-100, reduction="sum"
    )


def _scores_on_this_rank(out: str) -> None:
    teacher = fd.shard_model(_teacher(), trainable=False)
    assert isinstance(teacher.model.layers[0], fd.FSDPModule)
    batch = {key: value.chunk(2)[fd.rank()] for key, value in _batch().items()}
    # As the score worker does: the hidden states the Flex-KD importance needs and the
    # collector's activations from one autograd.grad.
    with PruningScoreCollector(teacher) as collector, torch.enable_grad():
        logits, hidden = forward_with_hidden_states(teacher, batch["input_ids"], batch["attention_mask"], [3])
        torch.autograd.grad(_lm_loss(logits, batch), [hidden[3]] + collector.activations())
        collector.accumulate(batch["attention_mask"])
        with collector.paused():  # as the score worker does, once the step's scores are in
            skip_loss = skipped_block_loss_sums(teacher, batch, _lm_loss)
    for tensor in [*collector.sums.values(), skip_loss]:
        fd.all_reduce_sum_(tensor)
    if fd.is_main_process():
        torch.save(collector.state() | {"skip_loss": skip_loss}, Path(out) / "sharded.pt")


def test_a_sharded_teacher_gives_the_scores_of_a_whole_one(tmp_path: Path) -> None:
    run_on_two_ranks(_scores_on_this_rank, str(tmp_path))
    sharded = torch.load(tmp_path / "sharded.pt", weights_only=True)
    whole = collect_pruning_scores(_teacher(), [_batch()], _lm_loss)
    for key in SCORE_KEYS:
        assert sharded[key].shape == whole[key].shape, key
        torch.testing.assert_close(sharded[key], whole[key], rtol=1e-4, atol=1e-5, msg=lambda m, key=key: f"{key}: {m}")
    assert (whole["residual"] > 0).all() and (whole["mlp"] > 0).any() and (whole["attention"] > 0).all()
    whole_skip_loss = skipped_block_loss_sums(_teacher(), _batch(), _lm_loss)
    torch.testing.assert_close(sharded["skip_loss"], whole_skip_loss, rtol=1e-4, atol=1e-4)
