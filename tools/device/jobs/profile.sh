#!/usr/bin/env bash
# On the device (tools/device/run.sh profile ...), one call: the trainer's own step on real data, profiled (trainer.profile_steps) over
# a window after warm-up, with the bundled model and recipe on .gpu/synth/bundle_small (carry it with
# .gpu/wheels). The profile table goes to $OUT/<name>_profile.txt, the log to $OUT/<name>.log.
# Usage: run.sh profile <name> <seconds> <first step> <overrides...>
set -uo pipefail
source tools/device/jobs/setup.sh
S=.gpu/synth/bundle_small
for f in $S/*.jsonl.xz; do [ -f "${f%.xz}" ] || xz -dk "$f"; done
[ -d $S/audio/real ] || tar xzf $S/audio.tgz -C $S || exit 1
name=$1 secs=$2 first=$3; shift 3
rm -rf exp/profile/$name
set -f
# shellcheck disable=SC2086
timeout -s INT -k 30 "$secs" python -m asr.cli.train recipe=bundled model=bundled data.manifest_dir=$S \
  "data.train_manifests=[$S/train_real.jsonl]" "data.dev_manifests=[]" data.num_workers=$(( $(nproc) - 2 )) \
  trainer.tensorboard=false trainer.progress_bar=false trainer.max_steps=1000000 trainer.val_every=1000000 \
  trainer.save_every=1000000 trainer.log_every=50 "trainer.profile_steps=[$first,$((first + 10))]" \
  hydra.run.dir=exp/profile/$name "$@" > "$OUT/$name.log" 2>&1
echo "== $name rc=$?"
set +f
cp exp/profile/$name/profile.txt "$OUT/${name}_profile.txt" 2>/dev/null && head -60 "$OUT/${name}_profile.txt" | cut -c1-220
