"""Write the training sentences of the synthetic recipe, one transcript per line: a language
model's text (tools/build_lm.py) that holds none of the dev and test sentences.

    python recipes/synthetic/lm_text.py --out .data/lm/synth_train.txt
    python recipes/synthetic/lm_text.py --out .data/lm/commands.txt --sources commands,numbers

Uses prepare.py's own sentence pools and split with the same seed, hours and exclusions, so the
sentences reserved for dev and test (unseen in training) stay unseen by the language model too.
The training text does not depend on ``--hours`` (training cycles through all its sentences).
``--sources`` keeps some of the sources; the split is made over all of them (it depends on all),
so every source's dev and test sentences stay out. ``tools/build_lm.py --preset bundled`` calls
:func:`training_text` for the bundled LM's commands and numbers.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parent))

import prepare  # noqa: E402
import textnorm  # noqa: E402
import texts  # noqa: E402

from asr.data.manifest import read_manifest  # noqa: E402

SOURCES = tuple(prepare.SOURCE_WEIGHTS)


def training_text(seed: int = 0, dev_hours: float = 0.25, test_hours: float = 0.4,
                  exclude_manifests: Optional[Sequence[Path]] = None, kjv_text: Optional[Path] = None,
                  wordnet_dir: Path = texts.WORDNET_DIR, limit: Optional[int] = None
                  ) -> tuple[dict[str, list[str]], set[str]]:
    """(training transcripts per source, the dev and test transcripts of every source).

    ``exclude_manifests``: as prepare.py (None: the real-speech manifest if present); their
    transcripts are in no split. Raises ``texts.SourceError`` when a text source is missing."""
    if exclude_manifests is None:
        exclude_manifests = [prepare.DEFAULT_REAL_MANIFEST] if prepare.DEFAULT_REAL_MANIFEST.is_file() else []
    exclude = {textnorm.to_transcript(e["text"]) for m in exclude_manifests for e in read_manifest(m, absolute=False)}
    pools = prepare.build_sentences(seed, exclude, kjv_text, wordnet_dir, limit=limit)
    split = prepare.split_sentences(pools, {"train": 1.0, "dev": dev_hours, "test": test_hours})
    held_out = {t for s in ("dev", "test") for pool in split[s].values() for _, t in pool}
    train = {source: [t for _, t in pool] for source, pool in split["train"].items()}
    assert not held_out & {t for lines in train.values() for t in lines}, "dev/test sentences in the training text"
    return train, held_out


def parse_sources(value: str) -> list[str]:
    """A comma-separated list of source names (argparse type)."""
    names = [s.strip() for s in value.split(",") if s.strip()]
    unknown = [s for s in names if s not in SOURCES]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"sources are some of {', '.join(SOURCES)}; got {value!r}")
    return names


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dev-hours", type=float, default=0.25)
    ap.add_argument("--test-hours", type=float, default=0.4)
    ap.add_argument("--exclude-manifest", type=Path, action="append", default=None,
                    help="as prepare.py (default: the real-speech manifest if present)")
    ap.add_argument("--sources", type=parse_sources, default=list(SOURCES),
                    help=f"comma-separated sources to write (default: all of {','.join(SOURCES)})")
    ap.add_argument("--kjv-text", type=Path, default=None)
    ap.add_argument("--wordnet-dir", type=Path, default=texts.WORDNET_DIR)
    ap.add_argument("--max-source-sentences", type=int, default=None)
    args = ap.parse_args(argv)
    train, held_out = training_text(args.seed, args.dev_hours, args.test_hours, args.exclude_manifest,
                                    args.kjv_text, args.wordnet_dir, args.max_source_sentences)
    lines = [t for source in args.sources for t in train[source]]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n", encoding="utf-8")
    print(f"{len(lines)} training sentences -> {args.out} ({len(held_out)} dev/test sentences held out)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
