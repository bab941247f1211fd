"""The classical models of the paper (dnn, cnn = ResNet-18) and a small CNN for CPU sweeps.

Each returns raw logits (`backbone_logits`); `Classifier` adds the log-softmax the paper's
models output, so every model in the project returns log-probabilities.
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


def cnn(channels: int, size: int, classes: int) -> nn.Module:
    """torchvision ResNet-18, no pretrained weights, first conv taking `channels` inputs."""
    net = resnet18(weights=None, num_classes=classes)
    if channels != 3:
        net.conv1 = nn.Conv2d(channels, 64, kernel_size=7, stride=2, padding=3, bias=False)
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
        nn.AdaptiveAvgPool2d(7),
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
