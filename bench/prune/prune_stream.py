"""Peak host memory of layer-streamed pruning (`sparsegpt.prune.streaming.prune_streamed`) vs the in-memory path
(`load_model` + `prune_model` + `save_model` + `MaskSet.save`, what the scheduler's prune phase does), each in a
fresh child process, and whether the folders they write are bitwise identical (every tensor, every mask).

    python bench/prune/prune_stream.py --model smollm2-135m --nsamples 16 --seqlen 256 \
        --out bench/prune/results_stream.md

The calibration ids are drawn once by the parent and handed to the children in a file, so no child tokenizes
the corpus (the same for both paths, and not what is measured). Memory from /proc/self/status: the baseline is the
child's VmRSS right after its module-top imports (torch, transformers, sparsegpt); the peak is VmHWM at its end
minus that baseline. A sampler thread (every 20 ms) records the largest RssAnon (private memory) and RssFile
(file-backed pages, e.g. mmapped safetensors) seen, absolute, since VmHWM does not split the two.

`--variants` also runs each path with `MaskSet` counting a mask's pruned entries by `count_nonzero` instead of
`sum` (`count`: the bench swaps `PackedMasks.add` for one that differs only in that; same masks): the int64
temporary of `sum`, allocated between the packed masks, fragments glibc's heap by about 7 bytes per weight.
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
from safetensors.torch import load_file, save_file
from transformers import AutoTokenizer

from sparsegpt.core import masks as mask_module
from sparsegpt.core.data import calibration_ids
from sparsegpt.core.masks import MaskSet, pack_bits
from sparsegpt.prune.sequential import PruneConfig, prune_model
from sparsegpt.prune.streaming import Checkpoint, prune_streamed
from sparsegpt.storage.models import load_model, resolve_model_path, save_model

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


def _add_counting_nonzero(self, name: str, mask: torch.Tensor) -> None:
    """PackedMasks.add with the pruned count from count_nonzero (no int64 temporary of the mask's size)."""
    self.add_packed(name, pack_bits(mask.cpu()), tuple(mask.shape), int(mask.count_nonzero()))


def worker(args: argparse.Namespace) -> None:
    """One child: prune once (in memory or streamed), write the folder, print a JSON line of memory numbers."""
    torch.set_num_threads(args.threads)
    baseline = status_mb("VmRSS")
    if args.count:
        mask_module.PackedMasks.add = _add_counting_nonzero
    sampler = Sampler()
    sampler.start()
    t0 = time.perf_counter()
    path = resolve_model_path(args.model)
    cfg = PruneConfig(sparsity=args.sparsity, batch_size=args.batch_size)
    calib = load_file(args.calib_file)["ids"]
    out = Path(args.folder)
    if args.worker == "memory":
        model, tok = load_model(path)
        masks = prune_model(model, calib, cfg, device="cpu").masks
        save_model(model, tok, out)
        masks.save(out / "mask.safetensors")
    else:
        prune_streamed(path, calib, cfg, out, device="cpu")
    seconds = time.perf_counter() - t0
    sampler.done.set()
    sampler.join()
    print(json.dumps({"baseline_mb": baseline, "peak_mb": status_mb("VmHWM") - baseline,
                      "anon_peak_mb": sampler.peak["RssAnon"], "file_peak_mb": sampler.peak["RssFile"],
                      "seconds": seconds}))


def folder_tensors(folder: Path) -> dict[str, Path]:
    """tensor name -> file, over every safetensors weight file of a folder."""
    where = {}
    for file in sorted(folder.glob("model*.safetensors")):
        with safe_open(str(file), framework="pt") as f:
            where.update(dict.fromkeys(f.keys(), file))
    return where


def identical(a: Path, b: Path) -> str:
    """'yes (...)' when both folders hold the same tensor names with equal dtypes and bits, and equal masks."""
    ta, tb = folder_tensors(a), folder_tensors(b)
    if sorted(ta) != sorted(tb):
        return f"no: tensor names differ ({sorted(set(ta) ^ set(tb))[:3]})"
    for name in ta:
        with safe_open(str(ta[name]), framework="pt") as fa, safe_open(str(tb[name]), framework="pt") as fb:
            x, y = fa.get_tensor(name), fb.get_tensor(name)
            if x.dtype != y.dtype or not torch.equal(x.view(torch.uint8), y.view(torch.uint8)):
                return f"no: {name} differs"
    ma, mb = MaskSet.load(a / "mask.safetensors"), MaskSet.load(b / "mask.safetensors")
    if list(ma.masks) != list(mb.masks) or any(not torch.equal(ma.masks[n], mb.masks[n]) for n in ma.masks):
        return "no: masks differ"
    return f"yes ({len(ta)} tensors, {len(ma.masks)} masks)"


def lscpu_model() -> str:
    out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    return next((line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name")), "?")


def run_child(args: argparse.Namespace, mode: str, count: bool, tmp: Path) -> dict:
    folder = tmp / f"{mode}{'-count' if count else ''}"
    cmd = [sys.executable, __file__, "--worker", mode, "--folder", str(folder), "--calib-file",
           str(tmp / "calib.safetensors"), *(["--count"] if count else [])]
    cmd += [f"--{k.replace('_', '-')}={getattr(args, k)}"
            for k in ("model", "nsamples", "seqlen", "batch_size", "sparsity", "threads")]
    env = {**os.environ, "SPARSEGPT_NO_PROGRESS": "1", "OMP_NUM_THREADS": str(args.threads)}
    if args.mmap_threshold:
        env["MALLOC_MMAP_THRESHOLD_"] = str(args.mmap_threshold)
    done = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, text=True, check=True)
    result = {"mode": mode, "count": count, "folder": folder, **json.loads(done.stdout.strip().splitlines()[-1])}
    print({k: v for k, v in result.items() if k != "folder"}, flush=True)
    return result


def report(args, argv, started, loads, size, source, runs, same) -> str:
    command = "python " + " ".join(shlex.quote(a) for a in argv)
    lines = [
        f"# Streamed vs in-memory pruning: peak host memory, {args.model}",
        "",
        f"- machine: {lscpu_model()}, {os.cpu_count()} cores (shared with other jobs); torch {torch.__version__}, "
        f"{args.threads} thread(s) per child",
        f"- date: {started:%Y-%m-%d %H:%M} UTC; load average (1/5/15 min) at start "
        f"{' / '.join(f'{x:.2f}' for x in loads[0])}, at end {' / '.join(f'{x:.2f}' for x in loads[1])}",
        f"- command: `{command}`",
        f"- settings: SparseGPT {args.sparsity:.0%} uniform, {args.nsamples} calibration rows x {args.seqlen} tokens "
        f"({args.calib}, seed 0), batch {args.batch_size}, device cpu; model tensors {size:.0f} MiB as stored, "
        f"float32 ({source})",
        "- peak = VmHWM at the end of the child minus its VmRSS right after the imports (torch, transformers, "
        "sparsegpt); max RssAnon / RssFile: largest absolute values sampled every 20 ms",
        f"- glibc malloc: {f'MALLOC_MMAP_THRESHOLD_={args.mmap_threshold}' if args.mmap_threshold else 'defaults'}",
        "- mask count `sum`: the code as it is; `count_nonzero`: `PackedMasks.add` counting with count_nonzero "
        "(see the script's docstring)",
        f"- output folders bitwise identical (weights and masks): {same}",
        "",
        "| path | mask count | peak MiB above imports | peak / model bytes | imports RSS MiB | max RssAnon MiB "
        "| max RssFile MiB | wall s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in runs:
        lines.append(f"| {r['mode']} | {'count_nonzero' if r['count'] else 'sum'} | {r['peak_mb']:.0f} | "
                     f"{r['peak_mb'] / size:.2f} | {r['baseline_mb']:.0f} | {r['anon_peak_mb']:.0f} | "
                     f"{r['file_peak_mb']:.0f} | {r['seconds']:.0f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--calib", default="stdlib-docs")
    p.add_argument("--nsamples", type=int, default=16)
    p.add_argument("--seqlen", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--sparsity", type=float, default=0.5)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--variants", action="store_true", help="also run both paths with the count_nonzero mask count")
    p.add_argument("--only-count", action="store_true", help="run both paths with the count_nonzero mask count only")
    p.add_argument("--mmap-threshold", type=int,
                   help="children run with MALLOC_MMAP_THRESHOLD_=BYTES (glibc: a fixed threshold, so freed large "
                        "buffers go back to the OS at once instead of staying in the heap)")
    p.add_argument("--out", type=Path, help="Markdown report to write")
    p.add_argument("--worker", choices=MODES, help=argparse.SUPPRESS)
    p.add_argument("--folder", help=argparse.SUPPRESS)
    p.add_argument("--calib-file", help=argparse.SUPPRESS)
    p.add_argument("--count", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        worker(args)
        return
    started, load_start = datetime.datetime.now(datetime.timezone.utc), os.getloadavg()
    source = Path(resolve_model_path(args.model))
    with tempfile.TemporaryDirectory(prefix="stream-bench-") as tmp:
        tmp = Path(tmp)
        tok = AutoTokenizer.from_pretrained(source)
        calib = calibration_ids(args.calib, tok, nsamples=args.nsamples, seqlen=args.seqlen, seed=0)
        save_file({"ids": calib.contiguous()}, str(tmp / "calib.safetensors"))
        counts = (True,) if args.only_count else (False, True) if args.variants else (False,)
        runs = [run_child(args, mode, count, tmp) for count in counts for mode in MODES]
        same = "; ".join(f"{'count_nonzero' if count else 'sum'}: "
                         + identical(*(r["folder"] for r in runs if r["count"] == count))
                         for count in dict.fromkeys(r["count"] for r in runs))
    size = sum(end - start for _, _, _, start, end in Checkpoint(source).entries.values()) / 2**20
    text = report(args, sys.argv, started, (load_start, os.getloadavg()), size, source, runs, same)
    print(text)
    if args.out:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
