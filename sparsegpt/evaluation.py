"""Evaluation: perplexity (SparseGPT protocol), sparsity report, greedy samples, lm-eval tasks, and the
hooks a recipe lists to run them after each phase; plus the run dir's `metrics.jsonl` reader/writer.

A hook is a dict with a `type` and its options:

    {"type": "perplexity", "source": "stdlib-docs", "seqlen": 256, "max_windows": 32, "layerwise": False,
     "batch_size": 4, "split": "test"}                                  -> "ppl/<source>" (file sources: the stem)
    {"type": "lm_eval", "tasks": [...], "num_fewshot": 0, "limit": 50, "include_path": "...", "batch_size": 1}
                                                                        -> "lm_eval/<task>/<metric>"
    {"type": "sparsity"}                                                -> "sparsity/overall", "sparsity/2:4", ...
    {"type": "samples", "prompts": [...], "max_new_tokens": 32}         -> "samples" (a list of dicts)
    {"type": "custom", "path": "package.module:function", "args": {...}, "name": "mine"} -> "<name>/<key>"

A custom hook is called as `fn(model, tokenizer, *, context: HookContext, **args)` and returns
`dict[str, float | str | list]`; its name defaults to the function's name.

Interface: `validate_hooks(hooks)` (recipe validation, before any work), `run_hooks(model, tokenizer, hooks,
context, *, fail_fast=False) -> (metrics, errors)`, `perplexity`, `sparsity_report`, `generate_samples`,
`lm_eval_tasks` (each with `device=None`: run where the model is, else move it there; layerwise perplexity
moves one layer at a time), `append_metrics` / `read_metrics`, `format_stage_table`, `flatten_for_trackers`.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import json
import logging
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from sparsegpt.errors import UserError

logger = logging.getLogger(__name__)

NM_PATTERNS = ((2, 4), (4, 8))
PHASES = ("pruned", "finetuned")
RECORD_KEYS = ("stage", "name", "phase", "target", "sparsity", "metrics")
HOOK_OPTIONS: dict[str, tuple[frozenset[str], frozenset[str]]] = {  # type -> (required, optional) keys
    "perplexity": (frozenset({"source"}), frozenset({"seqlen", "max_windows", "layerwise", "batch_size", "split"})),
    "lm_eval": (frozenset({"tasks"}), frozenset({"num_fewshot", "limit", "include_path", "batch_size"})),
    "sparsity": (frozenset(), frozenset()),
    "samples": (frozenset({"prompts"}), frozenset({"max_new_tokens"})),
    "custom": (frozenset({"path"}), frozenset({"args", "name"})),
}


@dataclass
class HookContext:
    """What a hook may want to know about the evaluation it runs in."""

    stage: int = 0
    name: str = ""
    phase: str = ""
    target: Any = None
    run_dir: str | None = None
    device: str | None = None
    masks: Any = None  # sparsegpt.masks.MaskSet | None


# -- perplexity ---------------------------------------------------------------------------------------------

def _model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _place(model: nn.Module, device: str | torch.device | None) -> torch.device:
    """The device to run on: `device` (the model is moved there) or, when None, where the model is."""
    if device is None:
        return _model_device(model)
    model.to(device)
    return torch.device(device)


@contextlib.contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    """eval() and no_grad (not inference_mode: parameters moved to a device inside must stay trainable)."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)


def _logits_batches(model, input_ids, batch_size, device, layerwise) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(window ids, logits) batch by batch, the whole model at once or one decoder layer at a time."""
    if not layerwise:
        dev = _place(model, device)
        for ids in input_ids.split(batch_size):
            yield ids, model(ids.to(dev), use_cache=False).logits
        return
    from sparsegpt.sequential import layerwise_hidden_states

    dev = torch.device(device) if device is not None else _model_device(model)
    hidden = layerwise_hidden_states(model, input_ids, device=dev, batch_size=batch_size)
    head = model.get_output_embeddings()
    home = head.weight.device
    head.to(dev)
    try:
        start = 0
        for h in hidden:
            yield input_ids[start:start + h.shape[0]], head(h.to(dev, head.weight.dtype))
            start += h.shape[0]
    finally:
        head.to(home)
    if start != input_ids.shape[0]:
        raise RuntimeError(f"layerwise_hidden_states returned {start} windows for {input_ids.shape[0]} inputs")


def perplexity(model: nn.Module, input_ids: torch.Tensor, *, batch_size: int = 4,
               device: str | torch.device | None = None, layerwise: bool = False) -> float:
    """exp(mean NLL) over every predicted token of the (n, seqlen) windows: n·(seqlen−1) predictions."""
    if input_ids.dim() != 2 or input_ids.shape[1] < 2 or input_ids.shape[0] < 1:
        raise UserError(f"perplexity needs input_ids shaped (windows, seqlen >= 2), got {tuple(input_ids.shape)}")
    if batch_size < 1:
        raise UserError(f"batch_size must be >= 1, got {batch_size}")
    if layerwise and getattr(model.config, "final_logit_softcapping", None):
        raise UserError("layerwise perplexity applies only the lm_head, but this model soft-caps its logits; "
                        "use layerwise=False")
    nll, count = torch.zeros((), dtype=torch.float64), 0
    with _eval_mode(model):
        for ids, logits in _logits_batches(model, input_ids, batch_size, device, layerwise):
            labels = ids[:, 1:].to(logits.device)
            losses = F.cross_entropy(logits[:, :-1].float().flatten(0, 1), labels.flatten(), reduction="none")
            nll += losses.double().sum().cpu()
            count += labels.numel()
    return math.exp(nll.item() / count)


# -- sparsity -----------------------------------------------------------------------------------------------

def _nm_groups(pruned: torch.Tensor, n: int, m: int) -> tuple[int, int]:
    """(groups of m consecutive input columns with >= n pruned, all full groups) of an (out, in) mask."""
    cols = pruned.shape[1] // m * m
    groups = pruned[:, :cols].reshape(pruned.shape[0], -1, m).sum(-1)
    return int((groups >= n).sum()), groups.numel()


def _layer_of(model: nn.Module) -> Callable[[str], str | None]:
    """Maps a module name to its decoder layer index (as a string), or None outside the decoder layers."""
    from sparsegpt.architectures import decoder_layers

    layers = decoder_layers(model)
    prefix = next(name for name, module in model.named_modules() if module is layers) + "."
    return lambda name: name[len(prefix):].split(".")[0] if name.startswith(prefix) else None


def sparsity_report(model: nn.Module, masks=None) -> dict:
    """Per-linear, per-layer and overall sparsity of the prunable linears, N:M compliance, parameter counts.

    With `masks` (a MaskSet) the report covers its linears and counts its pruned entries, after checking that
    every masked weight is zero; without, it counts exact zeros in `architectures.prunable_linears(model)`.
    """
    from sparsegpt.architectures import prunable_linears, weight_as_linear

    if masks is not None:
        masks.verify(model)
        modules = dict(model.named_modules())
        pruned_by_name = {name: masks.masks[name] for name in masks.masks}
        linears = {name: modules[name] for name in pruned_by_name}
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
    dev = _place(model, device)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    samples = []
    with _eval_mode(model):
        for prompt in prompts:
            enc = tokenizer(prompt, return_tensors="pt").to(dev)
            out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
                                 pad_token_id=pad, use_cache=True)
            completion = tokenizer.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)
            samples.append({"prompt": prompt, "completion": completion})
    return samples


def _require_lm_eval() -> None:
    if importlib.util.find_spec("lm_eval") is None:
        raise UserError("lm-eval tasks need the lm-eval package: pip install 'sparsegpt[eval]'")


def lm_eval_tasks(model: nn.Module, tokenizer, tasks: list[str], *, num_fewshot: int = 0,
                  limit: int | float | None = None, include_path: str | None = None, batch_size: int = 1,
                  device: str | torch.device | None = None) -> dict[str, dict[str, float]]:
    """Run lm-eval tasks on the in-memory model: {task: {metric: value}}; ",none" filter suffixes dropped."""
    _require_lm_eval()
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
    _place(model, device)
    with _eval_mode(model):
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

def _resolve_callable(path: str) -> Callable:
    module_name, sep, attr = path.partition(":")
    if not sep or not module_name or not attr:
        raise UserError(f"custom hook path {path!r} must look like 'package.module:function'")
    try:
        obj = importlib.import_module(module_name)
    except ImportError as e:
        raise UserError(f"custom hook {path!r}: cannot import module {module_name!r} ({e}); "
                        "make it importable (installed or on PYTHONPATH)") from e
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise UserError(f"custom hook {path!r}: {module_name!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise UserError(f"custom hook {path!r} is not callable; point it at a function")
    return obj


def _source_label(source: str) -> str:
    return Path(source).stem if source.endswith((".txt", ".jsonl")) or os.sep in source else source


def hook_name(hook: dict) -> str:
    """The hook's label in `errors` and the prefix of its metric keys."""
    kind = hook["type"]
    if kind == "perplexity":
        return f"ppl/{_source_label(str(hook['source']))}"
    if kind == "lm_eval":
        return "lm_eval/" + "+".join(hook["tasks"])
    if kind == "custom":
        return hook.get("name") or hook["path"].rpartition(":")[2].rpartition(".")[2]
    return kind


def validate_hooks(hooks: list[dict]) -> None:
    """Check hook configs before any work starts: known types and keys, importable custom hooks, lm-eval present."""
    seen = set()
    for i, hook in enumerate(hooks):
        if not isinstance(hook, dict) or hook.get("type") not in HOOK_OPTIONS:
            got = hook.get("type") if isinstance(hook, dict) else type(hook).__name__
            raise UserError(f"eval hook #{i}: type {got!r} is unknown; use one of {', '.join(HOOK_OPTIONS)}")
        required, optional = HOOK_OPTIONS[hook["type"]]
        keys = set(hook) - {"type"}
        if required - keys or keys - required - optional:
            raise UserError(f"eval hook #{i} ({hook['type']}): keys {sorted(keys)} are wrong; required "
                            f"{sorted(required)}, optional {sorted(optional)}")
        for key in ("tasks", "prompts"):
            value = hook.get(key)
            if key in hook and not (value and isinstance(value, list) and all(isinstance(v, str) for v in value)):
                raise UserError(f"eval hook #{i} ({hook['type']}): {key} must be a non-empty list of strings")
        if hook["type"] == "lm_eval":
            _require_lm_eval()
        if hook["type"] == "custom":
            _resolve_callable(hook["path"])
            if not isinstance(hook.get("args", {}), dict):
                raise UserError(f"eval hook #{i} (custom): args must be a mapping of keyword arguments")
        name = hook_name(hook)
        if name in seen:
            raise UserError(f"eval hook #{i}: a second hook named {name!r}; give custom hooks distinct 'name's "
                            "and list each source/task once")
        seen.add(name)


def _run_perplexity(model, tokenizer, hook: dict, ctx: HookContext) -> dict:
    from sparsegpt.data import default_seqlen, eval_ids

    ids = eval_ids(hook["source"], tokenizer, seqlen=hook.get("seqlen") or default_seqlen(model),
                   split=hook.get("split", "test"), max_windows=hook.get("max_windows"))
    value = perplexity(model, ids, batch_size=hook.get("batch_size", 4), device=ctx.device,
                       layerwise=hook.get("layerwise", False))
    return {hook_name(hook): value}


def _run_lm_eval(model, tokenizer, hook: dict, ctx: HookContext) -> dict:
    results = lm_eval_tasks(model, tokenizer, hook["tasks"], num_fewshot=hook.get("num_fewshot", 0),
                            limit=hook.get("limit"), include_path=hook.get("include_path"),
                            batch_size=hook.get("batch_size", 1), device=ctx.device)
    return {f"lm_eval/{task}/{metric}": v for task, values in results.items() for metric, v in values.items()}


def _run_sparsity(model, tokenizer, hook: dict, ctx: HookContext) -> dict:
    report = sparsity_report(model, ctx.masks)
    keys = ("overall", *(f"{n}:{m}" for n, m in NM_PATTERNS), "params_total", "params_nonzero")
    return {f"sparsity/{k}": report[k] for k in keys if report[k] is not None}


def _run_samples(model, tokenizer, hook: dict, ctx: HookContext) -> dict:
    return {"samples": generate_samples(model, tokenizer, hook["prompts"],
                                        max_new_tokens=hook.get("max_new_tokens", 32), device=ctx.device)}


def _run_custom(model, tokenizer, hook: dict, ctx: HookContext) -> dict:
    out = _resolve_callable(hook["path"])(model, tokenizer, context=ctx, **hook.get("args", {}))
    if not isinstance(out, dict) or not all(isinstance(k, str) for k in out):
        raise TypeError(f"custom hook {hook['path']} returned {type(out).__name__}; expected dict[str, value]")
    return {f"{hook_name(hook)}/{k}": v for k, v in out.items()}


_RUNNERS = {"perplexity": _run_perplexity, "lm_eval": _run_lm_eval, "sparsity": _run_sparsity,
            "samples": _run_samples, "custom": _run_custom}


def run_hooks(model: nn.Module, tokenizer, hooks: list[dict], context: HookContext, *,
              fail_fast: bool = False) -> tuple[dict, dict]:
    """Run each hook; returns (metrics, errors). A failing hook is logged and recorded unless fail_fast."""
    validate_hooks(hooks)
    metrics, errors = {}, {}
    for hook in hooks:
        name = hook_name(hook)
        t0 = time.time()
        try:
            metrics.update(_RUNNERS[hook["type"]](model, tokenizer, hook, context))
        except Exception as e:  # a hook's failure must not cost the run; it is recorded in metrics.jsonl
            if fail_fast:
                raise
            logger.exception("eval hook %s failed (stage %s, %s)", name, context.stage, context.phase)
            errors[name] = f"{type(e).__name__}: {e}"
        logger.info("eval hook %s: %.1fs", name, time.time() - t0)
    return metrics, errors


# -- metrics.jsonl ------------------------------------------------------------------------------------------

def append_metrics(run_dir: str | Path, record: dict) -> None:
    """Append one evaluation record to RUN_DIR/metrics.jsonl as one line, in one write, flushed and fsynced."""
    missing = [k for k in RECORD_KEYS if k not in record]
    if missing or record["phase"] not in PHASES:
        raise ValueError(f"metrics record needs {RECORD_KEYS} with phase in {PHASES}; missing {missing}, "
                         f"phase {record.get('phase')!r}")
    line = json.dumps({"time": time.time(), **record}) + "\n"
    with open(Path(run_dir) / "metrics.jsonl", "a", encoding="utf-8") as f:
        f.write(line)
        f.flush()
        os.fsync(f.fileno())


def read_metrics(run_dir: str | Path) -> list[dict]:
    """The records of RUN_DIR/metrics.jsonl; a torn last line (a crash mid-append) is skipped with a warning."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise UserError(f"{run_dir} has no metrics.jsonl; pass a run directory written by train/progressive.py")
    text = path.read_text(encoding="utf-8")
    lines = text.splitlines()
    records = []
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as e:
            if i == len(lines) and not text.endswith("\n"):
                logger.warning("%s: skipping the torn last line %d", path, i)
                continue
            raise UserError(f"{path} line {i} is not JSON ({e}); fix or remove that line") from e
    if not records:
        raise UserError(f"{path} is empty: run dir {run_dir} has no evaluations yet")
    return records


# -- presentation -------------------------------------------------------------------------------------------

def first_ppl_metric(records: list[dict]) -> str | None:
    """The first `ppl/*` metric key in the records, or None."""
    return next((k for r in records for k in r.get("metrics", {}) if k.startswith("ppl/")), None)


def format_value(value: Any) -> str:
    """A compact cell: 4 significant digits for numbers, '-' for missing."""
    if value is None:
        return "-"
    return f"{value:.4g}" if isinstance(value, (int, float)) else str(value)


def stage_rows(records: list[dict], metric: str | None) -> list[dict]:
    """One row per stage: stage, name, target, and per phase: `metric`, measured sparsity, seconds."""
    rows: dict[int, dict] = {}
    for r in records:
        row = rows.setdefault(r["stage"], {"stage": r["stage"], "name": r["name"], "target": r["target"],
                                           "metric": {}, "sparsity": {}, "seconds": {}})
        row["metric"][r["phase"]] = r["metrics"].get(metric) if metric else None
        row["sparsity"][r["phase"]] = r["sparsity"]
        row["seconds"][r["phase"]] = r.get("seconds")
    return [rows[k] for k in sorted(rows)]


def format_stage_table(records: list[dict], metric: str | None = None) -> str:
    """A console table of a run: stage, name, target, measured sparsity, `metric` (default: the first ppl/*)
    after pruning and after fine-tuning, seconds of both phases."""
    metric = metric or first_ppl_metric(records)
    label = metric or "metric"
    header = ["stage", "name", "target", "sparsity", f"{label} pruned", f"{label} finetuned", "seconds"]
    body = []
    for r in stage_rows(records, metric):
        sparsity = r["sparsity"].get("finetuned", r["sparsity"].get("pruned"))
        seconds = [s for s in r["seconds"].values() if s is not None]
        body.append([str(r["stage"]), str(r["name"]), format_value(r["target"]), f"{sparsity:.4f}",
                     format_value(r["metric"].get("pruned")), format_value(r["metric"].get("finetuned")),
                     f"{sum(seconds):.1f}" if seconds else "-"])
    widths = [max(len(row[c]) for row in [header, *body]) for c in range(len(header))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in [header, *body])


def flatten_for_trackers(record: dict) -> dict[str, float]:
    """Numeric values of a record for accelerate trackers: "<phase>/<metric>", "<phase>/sparsity", ..."""
    phase = record["phase"]
    flat = {f"{phase}/sparsity": float(record["sparsity"])}
    if isinstance(record.get("target"), (int, float)):
        flat["target"] = float(record["target"])
    if record.get("seconds") is not None:
        flat[f"{phase}/seconds"] = float(record["seconds"])
    for key, value in record["metrics"].items():
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            flat[f"{phase}/{key}"] = float(value)
    return flat
