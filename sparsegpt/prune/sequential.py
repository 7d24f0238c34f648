"""Calibration driver: run the model one decoder layer at a time, collect each layer's Hessians through
forward hooks, prune its linears, and feed the *pruned* layer's outputs to the next layer.

The inputs of layer 0 and whatever arguments the model passes each layer (its own mask — sliding or full —,
position ids, rotary cos/sin per layer type, alibi, ...) are captured from the model's own forward
(`sparsegpt.prune.capture`), so no per-family driver code is needed and models mixing attention types are replayed
exactly. Fused MoE experts get one Hessian per expert from the tokens routed to it (`sparsegpt.prune.experts`).
Only the current layer is moved to `device`. Under a process group every rank takes part: its share of the
calibration rows, Hessians summed by all-reduce, the layer's groups spread over the ranks and broadcast
(`sparsegpt.prune.distributed`); a world of one is the single-process pass. With `reconstruct`, each solved layer's
kept weights are trained towards the dense layer's outputs before it is propagated (`sparsegpt.prune.reconstruct`).
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field, replace

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from sparsegpt.core.architectures import (
    ExpertLinear,
    compile_filter,
    decoder_layers,
    family_of,
    prunable_linears,
    set_weight_from_linear,
    weight_as_linear,
)
from sparsegpt.core.errors import UserError
from sparsegpt.core.failpoints import failpoint
from sparsegpt.core.masks import MaskSet, PackedMasks
from sparsegpt.core.precision import resolve_forward_dtype
from sparsegpt.core.progress import progress_disabled
from sparsegpt.core.signals import stop_point
from sparsegpt.core.world import World, agree
from sparsegpt.prune import allocation
from sparsegpt.prune.baselines import PRUNERS
from sparsegpt.prune.capture import (
    LayerBatch,
    capture_layer_inputs,
    forward_layer,
    module_device,
    release,
    run_layer,
    synchronize,
)
from sparsegpt.prune.distributed import RankPass
from sparsegpt.prune.experts import ExpertHessians, solve_by_chunks
from sparsegpt.prune.reconstruct import ReconstructConfig, Reconstructor, as_config, row_pieces
from sparsegpt.prune.solver import (
    add_gram_,
    hessians_from_sums,
    inverse_hessian_factor,
    prune_group_with_factor,
    reconstruction_error,
)
from sparsegpt.prune.true_sequential import check_true_sequential, forward_solving

log = logging.getLogger(__name__)

ALLOCATIONS = ("uniform", "owl")
SOLVER_DTYPES = ("float32", "float64")
HESSIAN_DTYPES = ("float32", "bfloat16")


@dataclass
class PruneConfig:
    """What to prune and how; `dtype` is the solver's compute dtype (the model keeps its own)."""

    method: str = "sparsegpt"
    sparsity: float = 0.5
    prune_n: int = 0
    prune_m: int = 0
    blocksize: int = 128
    percdamp: float = 0.01
    allocation: str = "uniform"
    owl_lambda: float = 0.08
    owl_m: float = 5.0
    include: str | None = None
    exclude: str | None = None
    batch_size: int = 8
    offload_activations: bool = False
    shared_hessian: bool = True
    dtype: str = "float32"
    forward_dtype: str = "float32"  # the layer forwards' autocast: float32 / bfloat16 / auto (core.precision)
    hessian_dtype: str = "float32"  # the per-sequence Hessian products (solver.add_gram_); bfloat16: opt-in, rounded
    prune_router: bool = False          # MoE routers (gates) are left dense unless asked
    prune_shared_experts: bool = False  # always-active shared experts (Qwen2-MoE) likewise
    min_expert_tokens: int | None = None  # fewer routed tokens: Hessian topped up with the pooled one (None: width)
    reconstruct: ReconstructConfig | None = None  # layer-wise reconstruction after each layer's solve (None: off)
    true_sequential: bool = False  # one forward a layer, each group solved at its first hook (prune.true_sequential)

    def __post_init__(self) -> None:
        self.reconstruct = as_config(self.reconstruct)  # the recipe's settings model arrives as is (to_dataclass)

    def validate(self) -> None:
        """Raise UserError on the first bad field."""
        if self.method not in PRUNERS:
            raise UserError(f"method {self.method!r} is unknown; choose one of {sorted(PRUNERS)}")
        if self.prune_n or self.prune_m:
            if not 0 < self.prune_n < self.prune_m:
                raise UserError(f"N:M needs 0 < N < M, got {self.prune_n}:{self.prune_m} (e.g. 2:4)")
            if self.allocation != "uniform":
                raise UserError("N:M sparsity fixes every layer's sparsity; use allocation 'uniform' with it")
        elif not 0 <= self.sparsity < 1:
            raise UserError(f"sparsity must be in [0, 1), got {self.sparsity}")
        if self.allocation not in ALLOCATIONS:
            raise UserError(f"allocation {self.allocation!r} is unknown; choose one of {list(ALLOCATIONS)}")
        if self.batch_size < 1:
            raise UserError(f"batch_size must be >= 1, got {self.batch_size}")
        compile_filter(self.include, "include")
        compile_filter(self.exclude, "exclude")
        for what, value, allowed in (("solver dtype", self.dtype, SOLVER_DTYPES),
                                     ("hessian_dtype", self.hessian_dtype, HESSIAN_DTYPES)):
            if value not in allowed:
                raise UserError(f"{what} {value!r} is unknown; choose one of {list(allowed)}")
        resolve_forward_dtype(self.forward_dtype, torch.float32)
        if self.min_expert_tokens is not None and self.min_expert_tokens < 0:
            raise UserError(f"min_expert_tokens must be >= 0 (or None for each matrix's input width), "
                            f"got {self.min_expert_tokens}")
        if self.reconstruct is not None:
            self.reconstruct.validate()
            if self.true_sequential:
                raise UserError("reconstruct trains towards the dense layer's outputs, which true_sequential never "
                                "computes; use one of them")

    @property
    def target(self) -> float:
        """The overall target sparsity (N/M for N:M)."""
        return self.prune_n / self.prune_m if self.prune_m else self.sparsity


@dataclass
class PruneResult:
    """The masks of the pruned linears, per-linear stats ({name, layer, target, sparsity, seconds, error, tokens,
    expert, pooled_weight, rank}: `rank` solved it), this rank's wall seconds per decoder layer (forwards + solves)
    and in total, and the world: {size, ranks: per rank {rank, calibration_rows, groups, linears, seconds: {forward,
    communication, solve, propagate, reconstruct}}}; with `reconstruct`, per decoder layer its relative output
    error before and after (`reconstruct.Reconstructor.train`)."""

    masks: MaskSet
    stats: list[dict] = field(default_factory=list)
    seconds: float = 0.0
    layer_seconds: list[float] = field(default_factory=list)
    world: dict = field(default_factory=dict)
    reconstruction: list[dict] = field(default_factory=list)  # per reconstructed layer: {layer, error_before, ...}


class LayerAccess:
    """How the pruning pass reaches each decoder layer. The default (the whole model in memory) does nothing;
    a streamed pass (`sparsegpt.prune.streaming`) materializes layer `index` from the checkpoint in `enter` and, in
    `leave`, writes it out once pruned and frees it. `enter`/`leave` bracket every use of a layer (the OWL
    statistics pass uses each layer once with pruned=False before the pruning pass)."""

    def enter(self, index: int, layer: nn.Module) -> None:
        pass

    def leave(self, index: int, layer: nn.Module, *, pruned: bool) -> None:
        pass


def _input_groups(names: list[str], layer_prefix: str, shared: tuple[tuple[str, ...], ...],
                  share: bool) -> list[list[str]]:
    """Group a layer's linears by shared input (family table), each remaining linear alone."""
    groups, grouped = [], set()
    for members in shared if share else ():
        group = [layer_prefix + m for m in members if layer_prefix + m in names]
        if group:
            groups.append(group)
            grouped.update(group)
    return groups + [[n] for n in names if n not in grouped]


def _accumulate(layer, index, batches, linears, groups, device, run: RankPass, *, diag_only: bool,
                min_expert_tokens=None, outputs_to=None, store_to=None, autocast=None, products=None
                ) -> tuple[dict[str, Tensor], dict[str, dict], list[LayerBatch], ExpertHessians]:
    """One forward of layer `index` with a pre-hook per input group (per fused experts module for expert
    matrices); returns per group leader H = 2/N Σ xxᵀ (one product per sequence, summed in float64 over all ranks'
    tokens: `solver.add_gram_`; returned as float32), or only its diagonal when diag_only, its {tokens, expert,
    pooled_weight}, the layer's outputs (this rank's) if outputs_to, and the experts' sums: their Hessians are
    among the returned ones unless they come in chunks (`experts.solve_by_chunks`; inputs cached on store_to).
    Per-sequence products summed in float64 make H independent of how the sequences are batched or split over
    ranks (float32 sums differ in their last bits, which SparseGPT's mask choices amplify layer after layer).
    Without outputs_to and experts, once the first batch showed each hook firing exactly once, later batches stop
    the layer's forward at the last hook to fire: what follows it (e.g. down_proj's product) would be discarded."""
    sums, counts, handles, calls, last = {}, {}, [], [], []
    experts = ExpertHessians({g[0]: linears[g[0]] for g in groups if isinstance(linears[g[0]], ExpertLinear)},
                             device, diag_only=diag_only, store_device=store_to)
    for group in groups:
        leader = group[0]
        if isinstance(linears[leader], ExpertLinear):
            continue
        cols = weight_as_linear(linears[leader]).shape[1]
        sums[leader] = torch.zeros((cols,) if diag_only else (cols, cols), dtype=torch.float64, device=device)
        counts[leader] = 0

        def hook(module, args, leader=leader):
            with run.timing("hessian"):
                if diag_only:
                    sums[leader] += args[0].reshape(-1, args[0].shape[-1]).double().square().sum(0)
                else:
                    add_gram_(sums[leader], args[0], dtype=products)
                counts[leader] += args[0].numel() // args[0].shape[-1]
            calls.append(leader)
            if last == [leader]:
                raise _LayerDone

        handles.append(linears[leader].register_forward_pre_hook(hook))
    handles += experts.attach()
    outputs = []
    try:
        with run.timing("forward"):
            for b in batches:
                calls.clear()
                try:
                    out = forward_layer(layer, index, b, device, autocast)
                except _LayerDone:
                    continue
                if outputs_to is not None:
                    outputs.append(replace(b, hidden=out.to(outputs_to, b.hidden.dtype)))
                elif not experts.modules and sorted(calls) == sorted(sums):  # each hook once: stop at the last
                    last[:] = calls[-1:]
    finally:
        for h in handles:
            h.remove()
    dense, dense_info = hessians_from_sums(sums, run.reduce(sums, counts, experts))
    info = experts.info(min_expert_tokens) | dense_info
    hessians = ({} if experts.chunked else experts.result(min_expert_tokens)) | dense
    return hessians, info, outputs, experts


class _LayerDone(Exception):
    """Raised by the last Hessian hook of a layer's forward once nothing after it is needed."""


def _layer_linears(model: nn.Module, cfg: PruneConfig) -> list[dict[str, nn.Module | ExpertLinear]]:
    """Per decoder layer, its prunable matrices (linears, routers if asked, expert slices) by qualified name."""
    prefix = family_of(model).layers_path
    all_linears = prunable_linears(model, cfg.include, cfg.exclude, routers=cfg.prune_router,
                                   shared_experts=cfg.prune_shared_experts)
    if not all_linears:
        raise UserError(f"no prunable linears match include={cfg.include!r} exclude={cfg.exclude!r}")
    per_layer = [{} for _ in decoder_layers(model)]
    for name, module in all_linears.items():
        per_layer[int(name[len(prefix) + 1:].split(".")[0])][name] = module
    return per_layer


def _layer_targets(model, calib, per_layer, cfg, base_masks, device, store_device, access,
                   run: RankPass, autocast) -> dict[int, float]:
    """Per-layer sparsity: uniform, or OWL from a dense pass measuring |W|·‖x‖ outliers."""
    if cfg.allocation == "uniform":
        return allocation.uniform(list(range(len(per_layer))), cfg.target)
    family, layers = family_of(model), decoder_layers(model)
    ratios, floors = {}, {}
    for i, layer in enumerate(tqdm(layers, desc="owl: outlier ratios", disable=progress_disabled())):
        linears = per_layer[i]
        access.enter(i, layer)
        dev = device or module_device(layer)
        home = module_device(layer)
        layer.to(dev)
        groups = _input_groups(list(linears), f"{family.layers_path}.{i}.", family.shared_inputs, True)
        last = i == len(layers) - 1
        diags, _, outputs, _ = _accumulate(layer, i, calib, linears, groups, dev, run, diag_only=True,
                                           min_expert_tokens=cfg.min_expert_tokens,
                                           outputs_to=None if last else store_device, autocast=autocast)
        if linears:
            members = [(n, g[0]) for g in groups for n in g]
            ratios[i] = allocation.outlier_ratio([weight_as_linear(linears[n]) for n, _ in members],
                                                 [diags[leader].sqrt() for _, leader in members], cfg.owl_m)
            floors[i] = _base_sparsity(base_masks, linears)
        calib = outputs
        layer.to(home)
        access.leave(i, layer, pruned=False)
    targets = allocation.owl(ratios, cfg.target, lam=cfg.owl_lambda, floors=floors)
    log.info("OWL per-layer targets: %s", {i: round(t, 4) for i, t in targets.items()})
    return targets


def _base_sparsity(base_masks: MaskSet | None, linears: dict[str, nn.Module]) -> float:
    if base_masks is None:
        return 0.0
    pruned = sum(base_masks.masks.pruned(n) for n in linears)  # kept counts: nothing unpacked
    return pruned / sum(math.prod(base_masks.masks.shape(n)) for n in linears)


def _check_base_masks(base_masks: MaskSet | None, per_layer: list[dict], model: nn.Module) -> None:
    if base_masks is None:
        return
    base_masks.check_shapes(model)
    missing = [n for linears in per_layer for n in linears if n not in base_masks.masks]
    if missing:
        raise UserError(f"base masks have no entry for {missing[0]} (and {len(missing) - 1} more); "
                        "prune the same linears (--include/--exclude) in every stage")


def _solve_group(group, linears, hessians, info, target, cfg, base_masks, layer_idx, masks, stats, timing) -> None:
    """Prune the linears that share one Hessian; SparseGPT factors it once and runs one column loop for the group."""
    dtype, hessian, info = getattr(torch, cfg.dtype), hessians[group[0]], info[group[0]]
    t0 = time.perf_counter()
    weights = [weight_as_linear(linears[name]) for name in group]
    bases = [None if base_masks is None else base_masks.masks[name].to(w.device) for name, w in zip(group, weights)]
    kw = dict(prune_n=cfg.prune_n, prune_m=cfg.prune_m, blocksize=cfg.blocksize, dtype=dtype)
    if cfg.method == "sparsegpt":
        with timing("factor"):
            factor = inverse_hessian_factor(hessian, cfg.percdamp, dtype=dtype)
        results = prune_group_with_factor(weights, factor, target, base_masks=bases, **kw)
    else:
        results = [PRUNERS[cfg.method](w, hessian, target, percdamp=cfg.percdamp, base_mask=b, **kw)
                   for w, b in zip(weights, bases)]
    seconds = (time.perf_counter() - t0) / len(group)  # the group's solve, shared evenly
    for name, weight, (pruned, mask) in zip(group, weights, results):
        error = reconstruction_error(weight, pruned, hessian)
        set_weight_from_linear(linears[name], pruned)
        masks[name] = mask.cpu()
        sparsity = mask.float().mean().item()
        stats.append(dict(name=name, layer=layer_idx, target=target, sparsity=sparsity, seconds=seconds,
                          error=error, **info))
        log.info("%s: sparsity %.4f (target %.4f), reconstruction error %.4g, %.2fs",
                 name, sparsity, target, error, seconds)


@torch.no_grad()
def prune_model(model: nn.Module, calib_ids: Tensor, cfg: PruneConfig, *, base_masks: MaskSet | None = None,
                device: torch.device | str | None = None, access: LayerAccess | None = None,
                world: World | None = None) -> PruneResult:
    """Prune the model's decoder linears in place, layer by layer, each calibrated on the pruned
    predecessors' outputs; `device` None computes each layer where it lives; `access` brackets each use of a
    layer (default: the model is in memory). Every rank of `world` (default: `World.current()`) must call it
    with the same model, calibration set and config; each ends with the same weights and result."""
    access = access or LayerAccess()
    cfg.validate()
    run = RankPass(world or World.current())
    start = time.perf_counter()
    family, layers = family_of(model), decoder_layers(model)
    per_layer = _layer_linears(model, cfg)
    _check_base_masks(base_masks, per_layer, model)
    autocast, why = resolve_forward_dtype(cfg.forward_dtype, weights := next(layers[0].parameters()).dtype)
    run.forward_dtype = str(autocast or weights).removeprefix("torch.")
    products = torch.bfloat16 if cfg.hessian_dtype == "bfloat16" else None  # None: x's dtype widened to float32
    log.info("layer forwards in %s (forward_dtype %s: %s)", run.forward_dtype, cfg.forward_dtype, why)
    was_training = model.training
    model.eval()
    try:
        store_device = "cpu" if cfg.offload_activations else (device or module_device(layers[0]))
        own_ids = run.calibration_share(calib_ids)
        sizes, rec = (max(1, len(own_ids)) if cfg.true_sequential else cfg.batch_size), None  # true-seq: one batch
        if cfg.true_sequential:
            check_true_sequential(per_layer, len(calib_ids), run.world.size)
        if cfg.reconstruct is not None:  # batches cut at the reconstruction steps' row boundaries
            pieces = row_pieces(run.world.share(len(calib_ids)), cfg.reconstruct.batch, cfg.batch_size)
            sizes, rec = [n for _, n in pieces], Reconstructor(cfg.reconstruct, pieces, len(calib_ids), run.world)
        with run.timing("capture"):
            calib = agree(run.world, lambda: capture_layer_inputs(
                model, layers, own_ids, batch_size=sizes, store_device=store_device) if len(own_ids) else [])
        targets = _layer_targets(model, calib, per_layer, cfg, base_masks, device, store_device, access, run, autocast)
        masks, stats, layer_seconds, rebuilt = PackedMasks(), [], [], []  # masks packed as pruned: 1 bit a weight
        if rec is not None:
            rec.start(calib)
        bar = tqdm(layers, desc=f"prune {cfg.method}", disable=progress_disabled())
        for i, layer in enumerate(bar):
            linears = per_layer[i]
            t0 = time.perf_counter()
            with run.timing("io"):
                access.enter(i, layer)
            dev = device or module_device(layer)
            home = module_device(layer)
            layer.to(dev)
            groups = _input_groups(list(linears), f"{family.layers_path}.{i}.", family.shared_inputs,
                                   cfg.shared_hessian)
            dense = None  # with reconstruct: the dense layer's outputs, its targets
            if groups and cfg.true_sequential:  # the forward solves each group and yields the pruned outputs
                out = forward_solving(layer, i, calib[0], linears, groups, dev, run, masks, stats, lambda g, h, n, o:
                                      _solve_group(g, linears, h, n, targets[i], cfg, base_masks, i, masks, o,
                                                   run.timing), autocast, products)
                calib = [replace(calib[0], hidden=out.to(store_device, calib[0].hidden.dtype))]
            elif groups:  # a layer the include/exclude filters left empty is only propagated
                outs_to = store_device if rec and rec.from_pruned else None
                hessians, info, outs, moe = _accumulate(layer, i, calib, linears, groups, dev, run, diag_only=False,
                                                        min_expert_tokens=cfg.min_expert_tokens, outputs_to=outs_to,
                                                        store_to=store_device, autocast=autocast, products=products)
                if rec is not None:
                    with run.timing("reconstruct"):
                        dense = rec.targets(layer, i, calib, outs, dev, store_device)
                del outs
                solve_by_chunks(run, moe, groups, linears, masks, stats, hessians, cfg.min_expert_tokens,
                                lambda group, out: _solve_group(group, linears, hessians, info, targets[i], cfg,
                                                                base_masks, i, masks, out, run.timing))
                del hessians, moe
                if rec is not None:
                    with run.timing("reconstruct"):
                        rebuilt.append(rec.train(layer, i, calib, dense, {n: (m, masks[n]) for n, m in
                                                                           linears.items()}, dev))
            if rec is not None and i < len(layers) - 1:
                with run.timing("reconstruct"):
                    rec.advance(layer, i, calib, dense, dev, store_device)
            del dense
            if i < len(layers) - 1 and not (groups and cfg.true_sequential):
                with run.timing("propagate"):
                    kept = rec.outputs(store_device) if rec is not None and groups else None
                    calib = run_layer(layer, i, calib, dev, store_device, autocast) if kept is None else \
                        [replace(b, hidden=o) for b, o in zip(calib, kept)]
            release(calib, i)
            layer.to(home)
            synchronize(dev)
            with run.timing("io"):
                access.leave(i, layer, pruned=True)
            layer_seconds.append(time.perf_counter() - t0)
            log.info("layer %d pruned in %.2fs", i, layer_seconds[-1])
            failpoint("prune/layer")
            stop_point(run.world, f"after pruning layer {i + 1}/{len(layers)}")  # a stop request: between layers
    finally:
        model.train(was_training)
    return PruneResult(masks=MaskSet(masks), stats=stats, seconds=time.perf_counter() - start,
                       layer_seconds=layer_seconds, world=run.record(), reconstruction=rebuilt)
