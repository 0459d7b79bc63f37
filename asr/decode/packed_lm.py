"""Word language model files: ARPA text, and the packed form a model file carries (KenLM's binary
format plus the lexicon, made once at export time so that loading takes a fraction of a second
instead of seconds); reading either into flashlight-text's KenLM.

An ARPA file is text. For the bundled word 3-gram (84k words, 1.4M n-grams, 31 MB of text) KenLM
spends about a second parsing it, after about a second of xz decompression, and spelling its 84k
words with the tokenizer takes another half second. A packed LM holds instead:

* ``kenlm``: the model in KenLM's binary trie format with 8-bit quantised probabilities and
  backoffs (``build_binary -q 8 -b 8 trie``), which KenLM reads without parsing (20 ms);
* ``words``: the vocabulary the decoder can output: the ARPA unigrams, without ``<s>``, ``</s>`` and
  ``<unk>``, that the model's tokenizer can spell;
* ``spellings`` / ``offsets``: each word's token ids, word ``i`` being
  ``spellings[offsets[i]:offsets[i + 1]]`` (int16 / int32 as stored, int32 / int64 in memory);
* ``unigram``: each word's LM score from the empty context (natural log, float32), the lexicon
  trie's look-ahead scores.

In a checkpoint it is the entry ``"lm"``: ``{"format": PACKED_LM_FORMAT, "vocab_size": the
tokenizer's, "kenlm": uint8, "words": uint8 (utf-8, newline-joined), "spellings", "offsets",
"unigram"}`` (tensors, as ``torch.save`` stores them compactly). Model files from before it carry
``"lm_arpa_xz"`` (the xz-compressed ARPA text): :func:`carried_language_model` returns those bytes
and :class:`asr.decode.lexicon.LexiconDecoder` converts them on every load (slowly);
``tools/export_model.py --lm`` writes the packed form.

Packing needs KenLM's ``build_binary`` program (:func:`find_build_binary`); neither PyPI nor
Debian's main section ships it, so ``tools/build_kenlm.py`` compiles it from KenLM's PyPI source.
Loading needs only flashlight-text, as decoding does.
"""
from __future__ import annotations

import contextlib
import io
import lzma
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence, Union

import torch
from torch import Tensor

__all__ = ["PACKED_LM_FORMAT", "PackedLM", "arpa_vocabulary", "build_kenlm_binary", "carried_language_model",
           "find_build_binary", "load_kenlm", "pack_language_model", "plain_arpa", "spell_words", "unigram_scores"]

PACKED_LM_FORMAT = 1
#: How an LM a checkpoint carries is named in messages.
EMBEDDED_LM_NAME = "the model's own language model"
#: ``build_binary`` arguments: the trie structure with 8-bit quantised probabilities and backoffs
#: (the bundled 3-gram: 8.7 MB, against 13.9 MB unquantised and 29 MB for the probing hash).
BUILD_BINARY_ARGS = ("-q", "8", "-b", "8", "trie")
#: Where ``tools/build_kenlm.py`` puts the program, relative to the repository root.
LOCAL_BUILD_BINARY = Path(".data/kenlm/bin/build_binary")


@dataclass(frozen=True)
class PackedLM:
    """A word LM ready for :class:`asr.decode.lexicon.LexiconDecoder` (fields: module docstring)."""

    kenlm: bytes
    words: list[str]
    spellings: Tensor  # int32 [sum of spelling lengths]
    offsets: Tensor  # int64 [len(words) + 1]
    unigram: Tensor  # float32 [len(words)]
    vocab_size: int  # the tokenizer's, checked against the model that uses it

    def spelling(self, i: int) -> list[int]:
        return self.spellings[int(self.offsets[i]):int(self.offsets[i + 1])].tolist()

    def to_checkpoint(self) -> dict:
        """The checkpoint entry ``"lm"``."""
        return {"format": PACKED_LM_FORMAT, "vocab_size": self.vocab_size,
                "kenlm": torch.frombuffer(bytearray(self.kenlm), dtype=torch.uint8),
                "words": torch.frombuffer(bytearray("\n".join(self.words).encode("utf-8")), dtype=torch.uint8),
                "spellings": self.spellings.to(torch.int16 if self.vocab_size <= 1 << 15 else torch.int32),
                "offsets": self.offsets.to(torch.int32 if len(self.spellings) < 1 << 31 else torch.int64),
                "unigram": self.unigram}

    @classmethod
    def from_checkpoint(cls, entry: Any) -> "PackedLM":
        """The LM of a checkpoint's ``"lm"`` entry; ValueError (one line) when it is malformed."""
        if not isinstance(entry, dict) or entry.get("format") != PACKED_LM_FORMAT:
            found = entry.get("format") if isinstance(entry, dict) else type(entry).__name__
            raise ValueError(f"unknown language-model format {found!r} (this version reads {PACKED_LM_FORMAT}); "
                             "update rwkv-asr or re-export the model")
        try:
            words = entry["words"].numpy().tobytes().decode("utf-8").split("\n")
            packed = cls(entry["kenlm"].numpy().tobytes(), words, entry["spellings"].to(torch.int32),
                         entry["offsets"].to(torch.int64), entry["unigram"].to(torch.float32), int(entry["vocab_size"]))
        except (KeyError, AttributeError, UnicodeDecodeError) as e:
            raise ValueError(f"the model's language model is damaged ({type(e).__name__}: {e})") from e
        n = len(words)
        offsets, unigram = packed.offsets, packed.unigram
        if offsets.shape != (n + 1,) or unigram.shape != (n,) or int(offsets[-1]) != len(packed.spellings):
            raise ValueError("the model's language model is damaged (its lexicon arrays disagree in length)")
        return packed

    @contextlib.contextmanager
    def kenlm_file(self) -> Iterator[Path]:
        """The KenLM binary as a temporary file (KenLM reads files only), deleted afterwards: KenLM
        has read it into memory by then."""
        fd, tmp = tempfile.mkstemp(suffix=".klm")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(self.kenlm)
            yield Path(tmp)
        finally:
            Path(tmp).unlink(missing_ok=True)


def arpa_vocabulary(path: str | Path) -> list[str]:
    """The words of an ARPA file's unigram section, without <s>, </s> and <unk>."""
    words: list[str] = []
    in_unigrams = False
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if line == "\\1-grams:":
                in_unigrams = True
                continue
            if in_unigrams:
                if not line:
                    continue
                if line.startswith("\\"):
                    break
                fields = line.split("\t") if "\t" in line else line.split()
                word = fields[1]
                if word not in ("<s>", "</s>", "<unk>"):
                    words.append(word)
    if not words:
        raise ValueError(f"{path}: no unigrams found (not an ARPA file?)")
    return words


@contextlib.contextmanager
def plain_arpa(lm: Path | bytes) -> Iterator[Path]:
    """A plain ARPA file for ``lm``: the file itself, or for an ``.xz`` file or xz-compressed bytes
    (an LM an older model file carries) a decompressed temporary copy, deleted afterwards
    (KenLM reads plain files only)."""
    if isinstance(lm, Path) and lm.suffix != ".xz":
        yield lm
        return
    name = lm if isinstance(lm, Path) else EMBEDDED_LM_NAME
    fd, tmp = tempfile.mkstemp(suffix=".arpa")
    try:
        try:
            with os.fdopen(fd, "wb") as out, lzma.open(lm if isinstance(lm, Path) else io.BytesIO(lm)) as src:
                shutil.copyfileobj(src, out, 1 << 20)
        except (lzma.LZMAError, EOFError) as e:  # damaged, or cut short
            raise ValueError(f"{name}: not a readable xz file ({e})") from e
        yield Path(tmp)
    finally:
        Path(tmp).unlink(missing_ok=True)


@contextlib.contextmanager
def _quiet_stderr() -> Iterator[None]:
    """Silence the process's stderr (file descriptor 2, where C++ libraries write) for a while."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def flashlight_modules() -> tuple[Any, Any]:
    """flashlight-text's decoder and dictionary modules (RuntimeError saying how to install them)."""
    try:
        from flashlight.lib.text import decoder, dictionary
    except ImportError as e:
        raise RuntimeError("language-model decoding needs flashlight-text: pip install flashlight-text "
                           '(or pip install -e ".[lm]")') from e
    return decoder, dictionary


def load_kenlm(path: Path, words: Sequence[str]) -> tuple[Any, Any]:
    """(flashlight KenLM, word dictionary) for a KenLM file (ARPA or binary) and the lexicon's
    words; the dictionary holds ``words`` at their indices and ``<unk>`` after them."""
    from flashlight.lib.text.decoder.kenlm import KenLM

    _, fl_dict = flashlight_modules()
    word_dict = fl_dict.Dictionary(list(words) + ["<unk>"])
    word_dict.set_default_index(len(words))
    try:
        with _quiet_stderr():  # KenLM draws a progress bar on stderr while it reads an ARPA file
            lm = KenLM(str(path), word_dict)
    except RuntimeError as e:  # KenLM's own message names the file and the line
        raise ValueError(f"not a language model KenLM reads: {' '.join(str(e).split())[:300]}") from e
    return lm, word_dict


def unigram_scores(kenlm_path: Path, words: Sequence[str], lm: Any = None) -> list[float]:
    """Each word's score from the empty context (natural log), as the lexicon trie's look-ahead."""
    if lm is None:
        lm, _ = load_kenlm(kenlm_path, words)
    start = lm.start(False)
    return [lm.score(start, i)[1] for i in range(len(words))]


def carried_language_model(ckpt: dict) -> Union[PackedLM, bytes, None]:
    """The word LM a checkpoint dict carries: a :class:`PackedLM` (entry ``"lm"``), the xz-compressed
    ARPA bytes of an older model file (entry ``"lm_arpa_xz"``), or None."""
    if ckpt.get("lm") is not None:
        return PackedLM.from_checkpoint(ckpt["lm"])
    old = ckpt.get("lm_arpa_xz")  # a uint8 tensor of the xz file's bytes
    return None if old is None else old.numpy().tobytes()


def find_build_binary(explicit: Optional[Union[str, Path]] = None) -> Path:
    """KenLM's ``build_binary``: ``explicit``, else ``$KENLM_BUILD_BINARY``, else ``build_binary`` on
    the PATH, else ``.data/kenlm/bin/build_binary`` under the repository or the working folder.
    FileNotFoundError (saying how to get it) when none exists."""
    if explicit:
        if Path(explicit).is_file() and os.access(explicit, os.X_OK):
            return Path(explicit)
        raise FileNotFoundError(f"KenLM's build_binary not found at {explicit}")
    candidates = [os.environ.get("KENLM_BUILD_BINARY"), shutil.which("build_binary"),
                  Path(__file__).resolve().parents[2] / LOCAL_BUILD_BINARY, LOCAL_BUILD_BINARY]
    for c in candidates:
        if c and Path(c).is_file() and os.access(c, os.X_OK):
            return Path(c)
    raise FileNotFoundError("packing a language model needs KenLM's build_binary: run `python tools/build_kenlm.py` "
                            "(compiles it into .data/kenlm/bin) or set KENLM_BUILD_BINARY")


def build_kenlm_binary(arpa: Path, out: Path, tool: Optional[Union[str, Path]] = None) -> None:
    """Convert a plain ARPA file to KenLM's binary format (``BUILD_BINARY_ARGS``); ValueError with
    KenLM's last message when it refuses the file."""
    cmd = [str(find_build_binary(tool)), *BUILD_BINARY_ARGS, str(arpa), str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0 or not out.is_file():
        lines = [ln for ln in (done.stderr + done.stdout).splitlines() if ln.strip() and set(ln.strip()) != {"*"}]
        raise ValueError(f"{arpa}: KenLM's build_binary failed: {lines[-1] if lines else done.returncode}")


def spell_words(words: Sequence[str], tokenizer: Any) -> tuple[list[str], list[list[int]]]:
    """The words that ``tokenizer`` (:class:`asr.tokenizer.Tokenizer`) spells without ``<unk>``,
    and their token ids: the lexicon (a word with an unknown piece could never be decoded)."""
    unk = tokenizer.unk_id
    kept, spellings = [], []
    for word in words:
        ids = tokenizer.encode(word, normalize=False)
        if ids and unk not in ids:
            kept.append(word)
            spellings.append(ids)
    return kept, spellings


def pack_language_model(arpa_path: Union[str, Path], tokenizer: Any,
                        tool: Optional[Union[str, Path]] = None) -> PackedLM:
    """Pack an ARPA file (plain or ``.xz``) for a model with ``tokenizer`` (module docstring).
    FileNotFoundError / ValueError (one line) for a missing or unreadable file or a missing tool."""
    arpa_path = Path(arpa_path)
    if not arpa_path.is_file():
        raise FileNotFoundError(f"language model not found: {arpa_path}")
    with plain_arpa(arpa_path) as arpa, tempfile.TemporaryDirectory() as tmp:
        words, spellings = spell_words(arpa_vocabulary(arpa), tokenizer)
        binary = Path(tmp) / "lm.klm"
        build_kenlm_binary(arpa, binary, tool)
        kenlm = binary.read_bytes()
    lengths = torch.tensor([len(s) for s in spellings], dtype=torch.int64)
    offsets = torch.cat([torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)])
    flat = torch.tensor([i for s in spellings for i in s], dtype=torch.int32)
    packed = PackedLM(kenlm, words, flat, offsets, torch.zeros(len(words)), int(tokenizer.vocab_size))
    with packed.kenlm_file() as klm:
        unigram = torch.tensor(unigram_scores(klm, words), dtype=torch.float32)
    return PackedLM(kenlm, words, flat, offsets, unigram, packed.vocab_size)
