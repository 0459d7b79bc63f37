"""Text normalisation and the sentencepiece BPE tokenizer used as CTC output vocabulary.

Blank handling (the one design decision that everything downstream depends on):
the CTC blank is id 0, and we make it *sentencepiece's own* id 0 instead of shifting ids by one.
The model is trained with ``pad_id=0, pad_piece='<blk>', unk_id=1, bos_id=-1, eos_id=-1``.
Sentencepiece treats the pad piece as a control symbol, so

* ``encode`` can never produce id 0 (control symbols are never emitted by segmentation),
* ``decode`` renders id 0 as the empty string, so a stray blank cannot corrupt text,
* model output index == sentencepiece id, with no off-by-one arithmetic anywhere
  (tokens, beam search, alignment, checkpoints and the ``.vocab`` file all agree), and
* ``vocab_size`` (sentencepiece's piece count) already includes the blank, which is exactly the
  size of the CTC head.

There is no BOS/EOS: CTC does not use them and they would waste two output classes.
Id 1 is ``<unk>``; after :func:`normalize_text` it only appears for characters that never occurred
in the training text and are not in ``required_chars``.

A tokenizer file made elsewhere is accepted only if its id 0 is a control/unused piece (never
produced by ``encode``); otherwise it is rejected, because the model would confuse a real token
with blank.
"""
from __future__ import annotations

import io
import itertools
import lzma
import re
import unicodedata
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import sentencepiece as spm

from asr.frames import BLANK_ID

__all__ = ["UNK_ID", "WORD_BOUNDARY", "TextFileError", "Tokenizer", "normalize_text", "read_text_lines"]

UNK_ID = 1
BLANK_PIECE = "<blk>"
#: sentencepiece marks the first piece of every word with this character (U+2581).
WORD_BOUNDARY = "\u2581"
#: Characters always kept in the vocabulary, even when a small training text lacks some of them,
#: so every normalised English word can be encoded without ``<unk>``. Digits are not forced in:
#: transcripts spell numbers out, and 10 dead output classes would only hurt a small vocabulary.
DEFAULT_REQUIRED_CHARS = "abcdefghijklmnopqrstuvwxyz'"

# Apostrophe look-alikes that appear in real transcripts (typographic quotes, primes, backtick).
_APOSTROPHES = str.maketrans({c: "'" for c in "\u2018\u2019\u201b\u2032\u02bc\u0060\u00b4"})
# Dashes of every kind and slashes separate words ("well-known" -> "well known").
_SEPARATORS = re.compile(r"[-/\u2010-\u2015\u2212\\_]")
_DROP = re.compile(r"[^a-z0-9' ]")
_SPACES = re.compile(r"\s+")
# An apostrophe with no letter/digit before it is an opening quote, not part of a word
# ("know 'er" -> "know er", as in the real-data manifest); "don't" and "boys'" keep theirs.
_LEADING_APOSTROPHE = re.compile(r"(?<![a-z0-9])'+")
# Ligatures and letters with no NFKD decomposition to ASCII.
_SPECIAL_LETTERS = str.maketrans({"ß": "ss", "æ": "ae", "œ": "oe", "ø": "o", "đ": "d", "ł": "l", "þ": "th", "ð": "d"})


def normalize_text(text: str) -> str:
    """Normalise a transcript the way ``data/real/README.md`` describes.

    Lower-case; ``-`` and ``/`` (and other dashes, backslash, underscore) become spaces; every
    character except ``a-z 0-9 '`` and space is removed; runs of whitespace collapse to one space;
    leading/trailing spaces are stripped. An apostrophe that does not follow a letter or digit is
    an opening quote and is dropped (the manifest has ``know 'er`` -> ``know er``). Already-normalised text is returned unchanged
    (idempotent), so applying it twice (data prep, then ``encode``) is harmless.

    Beyond the README it is robust to real-world input, because users call ``encode``/WER scoring on
    raw strings: accented letters fold to their ASCII base (``café`` -> ``cafe``, rather than
    silently losing the letter), typographic apostrophes become ``'``, and any Unicode whitespace
    (tabs, newlines, NBSP) separates words. Digits are kept as digits; spelling numbers out is the
    corpus preparation's job, not the tokenizer's.
    """
    text = text.lower().translate(_APOSTROPHES).translate(_SPECIAL_LETTERS)
    # NFKD splits "é" into "e" + combining accent (dropped below) and expands e.g. "ﬁ" -> "fi".
    text = unicodedata.normalize("NFKD", text)
    text = _SEPARATORS.sub(" ", text)
    text = _SPACES.sub(" ", text)  # before _DROP so tabs/newlines become spaces, not nothing
    text = _DROP.sub("", text)
    text = _LEADING_APOSTROPHE.sub("", text)
    return _SPACES.sub(" ", text).strip()


class TextFileError(ValueError):
    """A text file cannot be read; the message is one line naming the file and the reason."""


def read_text_lines(path: Path | str) -> list[str]:
    """The lines of the UTF-8 text file ``path`` (``xz``-compressed when its name ends in ``.xz``),
    without line ends. Raises :class:`TextFileError` for a missing or unreadable file, a damaged or
    truncated ``.xz`` and text that is not UTF-8."""
    path = Path(path)
    opener = lzma.open if path.suffix == ".xz" else open
    try:
        with opener(path, "rt", encoding="utf-8") as fh:
            return fh.read().splitlines()
    except OSError as e:  # lzma.LZMAError is not an OSError, so this is the file system's answer
        raise TextFileError(f"{path}: {e.strerror or e}") from e
    except (lzma.LZMAError, EOFError) as e:  # damaged, or cut short
        raise TextFileError(f"{path}: not a readable xz file ({e})") from e
    except UnicodeDecodeError as e:
        raise TextFileError(f"{path}: not UTF-8 text ({e})") from e


def _training_sentences(texts: Iterable[str], normalize: bool) -> Iterator[str]:
    """The non-empty lines of ``texts`` (normalised with :func:`normalize_text` when ``normalize``);
    raises ValueError at once, not inside sentencepiece, when there are none."""
    lines = (normalize_text(t) if normalize else t.strip() for t in texts)
    lines = (t for t in lines if t)
    try:
        first = next(lines)
    except StopIteration:
        raise ValueError("no non-empty training text") from None
    return itertools.chain([first], lines)


class Tokenizer:
    """Sentencepiece BPE with the CTC blank at id 0 (see the module docstring for why).

    Construct from a ``.model`` file (``Tokenizer(path)``) or from the serialized model proto
    (``Tokenizer.from_bytes(b)``, so a checkpoint can embed its tokenizer via :meth:`to_bytes`).
    Instances pickle through their bytes, so they can be sent to DataLoader workers.
    """

    blank_id: int = BLANK_ID

    def __init__(self, model_path: str | Path | None = None, *, model_proto: bytes | None = None) -> None:
        if (model_path is None) == (model_proto is None):
            raise ValueError("give exactly one of model_path or model_proto")
        if model_path is not None:
            path = Path(model_path)
            if not path.is_file():
                raise FileNotFoundError(f"tokenizer model not found: {path}")
            model_proto = path.read_bytes()
        self._load(bytes(model_proto))  # type: ignore[arg-type]

    def _load(self, model_proto: bytes) -> None:
        sp = spm.SentencePieceProcessor()
        try:
            sp.LoadFromSerializedProto(model_proto)
        except Exception as e:  # sentencepiece raises RuntimeError/OSError with C++ text
            raise ValueError(f"not a sentencepiece model: {e}") from e
        if sp.get_piece_size() < 2 or not (sp.is_control(BLANK_ID) or sp.is_unused(BLANK_ID)):
            raise ValueError(
                f"sentencepiece id 0 is {sp.id_to_piece(0)!r}, a piece encode() can produce; a CTC "
                "tokenizer needs id 0 reserved for blank (train it with Tokenizer.train, which sets "
                "pad_id=0, unk_id=1, bos_id=eos_id=-1)"
            )
        self._sp = sp
        self._proto = model_proto
        n = sp.get_piece_size()
        # Cached per-id facts: decode and alignment query them once per emitted token.
        self._pieces = [sp.id_to_piece(i) for i in range(n)]
        self._word_start = [p.startswith(WORD_BOUNDARY) for p in self._pieces]
        self._special = [sp.is_control(i) or sp.is_unused(i) for i in range(n)]

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_bytes(cls, model_proto: bytes) -> "Tokenizer":
        """Load from a serialized sentencepiece ModelProto (as stored in a checkpoint)."""
        return cls(model_proto=model_proto)

    def to_bytes(self) -> bytes:
        """The serialized ModelProto; ``Tokenizer.from_bytes(t.to_bytes())`` is an identical tokenizer."""
        return self._proto

    def save(self, path: str | Path) -> Path:
        """Write the ``.model`` file (the same bytes as :meth:`to_bytes`)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(self._proto)
        return path

    @classmethod
    def train(
        cls,
        texts: Iterable[str],
        model_prefix: str | Path | None,
        vocab_size: int,
        *,
        normalize: bool = True,
        required_chars: str = DEFAULT_REQUIRED_CHARS,
        hard_vocab_limit: bool = False,
        max_sentences: int = 0,
        num_threads: int = 1,
    ) -> "Tokenizer":
        """Train a BPE tokenizer in-process from an iterable of transcripts.

        ``vocab_size`` counts every output class, blank and ``<unk>`` included, i.e. it is the size
        of the CTC head. With ``hard_vocab_limit=False`` (default) it is an upper bound: a small
        text that cannot support that many merges yields fewer pieces instead of an error, so check
        :attr:`vocab_size` of the result. ``model_prefix`` gives ``<prefix>.model``/``.vocab`` files;
        ``None`` trains purely in memory. ``max_sentences`` > 0 subsamples the input (sentencepiece's
        ``input_sentence_size``), which bounds memory on huge corpora. ``num_threads`` is 1 by
        default because training on transcripts is fast and machines are shared.

        Texts are normalised with :func:`normalize_text` first (``normalize=False`` when they already
        are and you want to skip the cost); empty lines are skipped.
        """
        min_size = 3 + len(set(required_chars))  # blank, unk, the bare word-boundary piece, chars
        if vocab_size < min_size:
            raise ValueError(f"vocab_size={vocab_size} is too small: need at least {min_size} "
                             f"(blank, <unk>, '{WORD_BOUNDARY}' and {len(set(required_chars))} required chars)")

        kwargs = dict(
            sentence_iterator=_training_sentences(texts, normalize),
            model_type="bpe",
            vocab_size=vocab_size,
            hard_vocab_limit=hard_vocab_limit,
            pad_id=BLANK_ID,
            pad_piece=BLANK_PIECE,
            unk_id=UNK_ID,
            bos_id=-1,
            eos_id=-1,
            # Our normalize_text already produced the canonical form; sentencepiece's NFKC rules
            # would only add a second, differently-behaving normaliser.
            normalization_rule_name="identity",
            character_coverage=1.0,
            split_digits=True,
            num_threads=num_threads,
            minloglevel=2,
        )
        if required_chars:
            kwargs["required_chars"] = required_chars
        if max_sentences > 0:
            kwargs["input_sentence_size"] = max_sentences
            kwargs["shuffle_input_sentence"] = True
        buf = io.BytesIO()
        kwargs["model_writer"] = buf
        try:
            spm.SentencePieceTrainer.train(**kwargs)
        except RuntimeError as e:
            raise ValueError(f"sentencepiece training failed: {e}") from e
        tok = cls.from_bytes(buf.getvalue())
        if model_prefix is not None:
            prefix = Path(model_prefix)
            tok.save(prefix.with_name(prefix.name + ".model"))
            vocab_lines = (f"{p}\t{tok._sp.get_score(i):g}\n" for i, p in enumerate(tok._pieces))
            prefix.with_name(prefix.name + ".vocab").write_text("".join(vocab_lines), encoding="utf-8")
        return tok

    # ------------------------------------------------------------------ vocabulary
    @property
    def vocab_size(self) -> int:
        """Number of output classes, blank included (the CTC head's size)."""
        return len(self._pieces)

    def __len__(self) -> int:
        return self.vocab_size

    @property
    def unk_id(self) -> int:
        return self._sp.unk_id()

    def id_to_piece(self, i: int) -> str:
        return self._pieces[i]

    def piece_to_id(self, piece: str) -> int:
        return self._sp.piece_to_id(piece)

    def is_word_start(self, i: int) -> bool:
        """True if piece ``i`` begins a new word (starts with ``▁``); used for word timestamps."""
        return self._word_start[i]

    # ------------------------------------------------------------------ text <-> ids
    def encode(self, text: str, *, normalize: bool = True) -> list[int]:
        """Text to ids (all >= 1). Normalises first by default so raw strings work directly."""
        if normalize:
            text = normalize_text(text)
        return self._sp.encode(text) if text else []

    def encode_as_pieces(self, text: str, *, normalize: bool = True) -> list[str]:
        return [self._pieces[i] for i in self.encode(text, normalize=normalize)]

    def decode(self, ids: Sequence[int] | Iterable[int]) -> str:
        """Ids to text. Blank (and any other control id) is skipped, so raw CTC output after repeat
        collapsing can be passed directly. Accepts lists, tuples or 1-D integer tensors."""
        n = len(self._pieces)
        keep: list[int] = []
        for i in (ids.tolist() if hasattr(ids, "tolist") else ids):  # type: ignore[union-attr]
            i = int(i)
            if not 0 <= i < n:
                raise ValueError(f"token id {i} out of range for vocabulary of {n}")
            if not self._special[i]:
                keep.append(i)
        return self._sp.decode(keep) if keep else ""

    # ------------------------------------------------------------------ pickling
    def __getstate__(self) -> dict:
        return {"model_proto": self._proto}

    def __setstate__(self, state: dict) -> None:
        self._load(state["model_proto"])

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Tokenizer) and other._proto == self._proto

    def __hash__(self) -> int:
        return hash(self._proto)

    def __repr__(self) -> str:
        return f"Tokenizer(vocab_size={self.vocab_size}, blank_id={BLANK_ID})"
