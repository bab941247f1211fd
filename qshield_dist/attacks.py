"""Attack registry over torchattacks, with the paper's parameters as the `paper` preset.

Every attack is built as `build_attack(name, model, params, n_classes)` and called as
`attack(images, labels) -> adversarial images`, torchattacks' uniform shape. We write only
what torchattacks lacks:
- C&W with a per-sample binary search over c (the paper used ART's; torchattacks' CW takes
  one fixed c),
- BPDA (forward through the real model, backward through its differentiable twin),
- transfer (examples crafted on a surrogate model; the trial evaluates them on the target),
- APGD for stochastic models that attacks every sample (`best_loss`, the standard preset).

`CallCounter` wraps the model an attack sees and counts every forward and backward call.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import torch
import torch.nn as nn
import torchattacks

from qshield_dist.attack_params import ATTACKS


class CallCounter(nn.Module):
    """Passes calls through to `model`, counting forwards and backwards (calls and samples)."""

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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.model(x)
        self.forward_calls += 1
        self.forward_samples += x.shape[0]
        if out.requires_grad:
            batch = x.shape[0]

            def count_backward(grad: torch.Tensor) -> torch.Tensor:
                self.backward_calls += 1
                self.backward_samples += batch
                return grad

            out.register_hook(count_backward)
        return out


class CWBinarySearch(torchattacks.CW):
    """torchattacks' C&W L2 with ART-style per-sample binary search over c.

    torchattacks sums the classification term over the batch before scaling it by one c;
    overriding `f` to scale each sample's term by its own c gives per-sample constants.
    The override also fixes the margin for negative outputs: torchattacks takes the best
    other class as max((1 - onehot) * outputs), which is 0 (the masked true class) whenever
    all outputs are negative, as log-probabilities are. That is likely why the paper found
    torchattacks' C&W "did not work with their model".
    """

    def __init__(self, model: nn.Module, c: float, kappa: float, steps: int, lr: float, binary_search_steps: int):
        super().__init__(model, c=1.0, kappa=kappa, steps=steps, lr=lr)
        self.c0, self.search_steps = c, binary_search_steps
        self._c_per_sample: torch.Tensor | None = None

    def f(self, outputs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        true_class = torch.nn.functional.one_hot(labels, outputs.shape[1]).bool()
        real = outputs[true_class]
        other = outputs.masked_fill(true_class, -math.inf).max(dim=1).values
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
            better = fooled & (l2 < best_l2)
            best[better], best_l2[better] = adv[better], l2[better]
            # Success -> try a smaller c; failure -> a larger one (x10 until bracketed).
            upper = torch.where(fooled, torch.minimum(upper, c), upper)
            lower = torch.where(fooled, lower, torch.maximum(lower, c))
            c = torch.where(torch.isinf(upper), c * 10, (lower + upper) / 2)
        return best


class BPDA(nn.Module):
    """Forward values of `model`, gradients of `twin` (same weights, differentiable quantum
    branch): Athalye et al.'s backward-pass differentiable approximation."""

    def __init__(self, model: nn.Module, twin: nn.Module):
        super().__init__()
        self.model, self.twin = model, twin

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            real = self.model(x)
        surrogate = self.twin(x)
        return real + (surrogate - surrogate.detach())


class StochasticAPGD(torchattacks.APGD):
    """APGD for a randomized model (`best_loss: true`, the standard preset): every sample is
    attacked and the highest-loss iterate is returned. torchattacks' APGD (the paper's) skips a
    sample that one random forward pass already gets wrong and returns, for the others, the last
    iterate one draw got wrong: against the paper-mode HQCNN that left borderline digits at
    their clean value, under-reporting the ASR."""

    def forward(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        _, adv = self.perturb(images.clone().detach().to(self.device), labels.clone().detach().to(self.device), best_loss=True)
        return adv


def build_attack(
    name: str,
    model: nn.Module,
    params: dict[str, Any],
    n_classes: int,
    *,
    stochastic: bool = False,
    twin: nn.Module | None = None,
    surrogate: nn.Module | None = None,
) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """An attack callable for `model` (already wrapped in a CallCounter by the caller)."""
    p = dict(params)
    if name == "fgsm":
        return torchattacks.FGSM(model, eps=p["eps"])
    if name == "pgd":
        return torchattacks.PGD(model, **p)
    if name == "apgd":
        best_loss = p.pop("best_loss")
        return (StochasticAPGD if stochastic and best_loss else torchattacks.APGD)(model, norm="Linf", **p)
    if name == "vmifgsm":
        return torchattacks.VMIFGSM(model, **p)
    if name == "cw":
        return CWBinarySearch(model, **p)
    if name == "deepfool":
        return torchattacks.DeepFool(model, **p)
    if name == "onepixel":
        return torchattacks.OnePixel(model, **p)
    if name == "square":
        return torchattacks.Square(model, norm="Linf", **p)
    if name == "autoattack":
        # AutoAttack's own protocol for randomized defences is its 'rand' version
        # (APGD-CE and APGD-DLR with EOT over 20 draws).
        version = p.pop("version")
        if version == "auto":
            version = "rand" if stochastic else "standard"
        return torchattacks.AutoAttack(model, norm="Linf", version=version, n_classes=n_classes, **p)
    if name == "eot_pgd":
        return torchattacks.EOTPGD(model, **p)
    if name == "bpda_pgd":
        if twin is None:
            raise ValueError("bpda_pgd needs the model's differentiable twin")
        return torchattacks.PGD(BPDA(model, twin), **p)
    if name == "transfer":
        if surrogate is None:
            raise ValueError("transfer needs a surrogate model")
        p.pop("surrogate")
        base = p.pop("base")
        # Crafted on the surrogate; the caller evaluates the examples on the target.
        return build_attack(base, surrogate, p, n_classes)
    raise KeyError(f"attack: got '{name}'; allowed: {', '.join(ATTACKS)}")

