"""qshield_dist as a library: a tiny sweep defined as a dict, run, then summarized into frames.

    python examples/api_quickstart.py [RESULTS_DIR]    (default results/api_quickstart)

On `digits` (scikit-learn's 8x8 digits, no download): cnn_small and a 4-qubit hybrid started
from it, one seed, FGSM and a 3-step PGD (standard preset: its steps reach eps) on 32 points. Run it again and nothing re-runs: the
results directory already holds every trial (SweepRun.trials' `ran` column says so).
"""

from __future__ import annotations

import logging
import sys

import qshield_dist

SWEEP = {
    "name": "api_quickstart",
    "data": {"dataset": "digits", "train_size": 300, "test_size": 100},
    "train": {"epochs": 2},
    "eval": {"attack_size": 32},
    "models": [{"model": "cnn_small"}, {"model": "hqcnn", "backbone": "cnn_small"}],
    "attacks": [{"name": "fgsm"}, {"name": "pgd", "preset": "standard", "params": {"steps": 3}}],
}


def main(results_dir: str = "results/api_quickstart") -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    config = qshield_dist.load_config(SWEEP, results_dir=results_dir)
    run = qshield_dist.run_sweep(config)  # the config's executor: local worker processes
    print(run.trials)  # trial_id, stage, dataset, status, ran
    print(run.attack.select("variant", "attack", "robust_acc"))
    report = qshield_dist.summarize(run)  # frames only; out="reports/api_quickstart" writes the report
    print(report.verdicts.select("label", "baseline", "category", "diff", "low", "high"))


if __name__ == "__main__":
    main(*sys.argv[1:])
