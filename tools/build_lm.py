"""Build a word n-gram language model (ARPA) for ``asr-eval --lm`` / ``asr-transcribe --lm``.

    python tools/build_lm.py --text .data/lm/synth_train.txt --manifest .data/bundle/train.jsonl \\
        --exclude-manifest .data/bundle/dev.jsonl --exclude-manifest .data/bundle/test.jsonl \\
        --order 3 --out .data/lm/bundled_3gram.arpa

Text comes from plain files (one sentence per line) and from manifests' ``text`` fields, normalised
as the tokenizer normalises transcripts. Sentences found in an ``--exclude-manifest`` are dropped
(never let a language model see the evaluation sentences). The model is interpolated Kneser-Ney
(:mod:`asr.decode.ngram`).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from asr.data.manifest import read_manifest  # noqa: E402
from asr.decode.ngram import NGramCounts, write_arpa  # noqa: E402
from asr.tokenizer import normalize_text  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--text", type=Path, action="append", default=[], help="one sentence per line (repeatable)")
    ap.add_argument("--manifest", type=Path, action="append", default=[], help="JSON Lines manifest (repeatable)")
    ap.add_argument("--exclude-manifest", type=Path, action="append", default=[],
                    help="drop sentences that occur in this manifest (repeatable)")
    ap.add_argument("--order", type=int, default=3)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args(argv)
    if not args.text and not args.manifest:
        ap.error("give at least one --text or --manifest")
    if args.order < 1:
        ap.error("--order must be at least 1")
    t0 = time.time()
    try:
        exclude = {normalize_text(e["text"]) for m in args.exclude_manifest for e in read_manifest(m, absolute=False)}
        sentences: list[str] = []
        for path in args.text:
            sentences += [normalize_text(line) for line in path.read_text(encoding="utf-8").splitlines()]
        for path in args.manifest:
            sentences += [normalize_text(e["text"]) for e in read_manifest(path, absolute=False)]
    except (OSError, ValueError) as e:  # ManifestError is a ValueError
        print(f"build_lm: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    kept = [s for s in sentences if s and s not in exclude]
    if not kept:
        print("build_lm: error: no sentences left to count (empty input, or all excluded)", file=sys.stderr)
        return 2
    counts = NGramCounts(args.order).add_all(kept)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_suffix(args.out.suffix + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        write_arpa(counts, f)
    tmp.replace(args.out)
    sizes = ", ".join(f"{len(counts.raw[k]):,} {k}-grams" for k in range(1, args.order + 1))
    print(f"{len(kept):,} sentences ({len(sentences) - len(kept):,} dropped: empty or excluded), {sizes} "
          f"-> {args.out} ({args.out.stat().st_size / 1e6:.1f} MB) in {time.time() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
