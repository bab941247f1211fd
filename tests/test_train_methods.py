"""Training methods per model entry (issue 27): standard, PGD-AT (Madry et al.) and TRADES
(Zhang et al.), their settings, ids, variants and rows."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from qshield_dist.config import ConfigError, ModelSpec, SweepConfig, TrainConfig, validate
from qshield_dist.data import DATASETS
from qshield_dist.grid import build_grid
from qshield_dist.models import build_model
from qshield_dist.train import train_model
from qshield_dist.train_methods import trades_example, trades_loss

DIGITS = DATASETS["digits"]
EPS = 32 / 255
# A few steps of cnn_small on digits: enough for the methods to differ, cheap enough for CI.
TINY = {"epochs": 1, "batch_size": 32, "max_steps": 4}


def _train(digits, method: str = "standard", seed: int = 0, **params) -> torch.nn.Module:
    train, _ = digits
    torch.manual_seed(seed)  # as trial.train_or_load: the trial's seed, before the model is built
    model = build_model(ModelSpec(model="cnn_small"), DIGITS)
    cfg = TrainConfig(**TINY, method=method, **params).resolved(DIGITS.paper_eps)
    train_model(model, train.x, train.y, cfg, seed=seed)
    return model


def _same(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    return all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values()))


@pytest.fixture(scope="module")
def standard(digits):
    return _train(digits)


@pytest.mark.parametrize("method", ["pgd_at", "trades"])
def test_robust_methods_train_other_weights_and_repeat_exactly(digits, standard, method):
    model = _train(digits, method, steps=3)
    assert not _same(model, standard)
    # same spec, same numbers: the adversarial examples are drawn from the trial's seed
    assert _same(model, _train(digits, method, steps=3))


def test_trades_at_beta_0_is_standard_training(digits, standard):
    """The KL term weighs nothing: the same loss, so the same weights (cnn_small has no
    BatchNorm whose statistics the adversarial forward passes would move)."""
    assert _same(_train(digits, "trades", beta=0.0, steps=2), standard)


def test_trades_inner_maximisation_stays_in_budget_and_raises_the_kl(digits, standard):
    _, test = digits
    x = test.x[:32]
    cfg = TrainConfig(method="trades", steps=5).resolved(EPS)
    torch.manual_seed(0)
    adv = trades_example(standard, x, cfg)
    assert float((adv - x).abs().max()) <= EPS + 1e-6
    assert float(adv.min()) >= 0.0 and float(adv.max()) <= 1.0
    standard.eval()
    with torch.no_grad():
        clean = standard(x)

        def kl(z: torch.Tensor) -> float:
            return float(F.kl_div(standard(z), clean.exp(), reduction="sum"))

        start = (x + 0.001 * torch.randn_like(x)).clamp(0, 1)
        assert kl(adv) > 10 * max(kl(start), 1e-6)
    # loss = CE(clean) + beta * KL / batch: at beta 0 exactly the clean NLL
    y = test.y[:32]
    assert torch.equal(trades_loss(standard, x, y, adv, 0.0), F.nll_loss(standard(x), y))
    with torch.no_grad():
        assert float(trades_loss(standard, x, y, adv, 6.0)) > float(F.nll_loss(standard(x), y))


def test_pgd_at_goes_through_a_detached_hybrids_twin(digits):
    """A detached quantum branch hides the input gradient: the training attack takes the
    twin's (BPDA), so its examples move as they do on the full-gradient model."""
    from qshield_dist.train_methods import gradient_view, pgd_attack

    _, test = digits
    spec = ModelSpec(model="hqcnn", backbone="cnn_small", quantum_grad="detached").resolved(DIGITS.classes)
    torch.manual_seed(0)
    model = build_model(spec, DIGITS).eval()
    assert type(gradient_view(model)).__name__ == "BPDA"
    cfg = TrainConfig(method="pgd_at", steps=2).resolved(EPS)
    x, y = test.x[:4], test.y[:4]
    torch.manual_seed(0)
    adv = pgd_attack(model, cfg)(x, y)
    full = copy.copy(model)
    full.quantum_grad = "full"
    torch.manual_seed(0)
    assert torch.equal(adv, pgd_attack(full, cfg)(x, y))


class _Rounded(torch.nn.Module):
    """A custom model whose own input gradient is zero (it rounds its input): only its twin's
    gradient (the same net without the rounding) moves an attack."""

    def __init__(self) -> None:
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(torch.round(x * 4) / 4)


def test_pgd_at_goes_through_a_custom_models_named_twin():
    """A custom entry that names a differentiable twin declares its own gradient is not the one
    to follow: robust training crafts through the twin (BPDA), as the BPDA attacks do, and the
    train trial's id says so (its robust training computed other weights before 2026-12-04)."""
    from qshield_dist.attacks.streams import PGD
    from qshield_dist.models.custom import CustomClassifier, CustomClassifierWithTwin
    from qshield_dist.train_methods import gradient_view, pgd_attack

    torch.manual_seed(0)
    net = _Rounded()
    model = CustomClassifierWithTwin(net, stochastic=False, twin=lambda m: m.net).eval()
    assert type(gradient_view(model)).__name__ == "BPDA"
    plain = CustomClassifier(net, stochastic=False)
    assert gradient_view(plain) is plain  # no twin named: its own gradient
    x = torch.rand(4, 1, 8, 8) * 0.5 + 0.25
    y = torch.arange(4)
    cfg = TrainConfig(method="pgd_at", steps=3).resolved(EPS)
    torch.manual_seed(1)
    through_twin = pgd_attack(model, cfg)(x, y)
    torch.manual_seed(1)
    own = PGD(model, eps=cfg.eps, alpha=cfg.step_size, steps=cfg.steps, random_start=True)(x, y)
    # the model's own gradient is zero: its PGD stays at the random start; the twin's moves on
    assert not torch.equal(through_twin, own)
    with torch.no_grad():
        assert F.nll_loss(model(through_twin), y) > F.nll_loss(model(own), y)
    # the id: robust training of a custom model with a twin is marked, standard training is not
    from qshield_dist.config import CustomSpec
    from qshield_dist.grid import TrainTrial

    for twin, method, crafted in (
        ("torch.nn:Identity", "standard", None),
        ("torch.nn:Identity", "pgd_at", "twin"),
        ("torch.nn:Identity", "trades", "twin"),
        (None, "pgd_at", None),
    ):
        spec = ModelSpec(
            model="custom", custom=CustomSpec(factory="torch.nn:Identity", differentiable_twin=twin)
        )
        trial = TrainTrial("digits", spec, TrainConfig(method=method).resolved(EPS), 0, None, None)
        assert trial.identity().get("crafted") == crafted, (twin, method)


SWEEP = {
    "name": "methods",
    "data": {"dataset": "digits"},
    "train": {"epochs": 1},
    "models": [
        {"model": "cnn_small"},
        {"model": "cnn_small", "name": "cnn_pgd", "train": {"method": "pgd_at", "steps": 5}},
        {"model": "cnn_small", "name": "cnn_trades", "train": {"method": "trades", "beta": 1.0}},
        {"model": "hqcnn", "backbone": "cnn_small", "name": "hq_pgd", "train": {"method": "pgd_at"}},
    ],
}


def test_methods_per_entry_make_their_own_trials():
    grid = build_grid(validate(SweepConfig(**SWEEP)))
    by_method: dict[str, list] = {}
    for t in grid.train:
        by_method.setdefault(t.train.method, []).append(t)
    assert len({t.trial_id for t in grid.train}) == len(grid.train)
    (plain,) = by_method["standard"]
    pgd = [t for t in by_method["pgd_at"] if t.model.model == "cnn_small"]
    # the PGD-AT hybrid's baseline is its backbone trained its way: the PGD-AT cnn_small of
    # the default budget (dataset eps, 10 steps), not the 5-step one nor the plain one
    hybrid = next(t for t in grid.train if t.model.model == "hqcnn")
    assert hybrid.baseline_id in {t.trial_id for t in pgd} and hybrid.baseline_id != plain.trial_id
    assert {t.train.steps for t in pgd} == {5, 10}
    assert all(t.train.eps == DIGITS.paper_eps for t in pgd)
    assert "method" not in plain.identity()["train"]  # standard ids hash no method
    assert by_method["trades"][0].identity()["train"]["beta"] == 1.0
    # the sweep's epochs are the entries' too
    assert {t.train.epochs for t in grid.train} == {1}


def test_explicit_default_budget_is_the_same_id():
    spelled = copy.deepcopy(SWEEP)
    spelled["models"][1]["train"].update(eps=DIGITS.paper_eps, step_size=2.5 * DIGITS.paper_eps / 5)
    ids = {t.trial_id for t in build_grid(validate(SweepConfig(**SWEEP))).train}
    assert {t.trial_id for t in build_grid(validate(SweepConfig(**spelled))).train} == ids


@pytest.mark.parametrize(
    "train, expected",
    [
        ({"method": "madry"}, "models[1].train.method: got 'madry'"),
        ({"method": "pgd_at", "eps": 2}, "models[1].train.eps: got 2"),
        ({"method": "pgd_at", "steps": 0}, "models[1].train.steps: got 0"),
        ({"method": "pgd_at", "beta": 1.0}, "'beta' applies only to method trades (method is 'pgd_at')"),
        ({"eps": 0.1}, "'eps' applies only to method pgd_at or trades (method is 'standard')"),
        ({"epoch": 1}, "models[1].train.epoch: unknown key"),
        ([1], "models[1].train: got [1]: must be a mapping"),
    ],
)
def test_bad_train_settings_name_the_entry_key_and_value(train, expected):
    cfg = copy.deepcopy(SWEEP)
    cfg["models"][1]["train"] = train
    with pytest.raises(ConfigError, match=None) as err:
        validate(SweepConfig(**cfg))
    assert expected in str(err.value)


def test_entry_names_are_unique():
    cfg = copy.deepcopy(SWEEP)
    cfg["models"][2]["name"] = "cnn_pgd"
    with pytest.raises(ConfigError, match=r"models\[2\].name: got 'cnn_pgd': models\[1\] has that name"):
        validate(SweepConfig(**cfg))


def test_an_entry_of_another_method_inherits_none_of_the_sweeps_method_parameters():
    cfg = copy.deepcopy(SWEEP)
    cfg["train"] = {"epochs": 1, "method": "trades", "beta": 2.0}
    cfg["models"] = [{"model": "cnn_small", "train": {"method": "pgd_at"}}, {"model": "cnn_small"}]
    trains = validate(SweepConfig(**cfg)).trains
    assert [(t.method, t.beta) for t in trains] == [("pgd_at", 6.0), ("trades", 2.0)]


COMPARED = {
    "name": "compared",
    "data": {"dataset": "digits", "train_size": 120, "test_size": 40},
    "train": {"epochs": 1, "batch_size": 40, "max_steps": 3},
    "eval": {"attack_size": 12},
    "models": [
        {"model": "cnn_small", "name": "plain"},
        {"model": "cnn_small", "name": "pgd", "train": {"method": "pgd_at", "steps": 2}},
        {"model": "cnn_small", "name": "trades", "train": {"method": "trades", "steps": 2}},
    ],
    "attacks": [{"name": "fgsm"}],
    "compare": [{"models": ["pgd", "trades"], "against": "plain"}],
}


def test_compare_names_the_verdicts_and_rows_keep_methods_apart(tmp_path):
    from qshield_dist.summary.report import Options, summarize
    from qshield_dist.summary.sections_verdicts import NAMED_TABLE
    from qshield_dist.sweep import manifest_trials
    from qshield_dist.trial import RunContext, run_trial

    cfg = SweepConfig(**COMPARED)
    grid = build_grid(validate(cfg))
    # in this process, as the launcher's local executor would (its manifest holds the spec)
    ctx = RunContext(
        sweep=cfg.name, results_dir=str(tmp_path / "results"), checkpoint_dir=str(tmp_path / "ckpt")
    )
    ctx.store.write_manifest({"sweep": cfg.name, "spec": cfg.model_dump()}, manifest_trials(grid))
    assert [run_trial(t, ctx) for t in grid.trials] == ["ok"] * 6
    s = summarize(
        tmp_path / "results", tmp_path / "report", Options(plots=False, formats=("md",), proxies={})
    )
    labels = dict(zip(s.tables.variants["vkey"], s.tables.variants["label"]))
    assert sorted(labels.values()) == ["cnn_small", "cnn_small [pgd_at]", "cnn_small [trades]"]
    v = s.tables.verdicts
    assert sorted(zip(v["label"], v["baseline"])) == [
        ("cnn_small [pgd_at]", "cnn_small"),
        ("cnn_small [trades]", "cnn_small"),
    ]
    assert set(s.tables.paired["kind"]) == {"named in compare:"}
    (table,) = [t for sec in s.sections for t in sec.tables if t.title == NAMED_TABLE]
    seconds = [dict(zip(table.headers, r))["training s"] for r in table.rows]
    assert all(a != "-" and b != "-" for a, b in (cell.split(" vs ") for cell in seconds))
    train = s.tables.clean.join(s.tables.variants, on="vkey")
    assert train["train_seconds"].min() > 0


def test_compare_with_an_unknown_name_exits_before_compute():
    cfg = copy.deepcopy(COMPARED)
    cfg["compare"] = [{"models": "pgd", "against": ["plain", "madry"]}]
    with pytest.raises(
        ConfigError,
        match=r"compare\[0\].against: got 'madry': no model entry has that name; allowed: pgd, plain, trades",
    ):
        validate(SweepConfig(**cfg))


def test_the_cnn_baseline_is_the_plainly_trained_one():
    """A PGD-AT CNN listed first must not become "the CNN" every hybrid is judged against."""
    import polars as pl

    from qshield_dist.summary.verdicts import pick_baselines

    variants = pl.DataFrame(
        {
            "vkey": ["pgd", "plain", "hybrid"],
            "dataset": ["digits"] * 3,
            "model": ["cnn_small", "cnn_small", "hqcnn"],
            "train_method": ["pgd_at", "standard", "standard"],
            "train_config": ['{"method":"pgd_at"}', "{}", "{}"],
            "control": [None, None, None],
        },
        schema_overrides={"control": pl.String},
    )
    assert pick_baselines(variants)[0] == {"digits": "plain"}
