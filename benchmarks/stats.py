"""The statistics of a method comparison, numpy only: how sure a difference of two methods is.

    paired differences   per seed, method A's score minus method B's at the same seed (the same
                         data order and, where both have one, the same initialization)
    bootstrap interval   a percentile bootstrap of the mean paired difference: resample the seeds
                         with replacement, take each resample's mean, read the 2.5th and 97.5th
                         percentiles (fixed RNG seed, so a page is reproducible)
    McNemar              exact test on per-example correctness: of the (sentence, seed) pairs where
                         exactly one method is right, is A right as often as B? Two-sided binomial
                         p of the discordant counts under p = 1/2.

With few seeds the percentile bootstrap is too narrow (it only ever sees the seeds it has; with 5
there are 126 distinct resamples); McNemar pools the sentences of every seed and treats each pair
as independent, which ignores that all sentences of one seed share one trained model.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

RESAMPLES = 10_000
BOOTSTRAP_SEED = 0


def paired_differences(a: Mapping[int, float], b: Mapping[int, float]) -> dict[int, float]:
    """``a[seed] - b[seed]`` for every seed both have, in seed order."""
    return {seed: a[seed] - b[seed] for seed in sorted(set(a) & set(b))}


def bootstrap_mean_interval(
    values: Sequence[float], confidence: float = 0.95, resamples: int = RESAMPLES, seed: int = BOOTSTRAP_SEED
) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of ``values`` [n] -> (low, high)."""
    data = np.asarray(values, dtype=np.float64)
    if data.size == 0:
        raise ValueError("bootstrap_mean_interval: no values")
    rng = np.random.default_rng(seed)
    means = data[rng.integers(0, data.size, size=(resamples, data.size))].mean(axis=1)
    tail = 100 * (1 - confidence) / 2
    low, high = np.percentile(means, [tail, 100 - tail])
    return float(low), float(high)


@dataclass(frozen=True)
class McNemar:
    """``a_only``: pairs where A is right and B wrong; ``b_only``: the reverse; ``p``: two-sided exact."""

    a_only: int
    b_only: int
    p: float


def mcnemar_exact(correct_a: Sequence[bool], correct_b: Sequence[bool]) -> McNemar:
    """Exact McNemar test of two methods' correctness on the same examples, paired by position.

    Args: correct_a, correct_b: [N] whether each method got example i right.
    """
    a, b = np.asarray(correct_a, dtype=bool), np.asarray(correct_b, dtype=bool)
    if a.shape != b.shape:
        raise ValueError(f"mcnemar_exact: {a.size} and {b.size} examples; the two methods must score the same ones")
    a_only, b_only = int(np.sum(a & ~b)), int(np.sum(~a & b))
    return McNemar(a_only, b_only, binomial_two_sided_p(a_only, a_only + b_only))


def binomial_two_sided_p(successes: int, trials: int) -> float:
    """Two-sided exact p of ``successes`` in ``trials`` under p = 1/2: twice the smaller tail, at most 1."""
    if trials == 0:
        return 1.0
    smaller = min(successes, trials - successes)
    tail = sum(math.comb(trials, i) for i in range(smaller + 1))  # exact integers: no rounding in the tail
    return min(1.0, 2 * tail / 2**trials)


def verdict_word(interval: tuple[float, float]) -> str:
    """``beats`` when the whole interval is above 0, ``trails`` when below, else ``ties``."""
    low, high = interval
    return "beats" if low > 0 else "trails" if high < 0 else "ties"
