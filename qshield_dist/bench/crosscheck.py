"""The project's AutoAttack against its authors' code, on the same checkpoints and points.

    python -m qshield_dist.bench.crosscheck RESULTS_DIR --checkpoints CKPT --autoattack SRC
        [--data-root DIR] [--points 64] [--seed 0]

SRC is a checkout of fra31/auto-attack (pure Python): it goes on sys.path here and is never a
dependency of the project. For every `autoattack` row of the sweep (one per model variant and
seed), the first `--points` points of its shared attack set that the model gets right are
attacked again with the authors' `run_standard_evaluation` in the version the project's row
records (standard on a deterministic model, rand on a stochastic one), and the adversarial
points are judged by the project's rule (a strict majority of `eval_repeats` evaluations).
Prints one JSON object per row: both broken counts, their difference in standard errors, and
how many points the two agree on.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
from pathlib import Path
from typing import Any

import polars as pl
import torch

from qshield_dist.config import SweepConfig, validate
from qshield_dist.data import load
from qshield_dist.datasets import DATASETS
from qshield_dist.grid import AttackTrial, build_grid
from qshield_dist.models import build_model
from qshield_dist.results.store import ResultStore, checkpoint_path, precedence
from qshield_dist.train import load_checkpoint
from qshield_dist.trial import predictions
from qshield_dist.trial_env import seed_everything

log = logging.getLogger("qshield_dist.bench.crosscheck")


def _rows(results: Path) -> list[dict[str, Any]]:
    store = ResultStore(results)
    _, trials = store.read_manifest()
    files = [f for f in store.files() if f.stage == "attack" and not f.failed]
    files.sort(key=lambda f: precedence(f.rel, f.failed))  # an attack trial has one row: the first counts
    df = pl.read_parquet([str(f.path) for f in files], hive_partitioning=False)
    df = df.filter(pl.col("trial_id").is_in(list(trials))).unique(
        "trial_id", keep="first", maintain_order=True
    )
    return df.filter((pl.col("attack") == "autoattack") & pl.col("control").is_null()).to_dicts()


def crosscheck(
    row: dict[str, Any],
    trial: AttackTrial,
    checkpoints: Path,
    data_root: str,
    spec: dict[str, Any],
    points: int,
    seed: int,
) -> dict[str, Any]:
    from autoattack import AutoAttack  # the authors' package, from --autoattack

    info = DATASETS[row["dataset"]]
    model = build_model(trial.train.model, info)
    path = checkpoint_path(checkpoints, row["train_id"])
    if load_checkpoint(path, model) is None:
        raise FileNotFoundError(f"no usable checkpoint {path}")
    model.eval()
    data = spec["data"]
    _, test = load(row["dataset"], data_root, data.get("train_size"), data.get("test_size"))
    chosen = [i for i, ok in zip(row["point_index"], row["point_correct"]) if ok][:points]
    broken_project = dict(zip(row["point_index"], row["point_broken"]))
    x, y = test.x[chosen], test.y[chosen]
    config = json.loads(row.get("attack_config") or "{}")
    version = config.get("version") or ("rand" if row["stochastic"] else "standard")
    seed_everything(seed)
    adversary = AutoAttack(
        model, norm="Linf", eps=row["eps"], version=version, device="cpu", seed=seed, verbose=False
    )
    adv = adversary.run_standard_evaluation(x, y, bs=len(y))
    repeats = int(row["eval_repeats"] or 1)
    seed_everything(seed)
    wrong = predictions(model, adv, repeats, 128) != y
    authors = (wrong.float().mean(0) > 0.5).tolist()
    project = [bool(broken_project[i]) for i in chosen]
    n = len(chosen)
    p1, p2 = sum(project) / n, sum(authors) / n
    se = math.sqrt((p1 * (1 - p1) + p2 * (1 - p2)) / n) or 1 / n
    return {
        "bench": "autoattack_crosscheck",
        "variant": row["variant"],
        "seed": row["seed"],
        "version": version,
        "points": n,
        "broken_project": sum(project),
        "broken_authors": sum(authors),
        "difference_in_se": round((p1 - p2) / se, 3),
        "within_2_se": abs(p1 - p2) <= 2 * se,
        "agree": sum(a == b for a, b in zip(project, authors)),
        "project_only": sum(a and not b for a, b in zip(project, authors)),
        "authors_only": sum(b and not a for a, b in zip(project, authors)),
        "eval_repeats": repeats,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m qshield_dist.bench.crosscheck", description=__doc__.splitlines()[0]
    )
    p.add_argument("results")
    p.add_argument("--checkpoints", required=True)
    p.add_argument("--autoattack", required=True, help="a checkout of fra31/auto-attack")
    p.add_argument("--data-root", default=None, help="default: the sweep's data.data_root")
    p.add_argument("--points", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s")
    sys.path.insert(0, str(Path(args.autoattack).resolve()))
    torch.set_num_threads(1)
    results = Path(args.results)
    meta, _ = ResultStore(results).read_manifest()
    spec = meta["spec"]
    # the trial (its model spec) from the sweep's own grid, as the launcher resolved it
    grid = build_grid(validate(SweepConfig.model_validate(spec)))
    trials = {t.trial_id: t for t in grid.attack}
    for row in _rows(results):
        out = crosscheck(
            row,
            trials[row["trial_id"]],
            Path(args.checkpoints),
            args.data_root or spec["data"]["data_root"],
            spec,
            args.points,
            args.seed,
        )
        sys.stdout.write(json.dumps(out) + "\n")
        sys.stdout.flush()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
