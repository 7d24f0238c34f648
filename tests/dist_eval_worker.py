"""One rank of tests/test_distributed_eval.py: `python -m torch.distributed.run --nproc_per_node 2
tests/dist_eval_worker.py DIR` (CPU, gloo), after `write_text(DIR)`. Writes DIR/rank<r>.json with every case's
result. The test computes the single-process reference from the same `cases()` and hooks in its own process.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from test_evaluation import byte_tokenizer, prune_by_hand, tiny_llama, windows

from sparsegpt.config.hooks import HookContext
from sparsegpt.core.masks import MaskSet
from sparsegpt.core.world import World
from sparsegpt.evaluate import runners as evaluation
from sparsegpt.evaluate.perplexity import distributed_perplexity
from sparsegpt.evaluate.runners import evaluate_hooks

PPL_CASES = {"odd-whole": (5, False), "odd-layerwise": (5, True), "one-whole": (1, False), "one-layerwise": (1, True)}
BAD_SOURCE = [{"type": "perplexity", "source": "no-such-source-xyz"}, {"type": "sparsity"}]


def write_text(folder: Path) -> Path:
    """A small local text source (a file loads in milliseconds; stdlib-docs takes seconds on a busy machine)."""
    path = folder / "text.txt"
    path.write_text("\n\n".join(f"Paragraph {i}: the quick brown fox jumps over {i} lazy dogs." for i in range(40)))
    return path


def good_hooks(folder: Path) -> list[dict]:
    """Perplexity (3 windows over 2 ranks), sparsity, samples."""
    return [{"type": "perplexity", "source": str(folder / "text.txt"), "split": "train", "seqlen": 32,
             "max_windows": 3, "batch_size": 2},
            {"type": "sparsity"},
            {"type": "samples", "prompts": ["def f"], "max_new_tokens": 4}]


def cases():
    """(model, masks, tokenizer, context): the tiny Llama pruned by hand (2:4 / 4:8 patterns)."""
    model = tiny_llama()
    masks = MaskSet(prune_by_hand(model))
    return model, masks, byte_tokenizer(), HookContext(stage=0, name="s", phase="pruned", device="cpu", masks=masks)


def outcome(fn) -> dict:
    """A call's result, or the exception it raised as {"raised": "Type: message"}."""
    try:
        return fn()
    except Exception as e:
        return {"raised": f"{type(e).__name__}: {e}"}


def raising(message: str):
    """A stand-in for a library function that fails with RuntimeError(message)."""
    def fail(*args, **kwargs):
        raise RuntimeError(message)
    return fail


def hooks_result(r) -> dict:
    return {"metrics": r.metrics, "errors": r.errors, "shares": r.shares, "world_size": r.world_size}


def main(out_dir: Path) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    world = World.current()
    model, _, tok, ctx = cases()
    hooks = good_hooks(out_dir)
    record: dict = {"rank": world.rank, "world": world.size, "ppl": {}}
    for name, (n, layerwise) in PPL_CASES.items():
        r = distributed_perplexity(model, windows(n, 16), batch_size=2, device="cpu", layerwise=layerwise)
        record["ppl"][name] = {"value": r.value, "nll": r.nll, "tokens": r.tokens, "windows": r.windows}

    calls = []  # generate_samples calls on this rank: the samples hook must run on rank 0 only
    generate = evaluation.generate_samples
    evaluation.generate_samples = lambda *a, **k: calls.append(1) or generate(*a, **k)
    record["hooks"] = hooks_result(evaluate_hooks(model, tok, hooks, ctx))
    record["samples_calls"] = len(calls)

    record["bad_source"] = hooks_result(evaluate_hooks(model, tok, BAD_SOURCE, ctx))
    record["bad_source_fail_fast"] = outcome(lambda: evaluate_hooks(model, tok, BAD_SOURCE, ctx, fail_fast=True))

    # A failure on rank 1 alone, before perplexity's collective (as a missing file or an OOM on one node would be)
    load = evaluation.eval_ids
    if world.rank == 1:
        evaluation.eval_ids = raising("rank-local failure")
    record["rank1_fails"] = hooks_result(evaluate_hooks(model, tok, hooks[:2], ctx))
    record["rank1_fails_fail_fast"] = outcome(lambda: evaluate_hooks(model, tok, hooks[:2], ctx, fail_fast=True))
    evaluation.eval_ids = load

    # A main-only hook failing on rank 0 under fail_fast: rank 1 must stop too, not run the next hook's collective
    evaluation.generate_samples = raising("generation failed")
    record["main_fails_fail_fast"] = outcome(lambda: evaluate_hooks(model, tok, hooks[::-1], ctx, fail_fast=True))
    record["after"] = hooks_result(evaluate_hooks(model, tok, hooks[:1], ctx))  # the group still works
    (out_dir / f"rank{world.rank}.json").write_text(json.dumps(record))
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
