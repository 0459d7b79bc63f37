"""Compare word language models and tune their weights: WER and search cost of the lexicon + LM
beam search (:mod:`asr.decode.lexicon`) on one model's log-probabilities.

    python tools/tune_lm.py asr/pretrained/model.pt ../shared/data/real/manifest.jsonl \\
        --parts librispeech mfa commonvoice an4 speechocean --per-part 150 \\
        --lm model --lm .data/lm/bundled.arpa.xz --lm-weight 0.8 1.2 1.6 --word-score 0 1 2

The model runs once per utterance (one utterance per batch, as ``asr-transcribe`` runs a file);
its log-probabilities are cached in ``--cache`` (default ``.data/lm/logprobs_<manifest>_<n>.pt``)
so that every LM and weight is scored on the same numbers. ``--lm model`` is the LM the model
carries, and a ``.pt`` model file the LM that file carries (a model file with the same tokenizer:
how a candidate LM is scored in the packed, quantised form it would ship in). Each row gives the WER (all selected utterances, then per part: the folder under
``audio/``), the LM's load time, and the search's real-time factor on one thread (search seconds
over audio seconds; the acoustic model's own cost is printed once, when it runs). Times are the
process's CPU time, not wall time, so that other work on a shared machine inflates them less. ``--parts``
and ``--per-part`` choose a fixed subset: at most N utterances of each part, a seeded sample of
its entries in manifest order.
"""
from __future__ import annotations

import argparse
import random
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Optional

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from asr.data.manifest import ManifestError, read_manifest  # noqa: E402
from asr.tokenizer import normalize_text  # noqa: E402
from asr.train.metrics import error_counts  # noqa: E402


def part_of(entry: dict) -> str:
    """The part of a real-data entry: its ``part`` field (the dev manifests of
    ``recipes/real/prepare.py``), else the folder under ``audio/``, else the id's prefix."""
    if entry.get("part"):
        return str(entry["part"])
    parts = Path(entry["audio"]).parts
    return parts[parts.index("audio") + 1] if "audio" in parts[:-2] else entry["id"].split("_")[0]


def select(entries: list[dict], parts: Optional[list[str]], per_part: Optional[int], seed: int) -> list[dict]:
    """Entries of ``parts`` (all if None), at most ``per_part`` of each (seeded sample, manifest order)."""
    by_part: dict[str, list[dict]] = defaultdict(list)
    for e in entries:
        by_part[part_of(e)].append(e)
    chosen = []
    for part in parts or sorted(by_part):
        pool = by_part.get(part, [])
        if per_part is not None and len(pool) > per_part:
            keep = set(random.Random(f"{seed}:{part}").sample(range(len(pool)), per_part))
            pool = [e for i, e in enumerate(pool) if i in keep]
        chosen += pool
    return chosen


def compute_log_probs(model_path: Path, entries: list[dict]) -> dict:
    """{"ids", "parts", "refs", "durations", "log_probs" [T_i, V] each, "model_seconds"} for ``entries``."""
    from asr.data.dataset import ManifestDataset, collate
    from asr.model_file import load_inference_parts

    model, tokenizer, _ = load_inference_parts(model_path)
    ds = ManifestDataset(entries, None, filter_ctc=False)
    out = {"ids": [], "parts": [], "refs": [], "durations": [], "log_probs": [], "model_seconds": 0.0}
    with torch.inference_mode():
        for i, e in enumerate(entries):
            batch = collate([ds[i]])
            t0 = time.process_time()
            logits, lens = model(batch.features, batch.feature_lengths)
            out["model_seconds"] += time.process_time() - t0
            out["log_probs"].append(logits.float().log_softmax(-1)[0, : int(lens[0])].clone())
            out["ids"].append(e["id"])
            out["parts"].append(part_of(e))
            out["refs"].append(normalize_text(e["text"]))
            out["durations"].append(float(e["duration"]))
    return out


def score(cache: dict, decode) -> tuple[float, dict[str, float], float]:
    """(WER %, WER % per part, decoding seconds) of ``decode`` (log-probs [T, V] -> text)."""
    hyps, seconds = [], 0.0
    for lp in cache["log_probs"]:
        t0 = time.process_time()
        hyps.append(normalize_text(decode(lp)))
        seconds += time.process_time() - t0
    per_part = {}
    for part in dict.fromkeys(cache["parts"]):
        idx = [i for i, p in enumerate(cache["parts"]) if p == part]
        per_part[part] = 100 * error_counts([cache["refs"][i] for i in idx], [hyps[i] for i in idx]).wer
    return 100 * error_counts(cache["refs"], hyps).wer, per_part, seconds


def resolve_lm(path: Path, tokenizer):
    """``path`` itself (an ARPA file), or for a ``.pt`` model file the LM it carries (None when it
    carries none); ValueError when that file's tokenizer is not ``tokenizer`` (its lexicon would
    spell words with other token ids)."""
    if path.suffix != ".pt":
        return path
    from asr.decode.packed_lm import carried_language_model
    from asr.model_file import load_checkpoint

    ckpt = load_checkpoint(path)
    if ckpt.get("tokenizer") != tokenizer.to_bytes():
        raise ValueError(f"{path}: its tokenizer differs from the scored model's")
    return carried_language_model(ckpt)


def parse_args(argv: Optional[list[str]]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model", type=Path)
    ap.add_argument("manifest", type=Path)
    ap.add_argument("--parts", nargs="+", default=None, help="parts (folders under audio/) to score")
    ap.add_argument("--per-part", type=int, default=None, help="at most N utterances per part")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--cache", type=Path, default=None)
    ap.add_argument("--lm", action="append", default=[],
                    help="ARPA file (plain or .xz), 'model', or a .pt model file whose LM to use (repeatable)")
    ap.add_argument("--lm-weight", type=float, nargs="+", default=[1.5])
    ap.add_argument("--word-score", type=float, nargs="+", default=[1.0])
    ap.add_argument("--lm-beam", type=int, default=50)
    return ap.parse_args(argv)


def load_cache(args: argparse.Namespace) -> dict:
    entries = select(read_manifest(args.manifest), args.parts, args.per_part, args.seed)
    if not entries:
        raise ValueError("no utterances selected")
    path = args.cache or Path(".data/lm") / f"logprobs_{args.manifest.stem}_{len(entries)}_{args.seed}.pt"
    if path.is_file():
        cache = torch.load(path)
        if cache["ids"] == [e["id"] for e in entries]:
            return cache
    cache = compute_log_probs(args.model, entries)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(cache, path)
    audio = sum(cache["durations"])
    print(f"acoustic model: {len(entries)} utterances, {audio / 3600:.2f} h, RTF {cache['model_seconds'] / audio:.4f} "
          f"({torch.get_num_threads()} threads) -> {path}")
    return cache


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(1)
    from asr.decode.greedy import ctc_greedy
    from asr.decode.lexicon import LexiconDecoder
    from asr.model_file import CheckpointError, load_inference_parts

    try:
        cache = load_cache(args)
        _, tokenizer, carried = load_inference_parts(args.model)
    except (CheckpointError, ManifestError, OSError, ValueError) as e:
        print(f"tune_lm: error: {e}", file=sys.stderr)
        return 2
    audio = sum(cache["durations"])
    parts = list(dict.fromkeys(cache["parts"]))
    print(f"| LM | weight | word score | WER | {' | '.join(parts)} | LM load s | search RTF |")
    print("|---|---:|---:|---:|" + "---:|" * len(parts) + "---:|---:|")

    def row(name, wer, per_part, load, rtf):
        cells = " | ".join(f"{per_part[p]:.1f}" for p in parts)
        print(f"| {name} | {wer:.2f} | {cells} | {load} | {rtf} |", flush=True)

    wer, per_part, secs = score(cache, lambda lp: tokenizer.decode(ctc_greedy(lp)[0]))
    row("greedy | - | -", wer, per_part, "-", f"{secs / audio:.4f}")
    for lm_name in args.lm:
        try:
            lm = carried if lm_name == "model" else resolve_lm(Path(lm_name), tokenizer)
        except (CheckpointError, OSError, ValueError) as e:
            print(f"tune_lm: error: {e}", file=sys.stderr)
            return 2
        if lm is None:
            print(f"tune_lm: error: {args.model if lm_name == 'model' else lm_name} carries no LM", file=sys.stderr)
            return 2
        for weight in args.lm_weight:
            for word_score in args.word_score:
                t0 = time.process_time()
                decoder = LexiconDecoder(tokenizer, lm, lm_weight=weight, word_score=word_score, beam_size=args.lm_beam)
                load = time.process_time() - t0
                wer, per_part, secs = score(cache, decoder)
                row(f"{lm_name} | {weight:g} | {word_score:g}", wer, per_part, f"{load:.1f}", f"{secs / audio:.4f}")
                del decoder
    return 0


if __name__ == "__main__":
    sys.exit(main())
