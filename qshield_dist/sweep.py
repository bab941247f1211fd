"""Run a sweep: validate -> grid -> (skip what is done) -> executor -> run_trial -> Parquet.

`run_sweep(config)` runs what is missing of a sweep and returns a SweepRun: every trial's
status and, read from the results directory when first asked for, the rows. Running it again
resumes: only what is missing runs (`retry_failed` also re-runs trials recorded as failed).
One launcher at a time per results directory (lease.py). The CLI (launch.py) and the public
API (`import qshield_dist`) both call it.
"""

from __future__ import annotations

import functools
import logging
import math
import signal
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Sequence, TextIO

from tqdm import tqdm

from qshield_dist import code_snapshot, executors
from qshield_dist.attack_params import budget_reachable
from qshield_dist.config import ConfigError, SweepConfig, SweepSpec, check_availability, validate
from qshield_dist.datasets import DATASETS
from qshield_dist.executors import Executor, Job, ProgressSink
from qshield_dist.executors.local import LocalExecutor, available_cpus
from qshield_dist.grid import Grid, Trial, build_grid
from qshield_dist.lease import ResultsLease
from qshield_dist.results.current import STAGE_VERSIONS
from qshield_dist.results.schema import package_versions
from qshield_dist.results.store import Done, ResultStore
from qshield_dist.resume import plan_launch, ready_diagnostics
from qshield_dist.vocabulary import STAGES

if TYPE_CHECKING:
    import polars as pl

    from qshield_dist.summary.load import Results
    from qshield_dist.trial import RunContext

log = logging.getLogger(__name__)


@dataclass(frozen=True, eq=False)
class SweepRun:
    """What run_sweep returns. `statuses`: every trial of the grid -> ok, failed, lost or
    waiting (a waiting trial did not run, see run_sweep; a trial done before keeps its recorded
    status); `ran`: the trials this call ran. `trials` is the same as a Polars frame, one row
    per trial: trial_id, stage, dataset, status, ran.

    The rows are read from the results directory when first asked for, once, as the summary
    reads them (summary/load.py): `train`, `attack` and `diagnostic` hold the usable ok rows
    of the sweep's grid at the current versions, one frame per stage since their columns
    differ; `failed` the failure rows; `results` everything else (rows with NaN metrics set
    aside, notes). With no usable row at all they raise SummaryError."""

    config: SweepConfig
    grid: Grid
    statuses: dict[str, str]  # trial id -> ok | failed | lost | waiting
    ran: frozenset[str]

    @property
    def results_dir(self) -> Path:
        return self.config.results_path

    @functools.cached_property
    def trials(self) -> pl.DataFrame:
        import polars as pl  # not in the launch itself: the CLI has no use for it

        trials = self.grid.trials
        return pl.DataFrame(
            {
                "trial_id": [t.trial_id for t in trials],
                "stage": [t.stage for t in trials],
                "dataset": [t.dataset for t in trials],
                "status": [self.statuses[t.trial_id] for t in trials],
                "ran": [t.trial_id in self.ran for t in trials],
            },
            schema={
                "trial_id": pl.String,
                "stage": pl.String,
                "dataset": pl.String,
                "status": pl.String,
                "ran": pl.Boolean,
            },
        )

    @functools.cached_property
    def results(self) -> Results:
        from qshield_dist.summary.load import load_results  # polars: only once rows are asked for

        return load_results(self.results_dir)

    @property
    def train(self) -> pl.DataFrame:
        return self.results.train

    @functools.cached_property
    def attack(self) -> pl.DataFrame:
        return self.results.attack.collect()  # the bulk: the summary keeps it lazy, a user wants rows

    @property
    def diagnostic(self) -> pl.DataFrame:
        return self.results.diagnostic

    @property
    def failed(self) -> pl.DataFrame:
        return self.results.failed


class BarProgress(ProgressSink):
    """Progress of the trials: done, failed, lost, running, ETA. On a terminal, a live tqdm
    bar; in a log file (the stream is not a terminal), one log line every LOG_EVERY_S seconds
    or every tenth of the trials, whichever comes first, and one at the end: a bar's
    carriage-return frames would fill the file (about 50 KB for the quick sweep)."""

    LOG_EVERY_S = 60.0
    LOG_LINES = 10  # lines for the trials' count, besides the ones that time adds

    def __init__(self, total: int, stream: TextIO | None = None):
        stream = stream or sys.stderr
        self.total = total
        self.running: set[str] = set()
        self.done = self.failed = self.lost = 0
        self.bar = (
            tqdm(total=total, desc="trials", unit="trial", dynamic_ncols=True, file=stream)
            if stream.isatty()
            else None
        )
        self.start = self.logged_at = time.monotonic()
        self.logged_done = 0
        self.every = max(1, math.ceil(total / self.LOG_LINES))

    def _refresh(self) -> None:
        if self.bar is not None:
            self.bar.set_postfix(failed=self.failed, lost=self.lost, running=len(self.running), refresh=False)
            self.bar.refresh()
        elif (
            self.done - self.logged_done >= self.every
            or time.monotonic() - self.logged_at >= self.LOG_EVERY_S
        ):
            self._log()

    def _log(self) -> None:
        elapsed = time.monotonic() - self.start
        eta = tqdm.format_interval(elapsed / self.done * (self.total - self.done)) if self.done else "?"
        log.info(
            "trials: %d/%d done (%d failed, %d lost), %d running, %s elapsed, ETA %s",
            self.done,
            self.total,
            self.failed,
            self.lost,
            len(self.running),
            tqdm.format_interval(elapsed),
            eta,
        )
        self.logged_at, self.logged_done = time.monotonic(), self.done

    def started(self, key: str) -> None:
        self.running.add(key)
        self._refresh()

    def finished(self, key: str, status: str) -> None:
        self.running.discard(key)
        self.done += 1
        self.failed += status == "failed"
        self.lost += status == "lost"
        if self.bar is not None:
            self.bar.update(1)
        self._refresh()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        elif self.logged_done != self.done or self.done == 0:
            self._log()


class StartedRecord(ProgressSink):
    """Forwards to `inner`, and keeps the lease's record of the trials started and not finished
    current (lease.record_started), so that `--status` can say what a local or Ray launch is
    running. Written at most every WRITE_EVERY_S: a change within that time of the last write
    is written by a timer when it runs out (an executor starts its trials in bursts)."""

    WRITE_EVERY_S = 1.0

    def __init__(self, inner: BarProgress, lease: ResultsLease, executor: str):
        self.inner, self.lease, self.executor = inner, lease, executor
        self.trials: set[str] = set()
        self.written_at = -math.inf
        self.closed = False
        # The executor's calls and the timer's write. Re-entrant: a signal's KeyboardInterrupt can land
        # between a `with` block's acquire and its release (CPython does not mask it there), and
        # close() in the main thread's `finally` must not then wait forever for its own lock.
        self._lock = threading.RLock()
        self._timer: threading.Timer | None = None

    def _changed(self) -> None:  # with the lock held
        wait = self.written_at + self.WRITE_EVERY_S - time.monotonic()
        if wait <= 0:
            self._record()
        elif self._timer is None:
            self._timer = threading.Timer(wait, self._flush)
            self._timer.daemon = True
            self._timer.start()

    def _flush(self) -> None:
        with self._lock:
            self._timer = None
            if not self.closed:
                self._record()

    def _record(self) -> None:  # with the lock held
        self.lease.record_started(self.executor, self.trials)
        self.written_at = time.monotonic()

    def started(self, key: str) -> None:
        with self._lock:
            self.trials.add(key)
            self._changed()
        self.inner.started(key)

    def finished(self, key: str, status: str) -> None:
        with self._lock:
            self.trials.discard(key)
            self._changed()
        self.inner.finished(key, status)

    def close(self) -> None:
        with self._lock:
            self.closed = True
            if self._timer is not None:
                self._timer.cancel()
            self.lease.clear_started()
        self.inner.close()


def make_jobs(trials: Sequence[Trial], cfg: SweepConfig, ctx: RunContext) -> list[Job]:
    from qshield_dist.trial import run_trial  # torch: only once something runs

    jobs = []
    for trial in trials:
        res = cfg.resources.of(trial.stage)
        jobs.append(
            Job(
                key=trial.trial_id,
                fn=functools.partial(run_trial, trial, ctx),
                deps=trial.deps,
                stage=trial.stage,
                cpus=res.reserved_cpus,
                gpus=res.gpus,
                mem_gb=res.mem_gb,
                timeout_min=res.timeout_min,
            )
        )
    return jobs


def make_executor(cfg: SweepConfig, durations: dict[str, float] | None = None) -> Executor:
    """The executor the sweep names, built from its section's plain values. durations: SLURM's
    expected minutes per trial, what it packs array tasks by (plan/durations.py)."""
    if cfg.executor == "local":
        params: dict[str, object] = {"workers": cfg.workers}
    elif cfg.executor == "ray":
        params = cfg.ray.model_dump()
    else:
        params = {
            **cfg.slurm.model_dump(exclude=set(STAGES)),
            "stages": cfg.slurm.stage_settings(),
            "folder": cfg.slurm.folder or str(cfg.results_path / ".submitit"),
            "durations": durations or {},
        }
    return executors.make(cfg.executor, **params)


def warn_oversubscribed(executor: Executor, trials: Sequence[Trial]) -> None:
    """Local workers that would run more threads than this machine has cores: said, not undone.
    The numbers do not depend on it (each trial fixes its threads), only the speed does, and
    --workers is the user's own choice (fewer workers silently would make it mean different
    things per sweep, and a run of two at once could then never be asked for)."""
    if not isinstance(executor, LocalExecutor) or not trials:
        return
    threads = max(t.threads for t in trials)
    cores = available_cpus()
    workers = 1 if executor.in_process else executor.workers
    if workers * threads <= cores:
        return
    stages = ", ".join(sorted({t.stage for t in trials if t.threads == threads}))
    fits = f"--workers {cores // threads} fits, or " if threads <= cores else ""
    log.warning(
        "local executor: %d worker(s) x %d threads per %s trial = %d threads on %d cores: trials contend"
        " for cores and run slower (the numbers do not change); %slower resources.<stage>.cpus, which"
        " the threads follow (that changes the trial ids)",
        workers,
        threads,
        stages,
        workers * threads,
        cores,
        fits,
    )


def slurm_durations(cfg: SweepConfig, grid: Grid, todo: Sequence[Trial], done: Done) -> dict[str, float]:
    """Expected minutes of the trials to run, for SLURM's packing, and a log line of where they
    come from."""
    from qshield_dist.plan.durations import expected_minutes

    expected = expected_minutes(cfg, grid, todo, done.seconds)
    log.info(
        "slurm packing by expected time: %d trials from finished trials of their kind, %d from --plan's"
        " cached calibration, %d with neither take their time limit (timeout_min)",
        expected.measured,
        expected.planned,
        expected.fallback,
    )
    return expected.minutes


def count_reasons(reasons: dict[Path, str] | dict[str, str]) -> str:
    counts: dict[str, int] = {}
    for reason in reasons.values():
        counts[reason] = counts.get(reason, 0) + 1
    return "; ".join(f"{n} {reason}" for reason, n in sorted(counts.items()))


def manifest_trials(grid: Grid) -> dict[str, dict[str, object]]:
    """What the summary needs of every expected trial: stage, dataset and results version."""
    return {
        t.trial_id: {"stage": t.stage, "dataset": t.dataset, "version": STAGE_VERSIONS[t.stage]}
        for t in grid.trials
    }


def prepare(cfg: SweepConfig, require_available: bool = True) -> Grid:
    """Validate, check this machine has the data and devices, expand: every bad input is a
    ConfigError here, before anything is computed or written. What only this machine lacks
    is a warning when nothing will run here (a dry run, a prune)."""
    spec = validate(cfg)
    problems = check_availability(spec)
    if problems and require_available:
        raise ConfigError("\n".join(problems))
    for problem in problems:
        log.warning("not available on this machine: %s", problem)
    check_custom_models(spec)
    grid = build_grid(spec)
    _warn_unreachable_budgets(grid)
    return grid


def check_custom_models(spec: SweepSpec) -> None:
    """Each custom model imports from a snapshot of its code (what its trials import), builds,
    and maps a dummy batch of each dataset's shape to logits of the right shape, on the CPU here
    (models/custom.py): ConfigError naming the entry."""
    custom = {}  # one check per distinct custom model (an axis of another field repeats it)
    for index, model in zip(spec.indices, spec.models):
        if model.custom is not None:
            custom.setdefault(model.custom, index)
    if not custom:
        return
    from qshield_dist.models.custom import CustomModelError, check_custom  # torch: only for them

    for model, index in custom.items():
        for name in spec.config.datasets:
            try:
                check_custom(model, DATASETS[name])
            except CustomModelError as exc:
                value = getattr(model, exc.key)
                raise ConfigError(
                    f"models[{index}].{exc.key}: got {value!r}: {exc} (dataset {name})"
                ) from None


def snapshot_custom_code(grid: Grid, results_dir: Path, mode: int) -> None:
    """Copy each custom model's code and weights into RESULTS/code, what its trials import and
    load (code_snapshot.py). ConfigError if they changed since the ids were made."""
    for custom in {t.model.custom for t in grid.train if t.model.custom is not None}:
        try:
            code_snapshot.take_snapshot(custom, results_dir, mode)
        except code_snapshot.SourceError as exc:
            raise ConfigError(f"models: factory '{custom.factory}': {exc}") from None


def _warn_unreachable_budgets(grid: Grid) -> None:
    warned = set()
    for t in grid.attack:
        if t.attack not in warned and not budget_reachable(t.params_dict):
            warned.add(t.attack)
            p = t.params_dict
            log.warning(
                "%s (%s preset): %d steps x %.4f cannot reach eps %.4f, so it may be weaker than FGSM;"
                " 'preset: standard' uses a step of 2.5 x eps / steps",
                t.attack,
                t.preset,
                p["steps"],
                p["alpha"],
                p["eps"],
            )


def run_sweep(
    cfg: SweepConfig,
    executor: Executor | None = None,
    *,
    retry_failed: bool = False,
    grid: Grid | None = None,
    take_over: bool = False,
) -> SweepRun:
    """Run what is missing of a sweep; the SweepRun gives 'ok', 'failed', 'lost' or 'waiting'
    for every trial of its grid (a trial done before keeps its recorded status; a waiting one
    did not run: a diagnostic whose attacks are not all ok, a trial of a SLURM array still
    queued, and what depends on it). `executor` defaults to the one the config names
    (make_executor); `grid`, prepare(cfg)'s, when the caller has it already. Bad input raises
    ConfigError before anything is computed or written. Holds the results directory's lease
    meanwhile: LeaseHeld if another launcher holds it (take_over: take a stale one, see
    lease.py)."""
    grid = grid or prepare(cfg)
    python_handles_sigint()
    results_dir = cfg.results_path
    mode = 0o700 if cfg.private else 0o755
    results_dir.mkdir(parents=True, exist_ok=True, mode=mode)
    Path(cfg.checkpoint_dir).mkdir(parents=True, exist_ok=True, mode=mode)
    lease = ResultsLease(results_dir)
    lease.acquire(take_over)
    try:
        statuses, ran = _run_held(cfg, executor, grid, lease, retry_failed)
    finally:
        lease.release()
    return SweepRun(cfg, grid, {t.trial_id: statuses[t.trial_id] for t in grid.trials}, frozenset(ran))


def python_handles_sigint() -> None:
    """Give SIGINT back to Python's own handler, so that a Ctrl-C stops a launch. A native
    library can take the signal over below Python, which still reports its handler as set:
    polars, on import, installs its own (for cancelling its queries), after which a Ctrl-C
    never reaches a launch (`import polars` before run_sweep, or a sequential launch, whose
    summary between looks imports it). signal.signal re-installs Python's handler at the C
    level; a SIGINT that was ignored (a background job's) stays ignored. Only the main thread
    may set a handler: a launch from another thread is left as it is."""
    if threading.current_thread() is not threading.main_thread():
        return
    handler = signal.getsignal(signal.SIGINT)
    if handler is not None and handler is not signal.SIG_IGN:  # None: set outside Python
        signal.signal(signal.SIGINT, handler)


def _run_held(
    cfg: SweepConfig, executor: Executor | None, grid: Grid, lease: ResultsLease, retry_failed: bool
) -> tuple[dict[str, str], set[str]]:
    """Statuses of every trial of the grid, and the trials this launch ran."""
    results_dir = cfg.results_path
    file_mode = cfg.file_mode
    store = ResultStore(results_dir, cfg.checkpoint_dir)
    store.refresh(repair=True, mode=file_mode)
    snapshot_custom_code(grid, results_dir, file_mode)
    expected = manifest_trials(grid)
    older = store.stale(expected, in_grid=True)
    if older:
        # Their trials run again under the same ids and would overwrite them.
        dest = store.move_aside(older)
        log.warning(
            "%d result files of this grid are not current (%s): moved to %s, their trials run again",
            len(older),
            count_reasons(older),
            dest,
        )
    stale = store.stale(expected)
    if stale:
        log.warning(
            "%d result files in %s are not this grid at the current versions (%s): not reused, set aside by the"
            " summary; --prune moves them",
            len(stale),
            results_dir,
            count_reasons(stale),
        )
    done = store.done(expected)
    if done.rerun:
        log.warning("%d trials run again: %s", len(done.rerun), count_reasons(done.rerun))
    plan = plan_launch(grid, done.status, lease.in_flight(), retry_failed)
    meta = {
        "sweep": cfg.name,
        "spec": cfg.model_dump(),
        # compare: resolved to variant ids now: the summary reads them as launched, never
        # re-resolving the spec against code (a custom model's) that may have changed since.
        "comparisons": [list(c) for c in grid.comparisons],
        "versions": package_versions(),
        "updated_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    store.write_manifest(meta, expected, file_mode)
    executor_name = executor.name if executor else cfg.executor
    todo = len(plan.now) + len(plan.after_attacks)
    if todo:
        from qshield_dist.trial import RunContext  # torch: only when something runs

        ctx = RunContext(
            sweep=cfg.name,
            results_dir=str(results_dir.resolve()),
            checkpoint_dir=str(Path(cfg.checkpoint_dir).resolve()),
            data_root=str(Path(cfg.data.data_root).resolve()),
            download=cfg.data.download,
            executor=executor_name,
            private=cfg.private,
        )
    log.info(
        "sweep %s: %d trials (%d train, %d attack, %d diagnostic), %d already done, %d to run on %s -> %s",
        cfg.name,
        len(grid.trials),
        len(grid.train),
        len(grid.attack),
        len(grid.diagnostic),
        len(plan.kept),
        todo,
        executor_name,
        results_dir,
    )
    previously_failed = sum(s == "failed" for s in plan.kept.values())
    if previously_failed:
        log.warning("%d trials are recorded as failed; re-run them with --retry-failed", previously_failed)
    statuses = dict(plan.kept)
    waiting = dict(plan.waiting)
    ran: list[str] = []
    if todo:
        if executor is None:
            durations = None
            if cfg.executor == "slurm":
                durations = slurm_durations(cfg, grid, [*plan.now, *plan.after_attacks], done)
            executor = make_executor(cfg, durations)
        warn_oversubscribed(executor, [*plan.now, *plan.after_attacks])
        progress: BarProgress | StartedRecord = BarProgress(todo)
        if hasattr(executor, "on_submit"):  # SLURM: record each array, so a relaunch does not resubmit it
            executor.on_submit = lease.record_array
        else:  # local, Ray: record what runs, for --status (SLURM's queue says that itself)
            progress = StartedRecord(progress, lease, ctx.executor)
        start = time.perf_counter()
        try:
            statuses.update(executor.run(make_jobs(plan.now, cfg, ctx), progress))
            if plan.after_attacks:
                store.refresh(repair=True, mode=file_mode)
                # The store says what is done; the executor, what was lost.
                attacks = {a for d in plan.after_attacks for a in d.attack_ids}
                found = {a: statuses.get(a, "missing") for a in attacks} | store.done(attacks).status
                ready, held = ready_diagnostics(plan.after_attacks, found)
                waiting.update(held)
                if ready:
                    statuses.update(executor.run(make_jobs(ready, cfg, ctx), progress))
        finally:
            progress.close()
            store.refresh(repair=True, mode=file_mode)  # the ledger learns the new files now, not next launch
        ran = [t.trial_id for t in [*plan.now, *plan.after_attacks] if t.trial_id in statuses]
        counts = {s: sum(statuses[t] == s for t in ran) for s in ("ok", "failed", "lost")}
        log.info(
            "done in %.1f s: %d ok, %d failed, %d lost; results in %s (summarize: python analysis/summarize.py %s)",
            time.perf_counter() - start,
            counts["ok"],
            counts["failed"],
            counts["lost"],
            results_dir,
            results_dir,
        )
        if counts["failed"]:
            log.warning("failed trials are recorded as rows; re-run them with --retry-failed")
    if waiting:
        log.warning("%d trials wait and did not run in this launch:", len(waiting))
        for key, why in list(waiting.items())[:10]:
            log.warning("  %s %s", key, why)
        if len(waiting) > 10:
            log.warning("  ... and %d more", len(waiting) - 10)
    statuses.update({key: "waiting" for key in waiting})
    return statuses, set(ran)
