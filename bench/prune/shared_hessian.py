"""Shared Hessians (one per input group: q/k/v, gate/up) versus one Hessian per linear, as model width grows.

Prunes random-weight Llama-shaped decoders (2 layers, grouped-query attention, MLP 8/3 × hidden) with SparseGPT
through the real driver, once with `shared_hessian=True` and once with False, on the same calibration batch, and
reports the pruning time of each (best of --repeats) and the max weight difference (expected 0: the same math).

    python bench/prune/shared_hessian.py --hidden 576 1024 2048 --tokens 2048 --threads 2
"""

from __future__ import annotations

import argparse
import platform
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from sparsegpt.prune.sequential import PruneConfig, prune_model


def build(hidden: int, layers: int) -> LlamaForCausalLM:
    heads = max(hidden // 64, 4)
    kv_heads = next(d for d in range(max(heads // 3, 1), 0, -1) if heads % d == 0)  # GQA, ~3-4 queries per kv head
    config = LlamaConfig(hidden_size=hidden, intermediate_size=(8 * hidden // 3 + 63) // 64 * 64,
                         num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                         vocab_size=1024, max_position_embeddings=512)
    torch.manual_seed(0)
    return LlamaForCausalLM(config).eval()


def time_prune(hidden: int, layers: int, ids: torch.Tensor, shared: bool, repeats: int) -> tuple[float, dict]:
    best, weights = float("inf"), None
    for _ in range(repeats):
        model = build(hidden, layers)
        t0 = time.perf_counter()
        prune_model(model, ids, PruneConfig(sparsity=0.5, shared_hessian=shared, batch_size=8))
        best = min(best, time.perf_counter() - t0)
        weights = {k: v.clone() for k, v in model.state_dict().items()}
    return best, weights


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, nargs="+", default=[576, 1024, 2048])
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=2048, help="calibration tokens (sequences of 128)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    ids = torch.randint(0, 1024, (args.tokens // 128, 128), generator=torch.Generator().manual_seed(0))
    print(f"# shared vs per-linear Hessians — {platform.processor() or platform.machine()}, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}, {args.layers} layers, {args.tokens} tokens")
    print("| hidden | shared s | per-linear s | per-linear / shared | max abs weight diff |")
    print("|---|---|---|---|---|")
    for hidden in args.hidden:
        shared_s, w_shared = time_prune(hidden, args.layers, ids, True, args.repeats)
        single_s, w_single = time_prune(hidden, args.layers, ids, False, args.repeats)
        diff = max(float((w_shared[k] - w_single[k]).abs().max()) for k in w_shared)
        print(f"| {hidden} | {shared_s:.2f} | {single_s:.2f} | {single_s / shared_s:.2f}x | {diff:.3g} |", flush=True)


if __name__ == "__main__":
    main()
