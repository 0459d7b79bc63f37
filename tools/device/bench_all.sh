#!/usr/bin/env bash
# On the device, one call: GPU correctness check, the training-step profile and the two GPU
# benchmarks of issue 7, each under its own time limit, results under $OUT.
set -uo pipefail
T0=$(date +%s)
source tools/device/setup.sh
run() {  # run <seconds> <name> <command...>
  local limit=$1 name=$2; shift 2
  local t=$(date +%s)
  timeout "$limit" "$@" > "$OUT/$name.txt" 2>&1
  echo "== $name rc=$? in $(( $(date +%s) - t )) s"; tail -n 30 "$OUT/$name.txt" | cut -c1-200
}
if [ "${COMPILE:-0}" = 1 ]; then
  # COMPILE=1: CUDA graphs beside eager (session 6 measured rwkv7_cudagraphs and rwkv7_compiled:
  # BENCHMARKS.md), now also over dynamic shapes (whole model, blocks) as a trainer would need them,
  # at 30 s and then at 10 s; the loss columns check each row against eager. Inductor compiles in
  # the first steps (a minute or two per row), so this call does nothing else.
  export TORCHINDUCTOR_CACHE_DIR=/tmp/inductor
  # rwkv7_graphed (eager model, make_graphed_callables: no compiler) first: it takes seconds to warm up.
  run 300 bench_train python tools/bench_train.py --models conformer,rwkv7,rwkv7_graphed,rwkv7_cudagraphs_blocks,rwkv7_cudagraphs_dynamic --lengths 30
  left=$(( ${CALL_BUDGET:-560} - ($(date +%s) - T0) ))
  [ $left -gt 60 ] && run $left bench_train_10s python tools/bench_train.py --models conformer,rwkv7,rwkv7_graphed,rwkv7_cudagraphs_blocks,rwkv7_cudagraphs --lengths 10
else
  run 110 profile python tools/profile_train_step.py --batch 64 --seconds 4
  run 120 check_gpu python tools/check_gpu.py
  run 170 bench_train python tools/bench_train.py
  run 150 bench_kernels python tools/bench_kernels.py
fi
(cd /tmp/tc && find . -name "*.autotune.json" | tar czf "$OUT/autotune.tgz" -T -)
echo "total $(( $(date +%s) - T0 )) s"
