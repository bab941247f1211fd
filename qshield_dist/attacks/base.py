"""What every attack here shares: the call counter, batched draws of a stochastic model, and
the project's success rule (a strict majority of evaluations) as the attacks apply it.

A *draw* is one forward call of a stochastic model. The paper-mode HQCNN draws one random
projection per call and shares it across the batch, so k stacked copies of a batch in one call
would be one draw, not k. `draws(model, x, k)` therefore uses the model's own `draws` method
when it has one (k independent draws in one batched pass) and otherwise loops k forward calls.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F


def draws(model: nn.Module, x: torch.Tensor, k: int) -> torch.Tensor:
    """(k, B, C) outputs of k independent forward calls of `model` on `x`; k = 1 is model(x)."""
    if k == 1:
        return model(x).unsqueeze(0)
    batched = getattr(model, "draws", None)
    if callable(batched):
        return batched(x, k)
    return torch.stack([model(x) for _ in range(k)])


def strict_majority(hits: torch.Tensor) -> torch.Tensor:
    """(R, B) booleans -> (B,): true in more than half of the R evaluations."""
    return hits.sum(0) * 2 > hits.shape[0]


def majority_margin(margins: torch.Tensor) -> torch.Tensor:
    """(R, B) per-draw margins (<= 0: that draw is fooled) -> (B,) a margin that is <= 0 exactly
    when a strict majority of the draws is fooled: the (R // 2 + 1)-th smallest."""
    return margins.kthvalue(margins.shape[0] // 2 + 1, dim=0).values


def per_draw_margins(logits: torch.Tensor, y: torch.Tensor, targeted: bool = False) -> torch.Tensor:
    """(R, B, C) outputs -> (R, B) margins as torchattacks' Square defines them: true class minus
    the best other (untargeted), best other minus the target (targeted)."""
    index = y.expand(logits.shape[0], -1).unsqueeze(-1)
    own = logits.gather(-1, index).squeeze(-1)
    other = logits.scatter(-1, index, -float("inf")).amax(-1)
    return other - own if targeted else own - other


def per_draw_xent(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """(R, B, C) outputs -> (R, B) cross-entropy of each draw."""
    r, b, c = logits.shape
    return F.cross_entropy(logits.reshape(r * b, c), y.repeat(r), reduction="none").view(r, b)


class MajorityRule:
    """Mixin for torchattacks attacks: `stochastic` and `repeats` (the evaluations a success
    decision takes), and the draws an attack takes through its own input normalization."""

    stochastic: bool = False
    repeats: int = 1

    def set_rule(self, stochastic: bool, repeats: int) -> None:
        self.stochastic = bool(stochastic)
        self.repeats = int(repeats) if stochastic else 1

    def take_draws(self, x: torch.Tensor, k: int) -> torch.Tensor:
        if getattr(self, "_normalization_applied", None) is False:  # as torchattacks' get_logits
            x = self.normalize(x)
        return draws(self.model, x, k)

    @torch.no_grad()
    def judge(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(broken by the majority rule, mean cross-entropy over the same draws), per sample."""
        out = self.take_draws(x, self.repeats)
        return strict_majority(out.argmax(-1) != y), per_draw_xent(out, y).mean(0)


class CallCounter(nn.Module):
    """Passes calls through to `model`, counting forwards and backwards (calls and samples).
    `draws(x, k)` counts k calls of B samples, batched or not, so the counts do not depend on
    whether the model can batch its draws."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        # torchattacks restores the wrapper's training flag after an attack, recursively:
        # a fresh wrapper (training=True) would leave an eval-mode model in training mode.
        self.train(model.training)
        self.reset()

    def reset(self) -> None:
        self.forward_calls = self.backward_calls = 0
        self.forward_samples = self.backward_samples = 0

    def _count(self, out: torch.Tensor, calls: int, samples: int) -> torch.Tensor:
        self.forward_calls += calls
        self.forward_samples += samples
        if out.requires_grad:

            def count_backward(grad: torch.Tensor) -> torch.Tensor:
                self.backward_calls += calls
                self.backward_samples += samples
                return grad

            out.register_hook(count_backward)
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._count(self.model(x), 1, x.shape[0])

    def draws(self, x: torch.Tensor, k: int) -> torch.Tensor:
        if k == 1:
            return self.forward(x).unsqueeze(0)
        return self._count(draws(self.model, x, k), k, k * x.shape[0])


def describe(attack: Any, keys: tuple[str, ...]) -> dict[str, Any]:
    """The named attributes of a torchattacks attack that it has, as plain values."""
    out = {}
    for key in keys:
        value = getattr(attack, key, None)
        if value is None or callable(value):  # Square's `eta` is a method, FAB's a number
            continue
        out[key] = value.item() if isinstance(value, torch.Tensor) else value
    return out
