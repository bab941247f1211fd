"""Verdicts from per-point outcomes, with numbers computed by hand: the worst case over L-inf
attacks per point (a stochastic model's majority rule, threat models kept apart), the paired
comparison and its verdict, the provisional label and the controls' gain source."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import polars as pl
import pytest
import torch
from scipy import stats as sps

from qshield_dist.attack_params import ATTACKS
from qshield_dist.attacks import CallCounter, build_attack
from qshield_dist.attacks.autoattack import sanity_checks
from qshield_dist.attacks.streams import PointStreams
from qshield_dist.data import load
from qshield_dist.results.current import STAGE_VERSIONS
from qshield_dist.results.store import ResultStore, TrialKey
from qshield_dist.summary.report import Options, Summary, summarize
from qshield_dist.summary.sections_verdicts import VERDICT_TABLE
from qshield_dist.summary.stats import MODELS, PROCEDURE, holm, mcnemar_exact
from qshield_dist.summary.verdicts import gain_source, gain_sources

EPS = 32 / 255
HYBRID = {
    "backbone": "cnn_small",
    "entanglement": "full",
    "depth": 1,
    "encoding": "enhanced_angle",
    "noise_model": "mixed",
    "noise_strength": 0.005,
    "fusion": "dynamic",
    "quantum_grad": "full",
    "projection": "paper",
    "init": "from_baseline",
    "simulator": "compiled",
    "device": "default.mixed",
    "trajectories": 0,
    "qubits": 4,
}
PAPER = {"fgsm": {"eps": EPS}, "pgd": {"alpha": 2 / 255, "eps": EPS, "random_start": True, "steps": 10}}
APGD_STANDARD = {
    "best_loss": True,
    "eot_iter": 10,
    "eps": EPS,
    "loss": "ce",
    "n_restarts": 1,
    "rho": 0.75,
    "seed": 0,
    "steps": 50,
}


def _row(
    model: str,
    attack: str,
    correct: list[int],
    broken: set[int],
    *,
    threat: str = "linf",
    preset: str = "paper",
    params: dict[str, Any] | None = None,
    stochastic: bool = False,
    evals: list[list[bool]] | None = None,
    control: str | None = None,
    seed: int = 0,
    **cols: Any,
) -> dict[str, Any]:
    n = len(correct)
    hit = [bool(correct[i]) and i in broken for i in range(n)]
    n_att, n_succ = sum(correct), sum(hit)
    return {
        "sweep": "v",
        "stage": "attack",
        "status": "ok",
        "trial_id": f"A{model}{control or ''}{attack}{preset}{seed}",
        "train_id": f"T{model}{seed}",
        "dataset": "digits",
        "model": model,
        "control": control,
        "variant": model,
        "seed": seed,
        "attack": attack,
        "attack_preset": preset,
        "attack_params": json.dumps(params or PAPER.get(attack, {}), sort_keys=True),
        "threat_model": threat,
        "eps": EPS if threat == "linf" else None,
        "eval_repeats": 5 if stochastic else 1,
        "stochastic": stochastic,
        "clean_acc": 0.9,
        "n_points": n,
        "n_attacked": n_att,
        "n_success": n_succ,
        "asr": n_succ / n_att,
        "asr_worst": n_succ / n_att,
        "robust_acc": (n_att - n_succ) / n,
        "attack_seconds": 1.0,
        "forward_calls": 1,
        "backward_calls": 1,
        "forward_samples": n,
        "backward_samples": n,
        "budget_ok": True,
        "point_index": list(range(100, 100 + n)),
        "point_correct": [bool(c) for c in correct],
        "point_broken": hit,
        "point_eval_wrong": evals,
        "results_version": STAGE_VERSIONS["attack"],
        "train_version": STAGE_VERSIONS["train"],
        **cols,
    }


def _summarize(tmp_path: Path, rows: list[dict[str, Any]], estimand: str = MODELS) -> Summary:
    root = tmp_path / "results"
    for row in rows:
        ResultStore(root).write(TrialKey("attack", "digits", row["trial_id"]), [row])
    ResultStore(root).write_manifest(
        {"sweep": "v"}, {r["trial_id"]: {"stage": "attack", "dataset": "digits"} for r in rows}
    )
    options = Options(plots=False, formats=("md", "csv"), proxies={}, estimand=estimand)
    return summarize(root, tmp_path / "report", options)


# 10 points. The CNN gets point 9 wrong clean; FGSM breaks 0, 1, 2 and PGD breaks 1, 3: robust {4..8}.
# C&W (L2) breaks every point it attacks: it must not enter the L-inf worst case.
CNN_CORRECT = [1] * 9 + [0]
# The stochastic hybrid gets every point right; FGSM breaks 0 and PGD breaks 4 (strict majorities of 5
# evaluations). Point 5 is wrong in 2 of 5 evaluations under FGSM and 2 of 5 under PGD: a minority
# each time, so it is NOT broken, although 4 of its 10 draws were wrong.
HYB_CORRECT = [1] * 10


def _evals(broken: set[int], minority: set[int]) -> list[list[bool]]:
    return [
        [True] * 3 + [False] * 2
        if i in broken
        else ([True] * 2 + [False] * 3 if i in minority else [False] * 5)
        for i in range(10)
    ]


def _base_rows() -> list[dict[str, Any]]:
    return [
        _row("cnn_small", "fgsm", CNN_CORRECT, {0, 1, 2}),
        _row("cnn_small", "pgd", CNN_CORRECT, {1, 3}),
        _row("cnn_small", "cw", CNN_CORRECT, set(range(10)), threat="l2", params={"c": 0.01}),
        _row("hqcnn", "fgsm", HYB_CORRECT, {0}, stochastic=True, evals=_evals({0}, {5}), **HYBRID),
        _row("hqcnn", "pgd", HYB_CORRECT, {4}, stochastic=True, evals=_evals({4}, {5}), **HYBRID),
    ]


def test_worst_case_per_point_majority_rule_and_threat_models_apart(tmp_path: Path) -> None:
    s = _summarize(tmp_path, _base_rows())
    worst = {
        (r["label"], r["attack_label"]): r
        for r in s.tables.worst_case.join(s.tables.variants.select("vkey", "label"), on="vkey").iter_rows(
            named=True
        )
    }
    cnn = next(k for k in worst if k[0] == "cnn_small" and k[1] == "worst case")
    hyb = next(k for k in worst if k[0].startswith("hqcnn") and k[1] == "worst case")
    assert worst[cnn]["robust"] == pytest.approx(0.5)  # {4, 5, 6, 7, 8}; C&W's breaks are not counted
    assert worst[hyb]["robust"] == pytest.approx(0.8)  # all but 0 and 4: point 5 survives (minorities only)
    assert worst[(cnn[0], "fgsm")]["robust"] == pytest.approx(0.6) and worst[(cnn[0], "pgd")][
        "robust"
    ] == pytest.approx(0.7)
    assert worst[cnn]["n_points"] == 10 and worst[cnn]["n_seeds"] == 1
    assert not any(k[1] == "cw" for k in worst)  # L2 is reported beside, never in this table


def test_paired_comparison_and_verdict_by_hand(tmp_path: Path) -> None:
    s = _summarize(tmp_path, _base_rows())
    (r,) = s.tables.paired.filter(s.tables.paired["kind"] == "vs CNN").iter_rows(named=True)
    assert r["attacks"] == "fgsm, pgd" and r["n_points"] == 10 and r["n_seeds"] == 1
    assert (r["robust_a"], r["robust_b"], r["diff"]) == pytest.approx((0.8, 0.5, 0.3))
    # robust under the hybrid only: 1, 2, 3, 9; under the CNN only: 4
    assert (r["a_only"], r["b_only"]) == (4, 1)
    assert r["p_value"] == pytest.approx(mcnemar_exact(4, 1)) == pytest.approx(2 * 6 / 32)
    assert r["low"] <= 0.3 <= r["high"] and r["low"] < 0  # 10 points: the interval includes 0
    assert r["verdict"] == "undecided" and r["provisional"]  # the paper's FGSM and PGD: not full strength
    (v,) = s.tables.verdicts.iter_rows(named=True)
    assert (
        v["category"] == "undecided"
        and "provisional" in v["verdict"]
        and "to decide at the margin: ≈" in v["verdict"]
        and "points per seed at 1 seed (these trained models)" in v["verdict"]
    )
    assert "more robust" not in v["verdict"]
    (table,) = [t for sec in s.sections for t in sec.tables if t.title == VERDICT_TABLE]
    (row,) = [dict(zip(table.headers, r)) for r in table.rows]
    assert (row["robust acc %"], row["points"], row["verdict"]) == (
        "80.0 vs 50.0",
        "10",
        "undecided · provisional",
    )
    assert row["difference, pp [95% CI]"].startswith("+30.0 [-") and row["to resolve"].startswith("≈ ")
    assert row["attacks (worst case)"] == (
        "fgsm, pgd; lacks hqcnn[cnn_small] full: autoattack (rand); cnn_small: autoattack (standard)"
    )


def test_bpda_attacks_count_on_the_side_that_has_them(tmp_path: Path) -> None:
    """BPDA exists only for the hybrid (its gradient is hidden); the CNN's plain attacks already
    take its true gradient. The hybrid's worst case includes BPDA's break of point 1 (and point
    5's third minority is still no break): robust 7 of 10, not the 8 of the attacks both got."""
    bpda = _row("hqcnn", "bpda_pgd", HYB_CORRECT, {1}, stochastic=True, evals=_evals({1}, {5}), **HYBRID)
    s = _summarize(tmp_path, [*_base_rows(), bpda])
    (r,) = s.tables.paired.filter(s.tables.paired["kind"] == "vs CNN").iter_rows(named=True)
    assert r["attacks"] == "fgsm, pgd (the first also bpda_pgd)"
    assert (r["robust_a"], r["robust_b"], r["diff"]) == pytest.approx((0.7, 0.5, 0.2))
    # robust under the hybrid only: 2, 3, 9; under the CNN only: 4 (both lose 1)
    assert (r["a_only"], r["b_only"]) == (3, 1)


def test_an_attack_row_with_nothing_attacked_still_counts_its_points(tmp_path: Path) -> None:
    """A row where the model gets every point wrong clean (n_attacked 0: its ASR is undefined) is
    still a measurement: 0% robust on those points. The summary names its attack and the
    comparison counts it (it used to crash: the row had no attack label); the means keep it too
    (robust 0, no ASR), since with shards a seed's other shards must not hide it (issue 26)."""
    hopeless = _row(
        "hqcnn", "bpda_pgd", HYB_CORRECT, set(), stochastic=True, evals=_evals(set(), set()), **HYBRID
    )
    hopeless |= {"point_correct": [False] * 10, "n_attacked": 0, "robust_acc": 0.0, "clean_acc": 0.0}
    hopeless["asr"] = hopeless["asr_worst"] = float("nan")
    s = _summarize(tmp_path, [*_base_rows(), hopeless])
    assert s.tables.skipped.height == 0
    (cell,) = s.tables.robustness.filter(s.tables.robustness["attack"] == "bpda_pgd").iter_rows(named=True)
    assert cell["robust_mean"] == 0.0 and cell["asr_mean"] is None  # no ASR: null, never NaN
    (r,) = s.tables.paired.filter(s.tables.paired["kind"] == "vs CNN").iter_rows(named=True)
    assert r["attacks"] == "fgsm, pgd (the first also bpda_pgd)"
    assert (r["robust_a"], r["robust_b"]) == pytest.approx((0.0, 0.5))


def _many(
    n: int, robust_a: int, robust_b: int, overlap: int
) -> tuple[list[int], set[int], list[int], set[int]]:
    """n points all correct; A robust on its first robust_a, B on its last robust_b (overlap shared)."""
    a_ok = set(range(robust_a))
    b_ok = set(range(robust_a - overlap, robust_a - overlap + robust_b))
    return [1] * n, set(range(n)) - a_ok, [1] * n, set(range(n)) - b_ok


def test_apgd_alone_decides_nothing_for_good(tmp_path: Path) -> None:
    """400 points, the hybrid robust on 240, the CNN on 120 (60 shared): far beyond the
    interval's width, so the interval says more robust; but APGD at the standard preset is not
    AutoAttack, so the verdict is provisional and names what each side lacks (main 49c6f05
    called this final)."""
    ca, ba, cb, bb = _many(400, 240, 120, 60)
    rows = [
        _row("cnn_small", "apgd", cb, bb, preset="standard", params=APGD_STANDARD),
        _row("hqcnn", "apgd", ca, ba, preset="standard", params=APGD_STANDARD, stochastic=True, **HYBRID),
    ]
    s = _summarize(tmp_path, rows)
    (r,) = s.tables.paired.iter_rows(named=True)
    assert r["diff"] == pytest.approx(0.3) and r["low"] > 0.2 and r["high"] < 0.4
    assert r["verdict"] == "more robust" and r["provisional"]
    assert (r["lacks_a"], r["lacks_b"]) == ("autoattack (rand)", "autoattack (standard)")
    (v,) = s.tables.verdicts.iter_rows(named=True)
    assert v["provisional"] and v["lacks"].endswith("autoattack (rand); cnn_small: autoattack (standard)")
    assert "provisional: no " in v["verdict"]


class _Linear(torch.nn.Module):
    """A linear classifier on the digits, returning log-probabilities of its logits x temperature.
    At a temperature of 10^4 the log-softmax saturates: the cross-entropy gradient underflows
    to zero, so every CE attack (FGSM, PGD, APGD-CE) is blind, while AutoAttack's targeted DLR
    loss (APGD-T) is scale-free and breaks it: gradient masking in its simplest form."""

    stochastic = False

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor, temperature: float):
        super().__init__()
        self.linear = torch.nn.Linear(weight.shape[1], weight.shape[0])
        with torch.no_grad():
            self.linear.weight.copy_(weight)
            self.linear.bias.copy_(bias)
        self.temperature = temperature

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.log_softmax(self.temperature * self.linear(x.flatten(1)), dim=1)


SUITE = (("fgsm", "paper", {}), ("pgd", "paper", {}), ("apgd", "standard", {"steps": 50, "n_restarts": 2}))


def _attack_rows(model_name: str, model: torch.nn.Module, x, y, cols: dict[str, Any]) -> list[dict[str, Any]]:
    """The suite and AutoAttack on `model`, run as run_attack runs them, as result rows."""
    with torch.no_grad():
        correct = (model(x).argmax(1) == y).tolist()
    ok = torch.tensor(correct)
    rows = []
    for name, preset, overrides in (*SUITE, ("autoattack", "paper", {})):
        params = ATTACKS[name].params("digits", preset, overrides)
        attack = build_attack(name, CallCounter(model), params, 10)
        with PointStreams(0, params.get("seed", 0)):
            adv = attack(x[ok], y[ok])
        with torch.no_grad():
            wrong = (model(adv).argmax(1) != y[ok]).tolist()
        attacked = [i for i, c in enumerate(correct) if c]
        broken = {i for i, w in zip(attacked, wrong) if w}
        by = [None] * len(correct)
        if name == "autoattack":
            for i, w, source in zip(attacked, wrong, attack.sources()):
                by[i] = source if w else None
        extra = {}
        if name == "autoattack":
            checks = sanity_checks(model, x[ok], y[ok])
            extra = {"point_broken_by": by, "details": json.dumps({"autoattack_checks": checks})}
        rows.append(
            _row(
                model_name,
                name,
                [int(c) for c in correct],
                broken,
                preset=preset,
                params=params,
                **cols,
                **extra,
            )
        )
    return rows


def test_autoattack_breaks_what_the_suite_leaves_and_the_report_says_which_component(tmp_path: Path) -> None:
    """The toy on which the suite without AutoAttack leaves points AutoAttack breaks: against the
    same classifier unsaturated, the saturated one looks far more robust under FGSM, PGD and APGD
    (provisional); with AutoAttack both are broken alike, the verdict is final and not "more
    robust", and suite_vs_autoattack fails on the saturated model, naming APGD-T."""
    from sklearn.linear_model import LogisticRegression

    train, test = load("digits", str(tmp_path), None, None, False)
    clf = LogisticRegression(max_iter=300).fit(train.x.flatten(1).numpy(), train.y.numpy())
    weight, bias = (
        torch.tensor(clf.coef_, dtype=torch.float32),
        torch.tensor(clf.intercept_, dtype=torch.float32),
    )
    x, y = test.x[:64], test.y[:64]
    plain = _attack_rows("cnn_small", _Linear(weight, bias, 1.0).eval(), x, y, {})
    saturated = _attack_rows("hqcnn", _Linear(weight, bias, 1e4).eval(), x, y, HYBRID)
    suite_only = [r for r in plain + saturated if r["attack"] != "autoattack"]

    (before,) = _summarize(tmp_path / "suite", suite_only).tables.verdicts.iter_rows(named=True)
    assert before["category"] == "more robust" and before["provisional"]

    s = _summarize(tmp_path / "all", plain + saturated)
    (after,) = s.tables.verdicts.iter_rows(named=True)
    assert not after["provisional"] and after["category"] != "more robust"
    gaps = {r["vkey"].split("|")[1]: r for r in s.tables.autoattack.iter_rows(named=True)}
    assert not gaps["hqcnn"]["passed"] and gaps["hqcnn"]["responsible"] == "apgd-t"
    assert gaps["hqcnn"]["rest_only"] == 0 and gaps["hqcnn"]["autoattack_only"] > 50
    assert gaps["cnn_small"]["passed"]  # APGD already finds what AutoAttack finds on the plain model
    assert "suite_vs_autoattack (apgd-t)" in after["flags"] and "failed diagnostics" in after["verdict"]
    diag = s.tables.diagnostics.filter(pl.col("diagnostic") == "suite_vs_autoattack")
    assert sorted(diag["n_pass"].to_list()) == [0, 1]
    report = (tmp_path / "all" / "report" / "report.md").read_text()
    assert (
        "sanity checks (randomness over 5 passes, softmax output, autograd calls at inference) pass on all 2"
        in report
    )
    # per model, the points each AutoAttack component broke beyond the rest of the suite
    (line,) = [x for x in report.splitlines() if x.startswith("| hqcnn") and "FAIL (apgd-t)" in x]
    assert f"| {gaps['hqcnn']['autoattack_only']} | apgd-t {gaps['hqcnn']['autoattack_only']} | 0 |" in line


def test_a_tripped_autoattack_sanity_check_is_said_before_the_verdicts(tmp_path: Path) -> None:
    ca, ba, cb, bb = _many(40, 20, 10, 5)
    checks = {"randomized": False, "probability_output": True, "dynamic": False}
    aa = ATTACKS["autoattack"].params("digits")
    rows = [
        _row("cnn_small", "autoattack", cb, bb, params=aa, details=json.dumps({"autoattack_checks": {}})),
        _row(
            "hqcnn",
            "autoattack",
            ca,
            ba,
            params=aa,
            details=json.dumps({"autoattack_checks": checks}),
            **HYBRID,
        ),
    ]
    s = _summarize(tmp_path, rows)
    report = (tmp_path / "report" / "report.md").read_text()
    verdicts = report.index(VERDICT_TABLE)
    assert (
        0
        < report.index("AutoAttack's sanity checks fail** on: hqcnn[cnn_small] full (probability_output)")
        < verdicts
    )
    (v,) = s.tables.verdicts.iter_rows(named=True)
    assert "autoattack_sanity (probability_output)" in v["flags"]


def test_equal_within_the_margin_and_not_past_it(tmp_path: Path) -> None:
    """Both robust on the same 300 of 400 points: no discordant pair, so the interval is the exact
    bound 400 agreeing points allow (+-0.92 pp, stats.exact_floor; it was a zero-width [0, 0]
    before), inside +-2 pp -> equal. On 40 such points (+-8.8 pp) it is not."""
    correct, broken, _, _ = _many(400, 300, 300, 300)
    rows = [_row("cnn_small", "fgsm", correct, broken), _row("hqcnn", "fgsm", correct, broken, **HYBRID)]
    (r,) = _summarize(tmp_path, rows).tables.paired.iter_rows(named=True)
    bound = sps.binomtest(0, 400).proportion_ci().high
    assert (r["low"], r["high"], r["verdict"]) == (pytest.approx(-bound), pytest.approx(bound), "equal")
    correct, broken, _, _ = _many(40, 30, 30, 30)
    rows = [_row("cnn_small", "fgsm", correct, broken), _row("hqcnn", "fgsm", correct, broken, **HYBRID)]
    (r,) = _summarize(tmp_path / "few", rows).tables.paired.iter_rows(named=True)
    assert (
        r["high"] == pytest.approx(sps.binomtest(0, 40).proportion_ci().high) and r["verdict"] == "undecided"
    )


def test_the_procedure_question_with_one_seed_is_undecided(tmp_path: Path) -> None:
    """--estimand procedure: seeds are the unit, so one seed decides nothing, however clear
    the difference between these two trained models is; the report says both answers."""
    ca, ba, cb, bb = _many(400, 240, 120, 60)
    rows = [_row("cnn_small", "fgsm", cb, bb), _row("hqcnn", "fgsm", ca, ba, **HYBRID)]
    s = _summarize(tmp_path, rows, estimand=PROCEDURE)
    (r,) = s.tables.paired.iter_rows(named=True)
    assert (r["estimand"], r["verdict"]) == (PROCEDURE, "undecided") and math.isnan(r["low"])
    assert r["models_low"] > 0 and r["procedure_low"] is None  # these models: clearly apart
    (v,) = s.tables.verdicts.iter_rows(named=True)
    assert "no interval for the training procedure: undefined with one seed" in v["verdict"]
    assert "these trained models (points as the unit, by seed): +" in v["verdict"]
    assert "at least 2 seeds to estimate their spread" in v["verdict"]


def test_controls_gain_source_from_intervals(tmp_path: Path) -> None:
    ca, ba, cb, bb = _many(400, 240, 120, 60)
    rows = [
        _row("cnn_small", "fgsm", cb, bb),
        _row("hqcnn", "fgsm", ca, ba, **HYBRID),
        _row(
            "hqcnn", "fgsm", cb, bb, control="backbone_only", **HYBRID
        ),  # the backbone alone: the CNN's robustness
    ]
    s = _summarize(tmp_path, rows)
    kinds = {r["kind"]: r["verdict"] for r in s.tables.paired.iter_rows(named=True)}
    assert kinds == {
        "vs CNN": "more robust",
        "vs backbone alone": "more robust",
        "backbone alone vs CNN": "equal",
    }
    report = (tmp_path / "report" / "report.md").read_text()
    assert (
        "the gain comes mainly from the quantum branch (with its fusion head) (quantum part: more robust;"
        in report
    )
    # Holm's family is the verdicts (here the one "vs CNN"); the two controls are adjusted apart
    p = {r["kind"]: (r["p_value"], r["p_holm"]) for r in s.tables.paired.iter_rows(named=True)}
    assert p["vs CNN"][1] == pytest.approx(p["vs CNN"][0])
    controls = ["vs backbone alone", "backbone alone vs CNN"]
    assert [p[k][1] for k in controls] == pytest.approx(holm([p[k][0] for k in controls]))


def _part(verdict: str, high: float) -> dict[str, Any]:
    return {"verdict": verdict, "high": high}


@pytest.mark.parametrize(
    "quantum,backbone,expected",
    [
        (_part("more robust", 0.2), _part("equal", 0.01), "quantum branch"),
        (_part("more robust", 0.2), _part("undecided", -0.008), "quantum branch"),  # backbone part below 0
        (_part("more robust", 0.2), _part("undecided", 0.05), "undecided"),  # backbone part could be a gain
        (_part("equal", 0.015), _part("more robust", 0.1), "backbone"),
        (_part("more robust", 0.2), _part("more robust", 0.1), "both"),
        (_part("equal", 0.01), _part("less robust", -0.05), "no gain"),
        (_part("undecided", 0.08), _part("equal", 0.01), "undecided"),
        (None, None, "no backbone-alone run"),
    ],
)
def test_gain_source_rule(
    quantum: dict[str, Any] | None, backbone: dict[str, Any] | None, expected: str
) -> None:
    assert gain_source(quantum, backbone, margin=0.02) == expected


def test_an_attack_missing_on_one_seed_makes_the_comparison_incomplete(tmp_path: Path) -> None:
    """Two seeds; the hybrid's PGD failed on seed 1 and its FGSM on seed 1 overstepped its
    budget. main 49c6f05 compared seed 1 on whatever was left (its worst case silently fell back
    to fewer attacks); now the verdict is 'incomplete' and names what is missing, and seed 1's
    worst case uses only what both sides completed there."""
    correct = [1] * 10
    rows = []
    for seed in (0, 1):
        rows += [
            _row("cnn_small", "fgsm", correct, {0, 1}, seed=seed),
            _row("cnn_small", "pgd", correct, {2, 3}, seed=seed),
            _row("cnn_small", "apgd", correct, {4}, seed=seed, preset="standard", params=APGD_STANDARD),
            _row("hqcnn", "fgsm", correct, {0}, seed=seed, budget_ok=seed == 0, **HYBRID),
            _row("hqcnn", "apgd", correct, {4}, seed=seed, preset="standard", params=APGD_STANDARD, **HYBRID),
        ]
    rows.append(_row("hqcnn", "pgd", correct, {2}, seed=0, **HYBRID))
    s = _summarize(tmp_path, rows)
    (r,) = s.tables.paired.iter_rows(named=True)
    assert r["verdict"] == "incomplete" and r["missing_b"] is None
    assert r["missing_a"] == "fgsm (seed 1); pgd (seed 1)"
    # seed 0: all three attacks, hybrid robust on 7, CNN on 5; seed 1: apgd only, both robust on 9
    assert (r["robust_a"], r["robust_b"]) == pytest.approx(((7 + 9) / 20, (5 + 9) / 20))
    (v,) = s.tables.verdicts.iter_rows(named=True)
    assert v["category"] == "incomplete" and "fgsm (seed 1); pgd (seed 1)" in v["missing"]
    assert "(missing: hqcnn[cnn_small] full: fgsm (seed 1); pgd (seed 1))" in v["verdict"]


def test_a_hybrid_from_scratch_is_compared_with_its_backbone_once_and_that_is_its_equal_budget_control(
    tmp_path: Path,
) -> None:
    ca, ba, cb, bb = _many(400, 240, 120, 60)
    rows = [
        _row("cnn_small", "fgsm", cb, bb),
        _row("hqcnn", "fgsm", ca, ba, **{**HYBRID, "init": "scratch"}),
    ]
    s = _summarize(tmp_path, rows)
    (r,) = s.tables.paired.iter_rows(named=True)  # no second, identical "vs equal-budget" comparison
    assert r["kind"] == "vs CNN" and r["equal_budget"]
    (g,) = gain_sources(s.tables.paired, 0.02).iter_rows(named=True)
    assert g["equal_budget"] == r["verdict"] == "more robust"


def _trained_variants() -> list[tuple[str, str | None, dict[str, Any]]]:
    """(model, control, train columns) as the grid writes them for a sweep with a standard CNN and
    three hybrids from it that differ only in how they are trained (standard; PGD-AT at eps 0.1;
    PGD-AT at eps 0.2), with their equal-budget backbones: the backbone alone, trained the
    hybrid's way for the hybrid's whole budget. No training: the grid only."""
    from qshield_dist.config import SweepConfig, validate
    from qshield_dist.grid import build_grid
    from qshield_dist.trial import _model_columns

    hybrid = {"model": "hqcnn", "backbone": "cnn_small"}
    sweep = SweepConfig(
        name="budgets",
        data={"dataset": "digits", "train_size": 100, "test_size": 60},
        train={"epochs": 3, "batch_size": 32, "max_steps": 7},
        eval={"attack_size": 32, "controls": ["equal_budget"]},
        models=[
            {"model": "cnn_small"},
            hybrid,
            {**hybrid, "train": {"method": "pgd_at", "eps": 0.1}},
            {**hybrid, "train": {"method": "pgd_at", "eps": 0.2}},
        ],
        attacks=[{"name": "fgsm"}],
        results_dir="unused",
        checkpoint_dir="unused",
    )
    grid = build_grid(validate(sweep))
    attacked = {(a.train.trial_id, a.control) for a in grid.attack}
    out = []
    for trial_id, control in sorted(attacked, key=str):
        (t,) = [t for t in grid.train if t.trial_id == trial_id]
        cols = _model_columns(t)
        out.append((t.model.model, control, {k: cols[k] for k in ("train_method", "train_config")}))
    return out


def test_the_equal_budget_backbone_is_found_by_the_hybrids_training(tmp_path: Path) -> None:
    """Two hybrids that differ only in their training (method, or the method's eps) each meet
    their own equal-budget backbone, never another's: the control is looked up with the hybrid's
    train_config (grid.equal_budget_train_config). Before, the key held the method but not its
    settings, so both PGD-AT hybrids met one of the PGD-AT backbones (a dict keeps the last)."""
    from qshield_dist.grid import equal_budget_train_config

    variants = _trained_variants()
    hybrids = [cols for model, _, cols in variants if model == "hqcnn"]
    budgets = [cols for _, control, cols in variants if control == "equal_budget"]
    assert len(hybrids) == len(budgets) == 3
    # the summary's mapping gives exactly the train settings the grid gave each equal-budget backbone
    assert {equal_budget_train_config(h["train_config"]) for h in hybrids} == {
        b["train_config"] for b in budgets
    }
    n = 40
    robust = {}  # each hybrid and its own equal-budget backbone robust on the same first k points
    for k, h in zip((30, 20, 10), hybrids):
        robust[h["train_config"]] = k
        robust[equal_budget_train_config(h["train_config"])] = k
    rows = []
    for i, (model, control, cols) in enumerate(variants):
        k = robust.get(cols["train_config"], 5)  # the plain CNN: robust on 5
        extra = HYBRID if model == "hqcnn" else {}
        ids = {"trial_id": f"A{i}", "train_id": f"T{i}"}
        rows.append(_row(model, "fgsm", [1] * n, set(range(k, n)), control=control, **cols, **extra, **ids))
    s = _summarize(tmp_path, rows)
    budget_rows = s.tables.paired.filter(pl.col("kind") == "vs equal-budget backbone")
    assert budget_rows.height == 3
    config = dict(zip(s.tables.variants["vkey"], s.tables.variants["train_config"]))
    for r in budget_rows.iter_rows(named=True):
        assert config[r["b"]] == equal_budget_train_config(config[r["a"]])
        assert (r["a_only"], r["b_only"]) == (0, 0)  # its own backbone: the same points robust
    # the controls table too: one row per hybrid, its own backbone's ASR beside it
    ctrl = s.tables.controls
    assert ctrl.height == 3 and ctrl["vkey_h"].n_unique() == 3
    assert ctrl["asr_equal_budget"].to_list() == pytest.approx(ctrl["asr_hybrid"].to_list())


def test_a_comparison_without_paired_points_still_counts_in_holms_family(tmp_path: Path) -> None:
    """A second hybrid whose L-inf attacks all failed (only its C&W row is there) has no verdict
    row at the CNN's budget, but it stays in Holm's family as never rejected: the first hybrid's
    Holm-adjusted p is doubled, not left as if it were the only comparison; a note says so."""
    other = {**HYBRID, "entanglement": "star"}
    alone = _summarize(tmp_path / "alone", _base_rows())
    both = _summarize(
        tmp_path / "both",
        [*_base_rows(), _row("hqcnn", "cw", HYB_CORRECT, set(), threat="l2", params={"c": 0.01}, **other)],
    )
    (first,) = alone.tables.paired.filter(pl.col("kind") == "vs CNN").iter_rows(named=True)
    (again,) = both.tables.paired.filter(pl.col("kind") == "vs CNN").iter_rows(named=True)
    assert first["p_holm"] == pytest.approx(first["p_value"])
    assert again["p_holm"] == pytest.approx(min(1.0, 2 * again["p_value"]))
    assert both.tables.unpaired == 1 and alone.tables.unpaired == 0
    assert any("no paired points" in note for note in both.tables.notes)
