"""python -m qshield_dist.bench [quantum|models|draws|dispatch|summary|status|all|gpu] [--plot PNG]

Prints one JSON object per measurement on stdout (logs go to stderr). The figures kept in
benchmarks/RESULTS.md come from this command, and from the two that take their own arguments:
`python -m qshield_dist.bench.slurm_packing` (a dev cluster) and `python -m
qshield_dist.bench.crosscheck` (the project's AutoAttack against its authors' code). `gpu`, not
part of `all`, is the GPU checks (bench/gpu.py): on a machine without CUDA, one line saying so.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from typing import Any, Iterable


def _emit(rows: Iterable[dict[str, Any]]) -> None:
    for row in rows:
        sys.stdout.write(json.dumps(row) + "\n")
        sys.stdout.flush()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m qshield_dist.bench", description=__doc__.splitlines()[0])
    parser.add_argument(
        "what",
        nargs="*",
        default=["all"],
        choices=["quantum", "scaling", "models", "draws", "dispatch", "summary", "status", "all", "gpu"],
    )
    parser.add_argument(
        "--plot", default="benchmarks/qubit_scaling.png", help="where the qubit-scaling plot goes"
    )
    parser.add_argument("--no-ray", action="store_true", help="dispatch: skip the Ray measurement")
    parser.add_argument(
        "--summary-rows",
        type=int,
        default=1_000_000,
        help="summary: attack rows of the synthetic sweep (train and diagnostic rows come on top)",
    )
    parser.add_argument(
        "--summary-points", type=int, default=256, help="summary: per-point outcomes per attack row"
    )
    parser.add_argument("--summary-no-plots", action="store_true", help="summary: tables and verdicts only")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s")
    todo = set(args.what)
    if "all" in todo:
        todo = {"quantum", "scaling", "models", "draws", "dispatch", "summary", "status"}
    if "quantum" in todo:
        from qshield_dist.bench import quantum

        _emit(quantum.compare_variants())
    if "scaling" in todo:
        from qshield_dist.bench import quantum, quantum_plot

        rows = quantum.qubit_scaling(quantum.scaling_points())
        _emit(rows)
        quantum_plot.plot_scaling(rows, args.plot)
    if "models" in todo:
        from qshield_dist.bench import models

        _emit(models.run())
    if "draws" in todo:
        from qshield_dist.bench import draws

        _emit(draws.run())
    if "dispatch" in todo:
        from qshield_dist.bench import dispatch

        _emit(dispatch.run_all(ray_bench=not args.no_ray))
    if "summary" in todo:
        from qshield_dist.bench import summary

        _emit(
            [summary.bench_summary(args.summary_rows, args.summary_points, plots=not args.summary_no_plots)]
        )
    if "gpu" in todo:
        from qshield_dist.bench import gpu

        _emit(gpu.run())
    if "status" in todo:
        from qshield_dist.bench import status

        _emit([status.bench_status()])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
