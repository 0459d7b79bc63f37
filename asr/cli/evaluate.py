"""``asr-eval``: WER and CER (jiwer) of a checkpoint on one or more manifests.

    asr-eval exp/real/2026-01-01_12-00-00 .data/real/dev.jsonl
    asr-eval model.pt test.jsonl --beam-size 8 --worst 20 --report errors.jsonl

CHECKPOINT is a checkpoint file or a run/checkpoint folder (its best checkpoint by dev WER, else
its newest). Prints corpus WER/CER and the utterances with the most word errors; ``--report``
writes every utterance (id, reference, hypothesis, errors) as JSON Lines for closer study.
References are normalised exactly like the tokenizer's training text, so punctuation or case in a
manifest does not count as an error.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from asr.train.evaluate import UtteranceResult
    from asr.train.metrics import ErrorCounts


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="asr-eval", description="Word and character error rates of a checkpoint on manifests.")
    ap.add_argument("checkpoint", help="checkpoint file, or a folder (best by dev WER, else newest)")
    ap.add_argument("manifests", nargs="+", help="JSON Lines manifests to score")
    ap.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default: %(default)s)")
    ap.add_argument("--beam-size", type=int, default=1, help="1: greedy decoding; >1: CTC prefix beam search")
    ap.add_argument("--batch-seconds", type=float, default=300.0, help="padded audio seconds per batch")
    ap.add_argument("--num-workers", type=int, default=2, help="DataLoader workers computing features")
    ap.add_argument("--worst", type=int, default=10, help="how many worst utterances to print (0: none)")
    ap.add_argument("--report", type=Path, default=None, help="write per-utterance results (JSON Lines) here")
    ap.add_argument("--lm", type=Path, default=None, metavar="ARPA",
                    help="decode over the LM's words with this n-gram model (tools/build_lm.py; needs flashlight-text)")
    ap.add_argument("--model-lm", action="store_true",
                    help="decode with the word LM the checkpoint carries, as asr-transcribe does by default "
                         "(the bundled model's; tools/export_model.py --lm)")
    ap.add_argument("--lm-weight", type=float, default=None, help="language-model weight (default: asr.decode.lexicon's)")
    ap.add_argument("--word-score", type=float, default=None, help="score added per word (default: asr.decode.lexicon's)")
    ap.add_argument("--lm-beam", type=int, default=50, help="hypotheses kept per frame with --lm (default: %(default)s)")
    ap.add_argument("--lm-token-beam", type=int, default=None,
                    help="tokens tried per frame with --lm, 0 = all (default: the decoder's, 16)")
    ap.add_argument("--int8", action="store_true",
                    help="int8 block weights (CPU only), as asr-transcribe/asr-live --int8: score the model you deploy")
    return ap


def main(argv: list[str] | None = None) -> int:
    ap = build_parser()
    args = ap.parse_args(argv)
    if (args.lm is not None or args.model_lm) and args.beam_size > 1:
        ap.error("--lm runs its own beam search (--lm-beam): leave out --beam-size with it")
    if args.lm is not None and args.model_lm:
        ap.error("--lm and --model-lm name two language models: give one")
    import torch
    from torch.utils.data import DataLoader

    from asr.data.dataset import ManifestDataset, collate
    from asr.data.manifest import ManifestError, read_manifests
    from asr.data.sampler import BucketingBatchSampler
    from asr.model_file import CheckpointError, load_inference_parts
    from asr.train.evaluate import evaluate_model

    if args.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(args.device)
    if args.int8 and device.type != "cpu":
        print(f"asr-eval: error: --int8 runs on the CPU only (device {device})", file=sys.stderr)
        return 2
    try:
        model, tokenizer, carried_lm = load_inference_parts(args.checkpoint, device=device)
        entries = read_manifests(args.manifests)
        if args.int8:
            from asr.infer import InferenceEncoder

            model = InferenceEncoder(model.eval(), "int8")
    except (CheckpointError, ManifestError, OSError, ValueError, RuntimeError) as e:
        print(f"asr-eval: error: {e}", file=sys.stderr)
        return 2
    if not entries:
        print("asr-eval: error: the manifests are empty", file=sys.stderr)
        return 2
    lexicon = None
    lm = carried_lm if args.model_lm else args.lm
    if args.model_lm and carried_lm is None:
        print(f"asr-eval: error: --model-lm: {args.checkpoint} carries no language model", file=sys.stderr)
        return 2
    if lm is not None:
        from asr.decode.lexicon import LexiconDecoder

        try:
            lexicon = LexiconDecoder(tokenizer, lm, lm_weight=args.lm_weight, word_score=args.word_score,
                                     beam_size=args.lm_beam,
                                     **({} if args.lm_token_beam is None else {"beam_size_token": args.lm_token_beam or None}))
        except (OSError, ValueError, RuntimeError) as e:
            print(f"asr-eval: error: --lm: {e}", file=sys.stderr)
            return 2
    ds = ManifestDataset(entries, tokenizer, filter_ctc=False)
    sampler = BucketingBatchSampler(ds.durations, args.batch_seconds, num_buckets=20, shuffle=False)
    loader = DataLoader(ds, batch_sampler=sampler, collate_fn=collate, num_workers=args.num_workers,
                        generator=torch.Generator())

    def autocast():
        return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast("cpu", enabled=False)

    _, _, counts, results = evaluate_model(model, loader, tokenizer, device, autocast,
                                           beam_size=args.beam_size, keep_utterances=True, lexicon=lexicon)
    _print_results(args, counts, results)
    return 0


def _print_results(args: argparse.Namespace, counts: ErrorCounts, results: list[UtteranceResult]) -> None:
    """Print corpus WER/CER from ``counts`` and the ``--worst`` utterances of ``results``; with
    ``--report``, write every one of ``results`` there as JSON Lines."""
    print(f"utterances {counts.utterances}  words {counts.words}  "
          f"WER {100 * counts.wer:.2f}% ({counts.word_errors} errors)  "
          f"CER {100 * counts.cer:.2f}% ({counts.char_errors} errors)")
    if args.worst > 0:
        worst = sorted(results, key=lambda r: (-r.word_errors, -(r.word_errors / max(1, r.words)), r.id))
        worst = [r for r in worst if r.word_errors > 0][: args.worst]
        if worst:
            print(f"\n{len(worst)} utterances with the most word errors:")
            for r in worst:
                print(f"  {r.id}  errors {r.word_errors}/{r.words}")
                print(f"    ref: {r.ref}")
                print(f"    hyp: {r.hyp}")
    if args.report is not None:
        args.report.parent.mkdir(parents=True, exist_ok=True)
        with open(args.report, "w", encoding="utf-8") as f:
            for r in results:
                f.write(json.dumps({"id": r.id, "ref": r.ref, "hyp": r.hyp, "word_errors": r.word_errors,
                                    "words": r.words}) + "\n")
        print(f"\nper-utterance report: {args.report}")


if __name__ == "__main__":
    sys.exit(main())
