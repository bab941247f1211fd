"""torchattacks' attacks made complete for a stochastic model, by overriding the smallest piece.

torchattacks decides "already fooled" from one forward pass. On a model whose output is random
(the paper-mode HQCNN: a fresh random projection per call) that single draw is a coin flip:
attacks skip samples that are not broken, stop searching at points that are not broken, and
return clean images. The classes below score every candidate on `repeats` (the sweep's
eval_repeats) draws (EOT) and never stop on draws: Square, One-Pixel and AutoAttack's sequence
spend their whole budget and keep the best candidate, which the trial then judges on fresh
draws by the project's rule (broken when a strict majority of the draws misclassify it).
Stopping at the first majority of lucky draws kept points that fresh draws call unbroken, so
the ASR came out low. DeepFool, a minimum-norm attack, stops at the majority boundary by design.
On a deterministic model (`stochastic=False`) every override hands back to torchattacks' own
method (outputs and call counts unchanged), except that under per-point streams (streams.py)
Square draws each point's squares from the point's own stream.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
import torchattacks

from qshield_dist.attacks.base import (
    MajorityRule,
    majority_margin,
    per_draw_margins,
    per_draw_xent,
)
from qshield_dist.attacks.streams import PerPointStarts, active_streams, to_device


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
    """Square with each query scored on `repeats` draws, and under per-point streams with each
    point's own random search. Overrides `margin_and_loss` (the one place a query is scored),
    `perturb` (a short loop around `attack_single_run`) and, under streams, the L-inf
    `attack_single_run`."""

    def __init__(self, model: torch.nn.Module, *, stochastic: bool = False, repeats: int = 1, **kwargs):
        super().__init__(model, **kwargs)
        self.set_rule(stochastic, repeats)

    def margin_and_loss(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # torchattacks scores a query by one forward pass: a lucky draw both accepts a worse
        # square and ends the search as "fooled". Here the loss is the mean over the draws (EOT
        # over queries), and the search never ends on draws (the margin it stops on stays
        # positive): it spends its whole budget and keeps the lowest-loss point, which the trial
        # then judges on fresh draws. Stopping at the first majority of lucky draws kept points
        # that fresh draws call unbroken, biasing the ASR low (issue 24).
        if not self.stochastic:
            return super().margin_and_loss(x, y)
        out = self.take_draws(x, self.repeats)
        if self.loss == "ce":
            xent = per_draw_xent(out, y)
            loss = xent if self.targeted else -xent
        else:
            loss = per_draw_margins(out, y, self.targeted)
        loss = loss.mean(0)
        # A constant positive margin: finite, since torchattacks mixes margins as 0 * margin.
        return torch.ones_like(loss), loss

    def attack_single_run(self, x: torch.Tensor, y: torch.Tensor):
        streams = active_streams()
        if streams is None or self.norm != "Linf":
            return super().attack_single_run(x, y)
        return self._per_point_linf_run(x, y, streams)

    @torch.no_grad()
    def _per_point_linf_run(
        self, x: torch.Tensor, y: torch.Tensor, streams
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """torchattacks' L-inf `attack_single_run` with every point's randomness its own. There
        one square per iteration (position and sign) is drawn for the whole batch, so a point's
        search depends on its batch-mates; here each point draws its square from its own stream,
        all its draws up front (the same uniform numbers torchattacks turns into squares, on the
        host, moved to the device once), and the points stay batched. Same schedule, acceptance
        rule and budget."""
        c, h, w = x.shape[1:]
        n_features = c * h * w
        # per point: c x w stripe signs, then per query the square's row and column (uniform,
        # floored) and one sign per channel
        draws = c * w + self.n_queries * (2 + c)
        u = to_device(
            torch.stack([torch.rand(draws, generator=g, device="cpu") for g in streams.generators(x)]),
            x.device,
        )
        stripes = torch.sign(2 * u[:, : c * w] - 1).view(-1, c, 1, w)
        u = u[:, c * w :].view(len(x), self.n_queries, 2 + c)
        x_best = torch.clamp(x + self.eps * stripes, 0.0, 1.0)
        margin_min, loss_min = self.margin_and_loss(x_best, y)
        n_queries = torch.ones(len(x), device=x.device)
        rows = torch.arange(h, device=x.device)
        cols = torch.arange(w, device=x.device)
        for i_iter in range(self.n_queries):
            # The one host round trip of an iteration: how many points are still searching
            # (attacking all of them, masked, would change the draws a stochastic model takes).
            idx = (margin_min > 0.0).nonzero().flatten()
            if len(idx) == 0:
                break
            p = self.p_selection(i_iter)
            s = max(int(round(math.sqrt(p * n_features / c))), 1)
            draw = u[idx, i_iter]
            vh = ((h - s) * draw[:, 0]).long().view(-1, 1, 1)
            vw = ((w - s) * draw[:, 1]).long().view(-1, 1, 1)
            square = ((rows.view(1, h, 1) >= vh) & (rows.view(1, h, 1) < vh + s)) & (
                (cols.view(1, 1, w) >= vw) & (cols.view(1, 1, w) < vw + s)
            )
            signs = torch.sign(2 * draw[:, 2:] - 1).view(-1, c, 1, 1)
            x_curr, x_best_curr = x[idx], x_best[idx]
            x_new = x_best_curr + 2.0 * self.eps * signs * square.unsqueeze(1)
            x_new = torch.clamp(torch.min(torch.max(x_new, x_curr - self.eps), x_curr + self.eps), 0.0, 1.0)
            margin, loss = self.margin_and_loss(x_new, y[idx])
            improved = loss < loss_min[idx]
            loss_min[idx] = torch.where(improved, loss, loss_min[idx])
            accept = improved | (margin <= 0.0)
            margin_min[idx] = torch.where(accept, margin, margin_min[idx])
            x_best[idx] = torch.where(accept.view(-1, 1, 1, 1), x_new, x_best_curr)
            n_queries[idx] += 1.0
        return n_queries, x_best

    def perturb(self, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        if not self.stochastic:
            return super().perturb(x, y)
        # torchattacks attacks only the samples one forward pass classifies correctly and keeps a
        # restart's point only where one forward pass is fooled: the rest come back clean. Here
        # every sample is attacked by every restart, and a restart's point is kept when it lowers
        # the expected loss of the point kept so far.
        if y is None:
            raise ValueError("StochasticSquare needs labels")
        self.init_hyperparam(x)
        y = self.get_target_label(x, y) if self.targeted else y.detach().clone().long().to(self.device)
        torch.random.manual_seed(self.seed)
        torch.cuda.random.manual_seed(self.seed)
        adv = x.clone()
        loss_best = torch.full((len(x),), float("inf"), device=x.device)
        for _ in range(self.n_restarts):
            _, adv_curr = self.attack_single_run(x, y)
            with torch.no_grad():
                _, loss = self.margin_and_loss(adv_curr, y)
            keep = loss < loss_best  # selected without a host round trip
            adv = torch.where(keep.view(-1, *([1] * (adv.dim() - 1))), adv_curr, adv)
            loss_best = torch.where(keep, loss, loss_best)
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
        # torchattacks ends the evolution when one forward pass's argmax flips; on a stochastic
        # model it never ends on draws: the evolution spends its budget, the trial judges the
        # best candidate on fresh draws.
        if not self.stochastic:
            return super()._attack_success(image, label, delta)
        return False


class StochasticMultiAttack(MajorityRule, torchattacks.MultiAttack):
    """MultiAttack (AutoAttack's sequence) whose in-play decision is the majority rule, and
    which records which component produced each returned image (`sources`: the component's
    index, -1 for a clean image). Overrides `forward`, the loop that makes that decision."""

    def __init__(self, attacks: list, *, stochastic: bool = False, repeats: int = 1, verbose: bool = False):
        super().__init__(attacks, verbose=verbose)
        self.set_rule(stochastic, repeats)
        self.sources = torch.empty(0, dtype=torch.long, device="cpu")  # set by each call

    def forward(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        # As torchattacks on a deterministic model: each component attacks the samples still in
        # play, a sample leaves play once one forward pass (`judge`) misclassifies it, and an
        # unbroken sample comes back clean. On a stochastic model, deciding "broken" on draws
        # would end a sample's attack on lucky draws: there every component attacks every
        # sample, and the image kept is the one of highest expected loss (mean cross-entropy
        # over the draws); the trial judges it on fresh draws.
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
            keep = loss > best[todo] if self.stochastic else wrong
            final[todo[keep]], best[todo[keep]], sources[todo[keep]] = adv[keep], loss[keep], k
            if not self.stochastic:
                broken[todo[wrong]] = True
            records.append(int((~broken).sum()))
        if self._accumulate_multi_atk_records:
            self._update_multi_atk_records(records)
        self.sources = sources
        return final
