"""Command line of the summary: `python analysis/summarize.py [RESULTS_DIR] [options]`.

Exit codes: 0 report written; 2 input that cannot be summarized (missing or empty
directory, another schema version, mixed sweeps without --sweep, bad options);
1 an internal error (logged in one line; -v shows the traceback).
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Sequence

from qshield_dist.summary.load import SummaryError
from qshield_dist.summary.paper import PAPER_DATASETS
from qshield_dist.summary.report import FORMATS, Options, summarize
from qshield_dist.summary.stats import ESTIMANDS

log = logging.getLogger("qshield_dist.summary")

DEFAULT_RESULTS = "results/quick"  # sweeps/quick.yaml writes here


def default_out(results_dir: Path) -> Path:
    """reports/<name of the results directory>: results/quick -> reports/quick."""
    return Path("reports") / (results_dir.resolve().name or "results")


class _Parser(argparse.ArgumentParser):
    """argparse that raises instead of exiting, so every bad input goes through one path."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise SummaryError(f"{message} (see --help)")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = _Parser(
        prog="summarize.py",
        description="Summarize a QShield sweep's results: robustness and cost tables, paper comparison, plots, HTML report.",
    )
    p.add_argument(
        "results", nargs="?", default=DEFAULT_RESULTS, help=f"results directory (default {DEFAULT_RESULTS})"
    )
    p.add_argument(
        "--out", help="report directory (default reports/<name of RESULTS_DIR>, e.g. reports/quick)"
    )
    p.add_argument(
        "--format",
        default=",".join(FORMATS),
        help=f"comma-separated subset of {','.join(FORMATS)} (default all)",
    )
    p.add_argument(
        "--pivot", action="store_true", help="robustness tables with attacks in rows instead of columns"
    )
    p.add_argument("--sweep", help="summarize only this sweep (required when the directory mixes several)")
    p.add_argument(
        "--min-samples",
        type=int,
        default=20,
        help="flag seeds that attacked fewer samples than this (default 20)",
    )
    p.add_argument(
        "--margin",
        type=float,
        default=0.02,
        help="robust-accuracy band within which two variants are 'equal' (default 0.02 = 2 pp)",
    )
    p.add_argument(
        "--estimand",
        choices=sorted(ESTIMANDS),
        default="models",
        help="the question the verdicts answer: 'models' (these trained models; points are the unit,"
        " the default) or 'procedure' (the training procedure; seeds are the unit, needs 2+ seeds)",
    )
    p.add_argument("--no-plots", action="store_true", help="tables only")
    p.add_argument("--no-svg", action="store_true", help="PNG figures only")
    p.add_argument(
        "--paper-proxy",
        action="append",
        default=[],
        metavar="MEASURED=PAPER",
        help="compare a dataset with a paper dataset it stands in for, e.g. digits=mnist (marked 'proxy dataset')",
    )
    p.add_argument("-v", "--verbose", action="store_true")
    return p.parse_args(argv)


def _options(args: argparse.Namespace) -> Options:
    formats = tuple(f.strip() for f in args.format.split(",") if f.strip())
    bad = [f for f in formats if f not in FORMATS]
    if bad or not formats:
        raise SummaryError(f"--format: got '{args.format}': allowed formats are {', '.join(FORMATS)}")
    if args.min_samples < 0:
        raise SummaryError(f"--min-samples: got {args.min_samples}: must be >= 0")
    if not 0 <= args.margin < 1:
        raise SummaryError(f"--margin: got {args.margin}: must be in [0, 1) (a share of robust accuracy)")
    proxies = {}
    for item in args.paper_proxy:
        measured, sep, paper = item.partition("=")
        if not sep or paper not in PAPER_DATASETS:
            raise SummaryError(
                f"--paper-proxy: got '{item}': expected MEASURED=PAPER with PAPER one of {', '.join(PAPER_DATASETS)}"
            )
        proxies[measured] = paper
    return Options(
        formats=formats,
        pivot=args.pivot,
        min_samples=args.min_samples,
        margin=args.margin,
        estimand=ESTIMANDS[args.estimand],
        plots=not args.no_plots,
        svg=not args.no_svg,
        sweep=args.sweep,
        proxies=proxies,
    )


def main(argv: Sequence[str] | None = None) -> int:
    verbose = argv is not None and ("-v" in argv or "--verbose" in argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        args = parse_args(argv)
        verbose = args.verbose
        if verbose:
            logging.getLogger().setLevel(logging.DEBUG)
        options = _options(args)
        results = Path(args.results)
        summarize(results, Path(args.out) if args.out else default_out(results), options)
    except SummaryError as exc:
        log.error("%s", exc)
        return 2
    except Exception as exc:  # noqa: BLE001 - the CLI promises no traceback
        log.error(
            "internal error: %s: %s (run with -v for the traceback)",
            type(exc).__name__,
            exc,
            exc_info=verbose,
        )
        return 1
    return 0
