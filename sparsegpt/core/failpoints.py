"""Named crash points for the kill-and-resume tests: `SPARSEGPT_FAILPOINT=name[:n[:SIGNAL[@RANK]]]` sends this
process SIGNAL (default SIGKILL) the n-th time (default 1st) execution passes `failpoint(name)`, on every rank or
only on rank RANK (the preemption tests: a real SIGTERM/SIGUSR1/SIGINT/SIGSTOP at a known step). Unset (always,
outside tests) it costs one dict lookup.

Points: prune/layer (after a decoder layer is pruned), finetune/step (after an optimizer step), finetune/lr-search
(after an `lr: auto` candidate's probe is recorded),
save/before-rename (an HF folder fully written but not yet renamed into place), save/between-renames (a replaced
folder parked aside, the new one not yet renamed in).
"""

from __future__ import annotations

import os
import signal
from collections import Counter

_hits: Counter = Counter()  # per-process pass counts; only ever touched when the variable is set


def failpoint(name: str) -> None:
    """Signal this process (SIGKILL unless named) if SPARSEGPT_FAILPOINT names this point and its count is reached."""
    spec = os.environ.get("SPARSEGPT_FAILPOINT")
    if not spec:
        return
    target, _, rest = spec.partition(":")
    if target != name:
        return
    count, _, how = rest.partition(":")
    signame, _, rank = how.partition("@")
    _hits[name] += 1
    if _hits[name] == int(count or 1) and rank in ("", os.environ.get("RANK", "0")):
        os.kill(os.getpid(), getattr(signal, signame or "SIGKILL"))
