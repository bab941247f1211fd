"""Sequential decisions: a sweep's attack set grown in waves of shards until every verdict it
asks for is decided (`eval.until_decided`; `launch --until-decided`).

Each look runs the sweep at a larger `eval.attack_size` (run_sweep: the shards already run keep
their ids and files, so a look only adds shards), then judges every comparison the report makes
(each hybrid against its CNN, or the sweep's `compare:`) on the points so far with
summary/sequential.decide: Lan-DeMets O'Brien-Fleming boundaries over the looks, repeated
confidence intervals, Holm across the comparisons, valid however often it looks. It stops when
none is left to continue (more robust, less robust, equal within the margin), or at
`max_points` per seed (undecided), or after `max_looks` looks (`launch --looks N`: a budget for
now; a later launch with a larger N, or none, reads the looks run from their files and goes on,
the boundaries those of the whole plan). The looks are points per seed, growing `ratio` times
(2 by default) from `attack_size` (geometric_looks), each a whole number of shards. RESULTS/decisions.json records the method,
the looks and, per comparison, the look at which its decision was taken; the report shows it.

With `max_seeds` instead of `max_points` the question is the training procedure (seeds are the
unit): each look adds seeds (numbered on from the sweep's largest; the seeds already run keep
their ids and files) at the same points per seed, and summary/sequential.decide_seeds judges
the t intervals over seeds at each look's share of the spent alpha.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass
from typing import Any, Sequence

from qshield_dist.config import SweepConfig
from qshield_dist.executors.base import Executor
from qshield_dist.fileio import atomic_write_bytes
from qshield_dist.summary.sequential import DECISIONS_FILE, planned_looks, planned_seed_looks, points_per_seed
from qshield_dist.sweep import SweepRun, run_sweep

log = logging.getLogger(__name__)

METHOD = (
    "group-sequential: Lan-DeMets O'Brien-Fleming-type alpha spending over the looks, repeated"
    ' 95% confidence intervals (Jennison & Turnbull 2000, ch. 9), "equal" also by both of Tango\'s score'
    " tests at the margin past the same boundary, Holm across the report's verdicts (the family of its"
    " Holm-adjusted p; a comparison not judged at a look counts as not rejected)"
)
METHOD_SEEDS = (
    "sequential over seeds (the training procedure): each look's t interval on the per-seed differences"
    " at the increment of Lan-DeMets O'Brien-Fleming-type alpha spending (Bonferroni over the looks),"
    " Holm across the report's verdicts on the repeated p-values (a comparison not judged at a look"
    " counts as not rejected)"
)


@dataclass(frozen=True)
class Look:
    points: int  # per seed
    run: SweepRun
    decisions: list[dict[str, Any]]  # per comparison: a, b, eps, dataset and sequential.Decision's fields
    family: int = 0  # comparisons in Holm's family (the report's verdicts), judged here or not
    seeds: int = 0  # seeds run at this look


def run_until_decided(
    cfg: SweepConfig, executor: Executor | None = None, max_looks: int | None = None, **run_options: Any
) -> list[Look]:
    """Run the sweep in looks (module docstring) until each comparison is decided or the last
    look is done; returns the looks run. max_looks stops after that many of the planned looks
    (a budget for now: a later launch with a larger max_looks, or none, reads the looks run from
    their files and goes on; the boundaries stay those of the whole plan). run_options go to
    run_sweep."""
    from qshield_dist.summary.sequential import CONTINUE, decide, decide_seeds
    from qshield_dist.summary.tables import build_tables
    from qshield_dist.summary.verdicts import in_holm_family

    plan = cfg.eval.until_decided
    assert plan is not None, "validate refuses a sequential launch without eval.until_decided"
    if max_looks is not None and max_looks < 1:
        raise ValueError(f"max_looks: got {max_looks}: must be >= 1")
    planned = planned_seed_looks(cfg) if plan.over_seeds else planned_looks(cfg)
    seeds = added_seeds(cfg.seeds, planned[-1]) if plan.over_seeds else list(cfg.seeds)
    done: list[Look] = []
    for k, size in enumerate(planned):
        if plan.over_seeds:
            look_cfg = cfg.model_copy(update={"seeds": seeds[:size]})
        else:
            look_cfg = cfg.model_copy(update={"eval": cfg.eval.model_copy(update={"attack_size": size})})
        points = points_per_seed(look_cfg)
        run = run_sweep(look_cfg, executor, **run_options)
        tables = build_tables(run.results, margin=plan.margin)
        # Holm's family: the report's own (verdicts.in_holm_family), so decisions.json and the
        # report's Holm-adjusted p adjust over the same comparisons
        family = in_holm_family(tables.paired["kind"].to_list(), tables.verdict_kind)
        verdicts = [r for r, member in zip(tables.paired.iter_rows(named=True), family) if member]
        # Judged: a comparison whose sides have every shard of every seed so far (a gap would
        # shift the points a look reads), with the points and seeds the look asks for; the
        # others stay in the family, as never rejected.
        compared = [
            r
            for r in verdicts
            if r["missing_a"] is None
            and r["missing_b"] is None
            and _complete(tables.outcomes[(r["a"], r["b"], r["eps"])], points, len(look_cfg.seeds))
        ]
        decisions = (decide_seeds if plan.over_seeds else decide)(
            [tables.outcomes[(r["a"], r["b"], r["eps"])] for r in compared],
            planned[: k + 1],
            planned[-1],
            plan.margin,
            family_size=len(verdicts) + tables.unpaired,
        )
        labels = dict(tables.variants.select("vkey", "label").iter_rows())
        rows = [
            {
                "dataset": r["dataset"],
                "a": labels.get(r["a"], r["a"]),
                "b": labels.get(r["b"], r["b"]),
                "eps": r["eps"],
                **asdict(d),
            }
            for r, d in zip(compared, decisions)
        ]
        done.append(Look(points, run, rows, len(verdicts) + tables.unpaired, len(look_cfg.seeds)))
        _record(look_cfg, planned, done)
        for row in rows:
            log.info(
                "look %d (%d points per seed, %d seeds): %s vs %s: %s, %+.1f pp [%+.1f, %+.1f]",
                k + 1,
                points,
                len(look_cfg.seeds),
                row["a"],
                row["b"],
                row["decision"],
                100 * row["diff"],
                100 * row["low"],
                100 * row["high"],
            )
        if len(compared) < len(verdicts):
            log.warning("some comparisons lack points at this look (failed or missing shards): not judged")
        if not any(d.decision == CONTINUE for d in decisions):
            break
        if max_looks is not None and k + 1 >= max_looks and k + 1 < len(planned):
            log.warning(
                "stopped after %d of %d planned looks (--looks); comparisons still continuing: launch again"
                " with a larger --looks, or without it, to resume at look %d (the looks run are read from"
                " their files)",
                k + 1,
                len(planned),
                k + 2,
            )
            break
    return done


def added_seeds(seeds: Sequence[int], total: int) -> list[int]:
    """The sweep's seeds, then new ones numbered on from the largest, `total` in all."""
    return [*seeds, *range(max(seeds) + 1, max(seeds) + 1 + total - len(seeds))]


def _complete(pairs: list[Any], points: int, seeds: int) -> bool:
    return len(pairs) >= seeds and all(len(a) >= points for a, _ in pairs)


def _record(cfg: SweepConfig, planned: list[int], done: list[Look]) -> None:
    plan = cfg.eval.until_decided
    assert plan is not None
    record = {
        "method": METHOD_SEEDS if plan.over_seeds else METHOD,
        "unit": "seeds" if plan.over_seeds else "points",  # what the looks grow
        "margin": plan.margin,
        "max_seeds" if plan.over_seeds else "max_points": planned[-1],
        "planned_looks": planned,
        "looks": [
            {
                "points": look.points,
                "seeds": look.seeds,
                "holm_family": look.family,
                "decisions": look.decisions,
            }
            for look in done
        ],
    }
    atomic_write_bytes(
        cfg.results_path / DECISIONS_FILE, json.dumps(record, indent=1).encode(), mode=cfg.file_mode
    )
