"""The robust training methods: the loss of one training batch for `train.method`.

- standard: NLL of the model's log-probabilities on the clean batch.
- pgd_at (Madry et al. 2018, "Towards Deep Learning Models Resistant to Adversarial Attacks"):
  the loss on PGD examples (random start, `steps` signed-gradient steps of `step_size`,
  projected on the eps ball and [0, 1]) crafted against the model being trained, with
  torchattacks' PGD, as the attack stage's is built: through the model's full gradient; for a
  hybrid whose quantum branch is detached, or a custom model whose entry names a
  differentiable twin, through that twin (BPDA: gradient_view); for a
  stochastic model, with EOT over draws (torchattacks' EOTPGD, as many draws as the sweep's
  eot_pgd attack takes by default).
- trades (Zhang et al. 2019, arXiv 1901.08573, reference code yaodongyu/TRADES `trades_loss`):
  CE(f(x), y) + beta * KL(f(x) || f(x')), where x' maximises that KL inside the eps ball:
  start at x + 0.001 * N(0, 1), `steps` signed-gradient steps of `step_size`, each projected on
  the eps ball and [0, 1]. The model is in eval mode while x' is sought (as the reference's
  trainer), and its gradient reaches the input as in pgd_at (twin for a detached branch). The
  reference computes f(x) afresh at each step; in eval mode that is one value, computed once here.

Every model here returns log-probabilities (models/): they are the reference's
`F.log_softmax(model(x))`, and cross-entropy on them (what torchattacks computes, since
log_softmax leaves log-probabilities as they are) is the NLL used here. Random draws (PGD's start, TRADES' start
noise, a stochastic model's draws) come from the generators the trial seeded from its seed
(trial_env.seed_everything), so a train trial gives the same weights on every run.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from qshield_dist.attack_params import EOT_PGD_DRAWS
from qshield_dist.attacks.adaptive import BPDA
from qshield_dist.attacks.streams import EOTPGD, PGD
from qshield_dist.config import TrainConfig
from qshield_dist.models.custom import CustomClassifierWithTwin
from qshield_dist.vocabulary import PGD_AT, STANDARD, TRADES

# (inputs, labels) -> the batch's loss, the model in training mode
BatchLoss = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def gradient_view(model: nn.Module) -> nn.Module:
    """What an input gradient is taken through: the model itself, or BPDA over its
    differentiable twin for a model whose own gradient is not the one to follow: a hybrid whose
    quantum branch is detached (the attack stage's rule), or a custom model whose entry names a
    twin (its declared stand-in for the model's gradient)."""
    if getattr(model, "quantum_grad", None) == "detached" or isinstance(model, CustomClassifierWithTwin):
        return BPDA(model, model.differentiable_twin())
    return model


def pgd_attack(model: nn.Module, cfg: TrainConfig) -> PGD | EOTPGD:
    """torchattacks' PGD (EOTPGD on a stochastic model) against `model`, with the method's budget."""
    view = gradient_view(model)
    budget = {"eps": cfg.eps, "alpha": cfg.step_size, "steps": cfg.steps, "random_start": True}
    if getattr(model, "stochastic", False):
        return EOTPGD(view, eot_iter=EOT_PGD_DRAWS, **budget)
    return PGD(view, **budget)


def trades_example(model: nn.Module, x: torch.Tensor, cfg: TrainConfig) -> torch.Tensor:
    """TRADES' inner maximisation: x' in the eps ball around x (and [0, 1]) with a large
    KL(f(x) || f(x')), by signed-gradient ascent from x + 0.001 * N(0, 1)."""
    view = gradient_view(model)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            clean = model(x).exp()
        adv = x.detach() + 0.001 * torch.randn_like(x)
        for _ in range(cfg.steps):
            adv.requires_grad_(True)
            with torch.enable_grad():
                kl = F.kl_div(view(adv), clean, reduction="sum")
            (grad,) = torch.autograd.grad(kl, [adv])
            adv = adv.detach() + cfg.step_size * grad.sign()
            adv = torch.min(torch.max(adv, x - cfg.eps), x + cfg.eps).clamp(0.0, 1.0)
    finally:
        model.train(was_training)
    return adv.detach()


def trades_loss(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, adv: torch.Tensor, beta: float
) -> torch.Tensor:
    """CE on the clean batch + beta * KL(f(x) || f(x')) / batch size (the reference's `trades_loss`)."""
    logp_clean = model(x)
    robust = F.kl_div(model(adv), logp_clean.exp(), reduction="sum") / len(x)
    return F.nll_loss(logp_clean, y) + beta * robust


def batch_loss(model: nn.Module, cfg: TrainConfig) -> BatchLoss:
    """The loss of one training batch under `cfg.method` (a resolved config: eps and step_size set)."""
    if cfg.method == STANDARD:
        return lambda x, y: F.nll_loss(model(x), y)
    if cfg.eps is None or cfg.step_size is None:
        raise ValueError(f"method {cfg.method} needs a resolved config (eps and step_size), got {cfg}")
    if cfg.method == PGD_AT:
        attack = pgd_attack(model, cfg)
        return lambda x, y: F.nll_loss(model(attack(x, y)), y)
    if cfg.method == TRADES:
        return lambda x, y: trades_loss(model, x, y, trades_example(model, x, cfg), cfg.beta)
    raise ValueError(f"train.method: got '{cfg.method}'")
