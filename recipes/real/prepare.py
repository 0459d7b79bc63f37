#!/usr/bin/env python
"""Prepare the real-speech recipe: split ``../shared/data/real/manifest.jsonl`` into train and dev.

The dev set is **speaker-disjoint** from train (a dev WER on speakers seen in training flatters the
model) and **deterministic**: speakers are ordered by a hash of (seed, speaker name) and added to
dev in that order until dev holds ``--dev-fraction`` of the audio. Speakers holding more than
``--max-speaker-fraction`` of all audio (here: ``cathy``, 65 %) always stay in train, since
moving them would leave too little to train on.

    python recipes/real/prepare.py [--source DIR] [--out-dir .data/real] [--dev-fraction 0.1] [--seed 0]

Writes ``<out-dir>/train.jsonl`` and ``<out-dir>/dev.jsonl`` with audio paths relative to them.
"""
from __future__ import annotations

import argparse
import hashlib
import os
import sys
from collections import defaultdict
from pathlib import Path

from asr.data.manifest import read_manifest, write_manifest

REPO = Path(__file__).resolve().parents[2]
DEFAULT_SOURCE = Path(os.environ.get("ASR_REAL_DATA", REPO.parent / "shared" / "data" / "real"))


def speaker_split(
    entries: list[dict], dev_fraction: float = 0.1, seed: int = 0, max_speaker_fraction: float = 0.25
) -> tuple[list[dict], list[dict]]:
    """Split entries into (train, dev) with no speaker in both; see the module docstring."""
    if not 0.0 <= dev_fraction < 1.0:
        raise ValueError(f"dev fraction must be in [0, 1), got {dev_fraction}")
    by_speaker: dict[str, list[dict]] = defaultdict(list)
    for e in entries:
        # An utterance without a speaker label is its own speaker (cannot leak into the other side).
        by_speaker[str(e.get("speaker") or f"utt:{e['id']}")].append(e)
    total = sum(e["duration"] for e in entries)
    seconds = {s: sum(e["duration"] for e in es) for s, es in by_speaker.items()}
    order = sorted(by_speaker, key=lambda s: (hashlib.sha1(f"{seed}:{s}".encode()).hexdigest(), s))
    target = dev_fraction * total
    dev_speakers: set[str] = set()
    dev_seconds = 0.0
    for s in order:
        if dev_seconds >= target:
            break
        if seconds[s] > max_speaker_fraction * total:
            continue
        dev_speakers.add(s)
        dev_seconds += seconds[s]
    train = [e for s in sorted(by_speaker) if s not in dev_speakers for e in by_speaker[s]]
    dev = [e for s in sorted(by_speaker) if s in dev_speakers for e in by_speaker[s]]
    key = lambda e: e["id"]  # noqa: E731 - stable output order, independent of dict order
    return sorted(train, key=key), sorted(dev, key=key)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--source", type=Path, default=DEFAULT_SOURCE, help="folder with manifest.jsonl (default: %(default)s)")
    ap.add_argument("--out-dir", type=Path, default=Path(".data/real"))
    ap.add_argument("--dev-fraction", type=float, default=0.1, help="share of the audio duration in dev")
    ap.add_argument("--max-speaker-fraction", type=float, default=0.25)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    manifest = args.source / "manifest.jsonl"
    if not manifest.is_file():
        print(f"error: {manifest} not found (set --source or ASR_REAL_DATA)", file=sys.stderr)
        return 2
    entries = read_manifest(manifest)
    missing = [e["audio"] for e in entries if not Path(e["audio"]).is_file()]
    if missing:
        print(f"error: {len(missing)} audio files missing, e.g. {missing[0]}", file=sys.stderr)
        return 2
    train, dev = speaker_split(entries, args.dev_fraction, args.seed, args.max_speaker_fraction)
    write_manifest(args.out_dir / "train.jsonl", train)
    write_manifest(args.out_dir / "dev.jsonl", dev)
    for name, part in (("train", train), ("dev", dev)):
        speakers = sorted({str(e.get("speaker")) for e in part})
        print(f"{name}: {len(part)} utterances, {sum(e['duration'] for e in part) / 60:.1f} min, "
              f"{len(speakers)} speakers")
    print(f"dev speakers: {', '.join(sorted({str(e.get('speaker')) for e in dev}))}")
    print(f"wrote {args.out_dir / 'train.jsonl'} and {args.out_dir / 'dev.jsonl'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
