#!/usr/bin/env bash
# The test command (README Quickstart, and .ci/run): install once, then the whole suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2} HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
# lint + import order first: seconds, and a failure names file and line
${PYTHON:-python3} -m ruff check --quiet sparsegpt tests bench train
exec ${PYTHON:-python3} -m pytest -q "$@"
