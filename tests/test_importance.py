from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from flexkd.method.importance import (
    IMPORTANCE_SCORES,
    finalize_importance,
    hidden_state_gradients,
    unit_importance_sum,
)


def _linear_head_problem(num_examples: int = 6, tokens: int = 3, width: int = 5, classes: int = 4):
    """A frozen linear "teacher head" W h + b on every token, with its analytic per-token gradient."""
    generator = torch.Generator().manual_seed(0)
    weight = torch.nn.Parameter(torch.randn(classes, width, generator=generator, dtype=torch.float64))
    bias = torch.nn.Parameter(torch.randn(classes, generator=generator, dtype=torch.float64))
    hidden = torch.randn(num_examples, tokens, width, generator=generator, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, classes, (num_examples, tokens), generator=generator)
    mask = torch.ones(num_examples, tokens, dtype=torch.bool)
    mask[0, 2] = mask[3, 1:] = False
    logits = hidden @ weight.T + bias
    # Sum over examples (and tokens) so each example's gradient is its own dL(x)/dh.
    per_token_loss = F.cross_entropy(logits.reshape(-1, classes), labels.reshape(-1), reduction="none")
    loss = (per_token_loss.reshape(num_examples, tokens) * mask).sum()
    with torch.no_grad():
        analytic_grad = (logits.softmax(-1) - F.one_hot(labels, classes).double()) @ weight * mask.unsqueeze(-1)
    return loss, hidden, mask, weight, bias, analytic_grad


def test_grad_importance_of_linear_head_equals_analytic_value():
    loss, hidden, mask, weight, bias, analytic_grad = _linear_head_problem()
    (grad,) = hidden_state_gradients(loss, [hidden])
    importance = finalize_importance(unit_importance_sum(grad, hidden, mask, "grad"), hidden.shape[0])
    expected = analytic_grad.abs().sum(dim=(0, 1)) / hidden.shape[0]
    torch.testing.assert_close(importance, expected)
    assert weight.grad is None and bias.grad is None


def test_single_token_importance_matches_paper_formula():
    generator = torch.Generator().manual_seed(1)
    weight = torch.randn(3, 4, generator=generator, dtype=torch.float64)
    bias = torch.randn(3, generator=generator, dtype=torch.float64)
    hidden = torch.randn(8, 1, 4, generator=generator, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, 3, (8,), generator=generator)
    loss = F.cross_entropy(hidden[:, 0] @ weight.T + bias, labels, reduction="sum")
    (grad,) = hidden_state_gradients(loss, [hidden])
    importance = finalize_importance(unit_importance_sum(grad, hidden, torch.ones(8, 1)), 8)
    expected = torch.zeros(4, dtype=torch.float64)
    for x in range(8):
        residual = (weight @ hidden[x, 0].detach() + bias).softmax(-1) - F.one_hot(labels[x], 3).double()
        expected += (weight.T @ residual).abs()
    torch.testing.assert_close(importance, expected / 8)


@pytest.mark.parametrize(
    ("score", "definition"),
    [("fisher", lambda g, h: g.square()), ("grad_x_act", lambda g, h: (g * h).abs())],
)
def test_variant_scores_match_their_definitions(score, definition):
    loss, hidden, mask, _, _, analytic_grad = _linear_head_problem()
    (grad,) = hidden_state_gradients(loss, [hidden])
    importance = finalize_importance(unit_importance_sum(grad, hidden, mask, score), hidden.shape[0])
    per_token = definition(analytic_grad, hidden.detach()) * mask.unsqueeze(-1)
    torch.testing.assert_close(importance, per_token.sum(dim=(0, 1)) / hidden.shape[0])


@pytest.mark.parametrize("score", IMPORTANCE_SCORES)
def test_masked_tokens_contribute_nothing(score):
    generator = torch.Generator().manual_seed(2)
    grad = torch.randn(2, 4, 3, generator=generator)
    hidden = torch.randn(2, 4, 3, generator=generator)
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 0]])
    reference = unit_importance_sum(grad, hidden, mask, score)
    grad[mask == 0] = float("inf")
    hidden[mask == 0] = float("nan")
    assert torch.equal(unit_importance_sum(grad, hidden, mask, score), reference)
    kept_only = unit_importance_sum(grad[:, :2], hidden[:, :2], torch.ones(2, 2), score)
    torch.testing.assert_close(
        reference - kept_only, unit_importance_sum(grad[1:, 2:3], hidden[1:, 2:3], torch.ones(1, 1), score)
    )


def test_sums_from_shards_finalize_to_the_same_importance():
    generator = torch.Generator().manual_seed(3)
    grad, hidden = torch.randn(6, 5, 4, generator=generator), torch.randn(6, 5, 4, generator=generator)
    mask = torch.rand(6, 5, generator=generator) > 0.3
    whole = finalize_importance(unit_importance_sum(grad, hidden, mask), 6)
    shard_sum = sum(unit_importance_sum(grad[part], hidden[part], mask[part]) for part in (slice(0, 2), slice(2, 6)))
    torch.testing.assert_close(finalize_importance(shard_sum, torch.tensor(6)), whole)


def test_importance_is_float32_for_bfloat16_and_float64_for_float64():
    grad = torch.randn(2, 3, 4)
    assert unit_importance_sum(grad.bfloat16(), grad.bfloat16(), torch.ones(2, 3)).dtype == torch.float32
    assert unit_importance_sum(grad.double(), grad.double(), torch.ones(2, 3)).dtype == torch.float64


def test_invalid_arguments_raise():
    grad = torch.randn(2, 3, 4)
    with pytest.raises(ValueError, match="grad_x_act"):
        unit_importance_sum(grad, grad, torch.ones(2, 3), "taylor")
    with pytest.raises(ValueError, match="mask"):
        unit_importance_sum(grad, grad, torch.ones(3, 2))
    with pytest.raises(ValueError, match="positive"):
        finalize_importance(torch.ones(4), 0)
    with pytest.raises(ValueError, match="scalar"):
        hidden_state_gradients(grad.requires_grad_().sum(dim=0), [grad])


def test_hidden_state_gradients_covers_several_layers_in_order():
    embeddings = torch.randn(2, 3, 4, requires_grad=True)
    layer_one = embeddings * 2.0
    layer_two = layer_one.tanh()
    grads = hidden_state_gradients(layer_two.sum() + 5.0 * layer_one.sum(), [layer_one, layer_two])
    torch.testing.assert_close(grads[0], 1.0 - layer_two.detach().square() + 5.0)
    torch.testing.assert_close(grads[1], torch.ones(2, 3, 4))
    assert embeddings.grad is None
