"""The classical models of the paper (dnn, cnn = ResNet-18) and a small CNN for CPU sweeps.

Each returns raw logits (`backbone_logits`); `Classifier` adds the log-softmax the paper's
models output, so every model in the project returns log-probabilities.

Their average pooling is a fixed `AvgPool2d` sized from the dataset's image size, not an
`AdaptiveAvgPool2d`: the adaptive one has no deterministic CUDA backward (torch raises under
deterministic algorithms), and for the sizes here the fixed one takes the same windows and
gives bit-identical values on the CPU (tests/test_device.py checks both).
"""

from __future__ import annotations

import torch
import torch.nn as nn
from torchvision.models import resnet18


def dnn(channels: int, size: int, classes: int) -> nn.Module:
    """flatten -> 512 -> 256 -> 128 -> C, each hidden layer Linear + BatchNorm + ReLU + Dropout(0.2)."""
    layers: list[nn.Module] = [nn.Flatten()]
    width = channels * size * size
    for hidden in (512, 256, 128):
        layers += [nn.Linear(width, hidden), nn.BatchNorm1d(hidden), nn.ReLU(), nn.Dropout(0.2)]
        width = hidden
    layers.append(nn.Linear(width, classes))
    return nn.Sequential(*layers)


def fixed_avg_pool(size: int, out: int) -> nn.Module:
    """AdaptiveAvgPool2d(out) on a known `size` x `size` input, as the AvgPool2d with the same
    windows (adaptive: [floor(i size/out), ceil((i+1) size/out))) where they have one kernel and
    one stride; else the adaptive module itself (no deterministic CUDA backward)."""
    starts = [i * size // out for i in range(out)]
    kernels = {-(-(i + 1) * size // out) - start for i, start in enumerate(starts)}
    strides = {b - a for a, b in zip(starts, starts[1:])} or {1}
    if len(kernels) == 1 and len(strides) == 1 and min(strides) >= 1:
        return nn.AvgPool2d(kernels.pop(), strides.pop())
    return nn.AdaptiveAvgPool2d(out)


def _pair(value: int | tuple[int, ...]) -> int:
    return value[0] if isinstance(value, tuple) else value


def _spatial(size: int, layers: list[nn.Module]) -> int:
    """The side of a square input after the strided layers given (convolutions, pooling)."""
    for layer in layers:
        k, s, p = (_pair(getattr(layer, a)) for a in ("kernel_size", "stride", "padding"))
        size = (size + 2 * p - k) // s + 1
    return size


def cnn(channels: int, size: int, classes: int) -> nn.Module:
    """torchvision ResNet-18, no pretrained weights, first conv taking `channels` inputs."""
    net = resnet18(weights=None, num_classes=classes)
    if channels != 3:
        net.conv1 = nn.Conv2d(channels, 64, kernel_size=7, stride=2, padding=3, bias=False)
    strided = [net.conv1, net.maxpool, *(layer[0].conv1 for layer in (net.layer2, net.layer3, net.layer4))]
    net.avgpool = fixed_avg_pool(_spatial(size, strided), 1)
    return net


def cnn_small(channels: int, size: int, classes: int) -> nn.Module:
    """Two conv blocks and a 128-unit head: trains in seconds on a CPU."""
    return nn.Sequential(
        nn.Conv2d(channels, 32, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        fixed_avg_pool(size // 4, 7),
        nn.Flatten(),
        nn.Linear(64 * 7 * 7, 128),
        nn.ReLU(),
        nn.Linear(128, classes),
    )


BACKBONES = {"dnn": dnn, "cnn": cnn, "cnn_small": cnn_small}


class Classifier(nn.Module):
    """A backbone's logits -> log-probabilities."""

    stochastic = False

    def __init__(self, backbone: nn.Module):
        super().__init__()
        self.backbone = backbone

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.log_softmax(self.backbone(x), dim=1)
