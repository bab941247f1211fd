"""Attacks adaptive to the paper-mode model's gradient masking: BPDA and transfer.

The paper's HQCNN cuts the input gradient through its quantum branch (`quantum_grad:
detached`); `model.differentiable_twin()` is the same model with that gradient flowing. BPDA
(Athalye et al.) keeps the real model's forward values and takes the twin's gradient, so every
gradient attack built on it (bpda_pgd, bpda_apgd, bpda_autoattack) sees through the first
defence; EOT over draws (bpda_apgd, bpda_autoattack's rand version) sees through the second,
the random projection.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from qshield_dist.attacks.base import draws


class BPDA(nn.Module):
    """Forward values of `model`, gradients of `twin` (same weights, differentiable quantum
    branch): Athalye et al.'s backward-pass differentiable approximation."""

    def __init__(self, model: nn.Module, twin: nn.Module):
        super().__init__()
        self.model, self.twin = model, twin
        # As CallCounter: torchattacks restores this wrapper's training flag, recursively.
        self.train(model.training)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            real = self.model(x)
        surrogate = self.twin(x)
        return real + (surrogate - surrogate.detach())

    def draws(self, x: torch.Tensor, k: int) -> torch.Tensor:
        """k draws of each (batched where the model can); the twin only where a gradient is
        wanted, since its values are never used."""
        with torch.no_grad():
            real = draws(self.model, x, k)
        if not (torch.is_grad_enabled() and x.requires_grad):
            return real
        surrogate = draws(self.twin, x, k)
        return real + (surrogate - surrogate.detach())
