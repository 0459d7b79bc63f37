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
# COMPILE=1: also the compiled blocks (trainer.compile) in the profile and the training benchmark;
# their first steps compile for a few minutes, so the limits grow.
if [ "${COMPILE:-0}" = 1 ]; then C="--compile"; P=300; B=330; else C=""; P=110; B=170; fi
run $P profile python tools/profile_train_step.py --batch 64 --seconds 4 $C
run 120 check_gpu python tools/check_gpu.py
run $B bench_train python tools/bench_train.py $C
[ -z "$C" ] && run 150 bench_kernels python tools/bench_kernels.py
(cd /tmp/tc && find . -name "*.autotune.json" | tar czf "$OUT/autotune.tgz" -T -)
echo "total $(( $(date +%s) - T0 )) s"
