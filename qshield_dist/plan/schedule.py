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
from array import array
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from qshield_dist.config import SweepConfig
from qshield_dist.executors.local import available_cpus
from qshield_dist.grid import Grid
from qshield_dist.vocabulary import STAGES


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
    cpus = available_cpus()
    if cfg.executor == "local":
        threads = max(cfg.resources.of(stage).resolved_threads for stage in STAGES)
        slowdown = max(1.0, cfg.workers * threads / cpus)
        note = f"local: {cfg.workers} worker(s) x {threads} thread(s) on {cpus} CPUs"
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


def _simulate(
    order: list[int],
    seconds: array,
    deps: list[list[int]] | None,
    held: list[tuple[float, float]],
    stage: list[str],
    slots: Slots,
    t0: float,
    start: array,
    end: array,
) -> None:
    """List-schedule the trials `order` (indices) from time t0, each after its `deps` (all among
    `order`; None: every dependency was done before t0), filling `start` and `end`. Integer
    indices and lists: a paper-scale grid has about 10^6 trials."""
    waiting = [0] * len(seconds)
    children: dict[int, list[int]] = {}
    for i in order if deps is not None else ():
        waiting[i] = len(deps[i])
        for d in deps[i]:
            children.setdefault(d, []).append(i)
    ready = {s: deque() for s in STAGES}  # one queue per resource shape: a big request blocks only its own
    for i in order:
        if not waiting[i]:
            ready[stage[i]].append(i)
    queues = list(ready.values())
    free_c, free_g = slots.cpus, slots.gpus
    running: list[tuple[float, int]] = []
    now = t0
    while True:
        for queue in queues:
            while queue:
                c, g = held[queue[0]]
                if c > free_c + 1e-9 or g > free_g + 1e-9:
                    break
                i = queue.popleft()
                free_c, free_g = free_c - c, free_g - g
                start[i] = now
                end[i] = now + seconds[i]
                heapq.heappush(running, (end[i], i))
        if not running:
            return
        now, i = heapq.heappop(running)
        c, g = held[i]
        free_c, free_g = free_c + c, free_g + g
        for child in children.get(i, ()):
            waiting[child] -= 1
            if not waiting[child]:
                ready[stage[child]].append(child)


def _waves(deps: list[list[int]]) -> list[list[int]]:
    """Trial indices by dependency depth (grid order is topological: a dependency comes first)."""
    level = [0] * len(deps)
    waves: dict[int, list[int]] = {}
    for i, ds in enumerate(deps):
        level[i] = max((level[d] + 1 for d in ds), default=0)
        waves.setdefault(level[i], []).append(i)
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
    trials = grid.trials
    pos = {t.trial_id: i for i, t in enumerate(trials)}
    deps = [[pos[d] for d in t.deps if d in pos] for t in trials]
    stage = [t.stage for t in trials]
    est = [estimates.get(t.trial_id) for t in trials]
    per_trial = startup if slots.trial_start else 0.0
    # C doubles, not 10^6 float objects to make and free
    seconds = array("d", (e.seconds * slots.slowdown + per_trial if e else 0.0 for e in est))

    @functools.cache
    def need(stage: str) -> tuple[float, float]:
        """What a trial holds while it runs; a request larger than the cluster runs alone."""
        if not slots.per_trial:
            return 1.0, 0.0
        res = cfg.resources.of(stage)
        return min(res.reserved_cpus, slots.cpus), min(res.gpus, slots.gpus)

    held = [need(t.stage) for t in trials]
    # The launcher's own imports, then (local, Ray) each worker's before its first trial.
    t0 = startup * (1 if slots.trial_start else 2)
    start, end = array("d", [t0]) * len(trials), array("d", [t0]) * len(trials)
    if slots.waves:
        now = t0
        for wave in _waves(deps):
            _simulate(wave, seconds, None, held, stage, slots, now, start, end)
            now = max((end[i] for i in wave), default=now)
    else:
        _simulate(list(range(len(trials))), seconds, deps, held, stage, slots, t0, start, end)
    critical = array("d", seconds)
    for i, ds in enumerate(deps):
        if ds:
            critical[i] += max([critical[d] for d in ds])
    rows = []
    first = 0
    for name, stage_trials in zip(STAGES, (grid.train, grid.attack, grid.diagnostic)):
        span = range(first, first + len(stage_trials))  # grid.trials is train, attack, diagnostic
        first = span.stop
        res = cfg.resources.of(name)
        limit_min = cfg.slurm.time_min if cfg.executor == "slurm" and cfg.slurm.time_min else res.timeout_min
        mem_gb = cfg.slurm.mem_gb if cfg.executor == "slurm" and cfg.slurm.mem_gb else res.mem_gb
        known = [i for i in span if est[i] is not None]
        longest = max(known, key=seconds.__getitem__, default=None)
        over_time: dict[str, list[float]] = {}
        over_mem: dict[str, list[float]] = {}
        for i in known:
            e = est[i]
            if seconds[i] > limit_min * 60:
                over_time.setdefault(e.item, []).append(seconds[i])
            if e.mem_mb > mem_gb * 1024:
                over_mem.setdefault(e.item, []).append(e.mem_mb)
        for item, values in over_time.items():
            warn(
                f"{len(values)} {name} trial(s) ({item}) will exceed the {name} timeout_min {limit_min}:"
                f" estimated up to {_duration(max(values))}"
            )
        for item, values in over_mem.items():
            warn(
                f"{len(values)} {name} trial(s) ({item}) will exceed the {name} mem_gb {mem_gb:g}:"
                f" estimated peak {max(values) / 1024:.1f} GB"
            )
        hours = sum(seconds[i] for i in known) / 3600
        rows.append(
            {
                "stage": name,
                "trials": len(span),
                "estimated": len(known),
                "cpu_hours": hours * res.reserved_cpus,
                "gpu_hours": hours * res.gpus,
                "longest_s": seconds[longest] if longest is not None else 0.0,
                "longest": est[longest].item if longest is not None else None,
                "peak_mem_mb": max((est[i].mem_mb for i in known), default=0.0),
                "wall_s": max(end[span.start : span.stop]) - min(start[span.start : span.stop])
                if span
                else 0.0,
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
        "wall_s": max(end, default=t0),
        "over_timeout": sum(r["over_timeout"] for r in rows),
        "over_mem": sum(r["over_mem"] for r in rows),
    }
    return {
        "sweep": cfg.name,
        "executor": cfg.executor,
        "parallelism": slots.note,
        "startup_s": startup,
        "critical_path_s": t0 + max(critical, default=0.0),
        "stages": rows,
        "total": total,
    }


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
