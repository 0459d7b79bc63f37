#!/usr/bin/env bash
# On the device (tools/device/run.sh bench), one call: GPU correctness check, the training-step profile and the two GPU
# benchmarks of issue 7, each under its own time limit, results under $OUT.
set -uo pipefail
T0=$(date +%s)
source tools/device/jobs/setup.sh
run() {  # run <seconds> <name> <command...>
  local limit=$1 name=$2; shift 2
  local t=$(date +%s)
  timeout "$limit" "$@" > "$OUT/$name.txt" 2>&1
  echo "== $name rc=$? in $(( $(date +%s) - t )) s"; tail -n 30 "$OUT/$name.txt" | cut -c1-200
}
if [ "${COMPILE:-0}" = 1 ]; then
  # COMPILE=1: CUDA graphs and activation checkpointing beside eager, at 30 s (LENGTHS), then the
  # kernels a CUDA-graph step replays (the whole model compiled for the shape, profiled without the
  # graphs). First the GPU-only tests of the wkv op (its fla backward against fla's autograd).
  # Inductor compiles in the first steps of each compiled row (a minute or two each).
  export TORCHINDUCTOR_CACHE_DIR=/tmp/inductor
  [ "${GPU_TESTS:-1}" = 1 ] && run 120 gpu_tests python -m pytest -q -p no:cacheprovider tests/test_wkv_parity.py -k "cuda or fla"
  run ${BENCH_LIMIT:-330} bench_train python tools/bench_train.py --lengths ${LENGTHS:-30} \
    --models ${MODELS:-conformer,conformer12,rwkv7,rwkv7_checkpointed,rwkv7_graphed,rwkv7_cudagraphs,rwkv7_cudagraphs_checkpointed}
  left=$(( ${CALL_BUDGET:-560} - ($(date +%s) - T0) ))
  [ $left -gt 60 ] && run $left profile_static python tools/profile_train_step.py --model default --batch 21 --seconds 30 --compile static --rows 40
else
  run 110 profile python tools/profile_train_step.py --batch 64 --seconds 4
  run 120 check_gpu python tools/check_gpu.py
  run 170 bench_train python tools/bench_train.py
  run 150 bench_kernels python tools/bench_kernels.py
fi
(cd /tmp/tc && find . -name "*.autotune.json" | tar czf "$OUT/autotune.tgz" -T -)
echo "total $(( $(date +%s) - T0 )) s"
