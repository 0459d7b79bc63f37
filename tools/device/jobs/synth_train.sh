#!/usr/bin/env bash
# On the device (tools/device/run.sh synth-train EXPERIMENT...): synthesise HOURS of recipes/synthetic
# speech on the machine's own cores, then train the experiments on it plus the real speech (the
# variants job, one per GPU).
#
# Why: the 5.8 h of synthetic speech that fit in a 64 MiB carry are memorised (training WER 0.4 %,
# unseen-voice test WER 62 %), and the machine makes speech far faster than it can be carried: with
# FLAC output prepare.py runs at ~80x real time per core, so 100 h take a minute or two on 64 cores.
# It writes 16-bit WAV: the same samples as FLAC (~11.5 GB instead of 6.7 GB for
# 100 h), which a training worker decodes ~2x faster (tools/bench_loader.py).
# Same seed and the same exclusion list as .data/bundle, so its dev and test sentences, voices and
# degradations come out identical (and never in training); scoring uses the carried copies.
#
# Carry [".gpu/wheels", ".gpu/synth"]: the wheels (setup.sh) and the pack (run.sh pack-synth, run
# here first). The corpus is made once per warm machine (exp/synth); later calls only train,
# resuming. The final call (FINAL=1) scores dev, whose synthetic audio would push the tree past
# 64 MiB beside the engines: carry [".gpu/wheels", ".gpu/synth/bundle_small", ".gpu/synth/wheels",
# ".gpu/synth_dev"] for it (the corpus is already made; the engines are not needed).
#
# Args: experiment names (conf/experiment/), as for the variants job
# Env: HOURS (default 100), and the variants job's: TOTAL_MINUTES, CALL_BUDGET, FINAL, RETURN,
#      EXTRA (appended to the manifests).
set -uo pipefail
T0=$(date +%s)
HOURS=${HOURS:-100}; CALL_BUDGET=${CALL_BUDGET:-560}
PACK=.gpu/synth; CORPUS=exp/synth
source tools/device/jobs/experiments.sh
check_experiments "$@"
source tools/device/jobs/setup.sh
python -m pip install --no-deps --no-index -q $PACK/wheels/*.whl 2>&1 | grep -v WARN
shopt -s nullglob  # the final call carries no real_manifest.jsonl.xz
for f in $PACK/*.jsonl.xz $PACK/bundle_small/*.jsonl.xz; do  # pack_synth.sh xz's the manifests...
  [ -f "${f%.xz}" ] || xz -dk "$f" || exit 1
done
shopt -u nullglob
[ -d $PACK/bundle_small/audio/real ] || tar xzf $PACK/bundle_small/audio.tgz -C $PACK/bundle_small || exit 1  # ...and tars the audio
if [ -f .gpu/synth_dev/audio_synth_dev.tgz ] && [ ! -d $PACK/bundle_small/audio/synth ]; then  # only the final call scores dev
  tar xzf .gpu/synth_dev/audio_synth_dev.tgz -C $PACK/bundle_small || exit 1
fi
if [ ! -f $CORPUS/train.jsonl ]; then
  mkdir -p /tmp/engines /tmp/texts
  tar xJf $PACK/engines.tar.xz -C /tmp/engines && tar xJf $PACK/texts.tar.xz -C /tmp/texts || exit 1
  echo "test" | /tmp/engines/bin/espeak-ng -v en-us --stdout > /tmp/e.wav && /tmp/engines/bin/flite -voice slt -t test -o /tmp/f.wav \
    || { echo "the carried engines do not run here"; exit 1; }
  PATH=/tmp/engines/bin:$PATH python recipes/synthetic/prepare.py --out $CORPUS --hours "$HOURS" \
    --dev-hours 0.25 --test-hours 0.4 --seed 0 --jobs "$(nproc)" --format wav \
    --exclude-manifest $PACK/real_manifest.jsonl --kjv-text /tmp/texts/kjv.txt --wordnet-dir /tmp/texts/wordnet \
    2>&1 | grep -v "^  skip" | tee "$OUT/synth.log" | tail -4
  [ -f $CORPUS/train.jsonl ] || { echo "synthesis failed"; exit 1; }
  # The sentence split must match the carried evaluation sets, or training could hold test sentences.
  python - $CORPUS $PACK/bundle_small <<'EOF' || { rm -f $CORPUS/train.jsonl; exit 1; }
import json, sys
texts = lambda p: {json.loads(l)["text"] for l in open(p) if json.loads(l)["id"].startswith("synth-")}
for split in ("dev", "test"):
    made, carried = texts(f"{sys.argv[1]}/{split}.jsonl"), texts(f"{sys.argv[2]}/{split}.jsonl")
    if made != carried:
        sys.exit(f"{split}: {len(made ^ carried)} sentences differ from the carried {split} set: not training")
train = texts(f"{sys.argv[1]}/train.jsonl")
print(f"dev/test sentences match the carried sets; {len(train & texts(sys.argv[2] + '/test.jsonl'))} test sentences in train")
EOF
  echo "corpus made in $(( $(date +%s) - T0 )) s; $(du -sh $CORPUS | cut -f1) on disk"
  # What one DataLoader worker delivers on this machine's cores (4x H100 runs waited 7-41 % of
  # each step for data): ~10 s, once per machine; a failure here does not stop the training.
  timeout 60 python tools/bench_loader.py --manifest $CORPUS/train.jsonl --limit 300 > "$OUT/bench_loader.txt" 2>&1 || true
fi
S=$PACK/bundle_small
export EVAL_DIR=$S ROOT=${ROOT:-exp/variants_synth}
export EXTRA="data.manifest_dir=$S data.train_manifests=[$CORPUS/train.jsonl,$S/train_real.jsonl] ${EXTRA:-}"
# The synthetic dev audio travels only with the final call: before it, train without a dev set (the
# trainer checks every dev file at the start; a run that reached its schedule's end in a
# middle call stopped at the validation there, on a missing file).
[ -d $S/audio/synth ] || EXTRA="$EXTRA data.dev_manifests=[]"
CALL_BUDGET=$(( CALL_BUDGET - ($(date +%s) - T0) )) bash tools/device/jobs/variants.sh "$@"
