"""Where a sweep stands: `python -m qshield_dist.launch SWEEP.yaml --status [--json]`.

Each trial of the sweep's current grid is in one state, per stage:
- done: it has rows that count (results.current decides, as it does for resume; a train
  trial's checkpoint too);
- running / queued: it is not done and belongs to a task of a SLURM array the launcher
  recorded (lease.py) that squeue shows running / waiting (a failed trial resubmitted with
  --retry-failed is running or queued again); or a local launcher that holds the directory
  has it in a worker;
- in flight: a Ray launcher that holds the directory has submitted it and it is ready to run,
  and Ray does not say whether it runs or waits for resources;
- failed: its failure row counts and it is not in the queue;
- missing: none of these (never run, lost, rows of another version, a diagnostic held back).
Failures are grouped by the first line of their error, each group with a count and one trial.

SLURM is asked what runs; a local or Ray launcher says it through the lease's record of what it
started (lease.record_started), believed only while that launcher's heartbeat is fresh. Without
squeue, the trials of recorded arrays that are not done count as unknown, and running / queued
show as unknown: nothing is guessed.

Nothing is written and no result file is opened twice: the store's ledger is refreshed in
memory (only files new or changed since the lease holder last saved it are read), then the
counting is Polars operations over its entries; the rule of what counts (results.current) is
applied once per distinct combination of versions and status, not per trial. What still costs
Python time per entry is the ledger's own load and its conversion to a table
(`python -m qshield_dist.bench status` times it on 10^6 trials).
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any, Callable, Mapping

import polars as pl

from qshield_dist.executors.squeue import RUNNING_STATES, task_indices, task_states
from qshield_dist.lease import RecordedArray, ResultsLease
from qshield_dist.results.current import not_done_reason
from qshield_dist.results.store import ResultStore
from qshield_dist.vocabulary import STAGES

STATES = ("done", "running", "queued", "in_flight", "failed", "missing", "unknown")
NO_SQUEUE = "unknown (no squeue)"
SQUEUE_FAILED = "unknown (squeue failed)"
# What not_done_reason reads of a row; a null is joined on as a value no row has.
_RULE_COLUMNS = {
    "stage": "",
    "status": "",
    "schema_version": -1,
    "results_version": -1,
    "train_version": -1,
    "inputs_ok": False,
}


@dataclass
class Queue:
    """What SLURM says of the trials of the arrays recorded in a results directory."""

    source: str  # squeue | no SLURM array recorded | NO_SQUEUE | SQUEUE_FAILED
    arrays: int = 0  # recorded arrays still in the queue, or that squeue could not answer for
    running: list[str] = field(default_factory=list)
    queued: list[str] = field(default_factory=list)
    unknown: list[str] = field(default_factory=list)  # in arrays squeue could not answer for
    in_flight: list[str] = field(default_factory=list)  # a Ray launcher's: running or waiting
    launcher: str | None = None  # the executor of the launcher whose started trials are included

    def add_started(self, executor: str, trials: list[str]) -> None:
        """The trials a local or Ray launcher holding the directory has started (lease.py)."""
        self.launcher = executor
        if executor == "ray":  # Ray's 'started' is 'ready': running or waiting for resources
            self.in_flight += trials
        else:
            self.running += trials


def slurm_queue(
    arrays: Mapping[str, RecordedArray], states_of: Callable[[str], dict[str, str] | None] | None = None
) -> Queue:
    """The running and queued trials of `arrays`, from one squeue call per array (`states_of`:
    array id -> task id -> state, None when it cannot answer; default squeue.task_states). A
    task's trials run in it one after the other: all of them count as running while it runs."""
    if not arrays:
        return Queue("no SLURM array recorded")
    if states_of is None:
        if shutil.which("squeue") is None:
            return Queue(NO_SQUEUE, len(arrays), unknown=[k for a in arrays.values() for k in a.trials])
        states_of = task_states
    queue = Queue("squeue")
    for array_id, record in arrays.items():
        states = states_of(array_id)
        if states is None:
            queue.source = SQUEUE_FAILED
            queue.unknown += record.trials
        elif not states:
            continue  # it has left the queue
        elif record.packs is None:  # recorded without its tasks' trials: all wait, as far as we know
            queue.queued += record.trials
        else:
            for task, state in states.items():
                for index in task_indices(task, array_id):
                    if index < len(record.packs):
                        target = queue.running if state in RUNNING_STATES else queue.queued
                        target += record.packs[index]
        queue.arrays += 1
    return queue


def trial_states(store: ResultStore, expected: Mapping[str, str], queue: Queue) -> pl.DataFrame:
    """One row per expected trial (trial id -> stage): trial_id, stage, state, error (the first
    line of a failed trial's error). The store's ledger must be loaded (store.refresh())."""
    trials = pl.DataFrame(
        {"trial_id": list(expected), "stage": list(expected.values())},
        schema={"trial_id": pl.String, "stage": pl.String},
    )
    entries = pl.from_arrow(store.ledger.table(["rel", "trial_id", *_RULE_COLUMNS, "error"]))
    assert isinstance(entries, pl.DataFrame)
    entries = entries.join(trials.select("trial_id"), on="trial_id", how="semi")
    # The rule of what counts, applied once per distinct combination of what it reads (a few).
    combos = entries.select(list(_RULE_COLUMNS)).unique()
    counts = [not_done_reason(SimpleNamespace(**row), None) is None for row in combos.iter_rows(named=True)]
    combos = combos.with_columns(pl.Series("counts", counts, dtype=pl.Boolean))
    filled = [pl.col(c).fill_null(v) for c, v in _RULE_COLUMNS.items()]
    counted = entries.with_columns(filled).join(combos.with_columns(filled), on=list(_RULE_COLUMNS))
    counted = counted.filter("counts")
    # An ok train row counts only with its checkpoint, which the store checks (as resume does).
    train_ok = counted.filter((pl.col("stage") == "train") & (pl.col("status") == "ok"))
    unbacked = store.checkpoint_problems(train_ok.select("rel", "trial_id").iter_rows())
    if unbacked:
        rels, ids = zip(*unbacked)
        gone = pl.DataFrame({"rel": rels, "trial_id": ids}, schema={"rel": pl.String, "trial_id": pl.String})
        counted = counted.join(gone, on=["rel", "trial_id"], how="anti")
    per_trial = counted.group_by("trial_id").agg(
        stored=pl.when((pl.col("status") == "ok").any()).then(pl.lit("done")).otherwise(pl.lit("failed")),
        error=pl.col("error").filter(pl.col("status") != "ok").first(),
    )
    tid = pl.col("trial_id")
    stored = pl.col("stored")
    return (
        trials.join(per_trial.select("trial_id", "stored", "error"), on="trial_id", how="left")
        .with_columns(
            state=pl.when(stored == "done")
            .then(pl.lit("done"))
            .when(tid.is_in(queue.running))
            .then(pl.lit("running"))
            .when(tid.is_in(queue.queued))
            .then(pl.lit("queued"))
            .when(tid.is_in(queue.in_flight))
            .then(pl.lit("in_flight"))
            .when(tid.is_in(queue.unknown))
            .then(pl.lit("unknown"))
            .when(stored == "failed")
            .then(pl.lit("failed"))
            .otherwise(pl.lit("missing"))
        )
        .select("trial_id", "stage", "state", "error")
    )


def summarize_states(states: pl.DataFrame, queue: Queue) -> dict[str, Any]:
    """Per stage, the count of each state; the failures grouped by (stage, error)."""
    counted = states.group_by("stage", "state").len()
    stages: dict[str, dict[str, int | None]] = {}
    for stage in STAGES:
        mine = counted.filter(pl.col("stage") == stage)
        by_state = dict(zip(mine["state"].to_list(), mine["len"].to_list()))
        row: dict[str, int | None] = {"total": sum(by_state.values())}
        row.update({s: by_state.get(s, 0) for s in STATES})
        if queue.source == NO_SQUEUE:
            row["running"] = row["queued"] = None
        stages[stage] = row
    failures = (
        states.filter(pl.col("state") == "failed")
        .with_columns(pl.col("error").fill_null("(no error recorded)"))
        .group_by("stage", "error")
        .agg(count=pl.len(), example=pl.col("trial_id").min())
        .with_columns(
            order=pl.col("stage").replace_strict({s: i for i, s in enumerate(STAGES)}, default=len(STAGES))
        )
        .sort(["count", "order", "error"], descending=[True, False, False])
        .drop("order")
    )
    return {"stages": stages, "failures": failures.to_dicts()}


def sweep_status(store: ResultStore, expected: Mapping[str, str], queue: Queue) -> dict[str, Any]:
    """The status of `expected` (trial id -> stage) in a store whose ledger is loaded."""
    report = summarize_states(trial_states(store, expected, queue), queue)
    report["queue"] = {
        "source": queue.source,
        "arrays": queue.arrays,
        "unknown": len(queue.unknown),
        "launcher": queue.launcher,
    }
    return report


def collect(
    results_dir: str | os.PathLike[str], checkpoint_dir: str | os.PathLike[str], expected: Mapping[str, str]
) -> dict[str, Any]:
    """What `--status` prints: the store refreshed in memory (nothing is written), the recorded
    SLURM arrays asked of squeue, and the launcher that holds the directory, if any."""
    store = ResultStore(results_dir, checkpoint_dir)
    refreshed = store.refresh()  # not repair: only the lease holder writes the ledger
    lease = ResultsLease(results_dir)
    queue = slurm_queue(lease.recorded_arrays())
    started = lease.holders_started()
    if started is not None:
        queue.add_started(*started)
    report = sweep_status(store, expected, queue)
    holder = lease.holder()
    report.update(
        results=str(results_dir),
        files_read=refreshed.read,
        launcher=holder.describe() if holder else None,
    )
    return report


def render(report: dict[str, Any], name: str) -> str:
    """The report as a table for a person."""
    queue = report["queue"]
    cells = ("total", "done", "running", "queued", "failed", "missing")
    if any(row["in_flight"] for row in report["stages"].values()):
        cells = ("total", "done", "running", "queued", "in_flight", "failed", "missing")
    lines = [f"sweep {name} in {report['results']}", f"{'stage':11}" + "".join(f"{c:>10}" for c in cells)]
    for stage, row in report["stages"].items():
        lines.append(f"{stage:11}" + "".join(f"{'?' if row[c] is None else row[c]:>10}" for c in cells))
    if queue["unknown"]:
        lines.append(
            f"queued: {queue['source']}: {queue['unknown']} trials of {queue['arrays']} recorded SLURM arrays"
            " may be running, queued or lost; counted as unknown"
        )
    elif queue["source"] == "squeue":
        lines.append(f"running / queued: from squeue, {queue['arrays']} recorded SLURM arrays in the queue")
    elif not queue.get("launcher"):
        lines.append(f"running / queued: {queue['source']}")
    if queue.get("launcher") == "ray":
        lines.append(
            "in_flight: submitted by the Ray launcher, running or waiting for resources (Ray does not say which)"
        )
    elif queue.get("launcher"):
        lines.append(f"running: in the {queue['launcher']} launcher's workers")
    if report["launcher"]:
        lines.append(f"launcher: {report['launcher']} holds the directory")
    if report["failures"]:
        lines.append("failures, grouped by the first line of their error:")
        for group in report["failures"]:
            lines.append(
                f"  {group['count']:>7}  {group['stage']:10}  {group['error']}  (e.g. {group['example']})"
            )
    return "\n".join(lines)
