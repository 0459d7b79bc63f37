#!/usr/bin/env bash
# On the device (tools/device/run.sh train [EXPERIMENT]): train the bundled model on every GPU of the
# machine (torchrun + DDP), one call or several in a row, then export it. Without EXPERIMENT it trains
# recipe=bundled model=bundled (the carried .data/bundle); with one, experiment=EXPERIMENT
# (conf/experiment/), whose corpus must be on the machine. Run it again right after a call returns
# (the machine stays warm for 30 s and keeps the git-ignored run folder) and it resumes where the
# last call stopped.
#
# The cosine schedule is fitted to TOTAL_MINUTES of training (trainer.fit_max_steps); each call trains
# until its own time is up, then SIGINT makes the trainer finish the step and save a checkpoint. The
# fp16 export comes back in 15 MB parts: cat model.pt.part-* > asr/pretrained/model.pt
#
# Env: CALL_BUDGET  seconds this call may use (default 560)
#      TOTAL_MINUTES training minutes over all calls (default: this call's)
#      BATCH        padded audio-seconds per GPU and step (default 400 without EXPERIMENT, else the experiment's)
#      COMPILE      a trainer.compile value (1: true; fixed: with data.resident in EXTRA), falling back to
#                   eager if it fails early (default 0: eager)
#      EXTRA        more asr-train overrides, e.g. "trainer.init_from=exp/model.pt"
#      FALLBACK     overrides for the eager retry when the first attempt fails early (e.g. trainer.cuda_graphs=false)
#      RUN          the run folder (default exp/device_run; a new one starts afresh or from init_from)
set -uo pipefail
T0=$(date +%s)
CALL_BUDGET=${CALL_BUDGET:-560}; COMPILE=${COMPILE:-0}; EXTRA=${EXTRA:-}
RUN=${RUN:-exp/device_run}
if [ $# -gt 0 ]; then
  source tools/device/jobs/experiments.sh
  check_experiments "$1"
  CONFIG="experiment=$1"; BATCH=${BATCH:-}
else
  CONFIG="recipe=bundled model=bundled"; BATCH=${BATCH:-400}
fi
source tools/device/jobs/setup.sh
NGPU=$(nvidia-smi -L | wc -l)
WORKERS=$(( $(nproc) / NGPU - 2 ))
[ -d $RUN/checkpoints ] && echo "resuming from $(ls $RUN/checkpoints | grep ckpt | tail -1)"
COMMON="$CONFIG trainer.tensorboard=false trainer.progress_bar=false data.num_workers=$WORKERS ${BATCH:+data.max_batch_seconds=$BATCH} $EXTRA"
train() {  # train <trainer.compile value> [more overrides]
  local left=$(( CALL_BUDGET - ($(date +%s) - T0) - 45 ))
  local total=${TOTAL_MINUTES:-$(python -c "print(($left - 15) / 60)")}
  echo "$CONFIG gpus=$NGPU workers/gpu=$WORKERS batch=${BATCH:-(experiment)}s/gpu compile=$1 ${2:-}: ${left}s in this call, schedule over ${total} min"
  # shellcheck disable=SC2086
  timeout -s INT -k 60 $left torchrun --standalone --nproc_per_node $NGPU -m asr.cli.train $COMMON \
    trainer.compile=$1 trainer.max_steps=1000000 trainer.fit_max_steps=true trainer.max_minutes=$total \
    trainer.val_every=1000 trainer.log_every=100 hydra.run.dir=$RUN ${2:-} >> $OUT/train_stdout.log 2>&1
}
[ "$COMPILE" = 1 ] && COMPILE=true
[ "$COMPILE" = 0 ] && COMPILE=false
train "$COMPILE"; rc=$?
# A fast setting that fails early (before any interrupt) falls back to the plain eager step.
if [ $rc != 0 ] && [ $(( $(date +%s) - T0 )) -lt 240 ] && ! grep -q "interrupted" $OUT/train_stdout.log \
   && { [ "$COMPILE" != false ] || [ -n "${FALLBACK:-}" ]; }; then
  echo "run failed (rc=$rc), training eagerly"; grep -m3 -E "Error|error" $OUT/train_stdout.log | cut -c1-200
  train false "${FALLBACK:-}"
fi
echo "training ended after $(( $(date +%s) - T0 )) s"
grep -E "audio-s/s|WER|max_steps|stopping|interrupted|resumed" $OUT/train_stdout.log | tail -14 | cut -c1-200
cp $RUN/metrics.jsonl $RUN/summary.json $OUT/ 2>/dev/null
python tools/export_model.py $RUN /tmp/model.pt && split -b 15M /tmp/model.pt $OUT/model.pt.part-
ls -la $OUT; echo "total $(( $(date +%s) - T0 )) s"
