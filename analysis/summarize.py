"""Summarize a sweep's results directory into a report (thin wrapper; logic in qshield_dist.summary).

    python analysis/summarize.py [RESULTS_DIR] [--out REPORT_DIR] [--format md,csv,tex,html] [--pivot] [--sweep NAME]

RESULTS_DIR defaults to results/quick (sweeps/quick.yaml) and REPORT_DIR to
reports/<name of RESULTS_DIR>. Exit code 2 for input that cannot be summarized.
"""

import sys

from qshield_dist.summary.cli import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
