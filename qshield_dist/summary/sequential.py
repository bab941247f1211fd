"""Sequential decisions on paired comparisons, valid when looking after every wave of points.

The question is "these trained models" (stats.MODELS): the seeds are fixed and each wave adds
points to every seed, in the order of the attack set's permutation. After each look k the
estimate and its standard error are stats.stratified_difference on the points so far.

Design: a group-sequential test with Lan-DeMets alpha spending of O'Brien-Fleming type
(Lan & DeMets 1983, Biometrika 70:659; gsDesign's sfLDOF), f(t; a) = 2 - 2 Phi(z_{1-a/2} / sqrt(t))
for each side at one-sided level a, t the look's information fraction (points per seed / the
maximum). The boundaries c_1..c_K are solved look by look so that the probability of first
crossing c_k at look k under no difference is f(t_k) - f(t_{k-1}), the Z statistics of the
looks being jointly normal with corr(Z_i, Z_j) = sqrt(t_i / t_j) (scipy.stats.multivariate_normal
for the joint probabilities, scipy.optimize.brentq for c_k). Boundaries at a look depend only
on the looks so far, so the looks need not be planned beyond the maximum; `geometric_looks`
spaces them geometrically. Checked against published values in tests/test_sequential.py.

Decisions use repeated confidence intervals (Jennison & Turnbull, Group Sequential Methods
with Applications to Clinical Trials, 2000, ch. 9): at look k, diff_k +- c_k se_k. They cover
the true difference at all looks at once with probability >= 1 - level, whatever the stopping
rule, so one interval answers three ways, as stats.verdict does for one look:

- more robust: the interval lies above 0; less robust: below 0 (|Z_k| >= c_k);
- equal: it lies inside +-margin;
- continue otherwise, and undecided at the last look (t = 1, the maximum points per seed).

Several comparisons: Holm's step-down over the comparisons' repeated p-values (the smallest
level at which a comparison's interval has excluded 0 at some look so far; a valid p-value for
the whole sequence, J&T sec. 9.5), done with boundaries at the Holm levels alpha/m, alpha/(m-1),
..., alpha directly, m the size of Holm's family (verdicts.in_holm_family: the report's verdicts,
the same family as their Holm-adjusted p; one decide does not judge counts as never rejected).
A comparison not rejected is judged "equal" at the level Holm gives it at that look. Each false
"more robust" / "less robust" thus has probability <= alpha/2 per direction over the family, and
a false "equal" (|true difference| >= margin) <= alpha/2 per comparison, as far as the normal
approximation of each look's estimate holds. With few or no discordant points the standard error
is stats.stratified_difference's floored one, so an interval never collapses to a point on points
that all agree; and "equal" at a look also needs both score tests at the margin past the same
boundary (stats.equivalence_z, Tango's variance under each boundary), as stats.verdict does at
one look, since with a handful of discordant points the Wald interval alone calls a true
difference at the margin "equal" too often (3.5-3.9% at one look, one seed, 256 or 1,000 points).

`price` gives the points per seed a decision costs, at a true difference equal to the margin,
for --plan: the maximum, the expected (Monte Carlo over the normal approximation), and the power,
beside a fixed-sample design of the same maximum size.

Measured by tests/test_sequential.py (3 seeds, 10 % of points discordant, margin 2 pp, looks at
128, 256, 512, 1024 points per seed, 2000 simulated binary runs per row, fixed seeds; Monte-Carlo
SE of a 2.5 % rate 0.35 pp):

    true difference        decision            sequential    fixed design (one look at 1024)
    0                      false more robust   2.45 %        2.5 % (by construction)
    0                      false less robust   2.35 %        2.5 %
    0                      points per seed     1022          1024
    = margin (+2 pp)       more robust (power) 94.5 %        93.9 %
    = margin (+2 pp)       points per seed     859           1024
    0, three comparisons   any false more/less 1.8 % / 2.0 % (500 runs, Holm)

`price` predicts 93.9 % and 861 points for the second row pair from the normal approximation.
Re-measured after "equal" took the score tests (2026-12-04): the same figures, since at 10 %
discordant points Tango's variance and the Wald one agree. Stopping for "equal" is non-binding:
the boundaries keep a false "more robust" / "less robust" at alpha/2 whether or not a run stops
there, so the score tests, which can only stop a run later, leave that error bound as it is.
`price` and `price_seeds` simulate the interval rule without the score tests.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from functools import lru_cache
from typing import Sequence

import numpy as np
from scipy import optimize, stats

from qshield_dist.config import ConfigError, SweepConfig
from qshield_dist.summary.stats import (
    ALPHA,
    Seeds,
    equivalence_z,
    procedure_interval,
    seed_level,
    stratified_difference,
)

MORE, LESS, EQUAL, CONTINUE, UNDECIDED = "more robust", "less robust", "equal", "continue", "undecided"
# In a results directory: a sequential launch's record of its looks and decisions (decide.py
# writes it, the report shows it).
DECISIONS_FILE = "decisions.json"


def spent(t: float, level: float) -> float:
    """Lan-DeMets O'Brien-Fleming-type spending: the one-sided alpha spent by information t."""
    if t <= 0:
        return 0.0
    return float(2 * stats.norm.sf(stats.norm.isf(level / 2) / math.sqrt(t)))


_GRID = 2001  # points of the numerical integration per look
_TRAPEZOID = np.r_[0.5, np.ones(_GRID - 2), 0.5]


@lru_cache(maxsize=4096)
def boundaries(fractions: tuple[float, ...], level: float) -> tuple[float, ...]:
    """One-sided Z boundaries c_1..c_K at the looks' information fractions (increasing, in
    (0, 1]), spending `level` on one side; a two-sided test at 2 * level uses +-c_k.

    Recursive numerical integration (Armitage, McPherson & Rowe 1969, JRSS A 132:235;
    Jennison & Turnbull 2000, ch. 19): the score S_k = Z_k sqrt(t_k) has independent normal
    increments; the density of S_k on the paths not yet stopped is carried on a grid
    (trapezoid rule) and c_k solved (scipy.optimize.brentq) so that the probability of first
    crossing at look k is f(t_k) - f(t_{k-1})."""
    if not fractions:
        return ()
    if any(b <= a for a, b in zip(fractions, fractions[1:])) or not 0 < fractions[0] or fractions[-1] > 1:
        raise ValueError(f"information fractions must increase within (0, 1]; got {fractions}")
    t0 = fractions[0]
    c = [float(stats.norm.isf(spent(t0, level)))]
    grid = np.linspace(-10 * math.sqrt(t0), c[0] * math.sqrt(t0), _GRID)
    dens = stats.norm.pdf(grid, scale=math.sqrt(t0))
    for prev, t in zip(fractions, fractions[1:]):
        sd = math.sqrt(t - prev)
        mass = dens * (grid[1] - grid[0]) * _TRAPEZOID  # trapezoid weights of the even grid
        target = spent(t, level) - spent(prev, level)
        bound = optimize.brentq(
            lambda b: mass @ stats.norm.sf((b - grid) / sd) - target, grid[0], 40.0, xtol=1e-9
        )
        c.append(float(bound / math.sqrt(t)))
        new = np.linspace(-10 * math.sqrt(t), bound, _GRID)
        dens = (
            mass @ np.exp(-0.5 * ((new[None, :] - grid[:, None]) / sd) ** 2) / (sd * math.sqrt(2 * math.pi))
        )
        grid = new
    return tuple(c)


def geometric_looks(first: int, max_points: int, ratio: float = 2.0) -> list[int]:
    """Points per seed at each look: first, first * ratio, ... and the maximum last."""
    if first < 1 or max_points < first or ratio <= 1:
        raise ValueError(f"need 1 <= first <= max_points and ratio > 1; got {first}, {max_points}, {ratio}")
    looks = [first]
    while looks[-1] * ratio < max_points:
        looks.append(int(round(looks[-1] * ratio)))
    return looks + ([max_points] if looks[-1] != max_points else [])


def points_per_seed(cfg: SweepConfig) -> int:
    """The points each seed's attacks cover: eval.attack_size, or with `all` the smallest pool of
    the sweep's datasets."""
    size = cfg.eval.attack_size
    return size if isinstance(size, int) else min(map(cfg.eval.pool_size, cfg.datasets))


def planned_looks(cfg: SweepConfig) -> list[int]:
    """Points per seed at each look of a sequential launch (eval.until_decided): attack_size, then
    `ratio` times more, up to max_points, each rounded up to whole shards, none past the smallest
    pool of the sweep's datasets (decide.py runs them, --plan prices them)."""
    plan = cfg.eval.until_decided
    if plan is None or plan.max_points is None:
        raise ConfigError("eval.until_decided.max_points: not set; a launch over points needs it")
    shard = cfg.eval.shard_size
    pool = min(cfg.eval.pool_size(d) for d in cfg.datasets)
    top = min(plan.max_points, pool) // shard * shard
    out: list[int] = []
    for n in geometric_looks(min(int(cfg.eval.attack_size), top), top, plan.ratio):
        n = min(-(-n // shard) * shard, top)
        if not out or n > out[-1]:
            out.append(n)
    return out


@dataclass(frozen=True)
class Decision:
    """One comparison's decision after the looks so far."""

    decision: str  # MORE, LESS, EQUAL, CONTINUE or UNDECIDED
    look: int | None  # the look (0-based) whose interval decided it; None while continuing
    points: int  # points per seed at that look (or the last one)
    diff: float  # the estimate there
    low: float  # its repeated confidence interval there
    high: float
    level: float  # the two-sided level of that interval (Holm's share of alpha)


def _fractions(looks: Sequence[int], max_points: int) -> tuple[float, ...]:
    if not looks or any(b <= a for a, b in zip(looks, looks[1:])) or looks[0] < 1 or looks[-1] > max_points:
        raise ValueError(f"looks must be increasing points per seed in [1, {max_points}]; got {list(looks)}")
    return tuple(n / max_points for n in looks)


def _family(m: int, family_size: int | None, alpha: float, margin: float) -> int:
    """Holm's family size M >= the m comparisons judged (default m), after checking the levels."""
    if not 0 < alpha < 1 or not 0 <= margin < 1:
        raise ValueError(f"need 0 < alpha < 1 and 0 <= margin < 1; got alpha {alpha}, margin {margin}")
    big_m = m if family_size is None else family_size
    if big_m < m:
        raise ValueError(f"family_size {family_size} is smaller than the {m} comparisons judged")
    return big_m


def decide(
    comparisons: Sequence[Seeds],
    looks: Sequence[int],
    max_points: int,
    margin: float,
    alpha: float = ALPHA,
    family_size: int | None = None,
) -> list[Decision]:
    """The decision on each comparison after the looks so far (see the module docstring).

    `comparisons`: per comparison, per seed, the paired outcomes (A, B) of its points in
    permutation order, at least looks[-1] of them; look k uses the first looks[k] points of
    every seed. `looks`: points per seed at each look so far, increasing; the information
    fraction of a look is its points / `max_points`, and the look at `max_points` is the last.
    `family_size`: the comparisons of Holm's family (verdicts.holm_family, the report's own), of
    which `comparisons` are those judged here (default: just these); the others (a side lacking
    points) count as never rejected, so the levels are those the report's Holm uses.
    A pure function: call it after every wave with everything so far; decisions taken at an
    earlier look stay as they were.
    """
    fractions = _fractions(looks, max_points)
    m = len(comparisons)
    big_m = _family(m, family_size, alpha, margin)
    est = np.empty((m, len(looks), 2))
    score = np.empty((m, len(looks), 2))  # the equivalence score tests' Z at +margin and -margin
    for i, seeds in enumerate(comparisons):
        for k, n in enumerate(looks):
            if any(len(a) < n or len(b) < n for a, b in seeds):
                raise ValueError(f"comparison {i}: a seed has fewer than {n} points for look {k}")
            prefix = [(a[:n], b[:n]) for a, b in seeds]
            est[i, k] = stratified_difference(prefix)
            score[i, k] = equivalence_z(prefix, margin) if margin > 0 else (math.inf, -math.inf)
    diff, se = est[..., 0], est[..., 1]
    z = diff / se  # se > 0: stratified_difference floors every seed's variance
    taken: dict[int, Decision] = {}
    for k in range(len(looks)):
        bounds = [np.asarray(boundaries(fractions[: k + 1], alpha / (big_m - j) / 2)) for j in range(m)]
        # Holm over repeated p-values: reject every open comparison whose |Z| has reached the
        # boundary at the current Holm level at some look so far; repeat as the level rises.
        n_rejected = sum(d.decision in (MORE, LESS) for d in taken.values())
        while n_rejected < m:
            c = bounds[n_rejected]
            level = alpha / (big_m - n_rejected)
            crossed = {i: np.flatnonzero(np.abs(z[i, : k + 1]) >= c) for i in range(m) if i not in taken}
            crossed = {i: looks_hit[0] for i, looks_hit in crossed.items() if len(looks_hit)}
            if not crossed:
                break
            for i, first in crossed.items():
                taken[i] = _at(
                    MORE if z[i, first] > 0 else LESS, first, looks, diff[i], se[i], c[first], level
                )
            n_rejected += len(crossed)
        # What is still open is judged equal at the level Holm gives it now: its interval inside
        # the band, and both score tests at the margin past the same boundary (stats.verdict's rule).
        j = min(n_rejected, m - 1)
        for i in range(m):
            if i not in taken:
                c = bounds[j][k]
                d = _at(EQUAL, k, looks, diff[i], se[i], c, alpha / (big_m - j))
                if -margin <= d.low and d.high <= margin and score[i, k, 0] <= -c and score[i, k, 1] >= c:
                    taken[i] = d
    last = len(looks) - 1
    n_rejected = min(sum(d.decision in (MORE, LESS) for d in taken.values()), m - 1)
    level = alpha / (big_m - n_rejected)
    c_last = boundaries(fractions, level / 2)[last]
    state = UNDECIDED if looks[-1] == max_points else CONTINUE
    return [
        taken.get(i)
        or _at(state, last, looks, diff[i], se[i], c_last, level, look=None if state == CONTINUE else last)
        for i in range(m)
    ]


def _at(
    decision: str,
    k: int,
    looks: Sequence[int],
    diff: np.ndarray,
    se: np.ndarray,
    c: float,
    level: float,
    look: int | None | bool = True,
) -> Decision:
    """The decision with look k's repeated confidence interval (boundary c)."""
    return Decision(
        decision,
        int(k) if look is True else look,
        int(looks[k]),
        float(diff[k]),
        float(diff[k] - c * se[k]),
        float(diff[k] + c * se[k]),
        level,
    )


def planned_seed_looks(cfg: SweepConfig) -> list[int]:
    """Seeds at each look of a sequential launch over seeds (eval.until_decided.max_seeds): the
    sweep's seeds, then `ratio` times more, up to max_seeds (decide.py adds seeds numbered on
    from the largest given)."""
    plan = cfg.eval.until_decided
    if plan is None or plan.max_seeds is None:
        raise ConfigError("eval.until_decided.max_seeds: not set; a launch over seeds needs it")
    return geometric_looks(len(cfg.seeds), plan.max_seeds, plan.ratio)


def look_levels(looks: Sequence[int], maximum: int, alpha: float = ALPHA) -> list[float]:
    """Two-sided level spent at each look: the increments of Lan-DeMets O'Brien-Fleming-type
    spending (spent, alpha/2 per side) at the looks' information fractions. They add up to at
    most alpha, so intervals at these levels cover at every look at once with probability
    >= 1 - alpha (Bonferroni over the looks: no joint normality needed, which a t statistic on
    a handful of seeds lacks)."""
    fractions = _fractions(looks, maximum)
    spend = [2 * spent(t, alpha / 2) for t in fractions]
    return [b - a for a, b in zip([0.0, *spend], spend)]


def decide_seeds(
    comparisons: Sequence[Seeds],
    looks: Sequence[int],
    max_seeds: int,
    margin: float,
    alpha: float = ALPHA,
    family_size: int | None = None,
) -> list[Decision]:
    """The decision on each comparison for "the training procedure" (stats.PROCEDURE: seeds are
    the unit) after looks that add seeds, the points per seed fixed.

    `comparisons`: per comparison, per seed in the order the seeds were added, the paired
    outcomes (A, B); look k uses the first looks[k] seeds. At look k the answer is
    stats.seed_level's t interval at level a_k (look_levels: the spending increments), so the
    intervals cover at all looks at once. Across comparisons, Holm on the repeated p-values
    min_k p_k alpha / a_k (each a valid p-value for the whole sequence, by the same Bonferroni
    bound), in a family of `family_size` (default: these). A rejected comparison is decided at
    the first look its interval at its Holm share excluded 0; one still open is "equal" at the
    first look its interval at the open comparisons' Holm share lies within +-margin; else
    continue, or undecided at max_seeds. `points` in a Decision is the seeds of that look.
    Looks run look by look, so a decision taken at a look stays as it was at the later ones.
    A look with fewer than 2 seeds decides nothing, but its share of alpha is spent all the
    same (conservative: start with 3 or more seeds)."""
    levels = look_levels(looks, max_seeds, alpha)
    m = len(comparisons)
    big_m = _family(m, family_size, alpha, margin)
    parts: list[list[tuple[float, float, int] | None]] = []
    for i, seeds in enumerate(comparisons):
        if len(seeds) < looks[-1]:
            raise ValueError(
                f"comparison {i}: {len(seeds)} seeds, fewer than the {looks[-1]} of the last look"
            )
        parts.append([seed_level(list(seeds)[:n]) if n >= 2 else None for n in looks])

    def interval(i: int, k: int, share: float) -> Decision | None:
        """Comparison i's interval at look k, at `share` of that look's level."""
        got = parts[i][k]
        if got is None:
            return None
        diff, se, s = got
        level = levels[k] * share
        low, high, _ = procedure_interval(diff, se, s, level)
        return Decision(CONTINUE, k, looks[k], diff, low, high, level)

    def p_seq(i: int, upto: int) -> float:
        """Comparison i's repeated p-value over looks 0..upto."""
        ps = [
            procedure_interval(*got)[2] * alpha / levels[k]
            for k, got in enumerate(parts[i][: upto + 1])
            if got is not None and levels[k] > 0
        ]
        return min([1.0, *ps])

    # Look by look, as decide does: what a look decided stays decided at the later ones.
    taken: dict[int, Decision] = {}
    share = 1 / big_m if m else 1.0
    for k in range(len(looks)):
        # Holm's step-down over the repeated p-values of the looks so far: the j-th smallest
        # (counting those rejected earlier) against alpha / (M - j).
        rejected = sum(d.decision in (MORE, LESS) for d in taken.values())
        for i in sorted((i for i in range(m) if i not in taken), key=lambda i: p_seq(i, k)):
            share = 1 / (big_m - rejected)
            if p_seq(i, k) > alpha * share:
                break
            hit = next(
                (d for d in (interval(i, j, share) for j in range(k + 1)) if d and (d.low > 0 or d.high < 0)),
                None,
            )
            if hit is None:  # rounding at the boundary: no interval excludes 0 after all
                break
            taken[i] = replace(hit, decision=MORE if hit.low > 0 else LESS)
            rejected += 1
        # Still open: equal at this look if its interval at the open ones' Holm share lies in the band.
        share = 1 / (big_m - min(rejected, m - 1)) if m else 1.0
        for i in range(m):
            d = None if i in taken else interval(i, k, share)
            if d is not None and -margin <= d.low and d.high <= margin:
                taken[i] = replace(d, decision=EQUAL)
    last = len(looks) - 1
    state = UNDECIDED if looks[-1] == max_seeds else CONTINUE
    out = []
    for i in range(m):
        if i in taken:
            out.append(taken[i])
            continue
        d = interval(i, last, share)
        if d is None:
            out.append(Decision(state, None, looks[last], math.nan, -1.0, 1.0, 0.0))
        else:
            out.append(replace(d, decision=state, look=None if state == CONTINUE else last))
    return out


@dataclass(frozen=True)
class Price:
    """What a decision on one comparison costs, in the unit its looks grow: points per seed
    (`price`) or seeds (`price_seeds`)."""

    maximum: int
    expected: float  # at a true difference equal to the margin
    expected_at_zero: float  # at no difference
    power: float  # P(more robust) at a true difference equal to the margin
    fixed_power: float  # the same, for one look at the maximum (a fixed-sample design)
    level: float  # the two-sided level priced (alpha / comparisons: Holm's first step)


def _stopped(
    looks: Sequence[int], low: np.ndarray, high: np.ndarray, margin: float
) -> tuple[np.ndarray, np.ndarray]:
    """Per simulated run (a row of each look's interval): the look's size where the interval rule
    first stops (excludes 0 or lies within +-margin; the last look always), and whether it
    stopped on "more robust"."""
    stop = (low > 0) | (high < 0) | ((low >= -margin) & (high <= margin))
    stop[:, -1] = True
    first = stop.argmax(axis=1)
    return np.asarray(looks)[first], low[np.arange(len(low)), first] > 0


def price(
    margin: float,
    sd: float,
    n_seeds: int,
    looks: Sequence[int],
    n_comparisons: int = 1,
    alpha: float = ALPHA,
    reps: int = 20_000,
    seed: int = 0,
) -> Price:
    """Points per seed to a decision on one comparison at a true difference equal to the
    margin (and at none), looks at `looks` (the last is the maximum), `n_seeds` seeds, and
    per-point differences of standard deviation `sd` (about sqrt(share of discordant points)).
    Monte Carlo over the normal approximation of the looks' estimates (`reps` runs, fixed
    seed), at Holm's first level alpha / n_comparisons, which makes it an upper bound."""
    if sd <= 0 or n_seeds < 1 or margin <= 0 or n_comparisons < 1:
        raise ValueError(
            f"need sd > 0, n_seeds >= 1, margin > 0, n_comparisons >= 1; got {sd}, {n_seeds}, {margin}, {n_comparisons}"
        )
    max_points = int(looks[-1])
    level = alpha / n_comparisons
    c = np.asarray(boundaries(_fractions(looks, max_points), level / 2))
    totals = n_seeds * np.asarray(looks, dtype=float)  # points over all seeds at each look
    se = sd / np.sqrt(totals)
    rng = np.random.default_rng(seed)
    noise = (
        np.cumsum(rng.normal(0, sd * np.sqrt(np.diff(totals, prepend=0.0)), (reps, len(looks))), axis=1)
        / totals
    )

    def run(true: float) -> tuple[np.ndarray, np.ndarray]:
        diff = true + noise
        return _stopped(looks, diff - c * se, diff + c * se, margin)

    points, more = run(margin)
    points_zero, _ = run(0.0)
    fixed_se = sd / math.sqrt(n_seeds * max_points)
    fixed = float(stats.norm.sf(stats.norm.isf(level / 2) - margin / fixed_se))
    return Price(
        max_points, float(points.mean()), float(points_zero.mean()), float(more.mean()), fixed, level
    )


def price_seeds(
    margin: float,
    point_sd: float,
    seed_sd: float,
    points: int,
    looks: Sequence[int],
    n_comparisons: int = 1,
    alpha: float = ALPHA,
    reps: int = 20_000,
    seed: int = 0,
) -> Price:
    """Seeds to a decision on one comparison for the training procedure (decide_seeds' rule), at
    a true difference equal to the margin (and at none), looks at `looks` seeds (the last is the
    maximum), `points` per seed. Each seed's difference is normal around the true one with the
    variance of a random seed effect (`seed_sd`) plus its points' (`point_sd`^2 / points); at look
    k the t interval over its seeds at look_levels' share k. Monte Carlo (`reps` runs, fixed
    seed) at Holm's first level alpha / n_comparisons: an upper bound, as `price`."""
    if point_sd <= 0 or seed_sd < 0 or points < 1 or margin <= 0 or n_comparisons < 1 or looks[-1] < 2:
        raise ValueError(
            "need point_sd > 0, seed_sd >= 0, points >= 1, margin > 0, n_comparisons >= 1 and a last look"
            f" of >= 2 seeds; got {point_sd}, {seed_sd}, {points}, {margin}, {n_comparisons}, {list(looks)}"
        )
    n = np.asarray(looks)
    level = alpha / n_comparisons
    t = stats.t.isf(np.asarray(look_levels(looks, int(n[-1]), level)) / 2, np.maximum(n - 1, 1))
    sigma = math.sqrt(seed_sd**2 + point_sd**2 / points)
    noise = np.random.default_rng(seed).normal(0, sigma, (reps, int(n[-1])))
    mean = np.cumsum(noise, axis=1)[:, n - 1] / n  # the noise's mean over each look's seeds
    spread = np.sqrt(
        np.maximum(np.cumsum(noise**2, axis=1)[:, n - 1] - n * mean**2, 0) / np.maximum(n - 1, 1)
    )
    half = t * spread / np.sqrt(n)
    half[:, n < 2] = np.inf  # a look of one seed has no interval (decide_seeds decides nothing there)

    def run(true: float) -> tuple[np.ndarray, np.ndarray]:
        return _stopped(looks, true + mean - half, true + mean + half, margin)

    from statsmodels.stats.power import TTestPower  # statsmodels' import takes a second: only here

    used, more = run(margin)
    used_zero, _ = run(0.0)
    # one look at the maximum: the noncentral t's chance of "more robust" (statsmodels' power,
    # two-sided, of which the far side is negligible at any useful power)
    fixed = float(TTestPower().power(margin / sigma, int(n[-1]), level, alternative="two-sided"))
    return Price(int(n[-1]), float(used.mean()), float(used_zero.mean()), float(more.mean()), fixed, level)
