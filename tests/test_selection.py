from __future__ import annotations

import pytest
import torch

from flexkd.method.selection import (
    activation_moments,
    resolve_k,
    select_random_units,
    select_top_k_units,
    select_variance_units,
    selection_overlap,
    variance_from_moments,
)


def test_resolve_k_defaults_to_student_width_and_checks_bounds():
    assert resolve_k(None, 576, 960) == 576
    assert resolve_k(100, 576, 960) == 100
    with pytest.raises(ValueError, match=r"selection\.k = 700 exceeds min\(d_student=576, d_teacher=576\) = 576"):
        resolve_k(700, 576, 576)
    with pytest.raises(ValueError, match=r"selection\.k.*d_teacher=512\) = 512"):
        resolve_k(None, 576, 512)
    with pytest.raises(ValueError, match=r"selection\.k = 0"):
        resolve_k(0, 576, 960)


def test_top_k_is_ordered_by_importance_with_ties_to_the_lower_index():
    importance = torch.tensor([0.5, 2.0, 0.5, 3.0, 2.0])
    assert select_top_k_units(importance, 5).tolist() == [3, 1, 4, 0, 2]
    assert select_top_k_units(importance, 2).tolist() == [3, 1]


@pytest.mark.parametrize("seed", range(5))
def test_top_k_is_a_prefix_of_top_k_plus_one(seed):
    generator = torch.Generator().manual_seed(seed)
    for size in (1, 7, 64):
        # Few distinct values force many ties.
        importance = torch.randint(0, 4, (size,), generator=generator).float()
        full = select_top_k_units(importance, size)
        assert sorted(full.tolist()) == list(range(size))
        assert (importance[full].diff() <= 0).all()
        for k in range(1, size):
            assert torch.equal(select_top_k_units(importance, k), full[:k])
            assert torch.equal(select_top_k_units(importance, k + 1)[:k], select_top_k_units(importance, k))


def test_top_k_rejects_bad_k_and_non_finite_scores():
    with pytest.raises(ValueError, match="between 1"):
        select_top_k_units(torch.ones(4), 5)
    with pytest.raises(ValueError, match="NaN"):
        select_top_k_units(torch.tensor([1.0, float("nan")]), 1)


def test_random_selection_is_seeded_and_without_repeats():
    first = select_random_units(960, 576, seed=7)
    assert first.dtype == torch.int64 and first.shape == (576,)
    assert len(set(first.tolist())) == 576 and first.min() >= 0 and first.max() < 960
    assert torch.equal(first, select_random_units(960, 576, seed=7))
    assert not torch.equal(first, select_random_units(960, 576, seed=8))
    assert torch.equal(select_random_units(960, 10, seed=7), first[:10])
    torch.manual_seed(0)
    before = torch.rand(1)
    torch.manual_seed(0)
    select_random_units(960, 5, seed=1)
    assert torch.equal(torch.rand(1), before), "must not consume the global generator"


def test_variance_selection_picks_the_highest_variance_units():
    generator = torch.Generator().manual_seed(0)
    scales = torch.tensor([0.1, 5.0, 1.0, 0.0, 3.0])
    hidden = 100.0 + torch.randn(4, 50, 5, generator=generator) * scales
    mask = torch.ones(4, 50, dtype=torch.bool)
    mask[:, 40:] = False
    hidden[~mask] = 1e6  # padding must not count
    unit_sum, unit_sum_sq, count = activation_moments(hidden, mask)
    assert unit_sum.dtype == torch.float64 and count.item() == 160
    variance = variance_from_moments(unit_sum, unit_sum_sq, count)
    torch.testing.assert_close(variance, hidden[mask].double().var(dim=0, unbiased=False))
    assert select_variance_units(variance, 3).tolist() == [1, 4, 2]


def test_moments_from_shards_add_up():
    hidden = torch.randn(6, 5, 3)
    mask = torch.rand(6, 5) > 0.4
    mask[0, 0] = True
    parts = [activation_moments(hidden[:3], mask[:3]), activation_moments(hidden[3:], mask[3:])]
    summed = [a + b for a, b in zip(*parts)]
    torch.testing.assert_close(variance_from_moments(*summed), variance_from_moments(*activation_moments(hidden, mask)))
    with pytest.raises(ValueError, match="positive"):
        variance_from_moments(torch.zeros(3), torch.zeros(3), torch.tensor(0.0))


def test_selection_overlap_is_jaccard():
    assert selection_overlap(torch.tensor([1, 2, 3]), torch.tensor([3, 2, 1])) == 1.0
    assert selection_overlap(torch.tensor([1, 2]), torch.tensor([3, 4])) == 0.0
    assert selection_overlap(torch.tensor([1, 2, 3]), torch.tensor([2, 3, 4])) == pytest.approx(2 / 4)
