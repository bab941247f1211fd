"""GPU checks: `python -m qshield_dist.bench gpu`, one JSON object per line.

- `compiled_layer`: the compiled quantum layer (the paper's circuit) in samples/s at batch
  4096, forward and forward+backward, on CUDA and on the CPU;
- `train_epoch`: one training epoch of the HQCNN (cnn_small and ResNet-18 backbones) on the
  digits set, on CUDA against the CPU;
- `pgd_batch`: a PGD-50 batch of 128 against the same models, on CUDA against the CPU;
- `lightning_trajectories`: the paper's circuit on `lightning.gpu` with Monte-Carlo
  trajectories, where that device is installed, in samples/s against the compiled layer;
- `parity`: sweeps/parity.yaml on CUDA, run twice by the launcher, each in its own process;
  the rows are compared byte for byte without the volatile columns. The same sweep on the CPU
  is then compared with the CUDA run computation by computation (the ids differ: the
  accelerator is part of them): which outcome columns differ, how many points flip.

On a machine without CUDA it prints one line saying so and exits 0. Each function takes its
device, so the same code runs on the CPU (tests/test_device.py).
"""

from __future__ import annotations

import json
import logging
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
import yaml

from qshield_dist.attacks import ATTACKS, CallCounter, build_attack
from qshield_dist.bench.quantum import PAPER_SPEC, _angles
from qshield_dist.config import ModelSpec, TrainConfig
from qshield_dist.data import load
from qshield_dist.datasets import DATASETS
from qshield_dist.models import build_model
from qshield_dist.quantum import CircuitSpec, QuantumLayer
from qshield_dist.results.store import ResultStore, differing_trials, read_parquet
from qshield_dist.train import train_model
from qshield_dist.trial_env import cuda_missing, fixed_numerics, gpu_model

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[2]
DATASET = "digits"  # embedded: no data files needed on the GPU node
BACKBONES = ("cnn_small", "cnn")


def _seconds(fn: Callable[[], Any], device: torch.device, repeats: int, warmup: int = 2) -> float:
    """Median wall seconds of fn(), the device's queue drained before and after each call."""

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _where(device: torch.device) -> dict[str, Any]:
    return {"device": str(device), "gpu_model": gpu_model(device), "threads": torch.get_num_threads()}


def compiled_layer(device: torch.device, batch: int = 4096, repeats: int = 20) -> dict[str, Any]:
    """Samples/s of the compiled layer on the paper's circuit, float32 angles as the model feeds."""
    spec = CircuitSpec(**PAPER_SPEC)
    layer = QuantumLayer(spec, "compiled")
    angles = _angles(spec.n_angles, batch, 0, torch.float32).to(device)
    weights = torch.randn(batch, 2**spec.qubits, generator=torch.Generator().manual_seed(1), device="cpu")
    weights = weights.to(device)

    def forward() -> None:
        with torch.no_grad():
            layer(angles)

    def forward_backward() -> None:
        x = angles.clone().requires_grad_(True)
        (layer(x) * weights).sum().backward()

    fwd, both = _seconds(forward, device, repeats), _seconds(forward_backward, device, repeats)
    return {
        "name": "gpu_compiled_layer",
        **_where(device),
        "batch": batch,
        "path": layer.path,
        "forward_samples_per_s": batch / fwd,
        "forward_backward_samples_per_s": batch / both,
    }


def _hybrid(backbone: str, device: torch.device) -> torch.nn.Module:
    info = DATASETS[DATASET]
    torch.manual_seed(0)
    with torch.device("cpu"):
        model = build_model(ModelSpec(model="hqcnn", backbone=backbone).resolved(info.classes), info)
    return model.to(device)


def train_epoch(backbone: str, device: torch.device, batch_size: int = 128) -> dict[str, Any]:
    """Seconds of one epoch of the HQCNN on the digits training split (one run: an epoch is long)."""
    train, _ = load(DATASET)
    x, y = train.x.to(device), train.y.to(device)
    model = _hybrid(backbone, device)
    cfg = TrainConfig(epochs=1, batch_size=batch_size)
    with fixed_numerics(torch.get_num_threads(), device):
        train_model(model, x[: 2 * batch_size], y[: 2 * batch_size], cfg, seed=0)  # warm-up
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        stats = train_model(model, x, y, cfg, seed=0)
    return {
        "name": f"gpu_train_epoch[{backbone}]",
        **_where(device),
        "samples": len(y),
        "batch": batch_size,
        "seconds": stats.seconds,
        "samples_per_s": len(y) / stats.seconds,
    }


def pgd_batch(
    backbone: str, device: torch.device, batch: int = 128, steps: int = 50, repeats: int = 3
) -> dict[str, Any]:
    """Seconds of PGD-`steps` on one batch of digits test images against the HQCNN."""
    _, test = load(DATASET)
    x, y = test.x[:batch].to(device), test.y[:batch].to(device)
    model = CallCounter(_hybrid(backbone, device).eval())
    params = ATTACKS["pgd"].params(DATASET, overrides={"steps": steps})
    attack = build_attack("pgd", model, params, DATASETS[DATASET].classes)
    with fixed_numerics(torch.get_num_threads(), device):
        seconds = _seconds(lambda: attack(x, y), device, repeats, warmup=1)
    return {
        "name": f"gpu_pgd{steps}_batch[{backbone}]",
        **_where(device),
        "batch": len(y),
        "seconds": seconds,
        "samples_per_s": len(y) / seconds,
    }


def lightning_trajectories(
    device: torch.device, batch: int = 256, trajectories: int = 16, repeats: int = 5
) -> dict[str, Any]:
    """The paper's (noisy) circuit on lightning.gpu, by trajectories, forward only: the other
    GPU path of a quantum layer. Its QNode takes host arrays (layer.py)."""
    spec = CircuitSpec(**PAPER_SPEC)
    row: dict[str, Any] = {"name": "gpu_lightning_trajectories", **_where(device), "batch": batch}
    try:
        layer = QuantumLayer(spec, "qnode", "lightning.gpu", trajectories=trajectories, seed=0)
    except Exception as exc:  # not installed, or no GPU it can use
        return {**row, "installed": False, "reason": f"{type(exc).__name__}: {exc}"}
    angles = _angles(spec.n_angles, batch, 0, torch.float32).to(device)

    def forward() -> None:
        with torch.no_grad():
            layer(angles)

    seconds = _seconds(forward, device, repeats, warmup=1)
    return {**row, "installed": True, "trajectories": trajectories, "forward_samples_per_s": batch / seconds}


def _launch(sweep: Path, results: Path) -> dict[str, Any]:
    start = time.perf_counter()
    cmd = [sys.executable, "-m", "qshield_dist.launch", str(sweep), "--results", str(results)]
    cmd += ["--checkpoints", str(results.with_name(results.name + "-ckpt")), "--workers", "1"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    files = list(ResultStore(results).files())
    return {
        "exit_code": proc.returncode,
        "seconds": time.perf_counter() - start,
        "trials": len(files),
        "failed": sorted(f.trial_id for f in files if f.failed),
        "stderr_tail": proc.stderr[-1500:] if proc.returncode else "",
    }


def _with_accelerator(sweep: Path, accelerator: str, folder: Path) -> Path:
    cfg = yaml.safe_load(sweep.read_text())
    gpus = 1 if accelerator == "cuda" else 0
    given = cfg.get("resources", {})  # the sweep's cpus, and so its threads, are kept
    cfg["resources"] = {
        stage: {**given.get(stage, {}), "accelerator": accelerator, "gpus": gpus}
        for stage in ("train", "attack")
    }
    path = folder / f"sweep-{accelerator}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


# What a trial computed, the columns a CPU and a CUDA run of one computation are compared on.
OUTCOME_COLUMNS = (
    "status",
    "clean_acc",
    "clean_acc_worst",
    "n_attacked",
    "n_success",
    "robust_acc",
    "linf_max",
    "l2_mean",
    "point_correct",
    "point_broken",
    "point_broken_by",
    "diagnostic_value",
    "diagnostic_pass",
)


def _by_computation(results: Path) -> dict[str, dict[str, Any]]:
    """Rows keyed by what they computed, without the trial id (which names the accelerator)."""
    rows = {}
    for file in ResultStore(results).files():
        for row in read_parquet(file.path):
            key = [row["stage"], row["variant_id"], row["seed"], row["attack"], row["attack_params"]]
            name = "|".join(str(k) for k in key + [row["diagnostic"]])
            if name in rows:  # two computations this key cannot tell apart (a transfer's surrogate)
                raise ValueError(f"{results}: two rows computed {name}; extend the comparison key")
            rows[name] = row
    return rows


def accelerator_differences(a: Path, b: Path) -> dict[str, Any]:
    """The computations two results directories share, compared on OUTCOME_COLUMNS: how many
    agree exactly, and for each that does not, the columns, the points whose outcome flips
    and the robust accuracy on each side."""
    rows_a, rows_b = _by_computation(a), _by_computation(b)
    shared = sorted(rows_a.keys() & rows_b.keys())
    differing = {}
    for key in shared:
        left, right = rows_a[key], rows_b[key]
        cols = [
            c
            for c in OUTCOME_COLUMNS
            if json.dumps(left[c], default=str) != json.dumps(right[c], default=str)
        ]
        if not cols:
            continue
        flips = {
            c: sum(x != y for x, y in zip(left[c] or [], right[c] or []))
            for c in ("point_correct", "point_broken")
            if c in cols
        }
        differing[key] = {
            "columns": cols,
            "points_flipped": flips,
            "robust_acc": [left["robust_acc"], right["robust_acc"]],
        }
    return {
        "shared": len(shared),
        "only_one_side": len(rows_a.keys() ^ rows_b.keys()),
        "identical": len(shared) - len(differing),
        "differing": differing,
    }


def parity(accelerator: str = "cuda", sweep: str | Path = REPO / "sweeps" / "parity.yaml") -> dict[str, Any]:
    """`sweep` with every stage on `accelerator`, launched twice (one worker process each):
    the trials whose rows differ, without the volatile columns (differing_trials). Where the
    accelerator is not the CPU, a third launch on the CPU, compared computation by computation
    (accelerator_differences)."""
    with tempfile.TemporaryDirectory(prefix="qshield-gpu-parity-") as tmp:
        folder = Path(tmp)
        path = _with_accelerator(Path(sweep), accelerator, folder)
        runs = [_launch(path, folder / f"run{i}") for i in (1, 2)]
        differing = differing_trials(folder / "run1", folder / "run2")
        row: dict[str, Any] = {
            "name": "gpu_parity",
            "accelerator": accelerator,
            "sweep": str(sweep),
            "runs": runs,
            "differing": differing,
            "identical": not differing and all(r["exit_code"] == 0 and r["trials"] for r in runs),
        }
        if accelerator != "cpu":
            row["cpu_run"] = _launch(_with_accelerator(Path(sweep), "cpu", folder), folder / "cpu")
            row["against_cpu"] = accelerator_differences(folder / "run1", folder / "cpu")
    return row


def run() -> Iterator[dict[str, Any]]:
    problem = cuda_missing()
    if problem is not None:
        yield {"name": "gpu", "cuda": False, "reason": problem}
        return
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    for device in (cuda, cpu):
        yield compiled_layer(device)
    for backbone in BACKBONES:
        for device in (cuda, cpu):
            yield train_epoch(backbone, device)
            yield pgd_batch(backbone, device)
    yield lightning_trajectories(cuda)
    yield parity()
