"""QShield's hybrid network (HQCNN): backbone logits -> angles -> noisy circuit -> fusion.

Two settings reproduce the authors' implementation; the defaults are the sound versions:

- `quantum_grad: detached` (paper) cuts the gradient from the input through the quantum
  branch, as their per-sample NumPy circuit loop does; `full` lets it flow.
- `projection: paper` uses their feature-to-angle reduction: with `enhanced_angle` and fewer
  than 3n features, a fresh random orthogonal projection on every call (the model becomes
  stochastic), and top-variance / PCA reductions computed across the batch (a sample's
  output depends on its batch-mates). `learned` is a trained linear map: deterministic.
"""

from __future__ import annotations

import copy
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from qshield_dist.quantum import CircuitSpec, QuantumLayer
from qshield_dist.randomness import hybrid_is_stochastic

_EPS = 1e-8


def _safe_std(centered: torch.Tensor) -> torch.Tensor:
    """Std over the last axis whose gradient stays finite when all values are equal
    (the gradient of sqrt is infinite at 0)."""
    return (centered.pow(2).mean(dim=-1, keepdim=True) + _EPS).sqrt()


def standardize(z: torch.Tensor) -> torch.Tensor:
    """Per-sample zero mean, unit variance over the feature axis (the last)."""
    centered = z - z.mean(dim=-1, keepdim=True)
    return centered / _safe_std(centered)


def window_means(z: torch.Tensor, n: int) -> torch.Tensor:
    """F.adaptive_avg_pool1d(z, n) over the last axis, written out: the mean of each of its n
    (nearly equal, consecutive) windows, summed left to right as its CPU kernel does, so the
    values are bit-identical there (tests/test_device.py); unlike the pooling op, its CUDA
    backward is deterministic."""
    size = z.shape[-1]
    if n == 1:
        return z.mean(dim=-1, keepdim=True)  # the pooling op's own path for one window
    means = []
    for i in range(n):
        start, end = i * size // n, -(-(i + 1) * size // n)
        total = z[..., start]
        for j in range(start + 1, end):
            total = total + z[..., j]
        means.append(total / (end - start))
    return torch.stack(means, dim=-1)


def paper_projection(
    z: torch.Tensor, n_angles: int, encoding: str, generator: torch.Generator | None = None
) -> torch.Tensor:
    """The authors' reduction of C standardized features to the circuit's angle count.

    `z` is (B, C), or (k, B, C) for k draws at once (HQCNN.draws): then each draw has its own
    random matrix and its own batch statistics, each shared by its copy of the batch.
    `generator`: where the random matrix is drawn from (default: the global generator)."""
    n_features = z.shape[-1]
    if z.dim() == 3 and (encoding == "angle" or n_features == n_angles):  # per-sample reductions
        return paper_projection(z.flatten(0, 1), n_angles, encoding, generator).view(*z.shape[:2], -1)
    if encoding == "angle":
        if n_features >= n_angles:  # mean over (nearly) equal consecutive groups
            return window_means(z, n_angles)
        return z.repeat(1, math.ceil(n_angles / n_features))[:, :n_angles]
    if n_features < n_angles:
        # Drawn afresh on every call: this is what makes their model stochastic
        # (randomness.random_projection says when, without torch).
        size = max(n_features, n_angles)
        shape = (*z.shape[:-2], size, size)
        q, _ = torch.linalg.qr(torch.randn(shape, generator=generator, device=z.device, dtype=z.dtype))
        return z @ (0.1 * q[..., :n_features, :n_angles])
    if n_features == n_angles:
        return z
    if n_features <= 3 * n_angles:  # the n_angles features of highest variance across the batch
        top = z.var(dim=-2).topk(n_angles).indices.unsqueeze(-2)
        return z.gather(-1, top.expand(*z.shape[:-1], n_angles))
    centered = z - z.mean(dim=-2, keepdim=True)  # PCA across the batch
    _, _, v = torch.linalg.svd(centered, full_matrices=False)
    return centered @ v[..., :n_angles, :].mT


class AngleEncoder(nn.Module):
    """Features -> rotation angles: RY angles 2*pi*sigmoid (angle) or RX,RY,RZ pi*tanh (enhanced)."""

    def __init__(self, encoding: str, projection: str, n_features: int, qubits: int):
        super().__init__()
        self.encoding, self.projection = encoding, projection
        self.n_angles = qubits if encoding == "angle" else 3 * qubits
        self.linear = nn.Linear(n_features, self.n_angles) if projection == "learned" else None

    def forward(self, features: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        z = standardize(features)
        if self.linear is not None:
            z = self.linear(z)
        else:
            z = paper_projection(z, self.n_angles, self.encoding, generator)
        return 2 * math.pi * torch.sigmoid(z) if self.encoding == "angle" else math.pi * torch.tanh(z)


def _moments(logp: torch.Tensor) -> torch.Tensor:
    """[std, max, kurtosis] over classes, per sample."""
    centered = logp - logp.mean(dim=1, keepdim=True)
    std = _safe_std(centered).squeeze(1)
    kurt = (centered / std.unsqueeze(1)).pow(4).mean(dim=1)
    return torch.stack([std, logp.max(dim=1).values, kurt], dim=1)


class DynamicFusion(nn.Module):
    """alpha = MLP(stats); amplitude = alpha*sqrt(p_c) + sqrt(1-alpha^2)*sqrt(p_q)."""

    def __init__(self, hidden: int = 128):
        super().__init__()
        layers: list[nn.Module] = []
        width = 7
        for _ in range(3):
            layers += [nn.Linear(width, hidden), nn.BatchNorm1d(hidden), nn.LeakyReLU(0.2)]
            width = hidden
        self.mlp = nn.Sequential(*layers, nn.Linear(width, 1), nn.Sigmoid())

    def forward(self, logp_c: torch.Tensor, logp_q: torch.Tensor) -> torch.Tensor:
        a, b = logp_c - logp_c.mean(1, keepdim=True), logp_q - logp_q.mean(1, keepdim=True)
        corr = (a * b).mean(1) / (_safe_std(a) * _safe_std(b)).squeeze(1)
        stats = torch.cat([_moments(logp_c), _moments(logp_q), corr.unsqueeze(1)], dim=1)
        alpha = self.mlp(stats).clamp(0.0, 1.0 - 1e-6)
        # sqrt(p) as exp(log p / 2): sqrt's gradient is infinite where a probability
        # underflows to 0, which turned a whole training run into NaNs.
        amp = alpha * (0.5 * logp_c).exp() + (1 - alpha.pow(2)).sqrt() * (0.5 * logp_q).exp()
        p = amp.pow(2)
        return torch.log(p / p.sum(1, keepdim=True) + 1e-12)


class EntropyFusion(nn.Module):
    """Weights inversely proportional to each branch's entropy; no parameters."""

    def forward(self, logp_c: torch.Tensor, logp_q: torch.Tensor) -> torch.Tensor:
        inv_h = [1.0 / (-(lp.exp() * lp).sum(1, keepdim=True) + _EPS) for lp in (logp_c, logp_q)]
        w_c = inv_h[0] / (inv_h[0] + inv_h[1])
        p = w_c * logp_c.exp() + (1 - w_c) * logp_q.exp()
        return torch.log(p + 1e-12)


class HQCNN(nn.Module):
    """Backbone + quantum branch + fusion; returns log-probabilities like every model here."""

    def __init__(
        self,
        backbone: nn.Module,
        n_classes: int,
        circuit: CircuitSpec,
        *,
        projection: str = "learned",
        fusion: str = "dynamic",
        quantum_grad: str = "full",
        simulator: str = "compiled",
        device: str = "default.mixed",
        trajectories: int = 0,
        input_noise: float = 0.0,
    ):
        super().__init__()
        self.backbone = backbone
        self.n_classes = n_classes
        self.encoder = AngleEncoder(circuit.encoding, projection, n_classes, circuit.qubits)
        self.quantum = QuantumLayer(circuit, simulator=simulator, device=device, trajectories=trajectories)
        self.fusion = DynamicFusion() if fusion == "dynamic" else EntropyFusion()
        self.quantum_grad = quantum_grad
        self.input_noise = input_noise
        self.fixed_seed: int | None = None  # fix_randomness
        self.stochastic = hybrid_is_stochastic(
            circuit,
            n_classes,
            projection=projection,
            input_noise=input_noise,
            simulator=simulator,
            device=device,
            trajectories=trajectories,
        )

    def fix_randomness(self, seed: int) -> None:
        """Freeze the model to one draw (the fixed_randomness control): every call draws its
        projection and input noise afresh from its own generator seeded with `seed`, so every
        call is the same draw and the global generators (the attacks') are never touched."""
        if self.quantum.stochastic:  # trajectories sample inside the quantum layer
            raise ValueError(
                "fixed_randomness does not freeze Monte-Carlo trajectories; use an exact simulator"
            )
        self.fixed_seed = seed
        self.stochastic = False

    def _generator(self, device: torch.device, use: int) -> torch.Generator | None:
        """A fresh generator per use (0: input noise, 1: projection), so neither draw depends on
        how many numbers the other took (on the batch size)."""
        if self.fixed_seed is None:
            return None
        return torch.Generator(device=device).manual_seed(2 * self.fixed_seed + use)

    def quantum_logprobs(
        self, logits: torch.Tensor, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """(B, C) logits -> (B, C) log-probabilities; (k, B, C) -> (k, B, C), k draws."""
        features = logits.detach() if self.quantum_grad == "detached" else logits
        angles = self.encoder(features, generator)
        angles = angles.to(torch.float32) if angles.dtype != torch.float64 else angles
        probs = self.quantum(angles.flatten(0, -2)).view(*angles.shape[:-1], -1)
        c = self.n_classes
        if probs.shape[-1] < c:  # more classes than basis states: zero-pad (as the paper)
            probs = F.pad(probs, (0, c - probs.shape[-1]))
        probs = probs[..., :c]
        return torch.log(probs / (probs.sum(-1, keepdim=True) + 1e-12) + 1e-12)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.input_noise > 0:
            noise_generator = self._generator(x.device, 0)
            # frozen: one noise image for every point, so a point's output never depends on its batch
            shape = x.shape[1:] if noise_generator is not None else x.shape
            noise = torch.randn(shape, generator=noise_generator, device=x.device, dtype=x.dtype)
            x = x + self.input_noise * noise
        logits = self.backbone(x)
        projection = self._generator(x.device, 1)
        return self.fusion(torch.log_softmax(logits, dim=1), self.quantum_logprobs(logits, projection))

    def draws(self, x: torch.Tensor, k: int) -> torch.Tensor:
        """(k, B, C): k independent draws of forward(x) in one batched pass, for EOT and
        majority evaluation. A draw stays what it is: the paper projection's random matrix is
        one per draw, shared by that draw's copy of the batch (k stacked copies in one forward
        call would be one draw); input noise and trajectories are independent per row, so
        stacked copies are independent draws of them. Without input noise the backbone runs
        once. k = 1 is forward(x) itself; in training mode (batch statistics) this loops."""
        if k == 1 or self.training or self.fixed_seed is not None:
            return torch.stack([self(x) for _ in range(k)])
        b = x.shape[0]
        if self.input_noise > 0:
            copies = x.unsqueeze(0).expand(k, *x.shape).reshape(k * b, *x.shape[1:])
            logits = self.backbone(copies + self.input_noise * torch.randn_like(copies)).view(k, b, -1)
        else:
            logits = self.backbone(x).unsqueeze(0).expand(k, -1, -1)
        logp_q = self.quantum_logprobs(logits)
        out = self.fusion(torch.log_softmax(logits, dim=-1).flatten(0, 1), logp_q.flatten(0, 1))
        return out.view(k, b, -1)

    def differentiable_twin(self) -> "HQCNN":
        """Same weights, gradient flowing through the quantum branch (for BPDA)."""
        twin = copy.copy(self)  # shallow: shares every submodule and parameter
        twin.quantum_grad = "full"
        return twin
