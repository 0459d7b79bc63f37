#!/usr/bin/env bash
# The one entry point for the lent GPU machine (tools/device/README.md), run from the repository root:
#
#   bash tools/device/run.sh <job> [args...]
#
# Jobs (tools/device/jobs/<job>.sh; each installs the carried wheels once per call, jobs/setup.sh):
#   bench                 GPU check, training-step profile and GPU benchmarks (COMPILE=1: compiled rows)
#   train [EXPERIMENT]    one DDP run over every GPU (default: recipe=bundled model=bundled on
#                         .data/bundle), resumable over calls, fp16 export returned
#   variants EXPERIMENT...     one single-GPU run per experiment (conf/experiment/<name>.yaml), side by
#                         side; FINAL=1 scores dev and returns the best
#   synth-train EXPERIMENT...  make ~100 h of synthetic speech there, then `variants` on it
#   profile NAME SECONDS FIRST_STEP [OVERRIDES...]   the trainer's own steps profiled
#   speed                 the trainer's speed on real data: workers eager, resident graphed, resident compiled
#   corpus                keep the corpus parts carried in this call (PARTS) for the next call (jobs/corpus.sh)
#   train-resident        continue a model on a corpus carried in parts, device-resident corpus, graphed or
#                         compiled fixed-shape step; BASELINE / PROBE time the other pipelines beside it
#   pack-synth            HERE, not on the device: pack synth-train's carry into .gpu/synth
# Each job's header lists its environment variables. Output goes under $OUT (the device's result folder).
set -uo pipefail
JOBS="bench train variants synth-train profile speed corpus train-resident pack-synth"
usage() { awk 'NR == 1 { next } /^#/ { sub(/^# ?/, ""); print; next } { exit }' "$0"; }  # the comment above
job=${1:-}
[ $# -gt 0 ] && shift
case "$job" in
  bench|train|variants|profile|speed|corpus) ;;
  train-resident) job=train_resident ;;
  synth-train) job=synth_train ;;
  pack-synth) job=pack_synth ;;
  help|-h|--help) usage; exit 0 ;;
  "") echo "run.sh: name a job ($JOBS); run.sh help says more" >&2; exit 2 ;;
  *) echo "run.sh: unknown job '$job' (jobs: $JOBS)" >&2; exit 2 ;;
esac
if [ "$job" != pack_synth ] && [ -z "${OUT:-}" ]; then
  echo "run.sh: \$OUT is not set: device jobs write their results there (the device sets it)" >&2; exit 2
fi
exec bash "tools/device/jobs/$job.sh" "$@"
