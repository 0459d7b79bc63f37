"""CTC beam search over a word lexicon with an n-gram language model (shallow fusion).

The search is torchaudio's ``ctc_decoder``, which runs flashlight-text's C++ lexicon decoder with
a KenLM model (an ARPA file, e.g. from ``tools/build_lm.py``). Hypotheses can only be words of the
lexicon, so spelling errors of known words get corrected (``judment`` -> ``judgment``) and words
outside it cannot be produced at all: use it where the language model covers the domain. The
lexicon is the LM's own vocabulary, each word spelled with the model's sentencepiece pieces.

Scores: the log-posterior of the hypothesis' best CTC path ``+ lm_weight * log p_lm + word_score *
words`` (natural logs), pruned to ``beam_size`` hypotheses per frame. ``lm_weight`` and ``word_score`` are tuned on a dev set
(``asr-eval --lm``); the defaults come from the bundled model's synthetic dev set.

flashlight-text is an optional dependency (``pip install -e ".[lm]"``).
"""
from __future__ import annotations

import contextlib
import io
import lzma
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Iterator, Optional

import torch
from torch import Tensor

from asr.decode.greedy import ctc_greedy
from asr.frames import BLANK_ID
from asr.tokenizer import Tokenizer

__all__ = ["LexiconDecoder", "LexiconHypothesisDecoder", "arpa_vocabulary", "lm_bytes_to_carry"]

#: flashlight's decoder wants a word-separator ("silence") token. Sentencepiece marks word starts in
#: the pieces themselves, so the separator is an extra output class the model never emits (log-prob
#: SILENCE_LOG_PROB on every frame), and the blank stays CTC's blank only.
SILENCE = "<sil>"
SILENCE_LOG_PROB = -1e4
DEFAULT_LM_WEIGHT = 1.5
#: Tokens the search extends each hypothesis with per frame: the likeliest 16 of the frame's 256.
#: flashlight's default (every token) spent 6-10x the time for nothing: on the bundled model the
#: search took RTF 0.022 -> 0.0034 (synthetic test), 0.027 -> 0.0029 (synthetic dev), 0.017 ->
#: 0.0017 (real dev) on one thread, with WER equal on synthetic dev, real dev and misc, and +0.09
#: points on the synthetic test (21.79 -> 21.88 %). 8 tokens: +0.09 on synthetic dev.
DEFAULT_TOKEN_BEAM = 16
DEFAULT_WORD_SCORE = 1.0


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


#: How an LM a checkpoint carries is named in messages.
EMBEDDED_LM_NAME = "the model's own language model"


@contextlib.contextmanager
def _plain_arpa(lm: Path | bytes) -> Iterator[Path]:
    """A plain ARPA file for ``lm``: the file itself, or for an ``.xz`` file or xz-compressed bytes
    (an LM a checkpoint carries) a decompressed temporary copy, deleted afterwards.

    Why: KenLM reads plain ARPA files only, and the bundled model carries its LM xz-compressed
    (27 MB of text in 6.5 MB). Decompressing takes ~0.4 s; the decoder keeps the model in memory
    once built."""
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


def lm_bytes_to_carry(path: str | Path) -> bytes:
    """An ARPA file (plain or ``.xz``) as the xz-compressed bytes a checkpoint carries
    (``tools/export_model.py --lm``), after checking that it reads as an ARPA file (ValueError)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"language model not found: {path}")
    with _plain_arpa(path) as arpa:
        arpa_vocabulary(arpa)  # raises ValueError for a file that is not ARPA
        return path.read_bytes() if path.suffix == ".xz" else lzma.compress(arpa.read_bytes(), preset=9)


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


def _kept_frames(log_probs: Tensor) -> Tensor:
    """Indices of the frames the search sees: of each run of frames whose likeliest token is the
    same non-blank token, only the first.

    Why: flashlight's lexicon search lets a frame that repeats the previous frame's token complete
    a word again (its CTC repeat rule guards only the word-internal step), so a piece held for a
    few frames becomes the same word two or three times ("the the cat sat sat"). Frames that
    repeat the likeliest token add nothing to the likeliest labelling; dropping them removes the
    spurious words (tests/test_lexicon_decoder.py) and took the bundled model's synthetic dev WER
    from 16.8 % to 15.6 % (LM weight 1.2, word score 0.5)."""
    best = log_probs.argmax(dim=-1)
    keep = torch.ones_like(best, dtype=torch.bool)
    keep[1:] = (best[1:] != best[:-1]) | (best[1:] == 0)
    return keep.nonzero().squeeze(1)


class LexiconDecoder:
    """Decode CTC log-probabilities [T, V] of one utterance to words with a lexicon and an LM.

    ``lm``: an ARPA file (plain or ``.xz``), or the xz-compressed ARPA bytes a checkpoint carries
    (:class:`asr.model_file.InferenceParts`). ``lm_weight`` / ``word_score``: None takes
    ``DEFAULT_LM_WEIGHT`` / ``DEFAULT_WORD_SCORE``. ``beam_size``: hypotheses kept per frame;
    ``beam_threshold``: and only those within this score of the best; ``beam_size_token``: tokens
    tried per frame (None: all; see ``DEFAULT_TOKEN_BEAM``)."""

    def __init__(
        self,
        tokenizer: Tokenizer,
        lm: str | Path | bytes,
        lm_weight: Optional[float] = None,
        word_score: Optional[float] = None,
        beam_size: int = 50,
        beam_threshold: float = 25.0,
        beam_size_token: Optional[int] = DEFAULT_TOKEN_BEAM,
    ) -> None:
        try:  # torchaudio raises RuntimeError here when flashlight-text is missing
            from torchaudio.models.decoder import ctc_decoder
        except (ImportError, RuntimeError) as e:
            raise RuntimeError("language-model decoding needs flashlight-text: pip install flashlight-text "
                               '(or pip install -e ".[lm]")') from e
        if not isinstance(lm, bytes):
            lm = Path(lm)
            if not lm.is_file():
                raise FileNotFoundError(f"language model not found: {lm}")
        self.tokenizer = tokenizer
        tokens = [tokenizer.id_to_piece(i) for i in range(tokenizer.vocab_size)] + [SILENCE]
        blank = tokens[0]
        pieces_known = set(tokens[1:-1])
        with _plain_arpa(lm) as arpa:
            # flashlight reads the lexicon from a file, once, while the decoder is built
            with tempfile.NamedTemporaryFile("w", suffix=".lexicon", delete=False, encoding="utf-8") as f:
                for word in arpa_vocabulary(arpa):
                    pieces = tokenizer.encode_as_pieces(word, normalize=False)
                    if pieces and all(p in pieces_known for p in pieces):
                        f.write(f"{word}\t{' '.join(pieces)}\n")
            try:
                with _quiet_stderr():  # KenLM draws a progress bar on stderr while it reads an ARPA file
                    self._decoder = ctc_decoder(
                        lexicon=f.name, tokens=tokens, lm=str(arpa), nbest=1, beam_size=beam_size,
                        beam_threshold=beam_threshold, beam_size_token=beam_size_token,
                        lm_weight=DEFAULT_LM_WEIGHT if lm_weight is None else lm_weight,
                        word_score=DEFAULT_WORD_SCORE if word_score is None else word_score,
                        blank_token=blank, sil_token=SILENCE, unk_word="<unk>",
                    )
            finally:
                Path(f.name).unlink(missing_ok=True)

    def __call__(self, log_probs: Tensor) -> str:
        """Words of the best hypothesis for one utterance's log-probabilities [T, V]."""
        return self.tokenizer.decode(self.tokens_and_frames(log_probs)[0])

    def tokens_and_frames(self, log_probs: Tensor) -> tuple[list[int], list[int]]:
        """The best hypothesis as token ids (the lexicon's spellings) and the frame where each fires."""
        if log_probs.shape[0] == 0:
            return [], []
        log_probs = log_probs.detach().float().cpu()
        kept = _kept_frames(log_probs)
        silence = log_probs.new_full((len(kept), 1), SILENCE_LOG_PROB)
        emissions = torch.cat([log_probs[kept], silence], dim=1).unsqueeze(0).contiguous()
        hyps = self._decoder(emissions)
        if not hyps or not hyps[0]:
            return [], []
        tokens, frames = [], []
        silence_id = log_probs.shape[1]
        for token, step in zip(hyps[0][0].tokens.tolist(), hyps[0][0].timesteps.tolist()):
            if token in (0, silence_id):
                continue
            tokens.append(token)
            # flashlight counts time steps from 1 (step 0 is its start state)
            frames.append(int(kept[min(max(step - 1, 0), len(kept) - 1)]))
        return tokens, frames


class LexiconHypothesisDecoder:
    """:class:`asr.decode.incremental.HypothesisDecoder`'s interface over a :class:`LexiconDecoder`,
    so file transcription and the streaming recognizer can use it: frames are collected per
    segment, final hypotheses come from the lexicon and LM search over the whole segment, partial
    ones (live display) from greedy decoding of the frames so far. Memory: the segment's
    log-probabilities, ~92 MB per hour of audio at 256 classes (a file is one segment)."""

    is_greedy = False

    def __init__(self, lexicon: LexiconDecoder, blank: int = BLANK_ID) -> None:
        self.lexicon = lexicon
        self.blank = blank
        self.num_frames = 0
        self._segment_start = 0
        self._chunks: list[Tensor] = []

    @property
    def num_tokens(self) -> int:
        return 0

    def accept(self, log_probs: Tensor, best: Optional[list[int]] = None) -> None:
        """Keep [T, V] log-probs for the search; ``best`` (their arg-max ids, which the streaming
        recognizer hands every decoder) is not needed here."""
        if log_probs.shape[0]:
            self._chunks.append(log_probs.detach().float().cpu())
            self.num_frames += log_probs.shape[0]

    def hypothesis(self, final: bool = True) -> tuple[list[int], list[int], Optional[list[float]]]:
        if not self._chunks:
            return [], [], [] if final else None
        lp = torch.cat(self._chunks)
        if final:
            tokens, frames = self.lexicon.tokens_and_frames(lp)
            logprobs = [float(lp[f, t]) for t, f in zip(tokens, frames)]
        else:
            tokens, frames = ctc_greedy(lp, blank=self.blank)
            logprobs = None
        return tokens, [f + self._segment_start for f in frames], logprobs

    def start_segment(self) -> None:
        self._chunks = []
        self._segment_start = self.num_frames
