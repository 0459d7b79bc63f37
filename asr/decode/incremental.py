"""One incremental CTC decoder for every path: file transcription and live streams.

:class:`HypothesisDecoder` takes log-probs chunk by chunk (any cutting gives the same result as one
call) and keeps what word times and confidences need besides the tokens: each emitted token's spike
frame and its log-posterior there. Greedy knows the log-posterior when a token fires; beam search only
knows its final hypothesis at the end, so we keep, per frame, the log-probs of the ``top_k`` non-blank
candidates the search may extend with (a token can only fire at a frame where it was a candidate).

A stream cut into segments (endpointing) calls :meth:`HypothesisDecoder.start_segment`: the
hypothesis starts afresh while frame numbers keep counting from the start of the stream, so memory
stays bounded however long the stream runs.
"""
from __future__ import annotations

import math
from typing import Any, Mapping, Optional, Union

import torch
from torch import Tensor

from asr.decode.beam import CTCPrefixBeamSearch, Hotwords
from asr.decode.greedy import IncrementalGreedyDecoder
from asr.frames import BLANK_ID

Hypothesis = tuple[list[int], list[int], Optional[list[float]]]  # tokens, absolute frames, log-posteriors


class HypothesisDecoder:
    """Greedy (``beam_size == 1`` and no hotwords) or CTC prefix beam search over chunks of log-probs."""

    def __init__(
        self,
        beam_size: int = 1,
        hotwords: Union[Hotwords, Mapping[str, float], None] = None,
        tokenizer: Any = None,
        blank: int = BLANK_ID,
    ) -> None:
        if beam_size < 1:
            raise ValueError(f"beam_size must be >= 1, got {beam_size}")
        self.blank = blank
        self.num_frames = 0  # frames accepted since the start of the stream
        self._segment_start = 0  # absolute frame where the current hypothesis starts
        if beam_size == 1 and not hotwords:
            self._greedy: Optional[IncrementalGreedyDecoder] = IncrementalGreedyDecoder(blank)
            self._beam: Optional[CTCPrefixBeamSearch] = None
        else:
            self._greedy = None
            self._beam = CTCPrefixBeamSearch(beam_size, blank=blank, hotwords=hotwords, tokenizer=tokenizer)
        self._tokens: list[int] = []
        self._frames: list[int] = []
        self._logprobs: list[float] = []
        self._cand_vals: list[Tensor] = []
        self._cand_idx: list[Tensor] = []

    @property
    def is_greedy(self) -> bool:
        return self._greedy is not None

    @property
    def num_tokens(self) -> int:
        """Tokens emitted so far in this segment (greedy; beam hypotheses can still change)."""
        return len(self._tokens)

    def partial_key(self) -> Optional[int]:
        """A value that changes whenever the partial hypothesis (``hypothesis(final=False)``)
        of this segment may have changed, or None when that is not known (beam search revises
        its hypotheses on any frame): greedy only appends, so its token count is such a key."""
        return len(self._tokens) if self._greedy is not None else None

    def accept(self, log_probs: Tensor, best: Optional[list[int]] = None) -> None:
        """Consume [T, V] log-probs of the next T frames (T may be 0); ``best``: their arg-max
        ids, if the caller has them (greedy only uses them)."""
        if log_probs.shape[0] == 0:
            return
        lp = log_probs.detach().float().cpu()
        if self._greedy is not None:
            for tok, frame in self._greedy.accept(lp, best):
                self._tokens.append(tok)
                self._frames.append(frame)
                self._logprobs.append(float(lp[frame - self.num_frames, tok]))
            # The greedy decoder's own lists would grow for the whole stream; ours are per segment.
            self._greedy.state.tokens.clear()
            self._greedy.state.frames.clear()
        else:
            assert self._beam is not None
            self._beam.accept(lp)
            masked = lp.clone()
            masked[:, self.blank] = -math.inf  # blank never fires as a token
            top_k = self._beam.top_k
            k = lp.shape[1] - 1 if top_k is None else min(top_k, lp.shape[1] - 1)
            vals, idx = masked.topk(k, dim=-1)
            self._cand_vals.append(vals)
            self._cand_idx.append(idx.to(torch.int32))
        self.num_frames += lp.shape[0]

    def hypothesis(self, final: bool = True) -> Hypothesis:
        """Tokens, absolute spike frames and log-posteriors of the current segment's best hypothesis.

        For a beam search that is not final (a partial result) the log-posteriors are ``None``: the
        hypothesis may still change, and looking them up costs more than a partial is worth."""
        if self._greedy is not None:
            return list(self._tokens), list(self._frames), list(self._logprobs)
        assert self._beam is not None
        best = (self._beam.finalize() if final else self._beam.hypotheses())[0]
        if not best.tokens:
            return [], [], [] if final else None
        frames = [f + self._segment_start for f in best.frames]
        if not final:
            return list(best.tokens), frames, None
        vals, idx = torch.cat(self._cand_vals), torch.cat(self._cand_idx)
        fr = torch.tensor(best.frames)
        hit = idx[fr] == torch.tensor(best.tokens, dtype=torch.int32)[:, None]  # [n_tokens, k]
        if not bool(hit.any(dim=1).all()):  # cannot happen: a token fires only as a candidate
            raise RuntimeError("beam search emitted a token that was not a candidate at its frame")
        return list(best.tokens), frames, vals[fr][hit].tolist()

    def start_segment(self) -> None:
        """Begin a new hypothesis at the current frame (after an endpoint); frame numbers go on."""
        self._tokens, self._frames, self._logprobs = [], [], []
        if self._beam is not None:
            self._beam.reset()
            self._cand_vals, self._cand_idx = [], []
        self._segment_start = self.num_frames


def hypothesis_decoder(
    beam_size: int = 1,
    hotwords: Union[Hotwords, Mapping[str, float], None] = None,
    tokenizer: Any = None,
    blank: int = BLANK_ID,
    lexicon: Any = None,
) -> Any:
    """The decoder a segment uses: :class:`HypothesisDecoder`, or with a ``lexicon``
    (:class:`asr.decode.lexicon.LexiconDecoder`) the LM search's
    :class:`asr.decode.lexicon.LexiconHypothesisDecoder`, which brings its own beam search."""
    if lexicon is None:
        return HypothesisDecoder(beam_size, hotwords, tokenizer, blank)
    if beam_size > 1 or hotwords:
        raise ValueError("a language model (lexicon) runs its own beam search: leave out beam_size and hotwords")
    from asr.decode.lexicon import LexiconHypothesisDecoder  # lazy: flashlight-text is optional

    return LexiconHypothesisDecoder(lexicon, blank)
