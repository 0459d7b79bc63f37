#!/usr/bin/env bash
# Here, not on the device (tools/device/run.sh pack-synth): pack what synthesising speech on the GPU machine needs into the
# git-ignored .gpu/synth/ (~32 MB), so that machine (no internet, no Debian packages, 16 cores per
# GPU) can make tens of hours of recipes/synthetic speech itself instead of us carrying audio.
#
#   engines.tar.xz  espeak-ng and flite programs with every shared library they load except glibc's
#                   (copied from this machine: Debian 12, glibc 2.36, older than the device's, so
#                   they run there), English-only espeak-ng data, and wrappers in bin/ that point the
#                   programs at those libraries without touching anyone else's LD_LIBRARY_PATH
#   texts.tar.xz    the KJV as printed by `bible` and WordNet's data.* files (prepare.py's sources),
#                   those cut to the glosses that hold a quoted example: texts.wordnet_examples()
#                   reads the same examples from them (checked below) at a fifth of the size
#   real_manifest.jsonl.xz  ../shared/data/real's manifest: prepare.py's default exclusion list,
#                   which also decides its sentence split, so dev/test sentences match .data/bundle's
#   bundle_small/   .data/bundle without its synthetic training audio: real train (repeated
#                   REAL_REPEATS times, ids suffixed), dev, test, misc, the tokenizer. Only dev's
#                   audio comes along (its synthetic half in ../synth_dev/): the device scores dev
#                   alone; test and misc are scored here from .data/bundle. Manifests are xz'd and
#                   the audio is one tar (synth_train.sh unpacks both there).
#   wheels/         pyroomacoustics, num2words, docopt (prepare.py's Python needs; scipy is there)
# Why so lean: the tree that travels (tracked files included, the 23.5 MB bundled model among
# them) may not pass 64 MiB.
#
# Needs: apt-get install espeak-ng flite bible-kjv bible-kjv-text wordnet-base xz-utils, and .data/bundle
# (recipes/bundled/README.md). Env: REAL_REPEATS (default 8).
set -euo pipefail
OUT=.gpu/synth; REAL_REPEATS=${REAL_REPEATS:-8}
SHARED_REAL=${ASR_REAL_DATA:-../shared/data/real}
rm -rf "$OUT" && mkdir -p "$OUT/wheels"
tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT

# --- engines -----------------------------------------------------------------------------------
E=$tmp/engines; mkdir -p "$E/bin" "$E/libexec" "$E/lib" "$E/share"
for prog in espeak-ng flite; do
  cp "$(command -v $prog)" "$E/libexec/"
  ldd "$(command -v $prog)" | awk '/=> \//{print $3}' | while read -r lib; do
    case $(basename "$lib") in libc.so*|libm.so*|libpthread.so*|libdl.so*|librt.so*|ld-linux*) ;; *) cp -L "$lib" "$E/lib/" ;; esac
  done
done
data=$(dirname "$(dpkg -L espeak-ng-data | grep -m1 '/espeak-ng-data/phontab$')")
mkdir -p "$E/share/espeak-ng-data"
for f in "$data"/*; do  # every language's rules are small; of the dictionaries only English's
  name=$(basename "$f")
  if [[ $name != *_dict || $name == en_dict ]]; then cp -r "$f" "$E/share/espeak-ng-data/"; fi
done
for prog in espeak-ng flite; do
  cat > "$E/bin/$prog" <<EOF
#!/bin/sh
# wrapper: the carried program with its carried libraries (and espeak-ng's data)
d=\$(dirname "\$(readlink -f "\$0")")/..
LD_LIBRARY_PATH="\$d/lib" ESPEAK_DATA_PATH="\$d/share" exec "\$d/libexec/$prog" "\$@"
EOF
  chmod +x "$E/bin/$prog"
done
echo "test" | "$E/bin/espeak-ng" -v en-us --stdout > "$tmp/e.wav" && "$E/bin/flite" -voice slt -t "test" -o "$tmp/f.wav"
tar cJf "$OUT/engines.tar.xz" -C "$E" .

# --- texts -------------------------------------------------------------------------------------
T=$tmp/texts; mkdir -p "$T/wordnet"
bible -l100000 gen1:1-rev22:21 > "$T/kjv.txt"
python - /usr/share/wordnet "$T/wordnet" <<'EOF'
import sys
from pathlib import Path
sys.path.insert(0, "recipes/synthetic")
from texts import wordnet_examples
src, dst = Path(sys.argv[1]), Path(sys.argv[2])
for pos in ("noun", "verb", "adj", "adv"):  # keep "x|gloss" of the lines wordnet_examples() reads
    with open(src / f"data.{pos}", encoding="latin-1") as fi, open(dst / f"data.{pos}", "w", encoding="latin-1") as fo:
        for line in fi:
            if not line.startswith("  ") and "|" in line and '"' in line.split("|", 1)[1]:
                fo.write("x|" + line.split("|", 1)[1])
assert wordnet_examples(src) == wordnet_examples(dst), "the cut WordNet files give other examples"
EOF
tar cJf "$OUT/texts.tar.xz" -C "$T" .
xz -9c "$SHARED_REAL/manifest.jsonl" > "$OUT/real_manifest.jsonl.xz"

# --- evaluation sets and real training speech --------------------------------------------------
B=.data/bundle; S=$OUT/bundle_small
mkdir -p "$S/audio"
cp -r "$B/bpe256" "$B"/{dev,dev_real,dev_synth,test,misc}.jsonl "$S/"
for d in "$B"/audio/*; do [ "$(basename "$d")" = synth ] || cp -r "$d" "$S/audio/"; done
rm -rf "$S/audio/real/misc"  # scored here, never on the device
mkdir -p "$S/audio/synth" && cp -r "$B/audio/synth/dev" "$S/audio/synth/"
python - "$B/train.jsonl" "$S/train_real.jsonl" "$REAL_REPEATS" <<'EOF'
import json, sys
src, dst, repeats = sys.argv[1], sys.argv[2], int(sys.argv[3])
real = [json.loads(l) for l in open(src) if not json.loads(l)["id"].startswith("synth-")]
with open(dst, "w") as f:
    for r in range(repeats):  # ids must stay unique across manifests: suffix the copies
        for e in real:
            f.write(json.dumps(dict(e, id=e["id"] if r == 0 else f"{e['id']}-rep{r}")) + "\n")
print(f"{len(real)} real training utterances x {repeats} -> {dst}")
EOF
xz -9 "$S"/*.jsonl
# 4,000 small files as one (no block slack); the synthetic dev audio apart, in .gpu/synth_dev, which
# only the final call needs (it scores dev) and carries instead of the engines and texts.
mkdir -p "$OUT/../synth_dev" && rm -f "$OUT/../synth_dev/audio_synth_dev.tgz"
tar czf "$OUT/../synth_dev/audio_synth_dev.tgz" -C "$S" audio/synth && rm -rf "$S/audio/synth"
tar czf "$S/audio.tgz" -C "$S" audio && rm -rf "$S/audio"
python -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --platform manylinux_2_28_x86_64 \
  --platform any -d "$OUT/wheels" pyroomacoustics==0.10.1 num2words==0.5.14
python -m pip wheel -q --no-deps docopt==0.6.2 -w "$OUT/wheels"
du -sh "$OUT" "$OUT"/*
