"""What a launch runs: the grid against what the store counts as done, the SLURM arrays still
in flight, and the diagnostics' inputs.

- A trial whose stored rows count (ResultStore.done) is kept as it is: ok, or failed unless
  --retry-failed.
- A trial of a SLURM array that is still queued or running is in flight: not submitted again;
  what depends on it waits for a later launch.
- A diagnostic runs only on attack rows that are all ok. If its attacks are done and ok, it runs
  now; if some of them run in this launch, it runs after them, once they are ok; if one of
  them failed (and is not retried) or is lost, it waits, and runs in the launch that makes them ok.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping

from qshield_dist.grid import DiagnosticTrial, Grid, Trial


@dataclass
class LaunchPlan:
    kept: dict[str, str] = field(default_factory=dict)  # trial id -> ok | failed: done, not run again
    now: list[Trial] = field(default_factory=list)  # run first
    after_attacks: list[DiagnosticTrial] = field(default_factory=list)  # run once `now`'s attacks are ok
    waiting: dict[str, str] = field(default_factory=dict)  # trial id -> why it does not run in this launch


def plan_launch(
    grid: Grid, done: Mapping[str, str], in_flight: Mapping[str, str], retry_failed: bool
) -> LaunchPlan:
    """`done`: trial id -> ok | failed (ResultStore.done); `in_flight`: trial id -> SLURM array."""
    plan = LaunchPlan()
    plan.kept = {t: s for t, s in done.items() if s == "ok" or not retry_failed}
    runs: set[str] = set()
    for trial in grid.trials:  # dependencies come before their dependents
        key = trial.trial_id
        if key in plan.kept:
            continue
        if key in in_flight:
            plan.waiting[key] = f"in SLURM array {in_flight[key]}, still queued or running"
            continue
        blocked = next((d for d in trial.deps if d in plan.waiting), None)
        if blocked is not None:
            plan.waiting[key] = f"depends on {blocked}, which waits"
            continue
        if isinstance(trial, DiagnosticTrial):
            failed = [a for a in trial.attack_ids if plan.kept.get(a) == "failed"]
            if failed:
                plan.waiting[key] = attacks_not_ok({a: "failed" for a in failed})
                continue
            if any(a in runs for a in trial.attack_ids):
                plan.after_attacks.append(trial)
                continue
        plan.now.append(trial)
        runs.add(key)
    return plan


def ready_diagnostics(
    diagnostics: list[DiagnosticTrial], statuses: Mapping[str, str]
) -> tuple[list[DiagnosticTrial], dict[str, str]]:
    """Of diagnostics held for attacks that ran, those whose attacks are now all ok, and why
    the others wait. `statuses`: the attacks' statuses (ok, failed, lost)."""
    ready, waiting = [], {}
    for trial in diagnostics:
        not_ok = {a: statuses.get(a, "missing") for a in trial.attack_ids if statuses.get(a) != "ok"}
        if not_ok:
            waiting[trial.trial_id] = attacks_not_ok(not_ok)
        else:
            ready.append(trial)
    return ready, waiting


def attacks_not_ok(statuses: Mapping[str, str]) -> str:
    listed = ", ".join(f"{a} {s}" for a, s in sorted(statuses.items()))
    return f"waits for its attack trials to be ok ({listed}; a failed one runs again with --retry-failed)"
