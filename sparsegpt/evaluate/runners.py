"""Evaluation: sparsity report, greedy samples, lm-eval tasks (perplexity: `sparsegpt/evaluate/perplexity.py`), and the
hooks a recipe lists to run them after each phase.

A hook is a dict with a `type` and its options:

    {"type": "perplexity", "source": "stdlib-docs", "seqlen": 256, "max_windows": 32, "layerwise": False,
     "batch_size": 4, "split": "test"}                                  -> "ppl/<source>" (file sources: the stem;
                                                                           another split: "ppl/<source>@<split>")
    {"type": "lm_eval", "tasks": [...], "num_fewshot": 0, "limit": 50, "include_path": "...", "batch_size": 1}
                                                                        -> "lm_eval/<task>/<metric>"
    {"type": "sparsity"}                                                -> "sparsity/overall", "sparsity/2:4", ...
    {"type": "samples", "prompts": [...], "max_new_tokens": 32}         -> "samples" (a list of dicts)
    {"type": "custom", "path": "package.module:function", "args": {...}, "name": "mine"} -> "<name>/<key>"

A custom hook is called as `fn(model, tokenizer, *, context: HookContext, **args)` and returns
`dict[str, float | str | list]`; its name defaults to the function's name. The hook types, their options and
runners are registered in `sparsegpt/config/hooks.py`; the runners (`run_<type>_hook`) are at the end of this module.

Interface: `run_hooks(model, tokenizer, hooks, context, *, fail_fast=False) -> (metrics, errors)` (and
`evaluate_hooks`, which also returns each distributed hook's per-rank shares), `perplexity` /
`distributed_perplexity`, `sparsity_report`, `generate_samples`, `lm_eval_tasks` (each with `device=None`: run where
the model is, else move it there; layerwise perplexity moves one layer at a time).

Several processes (`World.current()` has more than one rank): call `run_hooks` on every rank with the same model
and hooks. Perplexity splits its windows over the ranks; every other hook type runs on rank 0 alone (lm-eval too:
its HFLM, given a built model, forces rank 0 of 1 and shards nothing) and every rank returns rank 0's results.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import torch
from torch import nn

from sparsegpt.config.hooks import (
    HOOKS,
    HookContext,
    hook_name,
    require_lm_eval,
    resolve_callable,
    runner,
    validate_hooks,
)
from sparsegpt.core.architectures import decoder_layers, prunable_linears, weight_as_linear
from sparsegpt.core.data import default_seqlen, eval_ids
from sparsegpt.core.errors import UserError
from sparsegpt.core.world import RankFailed, World, on_every_rank
from sparsegpt.evaluate.perplexity import distributed_perplexity, eval_mode, perplexity, place

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from sparsegpt.core.masks import MaskSet

__all__ = ["HookResults", "evaluate_hooks", "generate_samples", "lm_eval_tasks", "perplexity", "run_hooks",
           "sparsity_report"]  # perplexity: re-exported from evaluate.perplexity

logger = logging.getLogger(__name__)

NM_PATTERNS = ((2, 4), (4, 8))


# -- sparsity -----------------------------------------------------------------------------------------------

def _nm_groups(pruned: torch.Tensor, n: int, m: int) -> tuple[int, int]:
    """(groups of m consecutive input columns with >= n pruned, all full groups) of an (out, in) mask."""
    cols = pruned.shape[1] // m * m
    groups = pruned[:, :cols].reshape(pruned.shape[0], -1, m).sum(-1)
    return int((groups >= n).sum()), groups.numel()


def _layer_of(model: nn.Module) -> Callable[[str], str | None]:
    """Maps a module name to its decoder layer index (as a string), or None outside the decoder layers."""
    layers = decoder_layers(model)
    prefix = next(name for name, module in model.named_modules() if module is layers) + "."
    return lambda name: name[len(prefix):].split(".")[0] if name.startswith(prefix) else None


def sparsity_report(model: nn.Module, masks: MaskSet | None = None) -> dict:
    """Per-linear, per-layer and overall sparsity of the prunable linears, N:M compliance, parameter counts.

    With `masks` (a MaskSet) the report covers its linears and counts its pruned entries, after checking that
    every masked weight is zero; without, it counts exact zeros in `architectures.prunable_linears(model)`.
    """
    if masks is not None:
        masks.verify(model)  # every masked matrix exists (expert slices included) and is zero where masked
        pruned_by_name = {name: masks.masks[name] for name in masks.masks}
    else:
        linears = prunable_linears(model)
        pruned_by_name = {name: weight_as_linear(m) == 0 for name, m in linears.items()}
    layer_of = _layer_of(model)
    per_linear, layer_counts = {}, {}
    totals = {"pruned": 0, "weights": 0} | {f"{n}:{m}": [0, 0] for n, m in NM_PATTERNS}
    for name, pruned in pruned_by_name.items():
        pruned = pruned.cpu()
        k, size = int(pruned.sum()), pruned.numel()
        entry = {"shape": list(pruned.shape), "sparsity": k / size}
        for n, m in NM_PATTERNS:
            ok, groups = _nm_groups(pruned, n, m)
            entry[f"{n}:{m}"] = ok / groups if groups else None
            totals[f"{n}:{m}"][0] += ok
            totals[f"{n}:{m}"][1] += groups
        per_linear[name] = entry
        totals["pruned"] += k
        totals["weights"] += size
        layer = layer_of(name)
        if layer is not None:
            counts = layer_counts.setdefault(layer, [0, 0])
            counts[0] += k
            counts[1] += size
    if not totals["weights"]:
        raise UserError("the model has no prunable linears to report sparsity on; check include/exclude patterns")
    params = list(model.parameters())
    return {
        "source": "masks" if masks is not None else "weights",
        "overall": totals["pruned"] / totals["weights"],
        "pruned": totals["pruned"],
        "prunable": totals["weights"],
        **{f"{n}:{m}": (totals[f"{n}:{m}"][0] / totals[f"{n}:{m}"][1] if totals[f"{n}:{m}"][1] else None)
           for n, m in NM_PATTERNS},
        "params_total": sum(p.numel() for p in params),
        "params_nonzero": sum(int(torch.count_nonzero(p.detach())) for p in params),
        "layers": {layer: k / size for layer, (k, size) in sorted(layer_counts.items(), key=lambda kv: int(kv[0]))},
        "linears": per_linear,
    }


# -- samples and lm-eval ------------------------------------------------------------------------------------

def generate_samples(model: nn.Module, tokenizer, prompts: list[str], *, max_new_tokens: int = 32,
                     device: str | torch.device | None = None) -> list[dict]:
    """Greedy continuations, one prompt at a time: [{"prompt", "completion"}]."""
    dev = place(model, device)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    samples = []
    with eval_mode(model):
        for prompt in prompts:
            enc = tokenizer(prompt, return_tensors="pt").to(dev)
            out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
                                 pad_token_id=pad, use_cache=True)
            completion = tokenizer.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)
            samples.append({"prompt": prompt, "completion": completion})
    return samples


def lm_eval_tasks(model: nn.Module, tokenizer, tasks: list[str], *, num_fewshot: int = 0,
                  limit: int | float | None = None, include_path: str | None = None, batch_size: int = 1,
                  device: str | torch.device | None = None) -> dict[str, dict[str, float]]:
    """Run lm-eval tasks on the in-memory model: {task: {metric: value}}; ",none" filter suffixes dropped."""
    require_lm_eval()
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    if include_path is not None and not Path(include_path).is_dir():
        raise UserError(f"lm-eval include_path {include_path!r} is not a directory; pass a folder of task YAMLs")
    manager = TaskManager(include_path=include_path)
    unknown = [t for t in tasks if t not in manager.all_tasks and not Path(t).is_file()]
    if unknown:
        raise UserError(f"unknown lm-eval task(s) {', '.join(unknown)}: looked up in lm-eval's built-in tasks"
                        f" and include_path={include_path!r}; pass include_path=DIR holding their YAML")
    place(model, device)
    with eval_mode(model):
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
        out = lm_eval.simple_evaluate(model=lm, tasks=list(tasks), num_fewshot=num_fewshot, limit=limit,
                                      task_manager=manager, log_samples=False)
    results = {}
    for task, values in out["results"].items():
        results[task] = {}
        for key, value in values.items():
            metric, _, filt = key.partition(",")
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                results[task][metric if filt in ("none", "") else f"{metric}_{filt}"] = float(value)
    return results


# -- hooks --------------------------------------------------------------------------------------------------

def run_perplexity_hook(model: nn.Module, tokenizer: PreTrainedTokenizerBase, hook: dict,
                        ctx: HookContext) -> tuple[dict, list[int]]:
    """`perplexity` hook, on every rank: "ppl/<source>" on the source's evaluation windows, split over the ranks;
    and the windows each rank evaluated."""
    def windows() -> torch.Tensor:  # loaded inside the step that makes a failing rank stop every rank
        return eval_ids(hook["source"], tokenizer, seqlen=hook.get("seqlen") or default_seqlen(model),
                        split=hook.get("split", "test"), max_windows=hook.get("max_windows"))

    result = distributed_perplexity(model, windows, batch_size=hook.get("batch_size", 4), device=ctx.device,
                                    layerwise=hook.get("layerwise", False))
    return {hook_name(hook): result.value}, result.windows


def run_lm_eval_hook(model: nn.Module, tokenizer: PreTrainedTokenizerBase, hook: dict, ctx: HookContext) -> dict:
    """`lm_eval` hook: "lm_eval/<task>/<metric>" for each task. Main process only: lm-eval's HFLM, given a built
    model, sets rank 0 of 1 and shards nothing (its data parallelism needs it to load the model by name)."""
    world = World.current()
    if world.size > 1:
        logger.info("lm-eval runs on the main process only (HFLM does not shard requests for a model it is "
                    "handed); the other %d rank(s) wait", world.size - 1)
    results = lm_eval_tasks(model, tokenizer, hook["tasks"], num_fewshot=hook.get("num_fewshot", 0),
                            limit=hook.get("limit"), include_path=hook.get("include_path"),
                            batch_size=hook.get("batch_size", 1), device=ctx.device)
    return {f"lm_eval/{task}/{metric}": v for task, values in results.items() for metric, v in values.items()}


def run_sparsity_hook(model: nn.Module, tokenizer: PreTrainedTokenizerBase, hook: dict, ctx: HookContext) -> dict:
    """`sparsity` hook: overall and N:M sparsity of the masked linears, parameter counts."""
    report = sparsity_report(model, ctx.masks)
    keys = ("overall", *(f"{n}:{m}" for n, m in NM_PATTERNS), "params_total", "params_nonzero")
    return {f"sparsity/{k}": report[k] for k in keys if report[k] is not None}


def run_samples_hook(model: nn.Module, tokenizer: PreTrainedTokenizerBase, hook: dict, ctx: HookContext) -> dict:
    """`samples` hook: greedy continuations of the prompts."""
    return {"samples": generate_samples(model, tokenizer, hook["prompts"],
                                        max_new_tokens=hook.get("max_new_tokens", 32), device=ctx.device)}


def run_custom_hook(model: nn.Module, tokenizer: PreTrainedTokenizerBase, hook: dict, ctx: HookContext) -> dict:
    """`custom` hook: the user's function, its keys prefixed with the hook's name."""
    out = resolve_callable(hook["path"])(model, tokenizer, context=ctx, **hook.get("args", {}))
    if not isinstance(out, dict) or not all(isinstance(k, str) for k in out):
        raise TypeError(f"custom hook {hook['path']} returned {type(out).__name__}; expected dict[str, value]")
    return {f"{hook_name(hook)}/{k}": v for k, v in out.items()}


@dataclass
class HookResults:
    """What the hooks produced: metrics, errors (hook name -> message), each distributed hook's per-rank shares."""

    metrics: dict = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)
    shares: dict[str, list[int]] = field(default_factory=dict)  # e.g. {"ppl/wikitext2": [windows of rank 0, ...]}
    world_size: int = 1


def evaluate_hooks(model: nn.Module, tokenizer, hooks: list[dict], context: HookContext, *, fail_fast: bool = False,
                   world: World | None = None) -> HookResults:
    """Run each hook where its type says (`hooks.HookType.ranks`); with several ranks, call it on every rank.

    A failing hook is logged and recorded unless fail_fast (then every rank raises). "main" hooks run on rank 0
    and their outcome is broadcast after each; "all" hooks fail on every rank or none (`on_every_rank`). Every
    rank returns rank 0's results."""
    world = world or World.current()
    on_every_rank(world, lambda: validate_hooks(hooks))  # a bad hook stops every rank, before any collective
    out = HookResults(world_size=world.size)
    for hook in hooks:
        name, ranks, t0 = hook_name(hook), HOOKS[hook["type"]].ranks, time.time()
        error: Exception | None = None
        if ranks == "all" or world.is_main:
            try:
                result = runner(hook)(model, tokenizer, hook, context)
                metrics, shares = result if ranks == "all" else (result, None)
                out.metrics.update(metrics)
                if shares is not None:
                    out.shares[name] = shares
            except Exception as e:  # a hook's failure must not cost the run; it is recorded in metrics.jsonl
                error = e
        message = None if error is None else f"{type(error).__name__}: {error}"
        if ranks == "main":  # the others learn rank 0's outcome, so that under fail_fast they stop with it
            message = world.broadcast_object(message)
        if message is not None:
            if fail_fast:
                raise error if error is not None else RankFailed(f"eval hook {name} failed on rank 0: {message}")
            if error is not None:
                logger.error("eval hook %s failed (stage %s, %s)", name, context.stage, context.phase, exc_info=error)
            out.errors[name] = message
        logger.info("eval hook %s: %.1fs", name, time.time() - t0)
    out.metrics, out.errors, out.shares = world.broadcast_object((out.metrics, out.errors, out.shares))
    return out


def run_hooks(model: nn.Module, tokenizer, hooks: list[dict], context: HookContext, *,
              fail_fast: bool = False, world: World | None = None) -> tuple[dict, dict]:
    """Run each hook; returns (metrics, errors). A failing hook is logged and recorded unless fail_fast.
    With several ranks, every rank calls it and gets the same results (`evaluate_hooks`)."""
    out = evaluate_hooks(model, tokenizer, hooks, context, fail_fast=fail_fast, world=world)
    return out.metrics, out.errors
