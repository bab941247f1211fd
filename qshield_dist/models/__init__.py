"""Model construction from a resolved ModelSpec."""

from __future__ import annotations

from pathlib import Path

import torch.nn as nn

from qshield_dist.config import ModelSpec
from qshield_dist.datasets import DatasetInfo
from qshield_dist.models.classic import BACKBONES, Classifier
from qshield_dist.models.custom import build_custom


def build_backbone(name: str, info: DatasetInfo) -> nn.Module:
    return BACKBONES[name](info.channels, info.size, info.classes)


def build_model(spec: ModelSpec, info: DatasetInfo, code_dir: Path | None = None) -> nn.Module:
    """A freshly initialised model; every model returns log-probabilities. A custom model is
    built from its code's snapshot under `code_dir` (RESULTS/code: code_snapshot.py)."""
    if spec.custom is not None:
        if code_dir is None:
            raise ValueError("a custom model is built from its code's snapshot: code_dir is needed")
        return build_custom(spec.custom, code_dir)
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
