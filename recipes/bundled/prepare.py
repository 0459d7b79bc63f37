#!/usr/bin/env python
"""Pack everything the bundled-model training run needs into one compact folder (default .data/bundle).

    python recipes/synthetic/prepare.py --out .data/synthetic --hours 5.8     # first (about 20 min)
    python recipes/bundled/prepare.py [--synthetic .data/synthetic] [--real ../shared/data/real]
        [--out .data/bundle] [--kbps 12] [--max-mib 45] [--jobs 2]

The folder has to travel to a GPU machine that has no internet and accepts at most 64 MiB, so all
audio is OGG/Opus at ``--kbps`` (12 kb/s keeps the full 8 kHz band; see
``recipes/synthetic/augment_audio.py``) and the whole folder, manifests included, is kept under
``--max-mib``: the synthetic training utterances are added in their (random) manifest order until
the budget is reached, everything else is always included.

Manifests (JSON Lines ``{"id", "audio", "duration", "text", "speaker"}``, audio relative to the folder):

* ``train.jsonl``      synthetic train + real train (all real speakers not in dev, misc excluded)
* ``dev.jsonl``        synthetic dev + real dev (for checkpoint selection), also separately as
  ``dev_synth.jsonl`` (voices seen in training, unseen sentences) and ``dev_real.jsonl``
  (speakers not in train: ``recipes/real/prepare.py``'s fixed speaker-disjoint split, its ``dev.jsonl``)
* ``test.jsonl``       synthetic test: unseen voices and unseen sentences
* ``misc.jsonl``       every recording under ``<real>/audio/misc`` (evaluation only, never trained on)

Plus ``synth_meta.jsonl.gz`` (engine, voice, text source and degradation of each synthetic
utterance, for breaking WER down by condition), ``stats.json`` and ``README.md``.
"""
from __future__ import annotations

import argparse
import gzip
import importlib.util
import json
import multiprocessing as mp
import os
import shutil
import sys
import time
from pathlib import Path

import soundfile as sf

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "recipes" / "synthetic"))

import augment_audio  # noqa: E402

from asr.data.manifest import read_manifest, write_manifest  # noqa: E402
from asr.tokenizer import normalize_text  # noqa: E402

DEFAULT_REAL = Path(os.environ.get("ASR_REAL_DATA", REPO.parent / "shared" / "data" / "real"))
KEYS = ("id", "audio", "duration", "text", "speaker")
#: Room left for README.md and stats.json, written last.
RESERVE_BYTES = 8 * 1024
#: Budgeted bytes per synthetic utterance in synth_meta.jsonl.gz (about 60 measured; gzip of JSON).
META_BYTES_PER_UTT = 100


def _load_real_prepare():
    """recipes/real/prepare.py as a module (recipes are scripts, not a package), for its speaker split."""
    path = REPO / "recipes" / "real" / "prepare.py"
    spec = importlib.util.spec_from_file_location("recipes_real_prepare", path)
    module = importlib.util.module_from_spec(spec)
    assert spec.loader is not None
    spec.loader.exec_module(module)
    return module


def _encode_task(args: tuple[str, str, float]) -> tuple[str, float, int]:
    """Encode (or copy, when it already is Opus at 16 kHz) one file; returns (dst, duration, bytes)."""
    src, dst, kbps = args
    info = sf.info(src)
    if info.format == "OGG" and info.subtype == "OPUS" and info.samplerate == augment_audio.SAMPLE_RATE \
            and info.channels == 1:
        Path(dst).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, dst)  # synthetic audio is written as Opus already: no second generation loss
    else:
        x, sr = sf.read(src, dtype="float32", always_2d=True)
        x = x.mean(axis=1)
        if sr != augment_audio.SAMPLE_RATE:
            x = augment_audio.resample(x, sr)
        augment_audio.write_audio(dst, x, "opus", kbps)
    out = sf.info(dst)
    return dst, out.frames / out.samplerate, os.path.getsize(dst)


def _line_bytes(entry: dict, base: Path) -> int:
    """Bytes the entry will take in a manifest written by asr.data.manifest.write_manifest."""
    e = dict(entry)
    e["audio"] = Path(os.path.relpath(e["audio"], base)).as_posix()
    e["duration"] = round(e["duration"], 4)
    return len((json.dumps(e, ensure_ascii=False) + "\n").encode())


def _slim(entry: dict) -> dict:
    return {k: entry.get(k) for k in KEYS}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--synthetic", type=Path, default=Path(".data/synthetic"), help="output of recipes/synthetic/prepare.py")
    ap.add_argument("--real", type=Path, default=DEFAULT_REAL, help="real-speech folder with manifest.jsonl")
    ap.add_argument("--out", type=Path, default=Path(".data/bundle"))
    ap.add_argument("--kbps", type=float, default=12.0, help="Opus bit rate for re-encoded audio")
    ap.add_argument("--max-mib", type=float, default=45.0, help="size limit of the whole folder")
    ap.add_argument("--seed", type=int, default=0, help="seed of the real speaker split")
    ap.add_argument("--jobs", type=int, default=2)
    args = ap.parse_args(argv)

    t0 = time.time()
    real_manifest = args.real / "manifest.jsonl"
    for p in (real_manifest, *(args.synthetic / f"{s}.jsonl" for s in ("train", "dev", "test"))):
        if not p.is_file():
            print(f"error: {p} not found", file=sys.stderr)
            return 2
    out: Path = args.out.resolve()
    if out.exists():
        shutil.rmtree(out)
    (out / "audio").mkdir(parents=True)
    budget = int(args.max_mib * 2**20) - RESERVE_BYTES

    # Real speech: the fixed split of recipes/real/prepare.py (misc apart, dev speaker-disjoint).
    real_prep = _load_real_prepare()
    real = [dict(e, source=real_prep.source_of(e["audio"], args.real)) for e in read_manifest(real_manifest)]
    split = real_prep.scored_split(real, args.seed)
    real_train, real_dev, misc = split["train"], split["dev"], split["misc"]
    parts: dict[str, list[dict]] = {"real_train": real_train, "real_dev": real_dev, "misc": misc}
    synth = {s: read_manifest(args.synthetic / f"{s}.jsonl") for s in ("train", "dev", "test")}
    parts.update({"synth_test": synth["test"], "synth_dev": synth["dev"]})

    for name, entries in parts.items():
        for e in entries:
            if normalize_text(e["text"]) != e["text"]:
                print(f"error: {name} {e['id']}: text is not normalised: {e['text']!r}", file=sys.stderr)
                return 2

    def target(part: str, e: dict) -> str:
        sub = "real" if part in ("real_train", "real_dev", "misc") else "synth"
        src = Path(e["audio"])
        if sub == "real":
            rel = src.resolve().relative_to(args.real.resolve() / "audio")
        else:
            rel = Path(part.split("_")[1]) / src.name
        return str(out / "audio" / sub / rel.with_suffix(".ogg"))

    packed: dict[str, list[dict]] = {}
    part_bytes: dict[str, int] = {}
    used = 0
    with mp.get_context("fork").Pool(args.jobs) as pool:
        for name, entries in parts.items():
            tasks = [(e["audio"], target(name, e), args.kbps) for e in entries]
            results = pool.map(_encode_task, tasks, chunksize=8)
            packed[name] = [dict(_slim(e), audio=dst, duration=dur) for e, (dst, dur, _) in zip(entries, results)]
            part_bytes[name] = sum(n for _, _, n in results)
            used += part_bytes[name]
            print(f"{name}: {len(entries)} utterances, {sum(d for _, d, _ in results) / 3600:.3f} h, "
                  f"{part_bytes[name] / 2**20:.2f} MiB ({time.time() - t0:.0f} s)", flush=True)

        # Manifest bytes of the fixed parts (train/dev lines are written twice: combined and split).
        manifest_bytes = sum(_line_bytes(e, out) for es in packed.values() for e in es) \
            + sum(_line_bytes(e, out) for e in packed["real_dev"] + packed["synth_dev"])
        used += manifest_bytes + META_BYTES_PER_UTT * (len(packed["synth_dev"]) + len(packed["synth_test"]))
        if used > budget:
            print(f"error: real data and synthetic dev/test alone take {used / 2**20:.2f} MiB, over "
                  f"--max-mib {args.max_mib}: lower --kbps or the synthetic --dev-hours/--test-hours", file=sys.stderr)
            return 1
        # Synthetic training audio fills what is left, in manifest order.
        train_in: list[dict] = []
        tasks = []
        for e in synth["train"]:
            info_bytes = os.path.getsize(e["audio"])  # already Opus: its size in the bundle
            line = _line_bytes(dict(_slim(e), audio=target("synth_train", e)), out)
            if used + info_bytes + line + META_BYTES_PER_UTT > budget:
                break
            used += info_bytes + line + META_BYTES_PER_UTT
            manifest_bytes += line
            train_in.append(e)
            tasks.append((e["audio"], target("synth_train", e), args.kbps))
        results = pool.map(_encode_task, tasks, chunksize=16)
    packed["synth_train"] = [dict(_slim(e), audio=dst, duration=dur) for e, (dst, dur, _) in zip(train_in, results)]
    part_bytes["synth_train"] = sum(n for _, _, n in results)
    dropped = len(synth["train"]) - len(train_in)
    print(f"synth_train: {len(train_in)} of {len(synth['train'])} utterances fit "
          f"({sum(e['duration'] for e in packed['synth_train']) / 3600:.3f} h, "
          f"{part_bytes['synth_train'] / 2**20:.2f} MiB, {dropped} left out)", flush=True)

    manifests = {
        "train.jsonl": packed["synth_train"] + packed["real_train"],
        "dev.jsonl": packed["synth_dev"] + packed["real_dev"],
        "dev_synth.jsonl": packed["synth_dev"],
        "dev_real.jsonl": packed["real_dev"],
        "test.jsonl": packed["synth_test"],
        "misc.jsonl": packed["misc"],
    }
    for fname, entries in manifests.items():
        write_manifest(out / fname, entries)
        os.chmod(out / fname, 0o644)  # write_manifest's temporary file is private (0600)
    kept_ids = {e["id"] for e in packed["synth_train"] + packed["synth_dev"] + packed["synth_test"]}
    with gzip.open(out / "synth_meta.jsonl.gz", "wt", encoding="utf-8") as f:
        for split in ("train", "dev", "test"):
            for e in read_manifest(args.synthetic / f"{split}.jsonl", absolute=False):
                if e["id"] in kept_ids:
                    meta = {k: v for k, v in e.items() if k not in ("audio", "duration", "text")}
                    f.write(json.dumps(dict(meta, split=split)) + "\n")

    stats = {
        "parts": {name: {"utterances": len(es), "hours": round(sum(e["duration"] for e in es) / 3600, 4),
                         "speakers": len({e["speaker"] for e in es}), "audio_bytes": part_bytes[name]}
                  for name, es in packed.items()},
        "kbps": args.kbps,
        "synth_train_left_out": dropped,
        "real_dev_speakers": sorted({str(e["speaker"]) for e in packed["real_dev"]}),
        "misc_ids": [e["id"] for e in packed["misc"]],
    }
    synth_info = args.synthetic / "info.json"
    if synth_info.is_file():
        info = json.loads(synth_info.read_text())
        stats["synthetic"] = {"held_out": info.get("held_out"), "args": info.get("args")}
    (out / "stats.json").write_text(json.dumps(stats, indent=2) + "\n")
    _write_readme(out, stats, args)

    total = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    print(f"total {total / 2**20:.2f} MiB in {out} ({time.time() - t0:.0f} s)")
    if total > args.max_mib * 2**20:
        print(f"error: {total / 2**20:.2f} MiB is over --max-mib {args.max_mib}", file=sys.stderr)
        return 1
    return 0


def _write_readme(out: Path, stats: dict, args: argparse.Namespace) -> None:
    """A README inside the bundle, so the folder explains itself on the GPU machine."""
    rows = "\n".join(
        f"| {name} | {p['utterances']} | {p['hours']:.2f} | {p['speakers']} | {p['audio_bytes'] / 2**20:.2f} |"
        for name, p in stats["parts"].items())
    held = stats.get("synthetic", {}).get("held_out") or {}
    text = f"""# Bundled-model corpus (made by recipes/bundled/prepare.py)

All audio: OGG/Opus, 16 kHz mono, {args.kbps:g} kb/s. Manifests: JSON Lines, paths relative to this folder.

| part | utterances | hours | speakers/voices | audio MiB |
|---|---:|---:|---:|---:|
{rows}

* `train.jsonl` = synth_train + real_train; `dev.jsonl` = synth_dev + real_dev (also as
  `dev_synth.jsonl`, `dev_real.jsonl`); `test.jsonl` = synth_test; `misc.jsonl` = misc.
* synth_test voices never occur in training: espeak-ng variants {held.get('espeak_variants')} (with every
  base voice) and flite {held.get('flite_voices')}; its sentences occur in neither train nor dev.
* real_dev speakers (not in train): {', '.join(stats['real_dev_speakers'])}.
* misc (evaluation only, never in train or dev): {', '.join(stats['misc_ids'])}.
* `synth_meta.jsonl.gz`: engine, voice, text source and degradations per synthetic utterance.

Train with `asr-train recipe=bundled` (conf/recipe/bundled.yaml reads .data/bundle), or for a folder
elsewhere: `asr-train recipe=bundled data.manifest_dir=<this folder>`.
"""
    (out / "README.md").write_text(text)


if __name__ == "__main__":
    sys.exit(main())
