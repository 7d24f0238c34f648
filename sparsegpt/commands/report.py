"""Report on one run directory: per-stage measured sparsity and metric after pruning and after fine-tuning,
stage times (from metrics.jsonl and, when present, state.json), failed evaluation hooks, and a plot.

Writes OUT/report.md, OUT/report.csv and OUT/report.png (OUT defaults to the run directory) and prints the
markdown. The default metric is the run's first ppl/* metric.

examples:
  sparsegpt report runs/demo
  sparsegpt report runs/opt13b_90 --metric lm_eval/arc_easy/acc --out reports/opt13b_90
"""

from __future__ import annotations

import argparse
from pathlib import Path

from sparsegpt.run.compare import write_report


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Flags of `sparsegpt report`."""
    p.add_argument("run_dir", type=Path, metavar="RUN_DIR", help="run directory holding metrics.jsonl")
    p.add_argument("--metric", help="metric key (default: the run's first ppl/* metric)")
    p.add_argument("--out", type=Path, help="folder for report.md/.csv/.png (default: RUN_DIR)")


def run(args: argparse.Namespace) -> int:
    """Write the report and print it."""
    out = args.out or args.run_dir
    print(write_report(args.run_dir, out, args.metric))
    print(f"wrote {out / 'report.md'}, {out / 'report.csv'}, {out / 'report.png'}")
    return 0
