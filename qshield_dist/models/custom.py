"""The user's own model (`model: custom`): built from its code's snapshot, and checked once in
the launcher before any compute.

The contract: the factory, called with the entry's `kwargs`, returns a `torch.nn.Module` that
maps a batch of images in [0, 1], shaped (N, C, H, W) as the dataset's, to logits (N, classes).
The project's own code reads log-probabilities (training's NLL loss, the attacks' wrappers,
evaluation), so the module is wrapped in `Classifier`, the log-softmax the built-in classical
models get: that is the whole adapter. Options:

- `weights`: a state_dict of the factory's module (`torch.save(net.state_dict(), path)`),
  loaded instead of training;
- `stochastic: true`: the module draws fresh randomness on every call; it is evaluated by the
  majority rule over `eval.eval_repeats` draws and attacked with EOT, as a stochastic hybrid;
- `differentiable_twin`: a function called with the trained module, returning a module of the
  same contract (sharing its weights: the launcher checks that every parameter of it is one of
  the module's) whose gradient BPDA attacks, and PGD-AT and TRADES training, use in place of
  the model's.
"""

from __future__ import annotations

import importlib
import io
import tempfile
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn as nn

from qshield_dist import code_snapshot
from qshield_dist.config import CustomSpec
from qshield_dist.datasets import DatasetInfo
from qshield_dist.fileio import read_bytes
from qshield_dist.models.classic import Classifier

CHECK_BATCH = 2  # the dummy batch the launcher runs each custom model on


class CustomModelError(ValueError):
    """A custom model breaks its contract; `key` is the entry's key at fault."""

    def __init__(self, key: str, message: str):
        super().__init__(message)
        self.key = key


class CustomClassifier(Classifier):
    """The user's logits module -> log-probabilities, with its declared randomness."""

    def __init__(self, net: nn.Module, stochastic: bool):
        super().__init__(net)
        self.stochastic = stochastic


class CustomClassifierWithTwin(CustomClassifier):
    """A custom model whose entry names a differentiable twin (BPDA)."""

    def __init__(self, net: nn.Module, stochastic: bool, twin: Callable[[nn.Module], Any]):
        super().__init__(net, stochastic)
        self.twin = twin

    def differentiable_twin(self) -> CustomClassifier:
        return CustomClassifier(_module(self.twin(self.backbone), "differentiable_twin"), self.stochastic)


def _function(module: Any, ref: code_snapshot.FactoryRef, key: str) -> Callable[..., Any]:
    function = getattr(module, ref.function, None)
    if function is None:
        raise CustomModelError(key, f"module '{ref.module}' has no attribute '{ref.function}'")
    if not callable(function):
        raise CustomModelError(key, f"'{ref.name}' is a {type(function).__name__}, not callable")
    return function


def _module(net: Any, key: str) -> nn.Module:
    if not isinstance(net, nn.Module):
        raise CustomModelError(key, f"returned a {type(net).__name__}, not a torch.nn.Module")
    return net


def _build(custom: CustomSpec, root: Path, names: frozenset[str]) -> CustomClassifier:
    """The model from the snapshot of its source tree at `root`."""
    ref = code_snapshot.parse_ref(custom.factory)
    twin_ref = code_snapshot.parse_ref(custom.differentiable_twin) if custom.differentiable_twin else None
    try:
        with code_snapshot.imported(root, names, ref.module) as module:
            factory = _function(module, ref, "factory")
            twin = None
            if twin_ref is not None:
                twin = _function(importlib.import_module(twin_ref.module), twin_ref, "differentiable_twin")
            try:
                net = _module(factory(**custom.kwargs), "factory")
            except CustomModelError:
                raise
            except Exception as exc:
                raise CustomModelError("factory", f"calling it raised {type(exc).__name__}: {exc}") from exc
    except CustomModelError:
        raise
    except Exception as exc:  # the user's module raised while being imported
        raise CustomModelError("factory", f"does not import: {type(exc).__name__}: {exc}") from exc
    if twin is None:
        return CustomClassifier(net, custom.stochastic)
    return CustomClassifierWithTwin(net, custom.stochastic, twin)


def build_custom(custom: CustomSpec, code_dir: Path) -> CustomClassifier:
    """A custom model as a trial builds it: from its snapshot under `code_dir` (RESULTS/code)."""
    folder = Path(code_dir) / str(custom.code)
    if not folder.is_dir():
        raise FileNotFoundError(f"no snapshot of the custom model's code at {folder}: launch the sweep again")
    return _build(custom, folder, code_snapshot.snapshot_names(folder))


def load_weights(model: CustomClassifier, path: Path) -> None:
    """The user's state_dict (or a checkpoint of this project, which holds one) into `model`."""
    blob = torch.load(io.BytesIO(read_bytes(path)), map_location="cpu", weights_only=True)
    if isinstance(blob, dict) and isinstance(blob.get("state_dict"), dict):
        blob = blob["state_dict"]
    model.backbone.load_state_dict(blob)


@torch.no_grad()
def _check_output(model: nn.Module, info: DatasetInfo, key: str) -> None:
    shape = (CHECK_BATCH, info.channels, info.size, info.size)
    x = torch.rand(
        shape, generator=torch.Generator(device="cpu").manual_seed(0), device="cpu"
    )  # the launcher checks on its CPU
    model.eval()
    try:
        out = model(x)
    except Exception as exc:
        raise CustomModelError(
            key, f"on a batch of shape {shape} it raised {type(exc).__name__}: {exc}"
        ) from exc
    expected = (CHECK_BATCH, info.classes)
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != expected:
        got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise CustomModelError(
            key,
            f"on a batch of shape {shape} ({info.name}) it returned {got}; expected logits of shape {expected}",
        )


def check_custom(custom: CustomSpec, info: DatasetInfo) -> CustomClassifier:
    """The launcher's check of a custom model on the CPU, from a snapshot of its code taken as
    the launcher takes it for the trials (into a temporary folder: the check writes nothing
    under the results directory), so it imports exactly what they will: it imports, builds a
    module, loads its weights, and maps one dummy batch of the dataset's shape to logits of the
    right shape (and so does its twin). CustomModelError names the key at fault. Returns the
    model it built (with its weights, if any), in eval mode: its modules stay loaded after the
    temporary snapshot is removed."""
    with tempfile.TemporaryDirectory(prefix="qshield-check-") as tmp:
        try:
            code_snapshot.take_snapshot(custom, tmp, 0o600)
        except code_snapshot.SourceError as exc:
            raise CustomModelError("factory", str(exc)) from None
        model = build_custom(custom, code_snapshot.snapshot_root(tmp))
        _check_output(model.backbone, info, "factory")
        if custom.weights_sha256 is not None:
            try:
                load_weights(model, code_snapshot.weights_path(tmp, custom.weights_sha256))
            except Exception as exc:
                raise CustomModelError(
                    "weights", f"does not load into the module: {type(exc).__name__}: {exc}"
                ) from exc
        if isinstance(model, CustomClassifierWithTwin):
            try:
                twin = model.differentiable_twin()
            except CustomModelError:
                raise
            except Exception as exc:
                raise CustomModelError(
                    "differentiable_twin", f"calling it raised {type(exc).__name__}: {exc}"
                ) from exc
            _check_output(twin.backbone, info, "differentiable_twin")
            # BPDA follows the twin's gradient while the model trains (PGD-AT, TRADES): a copy
            # would hold the weights as they were built
            own = {p.data_ptr() for p in model.backbone.parameters()}
            copied = [name for name, p in twin.backbone.named_parameters() if p.data_ptr() not in own]
            if copied:
                raise CustomModelError(
                    "differentiable_twin",
                    f"its parameters must be the trained module's own (shared, not copied); {len(copied)} are"
                    f" not, e.g. '{copied[0]}'",
                )
    return model.eval()
