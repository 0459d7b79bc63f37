"""CTC beam search over a word lexicon with an n-gram language model (shallow fusion).

The search is torchaudio's ``ctc_decoder``, which runs flashlight-text's C++ lexicon decoder with
a KenLM model (an ARPA file, e.g. from ``tools/build_lm.py``). Hypotheses can only be words of the
lexicon, so spelling errors of known words get corrected (``judment`` -> ``judgment``) and words
outside it cannot be produced at all: use it where the language model covers the domain. The
lexicon is the LM's own vocabulary, each word spelled with the model's sentencepiece pieces.

Scores: ``log p_ctc + lm_weight * log p_lm + word_score * words`` (natural logs), pruned to
``beam_size`` hypotheses per frame. ``lm_weight`` and ``word_score`` are tuned on a dev set
(``asr-eval --lm``); the defaults come from the bundled model's synthetic dev set.

flashlight-text is an optional dependency (``pip install -e ".[lm]"``).
"""
from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Optional

import torch
from torch import Tensor

from asr.tokenizer import Tokenizer

__all__ = ["LexiconDecoder", "arpa_vocabulary"]

#: flashlight's decoder wants a word-separator ("silence") token. Sentencepiece marks word starts in
#: the pieces themselves, so the separator is an extra output class the model never emits (log-prob
#: SILENCE_LOG_PROB on every frame). Using the blank as the separator instead let repeated frames
#: of one piece start the same word again ("the the cat sat sat").
SILENCE = "<sil>"
SILENCE_LOG_PROB = -1e4
DEFAULT_LM_WEIGHT = 1.5
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


def _drop_repeated_frames(log_probs: Tensor) -> Tensor:
    """Keep one frame of each run of frames whose likeliest token is the same non-blank token.

    Why: flashlight's lexicon search lets a frame that repeats the previous frame's token complete
    a word again (its CTC repeat rule guards only the word-internal step), so a piece held for a
    few frames becomes the same word two or three times ("the the cat sat sat"). Frames that
    repeat the likeliest token add nothing to the likeliest labelling; dropping them removes the
    spurious words (tests/test_lexicon_decoder.py) and took the bundled model's synthetic dev WER
    from 16.8 % to 15.6 % (LM weight 1.2, word score 0.5)."""
    if log_probs.shape[0] < 2:
        return log_probs
    best = log_probs.argmax(dim=-1)
    keep = torch.ones_like(best, dtype=torch.bool)
    keep[1:] = (best[1:] != best[:-1]) | (best[1:] == 0)
    return log_probs[keep]


class LexiconDecoder:
    """Decode CTC log-probabilities [T, V] of one utterance to words with a lexicon and an LM."""

    def __init__(
        self,
        tokenizer: Tokenizer,
        lm_path: str | Path,
        lm_weight: float = DEFAULT_LM_WEIGHT,
        word_score: float = DEFAULT_WORD_SCORE,
        beam_size: int = 50,
        beam_threshold: float = 25.0,
    ) -> None:
        try:
            from torchaudio.models.decoder import ctc_decoder
        except ImportError as e:  # pragma: no cover - torchaudio is a hard dependency
            raise RuntimeError(f"language-model decoding needs torchaudio's ctc_decoder: {e}") from e
        lm_path = Path(lm_path)
        if not lm_path.is_file():
            raise FileNotFoundError(f"language model not found: {lm_path}")
        self.tokenizer = tokenizer
        tokens = [tokenizer.id_to_piece(i) for i in range(tokenizer.vocab_size)] + [SILENCE]
        blank = tokens[0]
        self._lexicon_file = tempfile.NamedTemporaryFile("w", suffix=".lexicon", delete=False, encoding="utf-8")
        with self._lexicon_file as f:
            for word in arpa_vocabulary(lm_path):
                pieces = tokenizer.encode_as_pieces(word, normalize=False)
                if pieces and all(p in tokens[1:-1] for p in pieces):
                    f.write(f"{word}\t{' '.join(pieces)}\n")
        try:
            self._decoder = ctc_decoder(
                lexicon=self._lexicon_file.name, tokens=tokens, lm=str(lm_path), nbest=1, beam_size=beam_size,
                beam_threshold=beam_threshold, lm_weight=lm_weight, word_score=word_score,
                blank_token=blank, sil_token=SILENCE, unk_word="<unk>",
            )
        except RuntimeError as e:
            if "flashlight" in str(e):
                raise RuntimeError("language-model decoding needs flashlight-text: pip install flashlight-text") from e
            raise

    def __call__(self, log_probs: Tensor) -> str:
        """Words of the best hypothesis for one utterance's log-probabilities [T, V]."""
        if log_probs.shape[0] == 0:
            return ""
        log_probs = _drop_repeated_frames(log_probs.detach().float().cpu())
        silence = log_probs.new_full((log_probs.shape[0], 1), SILENCE_LOG_PROB)
        emissions = torch.cat([log_probs, silence], dim=1).unsqueeze(0).contiguous()
        hyps = self._decoder(emissions)
        return " ".join(hyps[0][0].words) if hyps and hyps[0] else ""

    def close(self) -> None:
        Path(self._lexicon_file.name).unlink(missing_ok=True)

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass


def load_lexicon_decoder(tokenizer: Tokenizer, lm_path: Optional[str | Path], **kwargs) -> Optional[LexiconDecoder]:
    """A :class:`LexiconDecoder`, or None without a language model."""
    return None if lm_path is None else LexiconDecoder(tokenizer, lm_path, **kwargs)
