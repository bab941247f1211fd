"""The fixed_randomness control (issue 27; Carlini et al.'s checklist): a stochastic hybrid
attacked with its randomness frozen to one draw, from its own generator."""

from __future__ import annotations

import logging

import pytest
import torch
import yaml

from qshield_dist import launch
from qshield_dist.config import ModelSpec, SweepConfig, validate
from qshield_dist.data import DATASETS
from qshield_dist.grid import build_grid
from qshield_dist.models import build_model

DIGITS = DATASETS["digits"]
PAPER = {"model": "hqcnn", "backbone": "cnn_small", "projection": "paper", "quantum_grad": "detached"}


def test_frozen_model_repeats_one_draw_and_leaves_the_global_generators_alone():
    torch.manual_seed(0)
    model = build_model(ModelSpec(**PAPER).resolved(DIGITS.classes), DIGITS).eval()
    x = torch.rand(4, DIGITS.channels, DIGITS.size, DIGITS.size)
    with torch.no_grad():
        assert model.stochastic and not torch.equal(model(x), model(x))
        model.fix_randomness(3)
        state = torch.get_rng_state()
        first = model(x)
        assert torch.equal(torch.get_rng_state(), state)  # the attacks' random streams are untouched
        assert torch.equal(model(x), first) and torch.equal(model.draws(x, 3), first.expand(3, -1, -1))
    assert not model.stochastic


def test_a_frozen_models_answer_on_a_point_does_not_depend_on_its_batch():
    """One fixed model: the clean pass (a whole shard) and the attack (the clean-correct points
    only) must see the same function, so neither the input noise nor the projection may depend
    on the batch's size or a point's place in it."""
    torch.manual_seed(0)
    model = build_model(ModelSpec(**PAPER, input_noise=0.1).resolved(DIGITS.classes), DIGITS).eval()
    model.fix_randomness(3)
    x = torch.rand(6, DIGITS.channels, DIGITS.size, DIGITS.size)
    with torch.no_grad():
        whole = model(x)
        assert torch.allclose(model(x[2:5]), whole[2:5], atol=1e-6)
        assert torch.allclose(model(x.flip(0)).flip(0), whole, atol=1e-6)


def test_the_control_is_added_for_stochastic_hybrids_only_and_attacks_a_deterministic_target():
    cfg = SweepConfig(
        name="fixed",
        data={"dataset": "digits"},
        eval={"controls": ["fixed_randomness"]},
        models=[{"model": "cnn_small"}, PAPER, {**PAPER, "projection": "learned"}],
        attacks=[{"name": "fgsm"}],
    )
    attacks = build_grid(validate(cfg)).attack
    fixed = [a for a in attacks if a.control == "fixed_randomness"]
    assert len(fixed) == 1 and fixed[0].train.model.projection == "paper"
    assert fixed[0].train.stochastic and not fixed[0].target_stochastic
    assert len(attacks) == 4


# A hybrid whose quantum layer samples Monte-Carlo trajectories: its randomness is not its own
# generator's, so fix_randomness cannot freeze it (it raised inside every control trial before).
TRAJECTORIES = {**PAPER, "simulator": "qnode", "device": "default.qubit", "trajectories": 4}


@pytest.mark.parametrize(
    "model, fragments",
    [
        (TRAJECTORIES, ["models[1].trajectories: got 4", "fixed_randomness", "allowed: trajectories: 0"]),
        (
            {"model": "custom", "factory": "net.py:make", "stochastic": True},
            ["models[1].stochastic: got true", "fixed_randomness", "allowed: remove"],
        ),
    ],
)
def test_a_model_whose_randomness_cannot_be_frozen_is_refused_before_compute(
    tmp_path, monkeypatch, caplog, model, fragments
):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "net.py").write_text("import torch.nn as nn\n\ndef make():\n    return nn.Flatten()\n")
    sweep = {
        "name": "fixed",
        "data": {"dataset": "digits"},
        "eval": {"controls": ["fixed_randomness"]},
        "models": [{"model": "cnn_small"}, model],
        "attacks": [{"name": "fgsm"}],
    }
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(sweep))
    with caplog.at_level(logging.ERROR):
        assert launch.main(["s.yaml"]) == 2
    for fragment in fragments:
        assert fragment in caplog.text, f"{fragment!r} missing from: {caplog.text}"
    assert not (tmp_path / "results").exists() and not (tmp_path / "checkpoints").exists()
    # without the control, the same models are a valid sweep
    validate(SweepConfig(**{**sweep, "eval": {}}))
