from __future__ import annotations

import pytest
import torch

from flexkd.method.layers import (
    forward_with_hidden_states,
    last_token_positions,
    resolve_layer_map,
    teacher_layers_needed,
)


@pytest.mark.parametrize(
    ("teacher_layers", "student_layers", "last", "uniform"),
    [
        (30, 4, [(30, 4)], [(8, 1), (15, 2), (23, 3), (30, 4)]),  # 7.5 and 22.5 round up
        (4, 2, [(4, 2)], [(2, 1), (4, 2)]),
        (3, 2, [(3, 2)], [(2, 1), (3, 2)]),  # 1.5 rounds up, not to even
        (4, 4, [(4, 4)], [(1, 1), (2, 2), (3, 3), (4, 4)]),
    ],
)
def test_presets(teacher_layers, student_layers, last, uniform):
    assert resolve_layer_map("last", teacher_layers, student_layers) == last
    assert resolve_layer_map("uniform", teacher_layers, student_layers) == uniform


def test_explicit_pairs_are_kept_in_order():
    assert resolve_layer_map([[4, 2], (0, 0), [2, 1]], 4, 2) == [(4, 2), (0, 0), (2, 1)]


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ([[4, 2], [9, 2]], r"^layer_map\[1\] = \[9, 2\]: teacher layer 9 is out of range 0\.\.4$"),
        ([[-1, 2]], r"^layer_map\[0\] = \[-1, 2\]: teacher layer -1 is out of range 0\.\.4$"),
        ([[4, 3]], r"^layer_map\[0\] = \[4, 3\]: student layer 3 is out of range 0\.\.2$"),
        ([[4, 2, 1]], r"^layer_map\[0\] = \[4, 2, 1\]: expected a \[teacher, student\] pair$"),
        ([4, 2], r"^layer_map\[0\] = 4: expected a \[teacher, student\] pair$"),
        ([[4.0, 2]], r"^layer_map\[0\] = \[4\.0, 2\]: layer indices must be integers$"),
        ([[True, 2]], r"layer indices must be integers"),
        ([], r"^layer_map is empty"),
        ("middle", r"^layer_map = 'middle': expected 'last', 'uniform' or a list"),
    ],
)
def test_invalid_layer_maps_name_the_entry(spec, message):
    with pytest.raises(ValueError, match=message):
        resolve_layer_map(spec, 4, 2)


def test_teacher_layers_needed_is_sorted_and_unique():
    assert teacher_layers_needed([(30, 4), (8, 1), (30, 2), (15, 3)]) == [8, 15, 30]


def _batch(tiny_tokenizer):
    return tiny_tokenizer(
        ["a fine film", "one of the worst movies of the year , truly"], padding=True, return_tensors="pt"
    )


def test_causal_lm_hidden_states(build_tiny_llama, tiny_tokenizer):
    model = build_tiny_llama()
    batch = _batch(tiny_tokenizer)
    logits, hidden = forward_with_hidden_states(model, batch["input_ids"], batch["attention_mask"], [0, 2, 4])
    batch_size, length = batch["input_ids"].shape
    assert logits.shape == (batch_size, length, len(tiny_tokenizer))
    assert sorted(hidden) == [0, 2, 4]
    assert all(state.shape == (batch_size, length, 64) for state in hidden.values())
    torch.testing.assert_close(hidden[0], model.get_input_embeddings()(batch["input_ids"]))
    # The last entry already carries the final norm: it is exactly what the LM head reads.
    torch.testing.assert_close(model.lm_head(hidden[4]), logits)


def test_sequence_classifier_hidden_states(build_tiny_llama, tiny_tokenizer):
    model = build_tiny_llama(kind="sequence_classification", num_labels=2)
    batch = _batch(tiny_tokenizer)
    logits, hidden = forward_with_hidden_states(model, batch["input_ids"], batch["attention_mask"], [4])
    assert logits.shape == (2, 2)
    positions = last_token_positions(batch["attention_mask"])
    # HF pools the last non-pad token of each right-padded row.
    torch.testing.assert_close(model.score(hidden[4][torch.arange(2), positions]), logits)


@pytest.mark.parametrize("frozen", [False, True])
def test_gradient_reaches_returned_hidden_states(build_tiny_llama, tiny_tokenizer, frozen):
    model = build_tiny_llama().requires_grad_(not frozen)
    batch = _batch(tiny_tokenizer)
    logits, hidden = forward_with_hidden_states(model, batch["input_ids"], batch["attention_mask"], [2])
    (gradient,) = torch.autograd.grad(logits[:, -1].logsumexp(-1).sum(), [hidden[2]])
    assert gradient.shape == hidden[2].shape and gradient.abs().sum() > 0
    assert all(parameter.grad is None for parameter in model.parameters())


def test_no_grad_mode_is_respected(build_tiny_llama, tiny_tokenizer):
    batch = _batch(tiny_tokenizer)
    with torch.no_grad():
        logits, hidden = forward_with_hidden_states(
            build_tiny_llama(), batch["input_ids"], batch["attention_mask"], [1]
        )
    assert not logits.requires_grad and not hidden[1].requires_grad


def test_out_of_range_layer_names_the_valid_range(build_tiny_llama):
    ids = torch.ones(1, 3, dtype=torch.long)
    with pytest.raises(ValueError, match=r"layer 5 is out of range 0\.\.4"):
        forward_with_hidden_states(build_tiny_llama(), ids, torch.ones_like(ids), [4, 5])


def test_last_token_positions():
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0], [1, 1, 1, 1]])
    assert last_token_positions(mask).tolist() == [2, 0, 3]
    with pytest.raises(ValueError, match="attention_mask row 1 has no valid token"):
        last_token_positions(torch.tensor([[1, 0], [0, 0]]))
