"""CTC decoding: greedy and prefix beam search (offline and streaming) and word timestamps.

Blank is :data:`asr.frames.BLANK_ID` (0) throughout. Decoders take [T, V] (or [B, T, V] for
greedy) logits or log-probs and return token ids with the frame where each token fired; the align
module turns those into words with start/end times in seconds.
"""
from asr.decode.align import TokenSpan, Word, forced_align, forced_align_words, words_from_tokens
from asr.decode.beam import BeamHypothesis, CTCPrefixBeamSearch, Hotwords, ctc_prefix_beam_search
from asr.decode.greedy import GreedyCTCState, IncrementalGreedyDecoder, ctc_greedy

__all__ = [
    "BeamHypothesis",
    "CTCPrefixBeamSearch",
    "GreedyCTCState",
    "Hotwords",
    "IncrementalGreedyDecoder",
    "TokenSpan",
    "Word",
    "ctc_greedy",
    "ctc_prefix_beam_search",
    "forced_align",
    "forced_align_words",
    "words_from_tokens",
]
