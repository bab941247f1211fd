"""Every attack respects its budget; CallCounter counts what the attack asked of the model."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torchattacks

from qshield_dist.attacks import ATTACKS, CallCounter, CWBinarySearch, build_attack
from qshield_dist.config import TrainConfig
from qshield_dist.data import load
from qshield_dist.models.classic import Classifier, cnn_small
from qshield_dist.train import predict, train_model


@pytest.fixture(scope="module")
def trained():
    torch.manual_seed(0)
    train, test = load("digits", train_size=600, test_size=200)
    model = Classifier(cnn_small(1, 28, 10))
    train_model(model, train.x, train.y, TrainConfig(epochs=3), seed=0)
    correct = predict(model, test.x) == test.y
    return model, test.x[correct][:24], test.y[correct][:24]


LINF = ["fgsm", "pgd", "apgd", "vmifgsm", "square", "autoattack", "eot_pgd"]


@pytest.mark.parametrize("name", LINF)
def test_linf_attacks_stay_within_eps_and_pixel_range(trained, name):
    model, x, y = trained
    # autoattack: its 10-step smoke version here (the authors' 100 steps took minutes on 2 cores;
    # tests/test_stochastic_attacks.py checks that strength's parameters)
    extra = {"square": {"n_queries": 50}, "autoattack": {"version": "fast"}}.get(name, {})
    params = ATTACKS[name].params("digits", overrides={"eps": 0.1} | extra)
    if name == "eot_pgd":
        params["eot_iter"] = 2
    torch.manual_seed(0)
    adv = build_attack(name, CallCounter(model), params, 10)(x, y).detach()
    assert float((adv - x).abs().max()) <= 0.1 + 1e-6
    assert float(adv.min()) >= 0.0 and float(adv.max()) <= 1.0
    assert not torch.equal(adv, x)


SAME_AS_TORCHATTACKS = {
    "square": (torchattacks.Square, {"norm": "Linf"}, {"n_queries": 50}),
    "deepfool": (torchattacks.DeepFool, {}, {"steps": 10}),
    "onepixel": (torchattacks.OnePixel, {}, {"steps": 3, "popsize": 5}),
}


@pytest.mark.parametrize("name", list(SAME_AS_TORCHATTACKS))
def test_a_deterministic_model_gets_torchattacks_own_attack(trained, name):
    """The stochastic-complete classes change nothing on a deterministic model: the same
    adversarial images, bit for bit, from the same calls."""
    model, x, y = trained
    cls, fixed, overrides = SAME_AS_TORCHATTACKS[name]
    params = ATTACKS[name].params("digits", overrides=overrides)
    outs = []
    for make in (
        lambda m: build_attack(name, m, params, 10, eval_repeats=5),
        lambda m: cls(m, **fixed, **params),
    ):
        counter = CallCounter(model)
        torch.manual_seed(0)
        np.random.seed(0)  # One-Pixel's differential evolution draws from NumPy
        adv = make(counter)(x[:8], y[:8])
        outs.append((adv, (counter.forward_calls, counter.backward_calls, counter.forward_samples)))
    assert torch.equal(outs[0][0], outs[1][0]) and outs[0][1] == outs[1][1]


def test_pgd_is_counted_call_by_call(trained):
    model, x, y = trained
    counter = CallCounter(model)
    params = ATTACKS["pgd"].params("digits", overrides={"steps": 7})
    build_attack("pgd", counter, params, 10)(x, y)
    assert (counter.forward_calls, counter.backward_calls) == (7, 7)
    assert (counter.forward_samples, counter.backward_samples) == (7 * len(x), 7 * len(x))


def test_onepixel_changes_at_most_its_pixel_budget(trained):
    model, x, y = trained
    params = ATTACKS["onepixel"].params("digits", overrides={"steps": 3, "popsize": 5})
    adv = build_attack("onepixel", CallCounter(model), params, 10)(x[:8], y[:8]).detach()
    changed = (adv != x[:8]).any(dim=1).flatten(1).sum(dim=1)
    assert int(changed.max()) <= params["pixels"]


@pytest.mark.parametrize("name", ["cw", "deepfool"])
def test_l2_attacks_stay_in_pixel_range(trained, name):
    model, x, y = trained
    params = ATTACKS[name].params(
        "digits", overrides={"steps": 10} if name == "deepfool" else {"binary_search_steps": 3}
    )
    adv = build_attack(name, CallCounter(model), params, 10)(x[:8], y[:8]).detach()
    assert float(adv.min()) >= 0.0 and float(adv.max()) <= 1.0
    assert torch.isfinite((adv - x[:8]).flatten(1).norm(dim=1)).all()


def test_cw_margin_works_on_log_probabilities(trained):
    """torchattacks' margin is 0 for all-negative outputs; ours must find examples."""
    model, x, y = trained
    attack = CWBinarySearch(CallCounter(model), c=1.0, kappa=0.0, steps=30, lr=0.05, binary_search_steps=4)
    adv = attack(x, y)
    fooled = (predict(model, adv) != y).float().mean()
    assert float(fooled) > 0.5


def test_standard_preset_reaches_eps():
    paper = ATTACKS["pgd"].params("mnist", "paper")
    standard = ATTACKS["pgd"].params("mnist", "standard")
    assert paper["alpha"] * paper["steps"] < paper["eps"]  # the paper's budget cannot reach eps
    assert standard["alpha"] == pytest.approx(2.5 * standard["eps"] / standard["steps"])
    assert ATTACKS["pgd"].params("mnist", "standard", {"steps": 40})["alpha"] == pytest.approx(
        2.5 * 32 / 255 / 40
    )


def test_an_attack_leaves_an_eval_mode_model_in_eval_mode(trained):
    model, x, y = trained
    model.eval()
    build_attack("fgsm", CallCounter(model), ATTACKS["fgsm"].params("digits"), 10)(x, y)
    assert not any(m.training for m in model.modules())


class NoisyLinear(torch.nn.Module):
    """A randomized model: a fixed linear classifier plus large logit noise on every call, so a
    single forward pass misclassifies many clean samples by chance."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.linear = torch.nn.Linear(16, 10)

    def forward(self, x):
        logits = self.linear(x.flatten(1)) + 3.0 * torch.randn(len(x), 10)
        return torch.log_softmax(logits, dim=1)


def test_apgd_on_a_stochastic_model_attacks_every_sample():
    """torchattacks' APGD judges 'already fooled' from one random forward pass and returns such
    samples unperturbed; the stochastic variant attacks them all and keeps the highest-loss point."""
    model = NoisyLinear().eval()
    x, y = torch.rand(64, 1, 4, 4), torch.randint(0, 10, (64,))
    params = ATTACKS["apgd"].params("mnist", "standard", {"eps": 0.25, "steps": 20, "eot_iter": 5})
    assert (
        params["best_loss"] and not ATTACKS["apgd"].params("mnist")["best_loss"]
    )  # the paper's: torchattacks as is
    torch.manual_seed(1)
    adv = build_attack("apgd", CallCounter(model), params, 10, stochastic=True)(x, y)
    moved = (adv - x).flatten(1).abs().amax(dim=1)
    assert bool((moved > 0).all()) and float(moved.max()) <= 0.25 + 1e-6

    def expected_loss(inputs):
        with torch.no_grad():
            return torch.stack([torch.nn.functional.nll_loss(model(inputs), y) for _ in range(200)]).mean()

    assert (
        expected_loss(adv) > expected_loss(x) + 0.2
    )  # 200 draws x 64 samples: the noise of the mean is ~0.05


@pytest.mark.parametrize("name", sorted(ATTACKS))
def test_every_attack_config_is_json(trained, name):
    """The row records what ran as JSON: every attack's config must serialize (Square's `eta`
    is a method and once made AutoAttack's rows fail after their whole run)."""
    import json

    model, _, _ = trained
    twin = model if ATTACKS[name].needs_twin else None
    surrogate = CallCounter(model) if name == "transfer" else None
    for version in ["standard", "rand", "fast"] if "autoattack" in name else [None]:
        params = ATTACKS[name].params("digits", overrides={"version": version} if version else None)
        attack = build_attack(name, CallCounter(model), params, 10, twin=twin, surrogate=surrogate)
        assert json.loads(json.dumps(attack.attack_config))["attack"] == name
