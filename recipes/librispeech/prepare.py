#!/usr/bin/env python
"""Prepare LibriSpeech manifests from an extracted download (openslr.org/12).

Expected layout (any subset of splits)::

    <root>/<split>/<speaker>/<chapter>/<speaker>-<chapter>-<utt>.flac
    <root>/<split>/<speaker>/<chapter>/<speaker>-<chapter>.trans.txt     ("<utt-id> TRANSCRIPT" lines)

``<root>`` may also be the folder that contains ``LibriSpeech/``. For every split found (or those
given with ``--splits``) writes ``<out-dir>/<split>.jsonl``; transcripts are normalised
(lower-case, ``a-z0-9'``); durations come from the FLAC headers.

    python recipes/librispeech/prepare.py --root /data/LibriSpeech [--splits dev-clean train-clean-100] \
        [--out-dir .data/librispeech] [--jobs 8]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from asr.data.manifest import audio_durations, write_manifest
from asr.tokenizer import normalize_text

SPLITS = ("train-clean-100", "train-clean-360", "train-other-500", "dev-clean", "dev-other", "test-clean", "test-other")


def find_root(root: Path) -> Path:
    """Accept both ``.../LibriSpeech`` and its parent folder."""
    if not any((root / s).is_dir() for s in SPLITS) and (root / "LibriSpeech").is_dir():
        return root / "LibriSpeech"
    return root


def split_entries(split_dir: Path, jobs: int = 4) -> tuple[list[dict], list[str]]:
    """Entries of one split, and a list of problems (missing or unreadable audio) that were skipped."""
    pending: list[dict] = []
    problems: list[str] = []
    for trans in sorted(split_dir.glob("*/*/*.trans.txt")):
        speaker = trans.parent.parent.name
        for lineno, line in enumerate(trans.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            uid, _, text = line.strip().partition(" ")
            audio = trans.parent / f"{uid}.flac"
            if not audio.is_file():
                problems.append(f"{trans}:{lineno}: {audio.name} missing")
                continue
            pending.append({"id": uid, "audio": str(audio), "text": normalize_text(text), "speaker": speaker})
    durations = audio_durations([e["audio"] for e in pending], jobs=jobs)
    entries = []
    for e, d in zip(pending, durations):
        if d is None:
            problems.append(f"{e['audio']}: unreadable audio")
            continue
        entries.append({"id": e["id"], "audio": e["audio"], "duration": d, "text": e["text"], "speaker": e["speaker"]})
    return entries, problems


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--root", type=Path, required=True, help="extracted LibriSpeech folder")
    ap.add_argument("--splits", nargs="*", default=None, help=f"default: every one of {', '.join(SPLITS)} present")
    ap.add_argument("--out-dir", type=Path, default=Path(".data/librispeech"))
    ap.add_argument("--jobs", type=int, default=4, help="threads reading audio headers")
    args = ap.parse_args(argv)

    root = find_root(args.root)
    splits = args.splits or [s for s in SPLITS if (root / s).is_dir()]
    if not splits:
        print(f"error: no LibriSpeech split folder ({', '.join(SPLITS)}) under {args.root}", file=sys.stderr)
        return 2
    status = 0
    for split in splits:
        split_dir = root / split
        if not split_dir.is_dir():
            print(f"error: {split_dir} not found", file=sys.stderr)
            status = 2
            continue
        entries, problems = split_entries(split_dir, args.jobs)
        for p in problems[:10]:
            print(f"warning: {p}", file=sys.stderr)
        if len(problems) > 10:
            print(f"warning: ... and {len(problems) - 10} more problems", file=sys.stderr)
        if not entries:
            print(f"error: no utterances in {split_dir}", file=sys.stderr)
            status = 2
            continue
        out = args.out_dir / f"{split}.jsonl"
        write_manifest(out, entries)
        hours = sum(e["duration"] for e in entries) / 3600
        print(f"{split}: {len(entries)} utterances, {hours:.2f} h, "
              f"{len({e['speaker'] for e in entries})} speakers -> {out}")
    return status


if __name__ == "__main__":
    sys.exit(main())
