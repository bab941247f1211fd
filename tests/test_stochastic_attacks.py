"""Attacks on a stochastic model: success by a strict majority of draws, never by one lucky draw.

A noisy toy model (a fixed linear classifier plus fresh logit noise on every call) stands in for
the paper-mode HQCNN: single draws often flip, so torchattacks' one-forward decisions go wrong.
For Square, DeepFool, One-Pixel and AutoAttack's sequence the same assertions run against our
class (must pass) and torchattacks' unwrapped class (must fail):

- every sample is attacked (none comes back unperturbed because one draw was wrong);
- no returned point that some draw saw fooled rests on fewer than `eval_repeats` draws;
- the expected loss (mean cross-entropy over many fresh draws) rises.

On a deterministic model our classes return what torchattacks' return, call for call.
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchattacks

from qshield_dist.attack_params import ATTACKS, completes_worst_case, needed_autoattack
from qshield_dist.attacks import (
    AutoAttack,
    CallCounter,
    StochasticDeepFool,
    StochasticMultiAttack,
    StochasticOnePixel,
    StochasticSquare,
    build_attack,
    draws,
)

REPEATS = 11  # eval_repeats of these tests: a clean point here is majority-wrong with p < 0.3%


class NoisyLinear(nn.Module):
    """Linear classifier on 4x4 images plus N(0, sigma^2) noise on every logit, every call."""

    def __init__(self, sigma: float = 1.0):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.linear = nn.Linear(16, 10)
        with torch.no_grad():
            self.linear.weight.copy_(2 * torch.randn(10, 16, generator=g))
            self.linear.bias.zero_()
        self.sigma = sigma
        self.stochastic = sigma > 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.linear(x.flatten(1))
        if self.sigma:
            logits = logits + self.sigma * torch.randn_like(logits)
        return F.log_softmax(logits, dim=1)


class Recorder(nn.Module):
    """Passes calls through, recording for every input row the classes its draws predicted."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.seen: dict[bytes, list[int]] = defaultdict(list)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.model(x)
        for row, pred in zip(x.detach().flatten(1).numpy(), out.argmax(1).tolist()):
            self.seen[row.tobytes()].append(pred)
        return out


@pytest.fixture(scope="module")
def points():
    """32 points each draw classifies correctly with probability 0.88 to 0.97 (by 400 draws)."""
    model = NoisyLinear().eval()
    x = torch.rand(2000, 1, 4, 4, generator=torch.Generator().manual_seed(1))
    torch.manual_seed(0)
    with torch.no_grad():
        y = model.linear(x.flatten(1)).argmax(1)
        p_wrong = torch.stack([model(x).argmax(1) != y for _ in range(400)]).float().mean(0)
    keep = ((p_wrong >= 0.03) & (p_wrong <= 0.12)).nonzero().flatten()[:32]
    return model, x[keep], y[keep]


def expected_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor, n: int = 200) -> float:
    with torch.no_grad():
        return float(torch.stack([F.nll_loss(model(x), y) for _ in range(n)]).mean())


def problems(make, model, x, y, min_gain: float = 0.1) -> list[str]:
    """What the attack `make(model)` builds gets wrong of the module docstring's three rules."""
    recorder = Recorder(model)
    torch.manual_seed(0)
    np.random.seed(0)
    adv = make(recorder)(x, y).detach()
    found = []
    unperturbed = int((adv == x).flatten(1).all(1).sum())
    if unperturbed:
        found.append(f"{unperturbed} samples returned unperturbed")
    for i in range(len(y)):
        preds = recorder.seen.get(adv[i].flatten().numpy().tobytes(), [])
        if any(p != int(y[i]) for p in preds) and len(preds) < REPEATS:
            found.append(f"sample {i} returned on {len(preds)} draws {preds}, label {int(y[i])}")
    gain = expected_loss(model, adv, y) - expected_loss(model, x, y)
    if gain <= min_gain:
        found.append(f"expected loss rose by {gain:.3f} only")
    return found


def same_as_torchattacks(ours, theirs, x: torch.Tensor, y: torch.Tensor) -> None:
    """On a deterministic model: the same adversarial images, the same calls."""
    outs = []
    for make in (ours, theirs):
        counter = CallCounter(NoisyLinear(sigma=0.0).eval())
        torch.manual_seed(0)
        np.random.seed(0)  # One-Pixel's differential evolution draws from NumPy
        adv = make(counter)(x, y).detach()
        outs.append((adv, (counter.forward_calls, counter.backward_calls, counter.forward_samples)))
    assert torch.equal(outs[0][0], outs[1][0])
    assert outs[0][1] == outs[1][1]


SQUARE = {
    "norm": "Linf",
    "eps": 0.15,
    "n_queries": 100,
    "n_restarts": 1,
    "p_init": 0.8,
    "loss": "margin",
    "seed": 0,
}
DEEPFOOL = {"steps": 50, "overshoot": 0.05}
ONEPIXEL = {"pixels": 1, "steps": 10, "popsize": 10}
ATTACK_CASES = {
    "square": (StochasticSquare, torchattacks.Square, SQUARE),
    "deepfool": (StochasticDeepFool, torchattacks.DeepFool, DEEPFOOL),
    "onepixel": (StochasticOnePixel, torchattacks.OnePixel, ONEPIXEL),
}


@pytest.mark.parametrize("name", list(ATTACK_CASES))
def test_stochastic_complete(points, name):
    model, x, y = points
    ours, theirs, params = ATTACK_CASES[name]
    assert problems(lambda m: ours(m, stochastic=True, repeats=REPEATS, **params), model, x, y) == []
    # the same rules catch torchattacks' class, by one-draw decisions
    found = problems(lambda m: theirs(m, **params), model, x, y)
    assert any("unperturbed" in p or "draws" in p for p in found), found


@pytest.mark.parametrize("name", list(ATTACK_CASES))
def test_deterministic_path_is_torchattacks(points, name):
    _, x, y = points
    ours, theirs, params = ATTACK_CASES[name]
    same_as_torchattacks(lambda m: ours(m, **params), lambda m: theirs(m, **params), x[:16], y[:16])
    # built by the registry for a deterministic model (eval_repeats changes nothing there)
    registry = {k: v for k, v in params.items() if k != "norm"}
    same_as_torchattacks(
        lambda m: build_attack(name, m, registry, 10, eval_repeats=REPEATS),
        lambda m: theirs(m, **params),
        x[:16],
        y[:16],
    )


def test_autoattack_sequence_keeps_a_sample_in_play_until_the_majority_says_broken(points):
    """AutoAttack 'rand' (what 'auto' picks here) at a small eps, so that some samples survive."""
    model, x, y = points
    params = {"eps": 0.03, "version": "auto", "seed": 0}

    def ours(m):
        return build_attack("autoattack", m, params, 10, stochastic=True, eval_repeats=REPEATS)

    assert ours(model).attack_config["version"] == "rand"
    assert problems(ours, model, x, y, min_gain=0.05) == []
    # torchattacks' MultiAttack over the same components drops samples after one draw
    found = problems(lambda m: torchattacks.MultiAttack(ours(m).components), model, x, y, min_gain=0.05)
    assert any("unperturbed" in p or "draws" in p for p in found), found


def test_autoattack_sequence_on_a_deterministic_model_is_torchattacks(points):
    _, x, y = points
    params = {"eps": 0.05, "version": "fast", "seed": 0}
    same_as_torchattacks(
        lambda m: build_attack("autoattack", m, params, 10),
        lambda m: torchattacks.MultiAttack(build_attack("autoattack", m, params, 10).components),
        x[:16],
        y[:16],
    )


def test_stochastic_multiattack_returns_the_best_point_for_a_sample_never_broken():
    """Two fixed 'attacks' against a model that is never fooled: the higher-loss point wins."""

    class Shift(torchattacks.attack.Attack):
        def __init__(self, model, by):
            super().__init__("Shift", model)
            self.by = by

        def forward(self, images, labels):
            return images + self.by

    class Noisy(nn.Module):
        stochastic = True

        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.ones(1))

        def forward(self, x):  # class 0 always wins; the others' logits fall with x
            logits = torch.stack([torch.full_like(x[:, 0], 5.0), -x[:, 0], -2 * x[:, 0]], 1)
            return F.log_softmax(logits + 0.1 * torch.randn_like(logits), 1)

    model = Noisy()
    x, y = torch.zeros(4, 1), torch.zeros(4, dtype=torch.long)
    multi = StochasticMultiAttack([Shift(model, -1.0), Shift(model, 1.0)], stochastic=True, repeats=5)
    adv = multi(x, y)
    assert torch.equal(adv, x - 1.0)  # x - 1 raises the other classes: the higher cross-entropy


# --- batched draws --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def paper_hybrid():
    from qshield_dist.config import ModelSpec
    from qshield_dist.datasets import DATASETS
    from qshield_dist.models import build_model

    info = DATASETS["digits"]
    torch.manual_seed(0)
    spec = ModelSpec(model="hqcnn", backbone="cnn_small", projection="paper", quantum_grad="detached")
    return build_model(spec.resolved(info.classes), info).eval()


def test_one_draw_is_the_forward_pass(paper_hybrid):
    x = torch.rand(6, 1, 28, 28)
    torch.manual_seed(1)
    one = paper_hybrid(x)
    torch.manual_seed(1)
    assert torch.equal(paper_hybrid.draws(x, 1)[0], one)
    torch.manual_seed(1)
    assert torch.equal(draws(paper_hybrid, x, 1)[0], one)


def test_batched_draws_are_independent_draws_of_the_projection(paper_hybrid):
    """k draws in one pass equal k forward calls on the same random stream (one matrix per draw,
    shared by its copy of the batch), not k copies of one draw."""
    x = torch.rand(6, 1, 28, 28)
    torch.manual_seed(2)
    batched = paper_hybrid.draws(x, 5)
    torch.manual_seed(2)
    looped = torch.stack([paper_hybrid(x) for _ in range(5)])
    assert batched.shape == (5, 6, 10)
    assert torch.allclose(batched, looped, atol=1e-4)
    assert float((batched[0] - batched[1]).detach().abs().max()) > 1e-2


def test_batched_draws_with_input_noise_differ_per_copy(paper_hybrid):
    import copy

    noisy = copy.copy(paper_hybrid)
    noisy.input_noise = 0.05
    with torch.no_grad():
        out = noisy.draws(torch.rand(3, 1, 28, 28), 4)
    assert out.shape == (4, 3, 10) and float((out[0] - out[1]).abs().max()) > 0


def test_call_counter_counts_every_draw(paper_hybrid):
    x = torch.rand(6, 1, 28, 28)
    counter = CallCounter(paper_hybrid)
    counter.draws(x.requires_grad_(), 5).sum().backward()
    assert (counter.forward_calls, counter.forward_samples) == (5, 30)
    assert (counter.backward_calls, counter.backward_samples) == (5, 30)
    looped = CallCounter(NoisyLinear())  # no draws method: k forward calls, counted the same
    assert draws(looped, torch.rand(3, 1, 4, 4), 4).shape == (4, 3, 10)
    assert (looped.forward_calls, looped.forward_samples) == (4, 12)


# --- AutoAttack's strength, EOT, the registry flags -----------------------------------------------

AUTHORS = {
    "standard": [
        {"name": "apgd-ce", "steps": 100, "n_restarts": 1, "eot_iter": 1, "rho": 0.75},
        {"name": "apgd-t", "steps": 100, "n_restarts": 1, "n_target_classes": 9, "eot_iter": 1, "rho": 0.75},
        {"name": "fab-t", "steps": 100, "n_restarts": 1, "n_target_classes": 9, "multi_targeted": True},
        {"name": "square", "n_queries": 5000, "n_restarts": 1, "p_init": 0.8, "rescale_schedule": False},
    ],
    "rand": [
        {"name": "apgd-ce", "steps": 100, "n_restarts": 1, "eot_iter": 20},
        {"name": "apgd-dlr", "steps": 100, "n_restarts": 1, "eot_iter": 20},
    ],
}


def mismatches(parts: list[torchattacks.attack.Attack], version: str) -> list[str]:
    from qshield_dist.attacks.autoattack import component_config

    got = [component_config(a) for a in parts]
    if [g["name"] for g in got] != [w["name"] for w in AUTHORS[version]]:
        return [f"components {[g['name'] for g in got]}"]
    pairs = zip(AUTHORS[version], got)
    return [
        f"{w['name']}.{k}: {g.get(k)!r} != {v!r}" for w, g in pairs for k, v in w.items() if g.get(k) != v
    ]


@pytest.mark.parametrize("version", ["standard", "rand"])
def test_autoattack_runs_at_its_authors_strength(version):
    stochastic = version == "rand"
    attack = AutoAttack(NoisyLinear(), 8 / 255, "auto", 10, stochastic=stochastic, repeats=5)
    assert attack.version == version and mismatches(attack.components, version) == []
    assert attack.suite_config()["components"][0]["steps"] == 100
    # torchattacks' own AutoAttack keeps its components at 10 steps: the check catches it
    theirs = torchattacks.AutoAttack(NoisyLinear(), eps=8 / 255, version=version, n_classes=10, seed=0)
    assert mismatches(theirs._autoattack.attacks, version) != []


def test_autoattack_caps_targets_and_names_fast_as_fast():
    few = AutoAttack(NoisyLinear(), 0.1, "standard", 4)
    assert [getattr(a, "n_target_classes", None) for a in few.components[1:3]] == [3, 3]
    fast = build_attack("autoattack", NoisyLinear(), {"eps": 0.1, "version": "fast", "seed": 0}, 10)
    assert fast.attack_config["version"] == "fast" and fast.components[0].steps == 10
    with pytest.raises(ValueError):
        AutoAttack(NoisyLinear(), 0.1, "plus", 10)


def test_eot_only_where_there_is_randomness(points):
    model, x, y = points
    for name in ("apgd", "eot_pgd", "bpda_apgd"):
        params = ATTACKS[name].params("mnist", "standard", {"eps": 0.1, "steps": 5, "eot_iter": 4})
        twin = {"twin": NoisyLinear(0.0)} if ATTACKS[name].needs_twin else {}
        counted = {}
        for stochastic in (False, True):
            counter = CallCounter(NoisyLinear(sigma=1.0 if stochastic else 0.0))
            attack = build_attack(name, counter, params, 10, stochastic=stochastic, eval_repeats=3, **twin)
            assert attack.eot_iter == attack.attack_config["eot"] == (4 if stochastic else 1)
            assert attack.attack_config["majority_repeats"] is None  # these make no success decision
            torch.manual_seed(0)
            attack(x[:8], y[:8])
            counted[stochastic] = counter.forward_calls
        assert params["eot_iter"] == 4  # the trial's params (its identity) are left alone
        assert counted[False] < counted[True]


def test_only_autoattack_at_its_authors_strength_completes_a_worst_case():
    """The one rule of attack_params: a worst case is final with AutoAttack at its authors'
    strength, in the form the model needs; APGD, even at 100 steps with EOT, is not enough."""

    def completes(name, stochastic=False, detached=False, **overrides):
        params = ATTACKS[name].params("mnist", "standard", overrides)
        return completes_worst_case(name, params, stochastic, detached)

    assert completes("autoattack") and completes("autoattack", stochastic=True)  # version auto
    assert completes("autoattack", version="standard") and not completes("autoattack", version="rand")
    assert completes("autoattack", True, version="rand") and not completes(
        "autoattack", True, version="standard"
    )
    assert not completes("autoattack", version="fast") and not completes("autoattack", True, version="fast")
    # a detached quantum branch needs AutoAttack through BPDA, and only there
    assert not completes("autoattack", detached=True) and completes("bpda_autoattack", detached=True)
    assert not completes("bpda_autoattack") and completes("bpda_autoattack", True, True)
    for name in ("apgd", "bpda_apgd", "eot_pgd", "pgd", "square", "transfer", "fgsm"):
        assert (
            not completes(name, steps=100)
            if "steps" in ATTACKS[name].defaults("mnist")
            else not completes(name)
        )
    assert needed_autoattack(False, False) == "autoattack (standard)"
    assert needed_autoattack(True, True) == "bpda_autoattack (rand)"
    assert {n for n, a in ATTACKS.items() if a.needs_twin} == {"bpda_pgd", "bpda_apgd", "bpda_autoattack"}


@pytest.mark.parametrize("name", ["bpda_apgd", "bpda_autoattack"])
def test_bpda_attacks_need_a_twin_and_say_so(points, name):
    model, x, y = points
    overrides = {"eps": 0.05} | ({"steps": 3} if name == "bpda_apgd" else {})
    params = ATTACKS[name].params("mnist", "standard", overrides)
    with pytest.raises(ValueError, match="twin"):
        build_attack(name, CallCounter(model), params, 10, stochastic=True)
    if name == "bpda_autoattack":
        params["version"] = "fast"
    twin = CallCounter(model)
    attack = build_attack(name, CallCounter(model), params, 10, stochastic=True, eval_repeats=3, twin=twin)
    assert attack.attack_config["gradient"] == "bpda"
    adv = attack(x[:4], y[:4])
    assert float((adv - x[:4]).abs().max()) <= 0.05 + 1e-6 and twin.backward_calls > 0
