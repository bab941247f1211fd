"""torchattacks' attacks made complete for a stochastic model, by overriding the smallest piece.

torchattacks decides "already fooled" from one forward pass. On a model whose output is random
(the paper-mode HQCNN: a fresh random projection per call) that single draw is a coin flip:
attacks skip samples that are not broken, stop searching at points that are not broken, and
return clean images. The classes below apply the project's success rule instead: a point is
broken when a strict majority of `repeats` (the sweep's eval_repeats) draws misclassify it.
Their scores average the same draws (EOT). On a deterministic model (`stochastic=False`) every
override hands back to torchattacks' own method: outputs and call counts are unchanged.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import torchattacks

from qshield_dist.attacks.base import (
    MajorityRule,
    majority_margin,
    per_draw_margins,
    per_draw_xent,
    strict_majority,
)
from qshield_dist.attacks.streams import PerPointStarts, active_streams


class StochasticAPGD(PerPointStarts, torchattacks.APGD):
    """APGD for a randomized model (`best_loss: true`, the standard preset): every sample is
    attacked and the highest-loss iterate is returned. torchattacks' APGD (the paper's) skips a
    sample that one random forward pass already gets wrong and returns, for the others, the last
    iterate one draw got wrong: against the paper-mode HQCNN that left borderline digits at
    their clean value, under-reporting the ASR."""

    def forward(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        images, labels = images.clone().detach().to(self.device), labels.clone().detach().to(self.device)
        _, adv = self.perturb(images, labels, best_loss=True)
        return adv


class StochasticSquare(MajorityRule, torchattacks.Square):
    """Square with each query scored on `repeats` draws. Overrides `margin_and_loss` (the one
    place a query is scored) and `perturb` (a short loop around torchattacks' own
    `attack_single_run`). Under per-point streams (streams.py) it runs point by point:
    torchattacks draws one square per iteration for the whole batch, so a point's search
    would otherwise depend on its batch-mates."""

    def __init__(self, model: torch.nn.Module, *, stochastic: bool = False, repeats: int = 1, **kwargs):
        super().__init__(model, **kwargs)
        self.set_rule(stochastic, repeats)

    def margin_and_loss(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # torchattacks scores a query by one forward pass: a lucky draw both accepts a worse
        # square and ends the search as "fooled". Here the loss is the mean over the draws (EOT
        # over queries) and the margin is <= 0 only when a strict majority of them is fooled.
        if not self.stochastic:
            return super().margin_and_loss(x, y)
        out = self.take_draws(x, self.repeats)
        margins = per_draw_margins(out, y, self.targeted)
        if self.loss == "ce":
            xent = per_draw_xent(out, y)
            loss = xent if self.targeted else -xent
        else:
            loss = margins
        return majority_margin(margins), loss.mean(0)

    def perturb(self, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        streams = active_streams()
        if streams is None or len(x) <= 1:
            return self._perturb(x, y)
        if y is None:
            raise ValueError("Square needs labels under per-point streams")
        out = []
        for i in range(len(x)):
            # Both torchattacks' perturb and ours reseed the global generator from self.seed.
            self.seed = streams.seed_for(x[i])
            out.append(self._perturb(x[i : i + 1], y[i : i + 1]))
        return torch.cat(out)

    def _perturb(self, x: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
        if not self.stochastic:
            return super().perturb(x, y)
        # torchattacks attacks only the samples one forward pass classifies correctly and keeps a
        # restart's point only where one forward pass is fooled: the rest come back clean. Here
        # every sample is attacked, and a restart's point is kept when the majority rule calls it
        # broken or it lowers the expected loss of the point kept so far.
        if y is None:
            raise ValueError("StochasticSquare needs labels")
        self.init_hyperparam(x)
        y = self.get_target_label(x, y) if self.targeted else y.detach().clone().long().to(self.device)
        torch.random.manual_seed(self.seed)
        torch.cuda.random.manual_seed(self.seed)
        adv = x.clone()
        margin_best = torch.full((len(x),), float("inf"), device=x.device)
        loss_best = margin_best.clone()
        for _ in range(self.n_restarts):
            todo = (margin_best > 0).nonzero().flatten()
            if todo.numel() == 0:
                break
            _, adv_curr = self.attack_single_run(x[todo], y[todo])
            with torch.no_grad():
                margin, loss = self.margin_and_loss(adv_curr, y[todo])
            keep = (margin <= 0) | (loss < loss_best[todo])
            idx = todo[keep]
            adv[idx], margin_best[idx], loss_best[idx] = adv_curr[keep], margin[keep], loss[keep]
        return adv


class StochasticDeepFool(MajorityRule, torchattacks.DeepFool):
    """DeepFool on the EOT mean of `repeats` draws, stopped by the majority rule. Overrides
    `get_logits` (what a step linearizes) and `_forward_indiv` (only to pass it the label)."""

    def __init__(self, model: torch.nn.Module, *, stochastic: bool = False, repeats: int = 1, **kwargs):
        super().__init__(model, **kwargs)
        self.set_rule(stochastic, repeats)
        self._label: torch.Tensor | None = None

    def _forward_indiv(self, image: torch.Tensor, label: torch.Tensor):
        self._label = label.view(1)
        try:
            return super()._forward_indiv(image, label)
        finally:
            self._label = None

    def get_logits(self, inputs: torch.Tensor, labels: torch.Tensor | None = None, *args, **kwargs):
        if not self.stochastic or self._label is None:
            return super().get_logits(inputs, labels, *args, **kwargs)
        # torchattacks steps on one forward pass and stops a sample once that pass's argmax
        # flips. Here the output is the mean of the draws (its Jacobian is the EOT mean), with the
        # label's entry shifted by a constant so that its margin over the best other class is the
        # majority margin: DeepFool's own early stop (argmax != label) then fires exactly when a
        # strict majority of the draws is fooled, and its step is sized by the distance to that
        # majority boundary (a plain mean can be fooled while the majority is not, and DeepFool
        # would stop there for good).
        out = self.take_draws(inputs, self.repeats)
        mean = out.mean(0)
        y = self._label
        with torch.no_grad():
            shift = majority_margin(per_draw_margins(out, y)) - per_draw_margins(mean.unsqueeze(0), y)[0]
        return mean + shift.unsqueeze(1) * F.one_hot(y, mean.shape[1]).to(mean.dtype)


class StochasticOnePixel(MajorityRule, torchattacks.OnePixel):
    """One-Pixel whose differential evolution scores candidates by the mean probability over
    `repeats` draws (`_get_prob`) and stops early only on the majority rule (`_attack_success`,
    its callback)."""

    def __init__(self, model: torch.nn.Module, *, stochastic: bool = False, repeats: int = 1, **kwargs):
        super().__init__(model, **kwargs)
        self.set_rule(stochastic, repeats)

    def _get_prob(self, images: torch.Tensor):
        if not self.stochastic:
            return super()._get_prob(images)
        # One draw per candidate would let DE keep the luckiest candidate, not the best one.
        with torch.no_grad():
            batches = torch.split(images, self.inf_batch)
            probs = [self.take_draws(b, self.repeats).softmax(-1).mean(0) for b in batches]
        return torch.cat(probs).cpu().numpy()

    def _attack_success(self, image: torch.Tensor, label: torch.Tensor, delta) -> bool:
        if not self.stochastic:
            return super()._attack_success(image, label, delta)
        # torchattacks ends the evolution when one forward pass's argmax flips.
        with torch.no_grad():
            pred = self.take_draws(self._perturb(image, delta), self.repeats).argmax(-1)
        return bool(strict_majority(pred == label if self.targeted else pred != label)[0])


class StochasticMultiAttack(MajorityRule, torchattacks.MultiAttack):
    """MultiAttack (AutoAttack's sequence) whose in-play decision is the majority rule, and
    which records which component produced each returned image (`sources`: the component's
    index, -1 for a clean image). Overrides `forward`, the loop that makes that decision."""

    def __init__(self, attacks: list, *, stochastic: bool = False, repeats: int = 1, verbose: bool = False):
        super().__init__(attacks, verbose=verbose)
        self.set_rule(stochastic, repeats)
        self.sources = torch.empty(0, dtype=torch.long)

    def forward(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        # As torchattacks: each component attacks the samples still in play, a sample leaves
        # play once broken, and an unbroken sample comes back clean. torchattacks decides
        # "broken" on one forward pass; on a stochastic model (repeats > 1) that is a coin flip,
        # so there a sample stays in play until the majority rule calls it broken, and one never
        # broken comes back at the highest expected loss (mean cross-entropy over the draws) any
        # component reached. On a deterministic model `judge` is that one forward pass.
        images = images.clone().detach().to(self.device)
        labels = labels.clone().detach().to(self.device)
        final = images.clone()
        broken = torch.zeros(len(images), dtype=torch.bool, device=images.device)
        best = torch.full((len(images),), -float("inf"), device=images.device)
        sources = torch.full((len(images),), -1, dtype=torch.long, device=images.device)
        records = [len(images)]
        for k, attack in enumerate(self.attacks):
            todo = (~broken).nonzero().flatten()
            if todo.numel() == 0:
                break
            adv = attack(images[todo], labels[todo])
            wrong, loss = self.judge(adv, labels[todo])
            keep = wrong | (loss > best[todo]) if self.stochastic else wrong
            final[todo[keep]], best[todo[keep]], sources[todo[keep]] = adv[keep], loss[keep], k
            broken[todo[wrong]] = True
            records.append(int((~broken).sum()))
        if self._accumulate_multi_atk_records:
            self._update_multi_atk_records(records)
        self.sources = sources
        return final
