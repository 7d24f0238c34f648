"""Per-expert calibration Hessians of fused MoE experts (the transformers 5.x layout).

transformers 5.x keeps all experts of a layer in one module holding 3-D parameters of shape (experts, out, in):
`gate_up_proj` (or `up_proj` without a gate) and `down_proj`, called as
`experts(hidden (T, H), top_k_index (T, k), top_k_weights (T, k))`. A forward pre-hook on that module sees every
token and the router's top-k choice: the tokens routed to expert e are the input of its gate_up / up matrix, and
the input of its down_proj is recomputed from them with the module's own gate (`_apply_gate`, or `act_fn`
without a gate), as every experts implementation (eager loop, batched_mm, grouped_mm) computes it.

Under-calibrated experts (the rule): with m = `min_tokens` (None: the matrix's input width), an expert matrix
that saw N < m routed tokens gets H = 2/m · (Σ_own xxᵀ + (m − N) · S_pool / N_pool): its own tokens topped up
to m with the mean outer product over all routed tokens of the same parameter in that layer (every expert's).
N = 0 gives the pooled Hessian; m = 0 still pools an expert that saw nothing. The pooled share (m − N) / m is
returned per matrix (`pooled_weight`, next to `tokens`) and logged, so it lands in the prune stats. S_pool is
added up expert by expert in index order (what `sum(0)` does below 16 experts), so it does not depend on the chunks.
Under a process group each rank accumulates its own share; the sums and counts are all-reduced before the rule.

Memory: a layer's expert Hessians are float64 sums of experts × cols² (then float32 copies): all at once that is
~26 GB for Mixtral-8x22B's down_proj (8 × 16384²) and ~158 GB for a 256-expert 7168-wide gate_up. When they would
exceed `HESSIAN_BUDGET` (12 · cols² bytes an expert: its float64 sum and its float32 Hessian), the layer's forward
only keeps the experts modules' inputs and routing (`cache`, on the pass's activation device: one more copy of the
layer's activations, tokens × hidden in the model dtype, e.g. 3.2 GB for 262k bf16 tokens of Mixtral-8x22B), and
`chunks` then sums, all-reduces and hands out the Hessians of `chunk_size` experts at a time, solved before the next
chunk is summed: at most chunk_size · 12 · cols² bytes of them (+ 16 · cols² to pool), on every rank. The replay
recomputes only the experts' gate_up products for down_proj, which a second layer forward per chunk would repeat
whole (attention and every expert). Each expert's sum sees the same products in the same order as in one pass, so
the Hessians are bitwise those of the single pass. Every down_proj is summed before any gate_up / up of its module
is solved (its input is computed from their dense weights), and an under-calibrated expert is summed once more
after its parameter's pool is complete (it saw fewer than m tokens, so that replay is cheap).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from functools import partial

import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torch.utils.hooks import RemovableHandle

from sparsegpt.core.architectures import ExpertLinear, fused_expert_params, linear_shape, param_shape
from sparsegpt.core.errors import UserError
from sparsegpt.core.world import World
from sparsegpt.prune.distributed import RankPass, all_reduce_, all_reduce_ints
from sparsegpt.prune.solver import never_ran

log = logging.getLogger(__name__)

HESSIAN_BUDGET = 4 * 2**30
"""Bytes of expert Hessians a rank holds at once (12 · cols² an expert: float64 sum + float32 Hessian); a layer
whose experts need more is summed and solved in chunks (`ExpertHessians.chunked`). Mixtral-8x22B's down_proj:
one expert a chunk (3.2 GB), its gate_up (6144 wide): all 8 at once (3.6 GB)."""


def chunk_size(cols: int, budget: int | None = None) -> int:
    """How many experts of a matrix `cols` wide one chunk holds: the budget over 12 · cols², at least one."""
    return max(1, (HESSIAN_BUDGET if budget is None else budget) // (12 * cols * cols))


def _routing(module: nn.Module, args: tuple, kwargs: dict) -> tuple[Tensor, Tensor]:
    """The (hidden_states, top_k_index) an experts module was called with; UserError for any other signature."""
    hidden = args[0] if args else kwargs.get("hidden_states")
    index = args[1] if len(args) > 1 else kwargs.get("top_k_index")
    if not isinstance(hidden, Tensor) or not isinstance(index, Tensor):
        raise UserError(f"{type(module).__name__} is not called as experts(hidden_states, top_k_index, ...); "
                        "cannot route calibration tokens to its experts (exclude its matrices with --exclude)")
    x = hidden.reshape(-1, hidden.shape[-1])
    return x, index.reshape(x.shape[0], -1)


def _expert_linear(module: nn.Module, param: str, index: int, x: Tensor) -> Tensor:
    """x through expert `index`'s matrix of fused parameter `param` (plus its bias where the module has one)."""
    weight = getattr(module, param)[index]
    out = x @ weight if getattr(module, "is_transposed", False) else F.linear(x, weight)
    bias = getattr(module, f"{param}_bias", None) if getattr(module, "has_bias", False) else None
    return out if bias is None else out + bias[index]


def expert_intermediate(module: nn.Module, index: int, x: Tensor) -> Tensor:
    """The input of expert `index`'s down_proj for its routed tokens x: the module's own gate (or activation)."""
    if "gate_up_proj" in fused_expert_params(module):
        gate = getattr(module, "_apply_gate", None)
        if gate is None:
            raise UserError(f"{type(module).__name__} has a fused gate_up_proj but no _apply_gate; cannot compute "
                            "its experts' down_proj inputs (exclude 'down_proj' with --exclude)")
        return gate(_expert_linear(module, "gate_up_proj", index, x))
    return module.act_fn(_expert_linear(module, "up_proj", index, x))


Key = tuple[int, str]  # (id(experts module), fused parameter)


class ExpertHessians:
    """Accumulates, for the expert matrices of one decoder layer, each expert's Σ xxᵀ (or its diagonal) over the
    tokens the router sends it, through one forward pre-hook per fused experts module: during the forward when
    they fit `budget`, else from the cached routed inputs, one chunk of experts at a time (`chunks`)."""

    def __init__(self, matrices: dict[str, ExpertLinear], device: torch.device | str, *, diag_only: bool,
                 store_device: torch.device | str | None = None, budget: int | None = None):
        self.matrices, self.diag_only, self.device = matrices, diag_only, device
        self.modules: dict[int, nn.Module] = {}
        self.shapes: dict[Key, tuple[int, int]] = {}     # -> (experts, cols)
        self.sums: dict[Key, Tensor] = {}                # -> (experts, cols[, cols]) float64, unless chunked
        self.counts: dict[Key, list[int]] = {}
        self.calls: dict[int, int] = {}
        for m in matrices.values():
            key = (id(m.experts), m.param)
            self.shapes[key] = param_shape(m.weight)[0], linear_shape(m)[1]
            self.counts[key] = [0] * self.shapes[key][0]
            self.modules[key[0]], self.calls[key[0]] = m.experts, 0
        self.budget = HESSIAN_BUDGET if budget is None else budget
        self.chunked = not diag_only and sum(12 * e * c * c for e, c in self.shapes.values()) > self.budget
        self.cache: dict[int, list[tuple[Tensor, Tensor]]] = {key: [] for key in self.modules} if self.chunked else {}
        self.store_device = device if store_device is None else store_device
        for key, (experts, cols) in [] if self.chunked else self.shapes.items():
            shape = (experts, cols) if diag_only else (experts, cols, cols)
            self.sums[key] = torch.zeros(shape, dtype=torch.float64, device=device)

    def attach(self) -> list[RemovableHandle]:
        """Register the pre-hooks; remove the returned handles when the layer's forwards are done."""
        return [module.register_forward_pre_hook(partial(self._hook, key), with_kwargs=True)
                for key, module in self.modules.items()]

    def _add(self, total: Tensor, x: Tensor) -> None:
        x = x.double()
        if self.diag_only:
            total += x.square().sum(0)
        else:
            total.addmm_(x.t(), x)

    def _route(self, module: nn.Module, x: Tensor, top_k: Tensor, sums: dict[str, dict[int, Tensor]]) -> None:
        """Add each routed token's xxᵀ to sums[param][expert] (param: the module's input parameter or down_proj)."""
        first = fused_expert_params(module)[0]
        for index in sorted(set().union(*sums.values())):
            rows = (top_k == index).any(-1).nonzero().squeeze(-1)
            if not rows.numel():
                continue
            routed = x[rows]
            if index in sums.get(first, {}) and first != "down_proj":
                self._add(sums[first][index], routed)
            if index in sums.get("down_proj", {}):
                self._add(sums["down_proj"][index], expert_intermediate(module, index, routed))

    def _hook(self, key: int, module: nn.Module, args: tuple, kwargs: dict) -> None:
        x, top_k = _routing(module, args, kwargs)
        self.calls[key] += 1
        experts = param_shape(getattr(module, fused_expert_params(module)[0]))[0]
        routed = torch.stack([(top_k == e).any(-1).sum() for e in range(experts)]).tolist()  # one sync per call
        for (owner, param), counts in self.counts.items():
            if owner == key:
                counts[:] = [c + n for c, n in zip(counts, routed)]
        if self.chunked:  # the inputs and routing only: summed chunk by chunk (`chunks`)
            self.cache[key].append(tuple(t.detach().to(self.store_device, copy=True) for t in (x, top_k)))
            return
        self._route(module, x, top_k, {param: dict(enumerate(self.sums[(owner, param)]))
                                       for owner, param in self.sums if owner == key})

    def reduce(self, world: World) -> None:
        """Sum the per-expert sums (those summed in the forward), routed-token counts and calls over the ranks
        (before `info`: the under-calibrated rule reads the counts of the whole calibration set)."""
        for sums in self.sums.values():
            all_reduce_(world, sums)
        keys, calls = list(self.counts), list(self.calls)
        flat = all_reduce_ints(world, [c for k in keys for c in self.counts[k]] + [self.calls[k] for k in calls])
        for key in keys:
            self.counts[key], flat = flat[:len(self.counts[key])], flat[len(self.counts[key]):]
        self.calls = dict(zip(calls, flat))

    def _need(self, m: ExpertLinear, min_tokens: int | None) -> int:
        return max(1, linear_shape(m)[1] if min_tokens is None else min_tokens)

    def info(self, min_tokens: int | None) -> dict[str, dict]:
        """Per matrix name {tokens, expert, pooled_weight} (from the reduced counts); logs the topped-up ones."""
        silent = [name for name, m in self.matrices.items() if not self.calls[id(m.experts)]]
        if silent:
            raise never_ran(silent[:1])
        info = {}
        for name, m in self.matrices.items():
            tokens, need = self.counts[(id(m.experts), m.param)][m.index], self._need(m, min_tokens)
            info[name] = {"tokens": tokens, "expert": m.index, "pooled_weight": max(0, need - tokens) / need}
        low = [f"{n} ({v['tokens']} tokens)" for n, v in info.items() if v["pooled_weight"]]
        if low:
            log.warning("%d expert matrices saw fewer calibration tokens than needed and were topped up with the "
                        "layer's pooled Hessian: %s", len(low), ", ".join(low))
        return info

    def result(self, min_tokens: int | None) -> dict[str, Tensor]:
        """Unless chunked: per matrix name H = 2/N Σ xxᵀ (float32; the under-calibrated rule applied in float64)."""
        hessians, pooled = {}, {}
        for name, m in self.matrices.items():
            key = (id(m.experts), m.param)
            sums, tokens, need = self.sums[key], self.counts[key][m.index], self._need(m, min_tokens)
            if tokens >= need:
                hessians[name] = (sums[m.index] * (2.0 / tokens)).float()
            else:
                if key not in pooled:
                    pooled[key] = _pool(sums).div_(sum(self.counts[key]))
                hessians[name] = ((sums[m.index] + pooled[key] * (need - tokens)) * (2.0 / need)).float()
        self.sums.clear()  # the float64 sums go before the solves
        return hessians

    def _sums(self, key: Key, experts: list[int], run: RankPass) -> list[Tensor]:
        """The float64 sums of `experts` of one parameter from the cached inputs, summed over the ranks."""
        module, cols = self.modules[key[0]], self.shapes[key][1]
        sums = [torch.zeros((cols, cols), dtype=torch.float64, device=self.device) for _ in experts]
        with run.timing("forward"), run.timing("hessian"):
            for x, top_k in self.cache[key[0]]:
                self._route(module, x.to(self.device), top_k.to(self.device), {key[1]: dict(zip(experts, sums))})
        with run.timing("communication"):
            for total in sums:
                all_reduce_(run.world, total)
        return sums

    def chunks(self, min_tokens: int | None, run: RankPass, hessians: dict[str, Tensor]) -> Iterator[list[str]]:
        """Chunked: yield the names of the next experts to solve, their float32 Hessians put in `hessians` (and
        taken out again when the next chunk is asked for). Every rank must take every chunk (all-reduces)."""
        order = sorted(self.shapes, key=lambda key: key[1] != "down_proj")  # down_proj: before its inputs change
        for key in order:
            (experts, cols), counts = self.shapes[key], self.counts[key]
            names = {m.index: n for n, m in self.matrices.items() if (id(m.experts), m.param) == key}
            need = {e: self._need(self.matrices[n], min_tokens) for e, n in names.items()}
            low = [e for e in sorted(names) if counts[e] < need[e]]
            pool = torch.zeros((cols, cols), dtype=torch.float64, device=self.device) if low else None
            size = chunk_size(cols, self.budget)
            first = list(range(experts)) if low else sorted(names)  # the pool needs every expert's sum
            for start in range(0, len(first), size):
                part = first[start:start + size]
                sums = self._sums(key, part, run)
                for j, e in enumerate(part):  # each sum dropped once used: ~8 cols² a chunk expert at the peak
                    if pool is not None:
                        pool += sums[j]
                    if e in names and counts[e] >= need[e]:
                        hessians[names[e]] = sums[j].mul_(2.0 / counts[e]).float()
                    sums[j] = None
                del sums
                yield from _handed_out(hessians, [names[e] for e in part if e in names and counts[e] >= need[e]])
            if pool is None:
                continue
            pool.div_(sum(counts))
            for start in range(0, len(low), size):
                part = low[start:start + size]
                sums = self._sums(key, part, run)
                for j, e in enumerate(part):
                    hessians[names[e]] = sums[j].add_(pool * (need[e] - counts[e])).mul_(2.0 / need[e]).float()
                    sums[j] = None
                del sums
                yield from _handed_out(hessians, [names[e] for e in part])
            del pool


def _pool(sums: Tensor) -> Tensor:
    """Σ over the experts' sums, added one expert after another in index order (as `chunks` adds them)."""
    pool = torch.zeros_like(sums[0])
    for total in sums:
        pool += total
    return pool


def _handed_out(hessians: dict[str, Tensor], names: list[str]) -> Iterator[list[str]]:
    """Yield `names` (if any), then drop their Hessians: the caller has solved them."""
    if names:
        yield names
        for name in names:
            del hessians[name]


def solve_by_chunks(run: RankPass, experts: ExpertHessians, groups: list[list[str]], linears: dict, masks,
                    stats: list[dict], hessians: dict[str, Tensor], min_tokens: int | None,
                    solve: Callable[[list[str], list[dict]], None]) -> None:
    """`run.solve_layer` for a layer whose expert Hessians may come in chunks: the other groups first (their
    Hessians dropped once solved), then each chunk of experts; the layer's stats and masks end in the groups'
    order, as when solved in one call."""
    if not experts.chunked:
        run.solve_layer(groups, linears, masks, stats, solve)
        return
    start, load = len(stats), [0.0] * run.world.size  # the ranks' loads carried from call to call
    others = [g for g in groups if g[0] not in experts.matrices]
    run.solve_layer(others, linears, masks, stats, solve, load)
    for group in others:
        del hessians[group[0]]
    for names in experts.chunks(min_tokens, run, hessians):
        run.solve_layer([[name] for name in names], linears, masks, stats, solve, load)
    experts.cache.clear()
    order = {name: k for k, name in enumerate(name for group in groups for name in group)}
    stats[start:] = sorted(stats[start:], key=lambda entry: order[entry["name"]])
    for name in order:
        masks[name] = masks.pop(name)
