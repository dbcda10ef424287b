"""Importance of the parts of a teacher that a pruned student may drop: residual-stream units,
MLP channels, attention key/value groups and whole blocks.

Removing a unit, channel or head sets its activation to zero, so the natural score is the
first-order change of the task loss when that happens, |dL/da * a| (``"grad_x_act"``, the
default; ``"grad"`` and ``"fisher"`` are accepted too). A residual unit is removed from every
block at once, so it is scored at every block's output (aggregate the rows with
:func:`flexkd.pruning.hidden_units_by_importance`). A block's score is how much it changes the
hidden state, ``1 - cos(h_in, h_out)`` per token (blocks that barely rotate the residual stream
are the cheapest to drop). A block can also be scored by what skipping it costs: the task loss
with its output replaced by its input (:func:`skipped_block_loss_sums`, one forward per block).

As in :mod:`flexkd.importance`, everything is a sum with its counts kept apart, so that ranks
can all-reduce the sums before anyone ranks anything.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor
from transformers import PreTrainedModel

from flexkd.method.importance import unit_importance_sum
from flexkd.method.layers import forward_with_hidden_states

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")
SCORE_KEYS = ("residual", "mlp", "attention", "block_change", "examples", "tokens")


def check_supported_architecture(config: Any) -> None:
    """Refuses, in one line, a model whose blocks are not Llama-shaped."""
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(
            f"pruning supports llama-family models ({', '.join(SUPPORTED_MODEL_TYPES)}); got {model_type!r}"
        )


def mlp_channel_importance_sum(grad: Tensor, activation: Tensor, mask: Tensor, score: str = "grad_x_act") -> Tensor:
    """Summed importance of each MLP channel, read at the input of ``down_proj``.

    Args:
        grad: [B, T, I] gradient of the task loss w.r.t. the ``down_proj`` input.
        activation: [B, T, I] that input, ``act(gate(x)) * up(x)``.
        mask: [B, T] 1 = valid token.
        score: as in :func:`flexkd.importance.unit_importance_sum`.

    Returns:
        [I] float32 sum over examples and valid tokens.
    """
    return unit_importance_sum(grad, activation, mask, score)


def kv_group_importance_sum(
    grad: Tensor, activation: Tensor, mask: Tensor, num_kv_heads: int, score: str = "grad_x_act"
) -> Tensor:
    """Summed importance of each key/value group, read at the input of ``o_proj``.

    A group is one KV head and the query heads sharing it (consecutive query heads, as HF's
    ``repeat_kv`` lays them out); it is scored as the sum of its channels' scores.

    Args:
        grad: [B, T, H * hd] gradient of the task loss w.r.t. the ``o_proj`` input.
        activation: [B, T, H * hd] that input (the heads' outputs, concatenated).
        mask: [B, T] 1 = valid token.
        num_kv_heads: number of KV groups; must divide H * hd.
        score: as in :func:`flexkd.importance.unit_importance_sum`.

    Returns:
        [num_kv_heads] float32 sum over examples and valid tokens.
    """
    per_channel = unit_importance_sum(grad, activation, mask, score)
    if per_channel.numel() % num_kv_heads:
        raise ValueError(f"o_proj input width {per_channel.numel()} is not divisible by {num_kv_heads} KV groups")
    return per_channel.view(num_kv_heads, -1).sum(dim=1)


def block_change_sum(h_in: Tensor, h_out: Tensor, mask: Tensor, eps: float = 1e-8) -> Tensor:
    """Summed ``1 - cos(h_in, h_out)`` over valid tokens: how much a block changes the state.

    Args:
        h_in: [B, T, d] the block's input. h_out: [B, T, d] its output.
        mask: [B, T] 1 = valid token.

    Returns:
        [] float32 sum (divide by the token count for the mean).
    """
    if h_in.shape != h_out.shape or h_in.ndim != 3 or mask.shape != h_in.shape[:2]:
        raise ValueError(
            f"expected h_in and h_out [B, T, d] and mask [B, T], got "
            f"{tuple(h_in.shape)}, {tuple(h_out.shape)}, {tuple(mask.shape)}"
        )
    dtype = torch.promote_types(h_in.dtype, torch.float32)
    cosine = torch.nn.functional.cosine_similarity(h_in.to(dtype), h_out.to(dtype), dim=-1, eps=eps)
    valid = mask.to(device=h_in.device, dtype=torch.bool)
    return torch.where(valid, 1.0 - cosine, 0.0).sum()


@contextmanager
def skipped_block(model: PreTrainedModel, index: int) -> Iterator[None]:
    """Inside, block ``index`` of ``model`` is the identity: its output is replaced by its input.

    The block still runs (its output is discarded), so a sharded model's collectives stay in step
    on every rank; the model itself is not modified.
    """
    blocks = model.base_model.layers
    if not 0 <= index < len(blocks):
        raise ValueError(f"block {index} is not one of the model's {len(blocks)} blocks")

    def return_input(_module, args, kwargs, output):
        hidden = args[0] if args else kwargs["hidden_states"]
        return (hidden, *output[1:]) if isinstance(output, tuple) else hidden

    handle = blocks[index].register_forward_hook(return_input, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()


@torch.no_grad()
def skipped_block_loss_sums(
    model: PreTrainedModel, batch: dict[str, Tensor], task_loss_fn: Callable[[Tensor, dict[str, Tensor]], Tensor]
) -> Tensor:
    """The task loss of ``batch`` with each block skipped in turn (Kim et al. 2024, "Shortened
    LLaMA": the blocks whose removal raises the loss least are the cheapest to drop).

    Args:
        batch: ``input_ids`` and ``attention_mask`` [B, T] (plus whatever the loss reads).
        task_loss_fn: ``(logits [B, T, V], batch) -> []``, a SUM over examples.

    Returns:
        [L] float64: entry l is the summed loss with block l skipped. One forward per block.
    """
    sums = torch.zeros(len(model.base_model.layers), dtype=torch.float64)
    for index in range(len(sums)):
        with skipped_block(model, index):
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
        sums[index] = float(task_loss_fn(logits, batch))
    return sums


class PruningScoreCollector:
    """Accumulates the importance of each block's output units (``residual``, [L, d]), MLP
    channels (``mlp``, [L, I]), KV groups (``attention``, [L, KV]) and its block change
    (``block_change``, [L]) for every block of a Llama-family model, through forward hooks
    (the model is not modified).

    Use as a context manager around the forward passes; per batch::

        with PruningScoreCollector(model) as collector:
            logits, hidden = forward_with_hidden_states(model, ids, mask, layers)
            loss = summed_task_loss(...)
            torch.autograd.grad(loss, [hidden[l] for l in layers] + collector.activations())
            collector.accumulate(mask)

    ``loss.backward()`` works too; ``autograd.grad`` must list :meth:`activations` among its
    inputs, since it only computes the gradients it is asked for. Hooks on those tensors keep
    their gradients, so parameter ``.grad`` is never touched. With a frozen teacher the forward
    must make the embedding output require grad (``forward_with_hidden_states`` does).

    ``sums`` holds the accumulators on the model's device: all-reduce each of them (a sum)
    before :meth:`state` to combine ranks, or merge states with :func:`merge_pruning_scores`.
    """

    def __init__(self, model: PreTrainedModel, score: str = "grad_x_act"):
        check_supported_architecture(model.config)
        self.score = score
        self.blocks = list(model.base_model.layers)
        self.num_kv_heads = model.config.num_key_value_heads
        device = next(model.parameters()).device
        num_blocks = len(self.blocks)
        self.sums = {
            "residual": torch.zeros(num_blocks, model.config.hidden_size, device=device),
            "mlp": torch.zeros(num_blocks, model.config.intermediate_size, device=device),
            "attention": torch.zeros(num_blocks, self.num_kv_heads, device=device),
            "block_change": torch.zeros(num_blocks, device=device),
            "examples": torch.zeros((), dtype=torch.float64, device=device),
            "tokens": torch.zeros((), dtype=torch.float64, device=device),
        }
        self._captured: dict[tuple[str, int], list[Tensor | None]] = {}
        self._handles: list[Any] = []
        self._paused = False

    def __enter__(self) -> PruningScoreCollector:
        for index, block in enumerate(self.blocks):
            self._handles += [
                block.mlp.down_proj.register_forward_pre_hook(self._capture_with_grad("mlp", index)),
                block.self_attn.o_proj.register_forward_pre_hook(self._capture_with_grad("attention", index)),
                block.register_forward_pre_hook(self._capture_block_input(index), with_kwargs=True),
                block.register_forward_hook(self._capture_block_output(index)),
            ]
        return self

    def __exit__(self, *exc_info: object) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._captured.clear()

    @contextmanager
    def paused(self) -> Iterator[None]:
        """Forwards inside capture nothing (say, :func:`skipped_block_loss_sums` after a batch's
        :meth:`accumulate`)."""
        self._paused = True
        try:
            yield
        finally:
            self._paused = False

    def _keep_with_grad(self, kind: str, index: int, activation: Tensor) -> None:
        if self._paused:
            return
        if not activation.requires_grad:
            raise RuntimeError(
                "pruning scores need gradients: run the forward with grad enabled and the "
                "embedding output requiring grad (see forward_with_hidden_states)"
            )
        slot: list[Tensor | None] = [activation, None]
        self._captured[(kind, index)] = slot
        activation.register_hook(lambda grad: slot.__setitem__(1, grad))

    def _capture_with_grad(self, kind: str, index: int) -> Callable:
        def hook(_module, args):
            self._keep_with_grad(kind, index, args[0])

        return hook

    def _capture_block_input(self, index: int) -> Callable:
        def hook(_module, args, kwargs):
            if self._paused:
                return
            hidden = args[0] if args else kwargs["hidden_states"]
            self._captured[("block_in", index)] = [hidden.detach()]

        return hook

    def _capture_block_output(self, index: int) -> Callable:
        def hook(_module, _args, output):
            self._keep_with_grad("residual", index, output[0] if isinstance(output, tuple) else output)

        return hook

    def activations(self) -> list[Tensor]:
        """The captured block outputs and ``down_proj`` / ``o_proj`` inputs of the last forward
        (in the autograd graph)."""
        return [slot[0] for (kind, _), slot in self._captured.items() if kind != "block_in"]

    def accumulate(self, attention_mask: Tensor) -> None:
        """Adds the last forward/backward's scores; ``attention_mask`` [B, T], 1 = valid token."""
        if not self._captured:
            raise RuntimeError("nothing captured: run a forward pass inside `with collector:` first")
        for index in range(len(self.blocks)):
            for kind in ("residual", "mlp", "attention"):
                activation, grad = self._captured[(kind, index)]
                if grad is None:
                    raise RuntimeError(
                        f"no gradient reached block {index}'s {kind} activations: call "
                        "loss.backward() or list collector.activations() in autograd.grad"
                    )
                if kind == "attention":
                    part = kv_group_importance_sum(
                        grad, activation.detach(), attention_mask, self.num_kv_heads, self.score
                    )
                elif kind == "mlp":
                    part = mlp_channel_importance_sum(grad, activation.detach(), attention_mask, self.score)
                else:
                    part = unit_importance_sum(grad, activation.detach(), attention_mask, self.score)
                self.sums[kind][index] += part.to(self.sums[kind].dtype)
            self.sums["block_change"][index] += block_change_sum(
                self._captured[("block_in", index)][0], self._captured[("residual", index)][0].detach(), attention_mask
            )
        self.sums["examples"] += attention_mask.shape[0]
        self.sums["tokens"] += attention_mask.bool().sum()
        self._captured.clear()

    def state(self) -> dict[str, Tensor]:
        """The accumulated sums as CPU tensors (keys: ``SCORE_KEYS``)."""
        return {name: value.detach().cpu() for name, value in self.sums.items()}


def merge_pruning_scores(states: Sequence[dict[str, Tensor]]) -> dict[str, Tensor]:
    """Sums the states of several collectors (data shards); the same as an all-reduce. Only the
    collector's ``SCORE_KEYS``: sum :func:`skipped_block_loss_sums` results apart."""
    if not states:
        raise ValueError("no pruning score states to merge")
    return {name: sum(state[name] for state in states) for name in SCORE_KEYS}


def collect_pruning_scores(
    model: PreTrainedModel,
    batches: Iterable[dict[str, Tensor]],
    task_loss_fn: Callable[[Tensor, dict[str, Tensor]], Tensor],
    score: str = "grad_x_act",
) -> dict[str, Tensor]:
    """Single-process scoring (tests, benchmarks): one forward and backward per batch.

    Args:
        batches: dicts with ``input_ids`` and ``attention_mask`` [B, T] (plus whatever the loss reads).
        task_loss_fn: ``(logits [B, T, V], batch) -> []``, a SUM over examples (see
            :func:`flexkd.objective.summed_task_loss`).

    Returns:
        The collector's :meth:`~PruningScoreCollector.state`. Parameter gradients are untouched.
    """
    collector = PruningScoreCollector(model, score)
    with collector, torch.enable_grad():
        for batch in batches:
            logits, _ = forward_with_hidden_states(model, batch["input_ids"], batch["attention_mask"], [])
            torch.autograd.grad(task_loss_fn(logits, batch), collector.activations())
            collector.accumulate(batch["attention_mask"])
    return collector.state()
