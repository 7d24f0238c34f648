"""One process of `bench/memory/memory.py`: prune or fine-tune once, then report this process's peak host memory.

    python bench/memory/memory_worker.py --task prune --model smollm2-135m --out OUT_DIR
    python bench/memory/memory_worker.py --task finetune [--kd] --model smollm2-135m --pruned PRUNED_DIR --out OUT_DIR
    DS_ACCELERATOR=cpu accelerate launch --config_file recipes/accelerate/zero3.yaml --num_processes 2 \\
        bench/memory/memory_worker.py --task finetune --kd --model smollm2-135m --pruned PRUNED_DIR --out OUT_DIR

Fine-tuning loads as the scheduler does (`models.load_for_training`: straight into ZeRO-3 partitions under
zero3.yaml, whole otherwise), the student from PRUNED_DIR with its mask file, the teacher from --model.

Memory comes from /proc/self/status: VmRSS when `main` starts (after the module-top imports of torch,
transformers, accelerate and the sparsegpt modules used here: the "imports" baseline) and VmHWM (the peak RSS of
this process) at a few marks and at the end, with RssAnon / RssFile (absolute: private memory vs file-backed pages
such as the mmapped safetensors, which ranks share physically but each rank's RSS counts in full). Each rank
writes OUT_DIR/rank{r}.json.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch
from accelerate import Accelerator

from sparsegpt.core.data import calibration_ids
from sparsegpt.core.masks import MaskSet
from sparsegpt.heal import finetune as finetune_module
from sparsegpt.heal.config import FinetuneConfig
from sparsegpt.heal.distill import KDConfig
from sparsegpt.heal.dsconfig import cpu_deepspeed_handlers
from sparsegpt.heal.finetune import finetune
from sparsegpt.prune.sequential import PruneConfig, prune_model
from sparsegpt.storage.models import load_for_training, load_model


def proc_status_mb(field: str) -> float:
    """A `kB` field of /proc/self/status (VmRSS, VmHWM, ...) in MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise KeyError(field)


class Marks:
    """VmRSS and VmHWM at named points of the run, relative to the imports baseline."""

    def __init__(self) -> None:
        self.baseline = proc_status_mb("VmRSS")
        self.t0 = time.perf_counter()
        self.points: list[dict] = []

    def mark(self, name: str) -> None:
        self.points.append({"mark": name, "seconds": round(time.perf_counter() - self.t0, 1),
                            "rss_mb": round(proc_status_mb("VmRSS") - self.baseline, 1),
                            "hwm_mb": round(proc_status_mb("VmHWM") - self.baseline, 1),
                            "anon_mb": round(proc_status_mb("RssAnon"), 1),
                            "file_mb": round(proc_status_mb("RssFile"), 1)})


def run_prune(args: argparse.Namespace, marks: Marks) -> dict:
    model, tokenizer = load_model(args.model, dtype=args.dtype)
    marks.mark("model loaded")
    calib = calibration_ids("stdlib-docs", tokenizer, nsamples=args.nsamples, seqlen=args.seqlen, seed=0)
    result = prune_model(model, calib, PruneConfig(sparsity=0.5, batch_size=min(8, args.nsamples)), device="cpu")
    marks.mark("pruned")
    return {"world": 1, "rank": 0, "seconds": round(getattr(result, "seconds", 0.0) or 0.0, 1)}


def marked(fn, marks: Marks, name: str):
    """`fn` wrapped to mark memory before and after each call (to see where in `finetune` the peak happens)."""
    def wrapper(*args, **kwargs):
        marks.mark(f"before {name}")
        out = fn(*args, **kwargs)
        marks.mark(f"after {name}")
        return out
    return wrapper


def run_finetune(args: argparse.Namespace, marks: Marks) -> dict:
    # under accelerate launch the launch's --mixed_precision wins (ACCELERATE_MIXED_PRECISION); alone, this flag
    accelerator = Accelerator(mixed_precision=os.environ.get("ACCELERATE_MIXED_PRECISION", args.mixed_precision),
                              kwargs_handlers=cpu_deepspeed_handlers())
    marks.mark("accelerator")
    accelerator.prepare = marked(accelerator.prepare, marks, "prepare")
    finetune_module.prepare_teacher = marked(finetune_module.prepare_teacher, marks, "prepare_teacher")
    finetune_module._train = marked(finetune_module._train, marks, "train")
    # as the scheduler's fine-tuning phase does: the pruned folder and its mask file; the dense model as teacher
    model, tokenizer = load_for_training(args.pruned, accelerator, dtype=args.dtype)
    marks.mark("student loaded")
    masks = MaskSet.load(args.pruned / "mask.safetensors")
    marks.mark("masks")
    teacher = None
    if args.kd:
        teacher, _ = load_for_training(args.model, accelerator, dtype=args.dtype)
        marks.mark("teacher loaded")
    rows = args.micro_batch * accelerator.num_processes * args.steps
    ids = calibration_ids("stdlib-docs", tokenizer, nsamples=rows, seqlen=args.seqlen, seed=0)
    cfg = FinetuneConfig(steps=args.steps, lr=1e-5, micro_batch_size=args.micro_batch, seed=0, schedule="constant",
                         kd=KDConfig(logit_weight=1.0) if args.kd else None, log_every=args.steps)
    result = finetune(model, ids, masks, cfg, accelerator=accelerator, teacher=teacher)
    marks.mark("finetuned")
    plugin = accelerator.state.deepspeed_plugin
    stage = plugin.deepspeed_config.get("zero_optimization", {}).get("stage") if plugin is not None else None
    return {"world": accelerator.num_processes, "rank": accelerator.process_index, "zero_stage": stage,
            "losses": result.losses, "step_seconds": [round(s, 2) for s in result.step_seconds]}


def main() -> None:
    marks = Marks()  # first thing: the baseline is the RSS of the imports alone
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", choices=("prune", "finetune"), required=True)
    parser.add_argument("--model", required=True, help="a name load_model knows, or a model folder (the dense one)")
    parser.add_argument("--pruned", type=Path, help="--task finetune: the pruned model folder with mask.safetensors")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--kd", action="store_true", help="distil from the dense model (logit KL, weight 1)")
    parser.add_argument("--mixed-precision", default="no", choices=("no", "bf16"))
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--seqlen", type=int, default=128)
    parser.add_argument("--micro-batch", type=int, default=1)
    parser.add_argument("--nsamples", type=int, default=4, help="calibration rows for --task prune")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    info = run_prune(args, marks) if args.task == "prune" else run_finetune(args, marks)
    marks.mark("end")
    info.update({"task": args.task, "kd": args.kd, "model": args.model, "pid": os.getpid(),
                 "imports_rss_mb": round(marks.baseline, 1), "hwm_total_mb": round(proc_status_mb("VmHWM"), 1),
                 "peak_above_imports_mb": round(proc_status_mb("VmHWM") - marks.baseline, 1), "marks": marks.points})
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"rank{info['rank']}.json").write_text(json.dumps(info, indent=1))


if __name__ == "__main__":
    main()
