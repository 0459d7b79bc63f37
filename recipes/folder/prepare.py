#!/usr/bin/env python
"""Prepare manifests from your own data: a folder of audio with transcripts, or a table.

Two inputs:

* ``--audio-dir DIR``: every audio file under DIR (recursively; .wav .flac .ogg .mp3 ...) that has a
  transcript with the same name and ``.txt`` beside it (``a/b/x.wav`` + ``a/b/x.txt``). Files without
  a transcript are reported and skipped. The speaker is the file's parent folder (relative to DIR),
  none for files directly in DIR.
* ``--table FILE``: a CSV (``,``) or TSV (tab; chosen by the ``.tsv`` extension or by sniffing) of
  audio path and text. A header row naming the columns (``path``/``audio``/``file``, ``text``/
  ``transcript``/``sentence``, optional ``speaker``) is used when present; without one the first
  column is the path and the second the text. Relative paths are relative to ``--audio-root``
  (default: the table's folder).

Writes ``<out-dir>/train.jsonl`` and ``<out-dir>/dev.jsonl``. The dev share is chosen per speaker
when speakers are known (no speaker in both), else per utterance, by a hash of (seed, name), so
it is deterministic and stable when files are added.

    python recipes/folder/prepare.py --audio-dir /my/audio [--out-dir .data/folder] [--dev-fraction 0.05]
    python recipes/folder/prepare.py --table list.tsv [--audio-root /my/audio]
"""
from __future__ import annotations

import argparse
import csv
import hashlib
import sys
from pathlib import Path

from asr.data.manifest import audio_durations, write_manifest
from asr.tokenizer import normalize_text

AUDIO_EXTENSIONS = {".wav", ".flac", ".ogg", ".oga", ".opus", ".mp3", ".aiff", ".aif", ".au", ".w64", ".caf"}
PATH_COLUMNS = ("path", "audio", "file", "filename", "audio_path", "wav")
TEXT_COLUMNS = ("text", "transcript", "transcription", "sentence", "normalized_text")


def from_folder(audio_dir: Path) -> tuple[list[dict], list[str]]:
    """Pending entries (no duration yet) for audio files with a same-named .txt, and problems."""
    rows, problems = [], []
    for audio in sorted(p for p in audio_dir.rglob("*") if p.suffix.lower() in AUDIO_EXTENSIONS and p.is_file()):
        txt = audio.with_suffix(".txt")
        rel = audio.relative_to(audio_dir)
        if not txt.is_file():
            problems.append(f"{audio}: no transcript {txt.name}")
            continue
        parent = rel.parent.as_posix()
        rows.append({
            "id": rel.with_suffix("").as_posix(),
            "audio": str(audio),
            "text": txt.read_text(encoding="utf-8"),
            "speaker": None if parent == "." else parent,
        })
    return rows, problems


def _delimiter(table: Path, sample: str) -> str:
    if table.suffix.lower() == ".tsv":
        return "\t"
    if table.suffix.lower() == ".csv":
        return ","
    try:
        return csv.Sniffer().sniff(sample, delimiters=",\t;|").delimiter
    except csv.Error:
        return "\t" if "\t" in sample else ","


def from_table(table: Path, audio_root: Path | None = None) -> tuple[list[dict], list[str]]:
    """Pending entries from a CSV/TSV of path and text (see the module docstring), and problems."""
    content = table.read_text(encoding="utf-8-sig")
    delim = _delimiter(table, content[:4096])
    reader = list(csv.reader(content.splitlines(), delimiter=delim))
    reader = [r for r in reader if r and any(c.strip() for c in r)]
    if not reader:
        return [], [f"{table}: empty table"]
    header = [c.strip().lower() for c in reader[0]]
    path_col = next((header.index(c) for c in PATH_COLUMNS if c in header), None)
    text_col = next((header.index(c) for c in TEXT_COLUMNS if c in header), None)
    spk_col = header.index("speaker") if "speaker" in header else None
    if path_col is not None and text_col is not None:
        body, first_line = reader[1:], 2
    else:
        path_col, text_col, spk_col, body, first_line = 0, 1, None, reader, 1
    base = audio_root or table.parent
    rows, problems, seen = [], [], set()
    for lineno, r in enumerate(body, first_line):
        if len(r) <= max(path_col, text_col):
            problems.append(f"{table}:{lineno}: expected a path and a text column")
            continue
        rel = Path(r[path_col].strip())
        audio = rel if rel.is_absolute() else base / rel
        if not audio.is_file():
            problems.append(f"{table}:{lineno}: audio {audio} not found")
            continue
        uid = rel.with_suffix("").as_posix().lstrip("/")
        if uid in seen:
            problems.append(f"{table}:{lineno}: {rel} listed twice")
            continue
        seen.add(uid)
        speaker = r[spk_col].strip() if spk_col is not None and len(r) > spk_col and r[spk_col].strip() else None
        rows.append({"id": uid, "audio": str(audio), "text": r[text_col], "speaker": speaker})
    return rows, problems


def split_dev(entries: list[dict], dev_fraction: float, seed: int) -> tuple[list[dict], list[dict]]:
    """Hash-based split: by speaker where every entry has one, else by utterance id."""
    by_speaker = all(e.get("speaker") for e in entries)

    def in_dev(e: dict) -> bool:
        key = e["speaker"] if by_speaker else e["id"]
        h = int(hashlib.sha1(f"{seed}:{key}".encode()).hexdigest()[:12], 16) / 16**12
        return h < dev_fraction

    train = [e for e in entries if not in_dev(e)]
    dev = [e for e in entries if in_dev(e)]
    if dev_fraction > 0 and not dev and len(entries) > 1:
        # Too few speakers/utterances for the hash to pick any: take the one with the smallest hash.
        key = (lambda e: e["speaker"]) if by_speaker else (lambda e: e["id"])
        first = min(entries, key=lambda e: hashlib.sha1(f"{seed}:{key(e)}".encode()).hexdigest())
        dev = [e for e in entries if key(e) == key(first)]
        train = [e for e in entries if key(e) != key(first)]
    return train, dev


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--audio-dir", type=Path, help="folder of audio files with same-named .txt transcripts")
    src.add_argument("--table", type=Path, help="CSV/TSV with audio path and text columns")
    ap.add_argument("--audio-root", type=Path, default=None, help="base of relative paths in --table")
    ap.add_argument("--out-dir", type=Path, default=Path(".data/folder"))
    ap.add_argument("--dev-fraction", type=float, default=0.05)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--jobs", type=int, default=4, help="threads reading audio headers")
    args = ap.parse_args(argv)

    if args.audio_dir is not None:
        if not args.audio_dir.is_dir():
            print(f"error: {args.audio_dir} is not a folder", file=sys.stderr)
            return 2
        rows, problems = from_folder(args.audio_dir)
    else:
        if not args.table.is_file():
            print(f"error: {args.table} not found", file=sys.stderr)
            return 2
        rows, problems = from_table(args.table, args.audio_root)
    entries = []
    for row, d in zip(rows, audio_durations([r["audio"] for r in rows], jobs=args.jobs)):
        if d is None:
            problems.append(f"{row['audio']}: unreadable audio")
            continue
        text = normalize_text(row["text"])
        if not text:
            problems.append(f"{row['audio']}: empty transcript")
            continue
        entries.append({"id": row["id"], "audio": row["audio"], "duration": d, "text": text, "speaker": row["speaker"]})
    for p in problems[:10]:
        print(f"warning: {p}", file=sys.stderr)
    if len(problems) > 10:
        print(f"warning: ... and {len(problems) - 10} more", file=sys.stderr)
    if not entries:
        print("error: no usable utterances", file=sys.stderr)
        return 2
    train, dev = split_dev(entries, args.dev_fraction, args.seed)
    write_manifest(args.out_dir / "train.jsonl", train)
    write_manifest(args.out_dir / "dev.jsonl", dev)
    for name, part in (("train", train), ("dev", dev)):
        print(f"{name}: {len(part)} utterances, {sum(e['duration'] for e in part) / 60:.1f} min")
    print(f"wrote {args.out_dir / 'train.jsonl'} and {args.out_dir / 'dev.jsonl'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
