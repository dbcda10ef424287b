"""Which hidden states to distill, and how to read them out of a Hugging Face model.

Layer indices follow HF `hidden_states`: index 0 is the embedding output, index l the output of
block l, index L (the number of blocks) the last one. For Llama-style models HF applies the final
norm to that last entry, so `hidden_states[L]` is exactly what the LM head / classifier reads,
while `hidden_states[l]` for l < L are raw residual-stream states.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from transformers import PreTrainedModel

LayerMapPreset = Literal["last", "uniform"]


def model_dims(model: PreTrainedModel) -> tuple[int, int]:
    """(hidden_size, num_hidden_layers) of a model, read from its (text) config."""
    config = model.config
    if not hasattr(config, "hidden_size") or not hasattr(config, "num_hidden_layers"):
        config = config.get_text_config()  # multimodal configs nest the language model's fields
    return config.hidden_size, config.num_hidden_layers


def resolve_layer_map(
    spec: LayerMapPreset | Sequence[Sequence[int]], teacher_layers: int, student_layers: int
) -> list[tuple[int, int]]:
    """Pairs (teacher_index, student_index) of hidden states to distill.

    Args:
        spec: `"last"` pairs the final hidden states, `[(L_T, L_S)]`. `"uniform"` pairs every
            student block m = 1..L_S with teacher block round(m * L_T / L_S) (the design's
            round((m + 1) * L_T / L_S) with 0-based m), rounding halves up rather than to even so
            that the spacing does not depend on parity. Otherwise an explicit list of
            [teacher, student] pairs, each index in 0..L.
        teacher_layers: L_T, the teacher's number of blocks.
        student_layers: L_S, the student's number of blocks.
    """
    if teacher_layers < 1 or student_layers < 1:
        raise ValueError(f"layer counts must be positive, got teacher {teacher_layers}, student {student_layers}")
    if spec == "last":
        return [(teacher_layers, student_layers)]
    if spec == "uniform":
        # Integer round-half-up of m * L_T / L_S, exact where float arithmetic might not be.
        return [
            ((2 * m * teacher_layers + student_layers) // (2 * student_layers), m) for m in range(1, student_layers + 1)
        ]
    if isinstance(spec, str) or not isinstance(spec, Sequence):
        raise ValueError(f"layer_map = {spec!r}: expected 'last', 'uniform' or a list of [teacher, student] pairs")
    if not spec:
        raise ValueError("layer_map is empty: give at least one [teacher, student] pair")
    return [_validated_pair(i, pair, teacher_layers, student_layers) for i, pair in enumerate(spec)]


def _validated_pair(i: int, pair: object, teacher_layers: int, student_layers: int) -> tuple[int, int]:
    where = f"layer_map[{i}] = {pair!r}"
    if isinstance(pair, str) or not isinstance(pair, Sequence) or len(pair) != 2:
        raise ValueError(f"{where}: expected a [teacher, student] pair")
    if not all(isinstance(index, int) and not isinstance(index, bool) for index in pair):
        raise ValueError(f"{where}: layer indices must be integers")
    teacher, student = pair
    if not 0 <= teacher <= teacher_layers:
        raise ValueError(f"{where}: teacher layer {teacher} is out of range 0..{teacher_layers}")
    if not 0 <= student <= student_layers:
        raise ValueError(f"{where}: student layer {student} is out of range 0..{student_layers}")
    return teacher, student


def teacher_layers_needed(layer_map: Sequence[tuple[int, int]]) -> list[int]:
    """Sorted, unique teacher indices of a resolved layer map (the layers to score)."""
    return sorted({teacher for teacher, _ in layer_map})


def forward_with_hidden_states(
    model: PreTrainedModel,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    layers: Sequence[int],
) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
    """One forward pass returning the logits and the requested hidden states.

    Works for any HF causal LM or sequence classifier. The hidden states stay in the autograd
    graph whenever grad mode is on, even for a frozen model, so a caller can take gradients of a
    loss with respect to them.

    Args:
        input_ids: LongTensor [B, T], right-padded.
        attention_mask: LongTensor [B, T], 1 on valid tokens.
        layers: hidden-state indices in 0..L (0 = embeddings, L = final, normed).

    Returns:
        logits: [B, T, V] for a causal LM, [B, C] for a sequence classifier.
        hidden: {layer: [B, T, d]} for every requested layer.
    """
    num_layers = model_dims(model)[1]
    for layer in layers:
        if not 0 <= layer <= num_layers:
            raise ValueError(f"layer {layer} is out of range 0..{num_layers} for this model")
    hook = None
    if torch.is_grad_enabled():
        # A frozen teacher (no parameter requires grad) would return hidden states outside the
        # autograd graph; making the embedding output require grad keeps them in it, and
        # gradients w.r.t. them then cost no weight gradients.
        hook = model.get_input_embeddings().register_forward_hook(lambda _, __, output: output.requires_grad_())
    try:
        outputs = model(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True, use_cache=False)
    finally:
        if hook is not None:
            hook.remove()
    return outputs.logits, {layer: outputs.hidden_states[layer] for layer in layers}


def last_token_positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """Index of the last valid token of each row of a right-padded batch.

    Args:
        attention_mask: [B, T], 1 on valid tokens, 0 on padding.

    Returns:
        LongTensor [B].
    """
    positions = torch.arange(attention_mask.shape[1], device=attention_mask.device)
    last = torch.where(attention_mask.bool(), positions, -1).max(dim=1).values
    if (last < 0).any():
        row = int((last < 0).nonzero()[0])
        raise ValueError(f"attention_mask row {row} has no valid token")
    return last
