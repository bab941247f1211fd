"""Paired statistics: hand-computed values and the properties of the bootstrap intervals."""

from __future__ import annotations

import math

import numpy as np
import pytest

from qshield_dist.summary.stats import (
    compare,
    holm,
    mcnemar_exact,
    paired_interval,
    points_to_resolve,
    verdict,
)


def test_mcnemar_exact_by_hand() -> None:
    # 1 discordant pair one way, 9 the other: p = 2 * P(X <= 1), X ~ Bin(10, 1/2) = 2 * 11 / 1024
    assert mcnemar_exact(1, 9) == pytest.approx(22 / 1024, rel=1e-12)
    assert mcnemar_exact(9, 1) == pytest.approx(22 / 1024, rel=1e-12)
    assert mcnemar_exact(5, 5) == pytest.approx(1.0)
    assert mcnemar_exact(0, 0) == 1.0
    # 0 vs 6: 2 / 64
    assert mcnemar_exact(0, 6) == pytest.approx(2 / 64, rel=1e-12)


def test_compare_counts_discordant_pairs_and_pools_seeds() -> None:
    a = [1, 1, 1, 0, 0, 1]
    b = [1, 0, 0, 0, 1, 1]
    res = compare([(a, b)])
    assert (res.a_only, res.b_only, res.n_points, res.n_seeds) == (2, 1, 6, 1)
    assert res.diff == pytest.approx(1 / 6)
    assert res.p_value == pytest.approx(mcnemar_exact(2, 1))
    two = compare([(a, b), ([1] * 6, [0] * 6)])
    assert two.per_seed == pytest.approx((1 / 6, 1.0)) and two.diff == pytest.approx((1 / 6 + 1) / 2)
    assert (two.a_only, two.b_only) == (8, 1)


def test_interval_without_discordant_pairs_is_zero() -> None:
    a = [1, 0, 1, 1, 0] * 20
    assert paired_interval([(a, a)]) == (0.0, 0.0)
    assert paired_interval([(a, a), (a, a)]) == (0.0, 0.0)


def test_interval_when_every_pair_is_discordant_one_way() -> None:
    assert paired_interval([([1] * 50, [0] * 50)]) == (1.0, 1.0)
    assert paired_interval([([0] * 50, [1] * 50)]) == (-1.0, -1.0)
    assert paired_interval([([1] * 50, [0] * 50), ([1] * 30, [0] * 30)]) == (1.0, 1.0)


def test_interval_matches_the_normal_approximation_at_large_n() -> None:
    n = 4000
    # 30% robust under A only, 20% under B only, the rest concordant: mean 0.1, sd sqrt(0.5 - 0.01)
    a = np.array([1] * 1200 + [0] * 800 + [1] * 1000 + [0] * 1000)
    b = np.array([0] * 1200 + [1] * 800 + [1] * 1000 + [0] * 1000)
    low, high = paired_interval([(a, b)])
    half = 1.959964 * math.sqrt(0.5 - 0.01) / math.sqrt(n)
    assert low == pytest.approx(0.1 - half, abs=0.003) and high == pytest.approx(0.1 + half, abs=0.003)


def test_hierarchical_interval_is_wider_when_seeds_disagree() -> None:
    rng = np.random.default_rng(1)
    same = [(rng.integers(0, 2, 200), rng.integers(0, 2, 200)) for _ in range(3)]
    base = [(a, a.copy()) for a, _ in same]
    # seeds that agree (no difference) against seeds whose differences are 0, +0.3 and -0.3
    apart = [
        (base[0][0], base[0][1]),
        (np.ones(200), np.r_[np.zeros(60), np.ones(140)]),
        (np.r_[np.zeros(60), np.ones(140)], np.ones(200)),
    ]
    low_same, high_same = paired_interval(base)
    low_apart, high_apart = paired_interval(apart)
    assert (low_same, high_same) == (0.0, 0.0)
    assert low_apart < -0.05 and high_apart > 0.05  # the spread between seeds shows in the interval


def test_holm_by_hand() -> None:
    # sorted 0.01, 0.03, 0.04 -> 3 * 0.01, max(0.03, 2 * 0.03), max(0.06, 1 * 0.04)
    assert holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])
    assert holm([]) == []


@pytest.mark.parametrize(
    "low,high,p,expected",
    [
        (0.01, 0.05, 0.01, "more robust"),
        (0.01, 0.05, 0.20, "undecided"),  # interval above 0 but not significant after Holm
        (0.005, 0.015, 0.01, "more robust"),  # significant, though within the margin
        (-0.05, -0.01, 0.01, "less robust"),
        (-0.015, 0.019, 0.50, "equal"),  # inside +-2 pp
        (-0.025, 0.01, 0.50, "undecided"),  # reaches past the margin
        (-0.01, 0.03, 0.30, "undecided"),  # point estimate may be positive; the interval includes 0
    ],
)
def test_verdict_categories_with_margin(low: float, high: float, p: float, expected: str) -> None:
    assert verdict(low, high, p, margin=0.02) == expected


def test_points_to_resolve() -> None:
    a, b = [1, 1, 0, 1, 0, 1, 1, 0, 1, 1], [1, 0, 0, 1, 1, 1, 0, 0, 1, 1]
    small = points_to_resolve([(a, b)])
    assert math.isfinite(small) and small > len(a)  # not resolved at 10 points
    bigger = points_to_resolve([([1] * 8 + [0, 0], [0] * 8 + [1, 1])])
    assert bigger < small  # a larger difference needs fewer points
    assert points_to_resolve([(a, a)]) == math.inf
