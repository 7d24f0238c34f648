"""Stop requests: SIGTERM, SIGUSR1 (what SLURM's `--signal` sends) and Ctrl-C (SIGINT) ask a run to stop at its
next safe point instead of dying where it stands.

`install(grace_s)` puts the handlers in place (main thread, every rank). A signal only sets a flag; the long loops
ask `stop_point(world, where)` at their safe points (after an optimizer step, between decoder layers, between
phases), which all-reduces the flag (one small collective, so every rank decides the same and none waits forever)
and raises `Preempted` on every rank when any rank was asked to stop. The fine-tuning loop writes a checkpoint
first; the scheduler turns `Preempted` into exit code `EXIT_PREEMPTED` and a line saying how to resume.
From the first signal on, a watchdog allows `grace_s` seconds; past them the process exits with `EXIT_PREEMPTED`
anyway (what it was writing is atomic: the last complete checkpoint or phase stays the resume point). A second
Ctrl-C more than `DOUBLE_INTERRUPT_S` after the first aborts at once (`accelerate launch` forwards the terminal's
Ctrl-C to the ranks, which then see it twice within milliseconds: that counts as one).
"""

from __future__ import annotations

import os
import signal
import threading
import time
from dataclasses import dataclass, field

import torch

from sparsegpt.core.world import World, collective_device

EXIT_PREEMPTED = 75  # EX_TEMPFAIL: stopped on request at a safe point; run the same command again to resume
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)
DOUBLE_INTERRUPT_S = 2.0


class Preempted(Exception):
    """A stop was requested (by a signal on some rank) and every rank reached the safe point `where`."""

    def __init__(self, signame: str, where: str):
        self.signame, self.where = signame, where
        super().__init__(signame, where)

    def __str__(self) -> str:
        return f"stopped by {self.signame} {self.where}"


@dataclass
class _StopState:
    """The process's stop request: signal handlers are process-wide, so this is the one module-level state."""

    signame: str | None = None
    at: float = 0.0
    grace_s: float | None = None
    watchdog: threading.Timer | None = None
    previous: dict = field(default_factory=dict)


_STATE = _StopState()


def install(grace_s: float | None) -> None:
    """Handle STOP_SIGNALS from now on (main thread only; elsewhere a no-op); `grace_s`: the watchdog's budget."""
    if threading.current_thread() is not threading.main_thread():
        return
    _STATE.grace_s = grace_s
    for sig in STOP_SIGNALS:
        _STATE.previous.setdefault(sig, signal.signal(sig, _handle))


def uninstall() -> None:
    """Restore the handlers `install` replaced, stop the watchdog and forget any request."""
    for sig, previous in _STATE.previous.items():
        signal.signal(sig, previous if previous is not None else signal.SIG_DFL)
    if _STATE.watchdog is not None:
        _STATE.watchdog.cancel()
    _STATE.previous.clear()
    _STATE.signame, _STATE.watchdog = None, None


def requested() -> str | None:
    """The name of the signal that asked this process to stop, or None."""
    return _STATE.signame


def stop_point(world: World, where: str) -> None:
    """A safe point every rank of `world` passes together: raise `Preempted` on every rank if any was asked to
    stop. One all-reduce of one number per call (none in a world of one)."""
    flag = 1.0 if _STATE.signame is not None else 0.0
    if world.size > 1:
        tensor = torch.tensor([flag], dtype=torch.float32, device=collective_device("cpu"))
        flag = float(world.all_reduce_sum(tensor))
    if flag > 0:
        raise Preempted(_STATE.signame or "a signal to another rank", where)


def _handle(signum: int, frame) -> None:
    """Record the request (no logging here: the interrupted code may hold the logging lock); arm the watchdog."""
    name = signal.Signals(signum).name
    now = time.monotonic()
    if signum == signal.SIGINT and _STATE.signame is not None and now - _STATE.at > DOUBLE_INTERRUPT_S:
        _say("second interrupt: aborting now (the run resumes from its last complete checkpoint or phase)")
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGINT)
        return
    if _STATE.signame is not None:
        return
    _STATE.signame, _STATE.at = name, now
    _say(f"{name} received: stopping at the next safe point (a checkpoint is written during fine-tuning)")
    if _STATE.grace_s is not None:
        _STATE.watchdog = threading.Timer(_STATE.grace_s, _give_up, args=(name, _STATE.grace_s))
        _STATE.watchdog.daemon = True
        _STATE.watchdog.start()


def _give_up(name: str, grace_s: float) -> None:
    _say(f"{name}: the stop took longer than preempt_grace_s={grace_s:g}; exiting without waiting further "
         f"(exit {EXIT_PREEMPTED}; the last complete checkpoint or phase is the resume point)")
    os._exit(EXIT_PREEMPTED)


def _say(message: str) -> None:
    os.write(2, f"[rank {os.environ.get('RANK', '0')}] {message}\n".encode())
