#!/usr/bin/env bash
# On the device: asr-train's own speed on real speech, the bundled architecture (8 x 320), one GPU,
# side by side in one call: the workers' pipeline eager, then data.resident eager, with
# trainer.cuda_graphs, and with trainer.compile=fixed. Each run's log goes to $OUT/<name>.log; the
# inductor cache comes back as $OUT/inductor_cache.tgz (carry it as .gpu/inductor_cache.tgz to skip
# compiling next time).
#   carry: .gpu/wheels and a corpus folder CORPUS (default .gpu/speed: audio.tar + train.jsonl, see corpus.sh)
#   env:   RUNS (default "workers_eager resident_eager resident_graphed resident_fixed"), SECONDS_<name>
set -uo pipefail
source tools/device/setup.sh
T0=$(date +%s)
PARTS=${CORPUS:-.gpu/speed} source tools/device/corpus.sh  # also kept in /tmp/keep for the next call
echo "corpus unpacked in $(( $(date +%s) - T0 )) s"
[ -f .gpu/inductor_cache.tgz ] && tar xzf .gpu/inductor_cache.tgz -C /tmp
COMMON=(model=bundled model.d_model=320 model.n_layers=8 model.dropout=0 trainer.init_from=asr/pretrained/model.pt
  "data.train_manifests=[/tmp/corpus.jsonl]" "data.dev_manifests=[]" data.max_batch_seconds=800
  data.max_duration=30 data.augment.speed.enabled=true trainer.max_steps=100000 trainer.val_every=1000000
  trainer.save_every=1000000 trainer.log_every=10 trainer.tensorboard=false trainer.progress_bar=false)
declare -A ARGS=(
  [workers_eager]="data.num_workers=14"
  [resident_eager]="data.resident=true data.num_workers=14"
  [resident_graphed]="data.resident=true data.num_workers=14 trainer.cuda_graphs=true"
  [resident_fixed]="data.resident=true data.num_workers=14 trainer.compile=fixed"
  [resident_fixed2]="data.resident=true data.num_workers=14 trainer.compile=fixed data.resident_per_octave=2"
)
declare -A SECS=([workers_eager]=75 [resident_eager]=60 [resident_graphed]=75 [resident_fixed]=300 [resident_fixed2]=300)
for name in ${RUNS:-workers_eager resident_eager resident_graphed resident_fixed}; do
  t=$(date +%s)
  # shellcheck disable=SC2086
  timeout -s INT -k 40 "${SECS[$name]}" python -m asr.cli.train "${COMMON[@]}" hydra.run.dir=exp/speed/$name ${ARGS[$name]} \
    2>&1 | while IFS= read -r line; do echo "$(( $(date +%s) - t )) $line"; done > "$OUT/$name.log"
  echo "== $name ($(( $(date +%s) - t )) s): first step logged at $(grep -m1 -E ' step [0-9]+ loss' "$OUT/$name.log" | cut -d' ' -f1) s"
  grep -E "audio-s/s|resident corpus|Error|error" "$OUT/$name.log" | tail -6 | cut -c1-220
done
[ -d /tmp/inductor ] && tar czf "$OUT/inductor_cache.tgz" -C /tmp inductor && ls -la "$OUT/inductor_cache.tgz"
echo "total $(( $(date +%s) - T0 )) s"
