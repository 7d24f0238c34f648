"""Peak host memory of layer-streamed pruning (`sparsegpt.streaming.prune_streamed`) vs the in-memory path
(`load_model` + `prune_model` + `save_model` + `MaskSet.save`), each in a fresh child process, and whether the
two folders they write are bitwise identical (every tensor and every mask).

    python bench/prune_stream.py --model smollm2-135m --nsamples 16 --seqlen 256 --out bench/results_stream.md

Memory is read from /proc/self/status: the baseline is VmRSS right after the module-top imports (torch,
transformers and the sparsegpt modules); the peak is VmHWM at the end minus that baseline. A sampler thread
(every 20 ms) also records the largest RssAnon (private memory) and RssFile (file-backed pages, e.g. mmapped
safetensors) seen, absolute, since VmHWM does not split the two.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shlex
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch
from safetensors import safe_open
from transformers import AutoTokenizer

from sparsegpt.data import calibration_ids
from sparsegpt.masks import MaskSet
from sparsegpt.models import load_model, resolve_model_path, save_model
from sparsegpt.sequential import PruneConfig, prune_model
from sparsegpt.streaming import Checkpoint, prune_streamed

MODES = ("memory", "stream")


def status_mb(field: str) -> float:
    """A kB field of /proc/self/status in MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise KeyError(field)


class Sampler(threading.Thread):
    """Largest RssAnon / RssFile seen, sampled every 20 ms until stopped."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.peak = {"RssAnon": 0.0, "RssFile": 0.0}
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.wait(0.02):
            for field in self.peak:
                self.peak[field] = max(self.peak[field], status_mb(field))


def worker(args: argparse.Namespace) -> None:
    """One child: prune once (in memory or streamed), write the folder, print a JSON line of memory numbers."""
    torch.set_num_threads(args.threads)
    baseline = status_mb("VmRSS")
    sampler = Sampler()
    sampler.start()
    t0 = time.perf_counter()
    path = resolve_model_path(args.model)
    cfg = PruneConfig(sparsity=args.sparsity, batch_size=args.batch_size)
    out = Path(args.folder)
    if args.worker == "memory":
        model, tok = load_model(path)
        calib = calibration_ids(args.calib, tok, nsamples=args.nsamples, seqlen=args.seqlen, seed=0)
        masks = prune_model(model, calib, cfg, device="cpu").masks
        save_model(model, tok, out)
        masks.save(out / "mask.safetensors")
    else:
        tok = AutoTokenizer.from_pretrained(path)
        calib = calibration_ids(args.calib, tok, nsamples=args.nsamples, seqlen=args.seqlen, seed=0)
        prune_streamed(path, calib, cfg, out, tokenizer=tok, device="cpu")
    seconds = time.perf_counter() - t0
    sampler.done.set()
    sampler.join()
    print(json.dumps({"mode": args.worker, "baseline_mb": baseline, "peak_mb": status_mb("VmHWM") - baseline,
                      "anon_peak_mb": sampler.peak["RssAnon"], "file_peak_mb": sampler.peak["RssFile"],
                      "anon_end_mb": status_mb("RssAnon"), "file_end_mb": status_mb("RssFile"),
                      "seconds": seconds}))


def folder_tensors(folder: Path) -> dict[str, tuple[Path, str]]:
    """tensor name -> (file, name) over every safetensors weight file of a folder."""
    where = {}
    for file in sorted(folder.glob("model*.safetensors")):
        with safe_open(str(file), framework="pt") as f:
            where.update({k: (file, k) for k in f.keys()})
    return where


def identical(a: Path, b: Path) -> str:
    """'yes' when both folders hold the same tensor names with equal dtypes and bits, and equal masks."""
    ta, tb = folder_tensors(a), folder_tensors(b)
    if sorted(ta) != sorted(tb):
        return f"no: tensor names differ ({sorted(set(ta) ^ set(tb))[:3]})"
    for name in ta:
        with safe_open(str(ta[name][0]), framework="pt") as fa, safe_open(str(tb[name][0]), framework="pt") as fb:
            x, y = fa.get_tensor(name), fb.get_tensor(name)
            if x.dtype != y.dtype or not torch.equal(x, y):
                return f"no: {name} differs"
    ma, mb = MaskSet.load(a / "mask.safetensors"), MaskSet.load(b / "mask.safetensors")
    if list(ma.masks) != list(mb.masks) or any(not torch.equal(ma.masks[n], mb.masks[n]) for n in ma.masks):
        return "no: masks differ"
    return f"yes ({len(ta)} tensors, {len(ma.masks)} masks)"


def model_bytes(folder: Path) -> int:
    """Bytes of the model's tensors as stored (safetensors data, headers excluded)."""
    return sum(end - start for _, _, _, start, end in Checkpoint(folder).entries.values())


def lscpu_model() -> str:
    out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    return next((line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name")), "?")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--calib", default="stdlib-docs")
    p.add_argument("--nsamples", type=int, default=16)
    p.add_argument("--seqlen", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--sparsity", type=float, default=0.5)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, help="Markdown report to write")
    p.add_argument("--worker", choices=MODES, help=argparse.SUPPRESS)
    p.add_argument("--folder", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        worker(args)
        return
    started, load_start = datetime.datetime.now(datetime.timezone.utc), os.getloadavg()
    source = Path(resolve_model_path(args.model))
    runs = {}
    with tempfile.TemporaryDirectory(prefix="stream-bench-") as tmp:
        for mode in MODES:
            cmd = [sys.executable, __file__, "--worker", mode, "--folder", str(Path(tmp) / mode)]
            cmd += [f"--{k.replace('_', '-')}={getattr(args, k)}"
                    for k in ("model", "calib", "nsamples", "seqlen", "batch_size", "sparsity", "threads")]
            env = {**os.environ, "SPARSEGPT_NO_PROGRESS": "1", "OMP_NUM_THREADS": str(args.threads)}
            done = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, text=True, check=True)
            runs[mode] = json.loads(done.stdout.strip().splitlines()[-1])
            print(runs[mode], flush=True)
        same = identical(Path(tmp) / "memory", Path(tmp) / "stream")
    size = model_bytes(source) / 2**20
    command = "python " + " ".join(shlex.quote(a) for a in sys.argv)
    load_end = os.getloadavg()
    lines = [
        f"# Streamed vs in-memory pruning: peak host memory, {args.model}",
        "",
        f"- machine: {lscpu_model()}, {os.cpu_count()} cores; torch {torch.__version__}, {args.threads} thread(s)",
        f"- date: {started:%Y-%m-%d %H:%M} UTC; load average (1/5/15 min) at start "
        f"{' / '.join(f'{x:.2f}' for x in load_start)}, at end {' / '.join(f'{x:.2f}' for x in load_end)}",
        f"- command: `{command}`",
        f"- settings: SparseGPT {args.sparsity:.0%} uniform, {args.nsamples} calibration rows x {args.seqlen} tokens "
        f"({args.calib}), batch {args.batch_size}, device cpu; model tensors {size:.0f} MiB as stored "
        f"(source {source})",
        "- peak = VmHWM at the end of the child minus its VmRSS right after the imports (torch, transformers, "
        "sparsegpt); RssAnon / RssFile: largest absolute values sampled every 20 ms",
        f"- the two output folders are bitwise identical (weights and masks): {same}",
        "",
        "| path | peak MiB above imports | peak / model bytes | imports RSS MiB | max RssAnon MiB | max RssFile MiB "
        "| wall s |",
        "|---|---|---|---|---|---|---|",
    ]
    for mode, r in runs.items():
        lines.append(f"| {mode} | {r['peak_mb']:.0f} | {r['peak_mb'] / size:.2f} | {r['baseline_mb']:.0f} | "
                     f"{r['anon_peak_mb']:.0f} | {r['file_peak_mb']:.0f} | {r['seconds']:.0f} |")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
