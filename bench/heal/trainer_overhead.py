"""Per-step overhead of `SparseMaskCallback` in the transformers Trainer: the same Trainer run with and without it.

Models: the ~5M-parameter Llama of bench/heal/finetune.py ("tiny") and SmolLM2-135M ("smollm2", the offline demo
model), both 70 % magnitude-pruned; AdamW (optim="adamw_torch"), fp32, one process, 1 thread. A step is timed from
the Trainer's `on_step_begin` to `on_step_end` (forward/backward of every accumulation micro-batch with the
gradient hooks, the optimizer step, the post-step enforcement); the first `--warmup` steps are dropped, a run's
step time is the median of the rest. The two arms alternate `--repeats` times; the table shows each arm's best run
(on a shared machine the least disturbed run is the best estimate) and the ratio. Because end-to-end ratios swing
with the load, the work the callback adds is also timed in isolation (best of 20): the gradient hooks' multiplies
over one gradient per masked weight and one post-step `MaskGuard.step()`, as a share of the plain step.

    python bench/heal/trainer_overhead.py [--models tiny,smollm2] [--steps 8] [--repeats 2] [--out results.md]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import tempfile
import time
from datetime import datetime, timezone

import torch
from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainerCallback, TrainingArguments

from sparsegpt.core.architectures import prunable_linears
from sparsegpt.core.masks import MaskSet, keep_mask_of
from sparsegpt.heal.trainer import SparseMaskCallback
from sparsegpt.storage.models import DEMO_MODEL, load_model

SEQLEN = 128
BATCH = {"tiny": (4, 2), "smollm2": (1, 2)}  # micro-batch rows, accumulation steps


def pruned_model(name: str) -> tuple[torch.nn.Module, MaskSet]:
    """The model, its prunable linears magnitude-pruned to 70 %, and the mask of those zeros."""
    torch.manual_seed(0)
    if name == "tiny":
        model = LlamaForCausalLM(LlamaConfig(hidden_size=256, intermediate_size=704, num_hidden_layers=4,
                                             num_attention_heads=8, num_key_value_heads=4, vocab_size=4096,
                                             max_position_embeddings=SEQLEN))
    else:
        model, _ = load_model(DEMO_MODEL, dtype="float32")
    with torch.no_grad():
        for module in prunable_linears(model).values():
            w = module.weight
            w.view(-1)[w.abs().flatten().argsort()[: int(0.7 * w.numel())]] = 0
    return model, MaskSet.from_model(model)


class StepTimer(TrainerCallback):
    """Seconds from on_step_begin to on_step_end of every optimizer step (the same in both arms)."""

    def __init__(self):
        self.seconds: list[float] = []

    def on_step_begin(self, args, state, control, **kwargs):
        self._start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self.seconds.append(time.perf_counter() - self._start)


def run(name: str, guarded: bool, steps: int, warmup: int) -> tuple[float, SparseMaskCallback | None]:
    model, masks = pruned_model(name)
    rows, accum = BATCH[name]
    vocab = model.config.vocab_size
    ids = torch.randint(0, vocab, (rows * accum * steps, SEQLEN), generator=torch.Generator().manual_seed(0))
    timer, guard = StepTimer(), SparseMaskCallback(masks, verify_at_end=False) if guarded else None
    with tempfile.TemporaryDirectory() as out:
        args = TrainingArguments(output_dir=out, max_steps=steps, per_device_train_batch_size=rows,
                                 gradient_accumulation_steps=accum, learning_rate=1e-4, optim="adamw_torch",
                                 save_strategy="no", report_to=[], use_cpu=True, disable_tqdm=True, seed=0,
                                 logging_steps=10_000)
        trainer = Trainer(model=model, args=args, train_dataset=[{"input_ids": r, "labels": r} for r in ids],
                          callbacks=[timer] + ([guard] if guard else []))
        trainer.train()
    return statistics.median(timer.seconds[warmup:]), guard


def isolated_seconds(callback: SparseMaskCallback, reps: int = 20) -> dict[str, float]:
    """Best-of-`reps` seconds of the hooks' multiplies over one gradient per masked weight, and of one guard step."""
    guard = callback.guard
    guard.attach(guard.model, guard.optimizer)  # the run's on_train_end detached it
    grads = [(keep_mask_of(slot.param), torch.randn_like(slot.param)) for slot in guard.enforcer.slots]
    hooks, step = [], []
    for _ in range(reps):
        t0 = time.perf_counter()
        for hook, grad in grads:
            hook(grad)
        hooks.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        guard.step()
        step.append(time.perf_counter() - t0)
    guard.detach()
    return {"hooks": min(hooks), "step": min(step)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="tiny,smollm2")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", default="bench/heal/results_trainer_overhead.md")
    args = parser.parse_args()
    torch.set_num_threads(1)
    os.environ.setdefault("SPARSEGPT_NO_PROGRESS", "1")
    load = [os.getloadavg()[0]]
    rows = []
    for name in args.models.split(","):
        runs = {"plain": [], "callback": []}
        callback = None
        for _ in range(args.repeats):
            for arm in ("plain", "callback"):
                seconds, cb = run(name, arm == "callback", args.steps, args.warmup)
                runs[arm].append(seconds)
                callback = cb or callback
                load.append(os.getloadavg()[0])
        work = isolated_seconds(callback)
        plain, guarded = min(runs["plain"]), min(runs["callback"])
        rows.append({"model": name, "runs": runs, "plain_ms": 1e3 * plain, "callback_ms": 1e3 * guarded,
                     "ratio": guarded / plain, "hooks_ms": 1e3 * work["hooks"], "guard_step_ms": 1e3 * work["step"],
                     "isolated_ratio": 1 + (work["hooks"] + work["step"]) / plain})
        print(json.dumps(rows[-1]))
    cpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    model_name = next((line.split(":", 1)[1].strip() for line in cpu.splitlines() if "Model name" in line), "?")
    lines = ["# SparseMaskCallback overhead — `bench/heal/trainer_overhead.py`", "",
             f"Command: `python bench/heal/trainer_overhead.py --models {args.models} --steps {args.steps} "
             f"--warmup {args.warmup} --repeats {args.repeats}` ({datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC).",
             "", f"Machine: {model_name}, {os.cpu_count()} vCPUs, Python {platform.python_version()}, torch "
             f"{torch.__version__}, 1 thread; load average {min(load):.1f}–{max(load):.1f} during the runs.", "",
             "| model | micro-batch × accumulation × 128 tokens | plain step ms | with callback ms | end-to-end "
             "ratio | hooks ms | guard.step ms | isolated ratio |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        rows_, accum = BATCH[r["model"]]
        lines.append(f"| {r['model']} | {rows_} × {accum} | {r['plain_ms']:.1f} | {r['callback_ms']:.1f} | "
                     f"{r['ratio']:.3f} | {r['hooks_ms']:.2f} | {r['guard_step_ms']:.2f} | {r['isolated_ratio']:.3f} |")
    lines += ["", "Every run's step medians (s): " + json.dumps({r["model"]: r["runs"] for r in rows}), ""]
    with open(args.out, "w") as f:
        f.write("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
