"""Pruning benchmark: time, peak memory and perplexity for methods × targets, plus shared vs per-linear Hessians.

Each run (and the dense reference) is a fresh child process, so its peak RSS (ru_maxrss) and CUDA max
allocated memory are its own: load + calibration + pruning (perplexity is measured afterwards and not counted).
All runs use the same calibration sample; perplexity is on the validation split of --eval-source.
Writes a Markdown report (and optionally JSON with per-layer seconds).

example (what bench/results_prune.md was made with; see its header for the exact command):
  python bench/prune.py --model smollm2-135m --methods sparsegpt wanda magnitude --targets 0.5 0.7 0.9 2:4 \\
      --nsamples 16 --seqlen 128 --eval-windows 16 --threads 1 --out bench/results_prune.md
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import os
import platform
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from sparsegpt.architectures import decoder_layers
from sparsegpt.data import calibration_ids, eval_ids
from sparsegpt.evaluation import perplexity
from sparsegpt.models import DEMO_MODEL, load_model
from sparsegpt.sequential import PruneConfig, prune_model

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
        f"- command: `python bench/prune.py {' '.join(argv)}`", "",
        *HEADER, *map(table_row, rows),
    ]
    if hessian_rows:
        lines += ["", f"## Shared vs per-linear Hessians (sparsegpt, target {hessian_rows[0]['target']})", "",
                  *HEADER, *map(table_row, hessian_rows), "",
                  f"max |ΔW| between the two: {max_diff:.3g}"]
    return "\n".join(lines) + "\n"


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
    p.add_argument("--out", type=Path, default=Path("bench/results_prune.md"))
    p.add_argument("--json", type=Path, help="also write every row (with per-layer seconds) as JSON")
    p.add_argument("--child", nargs=4, help=argparse.SUPPRESS)  # internal: METHOD TARGET HESSIAN WEIGHTS_OUT
    argv = sys.argv[1:]
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("sparsegpt.sequential").setLevel(logging.WARNING)  # per-linear lines: see --json instead
    os.environ.setdefault("SPARSEGPT_NO_PROGRESS", "1")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.child:
        print(json.dumps(child(args, *args.child)))
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
