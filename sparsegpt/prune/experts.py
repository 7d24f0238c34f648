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
returned per matrix (`pooled_weight`, next to `tokens`) and logged, so it lands in the prune stats.
Under a process group each rank accumulates its own share; `reduce` sums sums and counts before the rule.
"""

from __future__ import annotations

import logging
from functools import partial

import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torch.utils.hooks import RemovableHandle

from sparsegpt.core.architectures import ExpertLinear, fused_expert_params, linear_shape, param_shape
from sparsegpt.core.errors import UserError
from sparsegpt.core.world import World
from sparsegpt.prune.distributed import all_reduce_, all_reduce_ints

log = logging.getLogger(__name__)


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


class ExpertHessians:
    """Accumulates, for the expert matrices of one decoder layer, each expert's Σ xxᵀ (or its diagonal) over the
    tokens the router sends it, through one forward pre-hook per fused experts module."""

    def __init__(self, matrices: dict[str, ExpertLinear], device: torch.device | str, *, diag_only: bool):
        self.matrices = matrices
        self.diag_only = diag_only
        self.modules: dict[int, nn.Module] = {}
        self.sums: dict[tuple[int, str], Tensor] = {}    # (id(experts), param) -> (experts, cols[, cols]) float64
        self.counts: dict[tuple[int, str], list[int]] = {}
        self.calls: dict[int, int] = {}
        for m in matrices.values():
            key = (id(m.experts), m.param)
            if key not in self.sums:
                cols, experts = linear_shape(m)[1], param_shape(m.weight)[0]
                shape = (experts, cols) if diag_only else (experts, cols, cols)
                self.sums[key] = torch.zeros(shape, dtype=torch.float64, device=device)
                self.counts[key] = [0] * experts
                self.modules[id(m.experts)] = m.experts
                self.calls[id(m.experts)] = 0

    def attach(self) -> list[RemovableHandle]:
        """Register the pre-hooks; remove the returned handles when the layer's forwards are done."""
        return [module.register_forward_pre_hook(partial(self._hook, key), with_kwargs=True)
                for key, module in self.modules.items()]

    def _add(self, key: tuple[int, str], index: int, x: Tensor) -> None:
        x = x.double()
        if self.diag_only:
            self.sums[key][index] += x.square().sum(0)
        else:
            self.sums[key][index].addmm_(x.t(), x)
        self.counts[key][index] += x.shape[0]

    def _hook(self, key: int, module: nn.Module, args: tuple, kwargs: dict) -> None:
        x, top_k = _routing(module, args, kwargs)
        self.calls[key] += 1
        params = fused_expert_params(module)
        inputs, down = (key, params[0]), (key, "down_proj")
        for index in range(param_shape(getattr(module, params[0]))[0]):
            rows = (top_k == index).any(-1).nonzero().squeeze(-1)
            if not rows.numel():
                continue
            routed = x[rows]
            if inputs in self.sums and params[0] != "down_proj":
                self._add(inputs, index, routed)
            if down in self.sums:
                self._add(down, index, expert_intermediate(module, index, routed))

    def reduce(self, world: World) -> None:
        """Sum the per-expert sums, routed-token counts and calls over the ranks (before `result`: the
        under-calibrated rule reads the counts of the whole calibration set)."""
        for sums in self.sums.values():
            all_reduce_(world, sums)
        keys, calls = list(self.counts), list(self.calls)
        flat = all_reduce_ints(world, [c for k in keys for c in self.counts[k]] + [self.calls[k] for k in calls])
        for key in keys:
            self.counts[key], flat = flat[:len(self.counts[key])], flat[len(self.counts[key]):]
        self.calls = dict(zip(calls, flat))

    def result(self, min_tokens: int | None) -> tuple[dict[str, Tensor], dict[str, dict]]:
        """Per matrix name: H = 2/N Σ xxᵀ (float32; the under-calibrated rule applied in float64), and {tokens,
        expert, pooled_weight}."""
        silent = [name for name, m in self.matrices.items() if not self.calls[id(m.experts)]]
        if silent:
            raise UserError(f"{silent[0]} never ran in the decoder layer's forward; exclude it (--exclude) "
                            "or report the architecture")
        hessians, info, pooled = {}, {}, {}
        for name, m in self.matrices.items():
            key = (id(m.experts), m.param)
            sums, tokens = self.sums[key], self.counts[key][m.index]
            need = max(1, linear_shape(m)[1] if min_tokens is None else min_tokens)
            if tokens >= need:
                hessians[name], weight = (sums[m.index] * (2.0 / tokens)).float(), 0.0
            else:
                if key not in pooled:
                    pooled[key] = sums.sum(0) / sum(self.counts[key])
                hessians[name] = ((sums[m.index] + (need - tokens) * pooled[key]) * (2.0 / need)).float()
                weight = (need - tokens) / need
            info[name] = {"tokens": tokens, "expert": m.index, "pooled_weight": weight}
        low = [f"{n} ({v['tokens']} tokens)" for n, v in info.items() if v["pooled_weight"]]
        if low:
            log.warning("%d expert matrices saw fewer calibration tokens than needed and were topped up with the "
                        "layer's pooled Hessian: %s", len(low), ", ".join(low))
        return hessians, info
