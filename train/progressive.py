"""Progressive SparseGPT pruning + mask-preserving fine-tuning, one recipe, resumable.

    accelerate launch train/progressive.py --recipe recipes/demo.yaml [--run-dir runs/demo] [--dry-run]

Running the same command again resumes the run in its run dir. All logic lives in `sparsegpt.run`.
"""

import sys

from sparsegpt.run import main

if __name__ == "__main__":
    sys.exit(main())
