"""Verdicts from per-point outcomes, with numbers computed by hand: the worst case over L-inf
attacks per point (a stochastic model's majority rule, threat models kept apart), the paired
comparison and its verdict, the provisional label and the controls' gain source."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from qshield_dist.results.current import STAGE_VERSIONS
from qshield_dist.results.store import ResultStore, TrialKey
from qshield_dist.summary.report import Options, Summary, summarize
from qshield_dist.summary.stats import mcnemar_exact
from qshield_dist.summary.verdicts import gain_source

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


def _summarize(tmp_path: Path, rows: list[dict[str, Any]]) -> Summary:
    root = tmp_path / "results"
    for row in rows:
        ResultStore(root).write(TrialKey("attack", "digits", row["trial_id"]), [row])
    ResultStore(root).write_manifest(
        {"sweep": "v"}, {r["trial_id"]: {"stage": "attack", "dataset": "digits"} for r in rows}
    )
    return summarize(root, tmp_path / "report", Options(plots=False, formats=("md", "csv"), proxies={}))


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
        and "points per seed would resolve it" in v["verdict"]
    )
    assert "more robust" not in v["verdict"]
    report = (tmp_path / "report" / "report.md").read_text()
    assert "[95% CI" in report and "10 points x 1 seed(s)" in report


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


def _many(
    n: int, robust_a: int, robust_b: int, overlap: int
) -> tuple[list[int], set[int], list[int], set[int]]:
    """n points all correct; A robust on its first robust_a, B on its last robust_b (overlap shared)."""
    a_ok = set(range(robust_a))
    b_ok = set(range(robust_a - overlap, robust_a - overlap + robust_b))
    return [1] * n, set(range(n)) - a_ok, [1] * n, set(range(n)) - b_ok


def test_full_strength_attack_and_a_decided_verdict(tmp_path: Path) -> None:
    """400 points, the hybrid robust on 240, the CNN on 120 (60 shared): far beyond the
    interval's width, and APGD at the standard preset makes it not provisional."""
    ca, ba, cb, bb = _many(400, 240, 120, 60)
    rows = [
        _row("cnn_small", "apgd", cb, bb, preset="standard", params=APGD_STANDARD),
        _row("hqcnn", "apgd", ca, ba, preset="standard", params=APGD_STANDARD, stochastic=True, **HYBRID),
    ]
    s = _summarize(tmp_path, rows)
    (r,) = s.tables.paired.iter_rows(named=True)
    assert r["diff"] == pytest.approx(0.3) and r["low"] > 0.2 and r["high"] < 0.4
    assert r["verdict"] == "more robust" and not r["provisional"] and r["full_strength"] == "apgd[standard]"


def test_equal_within_the_margin_and_not_past_it(tmp_path: Path) -> None:
    """Both robust on the same 300 of 400 points: a zero-width interval at 0 -> equal."""
    correct, broken, _, _ = _many(400, 300, 300, 300)
    rows = [_row("cnn_small", "fgsm", correct, broken), _row("hqcnn", "fgsm", correct, broken, **HYBRID)]
    (r,) = _summarize(tmp_path, rows).tables.paired.iter_rows(named=True)
    assert (r["low"], r["high"], r["verdict"]) == (0.0, 0.0, "equal")


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
    assert "gain mainly from **quantum branch**" in (tmp_path / "report" / "report.md").read_text()


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
