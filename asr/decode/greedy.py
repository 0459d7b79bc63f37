"""CTC greedy (best-path) decoding, offline and incremental.

Greedy decoding takes the arg-max class per frame, collapses runs of the same class and drops
blanks. Each emitted token is reported with the frame where its run *starts* (the CTC "spike"),
which is what word timestamps are built from (:mod:`asr.decode.align`).

Arg-max is invariant to log-softmax, so raw logits, log-probabilities or probabilities all work.

The incremental decoder carries the previous frame's arg-max across chunks, so for any cutting of
the frames into chunks it emits exactly what the one-pass decoder emits, with the same absolute
frame indices. That makes streaming partial results consistent with batch transcription.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import Tensor

from asr.frames import BLANK_ID

__all__ = ["ctc_greedy", "GreedyCTCState", "IncrementalGreedyDecoder"]


def _emit_mask(best: Tensor, prev: Tensor, blank: int) -> Tensor:
    """Frames that start a new non-blank run: ``best[t] != best[t-1]`` and not blank.

    ``best`` is [..., T] arg-max ids, ``prev`` [..., 1] the id before frame 0 (blank at a stream
    start; a blank predecessor is exactly "no predecessor" for CTC collapsing).
    """
    shifted = torch.cat([prev, best[..., :-1]], dim=-1)
    return (best != shifted) & (best != blank)


def ctc_greedy(
    logits: Tensor, lengths: Tensor | list[int] | None = None, blank: int = BLANK_ID
) -> tuple[list[int], list[int]] | tuple[list[list[int]], list[list[int]]]:
    """Best-path CTC decoding.

    Args:
        logits: [T, V] or [B, T, V] scores (logits, log-probs or probs).
        lengths: valid frames per utterance for batched input (frames at and after the length are
            padding and ignored). Not allowed for 2-D input, where all T frames are valid.
        blank: the blank id (0 in this project).

    Returns:
        ``(tokens, frames)``: for [T, V] input two ``list[int]``; for [B, T, V] input two
        ``list[list[int]]`` (one list per utterance). ``frames[i]`` is the output-frame index at
        which ``tokens[i]`` fired (first frame of its run); frames are strictly increasing.
    """
    if logits.dim() == 2:
        if lengths is not None:
            raise ValueError("lengths is only meaningful for batched [B, T, V] input")
        toks, frs = ctc_greedy(logits.unsqueeze(0), None, blank)
        return toks[0], frs[0]  # type: ignore[return-value]
    if logits.dim() != 3:
        raise ValueError(f"expected [T, V] or [B, T, V] scores, got shape {tuple(logits.shape)}")
    B, T, _ = logits.shape
    best = logits.argmax(dim=-1)  # [B, T]
    prev = torch.full((B, 1), blank, dtype=best.dtype, device=best.device)
    mask = _emit_mask(best, prev, blank)
    if lengths is not None:
        lengths_t = torch.as_tensor(lengths, device=best.device).reshape(-1)
        if lengths_t.numel() != B:
            raise ValueError(f"lengths has {lengths_t.numel()} entries for a batch of {B}")
        if bool((lengths_t < 0).any()) or bool((lengths_t > T).any()):
            raise ValueError(f"lengths must be within [0, {T}], got {lengths_t.tolist()}")
        mask &= torch.arange(T, device=best.device)[None, :] < lengths_t[:, None]
    # One device->host transfer for the whole batch instead of per-frame .item() calls.
    best_l, mask_l = best.tolist(), mask.tolist()
    tokens: list[list[int]] = []
    frames: list[list[int]] = []
    for b in range(B):
        fr = [t for t, m in enumerate(mask_l[b]) if m]
        frames.append(fr)
        tokens.append([best_l[b][t] for t in fr])
    return tokens, frames


@dataclass
class GreedyCTCState:
    """What greedy decoding must remember between chunks: O(1) besides the emitted output.

    ``prev`` is the arg-max of the last frame seen (blank at the start), ``num_frames`` the number
    of frames consumed so far (the absolute index of the next frame).
    """

    prev: int
    num_frames: int = 0
    tokens: list[int] = field(default_factory=list)
    frames: list[int] = field(default_factory=list)


class IncrementalGreedyDecoder:
    """Streaming greedy decoder: feed [T, V] chunks of any size (T may be 0).

    ``accept`` returns the tokens newly emitted by the chunk as ``(token, frame)`` pairs with
    absolute frame indices; :attr:`tokens`/:attr:`frames` hold everything so far. The result after
    any chunking equals :func:`ctc_greedy` on the concatenated frames.
    """

    def __init__(self, blank: int = BLANK_ID) -> None:
        self.blank = blank
        self.state = GreedyCTCState(prev=blank)

    def reset(self) -> None:
        self.state = GreedyCTCState(prev=self.blank)

    @property
    def tokens(self) -> list[int]:
        return self.state.tokens

    @property
    def frames(self) -> list[int]:
        return self.state.frames

    @property
    def num_frames(self) -> int:
        return self.state.num_frames

    def accept(self, logits_chunk: Tensor, best: Optional[list[int]] = None) -> list[tuple[int, int]]:
        """``best``: the chunk's arg-max ids if the caller has them already (``step_batch`` takes
        them for all streams at once). Collapsing runs is plain Python: a live stream brings one
        or a few frames per call, where tensor ops cost more than the loop."""
        if logits_chunk.dim() == 3 and logits_chunk.shape[0] == 1:
            logits_chunk = logits_chunk[0]
        if logits_chunk.dim() != 2:
            raise ValueError(f"expected a [T, V] chunk, got shape {tuple(logits_chunk.shape)}")
        st = self.state
        T = logits_chunk.shape[0]
        if T == 0:
            return []
        best_l = logits_chunk.argmax(dim=-1).tolist() if best is None else best
        if len(best_l) != T:
            raise ValueError(f"{len(best_l)} arg-max ids for a chunk of {T} frames")
        out, prev = [], st.prev
        for t, tok in enumerate(best_l):
            if tok != prev and tok != self.blank:  # a new non-blank run starts: _emit_mask
                out.append((tok, st.num_frames + t))
            prev = tok
        for tok, fr in out:
            st.tokens.append(tok)
            st.frames.append(fr)
        st.prev = prev
        st.num_frames += T
        return out
