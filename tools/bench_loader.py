#!/usr/bin/env python
"""How fast one DataLoader worker prepares training utterances, stage by stage (CPU).

    python tools/bench_loader.py --manifest .data/synthetic/train.jsonl
    python tools/bench_loader.py --manifest .data/synthetic/train.jsonl --format flac --limit 300

Why: on 4x H100 device runs each GPU spent 7 to 41 % of its time waiting for data
with 14 workers per GPU. This measures what one worker delivers (audio-seconds per second, one
thread, as DataLoader workers run) and where its time goes: decoding, speed perturbation, fbank,
SpecAugment, in the order ``ManifestDataset.__getitem__`` runs them, with the bundled recipe's
augmentation (speed 0.9/1.0/1.1; SpecAugment as ``--spec light`` or the recipe default ``full``).
The end-to-end row is ``ManifestDataset`` itself on the same utterances, so the stage rows can be
checked against it; the last row is what a worker does with ``data.features_on_device=true``.
``--format flac|wav`` re-encodes the utterances to 16-bit FLAC or WAV in a temporary folder first
(``recipes/synthetic/prepare.py --format``; the carried corpus is Opus).
"""
from __future__ import annotations

import argparse
import os
import platform
import random
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from asr.audio import load_audio  # noqa: E402
from asr.data.augment import AugmentConfig, SpecAugment, SpecAugmentConfig, SpeedConfig, speed_perturb  # noqa: E402
from asr.data.dataset import ManifestDataset  # noqa: E402
from asr.data.manifest import read_manifests  # noqa: E402
from asr.features import compute_fbank  # noqa: E402

SPEC = {"light": SpecAugmentConfig(freq_width=15, time_masks=2, time_width=25), "full": SpecAugmentConfig()}


def reencode(entries: list[dict], folder: Path, fmt: str) -> list[dict]:
    import soundfile as sf

    out = []
    for e in entries:
        path = folder / f"{Path(e['audio']).stem}.{fmt}"
        sf.write(path, load_audio(e["audio"]).numpy(), 16000, format=fmt.upper(), subtype="PCM_16")
        out.append(dict(e, audio=str(path)))
    return out


def stage_times(entries: list[dict], spec: SpecAugmentConfig, factors: tuple[float, ...]) -> dict[str, float]:
    augment = SpecAugment(spec)
    rng = random.Random(0)
    times = {"decode": 0.0, "speed perturbation": 0.0, "fbank": 0.0, "SpecAugment": 0.0}
    for e in entries:
        t0 = time.perf_counter()
        wave = load_audio(e["audio"])
        t1 = time.perf_counter()
        wave = speed_perturb(wave, rng.choice(factors))
        t2 = time.perf_counter()
        feats = compute_fbank(wave)
        t3 = time.perf_counter()
        augment(feats)
        t4 = time.perf_counter()
        for key, dt in zip(times, (t1 - t0, t2 - t1, t3 - t2, t4 - t3)):
            times[key] += dt
    return times


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--manifest", required=True, nargs="+", help="training manifest(s)")
    ap.add_argument("--limit", type=int, default=300, help="utterances (the first N)")
    ap.add_argument("--format", choices=("flac", "wav"), help="re-encode to 16-bit FLAC or WAV first")
    ap.add_argument("--spec", choices=sorted(SPEC), default="light", help="SpecAugment strength")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)  # as in a DataLoader worker
    try:
        entries = read_manifests(args.manifest)[: args.limit]
    except (OSError, ValueError) as err:  # ManifestError is a ValueError
        print(f"bench_loader: error: {' '.join(str(err).split())}", file=sys.stderr)
        return 1
    if not entries:
        print("bench_loader: error: no utterances in the manifest(s)", file=sys.stderr)
        return 1
    factors = tuple(SpeedConfig().factors)
    with tempfile.TemporaryDirectory() as tmp:
        if args.format:
            entries = reencode(entries, Path(tmp), args.format)
        audio = sum(e["duration"] for e in entries)
        for _ in range(2):  # the first pass warms the page cache and torchaudio's kernels
            times = stage_times(entries, SPEC[args.spec], factors)
        data = ManifestDataset(entries, augment=AugmentConfig(spec_augment=SPEC[args.spec],
                                                              speed=SpeedConfig(enabled=True)))
        t = time.perf_counter()
        for i in range(len(data)):
            data[(i, i)]  # a seed: training mode (augmented)
        whole = time.perf_counter() - t
        waves_only = ManifestDataset(entries, augment=AugmentConfig(spec_augment=SPEC[args.spec],
                                                                    speed=SpeedConfig(enabled=True)),
                                     features_on_device=True)
        t = time.perf_counter()
        for i in range(len(waves_only)):
            waves_only[(i, i)]
        waves_time = time.perf_counter() - t
    print(f"# bench_loader: {platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, 1 thread, "
          f"load average {os.getloadavg()[0]:.2f}, {time.strftime('%Y-%m-%d %H:%M')}")
    print(f"# {len(entries)} utterances, {audio:.0f} s of audio ({audio / len(entries):.2f} s each), "
          f"{args.format.upper() if args.format else 'as in the manifest'}, SpecAugment {args.spec}\n")
    total = sum(times.values())
    print("| stage | ms per utterance | share | audio-s/s if it were alone |")
    print("|---|---:|---:|---:|")
    for name, sec in times.items():
        print(f"| {name} | {1000 * sec / len(entries):.2f} | {100 * sec / total:.0f} % | {audio / sec:,.0f} |")
    print(f"| all stages | {1000 * total / len(entries):.2f} | 100 % | {audio / total:,.0f} |")
    print(f"| `ManifestDataset[i]` end to end | {1000 * whole / len(entries):.2f} | | {audio / whole:,.0f} |")
    print(f"| the same with `data.features_on_device=true` (decode + speed; fbank and SpecAugment on the GPU) | "
          f"{1000 * waves_time / len(entries):.2f} | | {audio / waves_time:,.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
