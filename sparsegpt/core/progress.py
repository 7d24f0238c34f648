"""Whether progress bars are drawn: off with SPARSEGPT_NO_PROGRESS=1 (logs, tests, benches); read at each call."""

from __future__ import annotations

import os


def progress_disabled() -> bool:
    """True when SPARSEGPT_NO_PROGRESS=1: tqdm bars are off and the log lines carry the progress."""
    return os.environ.get("SPARSEGPT_NO_PROGRESS") == "1"
