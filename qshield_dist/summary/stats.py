"""Paired statistics for two models answered on the same attacked points, over seeds.

Inputs are per-point 0/1 outcomes (1 = the point is robust) of models A and B on the same
points, one array pair per seed (each seed trains its own A and B). The difference is always
A - B, in robust-accuracy units. Two questions differ, and each verdict says which it answers:

- **"these trained models"** (`MODELS`, the default): the models are fixed, the points are
  the sampling unit, each seed a stratum. The estimate is the points-weighted mean of the
  per-seed differences (with equally many points per seed, the plain mean over seeds, as the
  report shows it per seed), its variance the sum of the
  within-seed variances (each seed's per-point differences' variance / n, times its weight
  squared), and the interval is normal (Wald). The test is McNemar's exact test on the
  discordant pairs summed over the seeds.
  Why these, and not the alternatives:
  * Cochran-Mantel-Haenszel on per-seed tables [[both robust, A only], [B only, neither]]
    (statsmodels' StratifiedTable) is wrong here: that table crosses A's outcome with B's on
    the same points, so its CMH tests whether A and B *agree* (they always do, strongly), not
    whether their robust accuracies differ. For matched pairs the CMH test of marginal
    homogeneity takes each *pair* as a stratum with the table [model x outcome]; summed over
    all pairs of all seeds it reduces exactly to McNemar's statistic on the summed discordant
    counts (Mantel & Haenszel 1959; Agresti, Categorical Data Analysis, on McNemar's test as a
    CMH test over matched pairs; tests/test_stats.py checks the identity with StratifiedTable). So "stratified McNemar"
    over seeds is the McNemar test on the summed discordant pairs, here in its exact form.
  * Inverse-variance (fixed-effect) weights, as statsmodels' `combine_effects` uses, are
    undefined for a seed without discordant pairs (variance 0, common on small sets) and
    would reweigh the seeds by how much A and B disagree, so the estimate would no longer be
    the reported mean over seeds.
  **Few or no discordant pairs.** The Wald variance of a seed without any discordant pair is 0,
  and with one to three it is smaller than what so few points can rule out, so the interval
  would claim "equal" on ten agreeing points. Each seed's variance is therefore floored at the
  variance whose 95% half-width is the exact (Clopper-Pearson) one-sided ALPHA/2 upper bound on
  its discordance rate with no discordant pair, 1 - (ALPHA/2)^(1/n) (`exact_floor`): since
  |A - B| <= the discordance rate, n points that all agree cannot rule out a true difference
  that large. Combined over seeds like any within-seed variance; with S degenerate seeds of n
  points the half-width (1 - (ALPHA/2)^(1/n)) / sqrt(S) is never below the exact bound of the
  pooled S n points (which holds over unequal seeds too: a sum of binomials of unequal rates is
  more concentrated than one binomial of their mean, Hoeffding 1956, Ann Math Stat 27:713). The
  floor binds only with at most 3 discordant pairs in a seed (the Wald variance of D discordant
  pairs in n is about D / n^2; the floor's (3.69 / 1.96)^2 / n^2 = 3.5 / n^2): more discordance
  never makes an interval narrower than none would. The interval is clipped to [-1, 1].
  **"Equal" also takes the score tests.** The floor is exact only at zero discordance: with a
  handful of discordant pairs the Wald variance is estimated low exactly when the difference
  is, so the interval alone called a true difference equal to a 2 pp margin "equal" 3.5-3.9% of
  the time at 256 and 1,000 points (one seed; exact, tests/test_stats.py), against 2.5%. So
  "equal" also needs both one-sided score tests of "|difference| >= margin" to reject
  (`score_equivalent`): each seed's variance is Tango's, estimated under the boundary itself
  (Tango 1998, Stat Med 17:891; the variance of a -1/0/1 difference under H0, with the
  restricted maximum-likelihood discordance; checked against Fagerland, Lydersen & Laake's
  published interval), combined over the seeds with the estimate's weights. Exact rates, one
  seed: 0.6%, 0.4%, 0.0% at 256 points (2, 3, 5% discordant), 2.0%, 2.2%, 2.3% at 1,000;
  simulated over 3 seeds: at most 2.4%. The printed interval stays the Wald one: the score
  tests can only take "equal" away.
  It is valid when the seeds' point sets are independent samples (disjoint slices of one
  permutation); with today's overlapping per-seed sets the seeds share points, which this
  analysis ignores. It does not generalise to other training runs: with a between-seed
  spread, "these models differ" can be true while the procedure does not.
- **"the training procedure"** (`PROCEDURE`): the seeds are the sampling unit. Random-effects
  combination of the per-seed differences with a t interval on n_seeds - 1 degrees of freedom:
  the equal-weight mean, its variance the sample variance of the per-seed differences / S, i.e.
  a one-sample t test on the per-seed differences. This is the Hartung-Knapp-Sidik-Jonkman
  random-effects interval when the within-seed variances are equal (statsmodels' combine_effects
  "random effect wls" row; the test checks it); the per-seed differences' spread already holds
  the within-seed noise. The "modified" HKSJ (never narrower than the within-seed variance
  alone; Roever, Knapp & Friede 2015, BMC Med Res Methodol 15:99) was tried and rejected: with
  3 seeds it made false decisions 0.0 % and took nearly all the power, since a t test's
  rejections at 2 df come mostly from seeds that happen to agree. Only when the per-seed
  differences are all equal (no spread at all) does the within-seed variance stand in.
  Undefined with one seed: that verdict is undecided. The within-seed variances are the floored
  ones above, so with every seed's difference equal and no discordant pair the interval still
  has the width the points allow (never zero).
- `points_needed` (these models): points per seed, at the given number of seeds, for a
  two-sided test at ALPHA to find a true difference equal to the equivalence margin with
  POWER (statsmodels' TTestPower on the per-point differences; the per-seed count is the
  total / seeds). `seeds_needed` (the procedure): seeds, at the points per seed observed,
  for the same at the spread of the per-seed differences (TTestPower over seeds). At a true
  difference equal to the margin m at least a share m of the points are discordant, so the
  per-point differences' variance is at least m (1 - m) (`margin_sd`): both use that as their
  floor, and never answer "decided as it is" because nothing differed so far.
- `holm`: Holm's step-down adjustment of the p-values of one report (statsmodels).

The hierarchical percentile bootstrap this replaces had at most 10 distinct outer resamples
with 2-3 seeds (so its seed level was too narrow) and made a Python call per inner resample.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
from numpy.typing import ArrayLike
from scipy import stats

ALPHA = 0.05
POWER = 0.8
MODELS = "these trained models"
PROCEDURE = "the training procedure"
ESTIMANDS = {"models": MODELS, "procedure": PROCEDURE}  # option value -> the question it names

Seeds = Sequence[tuple[Sequence[int], Sequence[int]]]
_Z = float(stats.norm.isf(ALPHA / 2))


@dataclass(frozen=True)
class Answer:
    """The difference A - B and its 95% interval for one question (estimand)."""

    estimand: str
    diff: float
    low: float
    high: float
    p_value: float


@dataclass(frozen=True)
class Paired:
    """One comparison of A against B over its seeds, answering both questions."""

    n_points: int  # per seed (the smallest seed's, when they differ)
    n_seeds: int
    per_seed: tuple[float, ...]  # each seed's difference
    a_only: int  # discordant pairs, summed over seeds: robust under A only
    b_only: int  # robust under B only
    models: Answer  # "these trained models"
    procedure: Answer | None  # "the training procedure"; None with one seed

    def answer(self, estimand: str) -> Answer | None:
        return self.models if estimand == MODELS else self.procedure


def mcnemar_exact(a_only: int, b_only: int) -> float:
    """Two-sided exact McNemar p-value: under no difference each discordant pair falls
    either way with probability 1/2, so p = 2 P(X <= min) for X ~ Bin(discordant, 1/2) (what
    scipy.stats.binomtest gives at p = 1/2, at a tenth of its cost). No discordant pair: p = 1."""
    n = a_only + b_only
    return 1.0 if n == 0 else min(1.0, float(2 * stats.binom.cdf(min(a_only, b_only), n, 0.5)))


def _as_pairs(seeds: Seeds) -> list[tuple[np.ndarray, np.ndarray]]:
    pairs = [(np.asarray(a, dtype=float), np.asarray(b, dtype=float)) for a, b in seeds]
    if not pairs:
        raise ValueError("a comparison needs at least one seed")
    for a, b in pairs:
        if a.shape != b.shape or a.ndim != 1 or len(a) == 0:
            raise ValueError("each seed needs two non-empty outcome arrays over the same points")
    return pairs


def exact_floor(n: np.ndarray | float) -> np.ndarray | float:
    """The exact (Clopper-Pearson) one-sided ALPHA/2 upper bound on a discordance rate when none
    of n points is discordant, 1 - (ALPHA/2)^(1/n) = beta.ppf(1 - ALPHA/2, 1, n): the largest
    |A - B| that n agreeing points cannot rule out (the module docstring)."""
    return 1.0 - (ALPHA / 2) ** (1.0 / np.asarray(n, dtype=float))


def _within(pairs: list[tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per seed: points, mean difference, and the variance of that mean (per-point variance / n),
    floored at (exact_floor(n) / z)^2 so that a seed with few or no discordant pairs keeps the
    width its points allow (module docstring)."""
    n = np.array([len(a) for a, _ in pairs], dtype=float)
    diffs = [a - b for a, b in pairs]
    mean = np.array([d.mean() for d in diffs])
    var = np.array([d.var(ddof=1) / len(d) if len(d) > 1 else 0.0 for d in diffs])
    return n, mean, np.maximum(var, (exact_floor(n) / _Z) ** 2)


def stratified_difference(seeds: Seeds) -> tuple[float, float]:
    """The "these trained models" estimate and its standard error (see the module docstring):
    the points-weighted mean of the per-seed differences, within-seed variances only (floored:
    never 0)."""
    n, mean, var = _within(_as_pairs(seeds))
    w = n / n.sum()
    return float(w @ mean), float(math.sqrt(w**2 @ var))


def tango_variance(a_only: ArrayLike, b_only: ArrayLike, n: ArrayLike, delta0: float) -> np.ndarray:
    """The variance of the paired difference (a_only - b_only) / n under H0: p(A only) -
    p(B only) = delta0, as Tango's score test estimates it (Tango 1998, Stat Med 17:891;
    Fagerland, Lydersen & Laake 2017, Statistical Analysis of Contingency Tables, ch. 8):
    (2 q + delta0 (1 - delta0)) / n, q the maximum-likelihood p(B only) under H0 (closed form).
    Arrays broadcast."""
    a, b, n = (np.asarray(x, dtype=float) for x in (a_only, b_only, n))
    big_b = -a - b + (2 * n - a + b) * delta0
    big_c = -b * delta0 * (1 - delta0)
    q = (np.sqrt(np.maximum(big_b**2 - 8 * n * big_c, 0.0)) - big_b) / (4 * n)
    return (2 * q + delta0 * (1 - delta0)) / n


def tango_z(a_only: ArrayLike, b_only: ArrayLike, n: ArrayLike, delta0: float) -> np.ndarray:
    """Tango's score statistic for H0: p(A only) - p(B only) = delta0 on n paired points."""
    a, b, n = (np.asarray(x, dtype=float) for x in (a_only, b_only, n))
    with np.errstate(divide="ignore", invalid="ignore"):
        return ((a - b) / n - delta0) / np.sqrt(tango_variance(a, b, n, delta0))


def equivalence_z(seeds: Seeds, margin: float) -> tuple[float, float]:
    """The score statistics of the two one-sided tests of "equal within +-margin" for "these
    trained models" (the module docstring): Z at +margin and at -margin of the points-weighted
    mean difference, each seed's variance Tango's at that boundary (one seed: Tango's own
    statistic). Equal at critical value c when Z(+margin) <= -c and Z(-margin) >= c. A margin
    of 0 leaves no room for "equal": (inf, -inf)."""
    pairs = _as_pairs(seeds)
    if margin <= 0:
        return math.inf, -math.inf
    n = np.array([len(a) for a, _ in pairs], dtype=float)
    a_only = np.array([np.sum((a == 1) & (b == 0)) for a, b in pairs], dtype=float)
    b_only = np.array([np.sum((a == 0) & (b == 1)) for a, b in pairs], dtype=float)
    w = n / n.sum()
    diff = float(w @ ((a_only - b_only) / n))

    def z(delta0: float) -> float:
        return (diff - delta0) / math.sqrt(float(w**2 @ tango_variance(a_only, b_only, n, delta0)))

    return z(margin), z(-margin)


def score_equivalent(seeds: Seeds, margin: float, critical: float | None = None) -> bool:
    """Both one-sided score tests reject "|difference| >= margin" at `critical` (default: the
    95% interval's 1.96, i.e. alpha/2 each side): equivalence_z."""
    c = _Z if critical is None else critical
    above, below = equivalence_z(seeds, margin)
    return above <= -c and below >= c


def _clipped(estimand: str, diff: float, half: float, p: float) -> Answer:
    """diff +- half within [-1, 1], where a difference of two accuracies lies."""
    return Answer(estimand, diff, max(-1.0, diff - half), min(1.0, diff + half), p)


def _models(pairs: list[tuple[np.ndarray, np.ndarray]], a_only: int, b_only: int) -> Answer:
    diff, se = stratified_difference(pairs)
    return _clipped(MODELS, diff, _Z * se, mcnemar_exact(a_only, b_only))


def seed_level(seeds: Seeds) -> tuple[float, float, int]:
    """The "training procedure" estimate, its standard error and the seeds it rests on (see the
    module docstring): the mean of the per-seed differences, the standard error from their
    spread (the seeds' floored within-seed noise when they all agree). ValueError with fewer
    than 2 seeds: there is no spread to go on."""
    _, mean, var = _within(_as_pairs(seeds))
    s = len(mean)
    if s < 2:
        raise ValueError("the training procedure's answer needs at least 2 seeds")
    spread = float(mean.var(ddof=1)) if np.ptp(mean) > 0 else 0.0
    # no spread: the points' noise (floored, so never 0: every point agreeing is no certainty)
    return float(mean.mean()), math.sqrt(spread / s if spread > 0 else var.sum() / s**2), s


def procedure_interval(diff: float, se: float, s: int, level: float = ALPHA) -> tuple[float, float, float]:
    """The t interval (s - 1 df) at two-sided `level` on seed_level's answer, within [-1, 1],
    and its two-sided p-value."""
    half = stats.t.isf(level / 2, s - 1) * se
    p = 2 * stats.t.sf(abs(diff) / se, s - 1)
    return max(-1.0, diff - half), min(1.0, diff + half), float(p)


def _procedure(pairs: list[tuple[np.ndarray, np.ndarray]]) -> Answer | None:
    if len(pairs) < 2:
        return None
    diff, se, s = seed_level(pairs)
    return Answer(PROCEDURE, diff, *procedure_interval(diff, se, s))


def compare(seeds: Seeds) -> Paired:
    """Both answers for A against B over the given seeds (see the module docstring)."""
    pairs = _as_pairs(seeds)
    a_only = int(sum(np.sum((a == 1) & (b == 0)) for a, b in pairs))
    b_only = int(sum(np.sum((a == 0) & (b == 1)) for a, b in pairs))
    return Paired(
        n_points=min(len(a) for a, _ in pairs),
        n_seeds=len(pairs),
        per_seed=tuple(float(np.mean(a) - np.mean(b)) for a, b in pairs),
        a_only=a_only,
        b_only=b_only,
        models=_models(pairs, a_only, b_only),
        procedure=_procedure(pairs),
    )


def holm(p_values: Sequence[float]) -> list[float]:
    """Holm-adjusted p-values, in the order given."""
    if not p_values:
        return []
    from statsmodels.stats.multitest import multipletests

    return [float(p) for p in multipletests(list(p_values), alpha=ALPHA, method="holm")[1]]


def _solve_n(effect: float) -> float:
    from statsmodels.stats.power import TTestPower

    return float(
        TTestPower().solve_power(effect_size=effect, alpha=ALPHA, power=POWER, alternative="two-sided")
    )


def margin_sd(margin: float) -> float:
    """The smallest standard deviation of the per-point differences at a true difference equal to
    `margin`: at least a share `margin` of points are then discordant, and the variance of a
    -1/0/1 difference is its discordance less its mean squared, >= margin (1 - margin)."""
    return math.sqrt(margin * (1 - margin))


def points_needed(seeds: Seeds, margin: float) -> float:
    """Points per seed, at this many seeds, for "these trained models" to find a true
    difference equal to `margin` at ALPHA with POWER, from the per-point differences' pooled
    within-seed spread, never below margin_sd (so with no point differing so far, the points
    that spread at the margin needs, not the points at hand)."""
    pairs = _as_pairs(seeds)
    n = np.array([len(a) for a, _ in pairs], dtype=float)
    var = np.array([np.var(a - b, ddof=1) if len(a) > 1 else 0.0 for a, b in pairs])
    sd = max(math.sqrt(float(var @ n / n.sum())), margin_sd(margin))  # pooled, points-weighted
    return float(math.ceil(_solve_n(margin / sd) / len(pairs)))


def seeds_needed(seeds: Seeds, margin: float) -> float:
    """Seeds, at the points per seed observed, for "the training procedure" to find a true
    difference equal to `margin` at ALPHA with POWER, from the spread of the per-seed
    differences (the within-seed spread when they all agree), never below a seed's spread at
    the margin (margin_sd / sqrt(points)); NaN with one seed (no spread to go on)."""
    pairs = _as_pairs(seeds)
    if len(pairs) < 2:
        return math.nan
    _, se, s = seed_level(pairs)  # the per-seed differences' sd is se * sqrt(s), in both its cases
    points = float(np.mean([len(a) for a, _ in pairs]))
    sd = max(se * math.sqrt(s), margin_sd(margin) / math.sqrt(points))
    return float(max(2, math.ceil(_solve_n(margin / sd))))


VERDICTS = ("more robust", "less robust", "equal", "undecided")


def verdict(low: float, high: float, p_adjusted: float, margin: float, *, equivalent: bool) -> str:
    """From the interval, never from the point estimate: above zero -> more robust, below ->
    less robust (each also needs the Holm-adjusted p < ALPHA, so that a report's many
    comparisons do not manufacture a win); inside +-margin and `equivalent` (for "these trained
    models", score_equivalent: the score tests at the margin agree; for the procedure, True) ->
    equal; else undecided (also when the question has no interval: NaN)."""
    if low > 0 and p_adjusted < ALPHA:
        return "more robust"
    if high < 0 and p_adjusted < ALPHA:
        return "less robust"
    if -margin <= low and high <= margin and equivalent:
        return "equal"
    return "undecided"
