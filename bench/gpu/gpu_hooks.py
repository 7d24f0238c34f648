"""Custom eval hooks for `bench/gpu_check.sh`: the CUDA memory peak of the phase that just ended.

In a recipe (with `bench` on PYTHONPATH):

    eval:
      hooks:
        - {type: custom, path: "gpu_hooks:cuda_peak", name: cuda}     # first in the list: see below
      phases: [pruned, finetuned]

Called as `fn(model, tokenizer, *, context, **args)` (sparsegpt.evaluate.runners), it returns
`torch.cuda.max_memory_allocated()` (and reserved / currently allocated) in GiB since the previous reset, then
resets the peak. Placed first among a stage's hooks, the `pruned` reading covers this stage's prune (plus the
previous stage's remaining finetuned-phase hooks), the `finetuned` reading covers this stage's remaining
pruned-phase hooks plus its fine-tuning. Each reading is also printed as one `GPU_PEAK ...` line on stdout, so the
script can collect it without reading metrics.jsonl. Without CUDA it returns {"cuda": 0.0} and prints nothing.
"""

from __future__ import annotations

import torch

GIB = 2**30


def cuda_peak(model, tokenizer, *, context, reset: bool = True) -> dict:
    """Peak / reserved / allocated CUDA memory (GiB) since the last reset; resets the peak when `reset`."""
    del model, tokenizer
    if not torch.cuda.is_available():
        return {"cuda": 0.0}
    torch.cuda.synchronize()
    out = {"max_allocated_gib": torch.cuda.max_memory_allocated() / GIB,
           "max_reserved_gib": torch.cuda.max_memory_reserved() / GIB,
           "allocated_gib": torch.cuda.memory_allocated() / GIB}
    print(f"GPU_PEAK stage={context.stage} name={context.name} phase={context.phase} "
          + " ".join(f"{k}={v:.3f}" for k, v in out.items()), flush=True)
    if reset:
        torch.cuda.reset_peak_memory_stats()
    return out
