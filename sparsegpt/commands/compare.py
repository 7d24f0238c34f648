"""Compare run directories: a metric by target sparsity, after pruning and after fine-tuning.

Writes OUT/compare.md (rows: target sparsity; columns: runs × {after prune, after fine-tune}),
OUT/compare.csv (the same table, unrounded) and OUT/compare.png (metric vs measured sparsity, one colour per
run, solid = fine-tuned, dashed = pruned, log scale for perplexity), prints the table and the best run at each
sparsity. Lower is better for ppl/* and names with perplexity/loss/error/bpb; higher for everything else.
The default metric is the first ppl/* metric that every run has.

examples:
  sparsegpt compare runs/opt13b_90 runs/opt13b_oneshot --metric ppl/wikitext2 --out cmp/
  sparsegpt compare runs/demo runs/demo_owl --metric lm_eval/arc_easy/acc
"""

from __future__ import annotations

import argparse
from pathlib import Path

from sparsegpt.run.compare import choose_metric, load_runs, write_compare


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Flags of `sparsegpt compare`."""
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="run directories holding metrics.jsonl")
    p.add_argument("--metric", help="metric key, e.g. ppl/wikitext2 or lm_eval/arc_easy/acc "
                                    "(default: the first ppl/* common to all runs)")
    p.add_argument("--out", type=Path, default=Path("."), help="folder for compare.md/.csv/.png (default: .)")


def run(args: argparse.Namespace) -> int:
    """Load the runs, write the comparison, print it."""
    runs = load_runs(args.run_dirs)
    metric = choose_metric(runs, args.metric)
    print(write_compare(runs, metric, args.out))
    print(f"wrote {args.out / 'compare.md'}, {args.out / 'compare.csv'}, {args.out / 'compare.png'}")
    return 0
