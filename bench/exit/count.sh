#!/bin/bash
# Count the launches of bench/exit/job.py that abort at exit ("terminate called without an active exception").
# usage: MODE=held-destroy SRC=/path/to/checkout bench/exit/count.sh 30   (SRC: the checkout to import sparsegpt from)
N=${1:-30}
JOB=$(cd "$(dirname "$0")" && pwd)/job.py
export OMP_NUM_THREADS=1 PYTHONWARNINGS=ignore CUDA_VISIBLE_DEVICES= PYTHONPATH=${SRC:-$(cd "$(dirname "$0")/../.." && pwd)}
fail=0; abort=0
for i in $(seq "$N"); do
  log=$(mktemp)
  timeout 300 torchrun --nproc_per_node 2 --master_port $((20000 + RANDOM % 20000)) "$JOB" > "$log" 2>&1 || fail=$((fail+1))
  grep -q "terminate called" "$log" && abort=$((abort+1))
  rm -f "$log"
done
echo "MODE=$MODE SRC=$PYTHONPATH launches=$N failed=$fail aborts=$abort"
