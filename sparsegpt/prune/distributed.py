"""The SparseGPT pass on every rank of a process group: what each rank does and how the ranks agree.

H = 2/N Σ xxᵀ is a sum over calibration tokens, so each rank pushes only its contiguous share of the calibration
sequences (`World.share`) through the current layer and accumulates the unnormalized Σ xxᵀ and token counts of its
share; one all-reduce per statistic (dense Hessians, OWL's diagonals, per-expert Hessians and routed-token counts)
sums them, and only then is H normalized (and the MoE under-calibrated rule applied, since it reads the counts). The
layer's input groups are independent solves: each is solved by one rank (`balance`: largest first, each to the least
loaded rank, by the cost cols·(cols + rows), which tracks the measured CPU solve times within ~20 %; round robin in
the family table's order gave one of 2 ranks both Llama MLP groups, a 1.03x speed-up), then every pruned weight
and its mask are broadcast from their owner, so every rank ends the layer with identical weights and identical,
complete `masks` and `stats`; each rank then propagates its own share through the pruned layer.

A rank with no calibration rows or no group still joins every collective (with zero sums). A step that can fail
on one rank only (capture, a solve) is followed by `agree`, so a failure on any rank fails every rank instead of
leaving the others waiting in a collective. A world of one takes no collective at all: the pass is bit for bit
the single-process one.

Precision: every Σxxᵀ is a float64 sum of one float32 product per calibration sequence (`solver.add_gram_`; OWL's
Σx² from float64 copies), on every world size, and H is cast to float32 once normalized. A sequence's product does
not depend on its batch or rank, so only the float64 order of the sum does. Measured on SmolLM2-135M
(bench/prune/results_distributed_prune.md): with float32 sums over whole batches, merely batching the same 16
sequences by 16 instead of 8 in ONE process left only 93-98 % of layer 3's masks identical (the last-bit differences
flip near-tie mask choices, whose OBS updates then differ, and the next layer sees other inputs), and 2 processes
matched 1 in 95.6 % of all masks; with float64 sums both are 100 % identical. Until 2026-12-06 the sums were float64
GEMMs of float64 copies: half the float32 GEMM rate on CPUs (and 1/32-1/64 of it on consumer GPUs), plus the copy;
the per-sequence float32 products keep the independence at the float32 rate (bench/prune/results_profile.md). The
sums' memory is float64 (20480² = 3.4 GB) and so are the all-reduced bytes.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TypeVar

import torch
from torch import Tensor, nn

from sparsegpt.core.architectures import ExpertLinear, set_weight_from_linear, weight_as_linear
from sparsegpt.core.world import World, agree, collective_device

T = TypeVar("T")
log = logging.getLogger(__name__)


def all_reduce_(world: World, tensor: Tensor) -> Tensor:
    """Sum `tensor` over the ranks in place, through the backend's device (NCCL: the current GPU)."""
    if world.size == 1:
        return tensor
    device = collective_device(tensor.device)
    if device == tensor.device and tensor.is_contiguous():
        return world.all_reduce_sum(tensor)
    return tensor.copy_(world.all_reduce_sum(tensor.to(device).contiguous()))


def all_reduce_ints(world: World, values: list[int]) -> list[int]:
    """Integers summed over the ranks (one collective for the whole list)."""
    if world.size == 1:
        return list(values)
    totals = torch.tensor(values, dtype=torch.int64, device=collective_device("cpu"))
    return world.all_reduce_sum(totals).tolist()


def balance(costs: list[float], ranks: int, load: list[float] | None = None) -> list[int]:
    """The rank that solves each item: largest cost first, each to the least loaded rank (ties: the lowest rank);
    deterministic, and the same on every rank since the costs come from shapes. `load` (per rank, updated in
    place) carries the loads of earlier calls, e.g. a layer solved in several calls."""
    owners, load = [0] * len(costs), [0.0] * ranks if load is None else load
    for k in sorted(range(len(costs)), key=lambda k: (-costs[k], k)):
        owners[k] = min(range(ranks), key=lambda r: (load[r], r))
        load[owners[k]] += costs[k]
    return owners


def solve_cost(shapes: list[tuple[int, int]]) -> float:
    """A group's solve cost from its members' (out, in) shapes: its columns times (columns + stacked rows)."""
    cols = shapes[0][1]
    return float(cols * (cols + sum(rows for rows, _ in shapes)))


def _broadcast_linear(world: World, module: nn.Module | ExpertLinear, name: str, masks: dict[str, Tensor],
                      src: int) -> None:
    """The owner's pruned (out, in) weight and mask of `name`, on every rank."""
    weight = weight_as_linear(module)
    device = collective_device(weight.device)
    if world.rank == src:
        world.broadcast(weight.to(device).contiguous(), src)
        world.broadcast(masks[name].to(device=device, dtype=torch.uint8), src)
        return
    received = world.broadcast(torch.empty(weight.shape, dtype=weight.dtype, device=device), src)
    set_weight_from_linear(module, received)
    masks[name] = world.broadcast(torch.empty(weight.shape, dtype=torch.uint8, device=device), src).bool().cpu()


PHASES = ("capture", "forward", "hessian", "communication", "solve", "factor", "propagate", "io", "reconstruct")
"""Wall seconds per phase of a pass (`RankPass.timing`): the capture forward; each layer's forward with the
Hessian hooks, of which `hessian` is the time inside the hooks; all-reduces and broadcasts; the solves, of which
`factor` is the inverse-Hessian factorization; the pruned layer's forward (propagation); the `LayerAccess`
enter/leave (a streamed pass's reads and writes); layer-wise reconstruction (`sparsegpt.prune.reconstruct`)."""

SolveGroup = Callable[[list[str], list[dict]], None]  # (group, stats out): prunes it in place, fills masks


@dataclass
class RankPass:
    """This rank's part of one pruning pass: the world, and what the rank did (`record()` gathers every rank's)."""

    world: World
    calibration_rows: int = 0
    groups: int = 0
    linears: int = 0
    seconds: dict[str, float] = field(default_factory=lambda: dict.fromkeys(PHASES, 0.0))
    forward_dtype: str = "float32"  # what the layer forwards computed in (autocast, or the weights' dtype)

    def calibration_share(self, calib_ids: Tensor) -> Tensor:
        """This rank's contiguous share of the calibration rows (all of them in a world of one)."""
        share = self.world.share(calib_ids.shape[0])
        self.calibration_rows = len(share)
        return calib_ids if self.world.size == 1 else calib_ids[share.start:share.stop]

    @contextmanager
    def timing(self, what: str) -> Iterator[None]:
        """Add the wall time of the block to seconds[what] (queued CUDA kernels waited for)."""
        start = time.perf_counter()
        try:
            yield
        finally:
            if torch.cuda.is_available() and torch.cuda.is_initialized():
                torch.cuda.synchronize()
            self.seconds[what] += time.perf_counter() - start

    def reduce(self, sums: dict[str, Tensor], counts: dict[str, int], experts) -> dict[str, int]:
        """Sum this layer's statistics over the ranks: `sums` in place, the token counts returned, and the
        per-expert sums and counts of `experts` (an `ExpertHessians`) in place."""
        if self.world.size == 1:
            return counts
        with self.timing("communication"):
            for tensor in sums.values():
                all_reduce_(self.world, tensor)
            counts = dict(zip(counts, all_reduce_ints(self.world, list(counts.values()))))
            experts.reduce(self.world)
        return counts

    def solve_layer(self, groups: list[list[str]], linears: dict, masks: dict[str, Tensor], stats: list[dict],
                    solve: SolveGroup, load: list[float] | None = None) -> None:
        """Solve this rank's groups of the layer, then share every pruned weight, mask and stat with all ranks;
        `stats` grows in group order, each entry carrying the `rank` that solved it; `load` as in `balance`."""
        mine: dict[int, list[dict]] = {}
        owners = balance([solve_cost([tuple(weight_as_linear(linears[n]).shape) for n in g]) for g in groups],
                         self.world.size, load)

        def solve_mine() -> None:
            for k, group in enumerate(groups):
                if owners[k] != self.world.rank:
                    continue
                with self.timing("solve"):
                    solve(group, mine.setdefault(k, []))
                for entry in mine[k]:
                    entry["rank"] = self.world.rank
                self.groups += 1
                self.linears += len(group)

        agree(self.world, solve_mine)
        if self.world.size == 1:
            stats.extend(entry for k in range(len(groups)) for entry in mine[k])
            return
        with self.timing("communication"):
            for k, group in enumerate(groups):
                for name in group:
                    _broadcast_linear(self.world, linears[name], name, masks, owners[k])
            solved = self.world.gather_objects(mine)
        for name in (name for group in groups for name in group):  # one insertion order on every rank: the
            masks[name] = masks.pop(name)                           # groups' (collectives iterate the masks)
        stats.extend(entry for k in range(len(groups)) for entry in solved[owners[k]][k])

    def record(self) -> dict:
        """{size, ranks: per rank {rank, calibration_rows, groups, linears, forward_dtype, seconds}} (a
        collective); logs this rank's phases, the nested ones (hessian in forward, factor in solve) as their own
        line items."""
        sec = self.seconds
        log.info("pass phases (rank %d): capture %.1fs, layer forwards %.1fs, Hessian sums %.1fs, communication "
                 "%.1fs, factorizations %.1fs, solves %.1fs, propagation %.1fs, layer I/O %.1fs",
                 self.world.rank, sec["capture"], sec["forward"] - sec["hessian"], sec["hessian"],
                 sec["communication"], sec["factor"], sec["solve"] - sec["factor"], sec["propagate"], sec["io"])
        own = dict(rank=self.world.rank, calibration_rows=self.calibration_rows, groups=self.groups,
                   linears=self.linears, forward_dtype=self.forward_dtype,
                   seconds={k: round(v, 4) for k, v in self.seconds.items()})
        return {"size": self.world.size, "ranks": self.world.gather_objects(own)}
