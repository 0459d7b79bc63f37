#!/usr/bin/env python
"""Speed (x real time) and peak memory of file transcription for 1, 10 and 60 minute inputs.

    python tools/bench_transcribe.py                       # bundled model, else a tiny overfit one
    python tools/bench_transcribe.py --model exp/run1 --minutes 1 10 60
    python tools/bench_transcribe.py --random-default      # default-size architecture, random weights

Each input is generated audio (the test recordings in tests/data with 0.9-2 s pauses and faint
noise, repeated to length) written to a temporary 16 kHz WAV, and transcribed with
``asr.load_model(...).transcribe(path)`` in a **fresh subprocess** per run, so that the peak
resident memory (``resource.getrusage(RUSAGE_SELF).ru_maxrss``; tracemalloc does not see torch's
allocations) belongs to that run alone. Two numbers per run: the peak after loading the model and
the peak at the end; their difference is what transcription itself added.

Paths: ``blocks`` forces the block-wise recurrent path (what inputs over 60 s use), ``one-pass``
forces the parallel path (the default for inputs up to 60 s), run for lengths up to
``--onepass-max-minutes`` to show how its memory grows with length while the block path's stays flat.
Speed is audio seconds / wall seconds of the transcribe call (model loading excluded).

``--decoding``: ``default`` is what ``asr.load_model`` does (the bundled model decodes with its
bundled LM), ``greedy`` turns any LM off, ``both`` runs each input both ways, side by side, so the
LM search's cost shows as a ratio from one run.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TESTS = REPO / "tests"


def _rss_mb() -> float:
    """Peak resident set size of this process so far, MiB (ru_maxrss is KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


# ------------------------------------------------------------------------------- worker (child)
def worker(args: argparse.Namespace) -> None:
    import torch

    torch.set_num_threads(args.threads)
    import asr

    m = asr.load_model(args.model, device=args.device, lm=None if args.decoding == "greedy" else "auto")
    if args.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    # warm-up on 1 s so one-time costs (allocator, kernels) are not billed to the first length
    m.transcribe(torch.zeros(16000))
    rss_loaded = _rss_mb()
    threshold = math.inf if args.path == "one-pass" else 0.0
    t0 = time.perf_counter()
    result = m.transcribe(args.audio, long_audio_seconds=threshold, block_seconds=args.block_seconds)
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
    wall = time.perf_counter() - t0
    out = {
        "audio_s": result.duration,
        "wall_s": wall,
        "rss_loaded_mb": rss_loaded,
        "rss_peak_mb": _rss_mb(),
        "words": len(result.words),
        "segments": len(result.segments),
    }
    if args.device.startswith("cuda"):
        out["cuda_peak_mb"] = torch.cuda.max_memory_allocated() / 2**20
    print("RESULT " + json.dumps(out), flush=True)


# ------------------------------------------------------------------------------- parent
def make_audio(path: Path, minutes: float, seed: int = 0) -> None:
    """Write ``minutes`` of speech-with-pauses to a 16 kHz PCM WAV, piece by piece (flat memory)."""
    import numpy as np
    import soundfile as sf

    sys.path.insert(0, str(TESTS))
    from conftest import read_test_manifest

    from asr.audio import load_audio

    utts = [load_audio(e["audio"]).numpy() for e in read_test_manifest()]
    rng = np.random.default_rng(seed)
    total = int(minutes * 60 * 16000)
    written = 0
    with sf.SoundFile(path, "w", samplerate=16000, channels=1, subtype="PCM_16") as f:
        i = 0
        while written < total:
            gap = np.zeros(int(16000 * rng.uniform(0.9, 2.0)), np.float32)
            piece = np.concatenate([utts[i % len(utts)], gap])[: total - written]
            piece = piece + rng.normal(0, 1e-3, piece.shape).astype(np.float32)
            f.write(piece)
            written += len(piece)
            i += 1


def default_model(tmp: Path, random_default: bool) -> tuple[Path, str]:
    """The bundled model if installed; else a tiny model overfit on tests/data (as the tests use),
    or with ``random_default`` the default-size architecture with random weights."""
    import torch

    sys.path.insert(0, str(TESTS))
    from asr.api import BUNDLED_MODEL

    if not random_default and BUNDLED_MODEL.is_file():
        return BUNDLED_MODEL, "bundled model"
    from conftest import overfit_tiny_model, read_test_manifest

    entries = read_test_manifest()
    if random_default:
        from asr.audio import load_audio
        from asr.features import compute_cmvn_stats, compute_fbank
        from asr.model import CTCModel, ModelConfig
        from asr.tokenizer import Tokenizer

        torch.manual_seed(0)
        tok = Tokenizer.train([e["text"] for e in entries] * 20, model_prefix=None, vocab_size=30)
        # default sizes except the head, which matches this small tokenizer (the head is a
        # negligible part of the cost next to 12 RWKV-7 blocks)
        model = CTCModel(ModelConfig(vocab_size=tok.vocab_size))
        model.cmvn.set_stats(*compute_cmvn_stats([compute_fbank(load_audio(e["audio"])) for e in entries]))
        desc = f"random-init default ModelConfig ({model.num_parameters() / 1e6:.1f} M parameters)"
    else:
        print("no bundled model: training the tiny overfit model of tests/conftest.py (about a minute)",
              file=sys.stderr, flush=True)
        model, tok, _, _ = overfit_tiny_model(entries)
        desc = f"tiny overfit test model ({model.num_parameters() / 1e3:.0f} k parameters)"
    path = tmp / "bench_model.pt"
    torch.save({"config": model.config.to_dict(), "model": model.state_dict(), "tokenizer": tok.to_bytes()}, path)
    return path, desc


def run_one(model: Path, audio: Path, path_kind: str, args: argparse.Namespace) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", "--model", str(model), "--audio", str(audio),
           "--path", path_kind, "--device", args.device, "--threads", str(args.threads),
           "--block-seconds", str(args.block_seconds), "--decoding", args.decoding]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    raise RuntimeError(f"worker failed ({proc.returncode}): {proc.stderr.strip()[-2000:]}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=None, help="checkpoint file or folder (default: bundled, else tiny overfit)")
    ap.add_argument("--random-default", action="store_true", help="default-size model with random weights")
    ap.add_argument("--minutes", type=float, nargs="+", default=[1, 10, 60])
    ap.add_argument("--onepass-max-minutes", type=float, default=10.0,
                    help="also time the one-pass path for inputs up to this long (0: never)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=min(4, os.cpu_count() or 1), help="torch intra-op threads")
    ap.add_argument("--block-seconds", type=float, default=30.0)
    ap.add_argument("--workdir", type=Path, default=None, help="keep generated audio here (default: a temp folder)")
    ap.add_argument("--decoding", choices=["default", "greedy", "both"], default="default",
                    help="default: as load_model (the bundled LM with the bundled model); greedy: no LM; both: each")
    # worker mode (internal)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--audio", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--path", default="blocks", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        worker(args)
        return 0

    with tempfile.TemporaryDirectory() as tmpdir:
        tmp = args.workdir or Path(tmpdir)
        tmp.mkdir(parents=True, exist_ok=True)
        if args.model is not None:
            model, desc = Path(args.model), f"checkpoint {args.model}"
        else:
            model, desc = default_model(tmp, args.random_default)
        print(f"model: {desc}; device {args.device}, {args.threads} threads, blocks of {args.block_seconds:g} s",
              flush=True)
        header = f"{'input':>8}  {'path':>8}  {'decoding':>8}  {'wall s':>8}  {'x real time':>11}  {'RSS after load':>14}  " \
                 f"{'peak RSS':>9}  {'growth':>8}  {'words':>6}"
        rows = []
        print(header, flush=True)
        for minutes in args.minutes:
            audio = tmp / f"bench_{minutes:g}min.wav"
            if not audio.exists():
                make_audio(audio, minutes)
            kinds = ["blocks"] + (["one-pass"] if minutes <= args.onepass_max_minutes else [])
            decodings = ["greedy", "default"] if args.decoding == "both" else [args.decoding]
            for kind, decoding in [(k, d) for k in kinds for d in decodings]:
                r = run_one(model, audio, kind, argparse.Namespace(**{**vars(args), "decoding": decoding}))
                row = (f"{minutes:>6g} m  {kind:>8}  {decoding:>8}  {r['wall_s']:>8.1f}  {r['audio_s'] / r['wall_s']:>10.1f}x  "
                       f"{r['rss_loaded_mb']:>11.0f} MB  {r['rss_peak_mb']:>6.0f} MB  "
                       f"{r['rss_peak_mb'] - r['rss_loaded_mb']:>5.0f} MB  {r['words']:>6}")
                if "cuda_peak_mb" in r:
                    row += f"  cuda peak {r['cuda_peak_mb']:.0f} MB"
                print(row, flush=True)
                rows.append(r)
    return 0


if __name__ == "__main__":
    sys.exit(main())
