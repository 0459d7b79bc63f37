#!/usr/bin/env python
"""Our model and pocketsphinx side by side on the real dev set: WER per part and real-time factor.

    python recipes/real/prepare.py                      # first: .data/real/dev_<part>.jsonl
    python tools/bench_accuracy.py [--model PATH] [--parts read,librispeech,nonnative,digits,commands]
        [--systems ours-lm,ours-greedy,pocketsphinx] [--max-utts N] [--jobs 2] [--json OUT]

Systems (each recognises the same audio, decoded once from the files before timing):

* ``ours-lm``: our model (``--model``, default the bundled ``asr/pretrained/model.pt``) as
  ``asr.load_model(path)`` decodes by default: with the word LM it carries (needs flashlight-text;
  the system is refused when the model carries no LM);
* ``ours-greedy``: the same model with ``lm=None`` (greedy CTC);
* ``pocketsphinx``: pocketsphinx (``pip install pocketsphinx``) with its bundled en-us acoustic
  model, dictionary and 3-gram LM, default decoding (``Decoder(samprate=16000)``).

Every system runs with one thread. ``--jobs`` worker processes share the utterances, so the
wall time shrinks, not the cost. The real-time factor is CPU time / audio time, summed over the
utterances: CPU time of the recognising process (``time.process_time``) from the samples in
memory to the text (features, network, search), not wall time, so other load on the machine
moves it less. It still includes the slowdown from sharing cores and caches: compare systems of
one run, not numbers across machines.

WER (jiwer, pooled over a part's words) after the project's normalisation
(:func:`asr.tokenizer.normalize_text`, as ``asr-eval`` uses) of both reference and hypothesis;
pocketsphinx's filler tags (``<sil>``, ``[noise]``) are dropped first. Rows: each part, "native
read" (read + librispeech pooled), all parts pooled, and the mean of the parts' WERs.
``--json OUT`` writes the table's numbers and every hypothesis. ``--cache FILE`` appends each
finished utterance as it finishes; a rerun skips what the file holds. Work goes round-robin over
the parts, each in a fixed pseudo-random order (the same order ``--max-utts N`` takes its first N
from), every system on a chunk before the next: an interrupted full run can be scored on what it
finished with ``--max-utts N --cache FILE`` for an N it reached.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import multiprocessing as mp
import os
import re
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

PARTS = ("read", "librispeech", "nonnative", "digits", "commands")
PART_TITLES = {"read": "read sentences (native)", "librispeech": "LibriSpeech", "nonnative": "non-native read",
               "digits": "digits", "commands": "commands"}
SYSTEMS = ("ours-lm", "ours-greedy", "pocketsphinx")
SYSTEM_TITLES = {"ours-lm": "ours (bundled LM)", "ours-greedy": "ours (greedy)", "pocketsphinx": "pocketsphinx"}
#: pocketsphinx filler words (<s>, <sil>, [noise], ++garbage++) and pronunciation-variant markers ("read(2)").
_FILLERS = re.compile(r"<[^>]*>|\[[^\]]*\]|\+\+[^+]*\+\+|\(\d+\)")


class BenchError(Exception):
    """A problem the user can fix (missing data, missing package, bad argument): one line."""


# ---------------------------------------------------------------------------------------- systems
def load_system(name: str, model_path: str | None):
    """A callable ``recognise(samples float32 [N] at 16 kHz) -> text`` for system ``name`` (one thread)."""
    if name == "pocketsphinx":
        return _pocketsphinx()
    import torch

    torch.set_num_threads(1)
    from asr.api import load_model
    from asr.model_file import CheckpointError

    try:
        model = load_model(model_path, lm="auto" if name == "ours-lm" else None)
    except (CheckpointError, OSError, ValueError, RuntimeError) as err:
        raise BenchError(f"cannot load {model_path or 'the bundled model'}: {err}") from None
    if name == "ours-lm" and model.lexicon is None:
        raise BenchError(f"{model_path or 'the bundled model'} carries no LM, or flashlight-text is missing "
                         "(pip install flashlight-text): leave out ours-lm")
    return lambda x: model.transcribe(x, sample_rate=16000).text


def _pocketsphinx():
    try:
        from pocketsphinx import Decoder
    except ImportError:
        raise BenchError("pocketsphinx is not installed: pip install pocketsphinx (or pip install -e '.[bench]')") from None
    import numpy as np

    decoder = Decoder(samprate=16000, loglevel="FATAL")

    def recognise(x) -> str:
        pcm = np.clip(np.rint(x * 32768.0), -32768, 32767).astype(np.int16)
        decoder.start_utt()
        decoder.process_raw(pcm.tobytes(), full_utt=True)
        decoder.end_utt()
        hyp = decoder.hyp()
        return hyp.hypstr if hyp is not None else ""

    return recognise


_LOADED: dict[str, object] = {}


def _run_chunk(task: tuple[str, str | None, list[dict]]) -> list[dict]:
    """Worker: recognise a chunk of utterances with one system; per utterance the hypothesis and CPU s."""
    import soundfile as sf

    name, model_path, entries = task
    if name not in _LOADED:
        _LOADED[name] = load_system(name, model_path)
    recognise = _LOADED[name]
    out = []
    for e in entries:
        x, sr = sf.read(e["audio"], dtype="float32", always_2d=True)
        x = x.mean(axis=1)
        if sr != 16000:
            raise BenchError(f"{e['audio']}: {sr} Hz, the dev set is 16 kHz")
        t0 = time.process_time()
        hyp = recognise(x)
        out.append({"id": e["id"], "part": e["part"], "system": name, "hyp": hyp,
                    "cpu_s": time.process_time() - t0, "audio_s": len(x) / sr})
    return out


# ---------------------------------------------------------------------------------------- scoring
def spread_order(entries: list[dict]) -> list[dict]:
    """The entries in a fixed pseudo-random order (sha1 of the id): any prefix spreads over speakers."""
    return sorted(entries, key=lambda e: (hashlib.sha1(e["id"].encode()).hexdigest(), e["id"]))


def select(entries: list[dict], max_utts: int | None) -> list[dict]:
    """The first ``max_utts`` entries of :func:`spread_order` (all when None), the order kept."""
    ordered = spread_order(entries)
    return ordered[:max_utts] if max_utts else ordered


def score(results: list[dict], refs: dict[str, str], systems: list[str], parts: list[str]) -> dict:
    """WER per (system, row) and RTF per system; rows are the parts plus the pooled groups."""
    from asr.tokenizer import normalize_text
    from asr.train.metrics import error_counts

    groups = {p: [p] for p in parts}
    if {"read", "librispeech"} <= set(parts):
        groups["native read"] = ["read", "librispeech"]
    groups["all (pooled)"] = list(parts)
    table: dict = {}
    for system in systems:
        mine = [r for r in results if r["system"] == system]
        rows = {}
        for row, members in groups.items():
            sel = [r for r in mine if r["part"] in members]
            c = error_counts([normalize_text(refs[r["id"]]) for r in sel], [normalize_text(_FILLERS.sub(" ", r["hyp"])) for r in sel])
            rows[row] = {"wer": 100.0 * c.word_errors / max(1, c.words), "words": c.words,
                         "errors": c.word_errors, "utterances": c.utterances}
        rows["mean of parts"] = {"wer": sum(rows[p]["wer"] for p in parts) / len(parts)}
        rtf = sum(r["cpu_s"] for r in mine) / max(1e-9, sum(r["audio_s"] for r in mine))
        table[system] = {"rows": rows, "rtf": rtf}
    return table


def markdown(table: dict, systems: list[str], entries_by_part: dict[str, list[dict]]) -> str:
    """The side-by-side table: a row per part and group, a column per system, then the RTF row."""
    head = "| dev part | utts | audio min | " + " | ".join(SYSTEM_TITLES[s] for s in systems) + " |"
    lines = [head, "|---|---:|---:|" + "---:|" * len(systems)]
    rows = list(next(iter(table.values()))["rows"])
    for row in rows:
        members = [row] if row in entries_by_part else ([] if row == "mean of parts" else
                                                         ["read", "librispeech"] if row == "native read" else list(entries_by_part))
        es = [e for p in members for e in entries_by_part[p]]
        n = str(len(es)) if es else ""
        minutes = f"{sum(e['duration'] for e in es) / 60:.1f}" if es else ""
        title = PART_TITLES.get(row, row)
        if row in ("all (pooled)", "mean of parts"):
            title = f"**{title}**"
        cells = [f"{table[s]['rows'][row]['wer']:.1f} %" for s in systems]
        lines.append(f"| {title} | {n} | {minutes} | " + " | ".join(cells) + " |")
    lines.append("| real-time factor (1 thread, CPU time) | | | " +
                 " | ".join(f"{table[s]['rtf']:.3f}" for s in systems) + " |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------- main
def load_dev(dev_dir: Path, parts: list[str], max_utts: int | None) -> dict[str, list[dict]]:
    """``dev_<part>.jsonl`` of each part (absolute audio paths), each cut to ``max_utts``."""
    from asr.data.manifest import ManifestError, read_manifest

    out = {}
    for part in parts:
        path = dev_dir / f"dev_{part}.jsonl"
        if not path.is_file():
            raise BenchError(f"{path} not found: run python recipes/real/prepare.py (or pass --dev-dir)")
        try:
            entries = [dict(e, part=part) for e in read_manifest(path)]
        except ManifestError as err:
            raise BenchError(str(err)) from None
        if not entries:
            raise BenchError(f"{path} is empty")
        missing = [e["audio"] for e in entries if not os.path.isfile(e["audio"])]
        if missing:
            raise BenchError(f"{len(missing)} audio files of {path} missing, e.g. {missing[0]}")
        out[part] = select(entries, max_utts)
    return out


def run(args: argparse.Namespace) -> tuple[dict, str, list[dict]]:
    """Recognise, score and format; returns (table, markdown, per-utterance results)."""
    parts = _names(args.parts, PARTS, "part")
    systems = _names(args.systems, SYSTEMS, "system")
    if args.model is not None and not Path(args.model).exists():
        raise BenchError(f"--model {args.model}: no such file or folder")
    by_part = load_dev(args.dev_dir, parts, args.max_utts)
    entries = [e for p in parts for e in by_part[p]]
    # Round-robin over the parts, each in spread order, and every system on a chunk before the next
    # chunk: a run cut short has covered all parts and systems on the same utterances (see --cache).
    queue = [by_part[p][i] for i in range(max(map(len, by_part.values()))) for p in parts if i < len(by_part[p])]
    cached = _read_cache(args.cache, args.model) if args.cache else {}
    todo = {s: [e for e in queue if (s, e["id"]) not in cached] for s in systems}
    chunk = 8
    tasks = [(s, args.model, todo[s][i : i + chunk]) for i in range(0, len(queue), chunk) for s in systems
             if todo[s][i : i + chunk]]
    results: list[dict] = [r for (s, i), r in cached.items() if s in systems and i in {e["id"] for e in entries}]
    t0 = time.time()
    cache = open(args.cache, "a", encoding="utf-8") if args.cache else None
    pool = mp.get_context("fork").Pool(args.jobs) if args.jobs > 1 and len(tasks) > 1 else None
    try:
        done = pool.imap(_run_chunk, tasks) if pool is not None else map(_run_chunk, tasks)
        for n, res in enumerate(done, 1):
            results += res
            if cache is not None:
                cache.write("".join(json.dumps(dict(r, model=args.model or "bundled")) + "\n" for r in res))
                cache.flush()
            if n % 20 == 0 or n == len(tasks):
                print(f"  {n}/{len(tasks)} chunks ({time.time() - t0:.0f} s)", file=sys.stderr, flush=True)
    finally:
        if pool is not None:
            pool.terminate()
        if cache is not None:
            cache.close()
    table = score(results, {e["id"]: e["text"] for e in entries}, systems, parts)
    md = markdown(table, systems, by_part)
    print(f"{len(entries)} utterances x {len(systems)} systems in {time.time() - t0:.0f} s wall, {args.jobs} worker(s)",
          file=sys.stderr)
    return table, md, sorted(results, key=lambda r: (r["system"], r["id"]))


def _read_cache(path: Path, model: str | None) -> dict[tuple[str, str], dict]:
    """Results of an earlier (maybe interrupted) run with the same model: (system, id) -> result."""
    if not path.is_file():
        return {}
    out = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        r = json.loads(line)
        if r.get("model") == (model or "bundled"):
            out[(r["system"], r["id"])] = {k: v for k, v in r.items() if k != "model"}
    return out


def _names(text: str, allowed: tuple[str, ...], what: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    bad = [n for n in names if n not in allowed]
    if bad or not names:
        raise BenchError(f"unknown {what} {', '.join(bad) or '(none given)'}: choose from {', '.join(allowed)}")
    return names


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, help="checkpoint or run folder (default: the bundled model)")
    ap.add_argument("--dev-dir", type=Path, default=REPO / ".data" / "real", help="folder with dev_<part>.jsonl")
    ap.add_argument("--parts", default=",".join(PARTS), help="comma-separated parts (default: %(default)s)")
    ap.add_argument("--systems", default=",".join(SYSTEMS), help="comma-separated systems (default: %(default)s)")
    ap.add_argument("--max-utts", type=int, default=None, help="at most N utterances per part (quick run)")
    ap.add_argument("--jobs", type=int, default=2, help="worker processes, one thread each")
    ap.add_argument("--json", type=Path, default=None, help="write the numbers and every hypothesis here")
    ap.add_argument("--cache", type=Path, default=None,
                    help="JSON Lines of finished utterances, appended as they finish; a rerun skips them "
                         "(an interrupted run resumes; --max-utts K then scores the first K per part)")
    args = ap.parse_args(argv)
    try:
        table, md, results = run(args)
    except BenchError as err:
        print(f"bench_accuracy: error: {err}", file=sys.stderr)
        return 2
    print(md)
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        payload = {"model": args.model or "bundled", "parts": args.parts, "max_utts": args.max_utts,
                   "table": table, "markdown": md, "utterances": results}
        args.json.write_text(json.dumps(payload, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
