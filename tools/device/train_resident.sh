#!/usr/bin/env bash
# On the device: continue a model on a corpus carried in parts (corpus.sh) with the device-resident
# corpus and the compiled fixed-shape step (data.resident=true, trainer.compile=fixed), optionally
# after BASELINE seconds of the workers' pipeline, eager, on the same corpus (its speed, side by side).
# Training, export and the 15 MB parts back: train_bundled.sh.
# Env: PARTS, WEIGHTS   the corpus (corpus.sh)
#      INIT             checkpoint or run folder to start from (default asr/pretrained/model.pt)
#      BASELINE         seconds of the eager workers' pipeline first (default 0: none)
#      CALL_BUDGET, TOTAL_MINUTES, BATCH (default 800), RUN, EXTRA: as train_bundled.sh
set -uo pipefail
T0=$(date +%s)
source tools/device/setup.sh
source tools/device/corpus.sh
echo "corpus ready after $(( $(date +%s) - T0 )) s"
DATA="data.train_manifests=[/tmp/corpus.jsonl] data.dev_manifests=[] trainer.init_from=${INIT:-asr/pretrained/model.pt}"
DATA="$DATA data.max_duration=30 data.augment.speed.enabled=true data.augment.spec_augment.freq_width=15"
DATA="$DATA data.augment.spec_augment.time_masks=2 data.augment.spec_augment.time_width=25"
if (( ${BASELINE:-0} > 0 )); then
  timeout -s INT -k 30 "$BASELINE" python -m asr.cli.train recipe=bundled model=bundled $DATA \
    data.num_workers=$(( $(nproc) - 2 )) data.max_batch_seconds=${BATCH:-800} trainer.max_steps=100000 \
    trainer.save_every=1000000 trainer.val_every=1000000 trainer.log_every=10 trainer.tensorboard=false \
    trainer.progress_bar=false hydra.run.dir=exp/baseline > "$OUT/baseline.log" 2>&1
  echo "baseline (workers, eager):"; grep -E "audio-s/s" "$OUT/baseline.log" | tail -4 | cut -c1-200
fi
CALL_BUDGET=$(( ${CALL_BUDGET:-560} - ($(date +%s) - T0) )) BATCH=${BATCH:-800} COMPILE=${COMPILE:-fixed} \
  EXTRA="$DATA data.resident=true ${EXTRA:-}" bash tools/device/train_bundled.sh
