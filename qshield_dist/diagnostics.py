"""Gradient-masking diagnostics (Athalye et al. 2018; Carlini et al. 2019 checklist).

One row per check and model variant, each with a value and a pass flag. A failed flag
does not prove masking, and a pass does not prove robustness; a failed flag means the
robustness numbers of that variant must not be trusted until an adaptive attack explains it.

Checks that compare attacks read the attack rows this sweep wrote for the same trained
model; the others measure the model directly.
"""

from __future__ import annotations

import json
import math
from typing import Any, Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from qshield_dist.attack_params import ADAPTIVE, ATTACKS, PAPER_SUITE, budget_reachable
from qshield_dist.attacks import BPDA, CallCounter, build_attack
from qshield_dist.attacks.autoattack import AUTHORS_EOT, AUTHORS_STEPS
from qshield_dist.attacks.base import strict_majority
from qshield_dist.attacks.streams import PointStreams
from qshield_dist.results.store import ResultStore, TrialKey

EPS_SWEEP = (8 / 255, 16 / 255, 32 / 255, 64 / 255, 0.25, 0.5)
RESTART_STARTS = 5  # independent APGD starts of restart_sensitivity (AutoAttack's custom default)


def tolerance(p1: float, n1: int, p2: float, n2: int) -> float:
    """Two standard errors of a difference of two proportions (at least 0.01): gaps smaller
    than this are sampling noise, not evidence."""
    var = sum(p * (1 - p) / max(n, 1) for p, n in ((p1, n1), (p2, n2)))
    return max(0.01, 2 * math.sqrt(var))


def _best(rows: list[dict[str, Any]], keep: Callable[[dict[str, Any]], bool]) -> dict[str, Any] | None:
    chosen = [r for r in rows if r.get("status") == "ok" and r.get("n_attacked") and keep(r)]
    return max(chosen, key=lambda r: r["asr"], default=None)


def _compare(name: str, stronger: dict | None, weaker: dict | None, why: str, needs: str) -> dict[str, Any]:
    """Row for 'stronger should reach at least weaker's ASR'."""
    if stronger is None or weaker is None:
        return {
            "diagnostic": name,
            "diagnostic_value": None,
            "diagnostic_pass": None,
            "details": json.dumps({"not_run": f"needs {needs}"}),
        }
    gap = stronger["asr"] - weaker["asr"]
    tol = tolerance(stronger["asr"], stronger["n_attacked"], weaker["asr"], weaker["n_attacked"])
    return {
        "diagnostic": name,
        "diagnostic_value": gap,
        "diagnostic_pass": gap >= -tol,
        "details": json.dumps(
            {
                "rule": why,
                "tolerance": tol,
                "stronger": [stronger["attack"], stronger["asr"]],
                "weaker": [weaker["attack"], weaker["asr"]],
            }
        ),
    }


def compare_attacks(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The checks that only compare attack results of one model."""
    linf = lambda r: r["threat_model"] == "linf"  # noqa: E731
    iterative = _best(
        rows, lambda r: linf(r) and ATTACKS[r["attack"]].iterative and ATTACKS[r["attack"]].white_box
    )
    single = _best(rows, lambda r: r["attack"] == "fgsm")
    white = _best(rows, lambda r: linf(r) and ATTACKS[r["attack"]].white_box)
    black = _best(rows, lambda r: linf(r) and not ATTACKS[r["attack"]].white_box)
    adaptive = _best(rows, lambda r: r["attack"] in ADAPTIVE)
    # The paper suite is the paper's attacks with the paper's parameters: a standard-preset
    # PGD, or APGD with more steps, is already a stronger attack than the one the paper ran.
    paper = _best(
        rows, lambda r: r["attack"] in PAPER_SUITE and r.get("attack_preset") == "paper" and _paper_params(r)
    )
    out = [
        _compare(
            "iterative_ge_single_step",
            iterative,
            single,
            "an iterative attack must reach at least FGSM's ASR",
            "fgsm and an iterative L-inf attack",
        ),
        _compare(
            "whitebox_ge_blackbox",
            white,
            black,
            "white-box must reach at least black-box/transfer ASR",
            "a white-box and a black-box or transfer L-inf attack",
        ),
    ]
    gap = _compare(
        "adaptive_vs_paper_suite", adaptive, paper, "", "an adaptive attack and a paper-suite attack"
    )
    if gap["diagnostic_value"] is not None:
        # Here the flag is raised the other way: adaptive attacks finding clearly more than
        # the paper's suite means the suite's numbers were masked.
        details = json.loads(gap["details"])
        details["rule"] = (
            "adaptive ASR must not exceed the paper-suite ASR (the paper's attacks with its parameters) by more than the tolerance; "
            "a failure means the paper suite understates this model's ASR: masking, or a weak suite (compare the CNN's row)"
        )
        gap["diagnostic_pass"] = gap["diagnostic_value"] <= details["tolerance"]
        gap["details"] = json.dumps(details)
    out.append(gap)
    unreachable = sorted(
        {
            r["attack"]
            for r in rows
            if r.get("status") == "ok" and not budget_reachable(json.loads(r["attack_params"] or "{}"))
        }
    )
    out.append(
        {
            "diagnostic": "attack_budget_reachable",
            "diagnostic_value": float(len(unreachable)),
            "diagnostic_pass": not unreachable,
            "details": json.dumps(
                {"rule": "steps x step size >= eps for iterative L-inf attacks", "unreachable": unreachable}
            ),
        }
    )
    return out


def _paper_params(row: dict[str, Any]) -> bool:
    """Did this attack row run with exactly the paper's parameters for its dataset?"""
    paper = json.loads(json.dumps(ATTACKS[row["attack"]].params(row["dataset"], "paper")))
    return json.loads(row["attack_params"] or "{}") == paper


def _majority_wrong(model: nn.Module, x: torch.Tensor, y: torch.Tensor, repeats: int) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return strict_majority(torch.stack([model(x).argmax(1) != y for _ in range(repeats)]))


def _gradient_target(model: nn.Module) -> tuple[nn.Module, bool]:
    """What a gradient attack should differentiate: a detached quantum branch is attacked through
    BPDA (its own forward, its differentiable twin's gradient)."""
    bpda = getattr(model, "quantum_grad", "full") == "detached" and hasattr(model, "differentiable_twin")
    return (BPDA(model, model.differentiable_twin()) if bpda else model), bpda


def eps_sweep(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    n_classes: int,
    stochastic: bool,
    repeats: int,
    eps_values: tuple[float, ...] = EPS_SWEEP,
    steps: int = 50,
) -> dict[str, Any]:
    """ASR of APGD-CE (step-size free, so it does not stall where fixed-step PGD can; EOT
    over 10 draws for stochastic models) against eps. At eps = 0.5 any image can be moved to
    mid-grey, so ASR must reach ~1 unless gradients are masked. A model whose quantum branch is
    detached is attacked through BPDA (its own forward, its differentiable twin's gradient):
    the check is whether the model resists an unbounded attack, not whether its own gradient
    hides part of it (gradient_matches_differentiable_twin measures that)."""
    asr = {}
    eot = 10 if stochastic else 1
    target, bpda = _gradient_target(model)
    for eps in eps_values:
        params = ATTACKS["apgd"].params("mnist", "standard", {"eps": eps, "steps": steps, "eot_iter": eot})
        torch.manual_seed(0)
        adv = build_attack("apgd", CallCounter(target), params, n_classes, stochastic=stochastic)(
            x, y
        ).detach()
        asr[f"{eps:.4f}"] = float(_majority_wrong(model, adv, y, repeats).float().mean())
    top = asr[f"{eps_values[-1]:.4f}"]
    return {
        "diagnostic": "eps_sweep_reaches_1",
        "diagnostic_value": top,
        "diagnostic_pass": top >= 0.99 if eps_values[-1] >= 0.5 else None,
        "details": json.dumps(
            {
                "rule": "ASR at eps=0.5 (L-inf) >= 0.99",
                "attack": "apgd-ce",
                "gradient": "bpda" if bpda else "model",
                "steps": steps,
                "eot_iter": eot,
                "asr_by_eps": asr,
                "n": len(y),
            }
        ),
    }


def restart_sensitivity(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    n_classes: int,
    eps: float,
    stochastic: bool,
    repeats: int,
    seed: int,
    batch_size: int,
    starts: int = RESTART_STARTS,
    steps: int = AUTHORS_STEPS,
) -> dict[str, Any]:
    """K independent starts of APGD-CE (AutoAttack's component: 100 steps, EOT over 20 draws on a
    stochastic model, through BPDA for a detached quantum branch) on the attacked points of the
    shared set, each start from its own per-point streams. It fails when the union of the starts
    breaks significantly more points than one start does: d = broken by some start - the mean
    over starts, per point, and mean(d) > 2 standard errors. On such a model a single APGD run
    is a lottery, and what one attack reports depends on its random start."""
    target, bpda = _gradient_target(model)
    eot = AUTHORS_EOT if stochastic else 1
    params = ATTACKS["apgd"].params("mnist", "standard", {"eps": eps, "steps": steps, "eot_iter": eot})
    broken = []
    for start in range(starts):
        attack = build_attack("apgd", CallCounter(target), params, n_classes, stochastic=stochastic)
        with PointStreams(seed, start):
            adv = [attack(x[i : i + batch_size], y[i : i + batch_size]) for i in range(0, len(y), batch_size)]
        broken.append(_majority_wrong(model, torch.cat(adv).detach(), y, repeats) if len(y) else y.bool())
    hits = torch.stack(broken)  # (starts, n)
    d = hits.any(0).double() - hits.double().mean(0)
    n = len(y)
    mean = float(d.mean()) if n else 0.0
    se = float(d.std() / math.sqrt(n)) if n > 1 else float("nan")
    per_start = hits.sum(1).tolist()
    return {
        "diagnostic": "restart_sensitivity",
        "diagnostic_value": mean,
        "diagnostic_pass": mean <= 0 or mean <= 2 * se,
        "details": json.dumps(
            {
                "rule": "the union of K independent APGD starts must not break more points than one start"
                " by more than 2 standard errors (paired)",
                "starts": starts,
                "broken_per_start": per_start,
                "broken_by_any_start": int(hits.any(0).sum()),
                "spread": max(per_start) - min(per_start),
                "n": n,
                "se": se,
                "attack": "apgd-ce",
                "steps": steps,
                "eot_iter": eot,
                "eps": eps,
                "gradient": "bpda" if bpda else "model",
            }
        ),
    }


def input_gradients(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    x = x.clone().requires_grad_(True)
    F.nll_loss(model(x), y).backward()
    return x.grad.detach().flatten(1)


def gradient_checks(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, calls: int = 5
) -> list[dict[str, Any]]:
    """Input-gradient norm non-zero and stable across calls; for a hybrid, agreement with its
    differentiable twin (a low cosine means the real gradient hides part of the model)."""
    model.eval()
    grads = torch.stack([input_gradients(model, x, y) for _ in range(calls)])  # (calls, N, D)
    norms = grads.norm(dim=2)  # (calls, N)
    mean_norm = float(norms.mean())
    spread = float(((grads - grads.mean(0)).norm(dim=2) / (grads.mean(0).norm(dim=1) + 1e-12)).mean())
    rows = [
        {
            "diagnostic": "gradient_nonzero_and_stable",
            "diagnostic_value": mean_norm,
            "diagnostic_pass": mean_norm > 1e-6 and spread < 0.1,
            "details": json.dumps(
                {
                    "rule": "mean input-gradient norm > 1e-6 and relative spread across calls < 0.1",
                    "relative_spread": spread,
                    "calls": calls,
                    "n": len(y),
                }
            ),
        }
    ]
    if hasattr(model, "differentiable_twin"):
        twin = input_gradients(model.differentiable_twin(), x, y)
        cos = float(F.cosine_similarity(grads[0], twin, dim=1).mean())
        rows.append(
            {
                "diagnostic": "gradient_matches_differentiable_twin",
                "diagnostic_value": cos,
                "diagnostic_pass": cos >= 0.9,
                "details": json.dumps(
                    {"rule": "mean cosine(model gradient, BPDA twin gradient) >= 0.9", "n": len(y)}
                ),
            }
        )
    return rows


def batch_dependence(model: nn.Module, x: torch.Tensor) -> dict[str, Any]:
    """The same samples evaluated in two different batches (same random draws): any change
    in their outputs comes from their batch-mates."""
    half = len(x) // 2
    with torch.no_grad():
        torch.manual_seed(0)
        alone = model(x[:half])
        torch.manual_seed(0)
        mixed = model(torch.cat([x[:half], x[half:].flip(0)]))[:half]
    diff = float((alone - mixed).abs().max()) if half else 0.0
    return {
        "diagnostic": "batch_independent",
        "diagnostic_value": diff,
        "diagnostic_pass": diff < 1e-4,
        "details": json.dumps(
            {"rule": "max |log-prob difference| of a sample across two batches < 1e-4", "n": half}
        ),
    }


def read_attack_rows(results_dir: str, dataset: str, attack_ids: tuple[str, ...]) -> list[dict[str, Any]]:
    """The ok rows of every attack trial the checks compare; an attack without them is an error,
    never a silently smaller comparison (the launcher holds a diagnostic back until its attacks
    are ok, so this fires only on a race)."""
    store = ResultStore(results_dir)
    rows, missing = [], []
    for trial_id in attack_ids:
        key = TrialKey("attack", dataset, trial_id)
        try:
            found = store.read(key)
        except FileNotFoundError:
            found = []
        if not found or any(r.get("status") != "ok" for r in found):
            missing.append(trial_id)
        rows.extend(found)
    if missing:
        raise FileNotFoundError(
            f"attack trials without ok rows: {', '.join(missing)}: the diagnostic waits for them"
        )
    return join_shards(rows)


def join_shards(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per attack setting: its shards' rows with their counts added and the ASR over
    all their points (the checks compare attacks, never shards)."""
    joined: dict[tuple[Any, ...], dict[str, Any]] = {}
    for row in sorted(rows, key=lambda r: r.get("shard") or 0):
        key = (row["attack"], row.get("attack_preset"), row.get("attack_params"))
        if key not in joined:
            joined[key] = dict(row)
            continue
        into = joined[key]
        for column in ("n_points", "n_attacked", "n_success"):
            into[column] = (into.get(column) or 0) + (row.get(column) or 0)
        into["asr"] = into["n_success"] / into["n_attacked"] if into["n_attacked"] else float("nan")
    return list(joined.values())
