"""--plan's price of a sequential decision (eval.until_decided, decide.py): for the comparisons
the report will make, the points per seed a decision takes at a true difference equal to the
margin, at most and on average (summary/sequential.price: the group-sequential rule simulated
on the normal approximation, at Holm's first level: an upper bound), then the shards, the
attack stage's CPU-/GPU-hours and its wall time at the plan's parallelism, scaled from the
first look the plan calibrated (an attack's cost grows with its points). The wall is an upper
bound: scaling the first look's wall assumes the looks run one after another and each as long as
that look scaled, while a look's shards run side by side where slots are free.

What no plan can know is how often the two models disagree on a point: the per-point
difference's spread. It is assumed (ASSUMED_DISCORDANT) and said; reading it from the first
look's results is not built: the assumption is the plan's largest error.
"""

from __future__ import annotations

import logging
import math
from typing import Any

from qshield_dist.attack_params import ATTACKS
from qshield_dist.config import SweepConfig
from qshield_dist.grid import Grid, variant_id
from qshield_dist.summary.sequential import planned_looks, price

log = logging.getLogger(__name__)

# Share of points one model of a pair gets right and the other wrong (under the worst case): on
# real MNIST's final run the CNN and the hybrids disagreed on about a tenth of the points.
ASSUMED_DISCORDANT = 0.10


def _comparisons(cfg: SweepConfig, grid: Grid) -> int:
    """How many comparisons the report will judge (Holm's family, as summary.verdicts.in_holm_family
    defines it on the report's rows): the sweep's compare:, else each hybrid variant against its
    dataset's CNN, each at every L-inf budget of its dataset."""
    linf = [t for t in grid.attack if ATTACKS[t.attack].threat_model == "linf"]
    budgets = max(1, len({(t.dataset, t.params_dict.get("eps")) for t in linf}))
    if grid.comparisons:
        return len(grid.comparisons) * budgets
    hybrids = {(t.dataset, variant_id(t, None)) for t in grid.train if t.model.model == "hqcnn"}
    return max(1, len(hybrids)) * budgets


def decision_price(cfg: SweepConfig, grid: Grid, report: dict[str, Any]) -> dict[str, Any] | None:
    """The price of deciding (module docstring), for report["decision"]; None without until_decided."""
    plan = cfg.eval.until_decided
    if plan is None:
        return None
    if plan.over_seeds:
        log.warning("--plan prices a sequential launch over points, not over seeds (max_seeds): not priced")
        return None
    looks = planned_looks(cfg)
    m = _comparisons(cfg, grid)
    p = price(plan.margin, math.sqrt(ASSUMED_DISCORDANT), len(cfg.seeds), looks, m)
    attack = next((r for r in report["stages"] if r["stage"] == "attack"), None)
    first = looks[0]
    per_shard = len(grid.attack) / (first // cfg.eval.shard_size)  # attack trials per shard

    def at(points: float) -> dict[str, float]:
        scale = points / first
        return {
            "points_per_seed": round(points),
            "shards": math.ceil(points / cfg.eval.shard_size),
            "attack_trials": round(per_shard * math.ceil(points / cfg.eval.shard_size)),
            "attack_cpu_hours": attack["cpu_hours"] * scale if attack else math.nan,
            "attack_gpu_hours": attack["gpu_hours"] * scale if attack else math.nan,
            "attack_wall_s": attack["wall_s"] * scale if attack else math.nan,
        }

    return {
        "looks": looks,
        "comparisons": m,
        "seeds": len(cfg.seeds),
        "margin": plan.margin,
        "assumed_discordant": ASSUMED_DISCORDANT,
        "power": p.power,
        "fixed_power": p.fixed_power,
        "expected": at(p.expected_points),
        "maximum": at(p.max_points),
        "expected_at_no_difference": at(p.expected_points_at_zero),
    }


def render_price(d: dict[str, Any]) -> list[str]:
    """The price as lines under --plan's table."""

    def line(name: str, r: dict[str, float]) -> str:
        return (
            f"  {name:22} {r['points_per_seed']:>6,} points/seed, {r['shards']:>4} shards, {r['attack_trials']:>6,}"
            f" attack trials, {r['attack_cpu_hours']:>9.1f} CPU-h, {r['attack_gpu_hours']:>7.1f} GPU-h,"
            f" wall {r['attack_wall_s'] / 3600:>7.1f} h"
        )

    return [
        f"deciding {d['comparisons']} comparison(s) at {d['seeds']} seed(s), looks at"
        f" {', '.join(map(str, d['looks']))} points/seed, margin ±{100 * d['margin']:.1f} pp, assuming"
        f" {100 * d['assumed_discordant']:.0f}% discordant points (power at the margin"
        f" {100 * d['power']:.0f}%, a fixed design of the maximum {100 * d['fixed_power']:.0f}%); the attack"
        " stage, scaled from the first look (wall: an upper bound):",
        line("expected at the margin", d["expected"]),
        line("expected at no diff.", d["expected_at_no_difference"]),
        line("maximum", d["maximum"]),
    ]
