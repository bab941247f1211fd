"""Summaries of a results directory: tables, paper comparison, plots, an honest report.

Data flow, each module importing only the ones before it: current_grid.py (manifest.json's
grid; what is set aside from it) -> load.py (lazy Polars scans of the hive-partitioned
Parquet files, validation) -> verdicts.py (every judgement: baselines, verdicts, cost
drivers, controls) -> tables.py (robustness, attack cost, diagnostics, honesty; assembles
the judged tables) -> paper.py (published numbers beside the measured ones) and plots.py
(figures; the forest plot of the verdicts first) -> render.py (TextTable, Section, number
formats; Markdown, CSV, LaTeX) -> html_page.py (the self-contained HTML page, tables by
great_tables) -> sections.py (one function per report section) -> sections_verdicts.py (the
sections of the paired judgements: verdicts, controls, worst case) -> report.py
(`summarize()`, the pipeline). cli.py is the command line (`python analysis/summarize.py`);
screenshot.py opens a report in headless Chromium (its first screen as a PNG).
"""

from qshield_dist.summary.load import Results, SummaryError, load_results

__all__ = ["Results", "SummaryError", "load_results"]
