"""True-sequential pruning of a decoder layer: one forward per layer instead of two.

The default pass runs each layer twice: dense, with hooks that sum every input group's Hessian, then (all groups
solved) pruned, to produce the next layer's inputs. With `PruneConfig.true_sequential` the layer runs once over all
of this rank's calibration rows, and each input group is solved in the forward pre-hook of the first of its linears
to be called. Its Hessian therefore comes from inputs computed with the groups before it in the layer already pruned
(q/k/v before o_proj, the attention before the MLP: GPTQ's "true sequential" order), and the forward goes on with
the pruned weights, so its output is the pruned layer's: the next layer's inputs, with no propagation forward.

Cost and memory: one forward per layer; the forward's activations for all of the rank's calibration rows at once
(`batch_size` does not apply; the estimator counts them). Ranks: each group's Hessian is all-reduced inside the
hook and the group is solved by one rank and broadcast (`RankPass.solve_layer`), so a rank waits while another
solves. Refused before the pass starts with fused MoE experts (a down projection's input lives inside the experts
call: `check_true_sequential`) and with layer-wise reconstruction (it trains towards the dense layer's outputs,
which this pass never runs: `PruneConfig.validate`, and the recipe's `PruneSettings`).
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch
from torch import Tensor, nn

from sparsegpt.core.architectures import ExpertLinear
from sparsegpt.core.errors import UserError
from sparsegpt.prune.capture import LayerBatch, forward_layer
from sparsegpt.prune.distributed import RankPass
from sparsegpt.prune.experts import ExpertHessians
from sparsegpt.prune.solver import add_gram_, hessians_from_sums, never_ran

# (group, hessians by leader, info by leader, stats out): prunes the group in place and fills the masks
SolveWithHessian = Callable[[list[str], dict[str, Tensor], dict[str, dict], list[dict]], None]


def forward_solving(layer: nn.Module, index: int, batch: LayerBatch, linears: dict[str, nn.Module],
                    groups: list[list[str]], device, run: RankPass, masks: dict, stats: list[dict],
                    solve: SolveWithHessian, autocast: torch.dtype | None = None,
                    products: torch.dtype | None = None) -> Tensor:
    """Run layer `index` once over `batch`, solving each group of `linears` when the first of its members is
    called; return the layer's (pruned) outputs. `stats` and `masks` end in the order of `groups`, as from
    `RankPass.solve_layer` over the whole layer."""
    group_of = {name: group for group in groups for name in group}
    solved: dict[str, list[dict]] = {}
    load = [0.0] * run.world.size  # which rank solves each group: the least loaded so far (`balance`)
    no_experts = ExpertHessians({}, device, diag_only=False)

    def hook(module, args, name):
        group = group_of[name]
        if group[0] in solved:
            return
        x = args[0]
        cols = x.shape[-1]
        with run.timing("hessian"):
            total = add_gram_(torch.zeros(cols, cols, dtype=torch.float64, device=x.device), x, dtype=products)
        sums = {group[0]: total}
        del total
        hessians, info = hessians_from_sums(sums, run.reduce(sums, {group[0]: x.numel() // cols}, no_experts))
        solved[group[0]] = []
        run.solve_layer([group], linears, masks, solved[group[0]],
                        lambda g, out: solve(g, hessians, info, out), load)

    handles = [linears[name].register_forward_pre_hook(lambda m, a, name=name: hook(m, a, name))
               for name in group_of]
    before = {k: run.seconds[k] for k in ("solve", "communication")}
    start = time.perf_counter()
    try:
        out = forward_layer(layer, index, batch, device, autocast)
    finally:
        for h in handles:
            h.remove()
    inside = sum(run.seconds[k] - v for k, v in before.items())  # the hooks' solves and all-reduces: their own
    run.seconds["forward"] += time.perf_counter() - start - inside
    silent = [g[0] for g in groups if g[0] not in solved]
    if silent:
        raise never_ran(silent)
    stats.extend(entry for group in groups for entry in solved[group[0]])
    for name in (name for group in groups for name in group):  # the groups' order on every rank
        masks[name] = masks.pop(name)
    return out


def check_true_sequential(per_layer: list[dict[str, nn.Module]], rows: int, world_size: int) -> None:
    """UserError (the same on every rank) where true-sequential pruning cannot run: fused experts (their inner
    inputs are not hooked) or a rank without calibration rows (it would miss the collectives in the hooks)."""
    experts = [n for linears in per_layer for n, m in linears.items() if isinstance(m, ExpertLinear)]
    if experts:
        raise UserError(f"true_sequential cannot prune fused MoE experts ({experts[0]}): their down projection's "
                        "input lives inside the experts call; set true_sequential: false for this model")
    if rows < world_size:
        raise UserError(f"true_sequential needs a calibration row per process: {rows} rows for {world_size} "
                        f"processes; raise nsamples to at least {world_size}")
