"""--plan's price of a sequential decision (eval.until_decided, decide.py): for the comparisons
the report will make, what a decision takes at a true difference equal to the margin, at most
and on average, at Holm's first level (an upper bound), then what it costs at the plan's
parallelism, scaled from the first look the plan calibrated:

- over points (max_points; summary/sequential.price, the group-sequential rule simulated on the
  normal approximation): points per seed, shards, and the attack stage's trials, CPU-/GPU-hours
  and wall (an attack's cost grows with its points);
- over seeds (max_seeds; summary/sequential.price_seeds, decide_seeds' t intervals simulated):
  seeds, and every stage's trials, hours and wall (each added seed trains and attacks anew).

The wall is an upper bound: scaling the first look's wall assumes the looks run one after
another and each as long as that look scaled, while a look's trials run side by side where
slots are free.

What no plan can know is how often the two models disagree on a point (the per-point
difference's spread) and, over seeds, how much the difference moves from one training run to
the next. Both are assumed (ASSUMED_DISCORDANT, ASSUMED_SEED_SD) and said; reading them from the
first look's results is not built: the assumptions are the plan's largest error.
"""

from __future__ import annotations

import logging
import math
from typing import Any

from qshield_dist.attack_params import ATTACKS
from qshield_dist.config import SweepConfig
from qshield_dist.grid import Grid, variant_id
from qshield_dist.summary.sequential import (
    Price,
    planned_looks,
    planned_seed_looks,
    points_per_seed,
    price,
    price_seeds,
)

log = logging.getLogger(__name__)

# Share of points one model of a pair gets right and the other wrong (under the worst case): on
# real MNIST's final run the CNN and the hybrids disagreed on about a tenth of the points.
ASSUMED_DISCORDANT = 0.10
# Standard deviation of the difference's random seed effect (each seed trains both models anew):
# on that run's three seeds the hybrids' AutoAttack differences to the CNN spread by 3.2 and
# 5.1 pp, of which 256 points' own noise explains about 2 pp.
ASSUMED_SEED_SD = 0.03


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
    m = _comparisons(cfg, grid)
    first_seeds = len(cfg.seeds)
    points = points_per_seed(cfg)
    by_stage = {r["stage"]: r for r in report["stages"]}
    if plan.over_seeds:
        looks = planned_seed_looks(cfg)
        p: Price = price_seeds(plan.margin, math.sqrt(ASSUMED_DISCORDANT), ASSUMED_SEED_SD, points, looks, m)
        stages = [s for s in ("train", "attack", "diagnostic") if s in by_stage]
        shards_per_seed = -(-points // cfg.eval.shard_size) if cfg.eval.shard_size else 1
        trials_per_seed = len(grid.trials) / first_seeds

        def size_at(n: float) -> dict[str, float]:
            return {
                "seeds": round(n),
                "points_per_seed": points,
                "shards_per_seed": shards_per_seed,
                "trials": round(trials_per_seed * math.ceil(n)),
            }

        first = first_seeds
    else:
        looks = planned_looks(cfg)
        p = price(plan.margin, math.sqrt(ASSUMED_DISCORDANT), first_seeds, looks, m)
        stages = ["attack"] if "attack" in by_stage else []
        per_shard = len(grid.attack) / (looks[0] // cfg.eval.shard_size)  # attack trials per shard

        def size_at(n: float) -> dict[str, float]:
            shards = math.ceil(n / cfg.eval.shard_size)
            return {
                "seeds": first_seeds,
                "points_per_seed": round(n),
                "shards_per_seed": shards,
                "trials": round(per_shard * shards),
            }

        first = looks[0]

    def at(n: float) -> dict[str, float]:
        scale = n / first

        def total(key: str) -> float:
            return sum(by_stage[s][key] for s in stages) * scale if stages else math.nan

        return {
            **size_at(n),
            "cpu_hours": total("cpu_hours"),
            "gpu_hours": total("gpu_hours"),
            "wall_s": total("wall_s"),
        }

    return {
        "unit": "seeds" if plan.over_seeds else "points",
        "looks": looks,
        "comparisons": m,
        "seeds": first_seeds,
        "points_per_seed": points,
        "stages": stages,
        "margin": plan.margin,
        "assumed_discordant": ASSUMED_DISCORDANT,
        **({"assumed_seed_sd": ASSUMED_SEED_SD} if plan.over_seeds else {}),
        "power": p.power,
        "fixed_power": p.fixed_power,
        "expected": at(p.expected),
        "maximum": at(p.maximum),
        "expected_at_no_difference": at(p.expected_at_zero),
    }


def render_price(d: dict[str, Any]) -> list[str]:
    """The price as lines under --plan's table."""

    def line(name: str, r: dict[str, float]) -> str:
        return (
            f"  {name:22} {r['seeds']:>4} seed(s) x {r['points_per_seed']:>6,} points ({r['shards_per_seed']:>3} shards),"
            f" {r['trials']:>6,} trials, {r['cpu_hours']:>9.1f} CPU-h, {r['gpu_hours']:>7.1f} GPU-h,"
            f" wall {r['wall_s'] / 3600:>7.1f} h"
        )

    unit = "seeds" if d["unit"] == "seeds" else "points/seed"
    spread = f" and a seed effect of sd {100 * d['assumed_seed_sd']:.1f} pp" if "assumed_seed_sd" in d else ""
    return [
        f"deciding {d['comparisons']} comparison(s) at {d['seeds']} seed(s) x {d['points_per_seed']:,} points,"
        f" looks at {', '.join(map(str, d['looks']))} {unit}, margin ±{100 * d['margin']:.1f} pp, assuming"
        f" {100 * d['assumed_discordant']:.0f}% discordant points{spread} (power at the margin"
        f" {100 * d['power']:.0f}%, a fixed design of the maximum {100 * d['fixed_power']:.0f}%); the"
        f" {' + '.join(d['stages']) or 'no'} stage(s), scaled from the first look (wall: an upper bound):",
        line("expected at the margin", d["expected"]),
        line("expected at no diff.", d["expected_at_no_difference"]),
        line("maximum", d["maximum"]),
    ]
