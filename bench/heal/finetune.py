"""Cost of mask enforcement: step time and tokens/s of `sparsegpt.heal.finetune` with enforcement off ("none"), gradient
hooks only, post-step re-zeroing only, and both ("full"), single process and 2-process DeepSpeed ZeRO-2 / ZeRO-3
on CPU. A ~5M-parameter Llama, 70 % magnitude-pruned; each (backend, mode) runs `--repeats` times, interleaved
with the other modes; a run's step time is the median of its timed steps (the first `--warmup` are dropped) and
the table shows the best run per mode: on a shared machine the least-disturbed run is the best estimate.

    python bench/heal/finetune.py [--backends single,zero2,zero3] [--steps 12] [--repeats 2] [--out results.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from accelerate import Accelerator
from transformers import LlamaConfig, LlamaForCausalLM

from sparsegpt.core.architectures import prunable_linears
from sparsegpt.core.masks import MaskSet
from sparsegpt.heal.config import FinetuneConfig
from sparsegpt.heal.dsconfig import cpu_deepspeed_handlers
from sparsegpt.heal.enforce import MaskEnforcer
from sparsegpt.heal.finetune import finetune

REPO = Path(__file__).resolve().parents[2]
MODES = ("none", "hooks", "step", "full")
SEQLEN, MICRO_BATCH = 128, 4


def _model_and_masks():
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=256, intermediate_size=704, num_hidden_layers=4, num_attention_heads=8,
                         num_key_value_heads=4, vocab_size=4096, max_position_embeddings=SEQLEN)
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        for module in prunable_linears(model).values():
            w = module.weight
            w.view(-1)[w.abs().flatten().argsort()[: int(0.7 * w.numel())]] = 0
    return model, MaskSet.from_model(model)


def run_modes(steps: int, repeats: int, warmup: int) -> dict:
    """Every mode `repeats` times in this process (all ranks of a launch): median timed step seconds per mode."""
    accelerator = Accelerator(kwargs_handlers=cpu_deepspeed_handlers())
    ids = torch.randint(0, 4096, (256, SEQLEN), generator=torch.Generator().manual_seed(0))
    runs: dict[str, list[float]] = {mode: [] for mode in MODES}  # per run: median timed step seconds
    for _ in range(repeats):
        for mode in MODES:
            model, masks = _model_and_masks()
            cfg = FinetuneConfig(steps=steps, lr=1e-4, micro_batch_size=MICRO_BATCH, seed=0, mask_enforcement=mode)
            result = finetune(model, ids, masks, cfg, accelerator=accelerator)
            runs[mode].append(statistics.median(result.step_seconds[warmup:]))
            accelerator.free_memory()
    tokens = MICRO_BATCH * SEQLEN * accelerator.num_processes
    return {"processes": accelerator.num_processes, "main": accelerator.is_main_process,
            "modes": {m: {"step_s": min(r), "tokens_per_s": tokens / min(r), "runs_step_s": r}
                      for m, r in runs.items()}}


def direct_costs(repeats: int = 20) -> dict:
    """Noise-resistant cost of the enforcement work itself on this model (best of `repeats`, one thread): the
    hooks' multiplies over all masked gradients, and one post-step MaskEnforcer call (weights + both moments)."""
    model, masks = _model_and_masks()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    ids = torch.randint(0, 4096, (MICRO_BATCH, SEQLEN), generator=torch.Generator().manual_seed(0))
    model(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()
    enforcer = MaskEnforcer(model, masks, optimizer)
    grads = [(slot.param.grad, slot.mask) for slot in enforcer.slots]  # the gradient hooks (KeepMask)

    def best(fn) -> float:
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return min(times)

    return {"hooks_s": best(lambda: [hook(g) for g, hook in grads]), "enforcer_s": best(enforcer)}


def _launch(backend: str, args: argparse.Namespace, out: Path) -> dict:
    """The same measurement in 2 DeepSpeed processes launched with recipes/accelerate/{backend}.yaml."""
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1",
           "SPARSEGPT_NO_PROGRESS": "1", "PYTHONWARNINGS": "ignore"}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", f"recipes/accelerate/{backend}.yaml",
           "--num_processes", "2", "--mixed_precision", "no", "--main_process_port", "29601", __file__, "--worker",
           str(out), "--steps", str(args.steps), "--repeats", str(args.repeats), "--warmup", str(args.warmup)]
    subprocess.run(cmd, cwd=REPO, env=env, check=True, capture_output=True)
    return json.loads(out.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backends", default="single,zero2,zero3")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--warmup", type=int, default=2, help="untimed first steps of each run")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", type=Path, help="also write the results as JSON")
    parser.add_argument("--worker", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker is not None:
        torch.set_num_threads(1)
        result = run_modes(args.steps, args.repeats, args.warmup)
        if result["main"]:
            args.worker.write_text(json.dumps(result))
        return
    os.environ.setdefault("SPARSEGPT_NO_PROGRESS", "1")
    torch.set_num_threads(1)  # like each DeepSpeed process: threads fighting over a shared box only add noise
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for backend in args.backends.split(","):
            t0 = time.time()
            results[backend] = (run_modes(args.steps, args.repeats, args.warmup) if backend == "single"
                                else _launch(backend, args, Path(tmp) / f"{backend}.json"))
            print(f"{backend}: {time.time() - t0:.0f}s wall", file=sys.stderr)
    print(f"machine: {platform.node()} {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
          f"torch {torch.__version__}, load average {os.getloadavg()[0]:.1f}, {time.strftime('%Y-%m-%d')}")
    costs = direct_costs()
    none_single = results["single"]["modes"]["none"]["step_s"] if "single" in results else float("nan")
    print(f"enforcement work per step, single process (best of 20): hooks {1000 * costs['hooks_s']:.2f} ms + "
          f"post-step {1000 * costs['enforcer_s']:.2f} ms = "
          f"{100 * (costs['hooks_s'] + costs['enforcer_s']) / none_single:.1f} % of the median unenforced step")
    print("| backend | processes | " + " | ".join(f"{m} step ms" for m in MODES) + " | full tok/s | full overhead |")
    print("|---|---|" + "---|" * len(MODES) + "---|---|")
    for backend, r in results.items():
        step = {m: r["modes"][m]["step_s"] for m in MODES}
        overhead = step["full"] / step["none"] - 1
        print(f"| {backend} | {r['processes']} | " + " | ".join(f"{1000 * step[m]:.1f}" for m in MODES)
              + f" | {r['modes']['full']['tokens_per_s']:.0f} | {100 * overhead:+.1f} % |")
    if args.out is not None:
        args.out.write_text(json.dumps({"backends": results, "direct_single": costs}, indent=1))


if __name__ == "__main__":
    main()
