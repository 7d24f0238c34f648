"""bf16 autocast vs fp32 on this machine: training and evaluation tokens/s, and the loss both give on the same data.

    python bench/heal/precision.py --steps 3 --micro-batch 1 --threads 1
    python bench/heal/precision.py --steps 3 --micro-batch 4 --threads 2 --modes fp32     # micro-batch throughput only

SmolLM2-135M (the offline demo model), stdlib-docs train windows of 128 tokens in a fixed order, AdamW lr 1e-4;
fp32 and bf16 autocast (torch.autocast on the CPU, weights and optimizer in fp32 as accelerate does) start from
the same weights and see the same batches. Prints the CPU's bf16 flags (sparsegpt.core.precision), per-step losses,
tokens/s of training steps and of evaluation forwards, and what `mixed_precision: auto` picks here.

--prune-forwards times what SparseGPT's sequential pass spends outside the solver: each decoder layer's forward
over the calibration rows, in the model's dtype (a recipe's `dtype: bfloat16` runs them in bf16; the Hessians and
the solver stay float32/float64 either way). It reports layer-forward tokens/s in float32 and bfloat16 and how far
the bf16 layer outputs are from the float32 ones (relative Frobenius error per layer, the input each layer's
Hessian is built from).
"""

from __future__ import annotations

import argparse
import platform
import time
from dataclasses import replace

import torch

from sparsegpt.core.data import train_ids
from sparsegpt.core.precision import CPU_BF16_FLAGS, cpu_flags, resolve_mixed_precision
from sparsegpt.prune.capture import capture_layer_inputs, forward_layer
from sparsegpt.storage.models import load_model


def run(mode: str, ids: torch.Tensor, steps: int, micro_batch: int) -> tuple[list[float], float, float]:
    torch.manual_seed(0)
    model, _ = load_model("smollm2-135m", dtype="float32")
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    losses, start = [], None
    for step in range(steps + 1):  # step 0 warms up and is not timed
        if step == 1:
            start = time.perf_counter()
        batch = ids[step * micro_batch:(step + 1) * micro_batch]
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=mode == "bf16"):
            loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    train_tps = steps * micro_batch * ids.shape[1] / (time.perf_counter() - start)
    model.eval()
    batch = ids[-micro_batch:]
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=mode == "bf16"):
        model(input_ids=batch)
        start = time.perf_counter()
        model(input_ids=batch)
    eval_tps = micro_batch * ids.shape[1] / (time.perf_counter() - start)
    return losses, train_tps, eval_tps


def prune_forwards(ids: torch.Tensor, repeats: int = 2) -> None:
    """Per-layer forwards of calibration rows (one batch of ids' rows) in float32 and bfloat16 weights, as the
    sequential pass runs them (sparsegpt.prune.capture: each layer called with its own captured arguments, its input the
    previous layer's output in the same dtype)."""
    model, _ = load_model("smollm2-135m", dtype="float32")
    model.eval()
    layers = model.model.layers
    results = {}
    for dtype in (torch.float32, torch.bfloat16):
        model.to(dtype)
        with torch.no_grad():
            [batch] = capture_layer_inputs(model, layers, ids, batch_size=len(ids), store_device="cpu")
            outputs, seconds = [], 0.0
            for index, layer in enumerate(layers):
                forward_layer(layer, index, batch, "cpu")  # warm-up, untimed
                start = time.perf_counter()
                for _ in range(repeats):
                    hidden = forward_layer(layer, index, batch, "cpu")
                seconds += (time.perf_counter() - start) / repeats
                batch = replace(batch, hidden=hidden)
                outputs.append(hidden.float())
        results[dtype] = (outputs, seconds)
    tokens = ids.numel() * len(layers)
    fp32, bf16 = results[torch.float32], results[torch.bfloat16]
    errors = [float((b - a).norm() / a.norm()) for a, b in zip(fp32[0], bf16[0])]
    print(f"layer forwards, {ids.shape[0]} x {ids.shape[1]} calibration tokens x {len(errors)} layers: "
          f"float32 {tokens / fp32[1]:.0f} tok/s ({fp32[1]:.2f} s), bfloat16 {tokens / bf16[1]:.0f} tok/s "
          f"({bf16[1]:.2f} s), bf16 / fp32 speed {fp32[1] / bf16[1]:.3f}x")
    print(f"bf16 layer outputs vs float32: relative error first layer {errors[0]:.4f}, median "
          f"{sorted(errors)[len(errors) // 2]:.4f}, last layer {errors[-1]:.4f}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--micro-batch", type=int, default=1)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--modes", default="fp32,bf16", help="comma-separated: fp32, bf16")
    p.add_argument("--prune-forwards", action="store_true",
                   help="time pruning's per-layer calibration forwards (float32 vs bfloat16 weights) instead")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    _, tokenizer = load_model("smollm2-135m", dtype="float32")
    ids = train_ids("stdlib-docs", tokenizer, seqlen=128)[: (args.steps + 2) * args.micro_batch]
    flags = [f for f in CPU_BF16_FLAGS if f in cpu_flags()]
    print(f"machine: {platform.processor() or platform.machine()}, bf16 flags: {flags or 'none'}, "
          f"threads {args.threads}, torch {torch.__version__}; auto picks {resolve_mixed_precision('auto', 'float32')}")
    if args.prune_forwards:
        prune_forwards(ids[: args.micro_batch])
        return
    results = {mode: run(mode, ids, args.steps, args.micro_batch) for mode in args.modes.split(",")}
    for mode, (losses, train_tps, eval_tps) in results.items():
        print(f"{mode}: micro-batch {args.micro_batch} x 128, train {train_tps:.1f} tok/s, eval {eval_tps:.1f} tok/s, "
              f"losses {[round(x, 4) for x in losses]}")
    if len(results) < 2:
        return
    diff = max(abs(a - b) for a, b in zip(results["fp32"][0], results["bf16"][0]))
    print(f"max |loss fp32 - loss bf16| over {args.steps + 1} steps: {diff:.4f}; "
          f"bf16 / fp32 train speed {results['bf16'][1] / results['fp32'][1]:.3f}x")


if __name__ == "__main__":
    main()
