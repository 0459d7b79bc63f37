"""Word timestamps from CTC output.

Two ways, both returning :class:`Word` (word, start, end, confidence) with times in seconds:

* :func:`words_from_tokens` (cheap, streaming-friendly): uses the spike frame of each token from
  greedy or beam decoding. A word starts at its first piece's spike and ends one frame after its
  last piece's spike. CTC spikes are narrow, so ``end`` is a lower bound of the true word end;
  good for captions and seeking, no extra compute.
* :func:`forced_align_words` (more accurate spans): Viterbi forced alignment of the decoded token
  sequence against the frame log-probs (``torchaudio.functional.forced_align``, with a pure
  PyTorch fallback of the same algorithm), then ``merge_tokens`` to token spans. A word spans from
  its first piece's first frame to its last piece's last frame.

Words are split where a sentencepiece piece starts with ``▁``. A leading piece without ``▁`` (a
stream whose first token continues a word) still starts a word. Times are monotone and lie in
``[0, T * frame_shift]``; the model's output frame rate is 40 ms (x4 subsampling of 10 ms fbank).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol, Sequence

import torch
from torch import Tensor

from asr.frames import BLANK_ID, FRAME_SECONDS

__all__ = ["Word", "TokenSpan", "words_from_tokens", "forced_align", "forced_align_words"]


class _TokenizerLike(Protocol):
    def decode(self, ids: Sequence[int]) -> str: ...
    def is_word_start(self, i: int) -> bool: ...


@dataclass(frozen=True)
class Word:
    """A recognised word. ``confidence`` in [0, 1] (``None`` when no posteriors were given)."""

    word: str
    start: float
    end: float
    confidence: float | None = None


@dataclass(frozen=True)
class TokenSpan:
    """Frames ``[start, end)`` where ``token`` is aligned; ``score`` = mean posterior over them."""

    token: int
    start: int
    end: int
    score: float


def _group_words(tokens: Sequence[int], tokenizer: _TokenizerLike) -> list[list[int]]:
    """Indices of ``tokens`` grouped into words at ``▁`` pieces."""
    groups: list[list[int]] = []
    for i, tok in enumerate(tokens):
        if not groups or tokenizer.is_word_start(tok):
            groups.append([i])
        else:
            groups[-1].append(i)
    return groups


def _as_list(x: Sequence[int] | Tensor) -> list[int]:
    return [int(v) for v in (x.tolist() if isinstance(x, Tensor) else x)]


def words_from_tokens(
    tokens: Sequence[int] | Tensor,
    frames: Sequence[int] | Tensor,
    tokenizer: _TokenizerLike,
    frame_shift: float = FRAME_SECONDS,
    log_probs: Tensor | None = None,
    num_frames: int | None = None,
    frame_offset: int = 0,
    token_logprobs: Sequence[float] | None = None,
    max_time: float | None = None,
) -> list[Word]:
    """Words with times from token spikes (the output of greedy or beam decoding).

    Args:
        tokens, frames: emitted token ids and their spike frames (strictly increasing).
        tokenizer: gives word boundaries (``is_word_start``) and the word text (``decode``).
        frame_shift: seconds per output frame.
        log_probs: optional [T, V] log-probs; then ``confidence`` = exp(mean over the word's pieces
            of the log-posterior at their spike), i.e. the geometric mean of piece posteriors.
        num_frames: total frames T, to clamp ``end`` to ``T * frame_shift`` (taken from
            ``log_probs`` when given).
        frame_offset: subtracted from ``frames`` before indexing ``log_probs``; for streaming,
            where frames are absolute but ``log_probs`` holds only a window starting at that frame.
            Times always use the absolute frames.
        token_logprobs: each token's log-posterior at its spike, when the decoder kept them
            (:class:`asr.decode.incremental.HypothesisDecoder` does); same confidence as from
            ``log_probs``, without keeping the whole matrix. Used only when ``log_probs`` is None.
        max_time: clamp times to this (the audio's duration: the last encoder frame can reach a
            few ms past the last sample).
    """
    toks, frs = _as_list(tokens), _as_list(frames)
    if len(toks) != len(frs):
        raise ValueError(f"{len(toks)} tokens but {len(frs)} frames")
    if token_logprobs is not None and len(token_logprobs) != len(toks):
        raise ValueError(f"{len(toks)} tokens but {len(token_logprobs)} log-posteriors")
    if any(b <= a for a, b in zip(frs, frs[1:])) or (frs and frs[0] < 0):
        raise ValueError("token frames must be non-negative and strictly increasing")
    lp_rows: Tensor | None = None
    if log_probs is not None:
        if log_probs.dim() != 2:
            raise ValueError(f"log_probs must be [T, V], got {tuple(log_probs.shape)}")
        lp_rows = log_probs.detach().float().log_softmax(-1).cpu()  # no-op on log-probs
        if num_frames is None:
            num_frames = frame_offset + lp_rows.shape[0]
    limit = math.inf if num_frames is None else num_frames * frame_shift
    if max_time is not None:
        limit = min(limit, max_time)
    words: list[Word] = []
    for g in _group_words(toks, tokenizer):
        text = tokenizer.decode([toks[i] for i in g]).strip()
        if not text:  # e.g. a lone "▁" piece or <unk> that renders empty
            continue
        start = min(frs[g[0]] * frame_shift, limit)
        end = min((frs[g[-1]] + 1) * frame_shift, limit)
        conf: float | None = None
        if lp_rows is not None:
            idx_t = torch.tensor([frs[i] - frame_offset for i in g])
            if bool((idx_t < 0).any()) or bool((idx_t >= lp_rows.shape[0]).any()):
                raise ValueError("a token frame lies outside log_probs (check frame_offset)")
            vals = lp_rows[idx_t, torch.tensor([toks[i] for i in g])]
            conf = float(vals.mean().exp())
        elif token_logprobs is not None:
            conf = math.exp(sum(token_logprobs[i] for i in g) / len(g))
        words.append(Word(text, start, max(start, end), conf))
    return words


def _viterbi_align(log_probs: Tensor, targets: list[int], blank: int) -> tuple[list[int], list[float]]:
    """CTC Viterbi forced alignment in plain PyTorch (same recursion as torchaudio's CPU kernel).

    States are the blank-interleaved targets ``b y1 b y2 ... yL b``; vectorised over states, a loop
    over frames. Used when ``torchaudio.functional.forced_align`` is unavailable.
    """
    T = log_probs.shape[0]
    L = len(targets)
    S = 2 * L + 1
    ext = torch.full((S,), blank, dtype=torch.long)
    ext[1::2] = torch.tensor(targets, dtype=torch.long)
    # A skip from s-2 to s is allowed for a label that differs from the label two states back.
    skip = torch.zeros(S, dtype=torch.bool)
    if S > 2:
        skip[2:] = (ext[2:] != blank) & (ext[2:] != ext[:-2])
    emit = log_probs[:, ext].double()  # [T, S]
    neg = torch.tensor(float("-inf"), dtype=torch.float64)
    alpha = torch.full((S,), float("-inf"), dtype=torch.float64)
    alpha[0] = emit[0, 0]
    if S > 1:
        alpha[1] = emit[0, 1]
    back = torch.zeros((T, S), dtype=torch.long)  # 0: stay, 1: from s-1, 2: from s-2
    for t in range(1, T):
        stay = alpha
        one = torch.cat([neg.view(1), alpha[:-1]])
        two = torch.where(skip, torch.cat([neg.expand(2), alpha[:-2]]), neg)
        cand = torch.stack([stay, one, two])  # ties resolved toward "stay", first max
        best, arg = cand.max(dim=0)
        alpha = best + emit[t]
        back[t] = arg
    end_state = S - 1 if alpha[S - 1] > alpha[S - 2] else S - 2  # tie: end on the token, as torchaudio
    if not math.isfinite(float(alpha[end_state])):
        raise ValueError(f"cannot align {L} tokens to {T} frames (too few frames for the tokens and repeats)")
    path = [0] * T
    s = end_state
    for t in range(T - 1, -1, -1):
        path[t] = s
        s -= int(back[t, s])
    labels = ext[torch.tensor(path)]
    scores = emit[torch.arange(T), torch.tensor(path)]
    return labels.tolist(), scores.tolist()


def forced_align(
    log_probs: Tensor, tokens: Sequence[int] | Tensor, blank: int = BLANK_ID, backend: str = "auto"
) -> list[TokenSpan]:
    """Align ``tokens`` to [T, V] ``log_probs``; one :class:`TokenSpan` per token, in order.

    ``backend``: ``"torchaudio"``, ``"torch"`` (pure PyTorch Viterbi) or ``"auto"`` (torchaudio if
    it provides ``forced_align``, else the fallback; torchaudio has been retiring APIs).
    Raises ``ValueError`` when the frames cannot hold the tokens (T < L + number of repeats).
    """
    toks = _as_list(tokens)
    if log_probs.dim() != 2:
        raise ValueError(f"log_probs must be [T, V], got {tuple(log_probs.shape)}")
    if not toks:
        return []
    if blank in toks:
        raise ValueError("tokens to align must not contain the blank id")
    T = log_probs.shape[0]
    repeats = sum(1 for a, b in zip(toks, toks[1:]) if a == b)
    if T < len(toks) + repeats:
        raise ValueError(f"cannot align {len(toks)} tokens ({repeats} repeats) to {T} frames")
    lp = log_probs.detach().float().log_softmax(-1).cpu()
    labels: list[int]
    scores: list[float]
    use_ta = backend == "torchaudio"
    if backend == "auto":
        try:
            import torchaudio.functional as taf

            use_ta = hasattr(taf, "forced_align")
        except Exception:  # torchaudio missing or its native library fails to load
            use_ta = False
    elif backend not in ("torchaudio", "torch"):
        raise ValueError(f"unknown backend {backend!r}")
    if use_ta:
        import torchaudio.functional as taf

        ali, sc = taf.forced_align(lp.unsqueeze(0), torch.tensor([toks], dtype=torch.int32), blank=blank)
        labels, scores = ali[0].tolist(), sc[0].tolist()
    else:
        labels, scores = _viterbi_align(lp, toks, blank)
    # Merge runs into spans (torchaudio.functional.merge_tokens does the same; done here so both
    # backends share it). A repeated token is separated by a blank, so runs map 1:1 to tokens.
    spans: list[TokenSpan] = []
    t = 0
    while t < T:
        if labels[t] == blank:
            t += 1
            continue
        u = t
        while u + 1 < T and labels[u + 1] == labels[t]:
            u += 1
        probs = [math.exp(s) for s in scores[t : u + 1]]
        spans.append(TokenSpan(labels[t], t, u + 1, sum(probs) / len(probs)))
        t = u + 1
    if [s.token for s in spans] != toks:  # cannot happen for a valid alignment; guard the invariant
        raise RuntimeError("forced alignment returned a path that does not spell the tokens")
    return spans


def forced_align_words(
    log_probs: Tensor,
    tokens: Sequence[int] | Tensor,
    tokenizer: _TokenizerLike,
    frame_shift: float = FRAME_SECONDS,
    blank: int = BLANK_ID,
    backend: str = "auto",
) -> list[Word]:
    """Words with times from a forced alignment of ``tokens`` (e.g. the decoded hypothesis) to
    [T, V] ``log_probs``. ``confidence`` is the mean posterior of the aligned piece over all frames
    of the word's pieces (blank frames between pieces are not counted)."""
    spans = forced_align(log_probs, tokens, blank=blank, backend=backend)
    toks = [s.token for s in spans]
    words: list[Word] = []
    for g in _group_words(toks, tokenizer):
        text = tokenizer.decode([toks[i] for i in g]).strip()
        if not text:
            continue
        n = sum(spans[i].end - spans[i].start for i in g)
        conf = sum(spans[i].score * (spans[i].end - spans[i].start) for i in g) / n
        words.append(Word(text, spans[g[0]].start * frame_shift, spans[g[-1]].end * frame_shift, conf))
    return words
