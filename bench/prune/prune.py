"""Pruning benchmark: time, peak memory and perplexity for methods × targets, plus shared vs per-linear Hessians.

Each run (and the dense reference) is a fresh child process, so its peak RSS (ru_maxrss) and CUDA max
allocated memory are its own: load + calibration + pruning (perplexity is measured afterwards and not counted).
All runs use the same calibration sample; perplexity is on the validation split of --eval-source.
Writes a Markdown report (and optionally JSON with per-layer seconds).

example (what bench/prune/results_prune.md was made with; see its header for the exact command):
  python bench/prune/prune.py --model smollm2-135m --methods sparsegpt wanda magnitude --targets 0.5 0.7 0.9 2:4 \\
      --nsamples 16 --seqlen 128 --eval-windows 16 --threads 1 --out bench/prune/results_prune.md

--distributed: the same SparseGPT pass in 1 process and in 2 (torchrun, gloo, one thread each), wall time, each
rank's forward / communication / solve / propagate seconds and the agreement of the two results; the cost of
float64 Hessian sums; and, from the measured per-phase rates, the projected time of OPT-13B on 1 and 8 GPUs
(`A100` and `OPT13B` below are the assumptions; the report states them):
  python bench/prune/prune.py --distributed --model smollm2-135m --targets 0.5 --nsamples 16 --seqlen 128 \\
      --out bench/prune/results_distributed_prune.md
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import os
import platform
import resource
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from sparsegpt.core.architectures import decoder_layers, family_of
from sparsegpt.core.data import calibration_ids, eval_ids
from sparsegpt.core.world import init_from_env
from sparsegpt.evaluate.runners import perplexity
from sparsegpt.prune.distributed import balance, solve_cost
from sparsegpt.prune.sequential import PruneConfig, prune_model
from sparsegpt.storage.models import DEMO_MODEL, load_model

log = logging.getLogger("bench.prune")


def parse_target(text: str) -> tuple[float, int, int]:
    """'0.7' -> (0.7, 0, 0); '2:4' -> (0.5, 2, 4)."""
    if ":" in text:
        n, m = (int(x) for x in text.split(":"))
        return n / m, n, m
    return float(text), 0, 0


def peak_rss_mb() -> float:
    """This process's peak resident set size so far (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def machine() -> dict:
    """CPU model, core count, GPU (if any), versions."""
    lscpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines()
    import transformers

    return {"cpu": next((line.split(":", 1)[1].strip() for line in lscpu if line.startswith("Model name")), "?"),
            "cores": os.cpu_count(), "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
            "python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__}


def child(args, method: str, target: str, hessian: str, weights_out: str) -> dict:
    """One run in this (fresh) process: load, calibrate, prune (unless dense), measure, then perplexity."""
    model, tokenizer = load_model(args.model, dtype=args.dtype, device="cpu")
    calib = calibration_ids(args.calib, tokenizer, nsamples=args.nsamples, seqlen=args.seqlen, seed=args.seed)
    row = {"method": method, "target": target, "hessian": hessian}
    if method != "dense":
        sparsity, n, m = parse_target(target)
        cfg = PruneConfig(method=method, sparsity=sparsity, prune_n=n, prune_m=m, batch_size=args.batch_size,
                          shared_hessian=hessian == "shared")
        result = prune_model(model, calib, cfg, device=args.device)
        row.update(sparsity=result.masks.sparsity(), seconds=result.seconds, layer_seconds=result.layer_seconds,
                   error_sum=sum(s["error"] for s in result.stats))
        if weights_out:
            torch.save(decoder_layers(model).state_dict(), weights_out)
    row.update(peak_rss_mb=peak_rss_mb(),
               peak_cuda_mb=torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None)
    if args.eval_windows:
        evals = eval_ids(args.eval_source, tokenizer, seqlen=args.eval_seqlen or args.seqlen, split="validation",
                         max_windows=args.eval_windows)
        row["ppl"] = perplexity(model, evals, batch_size=args.batch_size, device=args.device)
    return row


def spawn(argv: list[str], method: str, target: str, hessian: str = "shared", weights_out: str = "") -> dict:
    """Run `child` in a new process with the same flags; its last stdout line is the JSON row."""
    cmd = [sys.executable, __file__, *argv, "--child", method, target, hessian, weights_out]
    done = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, check=True)
    row = json.loads(done.stdout.strip().splitlines()[-1])
    log.info("%s %s (%s): sparsity %s, %s s, ppl %s, peak RSS %.0f MB", method, target, hessian,
             row.get("sparsity"), row.get("seconds"), row.get("ppl"), row["peak_rss_mb"])
    return row


HEADER = ["| method | target | measured sparsity | ppl | prune s | s/layer mean | s/layer max | peak RSS MB "
          "| peak CUDA MB | Σ recon. error |", "|---|---|---|---|---|---|---|---|---|---|"]


def fmt(x, spec=".2f") -> str:
    return "–" if x is None else format(x, spec)


def table_row(r: dict) -> str:
    per_layer = r.get("layer_seconds") or [None]
    mean = None if per_layer[0] is None else sum(per_layer) / len(per_layer)
    method = r["method"] + (" (per-linear H)" if r["hessian"] == "per-linear" else "")
    return (f"| {method} | {r['target']} | {fmt(r.get('sparsity'), '.4f')} | {fmt(r.get('ppl'))} | "
            f"{fmt(r.get('seconds'), '.1f')} | {fmt(mean)} | {fmt(max(per_layer) if mean is not None else None)} | "
            f"{r['peak_rss_mb']:.0f} | {fmt(r['peak_cuda_mb'], '.0f')} | {fmt(r.get('error_sum'), '.4g')} |")


def report(args, argv, info, started, loads, rows, hessian_rows, max_diff) -> str:
    """The Markdown report."""
    lines = [
        "# Pruning benchmark", "",
        f"- date: {started:%Y-%m-%d %H:%M} UTC; machine: {info['cpu']}, {info['cores']} cores"
        + (f", GPU {info['gpu']}" if info["gpu"] else "") + f"; torch threads: {torch.get_num_threads()}",
        f"- load average (1 / 5 / 15 min) at start {' / '.join(f'{x:.1f}' for x in loads[0])}, at end "
        f"{' / '.join(f'{x:.1f}' for x in loads[1])}: the machine was shared with other jobs, so times are upper "
        "bounds",
        f"- python {info['python']}, torch {info['torch']}, transformers {info['transformers']}",
        f"- model `{args.model}` ({args.dtype}); calibration {args.calib}: {args.nsamples} × {args.seqlen} tokens, "
        f"batch {args.batch_size}, device {args.device}; perplexity: {args.eval_source} validation, "
        f"{args.eval_windows} windows × {args.eval_seqlen or args.seqlen} tokens",
        "- peak RSS / CUDA: the child process's peak through load + calibration + pruning (dense: without pruning); "
        "on CPU it includes what glibc keeps after freeing the solver's temporaries, not only live tensors",
        f"- command: `python bench/prune/prune.py {' '.join(argv)}`", "",
        *HEADER, *map(table_row, rows),
    ]
    if hessian_rows:
        lines += ["", f"## Shared vs per-linear Hessians (sparsegpt, target {hessian_rows[0]['target']})", "",
                  *HEADER, *map(table_row, hessian_rows), "",
                  f"max |ΔW| between the two: {max_diff:.3g}"]
    return "\n".join(lines) + "\n"


# -- --distributed: the cost model of one decoder layer and its projection ------------------------------------------
A100 = {  # the GPU the projection assumes (A100 SXM 80 GB in a DGX / HGX with NVSwitch)
    "fp32_flops": 19.5e12,      # peak FP32 (no TF32: torch's default for matmul): the solver
    "fp64_flops": 19.5e12,      # peak FP64 tensor cores: the Hessian sums (accumulated in float64)
    "fp16_flops": 312e12,       # peak FP16 tensor cores: the layer forwards of an fp16 model
    "dense_efficiency": 0.8,    # a large GEMM reaches ~80 % of peak (cuBLAS); the CPU's large GEMM is its 100 %
    "op_seconds": 8e-6,         # one eager PyTorch op on CUDA (launch + Python), for the column loop's small ops
    "ops_per_column": 6,        # where, div, masked_fill, outer, sub, err copy: solver.prune_group_with_factor
    "busbw": 230e9,             # NCCL all-reduce / broadcast bus bandwidth over NVLink + NVSwitch, bytes/s
    "latency": 30e-6,           # per collective
    "pcie": 20e9,               # host <-> GPU bytes/s: each layer is moved to the GPU and back (model on the host)
}
OPT13B = {"layers": 40, "hidden": 5120, "ffn": 20480, "nsamples": 128, "seqlen": 2048, "weight_bytes": 2}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _best_seconds(fn, reps: int = 3) -> float:
    fn()
    best = float("inf")
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def cpu_rates() -> dict:
    """This CPU's large float32 and float64 GEMM rates (one thread): the 100 % the measured phases are expressed
    against (the float64 Hessian sums against the float64 one)."""
    a, b = torch.randn(1024, 1024), torch.randn(1024, 1024)
    a64, b64 = a.double(), b.double()
    return {"gemm_flops": 2 * 1024**3 / _best_seconds(lambda: a @ b),
            "gemm64_flops": 2 * 1024**3 / _best_seconds(lambda: a64 @ b64)}


def accumulate_costs(cols: list[int], tokens: int) -> list[dict]:
    """Seconds of one Σxxᵀ over `tokens` rows (`H.addmm_(x.t(), x)`, as the driver's hook) in float32 and float64."""
    rows = []
    for c in sorted(set(cols)):
        x32 = torch.randn(tokens, c)
        x64, h32, h64 = x32.double(), torch.zeros(c, c), torch.zeros(c, c, dtype=torch.float64)
        rows.append({"cols": c, "tokens": tokens, "float32_s": _best_seconds(lambda: h32.addmm_(x32.t(), x32)),
                     "float64_s": _best_seconds(lambda: h64.addmm_(x64.t(), x64))})
    return rows


def layer_flops(linears: list[tuple[int, int]], groups: list[list[int]], tokens: int, seqlen: int, hidden: int,
                blocksize: int = 128) -> dict:
    """FLOPs of one decoder layer's phases: forward (linears + attention scores and values), Hessian sums, and per
    group the solve (factor 4/3·c³; per linear the lazy and in-block updates and the float64 error, 3·r·c² + r·c·B)."""
    solve = [4 / 3 * linears[g[0]][1] ** 3 + sum(3 * r * c * c + r * c * blocksize for r, c in (linears[i] for i in g))
             for g in groups]
    return {"forward": 2 * tokens * sum(r * c for r, c in linears) + 4 * tokens * seqlen * hidden,
            "hessian": [2 * tokens * linears[g[0]][1] ** 2 for g in groups], "solve": solve,
            "columns": [linears[g[0]][1] for g in groups]}


def measured_layers(row: dict) -> tuple[list[tuple[int, int]], list[list[int]]]:
    """Layer 0's (rows, cols) per pruned linear and its input groups (the family's shared inputs), from a run."""
    prefix = f"{row['layers_path']}.0."
    names = [n for n in row["shapes"] if n.startswith(prefix)]
    groups, seen = [], set()
    for members in row["shared_inputs"]:
        group = [names.index(prefix + m) for m in members if prefix + m in names]
        if group:
            groups.append(group)
            seen.update(group)
    return [tuple(row["shapes"][n]) for n in names], groups + [[i] for i in range(len(names)) if i not in seen]


def measured_costs(one: dict, tokens: int, seqlen: int, rates: dict, acc: list[dict]) -> dict:
    """Each phase's efficiency on this CPU (achieved FLOP/s over the CPU's large-GEMM rate), from the 1-process run."""
    linears, groups = measured_layers(one)
    flops = layer_flops(linears, groups, tokens, seqlen, one["hidden"])
    layers = len(one["layer_seconds"])
    sec = one["world"]["ranks"][0]["seconds"]
    per_c = {a["cols"]: a["float64_s"] for a in acc}  # the driver sums in float64
    hessian_s = sum(per_c[c] for c in flops["columns"]) * layers  # measured on the same shapes and token count
    hessian32_s = sum(next(a["float32_s"] for a in acc if a["cols"] == c) for c in flops["columns"]) * layers
    gemm = rates["gemm_flops"]
    solve_flops, columns = sum(flops["solve"]) * layers, sum(flops["columns"]) * layers
    return {"linears": linears, "groups": groups, "flops": flops, "layers": layers,
            "hessian_s": hessian_s, "forward_only_s": sec["forward"] - hessian_s, "hessian32_s": hessian32_s,
            "solve_gemm_s": solve_flops / gemm, "column_s": (sec["solve"] - solve_flops / gemm) / columns,
            "eff": {"hessian": sum(flops["hessian"]) * layers / hessian_s / rates["gemm64_flops"],
                    "forward": flops["forward"] * layers / (sec["forward"] - hessian_s) / gemm,
                    "propagate": flops["forward"] * (layers - 1) / sec["propagate"] / gemm,
                    "solve": sum(flops["solve"]) * layers / sec["solve"] / gemm}}


def critical_solve(seconds: list[float], shapes: list[list[tuple[int, int]]], ranks: int) -> float:
    """The slowest rank's solve seconds when the driver assigns the groups (`balance` over `solve_cost`)."""
    owners = balance([solve_cost(s) for s in shapes], ranks)
    return max(sum(t for t, o in zip(seconds, owners) if o == r) for r in range(ranks))


def project_layer(flops: dict, eff: dict, ranks: int, layer_bytes: int, linear_bytes: list[int],
                  shapes: list[list[tuple[int, int]]]) -> dict:
    """Seconds of one layer on `ranks` A100s: forward + Hessians on 1/ranks of the tokens, all-reduce, the slowest
    rank's solves (the driver's assignment), broadcasts, propagation, and the layer's trip to the GPU and back."""
    g, dense = A100, A100["dense_efficiency"]
    fp16, fp32 = g["fp16_flops"] * dense, g["fp32_flops"] * dense
    solve = [f / fp32 + g["ops_per_column"] * c * g["op_seconds"] for f, c in zip(flops["solve"], flops["columns"])]
    comm = 0.0
    if ranks > 1:
        hessian_bytes = sum(8 * c * c for c in flops["columns"])  # float64 sums
        comm = (2 * (ranks - 1) / ranks * hessian_bytes + sum(linear_bytes) * 1.5) / g["busbw"] \
            + g["latency"] * (len(solve) + 2 * len(linear_bytes) + 2)   # weights + uint8 masks, one gather
    return {"forward": flops["forward"] / ranks / (eff["forward"] * fp16),
            "hessian": sum(flops["hessian"]) / ranks / (eff["hessian"] * g["fp64_flops"] * dense),
            "communication": comm, "solve": critical_solve(solve, shapes, ranks),
            "propagate": flops["forward"] / ranks / (eff["propagate"] * fp16),
            "host_transfer": 2 * layer_bytes / g["pcie"]}


def project(costs: dict) -> dict:
    """OPT-13B (q/k/v share one Hessian; out, fc1, fc2 alone) on 1 and 8 A100s, per layer and in total."""
    h, f, o = OPT13B["hidden"], OPT13B["ffn"], OPT13B
    linears, groups = [(h, h), (h, h), (h, h), (h, h), (f, h), (h, f)], [[0, 1, 2], [3], [4], [5]]
    flops = layer_flops(linears, groups, o["nsamples"] * o["seqlen"], o["seqlen"], h)
    weights = [r * c * o["weight_bytes"] for r, c in linears]
    shapes = [[linears[i] for i in g] for g in groups]
    out = {}
    for ranks in (1, 8):
        layer = project_layer(flops, costs["eff"], ranks, sum(weights), weights, shapes)
        out[ranks] = {"layer": layer, "total_s": sum(layer.values()) * o["layers"]}
    return out


def projection_lines(rates: dict, costs: dict, proj: dict, one: dict, two: dict) -> list[str]:
    """The report's cost-model section: measured efficiencies, the 2-process check, the OPT-13B table."""
    eff, flops = costs["eff"], costs["flops"]
    per_linear = {s["name"]: s["seconds"] for s in one["stats"]}
    names = list(one["shapes"])
    by_layer = [[n for n in names if n.startswith(f"{one['layers_path']}.{i}.")] for i in range(costs["layers"])]
    group_s = [[sum(per_linear[layer[i]] for i in g) for g in costs["groups"]] for layer in by_layer]
    shapes = [[costs["linears"][i] for i in g] for g in costs["groups"]]
    critical = sum(critical_solve(t, shapes, 2) for t in group_s)
    sec = one["world"]["ranks"][0]["seconds"]
    predicted = (sec["forward"] + sec["propagate"]) / 2 + critical
    p1, p8 = proj[1], proj[8]
    phases = ("forward", "hessian", "communication", "solve", "propagate", "host_transfer")
    return [
        "## Cost model", "",
        f"Measured on this CPU (1 process, one thread): large float32 GEMM {rates['gemm_flops'] / 1e9:.1f} GFLOP/s, "
        f"float64 {rates['gemm64_flops'] / 1e9:.1f} GFLOP/s (the reference of the float64 Hessian sums). "
        "Each phase's efficiency = its achieved FLOP/s over that rate (FLOPs counted by `layer_flops`: forward "
        "2·tokens·Σrows·cols + 4·tokens·seqlen·hidden; Hessians 2·tokens·cols² per input group; solve 4/3·cols³ "
        "per group + 3·rows·cols² + rows·cols·128 per linear):", "",
        "| phase | measured s (all layers) | efficiency vs large GEMM |", "|---|---|---|",
        f"| Hessian sums in float64 (Σxxᵀ, from the timing above on the same shapes; float32 would take "
        f"{costs['hessian32_s']:.1f} s) | {costs['hessian_s']:.1f} | {eff['hessian']:.2f} |",
        f"| layer forwards while accumulating (forward − Hessian sums) | {costs['forward_only_s']:.1f} | "
        f"{eff['forward']:.2f} |",
        f"| propagation through the pruned layer | {sec['propagate']:.1f} | {eff['propagate']:.2f} |",
        f"| solves (factor, column loop, lazy updates, error) | {sec['solve']:.1f} | {eff['solve']:.2f} |", "",
        f"The solves' FLOPs at the large-GEMM rate would take {costs['solve_gemm_s']:.1f} s; the rest, "
        f"{costs['column_s'] * 1e6:.0f} µs per column, is the column loop's small ops (rows × ≤128 each).", "",
        f"Per layer here: forward FLOPs {flops['forward'] / 1e9:.2f} G, Hessian {sum(flops['hessian']) / 1e9:.2f} G, "
        f"solve {sum(flops['solve']) / 1e9:.2f} G.", "",
        "Check of the model on the measured 2-process run: half of the forwards and propagation per rank, plus per "
        "layer the slower rank's solves as the driver assigns them (the 1-process run's per-group seconds) predicts "
        f"{predicted:.1f} s; measured {two['seconds']:.1f} s (both ranks share 2 busy cores with other jobs).", "",
        "### OPT-13B, 128 × 2048 calibration tokens, fp16 weights, on A100s", "",
        "Assumptions: the forwards, propagation and Hessian sums run at the efficiency measured above, relative to "
        f"{A100['dense_efficiency']:.0%} of the A100's peak (FP16 tensor cores {A100['fp16_flops'] / 1e12:.0f} "
        f"TFLOP/s for the forwards of the fp16 model, FP64 tensor cores {A100['fp64_flops'] / 1e12:.1f} TFLOP/s for "
        f"the float64 Hessian sums); the solves' FLOPs run at {A100['dense_efficiency']:.0%} of FP32 "
        f"{A100['fp32_flops'] / 1e12:.1f} TFLOP/s (float32, no TF32) and their "
        f"column loop costs {A100['ops_per_column']} eager ops × {A100['op_seconds'] * 1e6:.0f} µs per column "
        "(launch-bound on a GPU: each op touches ≤ rows × 128 floats); "
        f"all-reduce of the float64 Hessian sums (3 × 5120² + 20480² doubles = "
        f"{sum(8 * c * c for c in [5120, 5120, 5120, 20480]) / 1e9:.2f} GB per layer) as a ring, "
        f"2·(N−1)/N · bytes at {A100['busbw'] / 1e9:.0f} GB/s NVLink bus bandwidth, plus the broadcasts of the "
        f"pruned fp16 weights and uint8 masks, {A100['latency'] * 1e6:.0f} µs per collective; each layer moves to "
        f"the GPU and back at {A100['pcie'] / 1e9:.0f} GB/s (the model stays in host memory); calibration "
        "activations stay on the GPU; the OWL pass and loading/saving are not counted.", "",
        "| per layer, seconds | " + " | ".join(phases) + " | layer | 40 layers |",
        "|---|" + "---|" * (len(phases) + 2),
        *[f"| {n} GPU{'s' if n > 1 else ''} | " + " | ".join(f"{p['layer'][k]:.2f}" for k in phases)
          + f" | {sum(p['layer'].values()):.2f} | {p['total_s'] / 60:.1f} min |" for n, p in ((1, p1), (8, p8))], "",
        f"Projected speed-up on 8 GPUs: {p1['total_s'] / p8['total_s']:.1f}×. Beyond the forwards and Hessian sums "
        "(split 8 ways), a layer waits for its slowest solve: fc2 (20480 columns) on one rank, since a layer has "
        "only 4 input groups; the all-reduce and broadcasts stay small next to it.",
    ]


def dist_child(args, out: str) -> None:
    """One rank of the --distributed runs (a world of one without torchrun): prune; rank 0 writes out.json/out.pt."""
    world = init_from_env()
    model, tokenizer = load_model(args.model, dtype=args.dtype, device="cpu")
    calib = calibration_ids(args.calib, tokenizer, nsamples=args.nsamples, seqlen=args.seqlen, seed=args.seed)
    sparsity, n, m = parse_target(args.targets[0])
    cfg = PruneConfig(sparsity=sparsity, prune_n=n, prune_m=m, batch_size=args.batch_size)
    result = prune_model(model, calib, cfg, device=args.device)
    if world.is_main:
        family = family_of(model)
        row = {"seconds": result.seconds, "layer_seconds": result.layer_seconds, "world": result.world,
               "stats": [{k: s[k] for k in ("name", "layer", "error", "seconds", "rank")} for s in result.stats],
               "shapes": {k: list(v.shape) for k, v in result.masks.masks.items()},
               "layers_path": family.layers_path, "shared_inputs": family.shared_inputs,
               "hidden": model.config.hidden_size, "peak_rss_mb": peak_rss_mb()}
        Path(out + ".json").write_text(json.dumps(row))
        torch.save(dict(result.masks.masks), out + ".pt")
    world.barrier()


def dist_spawn(argv: list[str], out: str, processes: int) -> dict:
    """`dist_child` in 1 plain process or `processes` torchrun processes (one thread each); adds the wall time."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "PYTHONWARNINGS": "ignore"}
    runner = [sys.executable] if processes == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes), "--master_port",
        str(free_port())]
    start = datetime.datetime.now().timestamp()
    subprocess.run([*runner, __file__, *argv, "--dist-child", out], env=env, check=True)
    row = json.loads(Path(out + ".json").read_text())
    row["wall_seconds"] = datetime.datetime.now().timestamp() - start
    log.info("%d process(es): prune %.1f s, wall %.1f s", processes, row["seconds"], row["wall_seconds"])
    return row


def agreement(one: dict, two: dict, masks_one: dict, masks_two: dict) -> dict:
    """How far the 2-process result is from the 1-process one: masks and per-linear reconstruction errors."""
    same = sum(int((masks_one[k] == masks_two[k]).sum()) for k in masks_one)
    total = sum(v.numel() for v in masks_one.values())
    rel = [abs(a["error"] - b["error"]) / b["error"] for a, b in zip(two["stats"], one["stats"]) if b["error"]]
    return {"masks_identical": same / total, "masks_differing": total - same, "weights": total,
            "error_rel_max": max(rel), "error_rel_mean": sum(rel) / len(rel)}


def world_table(row: dict) -> list[str]:
    lines = ["| rank | calibration rows | groups | linears | forward s | communication s | solve s | propagate s |",
             "|---|---|---|---|---|---|---|---|"]
    for r in row["world"]["ranks"]:
        sec = r["seconds"]
        lines.append(f"| {r['rank']} | {r['calibration_rows']} | {r['groups']} | {r['linears']} | {sec['forward']:.1f} "
                     f"| {sec['communication']:.1f} | {sec['solve']:.1f} | {sec['propagate']:.1f} |")
    return lines


def dist_report(args, argv, info, started, loads, one, two, agree, rates, acc, costs, proj) -> str:
    """The Markdown report of --distributed."""
    speed = one["seconds"] / two["seconds"]
    return "\n".join([
        "# Distributed SparseGPT pass: 1 vs 2 processes, and a projection to OPT-13B", "",
        f"- date: {started:%Y-%m-%d %H:%M} UTC; machine: {info['cpu']} (`lscpu | grep 'Model name'`), "
        f"{info['cores']} cores; one torch thread per process",
        f"- load average (1 / 5 / 15 min) at start {' / '.join(f'{x:.1f}' for x in loads[0])}, at end "
        f"{' / '.join(f'{x:.1f}' for x in loads[1])}: the machine was shared with other jobs, so times are upper "
        "bounds and the 2-process run competes for the same 2 cores",
        f"- python {info['python']}, torch {info['torch']}, transformers {info['transformers']}",
        f"- model `{args.model}` ({args.dtype}); sparsegpt {args.targets[0]}; calibration {args.calib}: "
        f"{args.nsamples} × {args.seqlen} tokens, batch {args.batch_size}, device {args.device}",
        f"- command: `python bench/prune/prune.py {' '.join(argv)}`", "",
        "## Wall time", "",
        "| processes | prune_model s | process wall s (load + calibration + prune) | peak RSS MB (rank 0) |",
        "|---|---|---|---|",
        f"| 1 | {one['seconds']:.1f} | {one['wall_seconds']:.1f} | {one['peak_rss_mb']:.0f} |",
        f"| 2 | {two['seconds']:.1f} | {two['wall_seconds']:.1f} | {two['peak_rss_mb']:.0f} |", "",
        f"Speed-up of the pass: {speed:.2f}×.", "",
        "Per rank (from `PruneResult.world`; forward = the Hessian-accumulating layer forwards with their hooks,"
        " communication = all-reduces, broadcasts and the stats gather, including the wait for the slower rank):", "",
        "1 process:", "", *world_table(one), "", "2 processes:", "", *world_table(two), "",
        "## Same result", "",
        f"- masks: {agree['masks_identical'] * 100:.4f} % identical ({agree['masks_differing']} of "
        f"{agree['weights']} weights differ)",
        f"- per-linear reconstruction error: max relative difference {agree['error_rel_max']:.2e}, mean "
        f"{agree['error_rel_mean']:.2e}",
        "- the 2 ranks sum Σxxᵀ in another order than one process; the driver's float64 sums make that "
        "difference vanish when H is rounded to float32 (see the notes for float32 sums)", "",
        "## float32 or float64 Hessian sums", "",
        "Σxxᵀ over one batch of calibration tokens (this CPU, one thread):", "",
        "| cols | tokens | float32 ms | float64 ms | float64 / float32 | H bytes float32 | H bytes float64 |",
        "|---|---|---|---|---|---|---|",
        *[f"| {a['cols']} | {a['tokens']} | {a['float32_s'] * 1e3:.1f} | {a['float64_s'] * 1e3:.1f} | "
          f"{a['float64_s'] / a['float32_s']:.2f} | {a['cols'] ** 2 * 4 / 2**20:.1f} MiB | "
          f"{a['cols'] ** 2 * 8 / 2**20:.1f} MiB |" for a in acc], "",
        *projection_lines(rates, costs, proj, one, two),
    ]) + "\n"


def distributed(args, argv: list[str]) -> str:
    """--distributed: 1 vs 2 processes, float64 cost, projection."""
    torch.set_num_threads(1)
    started, load_start, info = datetime.datetime.now(datetime.timezone.utc), os.getloadavg(), machine()
    with tempfile.TemporaryDirectory(prefix="distprune-bench-") as tmp:
        one = dist_spawn(argv, f"{tmp}/one", 1)
        two = dist_spawn(argv, f"{tmp}/two", 2)
        agree = agreement(one, two, torch.load(f"{tmp}/one.pt"), torch.load(f"{tmp}/two.pt"))
    rates = cpu_rates()
    linears, groups = measured_layers(one)
    acc = accumulate_costs([linears[g[0]][1] for g in groups], args.nsamples * args.seqlen)
    costs = measured_costs(one, args.nsamples * args.seqlen, args.seqlen, rates, acc)
    proj = project(costs)
    return dist_report(args, argv, info, started, (load_start, os.getloadavg()), one, two, agree, rates, acc,
                       costs, proj)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=DEMO_MODEL)
    p.add_argument("--methods", nargs="+", default=["sparsegpt", "wanda", "magnitude"])
    p.add_argument("--targets", nargs="+", default=["0.5", "0.7", "0.9", "2:4"], help="sparsities or N:M")
    p.add_argument("--calib", default="stdlib-docs")
    p.add_argument("--nsamples", type=int, default=16)
    p.add_argument("--seqlen", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--eval-source", default="stdlib-docs")
    p.add_argument("--eval-windows", type=int, default=16, help="0 skips perplexity")
    p.add_argument("--eval-seqlen", type=int, help="default: --seqlen")
    p.add_argument("--no-hessian-compare", action="store_true", help="skip the per-linear Hessian rerun")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path("bench/prune/results_prune.md"))
    p.add_argument("--json", type=Path, help="also write every row (with per-layer seconds) as JSON")
    p.add_argument("--distributed", action="store_true",
                   help="1 vs 2 processes, float64 Hessian cost, OPT-13B projection (first --targets entry)")
    p.add_argument("--child", nargs=4, help=argparse.SUPPRESS)  # internal: METHOD TARGET HESSIAN WEIGHTS_OUT
    p.add_argument("--dist-child", help=argparse.SUPPRESS)  # internal: output prefix of one --distributed run
    argv = sys.argv[1:]
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("sparsegpt.prune.sequential").setLevel(logging.WARNING)  # per-linear lines: see --json instead
    os.environ.setdefault("SPARSEGPT_NO_PROGRESS", "1")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.child:
        print(json.dumps(child(args, *args.child)))
        return 0
    if args.dist_child:
        dist_child(args, args.dist_child)
        return 0
    if args.distributed:
        text = distributed(args, argv)
        args.out.write_text(text)
        print(text)
        return 0

    started, load_start, info = datetime.datetime.now(datetime.timezone.utc), os.getloadavg(), machine()
    rows = [spawn(argv, "dense", "0")]
    hessian_rows, max_diff = [], None
    with tempfile.TemporaryDirectory() as tmp:
        for method in args.methods:
            for target in args.targets:
                compare = method == "sparsegpt" and not args.no_hessian_compare and not hessian_rows
                shared_w, alone_w = (f"{tmp}/shared.pt", f"{tmp}/alone.pt") if compare else ("", "")
                rows.append(spawn(argv, method, target, "shared", shared_w))
                if compare:  # the same run with one Hessian per linear: time, and the weights must agree
                    hessian_rows = [rows[-1], spawn(argv, method, target, "per-linear", alone_w)]
                    a, b = torch.load(shared_w), torch.load(alone_w)
                    max_diff = max((a[k] - b[k]).abs().max().item() for k in a)
                    del a, b
    text = report(args, argv, info, started, (load_start, os.getloadavg()), rows, hessian_rows, max_diff)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    if args.json:
        args.json.write_text(json.dumps({"machine": info, "rows": rows + hessian_rows[1:]}, indent=1))
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
