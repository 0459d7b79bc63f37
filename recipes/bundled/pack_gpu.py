#!/usr/bin/env python
"""Pack the training corpus for the GPU machine: self-contained folders of at most 32 MiB each.

    python recipes/real/prepare.py                       # first: .data/real/train.jsonl (the fixed split)
    python recipes/bundled/pack_gpu.py --out .gpu --jobs 2 [--kbps-a 8.25] [--kbps-b 9.5]
    python recipes/bundled/pack_gpu.py --parts c --robotic .data/synth_c   # a recipes/synthetic corpus

The GPU machine accepts at most 64 MiB of input per call and the repository takes ~24 MiB of it,
so each corpus travels as one folder of at most ``--max-mib`` (32) MiB, checked after writing
(the command fails, exit 1, when a folder is over):

* ``<out>/corpus_a/``: the real-speech TRAIN split (``.data/real/train.jsonl``, speaker-disjoint
  from dev; dev and misc are scored on the CPU afterwards and are not packed);
* ``<out>/corpus_b/``: the Kokoro speech of ``../shared/data/tts/kokoro`` (all of it);
* ``<out>/corpus_c/``: the training split of a robotic-voice corpus made by
  ``recipes/synthetic/prepare.py`` (``--robotic``; write it as FLAC, the packing re-encodes).

Each folder holds ``train.jsonl`` (JSON Lines ``{"id", "audio", "duration", "text", "speaker", ...}``,
audio paths relative to the folder), ``audio.tar.gz`` (every file at ``audio/...``) and
``README.md``. On the device: ``cd corpus_a && tar xf audio.tar.gz``. The tar is gzip-compressed
because a plain tar pads every member to 512-byte blocks and adds a 512-byte header: ~0.75 KiB per
file, 9 MiB for the 12k short utterances of corpus_a; gzip folds that padding to ~60 bytes and leaves
the Opus data as it is.

Audio: Ogg/Opus, mono 16 kHz, through ``opusenc`` (Debian ``opus-tools``) at complexity 10 with
60 ms frames (fewer packets, ~6 % fewer bytes than 20 ms at 9 kb/s) and wideband forced
(``OPUS_SET_BANDWIDTH`` = wideband: below ~9 kb/s libopus otherwise falls back to narrowband, 4 kHz,
which would leave the upper mel bands empty). After writing, both folders are unpacked into a
temporary folder and every file is read with soundfile; its duration must be within 50 ms of the
source's duration and of the manifest's.
"""
from __future__ import annotations

import argparse
import io
import json
import multiprocessing as mp
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np
import soundfile as sf
from scipy import signal

from asr.data.manifest import read_manifest, write_manifest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "recipes" / "synthetic"))
import augment_audio  # noqa: E402  (--degrade-b)

DEFAULT_KOKORO = REPO.parent / "shared" / "data" / "tts" / "kokoro"
SAMPLE_RATE = 16000
#: opusenc's ctl number for OPUS_SET_BANDWIDTH and the value of OPUS_BANDWIDTH_WIDEBAND (opus_defines.h).
CTL_SET_BANDWIDTH, BANDWIDTH_WIDEBAND = 4008, 1103
#: Keys kept in the packed manifests (the sources' READMEs describe the rest, e.g. licenses).
KEYS = ("id", "audio", "duration", "text", "speaker", "part", "source", "lang")
DURATION_TOLERANCE_S = 0.05


def encode_opus(x: np.ndarray, kbps: float) -> bytes:
    """Mono float32 audio at 16 kHz -> Ogg/Opus bytes (see the module docstring for the settings)."""
    wav = io.BytesIO()
    sf.write(wav, np.clip(x, -1.0, 1.0), SAMPLE_RATE, format="WAV", subtype="PCM_16")
    cmd = ["opusenc", "--quiet", "--bitrate", f"{kbps:g}", "--comp", "10", "--framesize", "60",
           "--padding", "0", "--set-ctl-int", f"{CTL_SET_BANDWIDTH}={BANDWIDTH_WIDEBAND}", "-", "-"]
    res = subprocess.run(cmd, input=wav.getvalue(), capture_output=True)
    if res.returncode != 0:
        raise RuntimeError(f"opusenc failed: {res.stderr.decode(errors='replace').strip()}")
    return res.stdout


#: Recording conditions for clean TTS (``--degrade-b``): recipes/synthetic's room, telephone band,
#: noise and level, milder, and with the length kept (speed perturbation is the trainer's).
ROOM_AND_NOISE = dict(speed=(1.0, 1.0), lead_silence=(0.0, 0.0), trail_silence=(0.0, 0.0), trim=False,
                      p_reverb=0.4, p_telephone=0.1, p_noise=0.7, snr_db=(10.0, 35.0))
_RIRS: list = []  # the room pool, set before the worker pool forks


def _encode_task(args: tuple) -> tuple[bytes, float, float, dict]:
    """(source path, kbps, degrade seed or None) -> (Opus bytes, source duration s, packed duration
    s, the degradations applied)."""
    src, kbps, seed = args
    x, sr = sf.read(src, dtype="float32", always_2d=True)
    x = x.mean(axis=1)
    source_seconds = len(x) / sr
    if sr != SAMPLE_RATE:
        x = signal.resample_poly(x, SAMPLE_RATE, sr).astype(np.float32)
    applied = {}
    if seed is not None:
        x, applied = augment_audio.degrade(x, SAMPLE_RATE, np.random.default_rng(seed),
                                           augment_audio.AugmentConfig(**ROOM_AND_NOISE), rirs=_RIRS)
    data = encode_opus(x, kbps)
    info = sf.info(io.BytesIO(data))
    return data, source_seconds, info.frames / info.samplerate, applied


def _tar_member(name: str, size: int) -> tarfile.TarInfo:
    """A tar header with nothing machine-specific in it (fixed owner, mode and time)."""
    ti = tarfile.TarInfo(name)
    ti.size, ti.mode, ti.mtime = size, 0o644, 0
    return ti


def pack_corpus(entries: list[dict], member_of, out: Path, kbps: float, jobs: int, readme: str,
                degrade: float = 0.0, seed: int = 0) -> dict:
    """Encode ``entries`` into ``out/audio.tar.gz`` + ``out/train.jsonl`` + ``out/README.md``.

    ``member_of(entry)`` gives the path of the entry's audio inside the folder (``audio/...``).
    ``degrade``: the share of entries given a room, noise and channel (:data:`ROOM_AND_NOISE`),
    each drawn from (seed, its index); their manifest entries say what in ``augment``.
    Returns stats: utterances, hours, speakers, audio_bytes, folder_bytes, largest duration change.
    """
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    packed, audio_bytes, max_change = [], 0, 0.0
    picks = np.random.default_rng([seed, 7]).random(len(entries)) < degrade
    if picks.any() and not _RIRS:
        _RIRS.extend(augment_audio.make_rir(np.random.default_rng([seed, 300, k])) for k in range(24))
    tasks = [(e["audio"], kbps, [seed, 8, i] if pick else None) for i, (e, pick) in enumerate(zip(entries, picks))]
    pool = mp.get_context("fork").Pool(jobs) if jobs > 1 else None
    encoded = pool.imap(_encode_task, tasks, chunksize=16) if pool is not None else map(_encode_task, tasks)
    with tarfile.open(out / "audio.tar.gz", "w:gz", compresslevel=9, format=tarfile.USTAR_FORMAT) as tar:
        for i, (e, (data, src_s, dur, applied)) in enumerate(zip(entries, encoded)):
            name = member_of(e)
            tar.addfile(_tar_member(name, len(data)), io.BytesIO(data))
            packed.append(dict({k: e[k] for k in KEYS if k in e}, audio=name, duration=dur,
                               **({"augment": applied} if applied else {})))
            audio_bytes += len(data)
            max_change = max(max_change, abs(dur - src_s))
            if (i + 1) % 2000 == 0:
                print(f"  {out.name}: {i + 1}/{len(entries)} encoded", flush=True)
    if pool is not None:
        pool.close()
        pool.join()
    write_manifest(out / "train.jsonl", packed)
    os.chmod(out / "train.jsonl", 0o644)
    hours = sum(e["duration"] for e in packed) / 3600
    stats = {"utterances": len(packed), "hours": round(hours, 4), "speakers": len({e.get("speaker") for e in packed}),
             "kbps": kbps, "audio_bytes": audio_bytes, "mib_per_hour": round(audio_bytes / 2**20 / hours, 3),
             "max_duration_change_s": round(max_change, 4)}
    (out / "README.md").write_text(readme.format(**stats))
    stats["folder_bytes"] = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    return stats


def verify(folder: Path, sources: dict[str, float]) -> int:
    """Unpack ``folder/audio.tar.gz`` with tar into a temporary folder and read every file of
    ``train.jsonl``; returns the number checked. Raises RuntimeError on a missing or unreadable file or a
    duration more than 50 ms off the manifest's or the source's (``sources``: id -> seconds)."""
    entries = read_manifest(folder / "train.jsonl", absolute=False)
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(["tar", "xf", str((folder / "audio.tar.gz").resolve())], cwd=tmp, check=True)
        shutil.copy(folder / "train.jsonl", tmp)
        for e in read_manifest(Path(tmp) / "train.jsonl"):
            info = sf.info(e["audio"])
            dur = info.frames / info.samplerate
            if info.samplerate != SAMPLE_RATE or info.channels != 1:
                raise RuntimeError(f"{e['id']}: {info.samplerate} Hz, {info.channels} channels")
            for what, ref in (("manifest", e["duration"]), ("source", sources[e["id"]])):
                if abs(dur - ref) > DURATION_TOLERANCE_S:
                    raise RuntimeError(f"{e['id']}: {dur:.3f} s unpacked, {ref:.3f} s in the {what}")
    return len(entries)


README_A = """# corpus_a: real speech, train split (made by recipes/bundled/pack_gpu.py)

The TRAIN side of the fixed speaker-disjoint split of ../shared/data/real made by
recipes/real/prepare.py (seed 0; dev, misc and the unused utterances of dev speakers are NOT here).
{utterances} utterances, {hours:.3f} h, {speakers} speakers. Ogg/Opus mono 16 kHz at {kbps:g} kb/s
(60 ms frames, wideband forced), {mib_per_hour:.2f} MiB of audio per hour.

    tar xf audio.tar.gz        # creates audio/<source>/<id>.opus next to train.jsonl

`train.jsonl`: id, audio (relative to this folder), duration (of the packed file), text (normalized),
speaker, part (read, librispeech, nonnative, digits, commands, prompts, spelled) and source (the
folder of ../shared/data/real/audio). Sources and licenses: ../shared/data/real/README.md.
"""

README_B = """# corpus_b: Kokoro synthetic speech (made by recipes/bundled/pack_gpu.py)

All of ../shared/data/tts/kokoro: {utterances} utterances, {hours:.3f} h, {speakers} voices (packs and
blends). Re-encoded to Ogg/Opus mono 16 kHz at {kbps:g} kb/s (60 ms frames, wideband forced),
{mib_per_hour:.2f} MiB of audio per hour.

    tar xf audio.tar.gz        # creates audio/{{cpu,gpu}}/<id>.opus next to train.jsonl

`train.jsonl`: id, audio, duration, text, speaker (voice or blend), lang, and `augment` where the
packing gave the utterance a simulated room, noise or telephone band (`--degrade-b`). Made with
Kokoro-82M v1.0 (Apache-2.0) over LibriSpeech transcripts (CC BY 4.0); see that folder's README.
"""


README_C = """# corpus_c: robotic synthetic speech (made by recipes/bundled/pack_gpu.py)

The train split of {source} (recipes/synthetic/prepare.py: espeak-ng and flite voices, degraded;
its info.json has the command's arguments): {utterances} utterances, {hours:.3f} h, {speakers}
voices. Re-encoded to Ogg/Opus mono 16 kHz at {kbps:g} kb/s (60 ms frames, wideband forced),
{mib_per_hour:.2f} MiB of audio per hour.

    tar xf audio.tar.gz        # creates audio/train/<id>.opus next to train.jsonl

`train.jsonl`: id, audio, duration, text, speaker (engine:voice), source (the text source).
"""


def copy_subset(source: Path, out: Path, max_bytes: int, seed: int = 0) -> dict:
    """``<out>/train.jsonl`` + ``audio.tar.gz``: the files of ``source``'s manifest as they are (no
    re-encoding), taken in a seeded random order while they fit in ``max_bytes`` of audio: a part of a
    corpus too large to carry whole at its own bit rate (run 10 carried 4.23 h of Kokoro this way)."""
    import random

    entries = read_manifest(source / "manifest.jsonl")
    random.Random(seed).shuffle(entries)
    kept, total = [], 0
    for e in entries:
        size = (source / e["audio"]).stat().st_size
        if total + size <= max_bytes:
            kept.append(e)
            total += size
    out.mkdir(parents=True, exist_ok=True)
    with tarfile.open(out / "audio.tar.gz", "w:gz", compresslevel=1) as tar:
        for e in kept:
            tar.add(source / e["audio"], arcname=e["audio"])
    write_manifest(out / "train.jsonl", [{k: e[k] for k in ("id", "audio", "duration", "text", "speaker")} for e in kept])
    return {"utterances": len(kept), "hours": sum(e["duration"] for e in kept) / 3600, "audio_bytes": total}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--real-train", type=Path, default=Path(".data/real/train.jsonl"),
                    help="train manifest of recipes/real/prepare.py")
    ap.add_argument("--kokoro", type=Path, default=DEFAULT_KOKORO, help="folder with the Kokoro manifest.jsonl")
    ap.add_argument("--out", type=Path, default=Path(".gpu"))
    ap.add_argument("--kbps-a", type=float, default=8.25, help="Opus bit rate of corpus_a (real train)")
    ap.add_argument("--kbps-b", type=float, default=9.5, help="Opus bit rate of corpus_b (Kokoro)")
    ap.add_argument("--degrade-b", type=float, default=0.0,
                    help="share of corpus_b's utterances given a simulated room, noise or telephone band "
                         "(recipes/synthetic/augment_audio.py; the Kokoro audio is studio-clean)")
    ap.add_argument("--robotic", type=Path, default=Path(".data/synth_c"),
                    help="output folder of recipes/synthetic/prepare.py packed as corpus_c (its train.jsonl)")
    ap.add_argument("--kbps-c", type=float, default=8.0, help="Opus bit rate of corpus_c (robotic voices)")
    ap.add_argument("--max-mib", type=float, default=32.0, help="size limit of each folder")
    ap.add_argument("--parts", default="a,b", help="which folders to make, comma-separated: a, b, c")
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--kokoro-subset-mb", type=float, default=0,
                    help="instead of the parts: <out>/kokoro_subset, a seeded subset of the Kokoro files as they "
                         "are, up to this many MB (10^6 bytes) of audio (run 10: 30.5)")
    args = ap.parse_args(argv)
    if args.kokoro_subset_mb > 0:
        stats = copy_subset(args.kokoro, args.out / "kokoro_subset", int(args.kokoro_subset_mb * 1e6))
        print(f"{args.out / 'kokoro_subset'}: {stats['utterances']} utterances, {stats['hours']:.2f} h, "
              f"{stats['audio_bytes'] / 1e6:.1f} MB of audio")
        return 0

    if shutil.which("opusenc") is None:
        print("error: opusenc not found (apt-get install opus-tools)", file=sys.stderr)
        return 2
    specs = {
        "a": (args.real_train, "corpus_a", args.kbps_a, README_A,
              lambda e: f"audio/{e['source']}/{e['id']}.opus"),
        "b": (args.kokoro / "manifest.jsonl", "corpus_b", args.kbps_b, README_B,
              lambda e: _kokoro_member(e, args.kokoro)),
        "c": (args.robotic / "train.jsonl", "corpus_c", args.kbps_c, README_C.replace("{source}", str(args.robotic)),
              lambda e: f"audio/train/{e['id']}.opus"),
    }
    status = 0
    for part in args.parts.split(","):
        if part not in specs:
            print(f"error: unknown part {part!r} (use a, b, c)", file=sys.stderr)
            return 2
        manifest, name, kbps, readme, member_of = specs[part]
        if not manifest.is_file():
            hint = " (run recipes/real/prepare.py first)" if part == "a" else ""
            print(f"error: {manifest} not found{hint}", file=sys.stderr)
            return 2
        degrade = args.degrade_b if part == "b" else 0.0
        status = max(status, _pack_one(read_manifest(manifest), member_of, args.out / name, kbps, readme, args, degrade))
    return status


def _kokoro_member(entry: dict, root: Path) -> str:
    """``audio/<cpu|gpu>/<name>.opus``: the path under the Kokoro folder (whose audio already sits in ``audio/``)."""
    rel = Path(os.path.relpath(entry["audio"], root.resolve())).with_suffix(".opus")
    return (rel if rel.parts[0] == "audio" else Path("audio") / rel).as_posix()


def _pack_one(entries: list[dict], member_of, out: Path, kbps: float, readme: str, args, degrade: float = 0.0) -> int:
    """Pack, size-check and verify one folder; returns the exit status (0 ok, 1 over the limit or bad)."""
    t0 = time.time()
    if "part" in entries[0] and any("source" not in e for e in entries):
        print(f"error: {out.name}: manifest entries lack 'source' (run recipes/real/prepare.py again)", file=sys.stderr)
        return 2
    stats = pack_corpus(entries, member_of, out, kbps, args.jobs, readme, degrade)
    limit = int(args.max_mib * 2**20)
    print(f"{out}: {stats['utterances']} utterances, {stats['hours']:.3f} h, {stats['speakers']} speakers, "
          f"{kbps:g} kb/s, audio {stats['audio_bytes'] / 2**20:.2f} MiB ({stats['mib_per_hour']:.2f} MiB/h), "
          f"folder {stats['folder_bytes'] / 2**20:.2f} MiB ({time.time() - t0:.0f} s)", flush=True)
    (out.parent / f"{out.name}.stats.json").write_text(json.dumps(stats, indent=2) + "\n")
    if stats["folder_bytes"] > limit:
        print(f"error: {out} is {stats['folder_bytes'] / 2**20:.2f} MiB, over --max-mib {args.max_mib}: "
              f"lower its --kbps", file=sys.stderr)
        return 1
    try:
        n = verify(out, {e["id"]: e["duration"] for e in entries})
    except (RuntimeError, subprocess.CalledProcessError) as err:
        print(f"error: {out} failed its check: {err}", file=sys.stderr)
        return 1
    print(f"{out}: checked {n} files after tar xf: all readable, 16 kHz mono, durations within "
          f"{DURATION_TOLERANCE_S * 1000:.0f} ms of the manifest and the source", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
