#!/usr/bin/env bash
# On the device: continue a model on a corpus carried in parts (jobs/corpus.sh) with the device-resident
# corpus (data.resident=true), optionally after BASELINE seconds of the workers' pipeline, eager, on
# the same corpus (its speed, side by side). Training, export and the 15 MB parts back:
# jobs/train.sh (COMPILE picks trainer.compile; EXTRA="trainer.cuda_graphs=true" the graphed step).
# Args: [EXPERIMENT]    an experiment config (conf/experiment) that holds the run's settings (default
#                       bundled_run10_real_kokoro); only the corpus path and the run length come from here
# Env: PARTS, WEIGHTS   the corpus (jobs/corpus.sh)
#      INIT             checkpoint or run folder to start from (default asr/pretrained/model.pt)
#      BASELINE         seconds of the eager workers' pipeline first (default 0: none)
#      PROBE            seconds of trainer.compile=fixed after training, from the new weights, in a run
#                       of its own: each shape's compilation time and the compiled step's speed (default 0)
#      SAVE_CACHE       1: the compile caches back in parts (jobs/setup.sh)
#      CALL_BUDGET, TOTAL_MINUTES, BATCH (default: the experiment's), RUN, COMPILE (default fixed), EXTRA: as jobs/train.sh
set -uo pipefail
T0=$(date +%s)
source tools/device/jobs/setup.sh
source tools/device/jobs/corpus.sh
echo "corpus ready after $(( $(date +%s) - T0 )) s"
EXPERIMENT=${1:-bundled_run10_real_kokoro}; RUN=${RUN:-exp/device_run}; PROBE=${PROBE:-0}
DATA="data.train_manifests=[/tmp/corpus.jsonl] data.dev_manifests=[]"
SHORT="trainer.max_steps=100000 trainer.save_every=1000000 trainer.val_every=1000000 trainer.log_every=10"
SHORT="$SHORT trainer.tensorboard=false trainer.progress_bar=false data.num_workers=$(( $(nproc) - 2 )) ${BATCH:+data.max_batch_seconds=$BATCH}"
stamp() { while IFS= read -r line; do echo "$(( $(date +%s) - T0 )) $line"; done; }
if (( ${BASELINE:-0} > 0 )); then
  timeout -s INT -k 30 "$BASELINE" python -m asr.cli.train experiment=$EXPERIMENT $DATA $SHORT \
    data.resident=false trainer.compile=false trainer.init_from=${INIT:-asr/pretrained/model.pt} hydra.run.dir=exp/baseline 2>&1 | stamp > "$OUT/baseline.log"
  echo "baseline (workers, eager):"; grep -E "audio-s/s" "$OUT/baseline.log" | tail -4 | cut -c1-200
fi
CALL_BUDGET=$(( ${CALL_BUDGET:-560} - ($(date +%s) - T0) - PROBE )) COMPILE=${COMPILE:-fixed} RUN=$RUN \
  EXTRA="$DATA trainer.init_from=${INIT:-asr/pretrained/model.pt} data.resident=true ${EXTRA:-}" bash tools/device/jobs/train.sh "$EXPERIMENT"
if (( PROBE > 0 )); then
  timeout -s INT -k 20 $(( PROBE - 20 )) python -m asr.cli.train experiment=$EXPERIMENT $DATA $SHORT \
    trainer.init_from=$RUN data.resident=true trainer.compile=fixed hydra.run.dir=exp/probe_fixed 2>&1 | stamp > "$OUT/probe_fixed.log"
  echo "probe (resident, compile=fixed):"; grep -E "audio-s/s|Error|error" "$OUT/probe_fixed.log" | tail -8 | cut -c1-200
fi
if [ -n "${SAVE_CACHE:-}" ]; then save_compile_cache; fi
