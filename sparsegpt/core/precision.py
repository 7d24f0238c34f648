"""`mixed_precision: auto`: bf16 autocast where the hardware multiplies bf16 natively, fp32 everywhere else.

CUDA GPUs with bf16 (Ampere and later) and x86 CPUs with AMX-BF16 or AVX512-BF16 run bf16 matmuls faster than
fp32. Other CPUs emulate them: on an AMD EPYC with neither (bench/RESULTS.md, 2026-12-01) a SmolLM2-135M training
step under bf16 autocast ran 16× slower than in fp32, so `auto` keeps fp32 there. A recipe whose weights are
stored in bfloat16 or float16 gets the matching autocast (the only ones its dtype allows).
"""

from __future__ import annotations

import functools
from pathlib import Path

import torch

CPU_BF16_FLAGS = ("amx_bf16", "avx512_bf16")
CPUINFO = Path("/proc/cpuinfo")


@functools.lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str]:
    """The CPU feature flags the kernel reports (empty where /proc/cpuinfo does not exist)."""
    try:
        text = CPUINFO.read_text()
    except OSError:
        return frozenset()
    line = next((ln for ln in text.splitlines() if ln.startswith("flags")), "")
    return frozenset(line.partition(":")[2].split())


def native_bf16() -> tuple[bool, str]:
    """(whether the device this process trains on multiplies bf16 natively, why)."""
    if torch.cuda.is_available():
        ok = torch.cuda.is_bf16_supported()
        return ok, f"CUDA device {torch.cuda.get_device_name()} {'supports' if ok else 'lacks'} bf16"
    found = [f for f in CPU_BF16_FLAGS if f in cpu_flags()]
    if found:
        return True, f"CPU has {', '.join(found)}"
    return False, f"CPU without {' or '.join(CPU_BF16_FLAGS)} (bf16 matmuls would be emulated, far slower than fp32)"


def resolve_mixed_precision(value: str, dtype: str) -> tuple[str, str]:
    """(`no` / `bf16` / `fp16`, why) for a recipe's `distributed.mixed_precision` and `dtype`; only `auto` changes."""
    if value != "auto":
        return value, "set in the recipe"
    if dtype in ("bfloat16", "float16"):
        return ("bf16" if dtype == "bfloat16" else "fp16"), f"the weights are {dtype}"
    ok, why = native_bf16()
    return ("bf16" if ok else "no"), why
