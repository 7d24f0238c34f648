"""Inference benchmark: what sparsity buys when decoding, and what the compact checkpoint saves on disk.

1. Sparse kernels: the batch-1 products of the real pruned weights (one decoder layer, cache-resident, and all
   layers, streamed from DRAM) with PyTorch's own sparse layouts (CSR with int64 / int32 indices, `@` and
   `torch.mv`; BSR) against the dense product.
2. Decoding: CPU batch-1 greedy decoding tokens/s, peak RSS and weight bytes, dense vs pruned (SparseGPT on the
   stdlib-docs calibration, as bench/prune/prune.py does), the pruned linears run dense and through the best
   kernel of 1.
3. Compact export at the highest target: bytes of the pruned linears compact vs dense (bf16 and fp32) and the
   export's peak host memory above the imports, the round trip checked bit-identical.
4. GPU (only with CUDA; `--gpu` runs just this): 2:4 `to_sparse_semi_structured` vs dense for an OPT/Llama-7B
   shaped stack of linears.

Every measurement that reports memory runs in a fresh child process, so its peak RSS is its own.

example (what bench/inference/results_inference.md was made with; its header has the exact command):
  python bench/inference/inference.py --model smollm2-135m --targets 0.5 0.7 0.9 --threads 1 \
      --out bench/inference/results_inference.md
  python bench/inference/inference.py --gpu    # on a CUDA machine: the 2:4 section only
"""

from __future__ import annotations

import argparse
import ctypes
import datetime
import gc
import json
import logging
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch
import torch.nn.functional as F
import transformers
from safetensors import safe_open
from torch import nn
from torch.sparse import to_sparse_semi_structured

from sparsegpt.core.architectures import prunable_linears
from sparsegpt.core.data import calibration_ids
from sparsegpt.core.masks import MaskSet
from sparsegpt.prune.sequential import PruneConfig, prune_model
from sparsegpt.storage import compact, compact_codec, compact_export
from sparsegpt.storage.models import DEMO_MODEL, load_model, resolve_model_path, save_model

log = logging.getLogger("bench.inference")

LAYER_SHAPES_7B = {"q/k/v/o (×4)": (4096, 4096, 4), "gate/up (×2)": (11008, 4096, 2), "down": (4096, 11008, 1)}
PROMPT = "The os module provides a portable way of using operating system dependent functionality. It"


# -- memory -------------------------------------------------------------------------------------------------------
def proc_status(key: str) -> float:
    """A /proc/self/status value in MiB (VmRSS, VmHWM, RssAnon, ...)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
    raise KeyError(key)


def reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux: write 5 to /proc/self/clear_refs); False when not permitted."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


class AnonPeak:
    """Samples RssAnon (heap and tensors, not the page cache that safetensors' mmap maps in) every 2 ms."""

    def __init__(self):
        self.peak = proc_status("RssAnon")
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.002):
            self.peak = max(self.peak, proc_status("RssAnon"))

    def __enter__(self) -> AnonPeak:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, proc_status("RssAnon"))


def folder_tensor_bytes(folder: Path, pattern: str) -> int:
    """Sum of the tensor bytes (from the headers) of the safetensors files matching pattern in folder."""
    total = 0
    for path in folder.glob(pattern):
        with safe_open(str(path), framework="pt") as f:
            for key in f.keys():
                piece = f.get_slice(key)
                itemsize = compact_codec._DTYPE_OF_CODE[piece.get_dtype()].itemsize
                total += torch.Size(piece.get_shape()).numel() * itemsize
    return total


def machine() -> dict:
    """CPU model, cores, memory, GPU, versions."""
    lscpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines()
    field = {k.strip(): v.strip() for k, _, v in (line.partition(":") for line in lscpu)}
    flags = set(field.get("Flags", "").split())
    isa = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile") if f in flags]
    mem_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return {"cpu": field.get("Model name", "?"), "cores": os.cpu_count(), "isa": isa, "mem_gib": round(mem_gib, 1),
            "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
            "python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__}


# -- sparse linears -----------------------------------------------------------------------------------------------
def csr(weight: torch.Tensor, index_dtype: torch.dtype = torch.int32) -> torch.Tensor:
    """The (out, in) weight as a CSR tensor with index_dtype crow/col indices (MKL is faster with int32)."""
    c = weight.to_sparse_csr()
    return torch.sparse_csr_tensor(c.crow_indices().to(index_dtype), c.col_indices().to(index_dtype), c.values(),
                                   c.shape)


KERNELS = {  # name -> (prepare(weight) -> operand, apply(operand, x (rows, in)) -> (rows, out))
    "dense": (lambda w: w, lambda w, x: F.linear(x, w)),
    "csr64 @": (lambda w: csr(w, torch.int64), lambda w, x: (w @ x.t()).t()),
    "csr32 @": (lambda w: csr(w), lambda w, x: (w @ x.t()).t()),
    "csr32 mv": (lambda w: csr(w), lambda w, x: torch.mv(w, x[0]).unsqueeze(0) if len(x) == 1 else (w @ x.t()).t()),
    "bsr16 @": (lambda w: w.to_sparse_bsr((16, 16)), lambda w, x: (w @ x.t()).t()),
}


class SparseLinear(nn.Module):
    """A bias-free linear whose weight is a sparse tensor; batch-1 rows go through `kernel`'s product."""

    def __init__(self, weight: torch.Tensor, kernel: str):
        super().__init__()
        prepare, self.apply_fn = KERNELS[kernel]
        self.weight_sparse = prepare(weight.detach())
        self.out_features, self.in_features = weight.shape

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.apply_fn(self.weight_sparse, x.reshape(-1, self.in_features))
        return y.reshape(*x.shape[:-1], self.out_features)


def sparsify(model: nn.Module, kernel: str) -> None:
    """Replace every prunable linear of the model by a SparseLinear running `kernel`."""
    for name, module in prunable_linears(model).items():
        if module.bias is not None:
            raise ValueError(f"{name} has a bias; SparseLinear here handles bias-free linears (Llama family)")
        parent, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent), attr, SparseLinear(module.weight, kernel))


def weight_bytes(model: nn.Module) -> int:
    """Bytes of every parameter and sparse weight (values + indices), each storage counted once."""
    seen, total = set(), 0
    tensors = list(model.parameters())
    for m in model.modules():
        if isinstance(m, SparseLinear):
            w = m.weight_sparse
            if w.layout == torch.sparse_csr:
                tensors += [w.values(), w.crow_indices(), w.col_indices()]
            elif w.layout == torch.sparse_bsr:
                tensors += [w.values(), w.crow_indices(), w.col_indices()]
            else:
                tensors.append(w)
    for t in tensors:
        key = t.untyped_storage().data_ptr()
        if key not in seen:
            seen.add(key)
            total += t.untyped_storage().nbytes()
    return total


def time_call(fn, repeats: int, inner: int) -> float:
    """Best-of-repeats mean seconds of fn() over `inner` calls (after a warm-up)."""
    for _ in range(max(inner // 10, 2)):
        fn()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(inner):
            fn()
        best = min(best, (time.perf_counter() - t0) / inner)
    return best


# -- children -----------------------------------------------------------------------------------------------------
def child_prune(args, target: str, out: str) -> dict:
    """Prune the model with SparseGPT to `target` on the calibration sample and save it with its mask."""
    model, tokenizer = load_model(args.model, dtype="float32")
    calib = calibration_ids(args.calib, tokenizer, nsamples=args.nsamples, seqlen=args.seqlen, seed=args.seed)
    result = prune_model(model, calib, PruneConfig(method="sparsegpt", sparsity=float(target)), device="cpu")
    with tempfile.TemporaryDirectory() as tmp:
        result.masks.save(Path(tmp) / "mask.safetensors")
        mask_bytes = (Path(tmp) / "mask.safetensors").read_bytes()
    save_model(model, tokenizer, out, extra_files={"mask.safetensors": mask_bytes})
    return {"sparsity": result.masks.sparsity(), "seconds": result.seconds}


def child_kernels(args, folder: str) -> dict:
    """µs of each kernel's batch-1 products over the pruned linears, float32 and bfloat16: one decoder layer's 7
    (repeated, so they sit in the cache) and every layer's (one token's pass, the weights streamed from DRAM)."""
    masks = MaskSet.load(Path(folder) / "mask.safetensors")
    with safe_open(str(Path(folder) / "model.safetensors"), framework="pt") as f:
        weights = {n: f.get_tensor(f"{n}.weight").clone() for n in masks.masks}
    layer = [n for n in weights if f".layers.{args.kernel_layer}." in n]
    rows = []
    for dtype in (torch.float32, torch.bfloat16):
        for scope, names, inner in (("one layer", layer, 100), ("all layers", list(weights), 3)):
            totals: dict[str, float | str] = {}
            for kernel, (prepare, apply) in KERNELS.items():
                try:
                    operands = [(prepare(weights[n].to(dtype)), torch.randn(1, weights[n].shape[1], dtype=dtype))
                                for n in names]

                    def run(operands=operands, apply=apply):
                        for operand, x in operands:
                            apply(operand, x)

                    totals[kernel] = time_call(run, 5, inner) * 1e6
                    del operands
                except (RuntimeError, NotImplementedError) as e:
                    totals[kernel] = str(e).strip().splitlines()[0][:80]
                gc.collect()
            rows.append({"dtype": str(dtype).removeprefix("torch."), "scope": scope, "linears": len(names),
                         "us": totals, "sparsity": masks.sparsity()})
    return {"rows": rows}


def child_decode(args, folder: str, kernel: str, dtype: str) -> dict:
    """Greedy-decode batch 1 with the dense linears, then (kernel != dense) swap the pruned linears for the sparse
    kernel and decode again: the two timings come from the same process minutes apart at most."""
    t0 = time.perf_counter()
    model, tokenizer = load_model(folder, dtype=dtype)
    load_s = time.perf_counter() - t0
    ids = tokenizer(PROMPT, return_tensors="pt", add_special_tokens=False)["input_ids"][:, :args.prompt_tokens]

    def generate(n: int) -> torch.Tensor:
        with torch.inference_mode():
            return model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, use_cache=True,
                                  pad_token_id=tokenizer.pad_token_id)

    def measure() -> dict:
        out = generate(args.new_tokens)  # warm-up, and the tokens to compare
        prefill = min(_timed(lambda: generate(1)) for _ in range(args.repeats))
        best = min(_timed(lambda: generate(args.new_tokens)) for _ in range(args.repeats))
        return {"tok_s": args.new_tokens / best, "decode_tok_s": (args.new_tokens - 1) / max(best - prefill, 1e-9),
                "tokens": out[0, ids.shape[1]:].tolist()}

    row = {"kernel": kernel, "dtype": dtype, "load_s": load_s, "prompt_tokens": ids.shape[1],
           "new_tokens": args.new_tokens, "dense_weight_bytes": weight_bytes(model)}
    if kernel != "dense":
        row["dense_kernel"] = measure()
        sparsify(model, kernel)
        gc.collect()
        ctypes.CDLL("libc.so.6").malloc_trim(0)  # hand the freed dense weights back, so RSS shows what stays
    row.update(measure(), loaded_rss_mb=proc_status("VmRSS"), peak_rss_mb=proc_status("VmHWM"),
               weight_bytes=weight_bytes(model))
    return row


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def child_cast(args, source: str, dtype: str, out: str) -> dict:
    """The pruned folder saved again in `dtype` (with its mask): the dense-with-zeros save the export reads."""
    model, tokenizer = load_model(source, dtype=dtype)
    mask_bytes = (Path(source) / "mask.safetensors").read_bytes()
    save_model(model, tokenizer, out, extra_files={"mask.safetensors": mask_bytes})
    return {}


def child_export(args, source: str, out: str) -> dict:
    """Export in this fresh process: peak RSS above what the imports left, and sampled anonymous RSS. The imports
    include the model's modeling code (a meta-device skeleton is built and dropped before the baseline)."""
    compact_export._skeleton(Path(source))
    base_rss, base_anon = proc_status("VmRSS"), proc_status("RssAnon")
    reset = reset_peak_rss()
    t0 = time.perf_counter()
    with AnonPeak() as anon:
        summary = compact.export(source, out)
    return {"seconds": time.perf_counter() - t0, "base_rss_mb": base_rss, "peak_rss_mb": proc_status("VmHWM"),
            "peak_reset": reset, "base_anon_mb": base_anon, "peak_anon_mb": anon.peak,
            "linear_bytes": summary.linear_bytes, "linear_dense_bytes": summary.linear_dense_bytes,
            "total_bytes": summary.total_bytes, "encodings": summary.encodings}


def child_verify(args, dense: str, packed: str) -> dict:
    """load_model(compact) against load_model(dense): every tensor bit-identical."""
    a, _ = load_model(dense)
    b, _ = load_model(packed)
    sa, sb = a.state_dict(), b.state_dict()
    same = sa.keys() == sb.keys() and all(
        sa[k].dtype == sb[k].dtype and torch.equal(sa[k].view(torch.uint8) if sa[k].dim() else sa[k],
                                                   sb[k].view(torch.uint8) if sb[k].dim() else sb[k]) for k in sa)
    return {"bit_identical": same}


CHILDREN = {"prune": child_prune, "kernels": child_kernels, "decode": child_decode, "cast": child_cast,
            "export": child_export, "verify": child_verify}


def spawn(argv: list[str], kind: str, *params) -> dict:
    """Run CHILDREN[kind](args, *params) in a fresh process with the same flags; its last stdout line is JSON."""
    cmd = [sys.executable, __file__, *argv, "--child", kind, *map(str, params)]
    done = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, check=True)
    row = json.loads(done.stdout.strip().splitlines()[-1])
    log.info("%s %s: %s", kind, " ".join(map(str, params)),
             {k: v for k, v in row.items() if k not in ("tokens", "rows")})
    return row


# -- GPU ----------------------------------------------------------------------------------------------------------
def gpu_semi_structured(batches=(1, 16, 128, 2048), dtype: torch.dtype = torch.float16, repeats: int = 50) -> dict:
    """ms per pass through a Llama-7B-shaped layer stack of linears, dense vs 2:4 `to_sparse_semi_structured`
    (the backend torch picks: cuSPARSELt when available, else CUTLASS); skipped without CUDA."""
    if not torch.cuda.is_available():
        return {"skipped": "no CUDA device on this machine; run `python bench/inference/inference.py --gpu` on one"}

    torch.manual_seed(0)
    stack = []
    for out_f, in_f, count in LAYER_SHAPES_7B.values():
        for _ in range(count):
            w = torch.randn(out_f, in_f, device="cuda", dtype=dtype)
            groups = w.abs().view(out_f, in_f // 4, 4)
            drop = groups.argsort(dim=-1)[..., :2]
            w = w.view(out_f, in_f // 4, 4).scatter(-1, drop, 0).view(out_f, in_f)
            stack.append((w, to_sparse_semi_structured(w)))
    rows = []
    for batch in batches:
        x = {in_f: torch.randn(batch, in_f, device="cuda", dtype=dtype) for _, in_f, _ in LAYER_SHAPES_7B.values()}
        result = {"batch": batch}
        for label, pick in (("dense", 0), ("2:4", 1)):
            def run():
                for pair in stack:
                    F.linear(x[pair[0].shape[1]], pair[pick])
            for _ in range(5):
                run()
            torch.cuda.synchronize()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(repeats):
                run()
            end.record()
            torch.cuda.synchronize()
            result[f"{label}_ms"] = start.elapsed_time(end) / repeats
        w, ws = stack[0]
        result["max_abs_err"] = float((F.linear(x[4096], ws) - F.linear(x[4096], w)).abs().max())
        rows.append(result)
    return {"device": torch.cuda.get_device_name(), "dtype": str(dtype).removeprefix("torch."),
            "backend": type(stack[0][1]).__name__, "rows": rows}


# -- report -------------------------------------------------------------------------------------------------------
def fmt(x, spec=".1f") -> str:
    return "–" if x is None else format(x, spec)


def report(args, argv, info, started, loads, pruned, kernels, decode, export_rows, verified, gpu) -> str:
    """The Markdown report."""
    start_load, end_load = (" / ".join(f"{x:.2f}" for x in load) for load in loads)
    loads_text = f"{start_load} at start, {end_load} at end"
    lines = [
        "# Inference benchmark: sparse decoding on CPU, compact checkpoints", "",
        f"- date: {started:%Y-%m-%d %H:%M} UTC; machine: {info['cpu']}, {info['cores']} cores "
        f"({', '.join(info['isa']) or 'no AVX2'}), {info['mem_gib']} GiB"
        + (f", GPU {info['gpu']}" if info["gpu"] else ", no GPU"),
        f"- torch threads: {args.threads} (OMP_NUM_THREADS / MKL_NUM_THREADS = {args.threads} in every child)",
        f"- load average (1 / 5 / 15 min): {loads_text}; the 2 cores are shared with other jobs, so times are "
        "upper bounds and ratios measured minutes apart carry that noise",
        f"- python {info['python']}, torch {info['torch']}, transformers {info['transformers']}",
        f"- model `{args.model}` float32; SparseGPT (uniform, blocksize 128, percdamp 0.01) on {args.calib}: "
        f"{args.nsamples} × {args.seqlen} tokens, seed {args.seed}",
        f"- command: `python bench/inference/inference.py {' '.join(argv)}`", "",
        "## 1. Sparse kernels: batch-1 products of the pruned linears, µs (dense time / kernel time)", "",
    ]
    kernel_names = list(KERNELS)
    lines += ["| target | measured sparsity | linears | dtype | " + " | ".join(kernel_names) + " |",
              "|---|---|---|---|" + "---|" * len(kernel_names)]
    errors = {}
    for target, res in kernels.items():
        for row in res["rows"]:
            cells = []
            for k in kernel_names:
                v = row["us"][k]
                if isinstance(v, str):
                    errors[(row["dtype"], k)] = v
                    cells.append("n/a")
                else:
                    dense = row["us"]["dense"]
                    cells.append(f"{v:.0f} ({dense / v:.2f}×)" if k != "dense" else f"{v:.0f}")
            scope = f"{row['scope']} ({row['linears']})"
            lines.append(f"| {target} | {row['sparsity']:.3f} | {scope} | {row['dtype']} | " + " | ".join(cells) + " |")
    lines += ["", "(×) above 1 is a speed-up. 'one layer': layer "
              f"{args.kernel_layer}'s 7 linears again and again (they stay in the 32 MiB L3); 'all layers': every "
              "pruned linear once per pass, as a decoded token sees them (the float32 weights do not fit any cache). "
              "`csr32 mv` is `torch.mv` on a CSR tensor with int32 indices; `@` is the sparse-dense matmul with the "
              "batch as one column; `bsr16` is 16×16 blocks."]
    for (dtype, k), msg in sorted(errors.items()):
        lines.append(f"- {k} in {dtype}: `{msg}`")
    lines += ["", f"## 2. Greedy decoding, batch 1, {decode[0]['prompt_tokens']}-token prompt + {args.new_tokens} new "
              f"tokens (best of {args.repeats})", "",
              "| model | dtype | linears run as | decode tokens/s | same process, dense linears | speed-up | "
              "tokens/s incl. prefill | peak RSS MiB | RSS after MiB | weight MiB (dense) | same tokens |",
              "|---|---|---|---|---|---|---|---|---|---|---|"]
    for row in decode:
        dense = row.get("dense_kernel")
        same = "–" if dense is None else ("yes" if row["tokens"] == dense["tokens"] else "no")
        lines.append(f"| {row['model']} | {row['dtype']} | {row['kernel']} | {row['decode_tok_s']:.2f} | "
                     f"{fmt(dense and dense['decode_tok_s'], '.2f')} | "
                     f"{fmt(dense and row['decode_tok_s'] / dense['decode_tok_s'], '.2f')}{'×' if dense else ''} | "
                     f"{row['tok_s']:.2f} | {row['peak_rss_mb']:.0f} | {row['loaded_rss_mb']:.0f} | "
                     f"{row['weight_bytes'] / 2**20:.0f} ({row['dense_weight_bytes'] / 2**20:.0f}) | {same} |")
    lines += ["", "Each pruned model decodes first with its dense-with-zeros linears, then, in the same process, with "
              "the linears swapped for the sparse kernel (the fastest of section 1 over all layers); 'same tokens': "
              "the greedy tokens agree. Decode tokens/s = (new tokens - 1) / (whole generate - 1-token generate). "
              "Peak RSS includes the dense load (the load path decodes to dense) and the dense run; 'RSS after' is "
              "after the swap, a gc and malloc_trim, and decoding. Weight MiB counts parameters and sparse values + "
              "indices (the tied embedding / lm_head once)."]
    lines += ["", "## 3. Compact export of the highest target", "",
              "| dtype | pruned linears dense MiB | compact MiB | ratio | whole model dense MiB | whole compact MiB | "
              "export s | peak RSS above imports MiB (× model) | peak anon RSS above imports MiB (× model) | "
              "round trip bit-identical |", "|---|---|---|---|---|---|---|---|---|---|"]
    for row in export_rows:
        model_mb = row["source_bytes"] / 2**20
        rss = row["peak_rss_mb"] - row["base_rss_mb"]
        anon = row["peak_anon_mb"] - row["base_anon_mb"]
        lines.append(f"| {row['dtype']} | {row['linear_dense_bytes'] / 2**20:.1f} | "
                     f"{row['linear_bytes'] / 2**20:.1f} | "
                     f"{row['linear_bytes'] / row['linear_dense_bytes']:.4f} | {model_mb:.1f} | "
                     f"{row['total_bytes'] / 2**20:.1f} | {row['seconds']:.1f} | {rss:.0f} ({rss / model_mb:.2f}) | "
                     f"{anon:.0f} ({anon / model_mb:.2f}) | {'yes' if verified[row['dtype']] else 'NO'} |")
    lines += ["", "Peak RSS is VmHWM, reset after the imports (`/proc/self/clear_refs`; the imports include the "
              "model's modeling code); it counts the source pages mapped while a tensor is read (safetensors "
              "returns views of its mmap; the export reads each pruned weight whole and copies the rest in 16 MiB row "
              "blocks, each through its own handle). The anonymous RSS (heap, tensors) is sampled every 2 ms. Ratios "
              "are to the dense model's tensor bytes."]
    lines += ["", "## 4. GPU: 2:4 semi-structured vs dense (Llama-7B layer: 4 × 4096², 2 × 11008×4096, 4096×11008)", ""]
    if "skipped" in gpu:
        lines.append(f"Skipped: {gpu['skipped']}.")
    else:
        lines += [f"{gpu['device']}, {gpu['dtype']}, {gpu['backend']}", "",
                  "| tokens in the batch | dense ms | 2:4 ms | speed-up | max abs error (q_proj) |",
                  "|---|---|---|---|---|"]
        for r in gpu["rows"]:
            lines.append(f"| {r['batch']} | {r['dense_ms']:.3f} | {r['2:4_ms']:.3f} | "
                         f"{r['dense_ms'] / r['2:4_ms']:.2f}× | {r['max_abs_err']:.3g} |")
    lines += ["", "## Pruning runs", "", "| target | measured sparsity | prune s |", "|---|---|---|"]
    for target, row in pruned.items():
        lines.append(f"| {target} | {row['sparsity']:.4f} | {fmt(row.get('seconds'))} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=DEMO_MODEL)
    p.add_argument("--targets", nargs="+", type=float, default=[0.5, 0.7, 0.9])
    p.add_argument("--calib", default="stdlib-docs")
    p.add_argument("--nsamples", type=int, default=16)
    p.add_argument("--seqlen", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch / OpenMP / MKL threads in every child")
    p.add_argument("--prompt-tokens", type=int, default=16)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--kernel-layer", type=int, default=15, help="decoder layer whose linears the kernel table uses")
    p.add_argument("--work-dir", type=Path, help="keep the pruned folders here and reuse them (default: a temp dir)")
    p.add_argument("--gpu", action="store_true", help="run only the CUDA 2:4 section and print it")
    p.add_argument("--out", type=Path, default=Path("bench/inference/results_inference.md"))
    p.add_argument("--json", type=Path, help="also write every row as JSON")
    p.add_argument("--child", nargs="+", help=argparse.SUPPRESS)  # internal: KIND PARAMS...
    argv = sys.argv[1:]
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("sparsegpt").setLevel(logging.WARNING)
    os.environ.setdefault("SPARSEGPT_NO_PROGRESS", "1")
    torch.set_num_threads(args.threads)
    if args.child:
        print(json.dumps(CHILDREN[args.child[0]](args, *args.child[1:])))
        return 0
    if args.gpu:
        print(json.dumps(gpu_semi_structured(), indent=1))
        return 0

    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = str(args.threads)
    started, load_start, info = datetime.datetime.now(datetime.timezone.utc), os.getloadavg(), machine()
    dense_dir = resolve_model_path(args.model)
    with tempfile.TemporaryDirectory() as tmp:
        work = args.work_dir or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        pruned, folders = {}, {}
        for target in args.targets:
            folder = work / f"s{target:g}"
            folders[target] = folder
            record = work / f"s{target:g}.json"  # a reused --work-dir keeps the pruning run's numbers
            if not ((folder / "mask.safetensors").is_file() and record.is_file()):
                record.write_text(json.dumps(spawn(argv, "prune", target, folder)))
            pruned[target] = json.loads(record.read_text())
        kernels = {target: spawn(argv, "kernels", folders[target]) for target in args.targets}
        best = {}
        for target, res in kernels.items():
            fp32 = next(r for r in res["rows"] if r["dtype"] == "float32" and r["scope"] == "all layers")["us"]
            usable = {k: v for k, v in fp32.items() if k != "dense" and not isinstance(v, str)}
            best[target] = min(usable, key=usable.get)
        decode = [{"model": "dense", **spawn(argv, "decode", dense_dir, "dense", "float32")},
                  {"model": "dense", **spawn(argv, "decode", dense_dir, "dense", "bfloat16")}]
        for target in args.targets:
            decode.append({"model": f"SparseGPT {target:g}",
                           **spawn(argv, "decode", folders[target], best[target], "float32")})
        top = max(args.targets)
        export_rows, verified = [], {}
        for dtype in ("bfloat16", "float32"):
            source = work / f"s{top:g}-{dtype}"
            if not (source / "mask.safetensors").is_file():
                spawn(argv, "cast", folders[top], dtype, source)
            out = work / f"s{top:g}-{dtype}-compact"
            if out.exists():
                subprocess.run(["rm", "-rf", str(out)], check=True)
            row = spawn(argv, "export", source, out)
            row.update(dtype=dtype, source_bytes=folder_tensor_bytes(source, "model*.safetensors"))
            export_rows.append(row)
            verified[dtype] = spawn(argv, "verify", source, out)["bit_identical"]
        gpu = gpu_semi_structured()
        text = report(args, argv, info, started, (load_start, os.getloadavg()), pruned, kernels, decode,
                      export_rows, verified, gpu)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    if args.json:
        args.json.write_text(json.dumps({"machine": info, "pruned": pruned, "kernels": kernels, "decode": decode,
                                         "export": export_rows, "gpu": gpu}, indent=1, default=str))
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
