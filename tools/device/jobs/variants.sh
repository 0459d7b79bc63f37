#!/usr/bin/env bash
# On the device (tools/device/run.sh variants EXPERIMENT...): train several experiments
# (conf/experiment/<name>.yaml) side by side, one per GPU, then (last call) export each, score it on
# dev on the GPU and return the best by dev WER. Each run's folder is $ROOT/<experiment>.
#
# Why one plain single-GPU run per GPU rather than one DDP run over all of them: DDP over two GPUs
# gave only 1.35x one GPU (each rank is launch-bound and they wait on each other every step), so N
# independent runs buy N times the optimizer steps per device-minute and a comparison of settings.
#
# Like the train job, training may span several calls in a row: start the next call immediately
# after one returns (the machine stays warm for 30 s and keeps the git-ignored run folders); each
# run resumes from the checkpoint that SIGINT made it save, or else from its newest periodic one
# (every 1,000 steps: once one of four runs logged no save after the SIGINT, which only its
# DataLoader workers had logged receiving, and started the next call from scratch). The cosine
# schedule of every run is fitted to its experiment's trainer.max_minutes of training (or
# TOTAL_MINUTES), measured in the first call (trainer.fit_max_steps).
#
# Args: experiment names, at most one per GPU (the first ones run when there are more)
# Env: TOTAL_MINUTES training minutes over all calls (default: each experiment's trainer.max_minutes)
#      CALL_BUDGET   seconds this call may use (default 560)
#      FINAL         1: last call: keep time back to export, score dev and return models (default 0)
#      ROOT          folder of the run folders (default exp/variants)
#      EXTRA         asr-train overrides for every run (e.g. other manifests), after the experiment's
#      EVAL_DIR      folder whose dev.jsonl picks the best at the end (default .data/bundle)
#      PROFILE_STEPS e.g. "[1000,1020]": every run profiles those steps of its own (trainer.profile_steps;
#                    its profile.txt comes back in logs.tgz): where the real step's time goes
#      RETURN        how many of the best models by dev come back as 15 MB parts (default 1); every
#                    call first returns the one with the lowest recent training loss (a safety
#                    copy), which a FINAL call replaces once dev scores are in
set -uo pipefail
T0=$(date +%s)
CALL_BUDGET=${CALL_BUDGET:-560}
FINAL=${FINAL:-0}; RETURN=${RETURN:-1}; ROOT=${ROOT:-exp/variants}; EXTRA=${EXTRA:-}; EVAL_DIR=${EVAL_DIR:-.data/bundle}
source tools/device/jobs/experiments.sh
check_experiments "$@"
source tools/device/jobs/setup.sh
NGPU=$(nvidia-smi -L | wc -l)
LINES=("$@")
if (( ${#LINES[@]} > NGPU )); then echo "${#LINES[@]} variants but $NGPU GPUs: using the first $NGPU"; LINES=("${LINES[@]:0:NGPU}"); fi
WORKERS=$(( $(nproc) / NGPU - 2 )); (( WORKERS < 1 )) && WORKERS=1
RESERVE=$([ "$FINAL" = 1 ] && echo 150 || echo 40)
LEFT=$(( CALL_BUDGET - ($(date +%s) - T0) - RESERVE ))
echo "gpus=$NGPU variants=${#LINES[@]} workers/run=$WORKERS: ${LEFT}s of training in this call, schedule over ${TOTAL_MINUTES:-trainer.max_minutes of each experiment} min"
(( LEFT >= 30 )) || { echo "CALL_BUDGET=$CALL_BUDGET leaves no time to train (${RESERVE}s are kept back)"; exit 1; }

set -f  # overrides such as data.train_manifests=[a,b] are words, not file patterns
for i in "${!LINES[@]}"; do
  name=${LINES[$i]}
  dir=$ROOT/$name; mkdir -p "$dir"
  [ -d "$dir/checkpoints" ] && echo "$name: resuming from $(ls "$dir/checkpoints" | grep ckpt | tail -1)"
  # The experiment sets the schedule (max_steps, fit_max_steps, max_minutes) and the
  # val/save/log steps; these overrides are the machine's (workers, no TensorBoard, the run folder).
  # shellcheck disable=SC2086  # EXTRA holds separate words on purpose
  CUDA_VISIBLE_DEVICES=$i timeout -s INT -k 60 "$LEFT" python -m asr.cli.train experiment="$name" \
    trainer.tensorboard=false trainer.progress_bar=false data.num_workers=$WORKERS \
    ${TOTAL_MINUTES:+trainer.max_minutes=$TOTAL_MINUTES} hydra.run.dir="$dir" \
    ${PROFILE_STEPS:+trainer.profile_steps=$PROFILE_STEPS} $EXTRA >> "$dir/stdout.log" 2>&1 &
done
set +f
wait
echo "training ended after $(( $(date +%s) - T0 )) s"
for i in "${!LINES[@]}"; do
  name=${LINES[$i]}
  echo "== $name: $(grep -E 'audio-s/s|max_steps ' "$ROOT/$name/stdout.log" | tail -1 | cut -c1-160)"
  grep -m2 -E "Error|error" "$ROOT/$name/stdout.log" | cut -c1-200
done

# A safety copy first, in every call: the variant with the lowest recent training loss, exported
# and in $OUT before anything slow runs (a whole final call was once lost, whose scoring ran past
# the device's 10-minute limit: nothing came back).
safety=$(for name in "${LINES[@]}"; do
         echo "$(grep -oE ' loss [0-9.]+' "$ROOT/$name/stdout.log" | tail -1 | cut -d' ' -f3) $name"; done \
         | sort -n | head -1 | cut -d' ' -f2)
python tools/export_model.py "$ROOT/$safety" "/tmp/$safety.pt" && split -b 15M "/tmp/$safety.pt" "$OUT/$safety.pt.part-"

if [ "$FINAL" = 1 ]; then
  # Choose by WER on dev.jsonl only (synthetic dev voices + real dev speakers), never by the test
  # sets; those are scored afterwards on any machine (asr-eval on the CPU takes about a minute).
  # Every scoring has a deadline that leaves 30 s to return the files.
  DEADLINE=$(( CALL_BUDGET - ($(date +%s) - T0) - 30 ))
  echo "scoring dev with a ${DEADLINE}s deadline"
  rm -f "$ROOT"/*/scores.txt  # only this call's scores choose
  (( DEADLINE >= 20 )) || LINES=()  # no time left to score: the safety copy stays
  for i in "${!LINES[@]}"; do
    name=${LINES[$i]}
    (
      # the safety copy's variant is exported already
      [ "$name" = "$safety" ] || python tools/export_model.py "$ROOT/$name" "/tmp/$name.pt" > /dev/null || exit 1
      printf '%s dev ' "$name" > "$ROOT/$name/scores.txt"
      CUDA_VISIBLE_DEVICES=$i timeout -k 5 "$DEADLINE" python -m asr.cli.evaluate "/tmp/$name.pt" "$EVAL_DIR/dev.jsonl" \
        --worst 0 --num-workers 2 2>> "$ROOT/$name/eval_stderr.log" | head -1 >> "$ROOT/$name/scores.txt"
    ) &
  done
  wait
  cat "$ROOT"/*/scores.txt 2>/dev/null | tee "$OUT/scores.txt"
  best=$(grep -h " utterances" "$ROOT"/*/scores.txt 2>/dev/null | sed -E 's/^(\S+) .*WER ([0-9.]+)%.*/\2 \1/' | sort -n | head -"$RETURN" | cut -d' ' -f2)
  if [ -n "$best" ]; then
    rm -f "$OUT/$safety.pt.part-"*
    for name in $best; do split -b 15M "/tmp/$name.pt" "$OUT/$name.pt.part-"; done
  else
    echo "no dev score came back in time: returning the safety copy ($safety)"
  fi
fi
tar czf "$OUT/logs.tgz" $ROOT/*/stdout.log $ROOT/*/metrics.jsonl $ROOT/*/summary.json $ROOT/*/eval_stderr.log $ROOT/*/profile.txt 2>/dev/null
ls -la "$OUT"; echo "total $(( $(date +%s) - T0 )) s"
