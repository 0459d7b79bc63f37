#!/usr/bin/env bash
# On the device (tools/device/run.sh speed), one call: asr-train's own speed on real data, one GPU,
# the bundled model continued (trainer.init_from), the pipelines and steps one after the other:
#   workers   DataLoader workers, eager step (the trainer's default)
#   graphed   data.resident (the corpus on the GPU, fixed shapes), trainer.cuda_graphs
#   blocks    data.resident, trainer.compile=cudagraphs (each block compiled once for any shape, CUDA
#             graphs recorded per shape; the front end and head eager)
#   fixed     data.resident, trainer.compile=fixed (the whole model compiled per shape, CUDA graphs)
# Each run's log is $OUT/<name>.log (lines prefixed with seconds since the run started); a table of
# the median audio-seconds per second over each run's second half, its data wait and the time to the
# first logged step goes to $OUT/speed.txt. The corpus comes as parts (jobs/corpus.sh: PARTS carried in
# this call, kept for the next call on the warm machine).
# Env: SAVE_CACHE=1: the compile caches back in parts (jobs/setup.sh); PARTS, WEIGHTS (jobs/corpus.sh); RUNS (default "workers graphed fixed"); SECONDS_<run> (defaults
#      workers 60, graphed 80, blocks 180, fixed 240); BATCH (padded seconds per batch, default 800); EXTRA (every run);
#      EXPERIMENT: an experiment config (conf/experiment) instead of recipe=bundled model=bundled, e.g. the
#      one a training call will run next, so that its compiled graphs are the ones cached; INIT: the
#      model to continue (default asr/pretrained/model.pt; tools/device/README.md: an LM-free copy)
set -uo pipefail
CONFIG="recipe=bundled model=bundled"
if [ -n "${EXPERIMENT:-}" ]; then
  source tools/device/jobs/experiments.sh
  check_experiments "$EXPERIMENT"
  CONFIG="experiment=$EXPERIMENT"
fi
source tools/device/jobs/setup.sh
source tools/device/jobs/corpus.sh
WORKERS=$(( $(nproc) - 2 ))
declare -A ARGS=([workers]="data.resident=false trainer.compile=false"
                 [graphed]="data.resident=true trainer.compile=false trainer.cuda_graphs=true"
                 [blocks]="data.resident=true trainer.compile=cudagraphs"
                 [fixed]="data.resident=true trainer.compile=fixed")
declare -A SECS=([workers]=${SECONDS_workers:-60} [graphed]=${SECONDS_graphed:-80} [blocks]=${SECONDS_blocks:-180}
                 [fixed]=${SECONDS_fixed:-240})
for name in ${RUNS:-workers graphed fixed}; do
  t=$(date +%s)
  set -f
  # shellcheck disable=SC2086
  timeout -s INT -k 30 "${SECS[$name]}" python -m asr.cli.train $CONFIG \
    trainer.init_from=${INIT:-asr/pretrained/model.pt} "data.train_manifests=[/tmp/corpus.jsonl]" "data.dev_manifests=[]" \
    data.max_duration=30 data.augment.speed.enabled=true data.max_batch_seconds=${BATCH:-800} data.num_workers=$WORKERS \
    trainer.tensorboard=false trainer.progress_bar=false trainer.max_steps=1000000 trainer.val_every=1000000 \
    trainer.save_every=1000000 trainer.log_every=10 hydra.run.dir=exp/speed/$name ${ARGS[$name]} ${EXTRA:-} 2>&1 \
    | while IFS= read -r line; do echo "$(( $(date +%s) - t )) $line"; done > "$OUT/$name.log"
  set +f
  echo "== $name ($(( $(date +%s) - t )) s)"; grep -E "resident corpus|Error|error:" "$OUT/$name.log" | tail -3 | cut -c1-250
done
python - <<'PY' | tee "$OUT/speed.txt"
import os, re, statistics
print("| run | audio-s/s, median of the second half | data wait | first step logged at | steps logged |")
print("|---|---:|---:|---:|---:|")
for name in os.environ.get("RUNS", "workers graphed fixed").split():
    path = f"{os.environ['OUT']}/{name}.log"
    if not os.path.exists(path):
        continue
    rows = [(int(m[1]), float(m[2]), float(m[3])) for m in
            re.finditer(r"^(\d+) .* step \d+ loss .* ([\d.]+) audio-s/s \((\d+)% waiting", open(path).read(), re.M)]
    if not rows:
        print(f"| {name} | - | - | - | 0 |"); continue
    half = rows[len(rows) // 2:]
    print(f"| {name} | {statistics.median(r[1] for r in half):,.0f} | {statistics.median(r[2] for r in half):.0f} % "
          f"| {rows[0][0]} s | {len(rows)} |")
PY
if [ -n "${SAVE_CACHE:-}" ]; then save_compile_cache; fi
