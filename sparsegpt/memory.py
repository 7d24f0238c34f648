"""Rough per-process memory estimates for `--dry-run`, from the model config alone (built on the `meta` device).

Pruning (main process; the model on CPU, one decoder layer at a time on the device):
    layer weights in the model dtype + an fp32 working copy of the largest linear;
    Hessians: cols² fp32 per group of linears sharing an input, plus one inverse factor at a time;
    calibration activations: layer inputs and outputs, 2 × nsamples × seqlen × hidden in the model dtype, on the
    device, or on the CPU with `offload_activations` (then one batch of them on the device).
Fine-tuning, per process, for P parameters of which Pt train (all, or LoRA's r·(in + out) per target):
    ZeRO-0 (torch AdamW): weights P·b, grads Pt·b, Adam 2·Pt·b (its states take the parameter dtype b);
    ZeRO-2/3 (DeepSpeed): weights and grads 16-bit under bf16/fp16 (else b), fp32 master 4·Pt, Adam 8·Pt; ZeRO-2
    splits grads, master and Adam over the world, ZeRO-3 also the weights (plus two gathered decoder layers);
    offload_optimizer moves master + Adam to the CPU, offload_params the weight shards;
    masks: 1 byte per pruned-linear weight, split like the weights;
    activations (Korthikanti et al. 2022; SDPA keeps no s² scores): 34·s·b·h bytes per layer at 2 bytes a value,
    with gradient checkpointing each layer's input s·b·h values plus one layer in full; logits s·b·V fp32 × 2;
    KD: the teacher's weights (in the model dtype; under ZeRO-3 split, in the compute dtype) and its logits.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from transformers import AutoConfig, AutoModelForCausalLM

from sparsegpt.architectures import decoder_layers, family_of, prunable_linears, weight_as_linear
from sparsegpt.data import default_seqlen
from sparsegpt.errors import UserError
from sparsegpt.models import resolve_model_path
from sparsegpt.recipe import Recipe, ResolvedStage

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


def _facts(config, dtype: str) -> _Facts:
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    family = family_of(model)
    layers = decoder_layers(model)
    linears = {}
    for name, module in prunable_linears(model).items():
        out_features, in_features = weight_as_linear(module).shape
        index = int(name[len(family.layers_path) + 1:].split(".")[0])
        linears[name] = (index, in_features, out_features)
    if dtype == "auto":
        dtype = str(getattr(config, "dtype", None) or "float32").removeprefix("torch.")
    if dtype not in _BYTES:
        raise UserError(f"model dtype {dtype!r} has no size here; set the recipe's dtype to one of {', '.join(_BYTES)}")
    return _Facts(model_type=config.model_type, params=sum(p.numel() for p in model.parameters()),
                  layers=len(layers), layer_params=sum(p.numel() for p in layers[0].parameters()),
                  hidden=config.hidden_size, vocab=config.vocab_size, default_seqlen=default_seqlen(config),
                  dtype_bytes=_BYTES[dtype], linears=linears, layer_prefix=family.layers_path,
                  shared_inputs=family.shared_inputs)


def _selected(facts: _Facts, include: str | None, exclude: str | None) -> dict[str, tuple[int, int, int]]:
    """The prunable linears a stage's include/exclude regexes keep."""
    return {name: v for name, v in facts.linears.items()
            if (include is None or re.search(include, name)) and not (exclude is not None and re.search(exclude, name))}


def _hessian_bytes(facts: _Facts, linears: dict[str, tuple[int, int, int]]) -> int:
    """The largest decoder layer's Hessians (one per group of same-input linears) plus one inverse factor."""
    per_layer: dict[int, dict[str, int]] = {}
    for name, (index, cols, _) in linears.items():
        relative = name[len(f"{facts.layer_prefix}.{index}."):]
        group = next((g[0] for g in facts.shared_inputs if relative in g), relative)
        per_layer.setdefault(index, {})[group] = cols
    if not per_layer:
        return 0
    return max(4 * (sum(c * c for c in groups.values()) + max(c * c for c in groups.values()))
               for groups in per_layer.values())


def _prune_step(facts: _Facts, stage: ResolvedStage) -> dict:
    p = stage.prune
    linears = _selected(facts, p.include, p.exclude)
    b, seqlen = facts.dtype_bytes, p.seqlen or facts.default_seqlen
    activations = 2 * p.nsamples * seqlen * facts.hidden * b
    on_device = 2 * min(p.batch_size, p.nsamples) * seqlen * facts.hidden * b if p.offload_activations else activations
    parts = {"layer_weights": facts.layer_params * b + 4 * max((i * o for _, i, o in linears.values()), default=0),
             "hessians": _hessian_bytes(facts, linears), "activations": on_device}
    cpu = facts.params * b + (activations if p.offload_activations else 0)
    return _gib(stage.name, parts, cpu)


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
    shards = world_size if d.zero_stage else 1
    weight_shards = world_size if d.zero_stage == 3 else 1
    if d.zero_stage == 0:
        parts = {"weights": P * b, "grads": Pt * b, "optimizer": 2 * Pt * b, "master": 0}
    else:
        parts = {"weights": P * compute / weight_shards, "grads": Pt * compute / shards,
                 "optimizer": 8 * Pt / shards, "master": 4 * Pt / shards}
    parts["gathered"] = 2 * facts.layer_params * compute if d.zero_stage == 3 else 0
    parts["masks"] = sum(i * o for _, i, o in _selected(facts, stage.prune.include, stage.prune.exclude).values()
                         ) / weight_shards if stage.pruned_fraction > 0 else 0
    s, mb, h = f.seqlen or facts.default_seqlen, d.micro_batch_size, facts.hidden
    full_layer = 34 * s * mb * h * compute / 2
    parts["activations"] = (facts.layers * s * mb * h * compute + full_layer if f.gradient_checkpointing
                            else facts.layers * full_layer)
    kd = f.kd is not None
    parts["logits"] = s * mb * facts.vocab * (8 + (compute if kd else 0))
    parts["teacher"] = P * (compute if d.zero_stage == 3 else b) / weight_shards if kd else 0  # ZeRO-3: DS inference
    cpu = 0.0
    if d.offload_optimizer:
        cpu += parts["optimizer"] + parts["master"]
        parts["optimizer"] = parts["master"] = 0
    if d.offload_params:
        cpu += parts["weights"] + parts["teacher"]
        parts["weights"] = parts["teacher"] = 0
    return _gib(stage.name, parts, cpu)


def _gib(stage: str, parts: dict[str, float], cpu: float) -> dict:
    out = {"stage": stage, **{k: v / GIB for k, v in parts.items()}}
    out["device"] = sum(parts.values()) / GIB
    out["cpu"] = cpu / GIB
    return out


def estimate(config, recipe: Recipe, world_size: int = 1) -> dict:
    """Per-process memory (GiB) of the pruning and the fine-tuning step, each at the recipe's most demanding stage."""
    if world_size < 1:
        raise UserError(f"world_size must be >= 1, got {world_size}")
    facts = _facts(config, recipe.dtype)
    stages = recipe.resolved_stages()
    prune = [_prune_step(facts, s) for s in stages if s.sparsity > 0 or s.prune_n]
    finetune = [_finetune_step(facts, s, recipe, world_size) for s in stages if s.finetune is not None]
    return {"model_type": facts.model_type, "params": facts.params, "layers": facts.layers,
            "layer_params": facts.layer_params, "default_seqlen": facts.default_seqlen, "world_size": world_size,
            "prune": max(prune, key=lambda e: e["device"]) if prune else None,
            "finetune": max(finetune, key=lambda e: e["device"]) if finetune else None}


def _stage_row(stage: ResolvedStage, recipe: Recipe, estimates: dict) -> list[str]:
    p, f, d = stage.prune, stage.finetune, recipe.distributed
    seqlen = p.seqlen or estimates["default_seqlen"]
    prune = "keep (dense)" if not (stage.sparsity or stage.prune_n) else \
        f"{p.method}/{p.allocation} {p.nsamples}x{seqlen}"
    if f is None:
        finetune = "one-shot"
    else:
        steps = f.num_steps(estimates["world_size"], micro_batch_size=d.micro_batch_size, grad_accum=d.grad_accum,
                            seqlen=estimates["default_seqlen"])
        finetune = f"{steps} steps lr {f.lr:g} {f.schedule}"
        finetune += f" +KD({f.kd.teacher})" if f.kd else ""
        finetune += f" +LoRA(r{f.lora.r})" if f.lora else ""
    hooks = ", ".join(h["type"] + (f"({h['source']})" if "source" in h else "") for h in stage.eval.hooks)
    return [str(stage.index), stage.name, str(stage.target), prune, finetune, f"{'+'.join(stage.eval.phases)}: {hooks}"]


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
    for step in ("prune", "finetune"):
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
