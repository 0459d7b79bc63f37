#!/usr/bin/env python
"""What the word LM costs a stream: its load time and the lexicon + LM search per 40 ms frame.

    python tools/bench_lm.py [--model PATH] [--lm ARPA] [--manifest M.jsonl] [--seconds 60] [--repeat 3]

The model (default: the bundled one) turns the first ``--seconds`` of speech of ``--manifest``
(default: the real dev set's read sentences, ``.data/real/dev_read.jsonl``) into log-probabilities,
one utterance at a time; then, on one thread, each utterance goes through the decoder a stream
uses (:class:`asr.decode.lexicon.LexiconHypothesisDecoder`) one encoder frame per call, as
``asr-live`` feeds it, reading the partial hypothesis after each call as the recognizer does, and
its final hypothesis is taken at the utterance's end (an endpoint).
Printed: the LM's load time (building the decoder from what the model file carries, or from
``--lm``), the search's CPU time per frame (the calls and the final, over all frames) and its
real-time factor, the final call's median and largest cost (what a user waits at an endpoint), and
the words' total. Times are process CPU time, best of ``--repeat`` passes, so other work on a
shared machine inflates them less; compare rows of one run.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Optional

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

FRAME_SECONDS = 0.04


def speech_log_probs(model_path: Path, manifest: Path, seconds: float) -> tuple[list[torch.Tensor], float]:
    """Log-probs [T_i, V] of the manifest's first utterances, ``seconds`` of audio in all."""
    from asr.data.manifest import read_manifest

    sys.path.insert(0, str(REPO / "tools"))
    from tune_lm import compute_log_probs

    entries, total = [], 0.0
    for entry in read_manifest(manifest):
        if total >= seconds:
            break
        entries.append(entry)
        total += float(entry["duration"])
    return compute_log_probs(model_path, entries)["log_probs"], total


def stream_pass(lexicon, utterances: list[torch.Tensor]) -> tuple[float, list[float], int]:
    """(CPU seconds of all calls, CPU seconds of each final call, words) for one pass."""
    from asr.decode.lexicon import LexiconHypothesisDecoder

    total, finals, words = 0.0, [], 0
    for lp in utterances:
        decoder = LexiconHypothesisDecoder(lexicon)
        best = lp.argmax(-1).tolist()
        t0 = time.process_time()
        for t in range(lp.shape[0]):
            decoder.accept(lp[t:t + 1], best[t:t + 1])
            decoder.hypothesis(final=False)  # the partial result, which the recognizer reads every call
        t1 = time.process_time()
        tokens = decoder.hypothesis(final=True)[0]
        t2 = time.process_time()
        total += t2 - t0
        finals.append(t2 - t1)
        words += len(lexicon.tokenizer.decode(tokens).split())
    return total, finals, words


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, help="model file (default: the bundled model)")
    ap.add_argument("--lm", default=None, help="an ARPA file instead of the LM the model carries")
    ap.add_argument("--manifest", type=Path, default=REPO / ".data" / "real" / "dev_read.jsonl")
    ap.add_argument("--seconds", type=float, default=60.0)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    from asr.data.manifest import ManifestError
    from asr.decode.lexicon import LexiconDecoder
    from asr.model_file import CheckpointError, load_inference_parts

    try:
        model = Path(args.model) if args.model else REPO / "asr" / "pretrained" / "model.pt"
        _, tokenizer, carried = load_inference_parts(model)
        lm = args.lm or carried
        if lm is None:
            raise ValueError("the model carries no LM: pass --lm")
        utterances, audio = speech_log_probs(model, args.manifest, args.seconds)
        t0 = time.perf_counter()
        lexicon = LexiconDecoder(tokenizer, lm)
        load = time.perf_counter() - t0
    except (CheckpointError, ManifestError, OSError, ValueError) as e:
        print(f"bench_lm: error: {e}", file=sys.stderr)
        return 2
    frames = sum(lp.shape[0] for lp in utterances)
    runs = [stream_pass(lexicon, utterances) for _ in range(max(1, args.repeat))]
    total, finals, words = min(runs, key=lambda r: r[0])
    print("| LM load s (wall) | utterances | audio s | search us/frame | search RTF | final p50 ms | final max ms "
          "| words |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    print(f"| {load:.2f} | {len(utterances)} | {audio:.1f} | {1e6 * total / frames:.0f} | {total / audio:.4f} | "
          f"{1e3 * statistics.median(finals):.1f} | {1e3 * max(finals):.1f} | {words} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
