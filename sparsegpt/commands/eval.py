"""Evaluate a model: perplexity (SparseGPT protocol: non-overlapping windows of the test split, exp of the mean
token NLL), lm-eval tasks, the sparsity report (checked against the folder's mask.safetensors when present)
and greedy samples. Prints the results and writes them as JSON with --out.

Without any of --ppl/--tasks/--sparsity/--samples it measures perplexity on stdlib-docs (offline) and sparsity.

examples:
  sparsegpt eval --model out/s50 --ppl wikitext2,c4 --seqlen 2048
  sparsegpt eval --model smollm2-135m --ppl stdlib-docs --seqlen 256 --max-windows 16 --sparsity --out eval.json
  sparsegpt eval --model out/s80 --tasks arc_easy,hellaswag --limit 200 --batch-size 8 --device cuda
  sparsegpt eval --model out/s80 --tasks my_task --include-path my_tasks/ --samples "The capital of France is"
  sparsegpt eval --model out/l70b-s50 --ppl wikitext2 --layerwise --device cuda   # one layer on the GPU at a time
  torchrun --nproc_per_node 8 -m sparsegpt.cli eval --model out/s80 --ppl wikitext2   # windows split over 8 GPUs
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from sparsegpt.config.hooks import HookContext, validate_hooks
from sparsegpt.core.world import World, joined, rank_device
from sparsegpt.evaluate.runners import run_hooks
from sparsegpt.run.compare import format_value
from sparsegpt.storage.compact import folder_masks
from sparsegpt.storage.models import load_model, resolve_model_path

DEFAULT_PROMPTS = ("The meaning of life is", "def fibonacci(n):", "Paris is the capital of")


def _csv(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def _limit(text: str) -> int | float:
    value = float(text)
    return int(value) if value.is_integer() and value >= 1 else value


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Flags of `sparsegpt eval`."""
    p.add_argument("--model", required=True, help="hub name, local HF folder, GGUF file or alias (smollm2-135m)")
    p.add_argument("--ppl", type=_csv, default=[], metavar="SOURCES",
                   help="comma-separated perplexity sources: wikitext2, c4, ptb, stdlib-docs, a .txt/.jsonl")
    p.add_argument("--seqlen", type=int, help="perplexity window length (default: the model's context, max 2048)")
    p.add_argument("--max-windows", type=int, help="perplexity: evaluate at most this many windows")
    p.add_argument("--batch-size", type=int, default=4, help="windows (perplexity) or requests (lm-eval) per forward")
    p.add_argument("--layerwise", action="store_true",
                   help="perplexity one decoder layer at a time on --device (models larger than the device)")
    p.add_argument("--tasks", type=_csv, default=[], metavar="TASKS", help="comma-separated lm-eval tasks")
    p.add_argument("--include-path", help="folder of extra lm-eval task YAMLs")
    p.add_argument("--limit", type=_limit, help="lm-eval: at most this many documents per task (<1: a fraction)")
    p.add_argument("--num-fewshot", type=int, default=0, help="lm-eval few-shot examples")
    p.add_argument("--sparsity", action="store_true", help="report sparsity and N:M compliance of the linears")
    p.add_argument("--samples", nargs="*", metavar="PROMPT",
                   help="greedy continuations of these prompts (no prompt: a few built-in ones)")
    p.add_argument("--max-new-tokens", type=int, default=32, help="samples: tokens to generate")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="where to evaluate (under torchrun, cuda is each rank's own GPU)")
    p.add_argument("--dtype", default="auto", help="model weight dtype: auto, float32, bfloat16, float16")
    p.add_argument("--out", type=Path, metavar="FILE.json", help="write the results here as JSON")


def hooks_from_args(args: argparse.Namespace) -> list[dict]:
    """The evaluation hooks the flags ask for."""
    ppl, sparsity = args.ppl, args.sparsity
    if not (ppl or args.tasks or sparsity or args.samples is not None):
        ppl, sparsity = ["stdlib-docs"], True
    hooks = [{"type": "perplexity", "source": s, "seqlen": args.seqlen, "max_windows": args.max_windows,
              "batch_size": args.batch_size, "layerwise": args.layerwise} for s in ppl]
    if args.tasks:
        hooks.append({"type": "lm_eval", "tasks": args.tasks, "num_fewshot": args.num_fewshot, "limit": args.limit,
                      "include_path": args.include_path, "batch_size": args.batch_size})
    if sparsity:
        hooks.append({"type": "sparsity"})
    if args.samples is not None:
        hooks.append({"type": "samples", "prompts": args.samples or list(DEFAULT_PROMPTS),
                      "max_new_tokens": args.max_new_tokens})
    return hooks


def run(args: argparse.Namespace) -> int:
    """Join the launch's process group (if any: under torchrun the perplexity windows are split over the ranks,
    each on its own GPU), load the model (and its mask, if saved with one), run the hooks; the main process
    prints and writes the results."""
    with joined() as world:
        return _run(args, world)


def _run(args: argparse.Namespace, world: World) -> int:
    hooks = hooks_from_args(args)
    validate_hooks(hooks)
    masks = folder_masks(resolve_model_path(args.model))
    device = rank_device(args.device, world)
    # straight onto the device (no whole host copy per rank), except for layerwise perplexity, which streams layers
    model, tokenizer = load_model(args.model, dtype=args.dtype, device="cpu" if args.layerwise else device)
    context = HookContext(name="eval", device=device, masks=masks)
    metrics, _ = run_hooks(model, tokenizer, hooks, context, fail_fast=True, world=world)
    if not world.is_main:
        return 0
    for key, value in metrics.items():
        if key == "samples":
            for sample in value:
                print(f"{sample['prompt']!r} -> {sample['completion']!r}")
        else:
            print(f"{key}: {format_value(value)}")
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"model": args.model, "metrics": metrics}, indent=1) + "\n")
        print(f"wrote {args.out}")
    return 0
