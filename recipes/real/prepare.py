#!/usr/bin/env python
"""Prepare the real-speech recipe: split ``../shared/data/real`` into train, dev and misc.

The dev set is **speaker-disjoint** from train (a dev WER on speakers seen in training flatters the
model), **deterministic** (speakers are ordered by a hash of (seed, speaker name)), and has enough
audio in each **scored part** (:data:`SCORED_PARTS`), so a WER per part means something:

* Each source folder (``audio/<source>/``) is split on its own by :data:`POLICY`: speakers are
  moved to dev in hash order until dev holds ``fraction`` of that source's audio **and** at least
  ``min_utts`` scored utterances **and** ``min_speakers`` speakers. At least one speaker always
  stays in train (unless ``fraction`` is 1: the whole source is dev).
* Single-speaker sources cannot be split by speaker: ``cathy`` (ARCTIC prompts, 10 % of all
  audio) and ``asterisk`` (telephone prompts) stay in train; ``mfa`` (4.8 min) is dev.
* Every utterance gets a ``part`` (:func:`scored_part`) from its source and its words: an
  utterance of only number words (``"seven"``, ``"one five oh four"``) from a digit-bearing source is
  ``digits``; the rest is ``read`` (native read sentences), ``librispeech``, ``nonnative``
  (speechocean762), ``commands`` (single words), or an unscored part (``prompts``, ``spelled``).
* A dev speaker with more than ``max_dev_utts`` scored utterances (FSDD: 500 takes of the ten
  digits) gives only that many, chosen by hash; their other utterances and the unscored ones of
  dev speakers go to ``unused.jsonl`` (in neither train nor dev).
* :data:`TRAIN_ONLY_SPEAKERS` (the LibriSpeech readers earlier bundled models trained on) never go to dev.
* ``audio/misc`` (11 smoke-test recordings) is its own set, ``misc.jsonl``, in neither train nor dev.

    python recipes/real/prepare.py [--source DIR] [--out-dir .data/real] [--seed 0]

Writes ``<out-dir>/{train,dev,misc,unused}.jsonl`` and ``dev_<part>.jsonl`` per scored part, audio
paths relative to them; every entry carries ``source`` (its folder) and ``part``.
"""
from __future__ import annotations

import argparse
import hashlib
import os
import sys
from collections import defaultdict
from pathlib import Path
from typing import NamedTuple

from asr.data.manifest import read_manifest, write_manifest

REPO = Path(__file__).resolve().parents[2]
DEFAULT_SOURCE = Path(os.environ.get("ASR_REAL_DATA", REPO.parent / "shared" / "data" / "real"))

#: The parts a dev WER is reported for (tools/bench_accuracy.py), in table order.
SCORED_PARTS = ("read", "librispeech", "nonnative", "digits", "commands")
NUMBER_WORDS = frozenset(
    "zero oh one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen "
    "sixteen seventeen eighteen nineteen twenty thirty forty fifty sixty seventy eighty ninety hundred "
    "thousand".split())
#: Sources whose number-only utterances are scored as ``digits``.
DIGIT_SOURCES = frozenset({"fsdd", "speech_commands", "an4", "asterisk"})
#: Part of every other utterance, by source (an4 and asterisk: see :func:`scored_part`).
SOURCE_PART = {"cathy": "read", "mfa": "read", "commonvoice": "read", "librispeech": "librispeech",
               "speechocean": "nonnative", "speech_commands": "commands", "fsdd": "digits", "misc": "misc"}


class Policy(NamedTuple):
    """How one source folder is split: see the module docstring. (A NamedTuple, not a dataclass:
    recipes are loaded as scripts, outside sys.modules, where dataclasses cannot resolve annotations.)"""

    fraction: float
    min_utts: int = 0
    min_speakers: int = 0
    max_dev_utts: int | None = None


POLICY = {
    "fsdd": Policy(0.1, min_speakers=2, max_dev_utts=100),  # 6 speakers x 500 digits
    "speechocean": Policy(0.1, min_utts=150),
    "speech_commands": Policy(0.1, min_utts=150),
    "librispeech": Policy(0.1, min_utts=60),  # one utterance per speaker
    "commonvoice": Policy(0.1, min_utts=30),
    "an4": Policy(0.3, min_utts=20),
    "mfa": Policy(1.0),  # one speaker: all dev
    "cathy": Policy(0.0),  # one speaker: all train
    "asterisk": Policy(0.0),  # one speaker: all train
}
#: Speakers that never go to dev: the 14 LibriSpeech readers the bundled model up to run 9 was trained
#: on (the first real split), so that model's dev scores are on unseen speakers too.
TRAIN_ONLY_SPEAKERS = frozenset(f"librispeech_{n}" for n in (
    19, 61, 78, 248, 911, 2514, 2518, 3259, 3526, 3607, 4406, 5778, 6415, 7859))


def scored_part(source: str, text: str) -> str:
    """The part an utterance of ``source`` with normalised ``text`` is scored in (or an unscored name)."""
    words = text.split()
    if source in DIGIT_SOURCES and words and all(w in NUMBER_WORDS for w in words):
        return "digits"
    if source == "an4":  # control words ("repeat"), or letters spelled with numbers ("erase c k c w")
        return "commands" if len(words) == 1 else "spelled"
    if source == "asterisk":
        return "prompts"
    if source not in SOURCE_PART:
        raise ValueError(f"unknown source folder {source!r}: add it to POLICY and SOURCE_PART")
    return SOURCE_PART[source]


def _hash_key(seed: int, name: str) -> tuple[str, str]:
    return hashlib.sha1(f"{seed}:{name}".encode()).hexdigest(), name


def speaker_split(
    entries: list[dict], dev_fraction: float = 0.1, seed: int = 0, max_speaker_fraction: float = 0.25
) -> tuple[list[dict], list[dict]]:
    """Split entries into (train, dev) with no speaker in both: speakers in hash order go to dev
    until it holds ``dev_fraction`` of the audio; a speaker with more than ``max_speaker_fraction``
    of all audio always stays in train. (One pool; :func:`scored_split` applies it per source.)"""
    if not 0.0 <= dev_fraction < 1.0:
        raise ValueError(f"dev fraction must be in [0, 1), got {dev_fraction}")
    by_speaker = _by_speaker(entries)
    total = sum(e["duration"] for e in entries)
    dev_speakers: set[str] = set()
    dev_seconds = 0.0
    for s in sorted(by_speaker, key=lambda s: _hash_key(seed, s)):
        if dev_seconds >= dev_fraction * total:
            break
        seconds = sum(e["duration"] for e in by_speaker[s])
        if seconds > max_speaker_fraction * total:
            continue
        dev_speakers.add(s)
        dev_seconds += seconds
    return _sides(by_speaker, dev_speakers)


def _by_speaker(entries: list[dict]) -> dict[str, list[dict]]:
    by_speaker: dict[str, list[dict]] = defaultdict(list)
    for e in entries:
        # An utterance without a speaker label is its own speaker (cannot leak into the other side).
        by_speaker[str(e.get("speaker") or f"utt:{e['id']}")].append(e)
    return by_speaker


def _sides(by_speaker: dict[str, list[dict]], dev_speakers: set[str]) -> tuple[list[dict], list[dict]]:
    key = lambda e: e["id"]  # noqa: E731 - stable output order, independent of input order
    train = [e for s, es in by_speaker.items() if s not in dev_speakers for e in es]
    dev = [e for s, es in by_speaker.items() if s in dev_speakers for e in es]
    return sorted(train, key=key), sorted(dev, key=key)


def _dev_share(utts: list[dict], policy: Policy, seed: int) -> tuple[list[dict], list[dict]]:
    """One dev speaker's utterances as (scored in dev, unused): unscored parts and those over the cap."""
    scored = [e for e in utts if e["part"] in SCORED_PARTS]
    unused = [e for e in utts if e["part"] not in SCORED_PARTS]
    if policy.max_dev_utts is not None and len(scored) > policy.max_dev_utts:
        scored = sorted(scored, key=lambda e: _hash_key(seed, e["id"]))
        unused += scored[policy.max_dev_utts:]
        scored = scored[: policy.max_dev_utts]
    return scored, unused


def split_source(entries: list[dict], policy: Policy, seed: int = 0) -> tuple[list[dict], list[dict], list[dict]]:
    """Split one source's entries (each with ``part``) into (train, dev, unused) by ``policy``."""
    by_speaker = _by_speaker(entries)
    total = sum(e["duration"] for e in entries)
    order = sorted((s for s in by_speaker if s not in TRAIN_ONLY_SPEAKERS), key=lambda s: _hash_key(seed, s))
    dev_speakers: set[str] = set()
    dev_seconds, dev_utts = 0.0, 0
    for s in order:
        enough = (dev_seconds >= policy.fraction * total and dev_utts >= policy.min_utts
                  and len(dev_speakers) >= policy.min_speakers)
        if policy.fraction <= 0.0 or enough or (policy.fraction < 1.0 and len(dev_speakers) == len(order) - 1):
            break
        dev_speakers.add(s)
        dev_seconds += sum(e["duration"] for e in by_speaker[s])
        dev_utts += len(_dev_share(by_speaker[s], policy, seed)[0])
    train, dev_all = _sides(by_speaker, dev_speakers)
    dev, unused = [], []
    for s in sorted(dev_speakers):
        scored, rest = _dev_share(by_speaker[s], policy, seed)
        dev += scored
        unused += rest
    return train, sorted(dev, key=lambda e: e["id"]), sorted(unused, key=lambda e: e["id"])


def scored_split(entries: list[dict], seed: int = 0) -> dict[str, list[dict]]:
    """Split entries carrying ``source`` into ``{"train", "dev", "misc", "unused"}``; adds ``part``.

    Raises ValueError for a source without a policy or a speaker found in two sources (speaker ids
    carry their source's prefix in ../shared/data/real, so that would be a labelling error).
    """
    by_source: dict[str, list[dict]] = defaultdict(list)
    for e in entries:
        by_source[e["source"]].append(dict(e, part=scored_part(e["source"], e["text"])))
    owner: dict[str, str] = {}
    for source, es in sorted(by_source.items()):
        for s in {str(e.get("speaker")) for e in es if e.get("speaker")}:
            if owner.setdefault(s, source) != source:
                raise ValueError(f"speaker {s!r} occurs in both {owner[s]!r} and {source!r}")
    out: dict[str, list[dict]] = {"train": [], "dev": [], "misc": by_source.pop("misc", []), "unused": []}
    for source, es in sorted(by_source.items()):
        if source not in POLICY:
            raise ValueError(f"unknown source folder {source!r}: add it to POLICY")
        train, dev, unused = split_source(es, POLICY[source], seed)
        out["train"] += train
        out["dev"] += dev
        out["unused"] += unused
    return {k: sorted(v, key=lambda e: e["id"]) for k, v in out.items()}


def source_of(audio: str | os.PathLike, root: Path) -> str:
    """The folder under ``<root>/audio/`` that holds ``audio`` (e.g. ``"fsdd"``)."""
    rel = Path(audio).resolve().relative_to((root / "audio").resolve())
    return rel.parts[0]


def summary(split: dict[str, list[dict]]) -> str:
    """Markdown table: utterances, minutes and speakers per set and part."""
    rows = ["| set | part | utterances | minutes | speakers | sources |", "|---|---|---:|---:|---:|---|"]
    for name, es in split.items():
        by_part: dict[str, list[dict]] = defaultdict(list)
        for e in es:
            by_part[e["part"]].append(e)
        for part in sorted(by_part) + ["all"]:
            pe = es if part == "all" else by_part[part]
            sources = ", ".join(sorted({e["source"] for e in pe})) if part != "all" else ""
            rows.append(f"| {name} | {part} | {len(pe)} | {sum(e['duration'] for e in pe) / 60:.1f} | "
                        f"{len({str(e.get('speaker')) for e in pe})} | {sources} |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--source", type=Path, default=DEFAULT_SOURCE, help="folder with manifest.jsonl (default: %(default)s)")
    ap.add_argument("--out-dir", type=Path, default=Path(".data/real"))
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
    try:
        entries = [dict(e, source=source_of(e["audio"], args.source)) for e in entries]
        split = scored_split(entries, args.seed)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for name, es in split.items():
        write_manifest(args.out_dir / f"{name}.jsonl", es)
    for part in SCORED_PARTS:
        write_manifest(args.out_dir / f"dev_{part}.jsonl", [e for e in split["dev"] if e["part"] == part])
    print(summary(split))
    print(f"wrote {', '.join(f'{n}.jsonl' for n in split)} and dev_<part>.jsonl to {args.out_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
