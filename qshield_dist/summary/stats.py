"""Paired statistics for two models answered on the same attacked points.

Every test and interval comes from SciPy or statsmodels; this module only arranges the data.
Inputs are per-point 0/1 outcomes (1 = the point is robust) of models A and B on the same
points, one array pair per seed. The difference is always A - B, in robust-accuracy units.

- `mcnemar_exact`: McNemar's exact test, the two-sided binomial test on the discordant pairs.
- `paired_interval`: a 95% bootstrap interval of the mean difference. One seed: points are
  resampled in pairs (scipy.stats.bootstrap, paired). Several seeds: hierarchical, seeds
  resampled by scipy.stats.bootstrap and points within each drawn seed resampled again; the
  seeds weigh equally, as in the point estimate (the mean of the per-seed differences).
- `holm`: Holm's step-down adjustment of the p-values of one report (statsmodels).
- `points_to_resolve`: points per seed a paired test needs to resolve the observed
  difference at alpha 0.05 with power 0.8 (statsmodels' TTestPower on the per-point
  differences).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
from scipy import stats

ALPHA = 0.05
POWER = 0.8
N_RESAMPLES = 4000
_PERCENTILE_BOOTSTRAP = {"n_resamples": N_RESAMPLES, "confidence_level": 1 - ALPHA, "method": "percentile"}


@dataclass(frozen=True)
class Paired:
    """One comparison of A against B, pooled over its seeds."""

    n_points: int  # per seed (the shared attack set)
    n_seeds: int
    diff: float  # mean over seeds of mean(A) - mean(B)
    low: float  # 95% interval of diff
    high: float
    per_seed: tuple[float, ...]  # each seed's difference
    a_only: int  # discordant pairs, summed over seeds: robust under A only
    b_only: int  # robust under B only
    p_value: float  # McNemar's exact test on the discordant pairs of all seeds


def mcnemar_exact(a_only: int, b_only: int) -> float:
    """Two-sided exact McNemar p-value: under no difference each discordant pair falls
    either way with probability 1/2. No discordant pair: p = 1."""
    n = a_only + b_only
    return 1.0 if n == 0 else float(stats.binomtest(a_only, n, 0.5).pvalue)


def _as_pairs(seeds: Sequence[tuple[Sequence[int], Sequence[int]]]) -> list[tuple[np.ndarray, np.ndarray]]:
    pairs = [(np.asarray(a, dtype=float), np.asarray(b, dtype=float)) for a, b in seeds]
    for a, b in pairs:
        if a.shape != b.shape or a.ndim != 1 or len(a) == 0:
            raise ValueError("each seed needs two non-empty outcome arrays over the same points")
    return pairs


def paired_interval(
    seeds: Sequence[tuple[Sequence[int], Sequence[int]]], seed: int = 0
) -> tuple[float, float]:
    """95% bootstrap interval of the mean difference A - B (see the module docstring)."""
    pairs = _as_pairs(seeds)
    rng = np.random.default_rng(seed)
    if len(pairs) == 1:
        a, b = pairs[0]
        if np.all(a - b == (a - b)[0]):  # every resample equals the sample
            return float((a - b)[0]), float((a - b)[0])
        res = stats.bootstrap(
            (a, b),
            lambda x, y, axis: np.mean(x, axis=axis) - np.mean(y, axis=axis),
            paired=True,
            vectorized=True,
            **_PERCENTILE_BOOTSTRAP,
            rng=rng,
        )
        return float(res.confidence_interval.low), float(res.confidence_interval.high)
    diffs = [a - b for a, b in pairs]

    def resampled(seed_index: np.ndarray) -> float:
        # one inner resample of points for every seed the outer resample drew
        return float(
            np.mean([np.mean(rng.choice(diffs[int(i)], size=len(diffs[int(i)]))) for i in seed_index])
        )

    res = stats.bootstrap(
        (np.arange(len(diffs)),),
        resampled,
        vectorized=False,
        **_PERCENTILE_BOOTSTRAP,
        rng=rng,
    )
    return float(res.confidence_interval.low), float(res.confidence_interval.high)


def compare(seeds: Sequence[tuple[Sequence[int], Sequence[int]]]) -> Paired:
    """Difference, interval and McNemar's test of A against B over the given seeds."""
    pairs = _as_pairs(seeds)
    per_seed = tuple(float(np.mean(a) - np.mean(b)) for a, b in pairs)
    a_only = int(sum(np.sum((a == 1) & (b == 0)) for a, b in pairs))
    b_only = int(sum(np.sum((a == 0) & (b == 1)) for a, b in pairs))
    low, high = paired_interval(seeds)
    return Paired(
        len(pairs[0][0]),
        len(pairs),
        float(np.mean(per_seed)),
        low,
        high,
        per_seed,
        a_only,
        b_only,
        mcnemar_exact(a_only, b_only),
    )


def holm(p_values: Sequence[float]) -> list[float]:
    """Holm-adjusted p-values, in the order given."""
    if not p_values:
        return []
    from statsmodels.stats.multitest import multipletests

    return [float(p) for p in multipletests(list(p_values), alpha=ALPHA, method="holm")[1]]


def points_to_resolve(seeds: Sequence[tuple[Sequence[int], Sequence[int]]]) -> float:
    """Points per seed for a paired test to detect the observed mean difference at ALPHA with
    POWER; inf when no difference was observed."""
    from statsmodels.stats.power import TTestPower

    d = np.concatenate([a - b for a, b in _as_pairs(seeds)])
    mean, sd = float(np.mean(d)), float(np.std(d, ddof=1)) if len(d) > 1 else 0.0
    if mean == 0:
        return math.inf
    if sd == 0:
        return float(len(d))  # every point moved the same way: already as resolved as it gets
    n = TTestPower().solve_power(
        effect_size=abs(mean) / sd, alpha=ALPHA, power=POWER, alternative="two-sided"
    )
    return float(math.ceil(n))


VERDICTS = ("more robust", "less robust", "equal", "undecided")


def verdict(low: float, high: float, p_adjusted: float, margin: float) -> str:
    """From the interval, never from the point estimate: above zero -> more robust, below ->
    less robust (each also needs the Holm-adjusted McNemar p < ALPHA, so that a report's many
    comparisons do not manufacture a win); inside +-margin -> equal; else undecided."""
    if low > 0 and p_adjusted < ALPHA:
        return "more robust"
    if high < 0 and p_adjusted < ALPHA:
        return "less robust"
    if -margin <= low and high <= margin:
        return "equal"
    return "undecided"
