"""Benchmarks of the quantum layer; every function returns a list of JSON-able dicts.

- `compare_variants`: the paper's circuit (4 qubits, depth 1, full entanglement, mixed noise
  0.005, enhanced_angle) at batch 128, timed in one process: the authors' per-sample
  default.mixed loop (forward only), PennyLane broadcasting (forward+backward) and this
  project's compiled layer (forward+backward), each with its max abs error against a float64
  default.mixed reference.
- `qubit_scaling`: us/sample and peak memory against qubit count, one fresh subprocess per
  point (so peak RSS belongs to that point alone): compiled (exact, transfer matrix up to
  TRANSFER_MAX_QUBITS, density matrix above) and compiled forced onto the density-matrix path,
  2..10 qubits, forward+backward; lightning.qubit noiseless and with K trajectories,
  2..20 qubits, forward only (lightning's adjoint method cannot differentiate qml.probs, and
  the 2^n projector workaround is useless at large n). Batches shrink at large n; every row
  says which batch it used.
- `bench/quantum_plot.py`: `plot_scaling(rows, path)`, a PNG of both panels (time, memory).

Memory is the point subprocess's peak resident set (VmHWM, reset through /proc/self/clear_refs
after imports and input creation) minus its resident set at that moment: what the layer's
construction, first call and timed calls added at their peak, including PyTorch's and
PennyLane's allocator caches and temporary copies, at page resolution (`memory_method` says
if it had to fall back to a ru_maxrss delta). Not a tensor-level measurement (tracemalloc
does not see torch allocations).

Run: `python -m qshield_dist.bench quantum [--plot PATH]`, which writes one
JSON object per line on stdout.
"""

from __future__ import annotations

import json
import logging
import math
import statistics
import subprocess
import sys
import time
from typing import Any, Callable, Iterable

import torch

from qshield_dist.peak_memory import max_rss_bytes, peak_bytes, reset_peak, status_bytes

log = logging.getLogger(__name__)

PAPER_SPEC = dict(
    qubits=4,
    depth=1,
    entanglement="full",
    encoding="enhanced_angle",
    noise_model="mixed",
    noise_strength=0.005,
)
TARGETS = {"project_us_per_sample_max": 15.0, "speedup_vs_broadcast_min": 45.0, "speedup_vs_loop_min": 1000.0}


def _versions() -> dict[str, str]:
    import pennylane as qml

    out = {"torch": torch.__version__, "pennylane": qml.__version__}
    try:
        import pennylane_lightning

        out["pennylane_lightning"] = pennylane_lightning.__version__
    except Exception:  # optional
        pass
    return out


def _device() -> str:
    return f"cpu{torch.get_num_threads()}"


def _median_seconds(fn: Callable[[], Any], repeats: int, warmup: int = 1) -> tuple[float, list[float]]:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), times


def _angles(n_angles: int, batch: int, seed: int, dtype: torch.dtype) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return ((torch.rand(batch, n_angles, generator=g, dtype=torch.float64) * 2 - 1) * math.pi).to(dtype)


# --- paper circuit: three implementations timed side by side ---------------------------------


def _compare_variants(
    batch: int = 128,
    repeats: int = 7,
    loop_repeats: int = 3,
    threads: int | None = 1,
    seed: int = 0,
) -> list[dict[str, Any]]:
    """Time the three variants on the paper circuit in one process; median of `repeats`.

    threads=1 by default: at n=4 every tensor is tiny, so a second OpenMP thread only adds
    barrier cost, and on a shared 2-core machine it stalls badly (measured: 5 us/sample with
    1 thread vs 330 us/sample with 2 while another job used both cores). None keeps torch's
    setting; the `device` field always records the thread count used.
    """
    import pennylane as qml

    from qshield_dist.quantum import CircuitSpec, QuantumLayer, probs_qfunc

    if threads:
        torch.set_num_threads(threads)
    spec = CircuitSpec(**PAPER_SPEC)
    angles32 = _angles(spec.n_angles, batch, seed, torch.float32)  # what the hybrid model feeds
    angles64 = angles32.double()
    reference = QuantumLayer(spec, "qnode", "default.mixed")(angles64).detach()
    common = dict(
        name="quantum_layer",
        batch=batch,
        qubits=spec.qubits,
        spec=PAPER_SPEC,
        device=_device(),
        versions=_versions(),
    )
    rows: list[dict[str, Any]] = []

    # 1. The authors' way: one QNode call per sample on NumPy angles, forward only.
    qnode = qml.QNode(probs_qfunc(spec), qml.device("default.mixed", wires=spec.qubits))
    numpy_angles = angles64.numpy()
    loop_out: list = []

    def loop() -> None:
        loop_out.clear()
        loop_out.extend(qnode(numpy_angles[i]) for i in range(batch))

    sec, times = _median_seconds(loop, loop_repeats)
    err = (torch.stack([torch.as_tensor(p) for p in loop_out]) - reference).abs().max().item()
    rows.append(
        {
            **common,
            "variant": "per_sample_loop",
            "pass": "forward",
            "us_per_sample": sec / batch * 1e6,
            "max_abs_err": err,
            "repeats": loop_repeats,
        }
    )

    # 2. PennyLane broadcasting over the batch, backprop through default.mixed.
    # 3. This project's compiled layer (transfer matrix at 4 qubits).
    for variant, layer in (
        ("pennylane_broadcast", QuantumLayer(spec, "qnode", "default.mixed")),
        ("project", QuantumLayer(spec, "compiled")),
    ):
        x = angles32.clone().requires_grad_()
        weights = torch.randn(batch, 2**spec.qubits, generator=torch.Generator().manual_seed(seed + 1))
        out: dict[str, torch.Tensor] = {}

        def step() -> None:
            x.grad = None
            probs = layer(x)
            (probs * weights).sum().backward()
            out["p"] = probs.detach()

        n_rep = repeats if variant == "project" else max(3, repeats // 2)
        sec, times = _median_seconds(step, n_rep * (20 if variant == "project" else 1), warmup=3)
        err = (out["p"].double() - reference).abs().max().item()
        rows.append(
            {
                **common,
                "variant": variant,
                "pass": "forward+backward",
                "us_per_sample": sec / batch * 1e6,
                "max_abs_err": err,
                "repeats": len(times),
                "path": getattr(layer, "path", None),
                "dtype": "float32",
            }
        )

    by = {r["variant"]: r["us_per_sample"] for r in rows}
    project = rows[-1]
    project["speedup_vs_broadcast"] = by["pennylane_broadcast"] / by["project"]
    project["speedup_vs_loop"] = by["per_sample_loop"] / by["project"]
    project["targets"] = TARGETS
    project["targets_met"] = (
        by["project"] <= TARGETS["project_us_per_sample_max"]
        and project["speedup_vs_broadcast"] >= TARGETS["speedup_vs_broadcast_min"]
        and project["speedup_vs_loop"] >= TARGETS["speedup_vs_loop_min"]
    )
    return rows


# --- qubit scaling: one subprocess per point ------------------------------------------------


def compare_variants(*args: Any, **kwargs: Any) -> list[dict[str, Any]]:
    """The three variants side by side (see `_compare_variants`); torch's thread count is
    restored afterwards so later benchmarks in the same process are not pinned to one."""
    threads = torch.get_num_threads()
    try:
        return _compare_variants(*args, **kwargs)
    finally:
        torch.set_num_threads(threads)


def _memory_baseline() -> tuple[int, str]:
    """Reset the kernel's peak-RSS counter (VmHWM) where allowed, so the peak read afterwards
    belongs to the measured work and not to import-time transients; else fall back to the
    ru_maxrss high-water mark (then small points can read 0: below the import peak)."""
    current = status_bytes("VmRSS") if reset_peak() else None
    if current is not None:
        return current, "VmHWM-after-reset minus VmRSS-before"
    return max_rss_bytes(), "ru_maxrss delta"


def _memory_peak(method: str) -> int:
    return peak_bytes() if method.startswith("VmHWM") else max_rss_bytes()


def run_point(point: dict[str, Any]) -> dict[str, Any]:
    """Measure one scaling point in this process (call it in a fresh subprocess)."""
    from qshield_dist.quantum import CircuitSpec, QuantumLayer, estimate_bytes

    if point.get("threads"):
        torch.set_num_threads(point["threads"])
    n, batch = point["qubits"], point["batch"]
    spec = CircuitSpec(n, 1, "full", "enhanced_angle", point["noise_model"], 0.005)
    angles = _angles(spec.n_angles, batch, 0, torch.float32)
    grad = point["grad"]
    base, mem_method = _memory_baseline()
    t0 = time.perf_counter()
    layer = QuantumLayer(
        spec,
        point["simulator"],
        point.get("device", "default.mixed"),
        trajectories=point.get("trajectories", 0),
        seed=0,
        **({"compiled": point["compiled"]} if "compiled" in point else {}),
    )

    def step() -> None:
        if grad:
            x = angles.clone().requires_grad_()
            layer(x).sum().backward()
        else:
            with torch.no_grad():
                layer(angles)

    step()  # first call: compile / build caches / create QNodes
    first = time.perf_counter() - t0
    sec, times = _median_seconds(step, point["repeats"], warmup=0)
    peak = _memory_peak(mem_method)
    return {
        "name": "quantum_scaling",
        "variant": point["variant"],
        "qubits": n,
        "batch": batch,
        "pass": "forward+backward" if grad else "forward",
        "us_per_sample": sec / batch * 1e6,
        "first_call_s": first,
        "repeats": len(times),
        "peak_rss_delta_bytes": peak - base,
        "memory_method": mem_method,
        "estimate_bytes": estimate_bytes(
            spec,
            point["simulator"],
            point.get("device", "default.mixed"),
            batch,
            trajectories=point.get("trajectories", 0),
            grad=grad,
            compiled=point.get("compiled", "auto"),
        ),
        "path": layer.path,
        "noise_approx": layer.noise_approx,
        "trajectories": point.get("trajectories", 0),
        "noise_model": point["noise_model"],
        "device": _device(),
        "versions": _versions(),
    }


def _compiled_batch(n: int) -> int:
    return 128 if n <= 6 else {7: 32, 8: 8, 9: 4}.get(n, 2)


def _lightning_batch(n: int) -> int:
    return 64 if n <= 10 else 16 if n <= 14 else 4 if n <= 17 else 2


def scaling_points(
    compiled_qubits: Iterable[int] = range(2, 11),
    lightning_qubits: Iterable[int] = range(2, 21, 2),
    trajectories: int = 4,
    threads: int | None = 1,
) -> list[dict[str, Any]]:
    """Points for `qubit_scaling`; threads=1 by default for the same reason as `compare_variants`
    (on a shared 2-core machine a second thread made small-n timings swing by 100x)."""
    points = []
    for n in compiled_qubits:
        b = _compiled_batch(n)
        reps = 5 if n <= 8 else 3
        points.append(
            dict(
                variant="compiled",
                qubits=n,
                batch=b,
                simulator="compiled",
                noise_model="mixed",
                grad=True,
                repeats=reps,
            )
        )
        points.append(
            dict(
                variant="compiled_density",
                qubits=n,
                batch=b,
                simulator="compiled",
                compiled="density",
                noise_model="mixed",
                grad=True,
                repeats=reps,
            )
        )
    for n in lightning_qubits:
        b = _lightning_batch(n)
        base = dict(qubits=n, batch=b, simulator="qnode", device="lightning.qubit", grad=False, repeats=3)
        points.append(dict(base, variant="lightning_noiseless", noise_model="none"))
        points.append(
            dict(
                base,
                variant=f"lightning_trajectories_K{trajectories}",
                noise_model="mixed",
                trajectories=trajectories,
            )
        )
    for p in points:
        p["threads"] = threads
    return points


def qubit_scaling(
    points: list[dict[str, Any]] | None = None, timeout_s: float = 300.0
) -> list[dict[str, Any]]:
    """Run each point in its own Python subprocess; a failed or timed-out point becomes a row
    with an `error` field instead of stopping the sweep."""
    rows = []
    for point in points if points is not None else scaling_points():
        log.info("scaling point %s n=%d batch=%d", point["variant"], point["qubits"], point["batch"])
        cmd = [sys.executable, "-m", "qshield_dist.bench.quantum", json.dumps(point)]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
            lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
            if proc.returncode != 0 or not lines:
                raise RuntimeError(
                    proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else f"exit {proc.returncode}"
                )
            rows.append(json.loads(lines[-1]))
        except Exception as exc:  # timeout, OOM kill, device missing: record, keep going
            rows.append(
                {
                    "name": "quantum_scaling",
                    **{k: point[k] for k in ("variant", "qubits", "batch")},
                    "error": str(exc)[:300],
                }
            )
    return rows


def main(argv: list[str] | None = None) -> int:
    """Internal: measure one scaling point in this fresh process (clean peak memory)."""
    point = json.loads((argv or sys.argv[1:])[0])
    sys.stdout.write(json.dumps(run_point(point)) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
