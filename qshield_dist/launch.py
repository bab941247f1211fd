"""python -m qshield_dist.launch SWEEP.yaml [--executor local|ray|slurm] [--dry-run] [--status] [--compact] ...

The command line of a sweep: it parses the arguments and calls the library (sweep.py's
run_sweep, which `import qshield_dist` exports), or one of the commands that only read or
tidy a results directory (--dry-run, --plan, --status, --prune, --compact). Bad input exits
with code 2 before anything is computed or written. Running the same command again runs only
what is missing; `--retry-failed` also re-runs trials recorded as failed. One launcher at a
time per results directory (lease.py): a second one exits with code 2.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import signal
import sys
from typing import Iterator, Sequence

from qshield_dist.config import ConfigError, SweepConfig, UntilDecided, read_config
from qshield_dist.grid import AttackTrial, Grid, TrainTrial, many_objects
from qshield_dist.lease import LeaseHeld, ResultsLease
from qshield_dist.results.store import ResultStore
from qshield_dist.sweep import count_reasons, manifest_trials, prepare, run_sweep

log = logging.getLogger("qshield_dist.launch")


def dry_run_table(grid: Grid, done: dict[str, str]) -> str:
    lines = [f"{'id':18} {'stage':7} {'state':8} {'dataset':12} {'seed':>4}  model / attack"]
    for t in grid.trials:
        train = t if isinstance(t, TrainTrial) else t.train
        what = f"{train.model.label} {train.train.label}".strip()
        if isinstance(t, AttackTrial):
            what += f" / {t.attack} ({t.preset})" + (f" [{t.control}]" if t.control else "")
        lines.append(
            f"{t.trial_id:18} {t.stage:7} {done.get(t.trial_id, 'todo'):8} {t.dataset:12} {train.seed:>4}  {what}"
        )
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m qshield_dist.launch", description="Run a QShield sweep.")
    p.add_argument(
        "sweep", nargs="?", default="sweeps/quick.yaml", help="sweep YAML (default sweeps/quick.yaml)"
    )
    p.add_argument("--results", help="results directory (default results/<sweep name>)")
    p.add_argument("--checkpoints", help="checkpoint cache directory (default from the YAML: checkpoints)")
    p.add_argument("--data-root", help="dataset directory (overrides data.data_root)")
    p.add_argument("--executor", choices=["local", "ray", "slurm"])
    p.add_argument("--workers", type=int, help="local executor: worker processes")
    p.add_argument("--ray-address", help="ray executor: 'auto' or host:port of a running cluster")
    p.add_argument("--dry-run", action="store_true", help="print the trials and run nothing")
    p.add_argument(
        "--plan",
        action="store_true",
        help="estimate time and memory per stage from a short calibration on this machine, write no result, run no sweep",
    )
    p.add_argument(
        "--status",
        action="store_true",
        help="per stage: trials done, running, queued (squeue), failed and missing, and the failures grouped"
        " by error; writes nothing, runs nothing",
    )
    p.add_argument("--json", action="store_true", help="with --plan or --status: print it as JSON")
    p.add_argument("--retry-failed", action="store_true", help="also re-run trials recorded as failed")
    p.add_argument(
        "--until-decided",
        type=int,
        metavar="MAX_POINTS",
        help="grow the attack set in looks of whole shards until every verdict is decided or MAX_POINTS"
        " per seed are run (sets eval.until_decided.max_points; decide.py)",
    )
    p.add_argument(
        "--looks",
        type=int,
        metavar="N",
        help="with a sequential launch: stop after N of its planned looks (a later launch resumes; the"
        " boundaries stay the whole plan's)",
    )
    p.add_argument(
        "--take-over",
        action="store_true",
        help="take the results directory's lease from a launcher whose heartbeat is stale (refused while it is"
        " fresh or its SLURM arrays are queued)",
    )
    p.add_argument(
        "--prune",
        action="store_true",
        help="move result files of other versions or outside this grid to RESULTS.pruned-<time>/ (nothing is deleted), then exit",
    )
    p.add_argument(
        "--compact",
        action="store_true",
        help="merge the finished trials' result files into a few large Parquet files per stage and dataset"
        " (and move a directory of the flat layout into folders), then exit",
    )
    p.add_argument("-v", "--verbose", action="store_true")
    return p.parse_args(argv)


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(signal.Signals(signum).name)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    # A plan, a dry run, a status or a prune only reads the grid, for seconds: no cyclic garbage
    # collection at all then (trials are acyclic, and each scan of 10^6 of them takes a second).
    reads_only = args.plan or args.dry_run or args.prune or args.status
    with many_objects() if reads_only else contextlib.nullcontext():
        return _command(args)


def _command(args: argparse.Namespace) -> int:
    try:
        if args.workers is not None and args.workers < 1:
            raise ConfigError(f"--workers: got {args.workers}: must be an integer >= 1")
        overrides = {
            "results_dir": args.results,
            "checkpoint_dir": args.checkpoints,
            "executor": args.executor,
            "workers": args.workers,
        }
        cfg = read_config(args.sweep, overrides)
        update = {}
        if args.data_root:
            update["data"] = cfg.data.model_copy(update={"data_root": args.data_root})
        if args.ray_address:
            update["ray"] = cfg.ray.model_copy(update={"address": args.ray_address})
        if args.until_decided is not None:
            if args.until_decided < 1:
                raise ConfigError(f"--until-decided: got {args.until_decided}: must be an integer >= 1")
            plan = cfg.eval.until_decided or UntilDecided(max_points=args.until_decided)
            plan = plan.model_copy(update={"max_points": args.until_decided})
            update["eval"] = cfg.eval.model_copy(update={"until_decided": plan})
        cfg = cfg.model_copy(update=update)
        if args.looks is not None and (args.looks < 1 or cfg.eval.until_decided is None):
            raise ConfigError(
                f"--looks: got {args.looks}: allowed: an integer >= 1, with a sequential launch"
                " (eval.until_decided or --until-decided)"
            )
        nothing_runs = args.dry_run or args.prune or args.plan or args.status or args.compact
        grid = prepare(cfg, require_available=not nothing_runs)
    except ConfigError as exc:
        log.error("bad sweep input (%s):\n%s", args.sweep, exc)
        return 2

    results_dir = cfg.results_path
    if args.plan:
        from qshield_dist.plan import run_plan  # torch only if something must be calibrated

        run_plan(cfg, grid, as_json=args.json)
        return 0
    if args.status:
        from qshield_dist import status

        report = status.collect(results_dir, cfg.checkpoint_dir, {t.trial_id: t.stage for t in grid.trials})
        print(json.dumps(report, indent=1) if args.json else status.render(report, cfg.name))
        return 0
    if args.dry_run:
        done = ResultStore(results_dir, cfg.checkpoint_dir).done(t.trial_id for t in grid.trials).status
        print(dry_run_table(grid, done))
        print(
            f"{len(grid.train)} train, {len(grid.attack)} attack, {len(grid.diagnostic)} diagnostic trials, {len(done)} already done"
        )
        return 0
    try:
        if args.prune:
            return _prune(cfg, grid, args.take_over)
        if args.compact:
            return _compact(cfg, grid, args.take_over)
        # A kill (SIGTERM: scancel, timeout, a job scheduler) takes the path of Ctrl-C, so the
        # executor stops its workers instead of leaving them running the sweep's trials unowned.
        signal.signal(signal.SIGTERM, _interrupt)
        try:
            if cfg.eval.until_decided is not None:
                from qshield_dist.decide import run_until_decided

                looks = run_until_decided(
                    cfg, max_looks=args.looks, retry_failed=args.retry_failed, take_over=args.take_over
                )
                run = looks[-1].run
            else:
                run = run_sweep(cfg, retry_failed=args.retry_failed, grid=grid, take_over=args.take_over)
        except KeyboardInterrupt:
            log.error("interrupted: finished trials are saved; run the same command again to resume")
            return 130
    except LeaseHeld as exc:
        log.error("%s", exc)
        return 2
    except ConfigError as exc:  # a custom model's code changed while it was being launched
        log.error("bad sweep input (%s):\n%s", args.sweep, exc)
        return 2
    return 0 if set(run.statuses.values()) <= {"ok"} else 1


@contextlib.contextmanager
def _held_store(cfg: SweepConfig, take_over: bool) -> Iterator[tuple[ResultsLease, ResultStore]]:
    """The sweep's results store, with its lease held (--prune, --compact)."""
    with ResultsLease(cfg.results_path) as lease:
        lease.acquire(take_over)
        yield lease, ResultStore(cfg.results_path, cfg.checkpoint_dir)


def _prune(cfg: SweepConfig, grid: Grid, take_over: bool) -> int:
    """Move the files that are not this grid's current rows aside, under the results lease."""
    results_dir = cfg.results_path
    if not results_dir.is_dir():
        log.info("nothing to prune in %s", results_dir)
        return 0
    with _held_store(cfg, take_over) as (_, store):
        store.refresh(repair=True, mode=cfg.file_mode)
        stale = store.stale(manifest_trials(grid))
        if not stale:
            log.info("nothing to prune in %s", results_dir)
            return 0
        dest = store.move_aside(stale)
        store.save(cfg.file_mode)
    log.info(
        "moved %d result files to %s (%s); the list is %s",
        len(stale),
        dest,
        count_reasons(stale),
        dest / "moved.tsv",
    )
    return 0


def _compact(cfg: SweepConfig, grid: Grid, take_over: bool) -> int:
    """Merge the finished trials' files into parts, under the results lease (results/compact.py)."""
    from qshield_dist.results.compact import compact

    results_dir = cfg.results_path
    if not results_dir.is_dir():
        log.info("nothing to compact in %s", results_dir)
        return 0
    with _held_store(cfg, take_over) as (lease, store):
        done = compact(store, manifest_trials(grid), lease.in_flight(), mode=cfg.file_mode)
    log.info(
        "compacted %s: %d files (%d rows) merged into %d parts, %d removed; %d moved from the flat layout",
        results_dir,
        done.merged,
        done.rows,
        len(done.parts),
        done.removed,
        done.migrated,
    )
    if done.kept:
        log.info(
            "per-trial files left as they are: %s", "; ".join(f"{n} {why}" for why, n in done.kept.items())
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
