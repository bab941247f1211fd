"""Model construction from a resolved ModelSpec."""

from __future__ import annotations

import torch.nn as nn

from qshield_dist.config import ModelSpec
from qshield_dist.datasets import DatasetInfo
from qshield_dist.models.classic import BACKBONES, Classifier


def build_backbone(name: str, info: DatasetInfo) -> nn.Module:
    return BACKBONES[name](info.channels, info.size, info.classes)


def build_model(spec: ModelSpec, info: DatasetInfo) -> nn.Module:
    """A freshly initialised model; every model returns log-probabilities."""
    if spec.model != "hqcnn":
        return Classifier(build_backbone(spec.model, info))
    from qshield_dist.models.hybrid import HQCNN

    return HQCNN(
        build_backbone(spec.backbone, info),
        info.classes,
        spec.circuit(),
        projection=spec.projection,
        fusion=spec.fusion,
        quantum_grad=spec.quantum_grad,
        simulator=spec.simulator,
        device=spec.device,
        trajectories=spec.trajectories,
        input_noise=spec.input_noise,
    )
