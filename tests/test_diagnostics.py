"""Each gradient-masking flag passes on an honest model and is raised on a deliberately masked
toy; the eps sweep reaches ASR 1 on every model family; controls and verdicts end to end."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn as nn
import yaml

from qshield_dist import diagnostics, launch
from qshield_dist.summary.verdicts import _GAIN_TEXT
from qshield_dist.train import predict


def _correct(model, digits, n=48):
    _, test = digits
    torch.manual_seed(0)
    ok = torch.stack([predict(model, test.x) == test.y for _ in range(3)]).float().mean(0) > 0.5
    return test.x[ok][:n], test.y[ok][:n]


class GradientBlocked(nn.Module):
    """Same predictions as `inner`, zero input gradient: the crudest masking."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return self.inner(x.detach()) + 0.0 * x.sum(dim=(1, 2, 3)).unsqueeze(1)


class NoisyInput(nn.Module):
    """Randomised defence: noisy input, so gradients change from call to call."""

    stochastic = True

    def __init__(self, inner: nn.Module, sigma: float = 0.5):
        super().__init__()
        self.inner, self.sigma = inner, sigma

    def forward(self, x):
        return self.inner(x + self.sigma * torch.randn_like(x))


class BatchCentred(nn.Module):
    """Output depends on batch-mates (like the paper's batch PCA / top-variance)."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return self.inner(x - x.mean(0, keepdim=True) + 0.5)


class Constant(nn.Module):
    """Always class 0: no attack can change it, whatever eps."""

    def __init__(self):
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(10))

    def forward(self, x):
        logits = torch.full((len(x), 10), -5.0) + self.bias
        logits[:, 0] = 5.0
        return torch.log_softmax(logits + 0.0 * x.flatten(1).sum(1, keepdim=True), dim=1)


class Disagreeing(nn.Module):
    """Claims a differentiable twin whose gradient points the other way."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return self.inner(x)

    def differentiable_twin(self):
        inner = self.inner
        return lambda x: inner(-x)


def _flag(rows, name):
    return next(r for r in rows if r["diagnostic"] == name)


def test_gradient_flags_pass_on_honest_cnn_and_fail_on_masked_toys(baseline, digits):
    cnn = baseline
    x, y = _correct(cnn, digits)
    assert _flag(diagnostics.gradient_checks(cnn, x, y), "gradient_nonzero_and_stable")["diagnostic_pass"]
    blocked = _flag(diagnostics.gradient_checks(GradientBlocked(cnn), x, y), "gradient_nonzero_and_stable")
    assert not blocked["diagnostic_pass"] and blocked["diagnostic_value"] == 0.0
    noisy = _flag(diagnostics.gradient_checks(NoisyInput(cnn), x, y), "gradient_nonzero_and_stable")
    assert not noisy["diagnostic_pass"] and json.loads(noisy["details"])["relative_spread"] > 0.1
    twin = _flag(diagnostics.gradient_checks(Disagreeing(cnn), x, y), "gradient_matches_differentiable_twin")
    assert not twin["diagnostic_pass"]


def test_batch_dependence_flag(baseline, digits):
    cnn = baseline
    _, test = digits
    assert diagnostics.batch_dependence(cnn, test.x[:64])["diagnostic_pass"]
    assert not diagnostics.batch_dependence(BatchCentred(cnn), test.x[:64])["diagnostic_pass"]


def test_eps_sweep_flag_is_raised_on_a_model_no_attack_can_move(digits):
    _, test = digits
    zeros = test.y == 0
    row = diagnostics.eps_sweep(
        Constant(),
        test.x[zeros][:16],
        test.y[zeros][:16],
        10,
        stochastic=False,
        repeats=1,
        eps_values=(0.5,),
        steps=10,
    )
    assert row["diagnostic_value"] == 0.0 and not row["diagnostic_pass"]


@pytest.mark.parametrize("kind", ["cnn_small", "hqcnn_sound", "hqcnn_paper"])
def test_eps_sweep_reaches_asr_1_at_half_on_every_model(baseline, trained_hqcnn, digits, kind):
    """The paper-mode hybrid is attacked through BPDA: with its own (detached) gradient one
    digit sat on the decision boundary, misclassified in about half of the random projections
    (31/32 at eps 0.5), which is the masking the other diagnostics flag."""
    if kind == "cnn_small":
        model = baseline
    elif kind == "hqcnn_sound":
        model = trained_hqcnn(quantum_grad="full", projection="learned")
    else:
        model = trained_hqcnn(quantum_grad="detached", projection="paper")
    stochastic = bool(getattr(model, "stochastic", False))
    assert stochastic == (kind == "hqcnn_paper")
    x, y = _correct(model, digits, n=32)
    row = diagnostics.eps_sweep(
        model, x, y, 10, stochastic, repeats=3 if stochastic else 1, eps_values=(0.1, 0.5), steps=25
    )
    details = json.loads(row["details"])
    assert details["gradient"] == ("bpda" if kind == "hqcnn_paper" else "model")
    assert row["diagnostic_pass"], details["asr_by_eps"]
    assert row["diagnostic_value"] >= 0.99


def _attack_row(attack, asr, n=200, **params):
    from qshield_dist.attack_params import ATTACKS

    preset = params.pop("preset", "paper")
    p = ATTACKS[attack].params("mnist", preset, overrides=params)
    return {
        "status": "ok",
        "dataset": "mnist",
        "attack": attack,
        "attack_preset": preset,
        "asr": asr,
        "n_attacked": n,
        "threat_model": ATTACKS[attack].threat_model,
        "attack_params": json.dumps(p),
    }


def test_attack_comparison_flags_pass_and_fail():
    honest = [
        _attack_row("fgsm", 0.4),
        _attack_row("apgd", 0.9),
        _attack_row("pgd", 0.9, alpha=0.05),
        _attack_row("square", 0.5),
        _attack_row("eot_pgd", 0.9, alpha=0.05),
    ]
    checks = {r["diagnostic"]: r["diagnostic_pass"] for r in diagnostics.compare_attacks(honest)}
    assert checks == {
        "iterative_ge_single_step": True,
        "whitebox_ge_blackbox": True,
        "adaptive_vs_paper_suite": True,
        "attack_budget_reachable": True,
    }

    masked = [
        _attack_row("fgsm", 0.5),
        _attack_row("pgd", 0.2),
        _attack_row("square", 0.6),
        _attack_row("bpda_pgd", 0.9),
    ]
    checks = {r["diagnostic"]: r["diagnostic_pass"] for r in diagnostics.compare_attacks(masked)}
    # bpda_pgd (white-box, adaptive) keeps white >= black; the others are raised
    assert checks["adaptive_vs_paper_suite"] is False
    assert checks["attack_budget_reachable"] is False  # paper PGD: 10 x 2/255 < 32/255
    only_paper = [_attack_row("fgsm", 0.5), _attack_row("pgd", 0.2), _attack_row("square", 0.6)]
    checks = {r["diagnostic"]: r["diagnostic_pass"] for r in diagnostics.compare_attacks(only_paper)}
    assert checks["iterative_ge_single_step"] is False and checks["whitebox_ge_blackbox"] is False
    assert checks["adaptive_vs_paper_suite"] is None  # not run: says so instead of passing
    # A standard-preset PGD is not the paper's suite: it counts on the adaptive side only.
    mixed = [
        _attack_row("pgd", 0.2),
        _attack_row("pgd", 0.6, preset="standard"),
        _attack_row("eot_pgd", 0.6, preset="standard"),
    ]
    gap = next(r for r in diagnostics.compare_attacks(mixed) if r["diagnostic"] == "adaptive_vs_paper_suite")
    assert gap["diagnostic_pass"] is False and gap["diagnostic_value"] == pytest.approx(0.4)
    # Nor is a paper-preset attack whose parameters were overridden (APGD with 50 steps).
    longer = [
        _attack_row("fgsm", 0.2),
        _attack_row("apgd", 0.6, steps=50),
        _attack_row("eot_pgd", 0.6, preset="standard"),
    ]
    gap = next(r for r in diagnostics.compare_attacks(longer) if r["diagnostic"] == "adaptive_vs_paper_suite")
    assert gap["diagnostic_pass"] is False and gap["diagnostic_value"] == pytest.approx(0.4)


def test_controls_and_diagnostics_end_to_end(tmp_path, monkeypatch):
    """A tiny adaptive sweep: every HQCNN gets its backbone-alone control and diagnostics, and
    the summary's control table names where the gain comes from."""
    from qshield_dist.summary.cli import main as summarize

    monkeypatch.chdir(tmp_path)
    sweep = {
        "name": "adaptive_tiny",
        "data": {"dataset": "digits", "train_size": 400, "test_size": 100},
        "train": {"epochs": 4},
        "eval": {
            "attack_size": 24,
            "eval_repeats": 3,
            "controls": ["backbone_only"],
            "diagnostics": True,
            "diagnostic_size": 8,
        },
        "models": [
            {"model": "cnn_small"},
            {"model": "hqcnn", "backbone": "cnn_small", "quantum_grad": "detached", "projection": "paper"},
        ],
        "attacks": [
            {"name": "fgsm"},
            {"name": "pgd", "preset": "standard", "params": {"steps": 5}},
            {"name": "bpda_pgd", "preset": "standard", "params": {"steps": 5}},
        ],
    }
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(sweep))
    assert launch.main(["s.yaml"]) == 0
    import polars as pl

    rows = pl.read_parquet(
        str(tmp_path / "results/adaptive_tiny/stage=attack/*/*/*.parquet"), hive_partitioning=False
    )
    assert sorted(rows.filter(pl.col("control") == "backbone_only")["attack"].to_list()) == ["fgsm", "pgd"]
    diag = pl.read_parquet(
        str(tmp_path / "results/adaptive_tiny/stage=diagnostic/*/*/*.parquet"), hive_partitioning=False
    )
    assert set(diag["model"]) == {"cnn_small", "hqcnn"}
    assert {"eps_sweep_reaches_1", "gradient_nonzero_and_stable", "batch_independent"} <= set(
        diag["diagnostic"]
    )
    assert summarize(["results/adaptive_tiny", "--out", "report", "--no-plots", "--format", "md,csv"]) == 0
    controls = pl.read_csv(next((tmp_path / "report").glob("controls.csv")))
    assert controls.height >= 2
    report = (tmp_path / "report" / "report.md").read_text()
    # The controls section's own table, a row per control row: the no-controls message names
    # the controls too, so finding the words would not show that the section worked.
    section = report.split("## Controls: where does the gain come from?")[1].split("\n## ")[0]
    assert "### Hybrid vs its backbone alone, per attack" in section
    lines = [line for line in section.splitlines() if line.startswith("| digits |")]
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in lines]
    # attack, ASR of the backbone alone (%)
    want = controls.select("attack_label", "asr_backbone_only").iter_rows()
    assert [[r[2], r[4]] for r in rows] == [[a, f"{100 * b:.2f}"] for a, b in want]
    # where the gain comes from, from the paired intervals: one sentence per hybrid with its parts
    (sentence,) = [line for line in section.splitlines() if line.startswith("- **hqcnn")]
    assert any(text in sentence for text in _GAIN_TEXT.values())
    assert "quantum part: " in sentence and "backbone part: " in sentence


def test_a_diagnostic_waits_for_the_attacks_only_when_a_check_reads_their_rows():
    """restart_sensitivity attacks the model itself: it runs beside the attacks, not after them."""
    from qshield_dist.config import SweepConfig, validate
    from qshield_dist.grid import build_grid

    def diagnostic(checks):
        sweep = {
            "name": "d",
            "eval": {"diagnostics": checks},
            "models": [{"model": "cnn_small"}],
            "attacks": [{"name": "fgsm"}, {"name": "pgd"}],
        }
        grid = build_grid(validate(SweepConfig(**sweep)))
        return grid.diagnostic, {a.trial_id for a in grid.attack}

    (alone,), attacks = diagnostic(["restart_sensitivity"])
    assert alone.deps == (alone.train.trial_id,) and alone.checks == ("restart_sensitivity",)
    # with a check on the attack rows beside it: that check is a trial of its own, after the
    # attacks; restart_sensitivity still runs beside them
    (model, reading), attacks = diagnostic(["restart_sensitivity", "iterative_ge_single_step"])
    assert model.deps == (model.train.trial_id,) and model.checks == ("restart_sensitivity",)
    assert set(reading.deps) == {reading.train.trial_id, *attacks}
    assert reading.checks == ("iterative_ge_single_step",)


def test_restart_sensitivity_takes_at_most_a_fixed_number_of_points_of_the_permutation():
    """With `attack_size: all` and no shards, the first shard is the whole pool: the check (K
    full APGD runs) is capped at RESTART_POINTS, and is then the trial of a 256-point attack set."""
    from qshield_dist.config import RESTART_POINTS, EvalConfig, SweepConfig, validate
    from qshield_dist.grid import build_grid

    def restart(eval_cfg):
        sweep = {
            "name": "r",
            "eval": {**eval_cfg, "diagnostics": ["restart_sensitivity"]},
            "models": [{"model": "cnn_small"}],
            "attacks": [{"name": "fgsm"}],
        }
        (trial,) = build_grid(validate(SweepConfig(**sweep))).diagnostic
        return trial

    assert EvalConfig(attack_size="all").restart_points("digits") == RESTART_POINTS == 256 < 360
    assert EvalConfig(attack_size="all", shard_size=32).restart_points("digits") == 32
    assert EvalConfig(attack_size=96).restart_points("digits") == 96
    every = restart({"attack_size": "all"})
    assert every.identity()["restart_points"] == RESTART_POINTS
    assert every.trial_id == restart({"attack_size": RESTART_POINTS}).trial_id
    assert every.trial_id != restart({"attack_size": 128}).trial_id
