"""Training loop and the content-addressed checkpoint cache.

A checkpoint is `CHECKPOINTS/<train_trial_id>.pt`, written atomically and loaded with
`torch.load(weights_only=True)`: no pickle from an unknown source is ever executed. Reading it
retries an OSError (a transient NFS error is no reason to retrain); a file whose bytes do not
decode (truncated, corrupt, non-finite weights) is moved aside and the model is retrained.
Both return the sha256 of the checkpoint's bytes, which the train row records.
"""

from __future__ import annotations

import hashlib
import io
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from tqdm import tqdm

from qshield_dist.config import TrainConfig
from qshield_dist.fileio import atomic_write_bytes, read_bytes
from qshield_dist.train_methods import batch_loss

log = logging.getLogger(__name__)


@dataclass
class TrainStats:
    seconds: float
    epochs: int
    steps: int


def train_model(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    cfg: TrainConfig,
    seed: int,
    show_progress: bool = False,
) -> TrainStats:
    """Adam on the loss of `cfg.method` (train_methods.py; standard: NLL on log-probabilities),
    shuffled mini-batches; stops at max_steps if set. `cfg` is resolved (TrainConfig.resolved).
    The model and (x, y) are on one device; the shuffle is drawn on the host, so every device
    sees the same batches, and moved there once per epoch."""
    loss_of = batch_loss(model, cfg)
    generator = torch.Generator(device="cpu").manual_seed(seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    model.train()
    # A last batch of one sample is skipped (BatchNorm cannot train on it), so it is no step.
    steps_per_epoch = len(y) // cfg.batch_size + (len(y) % cfg.batch_size >= 2)
    if steps_per_epoch == 0:
        raise ValueError(f"training needs at least 2 samples, got {len(y)}")
    total = (
        cfg.epochs * steps_per_epoch
        if cfg.max_steps is None
        else min(cfg.max_steps, cfg.epochs * steps_per_epoch)
    )
    start, steps, epoch = time.perf_counter(), 0, 0
    # A diverged model predicts one class and "resists" every attack: fail loudly. Checked once
    # per epoch, so that no step waits for the device to say whether its loss was finite.
    finite = torch.ones((), dtype=torch.bool, device=y.device)
    with tqdm(total=total, desc="train", unit="step", disable=not show_progress, leave=False) as bar:
        while steps < total:
            epoch += 1
            order = torch.randperm(len(y), generator=generator, device="cpu").to(y.device)
            for i in range(0, len(y), cfg.batch_size):
                idx = order[i : i + cfg.batch_size]
                if len(idx) < 2:  # BatchNorm cannot train on a single sample
                    continue
                loss = loss_of(x[idx], y[idx])
                finite &= torch.isfinite(loss)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                steps += 1
                bar.update(1)
                if steps >= total:
                    break
            if not bool(finite):
                raise FloatingPointError(
                    f"training loss became non-finite in epoch {epoch} (steps up to {steps})"
                )
    model.eval()
    return TrainStats(time.perf_counter() - start, epoch, steps)


@torch.no_grad()
def predict(model: nn.Module, x: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
    model.eval()
    return torch.cat([model(x[i : i + batch_size]).argmax(1) for i in range(0, len(x), batch_size)])


def save_checkpoint(path: Path, model: nn.Module, meta: dict[str, Any], mode: int = 0o600) -> str:
    """Write the checkpoint atomically; returns the sha256 of its bytes."""
    buffer = io.BytesIO()
    torch.save({"state_dict": model.state_dict(), "meta": meta}, buffer)
    data = buffer.getvalue()
    atomic_write_bytes(path, data, mode)
    return hashlib.sha256(data).hexdigest()


def load_checkpoint(path: Path, model: nn.Module) -> tuple[dict[str, Any], str] | None:
    """Load weights into `model`; returns the stored meta and the sha256 of the file's bytes,
    or None if the file is absent or does not decode (then it is moved aside). An OSError that
    outlives fileio.read_bytes' retries is raised: the file may be fine, so it stays."""
    try:
        data = read_bytes(path)
    except FileNotFoundError:
        return None
    try:
        blob = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
        bad = [
            k for k, v in blob["state_dict"].items() if v.is_floating_point() and not torch.isfinite(v).all()
        ]
        if bad:
            raise ValueError(f"non-finite weights in {bad[0]} (and {len(bad) - 1} more)")
        model.load_state_dict(blob["state_dict"])
        return dict(blob["meta"]), hashlib.sha256(data).hexdigest()
    except Exception as exc:  # decoding bytes in memory: truncated zip, bad pickle opcode, wrong keys, ...
        bad = path.with_name(path.name + f".corrupt-{int(time.time())}")
        log.warning(
            "checkpoint %s is unusable (%s: %s); moved to %s, retraining",
            path,
            type(exc).__name__,
            exc,
            bad.name,
        )
        path.replace(bad)
        return None
