#!/usr/bin/env bash
# On the device (tools/device/run.sh speed), one call: the trainer's own speed on real data, eager against CUDA graphs
# (trainer.compile=cudagraphs with padded batch shapes, or GRAPH_OVERRIDES), one after the other on
# the same GPU, with the bundled model, recipe and the real speech of .gpu/synth/bundle_small
# (carry it with .gpu/wheels). Prints audio-seconds per second per logged window and the median
# over each run's second half (compilation and CUDA-graph recording happen in the first).
# Env: EAGER_S, GRAPHS_S (seconds per run, default 150 and 300), GRAPH_OVERRIDES, EXTRA (both runs)
set -uo pipefail
source tools/device/jobs/setup.sh
S=.gpu/synth/bundle_small
for f in $S/*.jsonl.xz; do [ -f "${f%.xz}" ] || xz -dk "$f"; done
[ -d $S/audio/real ] || tar xzf $S/audio.tgz -C $S || exit 1
export TORCHINDUCTOR_CACHE_DIR=/tmp/inductor
WORKERS=$(( $(nproc) - 2 ))
train() {  # train <name> <seconds> <overrides...>: SIGINT at the end (the trainer stops cleanly)
  local name=$1 secs=$2; shift 2
  set -f
  # shellcheck disable=SC2086
  timeout -s INT -k 30 "$secs" python -m asr.cli.train recipe=bundled model=bundled data.manifest_dir=$S \
    "data.train_manifests=[$S/train_real.jsonl]" "data.dev_manifests=[]" data.num_workers=$WORKERS \
    trainer.tensorboard=false trainer.progress_bar=false trainer.max_steps=1000000 trainer.val_every=1000000 \
    trainer.save_every=1000000 trainer.log_every=50 hydra.run.dir=exp/speed/$name ${EXTRA:-} "$@" > "$OUT/$name.log" 2>&1
  set +f
  echo "== $name rc=$?"; grep -E "Error|error:" "$OUT/$name.log" | tail -3
}
train eager "${EAGER_S:-150}"
# shellcheck disable=SC2086
train graphs "${GRAPHS_S:-300}" ${GRAPH_OVERRIDES:-trainer.compile=cudagraphs trainer.pad_frames_multiple=128 trainer.pad_batch_multiple=16}
python - <<'PY' | tee "$OUT/train_speed.txt"
import json, statistics
from pathlib import Path
for name in ("eager", "graphs"):
    path = Path("exp/speed") / name / "metrics.jsonl"
    rows = [json.loads(l) for l in path.read_text().splitlines()] if path.exists() else []
    rows = [r for r in rows if "train/audio_sec_per_sec" in r]
    if not rows:
        print(f"{name}: no logged steps"); continue
    speeds = [r["train/audio_sec_per_sec"] for r in rows]
    half = speeds[len(speeds) // 2:]
    wait = statistics.median(r["train/data_wait_frac"] for r in rows[len(rows) // 2:])
    print(f"{name}: {rows[-1]['step']} steps; audio-s/s per window: {' '.join(f'{s:.0f}' for s in speeds)}")
    print(f"{name}: median of the second half {statistics.median(half):.0f} audio-s/s, data wait {100 * wait:.0f} %")
PY
