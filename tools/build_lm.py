"""Build a word n-gram language model (ARPA) for ``asr-eval --lm`` / ``asr-transcribe --lm``.

    python tools/build_lm.py --preset bundled --out .data/lm/bundled.arpa.xz
    python tools/build_lm.py --text .data/lm/synth_train.txt --manifest .data/bundle/train.jsonl \\
        --exclude-manifest .data/bundle/dev.jsonl --exclude-manifest .data/bundle/test.jsonl \\
        --order 3 --out .data/lm/bundled_3gram.arpa

Text comes from plain files (one sentence per line; ``.xz`` files are read compressed) and from
manifests' ``text`` fields, normalised as the tokenizer normalises transcripts. Sentences found in
an ``--exclude-manifest`` or ``--exclude-text`` are dropped (never let a language model see the
evaluation sentences). The model is interpolated Kneser-Ney (:mod:`asr.decode.ngram`), made
smaller with ``--max-vocab`` (other words count as ``<unk>``), ``--prune`` (count thresholds per
order, as KenLM's ``lmplz --prune``) and ``--decimals`` (of the log10 values). An ``--out`` ending
in ``.xz`` is written xz-compressed (as ``tools/export_model.py --lm`` stores it); ``--max-xz-mb``
fails the build when that size is over.

``--preset NAME`` reads ``conf/lm/NAME.yaml``: its text files, the synthetic recipe's training
sentences of some sources (``recipes/synthetic/lm_text.py``: their dev and test sentences are
excluded, as are the sentences of its ``exclude_manifest``), the order, pruning, vocabulary cap and
size bound. Options given on the command line add to its lists and replace its values.
``--oov-manifest`` prints the share of a manifest's words that the model does not know.
"""
from __future__ import annotations

import argparse
import lzma
import sys
import time
from pathlib import Path
from typing import Iterable, Optional

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from asr.data.manifest import read_manifest  # noqa: E402
from asr.decode.ngram import BOS, EOS, UNK, NGramCounts, prune_thresholds, top_words, write_arpa  # noqa: E402
from asr.tokenizer import TextFileError, normalize_text, read_text_lines  # noqa: E402

PRESET_DIR = REPO / "conf" / "lm"


class BuildError(Exception):
    """Bad input or a broken bound; the message is one line for the user."""


def read_lines(path: Path) -> list[str]:
    """The lines of a text file, plain or ``.xz``; :class:`BuildError` when it cannot be read."""
    try:
        return read_text_lines(path)
    except TextFileError as e:
        raise BuildError(str(e)) from e


def manifest_texts(paths: Iterable[Path]) -> list[str]:
    return [normalize_text(e["text"]) for m in paths for e in read_manifest(m, absolute=False)]


def load_preset(name: str) -> dict:
    """``conf/lm/<name>.yaml`` as a dict, its paths resolved against the repository root."""
    from omegaconf import OmegaConf

    path = PRESET_DIR / f"{name}.yaml"
    if not path.is_file():
        known = ", ".join(sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))) or "none"
        raise BuildError(f"no preset {name!r} ({path} is missing; presets: {known})")
    cfg = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
    for key in ("text", "exclude_manifest", "exclude_text", "oov_manifest"):
        cfg[key] = [REPO / p for p in cfg.get(key) or []]
    return cfg


def synthetic_text(spec: dict, exclude_manifests: list[Path]) -> tuple[list[str], set[str]]:
    """(training transcripts of ``spec["sources"]``, every synthetic dev and test transcript), from
    ``recipes/synthetic/lm_text.py`` with ``spec``'s seed and hours; ``exclude_manifests`` keep
    their sentences out of all synthetic splits, as prepare.py does."""
    sys.path.insert(0, str(REPO / "recipes" / "synthetic"))
    import lm_text
    import texts

    try:
        train, held_out = lm_text.training_text(
            seed=spec.get("seed", 0), dev_hours=spec.get("dev_hours", 0.25), test_hours=spec.get("test_hours", 0.4),
            exclude_manifests=exclude_manifests, kjv_text=spec.get("kjv_text"),
            wordnet_dir=Path(spec.get("wordnet_dir", texts.WORDNET_DIR)), limit=spec.get("max_source_sentences"))
    except texts.SourceError as e:
        raise BuildError(f"synthetic text: {e}") from e
    unknown = [s for s in spec["sources"] if s not in train]
    if unknown:
        raise BuildError(f"synthetic text: unknown sources {unknown} (known: {', '.join(train)})")
    return [t for s in spec["sources"] for t in train[s]], held_out


def oov_rate(vocabulary: set[str], sentences: list[str]) -> tuple[int, int]:
    """(words not in ``vocabulary``, all words) over ``sentences``."""
    words = [w for s in sentences for w in s.split()]
    return sum(1 for w in words if w not in vocabulary), len(words)


def write_model(counts: NGramCounts, prune: list[int], out: Path, decimals: int = 6) -> None:
    """The ARPA file at ``out`` (xz-compressed, preset 9, for a ``.xz`` name), written atomically."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(out.suffix + ".tmp")
    opener = (lambda: lzma.open(tmp, "wt", encoding="utf-8", preset=9)) if out.suffix == ".xz" else \
        (lambda: open(tmp, "w", encoding="utf-8"))
    with opener() as f:
        write_arpa(counts, f, prune, decimals)
    tmp.replace(out)


def xz_size(path: Path) -> int:
    """Bytes of ``path`` xz-compressed as ``tools/export_model.py --lm`` stores it."""
    if path.suffix == ".xz":
        return path.stat().st_size
    compressor, size = lzma.LZMACompressor(preset=9), 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            size += len(compressor.compress(chunk))
    return size + len(compressor.flush())


def parse_args(argv: Optional[list[str]]) -> tuple[argparse.Namespace, argparse.ArgumentParser]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default=None, help="conf/lm/<name>.yaml (e.g. bundled)")
    ap.add_argument("--text", type=Path, action="append", default=[], help="one sentence per line, plain or .xz (repeatable)")
    ap.add_argument("--manifest", type=Path, action="append", default=[], help="JSON Lines manifest (repeatable)")
    ap.add_argument("--exclude-manifest", type=Path, action="append", default=[],
                    help="drop sentences that occur in this manifest (repeatable)")
    ap.add_argument("--exclude-text", type=Path, action="append", default=[],
                    help="drop sentences that occur in this text file (repeatable)")
    ap.add_argument("--order", type=int, default=None, help="n-gram order (default 3)")
    ap.add_argument("--prune", type=int, nargs="+", default=None, metavar="N",
                    help="drop n-grams of each order seen at most N times: 0 1 1 drops singleton 2- and 3-grams")
    ap.add_argument("--max-vocab", type=int, default=None, help="keep the N most frequent words, the rest are <unk>")
    ap.add_argument("--decimals", type=int, default=None, help="decimals of the log10 values (default 6)")
    ap.add_argument("--max-xz-mb", type=float, default=None, help="fail when the xz-compressed model is larger")
    ap.add_argument("--oov-manifest", type=Path, action="append", default=[],
                    help="print the share of this manifest's words outside the vocabulary (repeatable)")
    ap.add_argument("--out", type=Path, required=True)
    return ap.parse_args(argv), ap


def gather(args: argparse.Namespace, preset: dict) -> tuple[list[str], set[str]]:
    """(normalised sentences to count, sentences to exclude) from the files and the preset."""
    exclude_manifests = preset.get("exclude_manifest", []) + args.exclude_manifest
    exclude = set(manifest_texts(exclude_manifests))
    exclude |= {normalize_text(line) for p in preset.get("exclude_text", []) + args.exclude_text for line in read_lines(p)}
    sentences = [normalize_text(line) for p in preset.get("text", []) + args.text for line in read_lines(p)]
    sentences += manifest_texts(args.manifest)
    if preset.get("synthetic"):
        synth, held_out = synthetic_text(preset["synthetic"], exclude_manifests)
        sentences += synth
        exclude |= held_out
    return sentences, exclude


def build(args: argparse.Namespace, preset: dict) -> str:
    """Build the model ``args`` and ``preset`` ask for; returns the summary line."""
    t0 = time.time()
    order = args.order or preset.get("order", 3)
    prune = args.prune if args.prune is not None else preset.get("prune", [0])
    max_vocab = args.max_vocab or preset.get("max_vocab")
    max_xz_mb = args.max_xz_mb or preset.get("max_xz_mb")
    decimals = args.decimals if args.decimals is not None else preset.get("decimals", 6)
    if not 1 <= decimals <= 9:
        raise BuildError("--decimals must be 1 to 9")
    if order < 1:
        raise BuildError("--order must be at least 1")
    try:
        prune = prune_thresholds(prune, order)[1:]
    except ValueError as e:
        raise BuildError(f"--prune: {e}") from e
    sentences, exclude = gather(args, preset)
    kept = [s for s in sentences if s and s not in exclude]
    if not kept:
        raise BuildError("no sentences left to count (empty input, or all excluded)")
    vocabulary = top_words(kept, max_vocab) if max_vocab else None
    counts = NGramCounts(order, vocabulary).add_all(kept)
    write_model(counts, prune, args.out, decimals)
    size = xz_size(args.out)
    words = vocabulary if vocabulary is not None else {g[0] for g in counts.raw[1]} - {BOS, EOS, UNK}
    lines = [f"{len(kept):,} sentences ({len(sentences) - len(kept):,} dropped: empty or excluded), "
             f"{len(words):,} words, order {order}, prune {' '.join(map(str, prune))} -> {args.out} "
             f"({'' if args.out.suffix == '.xz' else f'{args.out.stat().st_size / 1e6:.1f} MB, '}"
             f"{size / 1e6:.2f} MB as xz) in {time.time() - t0:.0f} s"]
    for path in preset.get("oov_manifest", []) + args.oov_manifest:
        oov, total = oov_rate(words, manifest_texts([path]))
        lines.append(f"OOV {100 * oov / max(total, 1):.2f} % of the {total:,} words of {path}")
    if max_xz_mb is not None and size > max_xz_mb * 1e6:
        args.out.unlink()
        raise BuildError(f"{args.out}: {size / 1e6:.2f} MB as xz, over the bound of {max_xz_mb} MB "
                         "(prune harder or cap the vocabulary)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args, ap = parse_args(argv)
    if not (args.text or args.manifest or args.preset):
        ap.error("give at least one --text or --manifest, or a --preset")
    try:
        preset = load_preset(args.preset) if args.preset else {}
        print(build(args, preset))
    except (BuildError, OSError, ValueError) as e:  # ManifestError is a ValueError
        print(f"build_lm: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
