"""Shared fixtures: a digits subset, a trained cnn_small, and hybrids started from it."""

from __future__ import annotations

import pytest
import torch

from qshield_dist.config import ModelSpec, TrainConfig
from qshield_dist.data import DATASETS, load
from qshield_dist.models import build_model
from qshield_dist.train import train_model

DIGITS = DATASETS["digits"]


@pytest.fixture(scope="session")
def digits():
    return load("digits", train_size=600, test_size=150)


@pytest.fixture(scope="session")
def baseline(digits):
    """A trained cnn_small: hybrids start from it (init: from_baseline), as in the sweeps."""
    train, _ = digits
    torch.manual_seed(0)
    model = build_model(ModelSpec(model="cnn_small"), DIGITS)
    train_model(model, train.x, train.y, TrainConfig(epochs=6), seed=0)
    return model


@pytest.fixture(scope="session")
def trained_hqcnn(digits, baseline):
    """hqcnn(**fields) with the baseline's backbone, then trained as a hybrid."""

    def make(**fields):
        train, _ = digits
        torch.manual_seed(0)
        model = build_model(ModelSpec(model="hqcnn", backbone="cnn_small", **fields).resolved(DIGITS.classes), DIGITS)
        model.backbone.load_state_dict(baseline.backbone.state_dict())
        # The fusion MLP's BatchNorm needs ~20 steps before its running statistics are usable.
        train_model(model, train.x, train.y, TrainConfig(epochs=5), seed=0)
        return model

    return make
