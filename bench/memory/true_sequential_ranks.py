"""Per-rank peak host memory of a 2-process pruning pass, default vs true_sequential (one forward over all rows).

  python -m torch.distributed.run --nproc_per_node 2 bench/memory/true_sequential_ranks.py default
  python -m torch.distributed.run --nproc_per_node 2 bench/memory/true_sequential_ranks.py ts

Each rank loads SmolLM2-135M (fp32), draws 32 × 256 stdlib-docs calibration rows, resets its peak RSS
(`/proc/self/clear_refs` 5: VmHWM := current RSS), runs `prune_model` (gloo, 1 thread, batch 4) and prints one JSON
line: the peak RSS of the load, the RSS when the pass starts and the peak RSS of the pass (VmHWM, MiB).
"""

from __future__ import annotations

import json
import os
import sys

import torch
import torch.distributed as dist


def vm_hwm_mib() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM")) / 1024


def main(mode: str) -> None:
    if mode not in ("default", "ts"):
        raise SystemExit(f"mode {mode!r}: use default or ts")
    torch.set_num_threads(1)
    os.environ["SPARSEGPT_NO_PROGRESS"] = "1"
    dist.init_process_group("gloo")
    from sparsegpt.core.data import calibration_ids
    from sparsegpt.prune.sequential import PruneConfig, prune_model
    from sparsegpt.storage.models import load_model

    model, tok = load_model("smollm2-135m", dtype="float32")
    calib = calibration_ids("stdlib-docs", tok, nsamples=32, seqlen=256, seed=0)
    load = vm_hwm_mib()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    start = vm_hwm_mib()
    result = prune_model(model, calib, PruneConfig(sparsity=0.5, batch_size=4, true_sequential=mode == "ts"))
    rank = dist.get_rank()
    print(json.dumps({"mode": mode, "rank": rank, "load_peak_mib": round(load), "pass_start_mib": round(start),
                      "pass_peak_mib": round(vm_hwm_mib()),
                      "rows": result.world["ranks"][rank]["calibration_rows"]}), flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "")
