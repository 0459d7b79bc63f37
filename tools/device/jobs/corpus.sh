#!/usr/bin/env bash
# On the device: gather a training corpus carried in parts over several calls to one warm machine
# (the tree that travels is at most 64 MiB a call). Sourced by the training scripts.
#   PARTS    folders carried in this call, each `audio.tar` (or .tar.gz) + `train.jsonl` with audio
#            paths relative to it (recipes/bundled/pack_gpu.py writes them); unpacked into /tmp/keep/<name>,
#            which outlives the call while the machine stays warm (30 s)
#   WEIGHTS  "name:N ..." repeat a part's utterances N times in the combined manifest (default 1)
# Writes /tmp/corpus.jsonl: every part under /tmp/keep, weighted, with absolute audio paths.
for part in ${PARTS:-}; do
  if ! ls "$part"/train.jsonl "$part"/audio.tar* >/dev/null 2>&1; then
    echo "corpus.sh: no corpus part at $part (train.jsonl + audio.tar*): carry that folder with the call" >&2; exit 2
  fi
  name=$(basename "$part"); dest=/tmp/keep/$name
  if [ ! -f "$dest/.done" ]; then
    mkdir -p "$dest" && cp "$part"/*.jsonl "$dest"/ && for t in "$part"/audio.tar*; do tar xf "$t" -C "$dest"; done \
      && touch "$dest/.done"
  fi
done
python - <<'PY'
import json, os
from pathlib import Path
weights = dict(w.split(":") for w in os.environ.get("WEIGHTS", "").split())
with open("/tmp/corpus.jsonl", "w") as out:
    for part in sorted(Path("/tmp/keep").glob("*/.done")):
        folder = part.parent
        n = int(weights.get(folder.name, 1))
        entries = [json.loads(line) for line in open(folder / "train.jsonl")]
        for copy in range(n):
            for e in entries:
                e2 = dict(e, audio=str(folder / e["audio"]), id=e["id"] if copy == 0 else f"{e['id']}#{copy}")
                out.write(json.dumps(e2) + "\n")
        print(f"corpus part {folder.name}: {len(entries)} utterances, "
              f"{sum(e['duration'] for e in entries) / 3600:.2f} h, x{n}")
PY
