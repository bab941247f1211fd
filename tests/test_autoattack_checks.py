"""AutoAttack's own sanity checks (the authors' checks.py), each tripped by a toy model made to
trip it and passed by an ordinary one."""

from __future__ import annotations

import torch
import torch.nn as nn

from qshield_dist.attacks.autoattack import sanity_checks


class _Plain(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.linear = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.log_softmax(self.linear(x.flatten(1)), 1)


class _Softmax(_Plain):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.linear(x.flatten(1)), 1)


class _Random(_Plain):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x + 0.5 * torch.randn_like(x))


class _Dynamic(_Plain):
    """Takes a gradient step on its own input at inference (a test-time defence)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.enable_grad():
            z = x.detach().requires_grad_(True)
            (g,) = torch.autograd.grad(super().forward(z).sum(), z)
        return super().forward(x - 0.01 * g.sign())


def test_each_check_trips_on_its_toy_and_only_there():
    x, y = torch.rand(32, 1, 4, 4), torch.randint(0, 4, (32,))
    assert sanity_checks(_Plain(), x, y) == {
        "randomized": False,
        "probability_output": False,
        "dynamic": False,
    }
    assert sanity_checks(_Softmax(), x, y)["probability_output"]
    assert sanity_checks(_Random(), x, y) == {
        "randomized": True,
        "probability_output": False,
        "dynamic": False,
    }
    assert sanity_checks(_Dynamic(), x, y)["dynamic"] and not sanity_checks(_Dynamic(), x, y)["randomized"]
