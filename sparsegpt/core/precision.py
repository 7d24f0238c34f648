"""`mixed_precision: auto`: bf16 autocast where the hardware multiplies bf16 natively, fp32 everywhere else.

CUDA GPUs with bf16 (Ampere and later) get bf16 autocast over fp32 weights, the field's default there. CPUs get
fp32, with or without native bf16: where bf16 is emulated (an AMD EPYC without AMX-BF16/AVX512-BF16, bench/RESULTS.md,
2026-12-01) a SmolLM2-135M training step ran 16× slower than fp32; where it is native (an AMX Xeon, 2026-12-06) it
ran 1.43× faster, but the one measured heal (one-shot 90 %, 16 k tokens, lr 1e-3) ended at 223.8 / 1142 perplexity
against fp32's 198.0 / 1024 — one seed each, so not yet known to be noise. Until a comparison over >= 2 seeds shows
bf16 within fp32's seed spread on such a CPU, `auto` does not trade quality for that speed; set
`mixed_precision: bf16` to choose it. A recipe whose weights are
stored in bfloat16 or float16 gets the matching autocast (the only ones its dtype allows).

Half-precision weights are trained only where float32 master weights exist (`check_master_weights`): under
DeepSpeed ZeRO 1-3 (or stage 0 with its own bf16). Without DeepSpeed the combination is refused rather than given
a master copy here: bf16 weights, gradients, fp32 master and Adam moments cost 2 + 2 + 4 + 8 bytes per weight, fp32
weights and gradients under bf16 autocast 4 + 4 + 8 with the same bf16 matmuls: the alternative costs the same,
is exact, and needs no second copy for mask enforcement and checkpoints to keep in step.
"""

from __future__ import annotations

import functools
from pathlib import Path

import torch

from sparsegpt.core.errors import UserError

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
    if ok and not torch.cuda.is_available():  # native on this CPU, but its quality is not shown yet (docstring)
        return "no", f"{why}, but bf16 healing on CPUs is not yet shown to match fp32 (set mixed_precision: bf16)"
    return ("bf16" if ok else "no"), why


HALF = {torch.bfloat16: "bfloat16", torch.float16: "float16"}


def check_master_weights(dtypes: set[torch.dtype], *, zero_stage: int, mixed_precision: str) -> None:
    """UserError unless every optimizer update lands in float32: half-precision trainable weights are stepped
    in place by a plain optimizer, so an update below half an ulp of the weight (bf16: 2^-8 relative) rounds away
    and training stalls without a sign. DeepSpeed keeps float32 masters under ZeRO 1-3, and at stage 0 only when
    its own bf16/fp16 is on (`mixed_precision` matching the weights); `zero_stage` -1 means no DeepSpeed."""
    half = sorted(HALF[d] for d in dtypes if d in HALF)
    if not half or zero_stage >= 1:
        return
    if zero_stage == 0 and mixed_precision == {"bfloat16": "bf16", "float16": "fp16"}[half[0]]:
        return
    where = "DeepSpeed without ZeRO and without its matching mixed precision" if zero_stage == 0 else "no DeepSpeed"
    raise UserError(f"{half[0]} trainable weights with {where} would train with no float32 master copy (small "
                    "updates round away silently); load float32 weights (--dtype float32 / recipe dtype: float32) "
                    "and train under mixed precision bf16, or use DeepSpeed ZeRO 1-3, which keeps float32 masters")


FORWARD_DTYPES = ("auto", "float32", "bfloat16")


def resolve_forward_dtype(value: str, weights: torch.dtype) -> tuple[torch.dtype | None, str]:
    """(the autocast dtype of the pruning pass's layer forwards, None for the weights' own; why) for
    `prune.forward_dtype`. Only float32 weights are autocast: half-precision weights already run in their dtype.
    `auto` is bfloat16 where this process's device multiplies it natively (`native_bf16`), float32 elsewhere."""
    if value not in FORWARD_DTYPES:
        raise UserError(f"forward_dtype {value!r} is unknown; choose one of {list(FORWARD_DTYPES)}")
    if weights != torch.float32:
        return None, f"the weights are {HALF.get(weights, weights)}: the forwards run in it"
    if value != "auto":
        return (torch.bfloat16 if value == "bfloat16" else None), "set in the config"
    ok, why = native_bf16()
    return (torch.bfloat16 if ok else None), why
