"""Paired statistics: hand-computed values, the library identities the module docstring
claims, and a simulation with correlated seeds (the two questions, "these trained models" and
"the training procedure", against the pooled McNemar test the summary used before)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats as sps
from statsmodels.stats.contingency_tables import StratifiedTable
from statsmodels.stats.meta_analysis import combine_effects

from qshield_dist.summary.stats import (
    MODELS,
    PROCEDURE,
    compare,
    equivalence_z,
    holm,
    mcnemar_exact,
    points_needed,
    score_equivalent,
    seeds_needed,
    stratified_difference,
    tango_z,
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
    assert res.models.diff == pytest.approx(1 / 6) and res.models.estimand == MODELS
    assert res.models.p_value == pytest.approx(mcnemar_exact(2, 1))
    assert res.procedure is None and res.answer(PROCEDURE) is None  # one seed: no procedure answer
    two = compare([(a, b), ([1] * 6, [0] * 6)])
    assert two.per_seed == pytest.approx((1 / 6, 1.0)) and two.models.diff == pytest.approx((1 / 6 + 1) / 2)
    assert (two.a_only, two.b_only) == (8, 1)
    assert two.procedure is not None and two.procedure.diff == pytest.approx((1 / 6 + 1) / 2)


def test_models_interval_by_hand() -> None:
    # 30 A only, 20 B only, 50 concordant: d has mean 0.1 and variance (0.5 - 0.01) * 100 / 99
    a = np.array([1] * 30 + [0] * 20 + [1] * 25 + [0] * 25)
    b = np.array([0] * 30 + [1] * 20 + [1] * 25 + [0] * 25)
    res = compare([(a, b)])
    se = math.sqrt((0.5 - 0.01) * 100 / 99 / 100)
    assert res.models.low == pytest.approx(0.1 - 1.959964 * se, abs=1e-6)
    assert res.models.high == pytest.approx(0.1 + 1.959964 * se, abs=1e-6)
    # two seeds of 100 and 300 points: weights 1/4 and 3/4, variances added with them squared
    # the second seed has no discordant pair: its variance is the floor, (exact bound / z)^2
    other = (np.r_[a, a, a], np.r_[a, a, a])
    floor = sps.binomtest(0, 300).proportion_ci().high / 1.959964
    diff, se2 = stratified_difference([(a, b), other])
    assert diff == pytest.approx(0.1 / 4)
    assert se2 == pytest.approx(math.sqrt((se / 4) ** 2 + (3 * floor / 4) ** 2), rel=1e-6)


def test_no_discordant_pair_keeps_the_exact_width_the_points_allow() -> None:
    """Agreeing points are no certainty: with no discordant pair the interval's half-width is the
    exact (Clopper-Pearson) bound on the discordance rate (scipy's binomtest, 95% two-sided, i.e.
    one-sided 2.5 %), combined over seeds; ten agreeing points never make "equal" at 2 pp,
    2,000 do. Before the floor, every case below was [0, 0] and "equal"."""
    for n, seeds, expected in (
        (10, 1, "undecided"),
        (10, 3, "undecided"),
        (2000, 1, "equal"),
        (2000, 3, "equal"),
    ):
        a = np.arange(n) % 2
        res = compare([(a, a)] * seeds)
        bound = sps.binomtest(0, n).proportion_ci(0.95, "exact").high
        assert res.models.high == pytest.approx(bound / math.sqrt(seeds), rel=1e-9)
        assert res.models.low == pytest.approx(-res.models.high)
        # never narrower than the exact bound on all the seeds' points pooled
        assert res.models.high >= sps.binomtest(0, n * seeds).proportion_ci(0.95, "exact").high - 1e-12
        eq = score_equivalent([(a, a)] * seeds, 0.02)
        assert (
            verdict(res.models.low, res.models.high, res.models.p_value, margin=0.02, equivalent=eq)
            == expected
        )
        if seeds > 1:
            p = res.procedure
            assert p.low < 0 < p.high and p.p_value == 1.0
            assert verdict(p.low, p.high, p.p_value, margin=0.02, equivalent=True) == expected
    # one discordant pair in ten: the Wald half-width (0.196) is below what ten agreeing points
    # allow (0.308), so the floor holds it there; with 50 of 100 discordant it does not act
    a, b = np.r_[1, np.zeros(9)], np.zeros(10)
    assert compare([(a, b)]).models.high == pytest.approx(0.1 + sps.binomtest(0, 10).proportion_ci().high)
    a = np.array([1] * 30 + [0] * 20 + [1] * 25 + [0] * 25)
    b = np.array([0] * 30 + [1] * 20 + [1] * 25 + [0] * 25)
    assert compare([(a, b)]).models.high == pytest.approx(0.1 + 1.959964 * math.sqrt(0.49 / 99), abs=1e-6)


def test_interval_when_every_pair_is_discordant_one_way() -> None:
    # d is 1 on every point (Wald variance 0): the interval is floored like the agreeing case and
    # clipped at the largest possible difference, 1
    floor = sps.binomtest(0, 50).proportion_ci().high
    one = compare([([1] * 50, [0] * 50)]).models
    assert (one.low, one.high) == (pytest.approx(1 - floor), 1.0)
    assert compare([([0] * 50, [1] * 50)]).models.low == -1.0
    both = compare([([1] * 50, [0] * 50), ([1] * 30, [0] * 30)])
    assert both.models.high == 1.0 and 1 - floor < both.models.low < 1
    assert both.procedure.high == 1.0 and both.procedure.low < 1
    assert verdict(one.low, one.high, one.p_value, margin=0.02, equivalent=False) == "more robust"


def test_stratified_mcnemar_is_the_cmh_test_over_pairs() -> None:
    """The module docstring's claim: CMH with each pair a stratum ([model x outcome]) is McNemar
    on the discordant pairs summed over seeds; CMH on per-seed [A x B] tables is another test."""
    rng = np.random.default_rng(3)
    seeds = [(rng.integers(0, 2, 40), rng.integers(0, 2, 40)) for _ in range(3)]
    per_pair = [np.array([[x, 1 - x], [y, 1 - y]]) for a, b in seeds for x, y in zip(a, b)]
    cmh = StratifiedTable(per_pair).test_null_odds(correction=False).statistic
    res = compare(seeds)
    assert cmh == pytest.approx((res.a_only - res.b_only) ** 2 / (res.a_only + res.b_only), rel=1e-9)
    crossed = [
        np.array([[np.sum(a & b), np.sum(a & ~b)], [np.sum(~a & b), np.sum(~a & ~b)]])
        for a, b in ((a.astype(bool), b.astype(bool)) for a, b in seeds)
    ]
    assert StratifiedTable(crossed).test_null_odds(correction=False).statistic != pytest.approx(cmh)


@pytest.mark.filterwarnings("ignore::statsmodels.tools.sm_exceptions.InvalidTestWarning")  # per-seed CIs
def test_procedure_interval_is_hksj_random_effects() -> None:
    """With equal within-seed variances the procedure interval is statsmodels' random-effects
    interval with the Hartung-Knapp scale ("random effect wls", t on seeds - 1 df)."""
    up = (
        np.array([1] * 20 + [0] * 10 + [1] * 30 + [0] * 40),
        np.array([0] * 20 + [1] * 10 + [1] * 30 + [0] * 40),
    )
    down = (up[1], up[0])
    seeds = [up, down, up]
    res = compare(seeds).procedure
    n = 100
    var = [np.var(a - b, ddof=1) / n for a, b in seeds]
    frame = combine_effects(np.array([0.1, -0.1, 0.1]), np.array(var), use_t=True).summary_frame()
    assert (res.low, res.high) == pytest.approx(tuple(frame.loc["random effect wls", ["ci_low", "ci_upp"]]))
    assert res.p_value == pytest.approx(sps.ttest_1samp([0.1, -0.1, 0.1], 0).pvalue)


def test_procedure_interval_when_seeds_agree_exactly() -> None:
    # three seeds with the same difference by chance: the spread over seeds is 0, the points' is not
    a = np.array([1] * 20 + [0] * 10 + [0] * 70)
    b = np.array([0] * 20 + [1] * 10 + [0] * 70)
    res = compare([(a, b)] * 3)
    se = math.sqrt(np.var(a - b, ddof=1) / 100 * 3 / 9)
    assert res.procedure.high - res.procedure.diff == pytest.approx(sps.t.isf(0.025, 2) * se)


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
        (math.nan, math.nan, 1.0, "undecided"),  # no interval (the procedure with one seed)
    ],
)
def test_verdict_categories_with_margin(low: float, high: float, p: float, expected: str) -> None:
    assert verdict(low, high, p, margin=0.02, equivalent=True) == expected
    # the score tests at the margin can only take "equal" away
    expected_without = "undecided" if expected == "equal" else expected
    assert verdict(low, high, p, margin=0.02, equivalent=False) == expected_without


def test_points_needed_is_per_seed_at_the_margin() -> None:
    rng = np.random.default_rng(0)
    a = rng.integers(0, 2, 400)
    b = np.where(rng.random(400) < 0.8, a, 1 - a)  # about 20% discordant, no difference
    one = points_needed([(a, b)], margin=0.02)
    sd = np.std(a - b, ddof=1)
    assert one == pytest.approx((sps.norm.isf(0.025) + sps.norm.isf(0.2)) ** 2 * sd**2 / 0.02**2, rel=0.01)
    # the same spread over 4 seeds: a quarter of the points per seed, and a wider margin needs fewer
    assert points_needed([(a, b)] * 4, margin=0.02) == pytest.approx(one / 4, abs=1)
    assert points_needed([(a, b)], margin=0.04) < one / 3
    # nothing differs so far: not "decided as it is", but the points a true difference at the
    # margin needs at its least spread, sd sqrt(0.02 * 0.98) (at least 2 % of points discordant)
    at_margin = (sps.norm.isf(0.025) + sps.norm.isf(0.2)) ** 2 * 0.98 / 0.02
    assert points_needed([(a, a)], margin=0.02) == pytest.approx(at_margin, rel=0.01)
    assert points_needed([(a, a)] * 3, margin=0.02) == pytest.approx(at_margin / 3, rel=0.02)


def test_seeds_needed_from_the_spread_over_seeds() -> None:
    a = np.array([1] * 60 + [0] * 40)
    seed = lambda k: (a, np.r_[np.zeros(k), a[k:]])  # noqa: E731  difference k / 100
    assert math.isnan(seeds_needed([seed(5)], margin=0.02))
    spread = seeds_needed([seed(0), seed(10), seed(20)], margin=0.02)
    tight = seeds_needed([seed(9), seed(10), seed(11)], margin=0.02)
    assert spread > tight >= 2


# ---------------------------------------------------------------- correlated seeds
def _correlated_seeds(reps: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Outcomes (reps, seeds, points) of A and B with no difference in the training procedure:
    each seed trains both models anew (a shared-per-seed random effect on each model's logit
    robustness, sd 0.15), the seeds' 256 points overlap in a pool of 360 (as on digits), and a
    point's difficulty (sd 1.5 on the logit) is the same for both models and all seeds."""
    seeds, pool, n = 3, 360, 256
    difficulty = rng.normal(0, 1.5, (reps, 1, pool))
    chosen = np.argsort(rng.random((reps, seeds, pool)), axis=2)[..., :n]
    h = np.take_along_axis(np.broadcast_to(difficulty, (reps, seeds, pool)), chosen, axis=2)
    out = []
    for _ in range(2):
        logit = -0.8 + h + rng.normal(0, 0.15, (reps, seeds, 1))
        out.append((rng.random(h.shape) < 1 / (1 + np.exp(-logit))).astype(np.int8))
    return out[0], out[1]


def test_seed_level_rule_holds_its_error_where_pooled_mcnemar_does_not() -> None:
    """At no difference in the procedure, 4000 simulated 3-seed comparisons (fixed seed).
    Measured: the procedure verdict says "more robust" in 2.65 % and "less robust" in 2.35 %
    (Monte-Carlo SE 0.25 pp at 2.5 %: both within it of the t test's exact 2.5 %); the pooled
    McNemar test (discordant pairs summed over seeds, p < 0.05) in 7.6 % and 7.7 %; the models
    verdict, which answers another question (these models, not the procedure), as often."""
    reps = 4000
    a, b = _correlated_seeds(reps, np.random.default_rng(26))
    procedure = {"more robust": 0, "less robust": 0}
    models = dict(procedure)
    pooled = dict(procedure)
    for r in range(reps):
        res = compare(list(zip(a[r], b[r])))
        p = res.procedure
        v = verdict(p.low, p.high, p.p_value, margin=0.02, equivalent=True)
        if v in procedure:
            procedure[v] += 1
        v = verdict(res.models.low, res.models.high, res.models.p_value, margin=0.02, equivalent=False)
        if v in models:
            models[v] += 1
        if mcnemar_exact(res.a_only, res.b_only) < 0.05:
            pooled["more robust" if res.a_only > res.b_only else "less robust"] += 1
    rate = {k: v / reps for k, v in procedure.items()}
    mc_se = math.sqrt(0.025 * 0.975 / reps)  # 0.25 pp
    assert all(x <= 0.025 + 2 * mc_se for x in rate.values()), rate
    assert all(v / reps > 0.05 for v in pooled.values()), pooled  # well above 2.5 %: not a close call
    assert all(v / reps > 0.05 for v in models.values()), models


def test_tango_score_matches_published_values() -> None:
    """Tango's score interval, the roots of tango_z = +-1.96, on Cavo et al. (2012) as Fagerland,
    Lydersen & Laake (2017, ch. 8) give it: 6 and 16 discordant pairs in 161, estimate -0.0621,
    95% CI -0.1240 to -0.0054."""
    from scipy.optimize import brentq

    low = brentq(lambda d: tango_z(6, 16, 161, d) - 1.959964, -0.99, -0.0621)
    high = brentq(lambda d: tango_z(6, 16, 161, d) + 1.959964, -0.0621, 0.99)
    assert (round(low, 4), round(high, 4)) == (-0.1240, -0.0054)
    # one seed: equivalence_z is Tango's statistic at the two boundaries
    a = np.r_[np.ones(6), np.zeros(16), np.ones(59), np.zeros(80)]
    b = np.r_[np.zeros(6), np.ones(16), np.ones(59), np.zeros(80)]
    assert equivalence_z([(a, b)], 0.05) == pytest.approx(
        (tango_z(6, 16, 161, 0.05), tango_z(6, 16, 161, -0.05))
    )


def _false_equal(n: int, discordant: float, margin: float = 0.02) -> float:
    """The exact probability that one seed of n points gets the verdict "equal" when the true
    difference is +margin with `discordant` of the points discordant: the trinomial's mass on
    the (A only, B only) counts that the real compare + score_equivalent + verdict call equal."""
    p_a, p_b = (discordant + margin) / 2, (discordant - margin) / 2
    total = 0.0
    for a_only in range(int(n * p_a + 8 * math.sqrt(n * p_a)) + 1):
        b_only = np.arange(int(n * p_b + 8 * math.sqrt(n * p_b + 1)) + 1)
        mass = sps.multinomial.pmf(
            np.c_[np.full_like(b_only, a_only), b_only, n - a_only - b_only], n, [p_a, p_b, 1 - p_a - p_b]
        )
        for c, w in zip(b_only, mass):
            if w < 1e-9:
                continue
            a = np.r_[np.ones(a_only), np.zeros(c + n - a_only - c)]
            b = np.r_[np.zeros(a_only), np.ones(c), np.zeros(n - a_only - c)]
            res = compare([(a, b)]).models
            eq = score_equivalent([(a, b)], margin)
            # Holm-adjusted p of 1 (a large family): the worst case, where nothing is "more robust"
            total += w * (verdict(res.low, res.high, 1.0, margin, equivalent=eq) == "equal")
    return total


@pytest.mark.parametrize("n", [256, 1000])
def test_a_true_difference_at_the_margin_is_called_equal_at_most_alpha_over_2(n: int) -> None:
    """Exact rates, one seed, margin 2 pp, a true difference of +2 pp with 2, 3 or 5 % of points
    discordant (the fewer, the rougher a Wald interval). The Wald interval alone called it
    "equal" 3.5 %, 3.6 %, 0.4 % of the time at 256 points and 3.8 %, 3.9 %, 2.9 % at 1,000; with
    the score tests (stats.score_equivalent) 0.6 %, 0.4 %, 0.0 % and 2.0 %, 2.2 %, 2.3 %, all at or
    under the nominal 2.5 % (a Holm-adjusted p of 1: nothing is "more robust" first)."""
    for discordant in (0.02, 0.03, 0.05):
        assert _false_equal(n, discordant) <= 0.025, (n, discordant)


def test_the_score_tests_take_equal_from_a_wald_interval_on_few_discordant_points() -> None:
    """1,000 points, 14 robust under A only and 2 under B only: the Wald interval [+0.4, +2.0] pp
    lies inside +-2 pp, but Tango's test of a true +2 pp gives Z = -1.68, not past -1.96. (Its
    McNemar p is 0.004; at a Holm-adjusted 0.2, in a large family, it is not "more robust".)"""
    a = np.r_[np.ones(14), np.zeros(986)]
    b = np.r_[np.zeros(14), np.ones(2), np.zeros(984)]
    res = compare([(a, b)]).models
    assert -0.02 <= res.low and res.high <= 0.02
    above, below = equivalence_z([(a, b)], 0.02)
    assert above == pytest.approx(-1.685, abs=0.005) and below > 1.96
    assert not score_equivalent([(a, b)], 0.02)
    assert verdict(res.low, res.high, 0.2, 0.02, equivalent=True) == "equal"  # the Wald rule alone
    assert verdict(res.low, res.high, 0.2, 0.02, equivalent=False) == "undecided"


def test_a_margin_of_zero_leaves_no_room_for_equal() -> None:
    """--margin 0: identical models (Tango's variance 0 at a difference of 0) are never "equal",
    and nothing divides by zero."""
    a = np.arange(50) % 2
    assert equivalence_z([(a, a)], 0.0) == (math.inf, -math.inf)
    assert not score_equivalent([(a, a)], 0.0)
