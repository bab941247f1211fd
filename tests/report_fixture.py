"""A small results directory with per-point outcomes, for the report's layout and number tests.

Written with the ResultStore, so the schema is the real one; every outcome is
set by hand, so the verdicts are known: on digits (one seed, 200 points) the full hybrid is
more robust than cnn_small under AutoAttack (which breaks more of its points than the rest of
its suite: suite_vs_autoattack fails), the star hybrid, without AutoAttack, provisional and
undecided, with both controls of the full hybrid; on mnist (two seeds, 100 points each, FGSM
and PGD) the hybrid is provisional and undecided against cnn. A failing diagnostic, a failed
trial and train rows (clean accuracy) complete it.

`python tests/report_fixture.py OUT` writes the directory and its report (Markdown and CSV)
under OUT, with the paths and the time stamp normalised: that is how tests/golden/report/
was made, from main ac438fa's code, the commit before the report's redesign (tests/test_report.py).
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from typing import Any

from qshield_dist.results.current import STAGE_VERSIONS
from qshield_dist.results.store import ResultStore, TrialKey

SWEEP = "fixture"
EPS = 32 / 255
PARAMS = {
    "fgsm": {"eps": EPS},
    "pgd": {"alpha": 2 / 255, "eps": EPS, "random_start": True, "steps": 10},
    "apgd": {
        "best_loss": True,
        "eot_iter": 10,
        "eps": EPS,
        "loss": "ce",
        "n_restarts": 1,
        "rho": 0.75,
        "seed": 0,
        "steps": 50,
    },
}
PARAMS["autoattack"] = {"eps": EPS, "seed": 0, "version": "auto"}
PRESETS = {"fgsm": "paper", "pgd": "paper", "apgd": "standard", "autoattack": "paper"}
HYBRID = {
    "backbone": "cnn_small",
    "entanglement": "full",
    "depth": 1,
    "encoding": "enhanced_angle",
    "noise_model": "none",
    "noise_strength": 0.0,
    "fusion": "dynamic",
    "quantum_grad": "full",
    "projection": "learned",
    "init": "from_baseline",
    "simulator": "compiled",
    "device": "default.qubit",
    "trajectories": 0,
    "qubits": 4,
}


def _cols(model: str, entanglement: str | None, backbone: str = "cnn_small") -> dict[str, Any]:
    return {**HYBRID, "backbone": backbone, "entanglement": entanglement} if entanglement else {}


def _name(dataset: str, model: str, entanglement: str | None, control: str | None, seed: int) -> str:
    return "-".join(str(p) for p in (dataset, model, entanglement or "", control or "", seed))


def _train(dataset: str, model: str, seed: int, clean: float, seconds: float, **cols: Any) -> dict[str, Any]:
    return {
        "sweep": SWEEP,
        "stage": "train",
        "status": "ok",
        "trial_id": "T" + _name(dataset, model, cols.get("entanglement"), cols.get("control"), seed),
        "dataset": dataset,
        "model": model,
        "variant": model,
        "seed": seed,
        "clean_acc": clean,
        "train_seconds": seconds,
        "train_steps": 100,
        **cols,
    }


def _attack(
    dataset: str,
    model: str,
    attack: str,
    seed: int,
    n: int,
    wrong: set[int],
    broken: set[int],
    seconds: float,
    by_ce: int = 0,
    **cols: Any,
) -> dict[str, Any]:
    """n points; `wrong` misclassified clean, `broken` broken by the attack (among the rest);
    AutoAttack's APGD-CE broke the points from `by_ce` on, APGD-T the ones before."""
    correct = [i not in wrong for i in range(n)]
    hit = [correct[i] and i in broken for i in range(n)]
    n_att, n_succ = sum(correct), sum(hit)
    by = None
    if attack == "autoattack":  # the component that broke each point: apgd-t beyond apgd-ce's reach
        by = [("apgd-ce" if i >= by_ce else "apgd-t") if hit[i] else None for i in range(n)]
    name = _name(dataset, model, cols.get("entanglement"), cols.get("control"), seed)
    return {
        "sweep": SWEEP,
        "stage": "attack",
        "status": "ok",
        "trial_id": f"A{name}-{attack}",
        "train_id": f"T{name}",
        "dataset": dataset,
        "model": model,
        "variant": model,
        "seed": seed,
        "attack": attack,
        "attack_preset": PRESETS[attack],
        "attack_params": json.dumps(PARAMS[attack], sort_keys=True),
        "threat_model": "linf",
        "eps": EPS,
        "eval_repeats": 1,
        "success_rule": "misclassified (deterministic model, 1 evaluation)",
        "stochastic": False,
        "clean_acc": n_att / n,
        "n_points": n,
        "n_attacked": n_att,
        "n_success": n_succ,
        "asr": n_succ / n_att,
        "asr_worst": n_succ / n_att,
        "robust_acc": (n_att - n_succ) / n,
        "attack_seconds": seconds,
        "forward_calls": 10 if attack == "fgsm" else 100,
        "backward_calls": 10 if attack == "fgsm" else 100,
        "forward_samples": 10 * n,
        "backward_samples": 10 * n,
        "budget_ok": True,
        "point_index": list(range(n)),
        "point_correct": correct,
        "point_broken": hit,
        "point_broken_by": by,
        **cols,
    }


def _breaks(robust: int, n: int, attack: str, beyond: int = 0) -> set[int]:
    """Points 0..robust-1 survive fgsm, pgd and apgd; fgsm breaks the odd points past them, pgd
    the even ones and apgd all of them; AutoAttack breaks apgd's and `beyond` more."""
    rest = range(robust, n)
    return {
        "fgsm": {i for i in rest if i % 2},
        "pgd": {i for i in rest if i % 2 == 0},
        "apgd": set(rest),
        "autoattack": set(range(robust - beyond, n)),
    }[attack]


def rows() -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    # digits, one seed, 200 points, 10 wrong clean for every model; robust points under apgd: the
    # hybrid (full) 70, its backbone alone 42, the equal-budget backbone 40, cnn_small 40, star
    # 46. AutoAttack runs on all but star and breaks 6 more of the full hybrid's (APGD-T): 64.
    digits = [
        ("cnn_small", None, None, 40, 0, 2.0),
        ("hqcnn", "full", None, 70, 6, 60.0),
        ("hqcnn", "star", None, 46, None, 50.0),
        ("hqcnn", "full", "backbone_only", 42, 0, 2.0),
        ("cnn_small", None, "equal_budget", 40, 0, 2.0),
    ]
    wrong = set(range(190, 200))
    for model, ent, control, robust, beyond, seconds in digits:
        cols = {**_cols(model, ent), **({"control": control} if control else {})}
        if control != "backbone_only":
            clean = 0.95 if model == "cnn_small" else 0.93
            out.append(_train("digits", model, 0, clean, 10.0 * seconds, **cols))
        for attack in ("fgsm", "pgd", "apgd") + (() if beyond is None else ("autoattack",)):
            broken = _breaks(robust, 200, attack, beyond or 0)
            out.append(_attack("digits", model, attack, 0, 200, wrong, broken, seconds, by_ce=robust, **cols))
    # mnist, two seeds, 100 points, fgsm and pgd only (provisional): cnn 30 and 34 robust,
    # the hybrid 36 and 33.
    for model, ent, robust_by_seed in (("cnn", None, (30, 34)), ("hqcnn", "full", (36, 33))):
        cols = _cols(model, ent, backbone="cnn")
        for seed, robust in enumerate(robust_by_seed):
            out.append(_train("mnist", model, seed, 0.97 + 0.01 * seed, 100.0, **cols))
            for attack in ("fgsm", "pgd"):
                out.append(
                    _attack(
                        "mnist", model, attack, seed, 100, {99}, _breaks(robust, 100, attack), 3.0, **cols
                    )
                )
    return out


def build(root: Path) -> None:
    """Write the fixture's results directory under `root`."""
    written = rows()
    diagnostics = [
        ("hqcnn", "full", "grad_norm_ratio", 0.02, False, '{"why": "gradients 50x smaller than the CNN\'s"}'),
        ("cnn_small", None, "grad_norm_ratio", 1.0, True, None),
    ]
    for model, ent, diagnostic, value, passed, details in diagnostics:
        written.append(
            {
                "sweep": SWEEP,
                "stage": "diagnostic",
                "status": "ok",
                "trial_id": f"D{model}{ent or ''}{diagnostic}",
                "dataset": "digits",
                "model": model,
                "variant": model,
                "seed": 0,
                "diagnostic": diagnostic,
                "diagnostic_value": value,
                "diagnostic_pass": passed,
                "details": details,
                **_cols(model, ent),
            }
        )
    for row in written:
        row = {
            "results_version": STAGE_VERSIONS[row["stage"]],
            "train_version": STAGE_VERSIONS["train"],
            **row,
        }
        ResultStore(root).write(TrialKey(row["stage"], row["dataset"], row["trial_id"]), [row])
    failed = {
        "sweep": SWEEP,
        "stage": "attack",
        "status": "failed",
        "trial_id": "Afailed-square",
        "dataset": "digits",
        "model": "hqcnn",
        "variant": "hqcnn",
        "seed": 0,
        "attack": "square",
        "error": "RuntimeError: simulator exploded\nTraceback (most recent call last): ...",
        "results_version": STAGE_VERSIONS["attack"],
        "train_version": STAGE_VERSIONS["train"],
        **_cols("hqcnn", "star"),
    }
    ResultStore(root).write(TrialKey("attack", "digits", failed["trial_id"]), [failed])
    expected = [r["trial_id"] for r in written] + [failed["trial_id"]]
    ResultStore(root).write_manifest(
        {"sweep": SWEEP}, {t: {"stage": "attack", "dataset": "digits"} for t in expected}
    )


def normalised(text: str, root: Path) -> str:
    """Report text without what differs between runs: the results path and the time stamp."""
    text = text.replace(str(root), "<results>")
    return re.sub(r"Generated \d{4}-\d\d-\d\d \d\d:\d\d UTC", "Generated <time>", text)


def main(out: Path) -> None:
    from qshield_dist.summary.report import Options, summarize

    root = out / "results"
    build(root)
    report = out / "report"
    summarize(root, report, Options(formats=("md", "csv"), svg=False))
    golden = out / "golden"
    golden.mkdir(parents=True, exist_ok=True)
    for path in sorted(report.iterdir()):
        if path.suffix in (".md", ".csv"):
            (golden / path.name).write_text(normalised(path.read_text(), root))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
