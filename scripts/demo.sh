#!/usr/bin/env bash
# The demo (README Quickstart): SmolLM2-135M pruned to 90 % sparsity in one shot, then healed by fine-tuning,
# offline, on CPU, in 4-9 minutes on 2 cores. Run it again to resume; the run lives in runs/demo.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2} HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
${PYTHON:-python3} -m accelerate.commands.launch --num_processes 1 --num_machines 1 --mixed_precision no \
  --dynamo_backend no --cpu train/progressive.py --recipe recipes/demo.yaml --run-dir runs/demo "$@"
${PYTHON:-python3} -m sparsegpt.cli report runs/demo
