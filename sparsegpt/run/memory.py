"""Per-process memory estimates for `--dry-run`, from the model config alone (built on the `meta` device), in two
columns: `device` (where the compute runs; on a CPU-only machine that is the host too) and `cpu` (host memory
besides). Checked against measured runs in bench/results_memory*.md (tests/test_memory.py pins them).

Pruning, per rank of a W-rank pass (each rank holds the model, or with `stream` one decoder layer of it, and
calibrates nsamples / W sequences; the layer's Hessians are all-reduced, so every rank holds them whole):
    device: layer weights (model dtype) + an fp32 working copy of the largest linear; `hessians`, the larger of
    the layer's float64 sums Σxxᵀ (one per group of same-input linears; float64 so the result does not depend on
    batching or the world, see distributed_prune) with one float32 conversion and a float64 copy of a batch's
    inputs, and the float32 Hessians while the widest group is solved (the damped copy, eye, sum, Cholesky
    factor and inverse: 5 c² at the solver dtype; or the factor plus the float64 copy of H for the
    reconstruction error); this rank's layer inputs and outputs (2 × share × seqlen × hidden), or one batch of
    them with `offload_activations`. MoE experts count as groups of their own unless their layer's expert
    Hessians exceed `experts.HESSIAN_BUDGET`: then one chunk of them (12 · cols² an expert + 16 · cols² to
    pool, or its float32 Hessians and the solver's working set while solving) and one more copy of the
    activations (the experts modules' inputs, kept for the chunks' replays).
    With `reconstruct`, what training a solved layer holds beyond the Hessians it follows (`_reconstruct`).
    cpu: the model (or, streamed, everything but the decoder layers plus the layer being read), offloaded
    activations, the packed masks (1 bit per weight).
Fine-tuning, per process, for P parameters of which Pt train (all, or LoRA's r·(in + out) per target), b the model
dtype's bytes, c the compute dtype's (2 under bf16/fp16, else b), W the world:
    ZeRO-0 (torch AdamW): weights P·b, grads Pt·b, Adam 2·Pt·b, and the step's temporaries Pt·b (foreach sqrt);
    ZeRO-1/2/3 (DeepSpeed): weights P·c (ZeRO-3: P·c/W), grads Pt·c/W (ZeRO-1: whole), fp32 master 4·Pt/W (kept
    even for fp32 weights), Adam 8·Pt/W, the step's temporaries 8 bytes per parameter stepped at once (the fp32
    gradient copy and Adam's foreach temporaries: Pt/W under ZeRO-1/2, one sub-group of 2 decoder layers under
    ZeRO-3, `dsconfig.zero3_limits`); ZeRO-3 also holds gathered parameters up to its live
    limit (two decoder layers, `dsconfig.zero3_limits`) plus the largest other parameter (the embedding)
    and its full gradient; offload_optimizer moves master + Adam + temporaries to the CPU, offload_params the
    weight shards;
    masks: packed bits, 1 bit per masked weight where a rank holds the weight whole (DDP, ZeRO-1/2), this rank's
    share (1 bit / W) under ZeRO-3, plus one unpacked keep of the largest matrix in its dtype (one parameter at
    a time); ZeRO-1/2 with offload_optimizer adds this rank's fragment's bits on the CPU; plus the packed MaskSet
    on the CPU of every rank;
    activations (Korthikanti et al. 2022; SDPA keeps no s² scores): 34·s·b·h bytes per layer at 2 bytes a value,
    with gradient checkpointing each layer's input s·b·h values plus one layer in full; logits s·b·V fp32 × 2;
    KD: the teacher's weights (bf16 beside a bf16 student, else the model dtype; under ZeRO-3 split and in the
    compute dtype, plus its gathered layers) and its logits.
Evaluation, per rank (perplexity splits the windows; lm-eval and samples run on rank 0): the whole model loaded
straight onto the device, tensor by tensor (no host copy), or with `layerwise` loaded on the CPU and run one
decoder layer at a time on the device; and a batch's float32 logits twice (the logits and their log-softmax).
The previous stage's model is released before each prune and after each evaluation on every rank, so no
estimate holds two models.
Not modelled: the allocator's slack. On CPU, glibc's default (dynamic) mmap threshold keeps freed buffers in its
heap; measured ZeRO-3 ranks then peak ~30 % above these numbers; MALLOC_MMAP_THRESHOLD_=131072 gives it back.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from transformers import AutoConfig, AutoModelForCausalLM

from sparsegpt.config.hooks import split_suffix
from sparsegpt.config.recipe import Recipe, ResolvedStage
from sparsegpt.core.architectures import (
    ExpertLinear,
    decoder_layers,
    family_of,
    param_shape,
    prunable_linears,
    weight_as_linear,
)
from sparsegpt.core.data import default_seqlen
from sparsegpt.core.errors import UserError
from sparsegpt.prune import experts as expert_hessians
from sparsegpt.storage.models import resolve_model_path

GIB = 2**30
_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}


@dataclass(frozen=True)
class _Facts:
    """What the estimates need from the model, read off a meta-device instance."""

    model_type: str
    params: int
    layers: int
    layer_params: int
    hidden: int
    vocab: int
    default_seqlen: int
    dtype_bytes: int
    linears: dict[str, tuple[int, int, int]]  # full name -> (layer index, in, out) of every prunable linear
    layer_prefix: str
    shared_inputs: tuple[tuple[str, ...], ...]
    experts: dict[str, tuple[str, int]]  # expert matrix name -> (its fused parameter's name, the experts in it)


def _facts(config, dtype: str) -> _Facts:
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    family = family_of(model)
    layers = decoder_layers(model)
    linears, experts = {}, {}
    for name, module in prunable_linears(model).items():
        out_features, in_features = weight_as_linear(module).shape
        index = int(name[len(family.layers_path) + 1:].split(".")[0])
        linears[name] = (index, in_features, out_features)
        if isinstance(module, ExpertLinear):
            experts[name] = (name.rsplit(".", 1)[0], param_shape(module.weight)[0])
    if dtype == "auto":
        dtype = str(getattr(config, "dtype", None) or "float32").removeprefix("torch.")
    if dtype not in _BYTES:
        raise UserError(f"model dtype {dtype!r} has no size here; set the recipe's dtype to one of {', '.join(_BYTES)}")
    return _Facts(model_type=config.model_type, params=sum(p.numel() for p in model.parameters()),
                  layers=len(layers), layer_params=sum(p.numel() for p in layers[0].parameters()),
                  hidden=config.hidden_size, vocab=config.vocab_size, default_seqlen=default_seqlen(config),
                  dtype_bytes=_BYTES[dtype], linears=linears, layer_prefix=family.layers_path,
                  shared_inputs=family.shared_inputs, experts=experts)


def _selected(facts: _Facts, include: str | None, exclude: str | None) -> dict[str, tuple[int, int, int]]:
    """The prunable linears a stage's include/exclude regexes keep."""
    return {name: v for name, v in facts.linears.items()
            if (include is None or re.search(include, name)) and not (exclude is not None and re.search(exclude, name))}


def _layer_groups(facts: _Facts, linears: dict[str, tuple[int, int, int]]) -> dict[int, dict[str, int]]:
    """Per decoder layer: input-group leader -> columns (the groups that share one Hessian)."""
    per_layer: dict[int, dict[str, int]] = {}
    for name, (index, cols, _) in linears.items():
        relative = name[len(f"{facts.layer_prefix}.{index}."):]
        group = next((g[0] for g in facts.shared_inputs if relative in g), relative)
        per_layer.setdefault(index, {})[group] = cols
    return per_layer


def _chunked_experts(facts: _Facts, linears: dict[str, tuple[int, int, int]], solver: int) -> tuple[set[str], int]:
    """The expert matrices of the layers whose expert Hessians come in chunks (`experts.HESSIAN_BUDGET`), and the
    most bytes such a chunk holds: 12 · cols² an expert (float64 sum, float32 Hessian) + 16 · cols² to pool, or,
    solving one, the chunk's float32 Hessians, the pool and the solver's working set."""
    params: dict[int, dict[str, tuple[int, int]]] = {}  # layer -> fused parameter -> (experts, cols)
    for name, (param, count) in facts.experts.items():
        if name in linears:
            params.setdefault(linears[name][0], {})[param] = (count, linears[name][1])
    names, peak = set(), 0
    for index, shapes in params.items():
        if sum(12 * e * c * c for e, c in shapes.values()) <= expert_hessians.HESSIAN_BUDGET:
            continue  # all at once, as any other group
        names |= {n for n in linears if facts.experts.get(n, ("",))[0] in shapes}
        for _, cols in shapes.values():
            chunk, work = expert_hessians.chunk_size(cols), max(5 * solver, solver + 8)
            peak = max(peak, (12 * chunk + 16) * cols * cols, (4 * chunk + 8 + work) * cols * cols)
    return names, peak


def _prune_step(facts: _Facts, stage: ResolvedStage, world_size: int) -> dict:
    p = stage.prune
    linears = _selected(facts, p.include, p.exclude)
    b, seqlen = facts.dtype_bytes, p.seqlen or facts.default_seqlen
    solver = _BYTES[p.dtype]
    share = -(-p.nsamples // world_size)  # this rank's calibration rows (the largest share)
    chunked, expert_peak = _chunked_experts(facts, linears, solver)
    # chunked experts: their modules' inputs kept beside the layer's (one more copy of the activations)
    activations = (3 if chunked else 2) * share * seqlen * facts.hidden * b
    on_device = 2 * min(p.batch_size, share) * seqlen * facts.hidden * b if p.offload_activations else activations
    groups = _layer_groups(facts, {n: v for n, v in linears.items() if n not in chunked}).values()
    widest = max((max(g.values()) for g in groups), default=0)
    squares = max((sum(c * c for c in g.values()) for g in groups), default=0)  # the largest layer's Σ cols²
    batch = min(p.batch_size, share) * seqlen
    # float64 sums while the layer runs (with one float32 conversion and a float64 copy of one batch's inputs),
    # then float32 Hessians while the widest group is solved
    accumulate = 8 * squares + 4 * widest * widest + 8 * batch * widest
    solve = 4 * squares + max(5 * solver, solver + 8) * widest * widest
    device = {"layer_weights": facts.layer_params * b + 4 * max((i * o for _, i, o in linears.values()), default=0),
              "hessians": max(accumulate, solve, expert_peak), "activations": on_device}
    layers = facts.layers * facts.layer_params
    cpu = {"model": (facts.params - layers + facts.layer_params if p.stream else facts.params) * b,
           "offloaded_activations": activations if p.offload_activations else 0,
           "masks_packed": sum(i * o for _, i, o in linears.values()) / 8}
    if p.true_sequential:  # one forward over all of the rank's rows: the MLP's two widest outputs (gate, up) live
        # at once for every token (tests/test_true_sequential.py pins it to a profiler-measured pass)
        device["forward_activations"] = share * seqlen * 2 * max(o for i, _, o in linears.values() if i == 0) * b
    if p.reconstruct is not None:  # after the solve, with the Hessians freed: only what exceeds them adds to the peak
        recon, cpu["reconstruct_targets"] = _reconstruct(facts, linears, p, share, seqlen)
        device["reconstruct"] = max(0.0, recon - device["hessians"])
    return _gib(stage.name, device, cpu)


def _reconstruct(facts: _Facts, linears: dict, p, share: int, seqlen: int) -> tuple[float, float]:
    """(device, cpu) bytes layer-wise reconstruction adds while a layer trains: the layer in float32 (the model's
    dtype upcast); per trained weight its solved copy, Adam's two moments, the summed gradient and autograd's
    (5 float32 values) and its mask (1 byte); one step's autograd activations (34·s·rows·h values in float32);
    the targets (one more copy of this rank's activations, two with dense inputs: the dense stream besides), on
    the CPU with offload_activations. Tests/test_reconstruct.py pins it to measured passes."""
    b, r = facts.dtype_bytes, p.reconstruct
    trained = max(sum(i * o for layer, i, o in linears.values() if layer == k) for k in range(facts.layers))
    state = (4 - b) * facts.layer_params + (5 * 4 + 1) * trained + 4 * 34 * seqlen * min(r.batch, share) * facts.hidden
    targets = (1 if r.inputs == "pruned" else 2) * share * seqlen * facts.hidden * b
    return (state + targets, 0.0) if not p.offload_activations else (state, float(targets))


def _trainable(facts: _Facts, stage: ResolvedStage) -> int:
    lora = stage.finetune.lora
    if lora is None:
        return facts.params
    targets = lora.targets
    return sum(lora.r * (i + o) for name, (_, i, o) in facts.linears.items()
               if targets is None or any(name == t or name.endswith("." + t) for t in targets))


def _finetune_step(facts: _Facts, stage: ResolvedStage, recipe: Recipe, world_size: int) -> dict:
    d, f = recipe.distributed, stage.finetune
    P, Pt, b = facts.params, _trainable(facts, stage), facts.dtype_bytes
    compute = 2 if d.mixed_precision != "no" else b
    zero3 = d.zero_stage == 3
    shards = world_size if d.zero_stage else 1
    weight_shards = world_size if zero3 else 1
    selected = _selected(facts, stage.prune.include, stage.prune.exclude).values()
    masked = sum(i * o for _, i, o in selected) if stage.pruned_fraction > 0 else 0
    largest = max((i * o for _, i, o in selected), default=0)
    if d.zero_stage == 0:
        dev = {"weights": P * b, "grads": Pt * b, "optimizer": 2 * Pt * b, "master": 0, "step": Pt * b}
    else:
        tile = min(Pt / shards, 2 * facts.layer_params) if zero3 else Pt / shards  # ZeRO-3 steps in sub-groups
        dev = {"weights": P * compute / weight_shards, "grads": Pt * compute / (shards if d.zero_stage >= 2 else 1),
               "optimizer": 8 * Pt / shards, "master": 4 * Pt / shards, "step": 8 * tile}
    embedding = facts.vocab * facts.hidden
    dev["gathered"] = (2 * facts.layer_params + 2 * embedding) * compute if zero3 else 0
    dev["masks"] = (masked / 8 / weight_shards + largest * (compute if d.zero_stage else b)) if masked else 0
    s, mb, h = f.seqlen or facts.default_seqlen, d.micro_batch_size, facts.hidden
    full_layer = 34 * s * mb * h * compute / 2
    dev["activations"] = (facts.layers * s * mb * h * compute + full_layer if f.gradient_checkpointing
                          else facts.layers * full_layer)
    kd = f.kd is not None
    dev["logits"] = s * mb * facts.vocab * (8 + (compute if kd else 0))
    teacher_bytes = 2 if d.mixed_precision in ("bf16", "auto") else b  # prepare_teacher: bf16 beside bf16
    dev["teacher"] = (P * compute / weight_shards + (facts.layer_params + embedding) * compute if zero3
                      else P * teacher_bytes) if kd else 0
    cpu = {"masks_packed": masked / 8}
    if d.offload_optimizer and d.zero_stage in (1, 2):  # the fp32 fragment's bits beside it
        cpu["masks_fragment"] = masked / 8 / shards
    if d.offload_optimizer:
        for key in ("optimizer", "master", "step"):
            cpu[f"offloaded_{key}"], dev[key] = dev[key], 0
    if d.offload_params:
        cpu["offloaded_weights"], dev["weights"] = dev["weights"], 0
        cpu["offloaded_teacher"], dev["teacher"] = dev["teacher"], 0
    return _gib(stage.name, dev, cpu)


def _eval_step(facts: _Facts, stage: ResolvedStage) -> dict | None:
    """A stage's evaluation on one rank: the model whole on the device (or, all perplexity hooks layerwise and
    nothing else needing the model, one layer there and the model on the host), a batch of float32 logits twice."""
    hooks = [h for h in stage.eval.hooks if h["type"] in ("perplexity", "lm_eval", "samples")]
    if not hooks or not stage.eval.phases:
        return None
    b = facts.dtype_bytes
    layerwise = all(h["type"] == "perplexity" and h.get("layerwise") for h in hooks)
    batch = max(h.get("batch_size") or 4 for h in hooks)
    seqlen = max(h.get("seqlen") or facts.default_seqlen for h in hooks)
    device = {"weights": (facts.layer_params + facts.vocab * facts.hidden) * b if layerwise else facts.params * b,
              "activations": (2 * batch * seqlen * facts.hidden * 4) if layerwise else 0,
              "logits": 2 * batch * seqlen * facts.vocab * 4}
    return _gib(stage.name, device, {"model": facts.params * b if layerwise else 0})


def _gib(stage: str, device: dict[str, float], cpu: dict[str, float]) -> dict:
    """{stage, each device part, "cpu_" + each host part, device, cpu} in GiB."""
    out = {"stage": stage, **{k: v / GIB for k, v in device.items()}, **{f"cpu_{k}": v / GIB for k, v in cpu.items()}}
    out["device"] = sum(device.values()) / GIB
    out["cpu"] = sum(cpu.values()) / GIB
    return out


def estimate(config, recipe: Recipe, world_size: int = 1) -> dict:
    """Per-process memory (GiB) of the pruning and the fine-tuning step, each at the recipe's most demanding stage."""
    if world_size < 1:
        raise UserError(f"world_size must be >= 1, got {world_size}")
    facts = _facts(config, recipe.dtype)
    stages = recipe.resolved_stages()
    prune = [_prune_step(facts, s, world_size) for s in stages if s.sparsity > 0 or s.prune_n]
    finetune = [_finetune_step(facts, s, recipe, world_size) for s in stages if s.finetune is not None]
    evaluate = [e for e in (_eval_step(facts, s) for s in stages) if e is not None]
    return {"model_type": facts.model_type, "params": facts.params, "layers": facts.layers,
            "layer_params": facts.layer_params, "default_seqlen": facts.default_seqlen, "world_size": world_size,
            "prune": max(prune, key=lambda e: e["device"]) if prune else None,
            "finetune": max(finetune, key=lambda e: e["device"]) if finetune else None,
            "evaluate": max(evaluate, key=lambda e: e["device"]) if evaluate else None}


def _stage_row(stage: ResolvedStage, recipe: Recipe, estimates: dict) -> list[str]:
    p, f, d = stage.prune, stage.finetune, recipe.distributed
    seqlen = p.seqlen or estimates["default_seqlen"]
    recon = f" +recon({p.reconstruct.passes} passes, {p.reconstruct.inputs} inputs)" if p.reconstruct else ""
    forward = " +true-seq" * p.true_sequential + (f" fwd {p.forward_dtype}" if p.forward_dtype != "float32" else "")
    prune = "keep (dense)" if not (stage.sparsity or stage.prune_n) else \
        f"{p.method}/{p.allocation} {p.nsamples}x{seqlen}{recon}{forward}"
    if f is None:
        finetune = "one-shot"
    else:
        steps = f.num_steps(estimates["world_size"], micro_batch_size=d.micro_batch_size, grad_accum=d.grad_accum,
                            seqlen=estimates["default_seqlen"])
        finetune = f"{steps} steps lr {f.lr:g} {f.schedule}" if f.search is None else \
            f"{steps} steps lr auto (probes {f.search.cost(steps, _tokens_per_step(stage, d, estimates))}) {f.schedule}"
        finetune += f" +KD({f.kd.teacher})" if f.kd else ""
        finetune += f" +LoRA(r{f.lora.r})" if f.lora else ""
    hooks = ", ".join(h["type"] + (f"({h['source']}{split_suffix(h)})" if "source" in h else "")
                      for h in stage.eval.hooks)
    return [str(stage.index), stage.name, str(stage.target), prune, finetune, f"{'+'.join(stage.eval.phases)}: {hooks}"]


def _tokens_per_step(stage: ResolvedStage, d, estimates: dict) -> int:
    seqlen = stage.finetune.seqlen or stage.prune.seqlen or estimates["default_seqlen"]
    return d.micro_batch_size * d.grad_accum * estimates["world_size"] * seqlen


def format_plan(recipe: Recipe, estimates: dict) -> str:
    """The expanded stage plan and the memory table that `--dry-run` prints."""
    d, ws = recipe.distributed, estimates["world_size"]
    lines = [f"recipe {recipe.name}: model {recipe.model} ({estimates['model_type']}, {estimates['params'] / 1e6:.1f}M "
             f"params, {estimates['layers']} layers), dtype {recipe.dtype}, seed {recipe.seed}",
             f"data: calibration {recipe.data.calibration}; finetune {recipe.data.finetune}; "
             f"eval {', '.join(recipe.data.eval)}",
             f"distributed: ZeRO-{d.zero_stage}{' +offload optimizer' * d.offload_optimizer}"
             f"{' +offload params' * d.offload_params}, {d.micro_batch_size} x {d.grad_accum} accum x {ws} "
             f"processes = {d.micro_batch_size * d.grad_accum * ws} sequences per step, mixed precision "
             f"{d.mixed_precision}", ""]
    rows = [["#", "stage", "target", "prune", "finetune", "eval"]]
    rows += [_stage_row(s, recipe, estimates) for s in recipe.resolved_stages()]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines += ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
    lines += ["", f"{'memory per process, GiB (rough)':<39}{'device':>10}{'CPU':>10}"]
    for step in ("prune", "finetune", "evaluate"):
        e = estimates[step]
        if e is None:
            lines.append(f"{step:<9} (no stage does it)")
            continue
        lines.append(f"{step:<9} {'peak at ' + e['stage']:<29}{e['device']:>10.2f}{e['cpu']:>10.2f}")
        parts = [f"{k} {v:.2f}" for k, v in e.items() if k not in ("stage", "device", "cpu")]
        lines.append("  " + ", ".join(parts))
    return "\n".join(lines)


def plan_for(recipe: Recipe, world_size: int = 1) -> str:
    """`format_plan` for the recipe's model, whose config (not weights) is read from its folder or the hub."""
    path = resolve_model_path(recipe.model)
    try:
        config = AutoConfig.from_pretrained(path)
    except OSError as e:
        raise UserError(f"cannot read the config of {recipe.model!r} ({str(e).splitlines()[0]}); the memory estimate "
                        f"needs its config.json: download the model or point `model` at a local folder") from None
    return format_plan(recipe, estimate(config, recipe, world_size))


def header_lines(estimates: dict) -> list[str]:
    """The `# Memory` lines of a shipped recipe's header (tests/test_memory.py checks each header states them)."""
    lines = [f"# Memory (sparsegpt.run.memory, world size {estimates['world_size']}), GiB per process:"]
    for step in ("prune", "finetune", "evaluate"):
        e = estimates[step]
        if e is None:
            continue
        parts = " + ".join(f"{k.removeprefix('cpu_')} {v:.1f}" for k, v in e.items()
                           if k not in ("stage", "device", "cpu") and v >= 0.05)
        lines.append(f"#   {step:<9} {e['device']:.1f} on the GPU, {e['cpu']:.1f} CPU: {parts}")
    return lines
