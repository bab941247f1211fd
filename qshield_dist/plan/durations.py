"""Each trial's expected minutes, for SLURM packing by expected time (executors/slurm_packing.py).

The launcher asks here before it builds a SLURM executor. A trial's expected time is, first:
- the median seconds measured by the sweep's finished trials of its kind (kinds.cost_key: its
  stage, model kind, attack and preset, dataset and sizes): their rows' trial_seconds, the
  whole trial (loading, clean evaluation, training, attack or checks), diagnostics included;
- else the estimate of a --plan of the sweep cached on this machine (plan.cached_estimates);
- else none: the packing takes the trial's time limit (its stage's timeout_min), which packs it
  alone unless pack_minutes exceeds that. The launcher logs how many trials each source covers.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from typing import Any, Iterable

from qshield_dist.config import SweepConfig
from qshield_dist.grid import Grid, Trial
from qshield_dist.plan import cached_estimates
from qshield_dist.plan.kinds import cost_key


@dataclass
class Expected:
    minutes: dict[str, float]  # trial id -> expected minutes, for the trials that have an estimate
    measured: int  # trials whose minutes come from finished trials of their kind
    planned: int  # ... from --plan's cached calibration
    fallback: int  # trials with neither: their time limit stands in


def expected_minutes(
    cfg: SweepConfig, grid: Grid, todo: Iterable[Trial], finished_seconds: dict[str, float]
) -> Expected:
    """Expected minutes of the trials `todo`, from `finished_seconds` (trial id -> the seconds
    its row measured: store.done(...).seconds) and the plan cache (see the module docstring)."""
    kinds: dict[Any, tuple[Any, ...]] = {}
    by_id = {t.trial_id: t for t in grid.trials}
    seconds_of: dict[tuple[Any, ...], list[float]] = {}
    for trial_id, seconds in finished_seconds.items():
        if trial_id in by_id:
            seconds_of.setdefault(cost_key(by_id[trial_id], kinds), []).append(seconds)
    median = {key: statistics.median(values) for key, values in seconds_of.items()}
    out = Expected({}, 0, 0, 0)
    rest = []
    for t in todo:
        seconds = median.get(cost_key(t, kinds))
        if seconds is None:
            rest.append(t)
        else:
            out.minutes[t.trial_id] = seconds / 60
            out.measured += 1
    planned = cached_estimates(cfg, grid) if rest else {}
    for t in rest:
        if t.trial_id in planned:
            out.minutes[t.trial_id] = planned[t.trial_id] / 60
            out.planned += 1
        else:
            out.fallback += 1
    return out
