"""The library calls `import qshield_dist` exports besides run_sweep (sweep.py) and evaluate
(evaluation.py): a sweep's config from a file or a dict, and its summary as frames.

    import qshield_dist
    config = qshield_dist.load_config("sweeps/quick.yaml")  # or the dict its YAML parses into
    run = qshield_dist.run_sweep(config)                    # runs what is missing; a rerun resumes
    report = qshield_dist.summarize(run)                    # frames; out="reports/quick" also writes files
    print(report.verdicts)
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from qshield_dist.config import SweepConfig, read_config, validate
from qshield_dist.sweep import SweepRun

if TYPE_CHECKING:
    import polars as pl

    from qshield_dist.summary.tables import Tables


def load_config(source: str | os.PathLike[str] | Mapping[str, Any], **overrides: Any) -> SweepConfig:
    """A sweep's validated config, from its YAML file or the mapping its YAML would parse into;
    `overrides` replace top-level keys (results_dir="...", executor="local"). Bad input raises
    ConfigError naming the key, the value and what is allowed, as the launcher reports it:
    every model and attack entry is checked here, not only the file's shape. What this machine
    lacks (a dataset, a GPU) is checked by run_sweep."""
    config = read_config(source if isinstance(source, Mapping) else Path(source), overrides)
    validate(config)
    return config


@dataclass(frozen=True, eq=False)
class Report:
    """The summary of a sweep as Polars frames, each one documented in summary/tables.py (the
    verdicts and worst case are judged in summary/verdicts.py and summary/paired.py).
    `written` lists the files summarize wrote: none unless it was given `out`."""

    tables: Tables
    paper: pl.DataFrame  # published numbers beside the measured ones (summary/paper.py)
    written: tuple[Path, ...]
    run: SweepRun | None = None  # the run summarized, when summarize was given one (evaluate does)

    @property
    def verdicts(self) -> pl.DataFrame:
        """One row per comparison and L-inf budget: each hybrid variant against its dataset's CNN,
        or each pair the sweep's `compare:` names (the attacks, points and seeds each verdict
        pools are in `tables.paired`, keyed by vkey = a, vkey_b = b and eps)."""
        return self.tables.verdicts

    @property
    def worst_case(self) -> pl.DataFrame:
        return self.tables.worst_case

    @property
    def robustness(self) -> pl.DataFrame:
        return self.tables.robustness

    @property
    def cost(self) -> pl.DataFrame:
        return self.tables.cost

    @property
    def notes(self) -> list[str]:
        return self.tables.notes


def summarize(
    results: SweepRun | str | os.PathLike[str], out: str | os.PathLike[str] | None = None, **options: Any
) -> Report:
    """The report's frames for a SweepRun (its rows, read once) or a results directory. Files
    (report.md, .html, .tex, CSV tables, plots) are written only under `out`, when given.
    `options` are summary/report.py's Options (formats, margin, min_samples, plots, proxies, ...).
    Raises SummaryError for results that cannot be summarized."""
    from qshield_dist.summary.report import Options  # polars and plotting: only for a summary
    from qshield_dist.summary.report import summarize as summary_pipeline

    run = results if isinstance(results, SweepRun) else None
    summary = summary_pipeline(run.results if run else results, out, Options(**options))
    return Report(summary.tables, summary.paper, tuple(summary.written), run)
