"""C&W L2 with a per-sample binary search over c, as the paper's ART implementation does.

torchattacks' CW takes one fixed c; the paper used the Adversarial Robustness Toolbox's, which
searches c per sample.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torchattacks


class CWBinarySearch(torchattacks.CW):
    """torchattacks' C&W L2 with ART-style per-sample binary search over c.

    torchattacks sums the classification term over the batch before scaling it by one c;
    overriding `f` to scale each sample's term by its own c gives per-sample constants.
    The override also fixes the margin for negative outputs: torchattacks takes the best
    other class as max((1 - onehot) * outputs), which is 0 (the masked true class) whenever
    all outputs are negative, as log-probabilities are. That is likely why the paper found
    torchattacks' C&W "did not work with their model".
    """

    def __init__(
        self, model: nn.Module, c: float, kappa: float, steps: int, lr: float, binary_search_steps: int
    ):
        super().__init__(model, c=1.0, kappa=kappa, steps=steps, lr=lr)
        self.c0, self.search_steps = c, binary_search_steps
        self._c_per_sample: torch.Tensor | None = None

    def f(self, outputs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        # gather, not a boolean mask: the same values, and no host round trip at every step
        real = outputs.gather(1, labels.unsqueeze(1)).squeeze(1)
        other = outputs.scatter(1, labels.unsqueeze(1), -math.inf).max(dim=1).values
        if self.targeted:
            margin = other - real
        else:
            margin = real - other
        return torch.clamp(margin, min=-self.kappa) * self._c_per_sample

    def forward(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        n = len(images)
        c = torch.full((n,), self.c0, device=images.device)
        lower, upper = torch.zeros(n, device=images.device), torch.full((n,), math.inf, device=images.device)
        best = images.clone()
        best_l2 = torch.full((n,), math.inf, device=images.device)
        for _ in range(self.search_steps):
            self._c_per_sample = c
            adv = super().forward(images, labels)
            with torch.no_grad():
                fooled = self.get_logits(adv).argmax(1) != labels
                l2 = (adv - images).flatten(1).norm(dim=1)
            better = fooled & (l2 < best_l2)  # selected without a host round trip
            best = torch.where(better.view(-1, *([1] * (best.dim() - 1))), adv, best)
            best_l2 = torch.where(better, l2, best_l2)
            # Success -> try a smaller c; failure -> a larger one (x10 until bracketed).
            upper = torch.where(fooled, torch.minimum(upper, c), upper)
            lower = torch.where(fooled, lower, torch.maximum(lower, c))
            c = torch.where(torch.isinf(upper), c * 10, (lower + upper) / 2)
        return best
