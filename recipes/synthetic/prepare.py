#!/usr/bin/env python
"""Generate a synthetic English speech corpus with espeak-ng and flite (Debian main), degraded to
sound recorded, with a test set of unseen voices and unseen sentences.

    python recipes/synthetic/prepare.py [--out .data/synthetic] [--hours 6.0] [--dev-hours 0.25]
        [--test-hours 0.4] [--seed 0] [--jobs 2] [--format opus|flac|wav] [--kbps 12]

Writes ``<out>/{train,dev,test}.jsonl`` (paths relative to them) and ``<out>/audio/<split>/*.ogg``
(or ``.flac``), plus ``<out>/info.json`` (voices, sentence counts, hours, arguments).

Splits:

* **train**: espeak-ng base voices with every variant except the held-out ones, and the flite
  voices kal, kal16, awb, slt; sentences from the training share of each text source (a sentence
  may be spoken several times by different voices).
* **dev**: the training voices, sentences that occur in neither train nor test.
* **test**: voices never heard in training: every espeak-ng base voice with the held-out variants
  ``+m3`` and ``+f4`` (these variants never occur in train or dev) and the flite voice ``rms``;
  sentences that occur in neither train nor dev, each spoken once; reverberation from a separate
  pool of simulated rooms.

Sentences are compared after normalisation (the transcript), so "Hello!" in test and "hello" in
train count as the same sentence. Transcripts of ``--exclude-manifest`` (by default the real-speech
manifest, whose misc/dev recordings are evaluation data) never occur in any split.

Every utterance is a pure function of (seed, split, index): the voice, rate, pitch, sentence and
degradation are drawn in the main process from per-utterance generators, so the corpus does not
depend on ``--jobs`` or scheduling. Generation stops at the first utterance that brings a split to
its target duration.
"""
from __future__ import annotations

import argparse
import json
import math
import multiprocessing as mp
import os
import random
import shutil
import sys
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import augment_audio  # noqa: E402
import engines  # noqa: E402
import textnorm  # noqa: E402
import texts  # noqa: E402

from asr.data.manifest import read_manifest, write_manifest  # noqa: E402

REPO = HERE.parents[1]
DEFAULT_REAL_MANIFEST = Path(os.environ.get("ASR_REAL_DATA", REPO.parent / "shared" / "data" / "real")) / "manifest.jsonl"

#: espeak-ng variants heard only in the test set (with every base voice).
HELD_OUT_VARIANTS = ("m3", "f4")
#: flite voices heard only in the test set.
HELD_OUT_FLITE = ("rms",)
TRAIN_FLITE = tuple(v for v in engines.FLITE_VOICES if v not in HELD_OUT_FLITE)
#: Share of utterances per text source (by count; KJV clauses are twice as long as the others).
SOURCE_WEIGHTS = {"kjv": 0.30, "wordnet": 0.35, "commands": 0.20, "numbers": 0.15}
#: The opt-in source of LibriSpeech text (``--librispeech-text``): training text only, drawn for
#: ``--librispeech-share`` of the training utterances; dev and test keep the sources above.
BOOK_SOURCE = "librispeech"
#: Share of utterances per engine.
ENGINE_WEIGHTS = {"espeak": 0.6, "flite": 0.4}
SPLITS = ("test", "dev", "train")  # order of sentence reservation: test first, then dev
SPLIT_CODE = {"train": 0, "dev": 1, "test": 2}
#: Rough mean utterance length used only to size the sentence reservations for dev/test.
EST_SECONDS_PER_UTT = 3.0
MAX_SECONDS = 20.0  # longer utterances (rare: slow voice, 20 words) are skipped


# --- sentences -------------------------------------------------------------------------------------

def build_sentences(seed: int, exclude: set[str], kjv_text: Path | None = None,
                    wordnet_dir: Path = texts.WORDNET_DIR, generated: int = 40000,
                    limit: int | None = None, book_text: Path | None = None
                    ) -> dict[str, list[tuple[str, str]]]:
    """(speakable, transcript) pairs per source, unique by transcript across all sources, shuffled
    with ``seed``, none whose transcript is in ``exclude``. ``limit`` keeps only the first raw
    sentences of each source (quick runs and tests). ``book_text`` adds the ``librispeech`` source
    last, so the other sources' pools do not depend on it."""
    rng = random.Random(seed)
    if limit is not None:
        generated = min(generated, limit)
    raw: dict[str, list[tuple[str, bool]]] = {
        "kjv": [(c, True) for v in texts.kjv_verses(kjv_text)[:limit] for c in textnorm.split_clauses(v)],
        "wordnet": [(s, False) for s in texts.wordnet_examples(wordnet_dir)[:limit]],
        "commands": [(s, False) for s in texts.command_phrases(random.Random(f"{seed}:commands"), generated)],
        "numbers": [(s, False) for s in texts.number_phrases(random.Random(f"{seed}:numbers"), generated)],
    }
    if book_text is not None:
        raw[BOOK_SOURCE] = [(s, False) for s in texts.book_pieces(
            book_text, random.Random(f"{seed}:books"), lambda line: textnorm.to_transcript(line) in exclude)[:limit]]
    seen = set(exclude)
    pools: dict[str, list[tuple[str, str]]] = {}
    for source, items in raw.items():
        pool = []
        for text, caps in items:
            prepared = textnorm.prepare_sentence(text, lowercase_caps=caps)
            if prepared is None or prepared[1] in seen:
                continue
            seen.add(prepared[1])
            pool.append(prepared)
        rng.shuffle(pool)
        pools[source] = pool
    return pools


def split_sentences(pools: dict[str, list[tuple[str, str]]], hours: dict[str, float]
                    ) -> dict[str, dict[str, list[tuple[str, str]]]]:
    """Reserve disjoint sentence lists for test and dev (sized for their hours with a 2x margin,
    since each is spoken once there); the rest of each source is the training text."""
    out: dict[str, dict[str, list[tuple[str, str]]]] = {s: {} for s in SPLITS}
    for source, pool in pools.items():
        if source == BOOK_SOURCE:
            out["train"][source] = pool
            continue
        start = 0
        for split in ("test", "dev"):
            n = math.ceil(2.0 * SOURCE_WEIGHTS[source] * hours[split] * 3600 / EST_SECONDS_PER_UTT) + 10
            if start + n >= len(pool):
                raise RuntimeError(f"source {source}: {len(pool)} sentences, too few for the {split} reservation")
            out[split][source] = pool[start:start + n]
            start += n
        out["train"][source] = pool[start:]
    return out


# --- jobs -------------------------------------------------------------------------------------------

def voices_for(split: str, variants: list[str]) -> dict[str, list]:
    """Voices per engine for a split: held-out ones for test, the rest for train and dev."""
    if split == "test":
        return {"espeak": [(v, var) for v in engines.ESPEAK_VOICES for var in HELD_OUT_VARIANTS],
                "flite": list(HELD_OUT_FLITE)}
    train_variants = [v for v in variants if v not in HELD_OUT_VARIANTS]
    return {"espeak": [(v, var) for v in engines.ESPEAK_VOICES for var in train_variants],
            "flite": list(TRAIN_FLITE)}


def source_weights(split: str, book_share: float) -> dict[str, float]:
    """Share of a split's utterances per text source: :data:`SOURCE_WEIGHTS`, with ``book_share`` of
    the training utterances moved to :data:`BOOK_SOURCE` (0: the source is not used)."""
    if split != "train" or book_share <= 0:
        return dict(SOURCE_WEIGHTS)
    return {**{s: w * (1.0 - book_share) for s, w in SOURCE_WEIGHTS.items()}, BOOK_SOURCE: book_share}


def make_jobs(split: str, sentences: dict[str, list[tuple[str, str]]], variants: list[str], seed: int,
              count: int, book_share: float = 0.0) -> list[dict]:
    """``count`` job specs for a split; each draws its own parameters from a generator seeded by
    (seed, split, index). Train cycles through its sentences; dev/test use each sentence once."""
    voices = voices_for(split, variants)
    cursor = {s: 0 for s in sentences}
    weights = source_weights(split, book_share)
    sources, s_w = list(weights), np.array(list(weights.values()))
    engines_, e_w = list(ENGINE_WEIGHTS), np.array(list(ENGINE_WEIGHTS.values()))
    jobs = []
    for i in range(count):
        rng = np.random.default_rng([seed, SPLIT_CODE[split], i])
        source = sources[int(rng.choice(len(sources), p=s_w / s_w.sum()))]
        pool = sentences[source]
        if cursor[source] >= len(pool):
            if split != "train":
                continue  # reservation used up (dev/test sentences are spoken once)
            cursor[source] = 0
        speak, text = pool[cursor[source]]
        cursor[source] += 1
        engine = engines_[int(rng.choice(len(engines_), p=e_w / e_w.sum()))]
        job = {"id": f"synth-{split}-{i:06d}", "split": split, "source": source, "engine": engine,
               "speak": speak, "text": text, "aug_seed": [seed, SPLIT_CODE[split], i, 1]}
        if engine == "espeak":
            voice, variant = voices["espeak"][int(rng.integers(len(voices["espeak"])))]
            job.update(voice=voice, variant=variant, rate=int(rng.integers(130, 201)),
                       pitch=int(rng.integers(30, 71)), word_gap=int(rng.choice([0, 0, 0, 1, 2])),
                       speaker=f"espeak:{voice}+{variant}")
        else:
            voice = voices["flite"][int(rng.integers(len(voices["flite"])))]
            lo, hi = engines.FLITE_F0[voice]
            job.update(voice=voice, stretch=round(float(rng.uniform(0.85, 1.25)), 3),
                       f0=round(float(rng.uniform(lo, hi)), 1), speaker=f"flite:{voice}")
        jobs.append(job)
    return jobs


# --- workers ----------------------------------------------------------------------------------------

_RIRS: dict[str, list] = {}
_OUT: Path = Path(".")
_FORMAT = "opus"
_KBPS = 12.0


def _init_worker(rirs: dict[str, list], out: str, fmt: str, kbps: float) -> None:
    global _RIRS, _OUT, _FORMAT, _KBPS
    _RIRS, _OUT, _FORMAT, _KBPS = rirs, Path(out), fmt, kbps


def _rir_task(args: tuple[int, int, int]) -> tuple[np.ndarray, dict]:
    return augment_audio.make_rir(np.random.default_rng(list(args)))


def synth_one(job: dict) -> dict:
    """Synthesise, degrade and write one utterance; returns its manifest entry, or {"error": ...}."""
    try:
        if job["engine"] == "espeak":
            x, sr = engines.synth_espeak(job["speak"], job["voice"], job["variant"], job["rate"],
                                         job["pitch"], job["word_gap"])
        else:
            x, sr = engines.synth_flite(job["speak"], job["voice"], job["stretch"], job["f0"])
    except engines.EngineError as e:
        return {"id": job["id"], "error": str(e)}
    rirs = _RIRS.get("test" if job["split"] == "test" else "train")
    y, aug = augment_audio.degrade(x, sr, np.random.default_rng(job["aug_seed"]), rirs=rirs)
    duration = len(y) / augment_audio.SAMPLE_RATE
    if duration > MAX_SECONDS:
        return {"id": job["id"], "error": f"too long ({duration:.1f} s)"}
    ext = {"opus": "ogg"}.get(_FORMAT, _FORMAT)
    rel = Path("audio") / job["split"] / f"{job['id']}.{ext}"
    augment_audio.write_audio(_OUT / rel, y, _FORMAT, _KBPS)
    params = {k: job[k] for k in ("voice", "variant", "rate", "pitch", "word_gap", "stretch", "f0") if k in job}
    return {"id": job["id"], "audio": rel.as_posix(), "duration": round(duration, 4), "text": job["text"],
            "speaker": job["speaker"], "engine": job["engine"], "source": job["source"],
            "tts": params, "augment": aug}


# --- main -------------------------------------------------------------------------------------------

def run_split(pool: mp.pool.Pool, jobs: list[dict], hours: float, log) -> list[dict]:
    """Run jobs in order until their audio reaches ``hours``; returns the kept entries."""
    target = hours * 3600.0
    kept: list[dict] = []
    total = 0.0
    errors = 0
    t0 = time.time()
    for entry in pool.imap(synth_one, jobs, chunksize=4):
        if "error" in entry:
            errors += 1
            log(f"  skip {entry['id']}: {entry['error']}")
            continue
        kept.append(entry)
        total += entry["duration"]
        if len(kept) % 500 == 0:
            rate = total / max(time.time() - t0, 1e-9)
            log(f"  {len(kept)} utterances, {total / 3600:.2f} h, {rate:.0f}x real time, "
                f"eta {max(target - total, 0) / max(rate, 1e-9) / 60:.1f} min")
        if total >= target:
            break
    else:
        log(f"  warning: jobs ran out at {total / 3600:.2f} h of {hours} h")
    log(f"  done: {len(kept)} utterances, {total / 3600:.3f} h, {errors} skipped, {time.time() - t0:.0f} s")
    return kept


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=Path(".data/synthetic"))
    ap.add_argument("--hours", type=float, default=6.0, help="training hours (default %(default)s)")
    ap.add_argument("--dev-hours", type=float, default=0.25)
    ap.add_argument("--test-hours", type=float, default=0.4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--jobs", type=int, default=2, help="worker processes (default %(default)s)")
    ap.add_argument("--format", choices=("opus", "flac", "wav"), default="opus",
                    help="audio format: OGG/Opus (compact, default), FLAC (lossless) or WAV (lossless, "
                         "fastest to decode in training, largest)")
    ap.add_argument("--kbps", type=float, default=12.0, help="Opus bit rate (default %(default)s)")
    ap.add_argument("--rirs", type=int, default=64,
                    help="simulated rooms for train/dev; test gets a quarter as many, separate (0: no reverberation)")
    ap.add_argument("--exclude-manifest", type=Path, action="append", default=None,
                    help="manifest whose transcripts must not be synthesised (repeatable; default: the real-speech manifest if present)")
    ap.add_argument("--kjv-text", type=Path, default=None, help="KJV text as printed by 'bible' (default: run it)")
    ap.add_argument("--wordnet-dir", type=Path, default=texts.WORDNET_DIR, help="folder with WordNet's data.* files")
    ap.add_argument("--librispeech-text", type=Path, default=None,
                    help="LibriSpeech transcripts, one per line (.txt or .txt.xz, e.g. "
                         "../shared/data/text/librispeech_train.txt.xz): adds them as training text")
    ap.add_argument("--librispeech-share", type=float, default=0.4,
                    help="share of training utterances read from --librispeech-text (default %(default)s)")
    ap.add_argument("--max-source-sentences", type=int, default=None,
                    help="use only the first N raw sentences of each source (quick runs, tests)")
    args = ap.parse_args(argv)

    for ok, pkg in ((engines.have_espeak(), "espeak-ng"), (engines.have_flite(), "flite")):
        if not ok:
            print(f"error: {pkg} is not installed (see recipes/synthetic/README.md: apt-get install {pkg})", file=sys.stderr)
            return 2
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    log_lines: list[str] = []

    def log(msg: str) -> None:
        print(msg, flush=True)
        log_lines.append(msg)

    t_start = time.time()
    excludes = args.exclude_manifest
    if excludes is None:
        excludes = [DEFAULT_REAL_MANIFEST] if DEFAULT_REAL_MANIFEST.is_file() else []
    exclude = {textnorm.to_transcript(e["text"]) for m in excludes for e in read_manifest(m, absolute=False)}
    log(f"excluding {len(exclude)} transcripts from {', '.join(map(str, excludes)) or 'nothing'}")

    if not 0.0 <= args.librispeech_share < 1.0:
        print("error: --librispeech-share must be in [0, 1)", file=sys.stderr)
        return 2
    book_share = args.librispeech_share if args.librispeech_text is not None else 0.0
    try:
        pools = build_sentences(args.seed, exclude, args.kjv_text, args.wordnet_dir,
                                limit=args.max_source_sentences, book_text=args.librispeech_text)
    except texts.SourceError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    hours = {"train": args.hours, "dev": args.dev_hours, "test": args.test_hours}
    sentences = split_sentences(pools, hours)
    for split in SPLITS:
        log(f"{split} sentences: " + ", ".join(f"{s} {len(v)}" for s, v in sentences[split].items()))
    variants = engines.espeak_variants()
    missing = [v for v in HELD_OUT_VARIANTS if v not in variants]
    if missing:
        log(f"error: held-out espeak variants {missing} not installed")
        return 2
    log(f"espeak variants: {len(variants)} ({len(variants) - len(HELD_OUT_VARIANTS)} train, held out {HELD_OUT_VARIANTS})")

    ctx = mp.get_context("fork")
    with ctx.Pool(args.jobs) as pool:
        t0 = time.time()
        n_test_rirs = max(4, args.rirs // 4) if args.rirs > 0 else 0
        rir_train = pool.map(_rir_task, [(args.seed, 100, k) for k in range(args.rirs)])
        rir_test = pool.map(_rir_task, [(args.seed, 200, k) for k in range(n_test_rirs)])
        log(f"simulated {args.rirs} + {n_test_rirs} rooms in {time.time() - t0:.0f} s")
    rirs = {"train": rir_train, "test": rir_test}

    entries: dict[str, list[dict]] = {}
    for split in ("test", "dev", "train"):
        split_dir = out / "audio" / split
        if split_dir.exists():
            shutil.rmtree(split_dir)
        split_dir.mkdir(parents=True)
        # Enough jobs for the target even if utterances are short (1.2 s each on average).
        count = int(hours[split] * 3600 / 1.2) + 100
        jobs = make_jobs(split, sentences[split], variants, args.seed, count, book_share)
        log(f"{split}: target {hours[split]} h, up to {len(jobs)} jobs")
        with ctx.Pool(args.jobs, initializer=_init_worker,
                      initargs=(rirs, str(out), args.format, args.kbps)) as pool:
            kept = run_split(pool, jobs, hours[split], log)
            pool.terminate()
        # Workers may have written a few utterances past the cut-off: remove them.
        keep = {Path(e["audio"]).name for e in kept}
        for f in split_dir.iterdir():
            if f.name not in keep:
                f.unlink()
        write_manifest(out / f"{split}.jsonl", kept)
        entries[split] = kept

    info = {
        "args": json.loads(json.dumps(vars(args), default=str)),  # Paths (also in lists) as strings
        "augment": asdict(augment_audio.AugmentConfig()),
        "held_out": {"espeak_variants": list(HELD_OUT_VARIANTS), "flite_voices": list(HELD_OUT_FLITE)},
        "train_voices": {"espeak_bases": engines.ESPEAK_VOICES,
                         "espeak_variants": [v for v in variants if v not in HELD_OUT_VARIANTS],
                         "flite": list(TRAIN_FLITE)},
        "splits": {s: {"utterances": len(e), "hours": round(sum(x["duration"] for x in e) / 3600, 4),
                       "speakers": len({x["speaker"] for x in e}),
                       "unique_texts": len({x["text"] for x in e}),
                       "bytes": sum((out / x["audio"]).stat().st_size for x in e)}
                   for s, e in entries.items()},
        "wall_seconds": round(time.time() - t_start, 1),
    }
    (out / "info.json").write_text(json.dumps(info, indent=2) + "\n")
    for s, d in info["splits"].items():
        log(f"{s}: {d['utterances']} utterances, {d['hours']:.2f} h, {d['speakers']} voices, "
            f"{d['bytes'] / 2**20:.1f} MiB")
    log(f"wrote {out}/{{train,dev,test}}.jsonl in {info['wall_seconds'] / 60:.1f} min")
    return 0


if __name__ == "__main__":
    sys.exit(main())
