#!/usr/bin/env bash
# One-GPU check, at most 8 minutes; installs nothing (run `bash scripts/setup.sh` first). From the repo root:
#
#   bash bench/gpu_check.sh                         # a random-init ~358M-param Llama (SmolLM2 vocab), built here
#   GPU_CHECK_MODEL=smollm2-135m bash bench/gpu_check.sh   # the offline demo model instead
#
# (i)   a short progressive run: bf16, ZeRO-3 on ONE process, KD from the dense model on, 2 small stages
#       (50 % then 70 %), via `accelerate launch --config_file recipes/accelerate/zero3.yaml --num_processes 1
#       --mixed_precision bf16 train/progressive.py --recipe R`; torch.cuda.max_memory_allocated() per phase
#       (custom eval hook bench/gpu/gpu_hooks.py:cuda_peak) printed next to `train/progressive.py --recipe R --dry-run`;
# (ii)  `pytest -m gpu tests/` (CUDA-marked tests) and tests/test_zero.py (see the TODO there: it runs on CPU);
# (iii) `python bench/inference/inference.py --gpu` (the 2:4 semi-structured section).
# Everything goes to stdout and, when $OUT is set, also to $OUT/gpu_check.txt (plus the run's metrics.jsonl and
# the recipe). Each step has a time cap inside the overall 8-minute budget; a failed or timed-out step is
# reported and the script goes on; the exit status is non-zero if any step failed.
# Not yet run on a GPU. Checked off-GPU (2026-12-01): bash -n and shellcheck 0.11 clean; GPU_CHECK_DRY_ONLY=1
# (recipe + dry-run estimate only) passes; step (i)'s launch line with this recipe, rehearsed on CPU
# (DS_ACCELERATOR=cpu, a 3M-param Llama, 2 steps), completed both stages with the hook reporting cuda 0.0.
set -euo pipefail

cd "$(dirname "$0")/.."
REPO=$PWD
BUDGET_S=470           # whole script; each step gets min(its cap, what is left)
SECONDS=0

if [[ -n "${OUT:-}" ]]; then
    mkdir -p "$OUT"
    exec > >(tee "$OUT/gpu_check.txt") 2>&1
fi

export OMP_NUM_THREADS=${OMP_NUM_THREADS:-4} HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export SPARSEGPT_NO_PROGRESS=1 PYTHONWARNINGS=ignore
export PYTHONPATH="$REPO/bench/gpu:$REPO${PYTHONPATH:+:$PYTHONPATH}"   # bench: the custom hook module gpu_hooks

MODEL=${GPU_CHECK_MODEL:-random-llama-350m}
WORK=$(mktemp -d -t gpu-check-XXXXXX)
trap 'rm -rf "$WORK"' EXIT
FAILED=()

# step NAME CAP_SECONDS COMMAND...: run COMMAND under `timeout` (output also appended to $STEP_LOG if set), record
# a failure, never abort the script
step() {
    local name=$1 cap=$2 left rc
    shift 2
    left=$((BUDGET_S - SECONDS))
    if ((left < 10)); then
        echo "=== $name: SKIPPED (budget spent at ${SECONDS}s)"
        FAILED+=("$name (skipped)")
        return 0
    fi
    if ((cap > left)); then cap=$left; fi
    echo "=== $name (cap ${cap}s, at ${SECONDS}s): $*"
    set +e
    timeout --signal=TERM --kill-after=10 "$cap" "$@" 2>&1 | tee -a "${STEP_LOG:-/dev/null}"
    rc=${PIPESTATUS[0]}
    set -e
    if ((rc == 0)); then
        echo "=== $name: ok (at ${SECONDS}s)"
        return 0
    fi
    if ((rc == 124)); then echo "=== $name: TIMED OUT after ${cap}s"; else echo "=== $name: FAILED (exit $rc)"; fi
    FAILED+=("$name (exit $rc)")
}

echo "gpu_check: $(date -u '+%Y-%m-%d %H:%M UTC'), model $MODEL, work dir $WORK"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "nvidia-smi: not found"
python -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda, "available",
           torch.cuda.is_available(), torch.cuda.get_device_name() if torch.cuda.is_available() else "")'

# --- (i) progressive run, bf16, ZeRO-3 on one process, KD ------------------------------------------------------------
if [[ $MODEL == random-llama-350m ]]; then
    MODEL_PATH=$WORK/llama-350m
    step "build random-init Llama 350m" 90 python -c "
import sys; from pathlib import Path; from memory import build_random_llama
build_random_llama('350m', Path(sys.argv[1]))" "$MODEL_PATH"
else
    MODEL_PATH=$MODEL
fi

RECIPE=$WORK/gpu_check.yaml
cat >"$RECIPE" <<EOF
# written by bench/gpu_check.sh: 2 small stages, ZeRO-3 on one GPU, bf16 compute over fp32 weights, KD on
name: gpu_check
model: $MODEL_PATH
dtype: float32
seed: 0
data:
  calibration: stdlib-docs
  finetune: stdlib-docs
  eval: [stdlib-docs]
distributed:
  zero_stage: 3
  micro_batch_size: 1
  grad_accum: 1
  mixed_precision: bf16
defaults:
  prune: {method: sparsegpt, nsamples: 16, seqlen: 128, batch_size: 8}
  finetune: {steps: 8, seqlen: 128, lr: 1.0e-5, warmup_steps: 1, kd: {teacher: dense, logit_weight: 1.0}}
  eval:
    hooks:
      - {type: custom, path: "gpu_hooks:cuda_peak", name: cuda}
      - {type: perplexity, source: stdlib-docs, seqlen: 128, max_windows: 8}
      - {type: sparsity}
    phases: [pruned, finetuned]
stages:
  - {name: s50, target: 0.5}
  - {name: s70, target: 0.7}
EOF
if [[ -n "${OUT:-}" ]]; then cp "$RECIPE" "$OUT/gpu_check.yaml"; fi

STEP_LOG=$WORK/dry_run.txt step "dry-run estimate" 60 python train/progressive.py --recipe "$RECIPE" --dry-run
if [[ ${GPU_CHECK_DRY_ONLY:-0} == 1 ]]; then   # the CPU-only part: recipe + estimate (how it was checked off-GPU)
    echo "GPU_CHECK_DRY_ONLY=1: stopping after the dry run"
    if ((${#FAILED[@]})); then exit 1; fi
    exit 0
fi
RUN_DIR=$WORK/run
STEP_LOG=$WORK/progressive.txt step "progressive bf16 ZeRO-3 x1 + KD" 240 \
    accelerate launch --config_file recipes/accelerate/zero3.yaml --num_processes 1 --mixed_precision bf16 \
    train/progressive.py --recipe "$RECIPE" --run-dir "$RUN_DIR"
if [[ -n "${OUT:-}" && -f "$RUN_DIR/metrics.jsonl" ]]; then cp "$RUN_DIR/metrics.jsonl" "$OUT/metrics.jsonl"; fi

echo "--- CUDA peak per phase (max_memory_allocated since the previous reading) vs the dry-run estimate"
echo "    pruned = previous stage's finetuned hooks + this prune; finetuned = this stage's pruned hooks + fine-tune"
grep '^GPU_PEAK' "$WORK/progressive.txt" 2>/dev/null || echo "(no GPU_PEAK lines: the run failed or had no CUDA)"
grep -E '^(prune|finetune) |^  ' "$WORK/dry_run.txt" 2>/dev/null || echo "(no dry-run estimate)"

# --- (ii) tests --------------------------------------------------------------------------------------------------------
step "pytest -m gpu" 60 python -m pytest -q -m gpu tests/
# TODO(gpu): tests/test_zero.py hardcodes DS_ACCELERATOR=cpu and CUDA_VISIBLE_DEVICES="" in its launches (gloo, two
# CPU processes), so here it re-checks the CPU path only; the ZeRO-3 mask checks have no CUDA variant yet (and a
# one-GPU machine cannot run its 2-process launches on CUDA anyway). The only `gpu`-marked test is the 2:4 one in
# tests/test_compact.py. Run it anyway: it shows the CPU path still passes with this machine's DeepSpeed build.
step "tests/test_zero.py (CPU/gloo, see TODO)" 100 python -m pytest -q -x tests/test_zero.py

# --- (iii) 2:4 inference on CUDA ---------------------------------------------------------------------------------------
step "bench/inference/inference.py --gpu" 60 python bench/inference/inference.py --gpu

echo "gpu_check: done in ${SECONDS}s"
if ((${#FAILED[@]})); then
    printf 'FAILED: %s\n' "${FAILED[@]}"
    exit 1
fi
echo "all steps ok"
