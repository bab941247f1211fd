"""The plan's schedule and table: estimated trials -> per-stage rows at the sweep's parallelism.

A list schedule, as the executors run a sweep: a trial starts once its dependencies are done
and its resources are free, in grid order (local: `workers` processes; Ray: the cluster's CPUs
and GPUs; SLURM: arrays of `array_parallelism` tasks, one per dependency wave, each after the
one before). O(N log N) in the number of trials.
"""

from __future__ import annotations

import functools
import heapq
import math
import os
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from qshield_dist.config import SweepConfig
from qshield_dist.executors.base import Resources
from qshield_dist.grid import Grid, Trial

STAGES = ("train", "attack", "diagnostic")


@dataclass
class Estimate:
    seconds: float
    mem_mb: float
    item: str  # the calibration it comes from (for warnings and the longest trial)


@dataclass
class Slots:
    """What runs at once: capacity in CPUs and GPUs (local and SLURM: one per trial)."""

    cpus: float
    gpus: float
    per_trial: bool  # each trial needs its stage's resources (Ray); else one slot each
    waves: bool = False  # SLURM: each dependency wave waits for the one before
    trial_start: bool = False  # each trial is a fresh process (SLURM array tasks)
    slowdown: float = 1.0
    note: str = ""


def _available_cpus() -> int:
    return len(os.sched_getaffinity(0))


def _ray_cluster(cfg: SweepConfig) -> tuple[float, float] | None:
    """(CPUs, GPUs) of the configured Ray cluster when one is reachable from here."""
    try:
        import ray
    except ImportError:
        return None
    address = cfg.ray.address
    started_here = os.environ.get("RAY_ADDRESS") or Path("/tmp/ray/ray_current_cluster").exists()
    if address == "auto" and not started_here:
        return None  # no cluster started on this machine: do not start one
    try:
        ray.init(address=address, logging_level="ERROR", log_to_driver=False, ignore_reinit_error=True)
        res = ray.cluster_resources()
        return float(res.get("CPU", 0)), float(res.get("GPU", 0))
    except Exception:  # ConnectionError and Ray's own errors: unreachable
        return None
    finally:
        if ray.is_initialized():
            ray.shutdown()


def capacity(cfg: SweepConfig, warn: Callable[[str], None]) -> Slots:
    cpus = _available_cpus()
    if cfg.executor == "local":
        slowdown = max(1.0, cfg.workers * cfg.threads / cpus)
        note = f"local: {cfg.workers} worker(s) x {cfg.threads} thread(s) on {cpus} CPUs"
        if slowdown > 1:
            note += f" (oversubscribed: trials taken {slowdown:.2f}x slower)"
        return Slots(cfg.workers, math.inf, False, slowdown=slowdown, note=note)
    if cfg.executor == "slurm":
        p = cfg.slurm.array_parallelism
        return Slots(
            p,
            math.inf,
            False,
            waves=True,
            trial_start=True,
            note=f"slurm: {p} array tasks at once per wave, queue waits not included",
        )
    found = _ray_cluster(cfg)
    if found:
        note = f"ray: the cluster at {cfg.ray.address}: {found[0]:g} CPUs, {found[1]:g} GPUs"
        return Slots(*found, True, note=note)
    need_gpus = max(cfg.resources.train.gpus, cfg.resources.attack.gpus)
    gpus = max(need_gpus, 1.0)
    warn(
        f"ray cluster at '{cfg.ray.address}' not reachable from here: wall time assumes a cluster of this"
        f" machine's {cpus} CPUs and {gpus:g} GPU(s); run --plan on the cluster to use its real size"
    )
    return Slots(float(cpus), gpus, True, note=f"ray (assumed): {cpus} CPUs, {gpus:g} GPU(s)")


def _resources(cfg: SweepConfig, stage: str) -> Resources:
    return cfg.resources.train if stage == "train" else cfg.resources.attack


def _simulate(
    trials: list[Trial],
    seconds: dict[str, float],
    need: Callable[[Trial], tuple[float, float]],
    slots: Slots,
    t0: float,
) -> tuple[dict[str, float], dict[str, float]]:
    """List-schedule `trials` (deps among them first) from time t0 -> (start, end) per trial."""
    index = {t.trial_id: t for t in trials}
    # what each trial holds while it runs; a request larger than the cluster runs alone
    held = {}
    for t in trials:
        c, g = need(t)
        held[t.trial_id] = (min(c, slots.cpus), min(g, slots.gpus))
    waiting = {t.trial_id: sum(d in index for d in t.deps) for t in trials}
    children: dict[str, list[str]] = {}
    for t in trials:
        for d in t.deps:
            if d in index:
                children.setdefault(d, []).append(t.trial_id)
    ready = {s: deque() for s in STAGES}  # one queue per resource shape: a big request blocks only its own
    for t in trials:
        if not waiting[t.trial_id]:
            ready[t.stage].append(t.trial_id)
    free_c, free_g = slots.cpus, slots.gpus
    start: dict[str, float] = {}
    end: dict[str, float] = {}
    running: list[tuple[float, str]] = []
    now = t0
    while True:
        for queue in ready.values():
            while queue:
                c, g = held[queue[0]]
                if c > free_c + 1e-9 or g > free_g + 1e-9:
                    break
                key = queue.popleft()
                free_c, free_g = free_c - c, free_g - g
                start[key], end[key] = now, now + seconds[key]
                heapq.heappush(running, (end[key], key))
        if not running:
            return start, end
        now, key = heapq.heappop(running)
        c, g = held[key]
        free_c, free_g = free_c + c, free_g + g
        for child in children.get(key, ()):
            waiting[child] -= 1
            if not waiting[child]:
                ready[index[child].stage].append(child)


def _waves(grid: Grid) -> list[list[Trial]]:
    level: dict[str, int] = {}
    waves: dict[int, list[Trial]] = {}
    for t in grid.trials:  # grid order is topological: a dependency comes before its dependents
        level[t.trial_id] = max((level[d] + 1 for d in t.deps if d in level), default=0)
        waves.setdefault(level[t.trial_id], []).append(t)
    return [waves[k] for k in sorted(waves)]


def schedule(
    cfg: SweepConfig,
    grid: Grid,
    estimates: dict[str, Estimate],
    slots: Slots,
    startup: float,
    warn: Callable[[str], None],
) -> dict[str, Any]:
    """Per-stage rows and a total: trials, CPU-hours, GPU-hours, longest trial, peak memory, wall."""
    per_trial = startup if slots.trial_start else 0.0
    seconds = {
        t.trial_id: estimates[t.trial_id].seconds * slots.slowdown + per_trial
        if t.trial_id in estimates
        else 0.0
        for t in grid.trials
    }

    @functools.cache
    def stage_need(stage: str, threads: int) -> tuple[float, float]:
        if not slots.per_trial:
            return 1.0, 0.0
        res = _resources(cfg, stage)
        return max(res.cpus, threads), res.gpus

    def need(t: Trial) -> tuple[float, float]:
        return stage_need(t.stage, t.threads)

    # The launcher's own imports, then (local, Ray) each worker's before its first trial.
    t0 = startup * (1 if slots.trial_start else 2)
    if slots.waves:
        start, end, now = {}, {}, t0
        for wave in _waves(grid):
            s, e = _simulate(wave, seconds, need, slots, now)
            start.update(s)
            end.update(e)
            now = max(e.values(), default=now)
    else:
        start, end = _simulate(grid.trials, seconds, need, slots, t0)
    critical: dict[str, float] = {}
    for t in grid.trials:
        before = max((critical[d] for d in t.deps if d in critical), default=0.0)
        critical[t.trial_id] = before + seconds[t.trial_id]
    rows = []
    for stage in STAGES:
        trials = [t for t in grid.trials if t.stage == stage]
        res = _resources(cfg, stage)
        limit_min = cfg.slurm.time_min if cfg.executor == "slurm" and cfg.slurm.time_min else res.timeout_min
        mem_gb = cfg.slurm.mem_gb if cfg.executor == "slurm" and cfg.slurm.mem_gb else res.mem_gb
        known = [t for t in trials if t.trial_id in estimates]
        longest = max(known, key=lambda t: seconds[t.trial_id], default=None)
        over_time: dict[str, list[float]] = {}
        over_mem: dict[str, list[float]] = {}
        for t in known:
            e = estimates[t.trial_id]
            if seconds[t.trial_id] > limit_min * 60:
                over_time.setdefault(e.item, []).append(seconds[t.trial_id])
            if e.mem_mb > mem_gb * 1024:
                over_mem.setdefault(e.item, []).append(e.mem_mb)
        for item, values in over_time.items():
            warn(
                f"{len(values)} {stage} trial(s) ({item}) will exceed the {stage} timeout_min {limit_min}:"
                f" estimated up to {_duration(max(values))}"
            )
        for item, values in over_mem.items():
            warn(
                f"{len(values)} {stage} trial(s) ({item}) will exceed the {stage} mem_gb {mem_gb:g}:"
                f" estimated peak {max(values) / 1024:.1f} GB"
            )
        hours = sum(seconds[t.trial_id] for t in known) / 3600
        rows.append(
            {
                "stage": stage,
                "trials": len(trials),
                "estimated": len(known),
                "cpu_hours": hours * max(res.cpus, cfg.threads),
                "gpu_hours": hours * res.gpus,
                "longest_s": seconds[longest.trial_id] if longest else 0.0,
                "longest": estimates[longest.trial_id].item if longest else None,
                "peak_mem_mb": max((estimates[t.trial_id].mem_mb for t in known), default=0.0),
                "wall_s": _span(trials, start, end),
                "over_timeout": sum(map(len, over_time.values())),
                "over_mem": sum(map(len, over_mem.values())),
            }
        )
    total = {
        "stage": "total",
        "trials": len(grid.trials),
        "estimated": sum(r["estimated"] for r in rows),
        "cpu_hours": sum(r["cpu_hours"] for r in rows),
        "gpu_hours": sum(r["gpu_hours"] for r in rows),
        "longest_s": max(r["longest_s"] for r in rows),
        "longest": max(rows, key=lambda r: r["longest_s"])["longest"],
        "peak_mem_mb": max(r["peak_mem_mb"] for r in rows),
        "wall_s": max(end.values(), default=t0),
        "over_timeout": sum(r["over_timeout"] for r in rows),
        "over_mem": sum(r["over_mem"] for r in rows),
    }
    return {
        "sweep": cfg.name,
        "executor": cfg.executor,
        "parallelism": slots.note,
        "startup_s": startup,
        "critical_path_s": t0 + max(critical.values(), default=0.0),
        "stages": rows,
        "total": total,
    }


def _span(trials: list[Trial], start: dict[str, float], end: dict[str, float]) -> float:
    """From the first start of a stage's trials to their last end (stages overlap)."""
    return max(end[t.trial_id] for t in trials) - min(start[t.trial_id] for t in trials) if trials else 0.0


def _duration(s: float) -> str:
    if s < 90:
        return f"{s:.0f} s"
    if s < 5400:
        return f"{s / 60:.1f} min"
    if s < 2 * 86400:
        return f"{s / 3600:.1f} h"
    return f"{s / 86400:.1f} d"


def _hours(h: float) -> str:
    return f"{h:.3f}" if h < 10 else f"{h:,.0f}"


def render(report: dict[str, Any]) -> str:
    """The plan as a table, like --dry-run's."""
    lines = [
        f"plan for sweep {report['sweep']} ({report['parallelism']})",
        f"{'stage':11} {'trials':>8} {'CPU-h':>10} {'GPU-h':>10} {'longest trial':>14}  {'peak mem':>9}"
        f" {'wall':>10}",
    ]
    for r in [*report["stages"], report["total"]]:
        mem = f"{r['peak_mem_mb'] / 1024:.1f} GB" if r["estimated"] else "-"
        longest = _duration(r["longest_s"]) if r["estimated"] else "-"
        hours = f"{_hours(r['cpu_hours']):>10} {_hours(r['gpu_hours']):>10}"
        wall = _duration(r["wall_s"])
        lines.append(f"{r['stage']:11} {r['trials']:>8,} {hours} {longest:>14}  {mem:>9} {wall:>10}")
    total = report["total"]
    if total["estimated"] < total["trials"]:
        lines.append(f"{total['trials'] - total['estimated']:,} trials have no estimate (see the warnings)")
    if total["longest"]:
        lines.append(f"longest: {total['longest']}")
    lines.append(
        f"wall includes {_duration(report['startup_s'])} of process start-up; with unlimited"
        f" parallelism (the critical path): {_duration(report['critical_path_s'])}"
    )
    c = report.get("calibration")
    if c:
        lines.append(
            f"calibration: {c['items']} representative trials ({c['cached']} cached) in"
            f" {c['seconds']:.0f} s on {c['machine']['host']} ({c['machine']['cpu']});"
            f" cache {c['cache']}"
        )
    if c and c["slowdown"] > 1.1:
        lines.append(
            f"times are an idle machine's: the calibration ran {c['slowdown']:.2f}x slower than its"
            f" CPU time here (load average {c['load_average']:.1f}); at that load the wall would be"
            f" about {_duration(total['wall_s'] * c['slowdown'])}"
        )
    if report.get("warnings"):
        lines.append(f"{len(report['warnings'])} warning(s), logged above")
    return "\n".join(lines)
