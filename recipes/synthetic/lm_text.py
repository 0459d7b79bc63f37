"""Write the training sentences of the synthetic recipe, one transcript per line: a language
model's text (tools/build_lm.py) that holds none of the dev and test sentences.

    python recipes/synthetic/lm_text.py --out .data/lm/synth_train.txt

Uses prepare.py's own sentence pools and split with the same seed, hours and exclusions, so the
sentences reserved for dev and test (unseen in training) stay unseen by the language model too.
The training text does not depend on ``--hours`` (training cycles through all its sentences).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import prepare  # noqa: E402
import textnorm  # noqa: E402
import texts  # noqa: E402

from asr.data.manifest import read_manifest  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dev-hours", type=float, default=0.25)
    ap.add_argument("--test-hours", type=float, default=0.4)
    ap.add_argument("--exclude-manifest", type=Path, action="append", default=None,
                    help="as prepare.py (default: the real-speech manifest if present)")
    ap.add_argument("--kjv-text", type=Path, default=None)
    ap.add_argument("--wordnet-dir", type=Path, default=texts.WORDNET_DIR)
    ap.add_argument("--max-source-sentences", type=int, default=None)
    args = ap.parse_args(argv)
    excludes = args.exclude_manifest
    if excludes is None:
        excludes = [prepare.DEFAULT_REAL_MANIFEST] if prepare.DEFAULT_REAL_MANIFEST.is_file() else []
    exclude = {textnorm.to_transcript(e["text"]) for m in excludes for e in read_manifest(m, absolute=False)}
    pools = prepare.build_sentences(args.seed, exclude, args.kjv_text, args.wordnet_dir,
                                    limit=args.max_source_sentences)
    split = prepare.split_sentences(pools, {"train": 1.0, "dev": args.dev_hours, "test": args.test_hours})
    held_out = {t for s in ("dev", "test") for pool in split[s].values() for _, t in pool}
    lines = [t for pool in split["train"].values() for _, t in pool]
    assert not held_out & set(lines), "dev/test sentences in the training text"
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n", encoding="utf-8")
    print(f"{len(lines)} training sentences -> {args.out} ({len(held_out)} dev/test sentences held out)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
