"""Progressive SparseGPT pruning + mask-preserving fine-tuning, one recipe, resumable.

    accelerate launch train/progressive.py --recipe recipes/demo.yaml [--run-dir runs/demo] [--dry-run]

Running the same command again resumes the run in its run dir. This script only parses the flags (before the
library is imported, so --help answers at once); all logic lives in `sparsegpt.run.scheduler`.
"""

import argparse
import sys
from pathlib import Path


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="train/progressive.py",
        description=("Progressive sparsification: for each stage of the recipe, prune one-shot with SparseGPT to the "
                     "stage's target (never reviving weights pruned before), evaluate, fine-tune with the mask held "
                     "exactly, evaluate, checkpoint. Run the same command again to resume."),
        epilog=("examples:\n"
                "  accelerate launch train/progressive.py --recipe recipes/demo.yaml --dry-run\n"
                "  accelerate launch --num_processes 8 train/progressive.py --recipe recipes/opt13b_90.yaml\n"
                "  sparsegpt report runs/opt13b_90"),
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", required=True, type=Path, help="YAML recipe (see recipes/)")
    parser.add_argument("--run-dir", type=Path, default=None,
                        help="where the run lives (default: runs/<recipe name>); an existing one is resumed")
    parser.add_argument("--dry-run", action="store_true",
                        help="print the expanded stage plan and a per-device memory estimate, then exit")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return parser


if __name__ == "__main__":
    arguments = build_parser().parse_args()
    from sparsegpt.run.scheduler import main  # noqa: E402 -- after parsing: --help must not wait for torch and transformers

    sys.exit(main(arguments))
