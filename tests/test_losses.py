from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from flexkd.method.losses import (
    LOGIT_LOSSES,
    UNLABELED,
    LinearProjector,
    causal_lm_loss,
    classification_loss,
    correlation_loss,
    forward_kl,
    generalized_jsd,
    linear_cka_loss,
    logit_distillation_loss,
    mse_feature_loss,
    projector_mse_loss,
    reverse_kl,
    skew_kl,
    standardized_projector_mse_loss,
    teacher_topk,
    topk_logit_distillation_loss,
    total_variation,
)


def _features(*shape: int, seed: int = 0, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def _padding_mask() -> torch.Tensor:
    return torch.tensor([[1, 1, 1, 1, 1, 0], [1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 1]], dtype=torch.bool)


def test_correlation_loss_is_zero_for_identical_and_two_for_negated_features():
    student, mask = _features(3, 6, 8), _padding_mask()
    assert correlation_loss(student, student, mask).item() == pytest.approx(0.0, abs=1e-5)
    assert correlation_loss(student, -student, mask).item() == pytest.approx(2.0, abs=1e-5)


def test_correlation_loss_is_invariant_to_per_unit_positive_scale_and_shift():
    student, teacher, mask = _features(3, 6, 8), _features(3, 6, 8, seed=1), _padding_mask()
    scale, shift = torch.linspace(0.5, 4.0, 8), torch.linspace(-30.0, 30.0, 8)
    reference = correlation_loss(student, teacher, mask)
    assert 0.2 < reference.item() < 1.8
    torch.testing.assert_close(correlation_loss(student * scale + shift, teacher, mask), reference, atol=1e-5, rtol=0)
    torch.testing.assert_close(correlation_loss(student, teacher * scale - shift, mask), reference, atol=1e-5, rtol=0)


def test_correlation_loss_matches_mean_pearson_over_valid_tokens():
    student, teacher, mask = _features(3, 6, 4), _features(3, 6, 4, seed=1), _padding_mask()
    s, t = student[mask].double().numpy(), teacher[mask].double().numpy()
    pearson = [np.corrcoef(s[:, i], t[:, i])[0, 1] for i in range(4)]
    assert correlation_loss(student, teacher, mask).item() == pytest.approx(1.0 - np.mean(pearson), abs=1e-5)


def test_correlation_loss_ignores_padded_positions_completely():
    student, teacher, mask = _features(3, 6, 8), _features(3, 6, 8, seed=1), _padding_mask()
    student.requires_grad_()
    reference = correlation_loss(student, teacher, mask)
    (reference_grad,) = torch.autograd.grad(reference, student)
    garbage_student, garbage_teacher = student.detach().clone(), teacher.clone()
    garbage_student[~mask], garbage_teacher[~mask] = 1e30, float("nan")
    garbage_student.requires_grad_()
    loss = correlation_loss(garbage_student, garbage_teacher, mask.int())
    (grad,) = torch.autograd.grad(loss, garbage_student)
    assert torch.equal(loss, reference)
    assert torch.equal(grad, reference_grad)
    assert (grad[~mask] == 0).all()


def test_correlation_loss_value_and_gradient_are_finite_for_constant_units():
    student, teacher, mask = _features(3, 6, 4), _features(3, 6, 4, seed=1), _padding_mask()
    student[..., 0], teacher[..., 1] = 3.0, -2.0
    student.requires_grad_()
    loss = correlation_loss(student, teacher, mask)
    (grad,) = torch.autograd.grad(loss, student)
    assert torch.isfinite(loss) and torch.isfinite(grad).all()
    constant_everywhere = correlation_loss(torch.ones(2, 3, 4), torch.ones(2, 3, 4), torch.ones(2, 3))
    assert constant_everywhere.item() == pytest.approx(1.0)


def test_correlation_loss_gradcheck_in_float64():
    student = _features(2, 6, 3, dtype=torch.float64).requires_grad_()
    teacher = _features(2, 6, 3, seed=1, dtype=torch.float64).requires_grad_()
    mask = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]])
    assert correlation_loss(student, teacher, mask).dtype == torch.float64
    assert torch.autograd.gradcheck(lambda s, t: correlation_loss(s, t, mask), (student, teacher))


def test_feature_losses_compute_in_float32_for_bfloat16():
    student = _features(2, 3, 4).bfloat16()
    assert correlation_loss(student, student, torch.ones(2, 3)).dtype == torch.float32
    assert linear_cka_loss(student, student, torch.ones(2, 3)).dtype == torch.float32


def test_correlation_loss_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="same shape"):
        correlation_loss(torch.zeros(2, 3, 4), torch.zeros(2, 3, 5), torch.ones(2, 3))
    with pytest.raises(ValueError, match="mask"):
        correlation_loss(torch.zeros(2, 3, 4), torch.zeros(2, 3, 4), torch.ones(3, 2))


def test_mse_feature_loss_averages_over_valid_tokens_and_units():
    student, teacher, mask = _features(3, 6, 4), _features(3, 6, 4, seed=1), _padding_mask()
    expected = (student[mask] - teacher[mask]).square().mean()
    student[~mask] = 1e6
    torch.testing.assert_close(mse_feature_loss(student, teacher, mask), expected)


def test_cka_loss_is_zero_for_identical_features_and_rotation_plus_isotropic_scale():
    student, mask = _features(3, 6, 5, dtype=torch.float64), _padding_mask()
    rotation, _ = torch.linalg.qr(_features(5, 5, seed=2, dtype=torch.float64))
    assert linear_cka_loss(student, student, mask).item() == pytest.approx(0.0, abs=1e-6)
    assert linear_cka_loss(student, 7.0 * student @ rotation + 3.0, mask).item() == pytest.approx(0.0, abs=1e-6)


def test_cka_loss_works_across_widths():
    student, mask = _features(3, 6, 5), _padding_mask()
    orthonormal_columns, _ = torch.linalg.qr(_features(8, 5, seed=2))
    wider_teacher = 0.5 * student @ orthonormal_columns.T
    assert linear_cka_loss(student, wider_teacher, mask).item() == pytest.approx(0.0, abs=1e-5)
    unrelated = linear_cka_loss(student, _features(3, 6, 8, seed=3), mask)
    assert 0.05 < unrelated.item() < 1.0


def test_cka_loss_survives_massive_activations_in_float32():
    student, mask = 1e8 * _features(3, 6, 5), _padding_mask()
    assert linear_cka_loss(student, student, mask).item() == pytest.approx(0.0, abs=1e-5)


def test_cka_loss_value_and_gradient_are_finite_for_constant_features():
    student = torch.full((2, 3, 4), 2.0, requires_grad=True)
    loss = linear_cka_loss(student, _features(2, 3, 6), torch.ones(2, 3))
    (grad,) = torch.autograd.grad(loss, student)
    assert loss.item() == pytest.approx(1.0) and torch.isfinite(grad).all()


def test_projector_loss_is_zero_for_the_map_that_made_the_teacher_and_mse_on_raw_features():
    student, mask = _features(3, 6, 5), _padding_mask()
    projector = LinearProjector(5, 7)
    with torch.no_grad():
        teacher = projector(student)  # teacher features = W s + b, and the projector is that map
    teacher[~mask] = 1e6  # padding must not count
    assert projector_mse_loss(projector, student, teacher, mask).item() == pytest.approx(0.0, abs=1e-12)

    rescaled = 3.0 * teacher + 5.0
    with torch.no_grad():
        by_hand = (projector(student)[mask] - rescaled[mask]).square().mean()
    assert projector_mse_loss(projector, student, rescaled, mask).item() == pytest.approx(by_hand.item(), rel=1e-6)
    assert by_hand.item() > 1.0  # raw features: rescaling the teacher moves the loss away from 0
    # The standardized variant cannot see a per-unit affine change of the teacher.
    standardized = [standardized_projector_mse_loss(projector, student, t, mask).item() for t in (teacher, rescaled)]
    assert standardized[0] == pytest.approx(standardized[1], rel=1e-4)


def test_standardized_projector_loss_decreases_when_fitting_a_linear_relation():
    torch.manual_seed(0)
    student, mask = _features(4, 6, 5), torch.ones(4, 6, dtype=torch.bool)
    teacher = student @ _features(5, 7, seed=1) + 10.0
    teacher[:, -1] = 1e6  # padding must not count
    mask[:, -1] = False
    projector = LinearProjector(5, 7)
    optimizer = torch.optim.Adam(projector.parameters(), lr=0.05)
    initial = standardized_projector_mse_loss(projector, student, teacher, mask).item()
    for _ in range(100):
        optimizer.zero_grad()
        loss = standardized_projector_mse_loss(projector, student, teacher, mask)
        loss.backward()
        optimizer.step()
    assert loss.item() < 0.05 * initial
    teacher.requires_grad_()
    standardized_projector_mse_loss(projector, student, teacher, mask).backward()
    assert teacher.grad is None


def _softmax(logits: np.ndarray) -> np.ndarray:
    shifted = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return shifted / shifted.sum(axis=-1, keepdims=True)


def _kl(p: np.ndarray, q: np.ndarray) -> np.ndarray:
    return (p * (np.log(p) - np.log(q))).sum(axis=-1)


def _reference(kind: str, student: torch.Tensor, teacher: torch.Tensor, tau: float, beta=0.5, alpha=0.1) -> float:
    """Plain float64 numpy definitions, mean over positions, times tau^2."""
    p_s, p_t = _softmax(student.double().numpy() / tau), _softmax(teacher.double().numpy() / tau)
    mixture = beta * p_t + (1 - beta) * p_s
    per_position = {
        "forward_kl": _kl(p_t, p_s),
        "reverse_kl": _kl(p_s, p_t),
        "jsd": beta * _kl(p_t, mixture) + (1 - beta) * _kl(p_s, mixture),
        "skew_kl": _kl(p_t, alpha * p_t + (1 - alpha) * p_s),
        "tvd": 0.5 * np.abs(p_t - p_s).sum(axis=-1),
    }[kind]
    return float(per_position.mean() * tau**2)


def _logits(seed: int, positions: int = 5, vocab: int = 11, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return 2.0 * _features(positions, vocab, seed=seed, dtype=dtype)


@pytest.mark.parametrize("kind", LOGIT_LOSSES)
@pytest.mark.parametrize("tau", [1.0, 2.0])
def test_logit_losses_match_float64_reference(kind, tau):
    student, teacher = _logits(0), _logits(1)
    value = logit_distillation_loss(kind, student, teacher, temperature=tau, jsd_beta=0.3, skew_alpha=0.2)
    assert value.item() == pytest.approx(_reference(kind, student, teacher, tau, beta=0.3, alpha=0.2), rel=1e-5)


def _kl_functional(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """KL(p || q) averaged over positions, by torch.nn.functional.kl_div (whose target is p)."""
    return F.kl_div(log_q, log_p, reduction="batchmean", log_target=True)


def _functional_reference(kind: str, student, teacher, tau: float, beta: float = 0.5, alpha: float = 0.1):
    """torch.nn.functional written out, independent of flexkd's dispatcher and its branches;
    the jsd limits as TRL's GKD defines them (forward KL at beta 0, reverse KL at beta 1)."""
    log_s, log_t = F.log_softmax(student.double() / tau, -1), F.log_softmax(teacher.double() / tau, -1)
    if kind == "forward_kl" or (kind == "jsd" and beta == 0.0):
        value = _kl_functional(log_t, log_s)
    elif kind == "reverse_kl" or (kind == "jsd" and beta == 1.0):
        value = _kl_functional(log_s, log_t)
    elif kind == "jsd":
        log_m = (beta * log_t.exp() + (1 - beta) * log_s.exp()).log()
        value = beta * _kl_functional(log_t, log_m) + (1 - beta) * _kl_functional(log_s, log_m)
    elif kind == "skew_kl":
        value = _kl_functional(log_t, (alpha * log_t.exp() + (1 - alpha) * log_s.exp()).log())
    else:
        value = 0.5 * (log_t.exp() - log_s.exp()).abs().sum(-1).mean()
    return (value * tau**2).float()


def test_named_logit_losses_match_functional_formulas():
    student, teacher = _logits(0), _logits(1)
    named = {
        "forward_kl": forward_kl(student, teacher, 2.0),
        "reverse_kl": reverse_kl(student, teacher, 2.0),
        "jsd": generalized_jsd(student, teacher, 2.0, beta=0.7),
        "skew_kl": skew_kl(student, teacher, 2.0, 0.3),
        "tvd": total_variation(student, teacher, 2.0),
    }
    for kind, value in named.items():
        reference = _functional_reference(kind, student, teacher, 2.0, beta=0.7, alpha=0.3)
        torch.testing.assert_close(value, reference, rtol=1e-5, atol=1e-6, msg=kind)


def test_jsd_limits_follow_trl_and_skew_zero_is_forward_kl():
    student, teacher = _logits(0), _logits(1)
    forward = _functional_reference("forward_kl", student, teacher, 1.0)
    reverse = _functional_reference("reverse_kl", student, teacher, 1.0)
    assert abs(float(forward) - float(reverse)) > 0.1  # the two limits are told apart
    torch.testing.assert_close(generalized_jsd(student, teacher, beta=0.0), forward, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(generalized_jsd(student, teacher, beta=1.0), reverse, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(skew_kl(student, teacher, alpha=0.0), forward, rtol=1e-5, atol=1e-6)
    assert torch.isfinite(generalized_jsd(student, teacher, beta=1e-12))


@pytest.mark.parametrize("kind", LOGIT_LOSSES)
def test_logit_losses_are_zero_for_identical_logits_full_and_top_k(kind):
    logits = _logits(0)
    assert logit_distillation_loss(kind, logits, logits.clone(), 2.0).item() == pytest.approx(0.0, abs=1e-6)
    for k in (3, 11):
        logprobs, ids = teacher_topk(logits, k, temperature=2.0)
        assert topk_logit_distillation_loss(kind, logits, logprobs, ids, 2.0).item() == pytest.approx(0.0, abs=1e-4)


@pytest.mark.parametrize("kind", ["forward_kl", "reverse_kl", "jsd"])
def test_logit_loss_gradcheck(kind):
    student = _logits(0, positions=3, vocab=5, dtype=torch.float64).requires_grad_()
    teacher = _logits(1, positions=3, vocab=5, dtype=torch.float64).requires_grad_()
    assert torch.autograd.gradcheck(lambda s, t: logit_distillation_loss(kind, s, t, 1.5), (student, teacher))
    logprobs, ids = teacher_topk(teacher.detach(), 3, temperature=1.5)
    assert torch.autograd.gradcheck(lambda s: topk_logit_distillation_loss(kind, s, logprobs, ids, 1.5), (student,))


@pytest.mark.parametrize("kind", LOGIT_LOSSES)
def test_top_k_with_full_vocabulary_equals_full_loss(kind):
    for dtype, tolerance in ((torch.float64, 1e-10), (torch.float32, 1e-5)):
        student, teacher = _logits(0, dtype=dtype), _logits(1, dtype=dtype)
        full = logit_distillation_loss(kind, student, teacher, 2.0, 0.3, 0.2)
        logprobs, ids = teacher_topk(teacher, 11, temperature=2.0)
        top_k = topk_logit_distillation_loss(kind, student, logprobs, ids, 2.0, 0.3, 0.2)
        torch.testing.assert_close(top_k, full, atol=tolerance, rtol=0)


@pytest.mark.parametrize("kind", LOGIT_LOSSES)
def test_top_k_is_close_to_full_loss_for_a_peaked_teacher(kind):
    # Reverse KL weights by the student's mass, so the student too must sit on the teacher's top tokens.
    student, teacher, rows = _logits(0, positions=8, vocab=50), _logits(1, positions=8, vocab=50), torch.arange(8)
    teacher[rows, rows] += 20.0
    teacher[rows, rows + 1] += 18.0
    student[rows, rows] += 18.0
    student[rows, rows + 1] += 20.0
    full = logit_distillation_loss(kind, student, teacher)
    logprobs, ids = teacher_topk(teacher, 5)
    top_k = topk_logit_distillation_loss(kind, student, logprobs, ids)
    assert full.item() > 0.1
    assert top_k.item() == pytest.approx(full.item(), rel=0.02, abs=1e-3)


def test_top_k_remainder_bucket_is_used():
    student, teacher = _logits(0), _logits(1)
    logprobs, ids = teacher_topk(teacher, 3)
    truncated = topk_logit_distillation_loss("forward_kl", student, logprobs, ids)
    in_top_k = [np.take_along_axis(_softmax(x.double().numpy()), ids.numpy(), -1) for x in (teacher, student)]
    bins_t, bins_s = [np.concatenate([p, 1 - p.sum(-1, keepdims=True)], axis=-1) for p in in_top_k]
    assert truncated.item() == pytest.approx(float(_kl(bins_t, bins_s).mean()), rel=1e-4)


def test_logit_losses_stay_finite_with_masked_vocabulary():
    student, teacher = _logits(0).requires_grad_(), _logits(1)
    teacher[:, -2:] = float("-inf")
    for kind in LOGIT_LOSSES:
        (grad,) = torch.autograd.grad(logit_distillation_loss(kind, student, teacher), student)
        assert torch.isfinite(grad).all(), kind


def test_logit_loss_arguments_are_validated():
    logits = _logits(0)
    with pytest.raises(ValueError, match="forward_kl"):
        logit_distillation_loss("kl", logits, logits)
    with pytest.raises(ValueError, match="vocabulary"):
        logit_distillation_loss("forward_kl", logits, logits[:, :-1])
    with pytest.raises(ValueError, match="temperature"):
        forward_kl(logits, logits, temperature=0.0)
    with pytest.raises(ValueError, match="jsd_beta"):
        generalized_jsd(logits, logits, beta=1.5)


def test_causal_lm_loss_shifts_and_ignores_masked_labels():
    logits = _features(2, 5, 7)
    labels = torch.tensor([[-100, -100, 3, 4, -100], [-100, 1, 2, 6, 0]])
    expected_terms = [
        F.cross_entropy(logits[b, t - 1], labels[b, t]) for b in range(2) for t in range(1, 5) if labels[b, t] != -100
    ]
    torch.testing.assert_close(causal_lm_loss(logits, labels), torch.stack(expected_terms).mean())
    nothing_counted = causal_lm_loss(logits.requires_grad_(), torch.full((2, 5), -100))
    assert nothing_counted.item() == 0.0 and nothing_counted.requires_grad


def test_classification_loss_is_cross_entropy():
    logits, labels = _features(4, 3).bfloat16(), torch.tensor([0, 2, 1, 2])
    loss = classification_loss(logits, labels)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, F.cross_entropy(logits.float(), labels))


def test_classification_loss_leaves_out_unlabeled_rows_and_is_zero_without_labeled_ones():
    logits = _features(4, 3).requires_grad_()
    labels = torch.tensor([0, UNLABELED, 2, UNLABELED])
    torch.testing.assert_close(classification_loss(logits, labels), F.cross_entropy(logits[[0, 2]], labels[[0, 2]]))
    none_labeled = classification_loss(logits, torch.full((4,), UNLABELED))
    assert none_labeled.item() == 0.0 and none_labeled.requires_grad
    none_labeled.backward()
    assert torch.equal(logits.grad, torch.zeros_like(logits))


def test_a_batch_of_only_unlabeled_rows_gives_task_loss_zero_and_a_finite_total():
    """The objective on transfer rows alone: no task term, the logit and feature terms as usual."""
    from flexkd.config.schema import LossConfig
    from flexkd.method.objective import LayerPair, distillation_loss

    settings = LossConfig().objective_settings("classification", 4)
    mask = torch.ones(3, 5, dtype=torch.long)
    batch = {"attention_mask": mask, "class_label": torch.full((3,), UNLABELED)}
    student_logits, teacher_logits = _features(3, 1, 11, seed=1).requires_grad_(), _features(3, 1, 11, seed=2)
    student_hidden = {1: _features(3, 5, 4, seed=3).requires_grad_()}
    parts = distillation_loss(
        settings,
        batch,
        student_logits,
        student_hidden,
        teacher_logits,
        {2: _features(3, 5, 6, seed=4)},
        [LayerPair(2, 1)],
        verbalizer_ids=torch.tensor([3, 7]),
    )
    assert parts["task"].item() == 0.0
    assert parts["logit"].item() > 0 and parts["feature"].item() > 0
    assert torch.isfinite(parts["total"]) and parts["total"].item() == pytest.approx(
        parts["logit"].item() + parts["feature"].item()
    )
    parts["total"].backward()
    assert torch.isfinite(student_logits.grad).all() and student_logits.grad.abs().sum() > 0
