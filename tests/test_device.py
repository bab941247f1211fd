"""Trials follow the device their accelerator names (CPU here; the CUDA path is the same code).

- Every tensor the trial, attack, model, quantum and train code creates names its device
  (an `ast` walk), so nothing lands on the CPU by default in a CUDA trial.
- A trial run with an explicit device object has its parameters, batches and adversarial
  outputs on that device.
- The fixed pooling that replaces AdaptiveAvgPool2d (no deterministic CUDA backward) gives
  bit-identical values and gradients on the CPU.
- A CUDA trial in a process without CUDA records a failed row that says so.
- `python -m qshield_dist.bench gpu` without CUDA says so in one JSON line and exits 0.
"""

from __future__ import annotations

import ast
import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import qshield_dist.trial as trial_mod
from qshield_dist.config import SweepConfig, validate
from qshield_dist.datasets import DATASETS
from qshield_dist.grid import build_grid
from qshield_dist.models.classic import cnn, cnn_small, fixed_avg_pool
from qshield_dist.models.hybrid import window_means
from qshield_dist.trial import RunContext, run_trial

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "qshield_dist"

# --- tensor creation names a device ---------------------------------------------------------

FACTORIES = frozenset(
    {
        "zeros",
        "ones",
        "full",
        "rand",
        "randn",
        "randint",
        "randperm",
        "empty",
        "tensor",
        "as_tensor",
        "arange",
        "linspace",
        "eye",
    }
)
# The code a trial runs: its own module, data loading, training, the checks, attacks, models
# and the quantum layer.
TRIAL_CODE = [
    PACKAGE / name for name in ("trial.py", "trial_env.py", "train.py", "diagnostics.py", "data.py")
] + sorted(p for folder in ("attacks", "models", "quantum") for p in (PACKAGE / folder).glob("*.py"))
# (file relative to the package, enclosing function, factory) -> why it may leave the device
# to torch's default. Empty: every call names one. An entry that matches nothing fails.
ALLOWED: dict[tuple[str, str, str], str] = {}


def undeviced_factories(path: Path, root: Path = PACKAGE) -> list[tuple[str, str, str, int]]:
    """(file, enclosing function, factory, line) of each `torch.<factory>(...)` call in `path`
    without a `device=` keyword (`_like` forms take their input's device and are not listed)."""
    found = []

    def visit(node: ast.AST, scope: str) -> None:
        for child in ast.iter_child_nodes(node):
            inner = scope
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                inner = f"{scope}.{child.name}" if scope else child.name
            if (
                isinstance(child, ast.Call)
                and isinstance(child.func, ast.Attribute)
                and isinstance(child.func.value, ast.Name)
                and child.func.value.id == "torch"
                and child.func.attr in FACTORIES
                and not any(k.arg == "device" for k in child.keywords)
            ):
                found.append((str(path.relative_to(root)), scope, child.func.attr, child.lineno))
            visit(child, inner)

    visit(ast.parse(path.read_text(), str(path)), "")
    return found


def test_the_walk_finds_a_factory_without_a_device(tmp_path: Path) -> None:
    """The walk itself can fail: calls without device=, at module level and nested, are found;
    with device= or in a _like form they are not."""
    source = tmp_path / "qshield_dist" / "probe.py"
    source.parent.mkdir()
    source.write_text(
        "import torch\n"
        "A = torch.eye(2)\n"
        "class K:\n"
        "    def f(self, x):\n"
        "        return torch.zeros(3, dtype=x.dtype) + torch.rand_like(x) + torch.ones(1, device=x.device)\n"
    )
    found = undeviced_factories(source, source.parent)
    assert found == [("probe.py", "", "eye", 2), ("probe.py", "K.f", "zeros", 5)]


def test_trial_code_creates_every_tensor_on_a_named_device() -> None:
    assert len(TRIAL_CODE) > 15
    found = [hit for path in TRIAL_CODE for hit in undeviced_factories(path)]
    unexplained = [
        f"{f}:{line} in {scope or 'module'}: torch.{name}"
        for f, scope, name, line in found
        if (f, scope, name) not in ALLOWED
    ]
    assert not unexplained, (
        "tensor creation without device= (pass one, or add it to ALLOWED with a reason):\n"
        + "\n".join(unexplained)
    )
    stale = set(ALLOWED) - {(f, scope, name) for f, scope, name, _ in found}
    assert not stale, f"ALLOWED entries that match no call any more: {stale}"


# --- pooling without AdaptiveAvgPool2d --------------------------------------------------------


def _value_and_grad(module: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    x = x.clone().requires_grad_(True)
    out = module(x)
    out.backward(torch.randn(out.shape, generator=torch.Generator().manual_seed(1), device="cpu"))
    return out.detach(), x.grad


@pytest.mark.parametrize(
    "side,out",
    [(7, 7), (8, 7), (1, 1), (2, 1), (4, 2), (14, 7), (16, 4)],
)
def test_fixed_pooling_is_the_adaptive_one_bit_for_bit(side: int, out: int) -> None:
    x = torch.randn(3, 5, side, side, generator=torch.Generator().manual_seed(0), device="cpu")
    fixed = fixed_avg_pool(side, out)
    assert isinstance(fixed, nn.AvgPool2d), fixed  # equal windows: the deterministic module
    for a, b in zip(_value_and_grad(fixed, x), _value_and_grad(nn.AdaptiveAvgPool2d(out), x)):
        assert torch.equal(a, b)


def test_unequal_windows_keep_the_adaptive_pooling() -> None:
    """2 -> 7 has windows of one and two pixels: no AvgPool2d takes them (named in classic.py)."""
    assert isinstance(fixed_avg_pool(2, 7), nn.AdaptiveAvgPool2d)


@pytest.mark.parametrize("dataset", sorted(DATASETS))
def test_the_models_of_every_dataset_pool_without_adaptive_pooling(dataset: str) -> None:
    info = DATASETS[dataset]
    for build in (cnn_small, cnn):
        net = build(info.channels, info.size, info.classes)
        assert not [m for m in net.modules() if isinstance(m, nn.AdaptiveAvgPool2d)], (
            build.__name__,
            dataset,
        )


@pytest.mark.parametrize(
    "features,n", [(10, 1), (10, 2), (10, 3), (10, 4), (10, 7), (10, 10), (11, 4), (16, 6), (64, 12)]
)
def test_window_means_are_adaptive_avg_pool1d_bit_for_bit(features: int, n: int) -> None:
    z = torch.randn(6, features, generator=torch.Generator().manual_seed(features * n), device="cpu")
    ours = _value_and_grad(lambda t: window_means(t, n), z)
    theirs = _value_and_grad(lambda t: F.adaptive_avg_pool1d(t.unsqueeze(1), n).squeeze(1), z)
    for a, b in zip(ours, theirs):
        assert torch.equal(a, b)


# --- trials on an explicit device -------------------------------------------------------------

SWEEP = {
    "name": "device",
    "data": {"dataset": "digits", "train_size": 300, "test_size": 40},
    "train": {"epochs": 3, "batch_size": 32},
    "eval": {"attack_size": 8, "eval_repeats": 3},
    "models": [
        {"model": "cnn_small"},
        # stochastic: per-point streams, majority evaluation
        {"model": "hqcnn", "backbone": "cnn_small", "projection": "paper", "quantum_grad": "detached"},
    ],
    "attacks": [
        {"name": "fgsm"},
        {"name": "pgd", "params": {"steps": 2}},
        {"name": "square", "params": {"n_queries": 5}},
    ],
}


def _devices(values: Any) -> set[torch.device]:
    if isinstance(values, torch.Tensor):
        return {values.device}
    if isinstance(values, (tuple, list)):
        return set().union(*(_devices(v) for v in values)) if values else set()
    return set()


def test_a_trial_with_an_explicit_device_keeps_everything_on_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    device = torch.device("cpu")
    seen: dict[str, set[torch.device]] = {
        "parameters": set(),
        "batches": set(),
        "outputs": set(),
        "adversarial": set(),
    }
    calls = {"forward": 0, "attack": 0}

    def before(module: nn.Module, args: tuple[Any, ...]) -> None:
        calls["forward"] += 1
        seen["parameters"] |= {p.device for p in module.parameters(recurse=False)}
        seen["batches"] |= _devices(args)

    def after(module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        seen["outputs"] |= _devices(output)

    real_build = trial_mod.build_attack

    def recording_build(*args: Any, **kwargs: Any):
        attack = real_build(*args, **kwargs)
        forward = attack.forward

        def recorded(images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
            adv = forward(images, labels)
            calls["attack"] += 1
            seen["adversarial"] |= {adv.device}
            return adv

        attack.forward = recorded
        return attack

    monkeypatch.setattr(trial_mod, "build_attack", recording_build)
    ctx = RunContext(
        sweep="device", results_dir=str(tmp_path / "results"), checkpoint_dir=str(tmp_path / "ckpt")
    )
    handles = [
        nn.modules.module.register_module_forward_pre_hook(before),
        nn.modules.module.register_module_forward_hook(after),
    ]
    try:
        for trial in build_grid(validate(SweepConfig(**SWEEP))).trials:
            assert trial.accelerator == "cpu"
            assert run_trial(trial, ctx, device) == "ok", ctx.store.read(trial, failed=True)
            assert all(row["gpu_model"] is None for row in ctx.store.read(trial))
    finally:
        for handle in handles:
            handle.remove()
    assert calls["forward"] > 100 and calls["attack"] >= 6
    assert seen == {key: {device} for key in seen}, seen


def test_a_cuda_trial_without_cuda_records_a_failed_row_saying_so(tmp_path: Path) -> None:
    if torch.cuda.is_available():
        pytest.skip("this process has CUDA")
    sweep = {**SWEEP, "attacks": [{"name": "fgsm"}], "resources": {"train": {"gpus": 1}}}
    grid = build_grid(validate(SweepConfig(**sweep)))
    trial = grid.train[0]
    assert trial.accelerator == "cuda" and grid.attack[0].accelerator == "cpu"
    ctx = RunContext(
        sweep="device", results_dir=str(tmp_path / "results"), checkpoint_dir=str(tmp_path / "ckpt")
    )
    assert run_trial(trial, ctx) == "failed"
    [row] = ctx.store.read(trial, failed=True)
    assert row["status"] == "failed" and row["gpu_model"] is None
    assert "asks for accelerator 'cuda'" in row["error"] and "no CUDA device" in row["error"], row["error"]
    assert not list((tmp_path / "ckpt").rglob("*.pt"))  # nothing trained


# --- the GPU benchmark on a machine without CUDA ----------------------------------------------


def test_bench_gpu_without_cuda_says_so_and_exits_0() -> None:
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: the benchmark would run")
    proc = subprocess.run(
        [sys.executable, "-m", "qshield_dist.bench", "gpu"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stdout.splitlines()
    assert len(lines) == 1, proc.stdout
    row = json.loads(lines[0])
    assert row["name"] == "gpu" and row["cuda"] is False and "no CUDA device" in row["reason"], row


def test_bench_gpu_checks_run_on_any_device() -> None:
    """The GPU checks are device-agnostic code: here on the CPU, small."""
    from qshield_dist.bench import gpu

    cpu = torch.device("cpu")
    layer = gpu.compiled_layer(cpu, batch=64, repeats=2)
    assert layer["device"] == "cpu" and layer["gpu_model"] is None and layer["path"] == "transfer"
    # throughputs are benchmark figures (RESULTS.md), not asserted against each other: a timed
    # comparison fails when the machine is loaded
    assert math.isfinite(layer["forward_samples_per_s"]) and layer["forward_samples_per_s"] > 0
    assert (
        math.isfinite(layer["forward_backward_samples_per_s"]) and layer["forward_backward_samples_per_s"] > 0
    )
    pgd = gpu.pgd_batch("cnn_small", cpu, batch=4, steps=2, repeats=1)
    assert pgd["name"] == "gpu_pgd2_batch[cnn_small]" and pgd["batch"] == 4 and pgd["seconds"] > 0
    lightning = gpu.lightning_trajectories(cpu, batch=4, trajectories=2, repeats=1)
    if lightning["installed"]:
        assert lightning["forward_samples_per_s"] > 0
    else:
        assert "lightning.gpu" in lightning["reason"], lightning


def test_a_diverging_training_still_fails_loudly() -> None:
    """The loss is checked once per epoch (no host round trip per step), and still checked."""
    from qshield_dist.config import TrainConfig
    from qshield_dist.train import train_model

    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 3), nn.LogSoftmax(dim=1))
    with torch.no_grad():
        model[1].weight.fill_(float("nan"))
    x = torch.rand(8, 1, 2, 2, generator=torch.Generator().manual_seed(0), device="cpu")
    y = torch.arange(8, device="cpu") % 3
    with pytest.raises(FloatingPointError, match="non-finite in epoch 1"):
        train_model(model, x, y, TrainConfig(epochs=3, batch_size=4), seed=0)


# --- deterministic settings -------------------------------------------------------------------


def test_a_cuda_trial_runs_strictly_deterministic_and_a_cpu_trial_as_before() -> None:
    """Flags only (no CUDA call): strict deterministic algorithms, no TF32 and the cuBLAS
    workspace for CUDA; warn_only for the CPU, so a CPU row's settings are those of before."""
    from qshield_dist.trial_env import fixed_numerics

    before = (
        torch.are_deterministic_algorithms_enabled(),
        torch.is_deterministic_algorithms_warn_only_enabled(),
    )
    with fixed_numerics(1, torch.device("cuda")) as settings:
        assert torch.are_deterministic_algorithms_enabled()
        assert not torch.is_deterministic_algorithms_warn_only_enabled()
        assert not torch.backends.cudnn.allow_tf32 and not torch.backends.cuda.matmul.allow_tf32
        cuda = json.loads(settings)
    assert cuda["deterministic_algorithms"] == "on" and cuda["cublas_workspace_config"] == ":4096:8"
    with fixed_numerics(1, torch.device("cpu")) as settings:
        assert torch.is_deterministic_algorithms_warn_only_enabled()
        assert json.loads(settings) == {
            "threads": 1,
            "deterministic_algorithms": "warn_only",
            "cudnn_benchmark": False,
            "seeded": ["torch", "numpy", "random"],
        }
    assert (
        torch.are_deterministic_algorithms_enabled(),
        torch.is_deterministic_algorithms_warn_only_enabled(),
    ) == before


def test_the_cublas_workspace_is_set_when_a_worker_imports_the_trial_code() -> None:
    """cuBLAS reads CUBLAS_WORKSPACE_CONFIG at its first handle: importing the trial code (what
    a worker does before any trial) sets it; a value already given is kept."""
    code = "import os, qshield_dist.trial; print(os.environ['CUBLAS_WORKSPACE_CONFIG'])"
    env = {k: v for k, v in os.environ.items() if k != "CUBLAS_WORKSPACE_CONFIG"}
    for given, expected in ((None, ":4096:8"), (":16:8", ":16:8")):
        run_env = env if given is None else {**env, "CUBLAS_WORKSPACE_CONFIG": given}
        out = subprocess.run(
            [sys.executable, "-c", code], cwd=REPO, env=run_env, capture_output=True, text=True
        )
        assert out.returncode == 0, out.stderr[-2000:]
        assert out.stdout.strip() == expected


def test_cpu_and_cuda_runs_are_compared_computation_by_computation(tmp_path: Path) -> None:
    """bench gpu's CPU-vs-CUDA comparison pairs rows by what they computed (the ids differ: the
    accelerator is in them), and counts the identical ones and each other's flipped points."""
    from qshield_dist.bench.gpu import accelerator_differences
    from qshield_dist.results.store import ResultStore, TrialKey

    def row(accelerator: str, attack: str, broken: list[bool]) -> dict[str, Any]:
        return {
            "stage": "attack",
            "status": "ok",
            "trial_id": f"{attack}-{accelerator}",
            "dataset": "digits",
            "variant_id": "v1",
            "seed": 0,
            "attack": attack,
            "attack_params": "{}",
            "point_correct": [True] * 4,
            "point_broken": broken,
            "robust_acc": 1 - sum(broken) / 4,
        }

    runs = {
        "cuda": [row("cuda", "fgsm", [True, False, False, False]), row("cuda", "pgd", [True] * 4)],
        "cpu": [
            row("cpu", "fgsm", [True, False, False, False]),
            row("cpu", "pgd", [True, True, False, True]),
            row("cpu", "square", [False] * 4),
        ],
    }
    for name, rows in runs.items():
        for r in rows:
            ResultStore(tmp_path / name).write(TrialKey("attack", "digits", r["trial_id"]), [r])
    found = accelerator_differences(tmp_path / "cuda", tmp_path / "cpu")
    assert (found["shared"], found["identical"], found["only_one_side"]) == (2, 1, 1), found
    ((key, pgd),) = found["differing"].items()
    assert "pgd" in key and "fgsm" not in key
    assert pgd["columns"] == ["robust_acc", "point_broken"]
    assert pgd["points_flipped"] == {"point_broken": 1} and pgd["robust_acc"] == [0.0, 0.25]
