"""CTC beam search over a word lexicon with an n-gram language model (shallow fusion), streaming.

The search is flashlight-text's C++ lexicon decoder (the one torchaudio's ``ctc_decoder`` wraps)
with a KenLM model. Hypotheses can only be words of the lexicon, so spelling errors of known words
get corrected (``judment`` -> ``judgment``) and words outside it cannot be produced at all: use it
where the language model covers the domain. The lexicon is the LM's own vocabulary, each word
spelled with the model's sentencepiece pieces.

The LM comes as an ARPA file (plain or ``.xz``, e.g. from ``tools/build_lm.py``), as the
:class:`asr.decode.packed_lm.PackedLM` a model file carries (KenLM's binary format and the
lexicon, ready to use: loads in tens of milliseconds), or as the xz-compressed ARPA bytes older
model files carry (parsed on every load: seconds).

The search runs frame by frame as the frames arrive (:class:`LexiconSearch`), so a stream pays for
it evenly and the end of a segment costs little. It sees only the frames that can change the
likeliest labelling (:func:`frames_to_search`): of each run of frames whose arg-max is the same
token, the first, and of each run of frames where blank has almost all the mass, the first.

Scores: the log-posterior of the hypothesis' best CTC path ``+ lm_weight * log p_lm + word_score *
words`` (natural logs), pruned to ``beam_size`` hypotheses per frame. ``lm_weight`` and
``word_score`` are tuned on the real dev set (``tools/tune_lm.py``; conf/lm/bundled.yaml).

flashlight-text is an optional dependency (``pip install -e ".[lm]"``).
"""
from __future__ import annotations

import contextlib
import gc
import math
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence, Union

import torch
from torch import Tensor

from asr.decode.greedy import IncrementalGreedyDecoder
from asr.decode.packed_lm import (
    EMBEDDED_LM_NAME,
    PackedLM,
    arpa_vocabulary,
    flashlight_modules,
    load_kenlm,
    plain_arpa,
    spell_words,
    unigram_scores,
)
from asr.frames import BLANK_ID
from asr.tokenizer import Tokenizer

__all__ = ["LexiconDecoder", "LexiconHypothesisDecoder", "LexiconSearch", "arpa_vocabulary", "frames_to_search",
           "plain_arpa", "unigram_scores"]

#: flashlight's decoder wants a word-separator ("silence") token. Sentencepiece marks word starts in
#: the pieces themselves, so the separator is an extra output class the model never emits (log-prob
#: SILENCE_LOG_PROB on every frame), and the blank stays CTC's blank only.
SILENCE = "<sil>"
SILENCE_LOG_PROB = -1e4
#: The LM's weight and the score added per word, tuned on the real dev set with the bundled LM
#: (conf/lm/bundled.yaml has the grid and the command).
DEFAULT_LM_WEIGHT = 2.0
DEFAULT_WORD_SCORE = 2.0
#: Tokens the search extends each hypothesis with per frame: the likeliest 16 of the frame's 256.
#: flashlight's default (every token) spent 6-10x the time with WER equal on the bundled model's
#: synthetic and real dev sets (+0.09 points on the synthetic test); 8 tokens cost +0.09 points on
#: synthetic dev.
DEFAULT_TOKEN_BEAM = 16
DEFAULT_BEAM_SIZE = 50
DEFAULT_BEAM_THRESHOLD = 25.0
#: A frame whose blank posterior is at least this, after a frame where it also was, is not searched
#: (:func:`frames_to_search`).
DEFAULT_BLANK_SKIP = 0.999
LanguageModel = Union[str, Path, bytes, PackedLM]


@contextlib.contextmanager
def _gc_paused() -> Iterator[None]:
    """No cyclic garbage collection for a while: building the lexicon makes ~100k small lists, and
    in a process holding a model each collection they trigger walks every tracked object (half a
    second in all for the bundled LM; 0.05 s without)."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def frames_to_search(best: Sequence[int], blank_lp: Sequence[float], prev_best: int, prev_blank: bool,
                     blank: int = BLANK_ID, blank_skip: Optional[float] = DEFAULT_BLANK_SKIP) -> list[int]:
    """Indices of the frames of a chunk the search sees, given each frame's arg-max token ``best``
    and blank log-posterior ``blank_lp``, and the previous chunk's last arg-max and whether its last
    frame was blank-dominated (``prev_best`` -1 and False at the start).

    A frame is skipped when it repeats the previous frame's non-blank arg-max: flashlight's
    lexicon search lets a frame that repeats the previous frame's token complete a word again (its
    CTC repeat rule guards only the word-internal step), so a piece held for a few frames became
    the same word two or three times ("the the cat sat sat"), and such frames add nothing to the
    likeliest labelling. With ``blank_skip`` it is also skipped when blank's posterior is at least
    ``blank_skip`` there and at the previous frame: every hypothesis then stays as it is, up to
    paths of probability under 1 - ``blank_skip`` per frame (the run's first frame is kept, so a
    token repeated across the run still counts twice)."""
    floor = math.log(blank_skip) if blank_skip else math.inf
    kept = []
    for t, (tok, lp) in enumerate(zip(best, blank_lp)):
        dominated = lp >= floor
        if not ((tok == prev_best and tok != blank) or (dominated and prev_blank)):
            kept.append(t)
        prev_best, prev_blank = tok, dominated
    return kept


class LexiconDecoder:
    """The lexicon and LM search's shared parts (trie, LM, options), built once per model; each
    utterance or stream segment runs its own :meth:`search`. ``__call__`` and
    :meth:`tokens_and_frames` decode one utterance's CTC log-probabilities [T, V].

    ``lm``: an ARPA file (plain or ``.xz``), a :class:`asr.decode.packed_lm.PackedLM` (what a model
    file carries), or the xz-compressed ARPA bytes an older model file carries.
    ``lm_weight`` / ``word_score``: None takes ``DEFAULT_LM_WEIGHT`` / ``DEFAULT_WORD_SCORE``.
    ``beam_size``: hypotheses kept per frame; ``beam_threshold``: and only those within this score
    of the best; ``beam_size_token``: tokens tried per frame (None: all; see
    ``DEFAULT_TOKEN_BEAM``); ``blank_skip``: see :func:`frames_to_search` (None: off)."""

    def __init__(
        self,
        tokenizer: Tokenizer,
        lm: LanguageModel,
        lm_weight: Optional[float] = None,
        word_score: Optional[float] = None,
        beam_size: int = DEFAULT_BEAM_SIZE,
        beam_threshold: float = DEFAULT_BEAM_THRESHOLD,
        beam_size_token: Optional[int] = DEFAULT_TOKEN_BEAM,
        blank_skip: Optional[float] = DEFAULT_BLANK_SKIP,
    ) -> None:
        fl, _ = flashlight_modules()
        if isinstance(lm, (str, Path)):
            lm = Path(lm)
            if not lm.is_file():
                raise FileNotFoundError(f"language model not found: {lm}")
        self.tokenizer = tokenizer
        self.blank = 0
        self.silence = tokenizer.vocab_size  # the extra class after the model's own
        self.blank_skip = blank_skip
        with _gc_paused():
            self.lm, self.word_dict, self.trie = self._build(tokenizer, lm)
        self.unk = self.word_dict.index_size() - 1  # load_kenlm puts <unk> last
        self.options = fl.LexiconDecoderOptions(
            beam_size=beam_size, beam_size_token=beam_size_token or tokenizer.vocab_size + 1,
            beam_threshold=beam_threshold, lm_weight=DEFAULT_LM_WEIGHT if lm_weight is None else lm_weight,
            word_score=DEFAULT_WORD_SCORE if word_score is None else word_score,
            unk_score=-math.inf, sil_score=0.0, log_add=False, criterion_type=fl.CriterionType.CTC)

    def _build(self, tokenizer: Tokenizer, lm: LanguageModel) -> tuple[Any, Any, Any]:
        """(KenLM, word dictionary, lexicon trie) for ``lm``."""
        fl, _ = flashlight_modules()
        if isinstance(lm, PackedLM):
            if lm.vocab_size != tokenizer.vocab_size:
                raise ValueError(f"{EMBEDDED_LM_NAME} was spelled for {lm.vocab_size} tokens, the model has "
                                 f"{tokenizer.vocab_size}")
            words = lm.words
            with lm.kenlm_file() as path:
                kenlm, word_dict = load_kenlm(path, words)
            offsets, flat = lm.offsets.tolist(), lm.spellings.tolist()
            spellings = [flat[a:b] for a, b in zip(offsets, offsets[1:])]
            scores = lm.unigram.tolist()
        else:
            with plain_arpa(lm) as arpa:
                words, spellings = spell_words(arpa_vocabulary(arpa), tokenizer)
                kenlm, word_dict = load_kenlm(arpa, words)
            scores = unigram_scores(Path(), words, kenlm)
        trie = fl.Trie(tokenizer.vocab_size + 1, self.silence)
        for i, (spelling, score) in enumerate(zip(spellings, scores)):
            trie.insert(spelling, i, score)
        trie.smear(fl.SmearingMode.MAX)
        return kenlm, word_dict, trie

    def search(self) -> "LexiconSearch":
        """A new streaming search (one utterance or segment) over this lexicon and LM."""
        return LexiconSearch(self)

    def __call__(self, log_probs: Tensor) -> str:
        """Words of the best hypothesis for one utterance's log-probabilities [T, V]."""
        return self.tokenizer.decode(self.tokens_and_frames(log_probs)[0])

    def tokens_and_frames(self, log_probs: Tensor) -> tuple[list[int], list[int]]:
        """The best hypothesis as token ids (the lexicon's spellings) and the frame where each fires."""
        search = self.search()
        search.accept(log_probs)
        return search.finish()


class LexiconSearch:
    """One streaming lexicon + LM search: :meth:`accept` [T, V] log-probs chunk by chunk (any
    cutting gives the same result as one call), then :meth:`finish` once. Frame numbers count
    from the search's first frame."""

    def __init__(self, lexicon: LexiconDecoder) -> None:
        fl, _ = flashlight_modules()
        self.lexicon = lexicon
        self._decoder = fl.LexiconDecoder(lexicon.options, lexicon.trie, lexicon.lm, lexicon.silence,
                                          lexicon.blank, lexicon.unk, [], False)
        self._decoder.decode_begin()
        self._searched: list[int] = []  # frame of each frame the search has seen
        self._prev_best, self._prev_blank = -1, False
        self.num_frames = 0
        self._result: Optional[tuple[list[int], list[int]]] = None

    def accept(self, log_probs: Tensor, best: Optional[list[int]] = None) -> None:
        """Search [T, V] log-probs (T may be 0); ``best``: their arg-max ids, if the caller has them."""
        if self._result is not None:
            raise RuntimeError("this search has finished; start another")
        T = log_probs.shape[0]
        if T == 0:
            return
        lp = log_probs.detach().to("cpu", torch.float32)
        best = lp.argmax(dim=-1).tolist() if best is None else best
        kept = frames_to_search(best, lp[:, self.lexicon.blank].tolist(), self._prev_best, self._prev_blank,
                                self.lexicon.blank, self.lexicon.blank_skip)
        blank_skip = self.lexicon.blank_skip
        self._prev_best = best[-1]
        self._prev_blank = bool(blank_skip) and float(lp[-1, self.lexicon.blank]) >= math.log(blank_skip)
        if kept:
            rows = lp[kept] if len(kept) < T else lp
            emissions = torch.cat([rows, rows.new_full((len(kept), 1), SILENCE_LOG_PROB)], dim=1).contiguous()
            self._decoder.decode_step(emissions.data_ptr(), emissions.shape[0], emissions.shape[1])
            self._searched.extend(self.num_frames + t for t in kept)
        self.num_frames += T

    def finish(self) -> tuple[list[int], list[int]]:
        """The best hypothesis: token ids (the lexicon's spellings) and the frame where each fires.
        Ends the search: later calls return the same, :meth:`accept` refuses more frames."""
        if self._result is None:
            self._result = self._best() if self._searched else ([], [])
        return list(self._result[0]), list(self._result[1])

    def _best(self) -> tuple[list[int], list[int]]:
        self._decoder.decode_end()
        hyps = self._decoder.get_all_final_hypothesis()
        if not hyps:
            return [], []
        tokens, frames = [], []
        prev = None
        last = len(self._searched) - 1
        for step, token in enumerate(hyps[0].tokens):
            # one entry per searched frame after the start state (step 0); a token fires where its run starts
            if token != prev and token not in (self.lexicon.blank, self.lexicon.silence, -1):
                tokens.append(token)
                frames.append(self._searched[min(max(step - 1, 0), last)])
            prev = token
        return tokens, frames


class LexiconHypothesisDecoder:
    """:class:`asr.decode.incremental.HypothesisDecoder`'s interface over a :class:`LexiconDecoder`,
    so file transcription and the streaming recognizer can use it: each segment's frames go through
    a :class:`LexiconSearch` as they arrive, final hypotheses come from it, partial ones (live
    display) from greedy decoding. Memory: the segment's log-probabilities (for the confidences of
    the final words; ~92 MB per hour of audio at 256 classes, a file is one segment) and the
    search's hypotheses."""

    is_greedy = False

    def __init__(self, lexicon: LexiconDecoder, blank: int = BLANK_ID) -> None:
        self.lexicon = lexicon
        self.blank = blank
        self.num_frames = 0
        self._segment_start = 0
        self.start_segment()

    @property
    def num_tokens(self) -> int:
        return 0

    def partial_key(self) -> int:
        """Partials are greedy, which only appends: the number of their tokens changes whenever
        they do (:meth:`asr.decode.incremental.HypothesisDecoder.partial_key`)."""
        return len(self._greedy.tokens)

    def accept(self, log_probs: Tensor, best: Optional[list[int]] = None) -> None:
        """Search [T, V] log-probs; ``best``: their arg-max ids, if the caller has them."""
        if log_probs.shape[0]:
            lp = log_probs.detach().float().cpu()
            best = lp.argmax(dim=-1).tolist() if best is None else best
            self._search.accept(lp, best)
            self._greedy.accept(lp, best)
            self._chunks.append(lp)
            self.num_frames += lp.shape[0]

    def hypothesis(self, final: bool = True) -> tuple[list[int], list[int], Optional[list[float]]]:
        if final:
            tokens, frames = self._search.finish()
            lp = torch.cat(self._chunks) if self._chunks else None
            logprobs = [float(lp[f, t]) for t, f in zip(tokens, frames)] if lp is not None else []
        else:
            tokens, frames = list(self._greedy.tokens), list(self._greedy.frames)
            logprobs = None
        return tokens, [f + self._segment_start for f in frames], logprobs

    def start_segment(self) -> None:
        self._chunks: list[Tensor] = []
        self._search = self.lexicon.search()
        self._greedy = IncrementalGreedyDecoder(self.blank)
        self._segment_start = self.num_frames
