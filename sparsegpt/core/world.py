"""The process group a pass runs in: rank, size and the few collectives pruning and evaluation need.

`World.current()` is the torch.distributed group when one is initialized (as under `accelerate launch`), else a
world of one process, in which every collective is a no-op, so library code has one path for 1 and N processes.
Work is split deterministically: `share(n)` gives rank r the contiguous items [r*n/size, (r+1)*n/size), and
`owner(k)` assigns item k to rank k % size; a rank may get nothing (it still joins every collective).
"""

from __future__ import annotations

import atexit
import contextlib
import gc
import inspect
import logging
import os
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from typing import Callable, TypeVar

import torch
import torch.distributed as dist
from torch import Tensor

from sparsegpt.core.errors import UserError

T = TypeVar("T")
log = logging.getLogger(__name__)

# How long a collective waits for the slowest rank before the job is killed. NCCL's default is 10 min (gloo's 30)
# and DeepSpeed's `init_distributed` also defaults to 10 min, while rank 0 alone saves or verifies a 70B model, or
# prunes the layers it owns, for far longer; every process group this project opens uses this one value.
COLLECTIVE_TIMEOUT = timedelta(hours=12)


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1

    @classmethod
    def current(cls) -> World:
        """The initialized default process group, or a world of one."""
        if dist.is_available() and dist.is_initialized():
            return cls(dist.get_rank(), dist.get_world_size())
        return cls()

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def share(self, n: int) -> range:
        """This rank's contiguous share of n items (sizes differ by at most one; low ranks get the extra)."""
        base, extra = divmod(n, self.size)
        start = self.rank * base + min(self.rank, extra)
        return range(start, start + base + (self.rank < extra))

    def owner(self, k: int) -> int:
        """The rank that does item k (round robin)."""
        return k % self.size

    def all_reduce_sum(self, tensor: Tensor) -> Tensor:
        """Sum `tensor` over the ranks in place (no-op in a world of one); returns it."""
        if self.size > 1:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor

    def broadcast(self, tensor: Tensor, src: int) -> Tensor:
        """Every rank's `tensor` (same shape and dtype everywhere) becomes src's, in place; returns it."""
        if self.size > 1:
            dist.broadcast(tensor, src=src)
        return tensor

    def broadcast_object(self, obj: object, src: int = 0) -> object:
        """src's picklable `obj`, on every rank."""
        if self.size == 1:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=src)
        return box[0]

    def gather_objects(self, obj: object) -> list[object]:
        """Every rank's `obj`, in rank order, on every rank."""
        if self.size == 1:
            return [obj]
        out: list[object] = [None] * self.size
        dist.all_gather_object(out, obj)
        return out

    def barrier(self) -> None:
        if self.size > 1:
            dist.barrier()


def init_from_env() -> World:
    """Under torchrun / `accelerate launch` (WORLD_SIZE > 1 in the environment) initialize the default process
    group if nothing did yet: NCCL with this process's LOCAL_RANK GPU as its device when CUDA is available, else
    gloo; either waits COLLECTIVE_TIMEOUT in a collective. Returns `World.current()` (a world of one without a
    launcher); calling it again changes nothing."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
            dist.init_process_group("nccl", timeout=COLLECTIVE_TIMEOUT)
        else:
            dist.init_process_group("gloo", timeout=COLLECTIVE_TIMEOUT)
    return World.current()


# -- leaving the process group before the interpreter finalizes ------------------------------------------------
# A gloo process group runs worker threads that drop each finished collective's tensors after the caller's wait()
# has returned; dropping a tensor that has a Python object takes the GIL. If such a drop is still pending when the
# interpreter finalizes, CPython ends that thread (pthread_exit in take_gil), the unwind crosses a noexcept
# destructor (ProcessGroupGloo::AsyncWork, called from runLoop) and libstdc++ aborts the whole process:
# "terminate called without an active exception", SIGABRT after the job's work is done. Only the group's destructor
# joins those threads; `destroy_process_group` frees the group only when no other reference holds it (gloo's
# `shutdown` leaves the threads running), and DeepSpeed holds one whenever `deepspeed.comm` was first imported
# after the group started (transformers' `save_pretrained` imports it): `TorchBackend.barrier` and
# `monitored_barrier` take `group=GroupMember.WORLD` as a default argument, evaluated at import (`leave` unpins it).
# DeepSpeed ZeRO-3 also keeps its groups on every parameter (`ds_process_group`), in `Init` and in its engines, with no
# call that lets go of them; then the threads outlive the group, and `leave` instead waits until they are idle
# (asleep in their queue, nothing left to drop), which is all the finalization needs.

def _gloo_thread_states() -> list[str]:
    """The scheduler state (R running, S sleeping, ...) of each gloo worker thread of this process (Linux; none
    where /proc is missing)."""
    try:
        tasks = os.listdir("/proc/self/task")
    except OSError:
        return []
    states = []
    for task in tasks:
        try:
            with open(f"/proc/self/task/{task}/stat") as f:
                stat = f.read()
        except OSError:  # the thread ended meanwhile
            continue
        name, rest = stat[stat.index("(") + 1:stat.rindex(")")], stat[stat.rindex(")") + 2:]
        if name.startswith("pt_gloo_runloop"):
            states.append(rest[0])
    return states


def _gloo_threads() -> int:
    return len(_gloo_thread_states())


def _let_gloo_threads_settle(quiet: float = 0.1, limit: float = 5.0) -> None:
    """Hold no GIL until every gloo worker thread has slept for `quiet` seconds in a row (at most `limit`): a thread
    that still had a finished collective's tensors to drop takes the GIL meanwhile and then sleeps in its queue."""
    start = last_busy = time.monotonic()
    while time.monotonic() - last_busy < quiet and time.monotonic() - start < limit:
        time.sleep(0.005)
        if any(state != "S" for state in _gloo_thread_states()):
            last_busy = time.monotonic()


def _unpin_deepspeed_defaults() -> None:
    """Point DeepSpeed's `TorchBackend.barrier`/`monitored_barrier` default `group` back to None (which they read as
    the default group at call time) where it captured a process group at import, so that group can be freed."""
    backend = getattr(sys.modules.get("deepspeed.comm.torch"), "TorchBackend", None)
    for name in ("barrier", "monitored_barrier"):
        fn = inspect.unwrap(getattr(backend, name, None) or (lambda: None))
        if fn.__defaults__ and any(isinstance(d, dist.ProcessGroup) for d in fn.__defaults__):
            fn.__defaults__ = tuple(None if isinstance(d, dist.ProcessGroup) else d for d in fn.__defaults__)


def leave() -> None:
    """Destroy the default process group (and every subgroup) so that its destructor joins its gloo worker threads
    now: none is left dropping a tensor when the interpreter finalizes (see above). Call it once this rank is done
    with collectives; at exit, any process that imported this module runs it if gloo threads still run then (every
    entry point of this project imports it). Where a reference it cannot release keeps a group, and so its threads,
    alive (DeepSpeed ZeRO-3's parameters and engines), it waits until those threads are idle instead."""
    if not dist.is_available():
        return
    _unpin_deepspeed_defaults()  # also when the caller destroyed the group already: it may be held here
    if dist.is_initialized():
        dist.destroy_process_group()
    if _gloo_threads():
        gc.collect()  # a group held only in a reference cycle goes now, not during finalization
    if _gloo_threads():  # still held: DeepSpeed ZeRO-3 keeps its groups on every parameter and engine
        log.debug("a gloo process group outlives destroy_process_group (still referenced); waiting for its threads")
        _let_gloo_threads_settle()


@contextlib.contextmanager
def joined() -> Iterator[World]:
    """The launch's process group for one command (`sparsegpt prune`, `eval`): joined through `init_from_env` unless
    this process is in one already (a caller's group is left alone), and left through `leave` afterwards when it
    was joined here, also on errors."""
    owned = not dist.is_initialized()
    world = init_from_env()
    try:
        yield world
    finally:
        if owned and dist.is_initialized():
            leave()


def _leave_at_exit() -> None:
    """`leave` for a process that still runs gloo worker threads at exit (a group no one destroyed, or one destroyed
    but still held); atexit runs it before the interpreter finalizes. Nothing to do otherwise (NCCL groups included:
    their teardown is torch's)."""
    if _gloo_threads():
        leave()


atexit.register(_leave_at_exit)


def rank_device(arg: str | None, world: World) -> str:
    """A command's --device: default cuda if available else cpu; under a multi-process launch, "cuda" is this
    rank's GPU (`init_from_env` made LOCAL_RANK's GPU current), so no two ranks share cuda:0."""
    device = arg or ("cuda" if torch.cuda.is_available() else "cpu")
    return f"cuda:{torch.cuda.current_device()}" if device == "cuda" and world.size > 1 else device


def collective_device(device: torch.device | str) -> torch.device:
    """Where a tensor on `device` must be to join a collective: the current GPU under NCCL, else `device`."""
    if dist.is_available() and dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device(device)


# -- steps that can fail on some ranks only: fail on every rank, so none waits in a collective ----------------

class RankFailed(RuntimeError):
    """Another rank failed in a step every rank takes together, so this one stops too."""


def on_every_rank(world: World, fn: Callable[[], T]) -> list[T]:
    """fn() on this rank, then one gather of every rank's outcome: the results in rank order, or, if any rank
    raised, an exception on every rank (its own on a failed rank, RankFailed naming the first failed one elsewhere).
    Work that can fail on some ranks only goes inside fn, so no rank waits in a collective a failed one never joins."""
    try:
        result, error = fn(), None
    except Exception as e:
        result, error = None, e
    outcomes = world.gather_objects((result, None if error is None else f"{type(error).__name__}: {error}"))
    if error is not None:
        raise error
    failed = [(rank, message) for rank, (_, message) in enumerate(outcomes) if message is not None]
    if failed:
        raise RankFailed(f"rank {failed[0][0]} failed: {failed[0][1]}")
    return [r for r, _ in outcomes]


def agree(world: World, step: Callable[[], T]) -> T:
    """`step()` here; if it raised on any rank, raise on every rank: the failing rank its own exception, the others
    a UserError with its one-line message (RankFailed naming the rank when it was not a UserError). One gather;
    a world of one just runs `step`."""
    if world.size == 1:
        return step()
    try:
        value, error = step(), None
    except Exception as e:  # re-raised below, after every rank has heard of it
        value, error = None, e
    report = None if error is None else (isinstance(error, UserError), (str(error).splitlines() or [""])[0])
    failed = [(rank, r) for rank, r in enumerate(world.gather_objects(report)) if r is not None]
    if error is not None:
        raise error
    if failed:
        rank, (user, message) = failed[0]
        raise UserError(message) if user else RankFailed(f"rank {rank} failed: {message}")
    return value
