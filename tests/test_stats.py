"""benchmarks.stats against cases worked out by hand."""

from __future__ import annotations

import pytest

from benchmarks.stats import (
    binomial_two_sided_p,
    bootstrap_mean_interval,
    mcnemar_exact,
    paired_differences,
    verdict_word,
)


def test_paired_differences_pair_by_seed_and_drop_unpaired_seeds():
    assert paired_differences({0: 70.0, 1: 71.0, 2: 72.5}, {2: 70.0, 1: 70.0, 3: 5.0}) == {1: 1.0, 2: 2.5}


def test_bootstrap_interval_of_hand_computed_resampling_distributions():
    # One value, or all equal: every resample has that mean.
    assert bootstrap_mean_interval([1.5]) == (1.5, 1.5)
    assert bootstrap_mean_interval([2.0, 2.0, 2.0]) == (2.0, 2.0)
    # [0, 2]: resample means 0, 1, 2 with probability 1/4, 1/2, 1/4; the 2.5% tails are 0 and 2.
    assert bootstrap_mean_interval([0.0, 2.0]) == (0.0, 2.0)
    # [0, 0, 0, 3]: the mean is 3k/4 with k ~ Binomial(4, 1/4); P(k = 0) = 0.316 > 0.025 and
    # P(k <= 2) = 0.949 < 0.975 <= P(k <= 3) = 0.996, so the interval is (0, 9/4).
    assert bootstrap_mean_interval([0.0, 0.0, 0.0, 3.0]) == (0.0, 2.25)
    # [0, 0, 3]: P(k <= 2) = 26/27 = 0.963 < 0.975, so the upper end is 3 (all three draws the 3).
    assert bootstrap_mean_interval([0.0, 3.0, 0.0]) == (0.0, 3.0)
    # A fixed RNG seed: the same values give the same interval.
    values = [0.3, -1.2, 2.0, 0.8, 1.1]
    assert bootstrap_mean_interval(values) == bootstrap_mean_interval(values)
    low, high = bootstrap_mean_interval(values)
    assert min(values) <= low < sum(values) / 5 < high <= max(values)
    with pytest.raises(ValueError, match="no values"):
        bootstrap_mean_interval([])


def test_binomial_two_sided_p_by_hand():
    assert binomial_two_sided_p(0, 5) == pytest.approx(2 / 32)  # 2 * (1/2)^5
    assert binomial_two_sided_p(5, 5) == pytest.approx(2 / 32)  # symmetric
    assert binomial_two_sided_p(1, 10) == pytest.approx(2 * 11 / 1024)  # 2 * (1 + 10) / 2^10
    assert binomial_two_sided_p(3, 6) == 1.0  # 2 * 42/64 > 1: capped
    assert binomial_two_sided_p(0, 0) == 1.0  # no discordant pair: no evidence either way


def test_mcnemar_counts_the_discordant_pairs_in_each_direction():
    a = [True, True, True, True, True, False, True, False]
    b = [False, False, False, False, False, False, True, False]
    result = mcnemar_exact(a, b)
    assert (result.a_only, result.b_only) == (5, 0) and result.p == pytest.approx(0.0625)
    swapped = mcnemar_exact(b, a)
    assert (swapped.a_only, swapped.b_only, swapped.p) == (0, 5, result.p)
    same = mcnemar_exact([True, False, True], [True, False, True])
    assert (same.a_only, same.b_only, same.p) == (0, 0, 1.0)
    with pytest.raises(ValueError, match="the same ones"):
        mcnemar_exact([True, False], [True])


def test_the_verdict_word_follows_the_interval_not_the_point():
    assert verdict_word((0.1, 2.0)) == "beats"
    assert verdict_word((-2.0, -0.1)) == "trails"
    assert verdict_word((-0.5, 2.0)) == "ties"
    assert verdict_word((0.0, 2.0)) == "ties"  # an end at 0 does not exclude it
