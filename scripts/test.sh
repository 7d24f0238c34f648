#!/usr/bin/env bash
# The test command (README Quickstart, and .ci/run): install once, then the whole suite.
#   bash scripts/test.sh            # everything (what CI runs)
#   bash scripts/test.sh --fast     # the everyday lane: everything but the tests marked `slow` (multi-process
#                                   # launches, kill/resume, the real model), ~2 min idle on 2 cores (2026-12-06)
# Further arguments go to pytest (e.g. `bash scripts/test.sh --fast tests/test_solver.py -x`).
set -euo pipefail
cd "$(dirname "$0")/.."
marker=()
if [ "${1:-}" = "--fast" ]; then
  shift
  marker=(-m "not slow")
fi
bash scripts/setup.sh
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2} HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
# lint + import order first: seconds, and a failure names file and line
${PYTHON:-python3} -m ruff check --quiet sparsegpt tests bench train examples
exec ${PYTHON:-python3} -m pytest -q "${marker[@]}" "$@"
