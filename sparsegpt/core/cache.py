"""Where sparsegpt keeps what it builds once per machine: converted models and offline corpora.

`$SPARSEGPT_CACHE` (default `~/.cache/sparsegpt`); every entry is named by a key over all of its inputs and written
atomically, so a stale or half-written entry is never read (tests point the variable at a per-session folder).
"""

from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    return Path(os.environ.get("SPARSEGPT_CACHE") or Path.home() / ".cache" / "sparsegpt").expanduser()
