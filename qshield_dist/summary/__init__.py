"""Summaries of a results directory: tables, paper comparison, plots, an honest report.

Data flow: load.py (lazy Polars scans of the hive-partitioned Parquet files, validation)
-> tables.py (robustness, attack cost, verdicts, controls, diagnostics, honesty)
-> paper.py (published numbers beside the measured ones) -> plots.py -> report.py
(Markdown, CSV, LaTeX, self-contained HTML). cli.py is the command line
(`python analysis/summarize.py`).
"""

from qshield_dist.summary.load import Results, SummaryError, load_results

__all__ = ["Results", "SummaryError", "load_results"]
