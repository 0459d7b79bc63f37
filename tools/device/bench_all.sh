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
  # COMPILE=1: our model with CUDA graphs and with compiled blocks (trainer.compile=true) beside
  # eager at 30 s, then at 10 s (the first-step loss column checks each against eager).
  # Inductor compiles in the first steps (a minute or more each), so this call does nothing else.
  export TORCHINDUCTOR_CACHE_DIR=/tmp/inductor
  run 280 bench_train python tools/bench_train.py --models conformer,rwkv7,rwkv7_cudagraphs,rwkv7_compiled --lengths 30
  left=$(( ${CALL_BUDGET:-560} - ($(date +%s) - T0) ))
  [ $left -gt 60 ] && run $left bench_train_10s python tools/bench_train.py --models conformer,rwkv7,rwkv7_compiled --lengths 10
else
  run 110 profile python tools/profile_train_step.py --batch 64 --seconds 4
  run 120 check_gpu python tools/check_gpu.py
  run 170 bench_train python tools/bench_train.py
  run 150 bench_kernels python tools/bench_kernels.py
fi
(cd /tmp/tc && find . -name "*.autotune.json" | tar czf "$OUT/autotune.tgz" -T -)
echo "total $(( $(date +%s) - T0 )) s"
