"""CTC decoding: greedy, prefix beam search (offline/streaming, hotwords) and word timestamps."""
from __future__ import annotations

import itertools
import math
import random

import pytest
import torch
import torch.nn.functional as F

from asr.decode import (
    CTCPrefixBeamSearch,
    Hotwords,
    IncrementalGreedyDecoder,
    Word,
    ctc_greedy,
    ctc_prefix_beam_search,
    forced_align,
    forced_align_words,
    words_from_tokens,
)
from asr.tokenizer import Tokenizer

SENTENCES = [
    "the cat sat on the mat",
    "the quick brown fox jumps over the lazy dog",
    "one two three four five six seven eight nine zero",
    "go forward ten meters",
    "ten of clubs and the queen of hearts",
    "montreal forced aligner",
    "he turned sharply and faced gregson across the table",
    "they were three hundred yards apart",
    "it's the aurora borealis",
    "catalog of cats and a category of things",
]


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.train(SENTENCES, None, vocab_size=64)


def random_chunks(T: int, rng: random.Random) -> list[int]:
    """Cut points of [0, T] into chunks of random sizes, zero-length chunks included."""
    cuts = sorted(rng.randint(0, T) for _ in range(rng.randint(0, 6)))
    return [0] + cuts + [T]


def peaky_log_probs(T: int, V: int, gen: torch.Generator, blank_bias: float = 1.0) -> torch.Tensor:
    """Random sequences of confident frames (one class has ~all the mass), CTC-like."""
    labels = torch.randint(0, V, (T,), generator=gen)
    labels[torch.rand(T, generator=gen) < 0.5 * blank_bias] = 0
    logits = torch.randn(T, V, generator=gen) * 0.5
    logits[torch.arange(T), labels] += 8.0
    return logits.log_softmax(-1)


def reference_greedy(logits: torch.Tensor, blank: int = 0) -> tuple[list[int], list[int]]:
    """Textbook best path: group runs of the arg-max, drop blank runs."""
    best = logits.argmax(-1).tolist()
    toks, frames, t = [], [], 0
    for lab, run in itertools.groupby(best):
        n = len(list(run))
        if lab != blank:
            toks.append(lab)
            frames.append(t)
        t += n
    return toks, frames


# =========================================================================== greedy
def test_greedy_hand_example() -> None:
    best = [0, 3, 3, 0, 3, 5, 5, 0, 0, 2]
    logits = F.one_hot(torch.tensor(best), 6).float()
    toks, frames = ctc_greedy(logits)
    assert toks == [3, 3, 5, 2]
    assert frames == [1, 4, 5, 9]
    # blank id is a parameter: with blank=3, the 3s are blanks and 0s are tokens
    toks3, frames3 = ctc_greedy(logits, blank=3)
    assert toks3 == [0, 0, 5, 0, 2] and frames3 == [0, 3, 5, 7, 9]


def test_greedy_matches_reference_and_batch_lengths() -> None:
    gen = torch.Generator().manual_seed(0)
    B, T, V = 5, 40, 7
    logits = torch.randn(B, T, V, generator=gen)
    logits[..., 0] += 1.0  # some blank runs
    lengths = torch.tensor([40, 33, 1, 0, 17])
    toks, frames = ctc_greedy(logits, lengths)
    for b in range(B):
        ref = reference_greedy(logits[b, : lengths[b]])
        assert (toks[b], frames[b]) == ref
        assert ctc_greedy(logits[b, : lengths[b]]) == ref  # 2-D form agrees
    # padding content after the length must not matter
    garbage = logits.clone()
    garbage[1, 33:] = torch.randn(7, V, generator=gen) * 10
    assert ctc_greedy(garbage, lengths) == (toks, frames)
    with pytest.raises(ValueError):
        ctc_greedy(logits[0], lengths=[40])
    with pytest.raises(ValueError):
        ctc_greedy(logits, torch.tensor([41, 1, 1, 1, 1]))


def test_incremental_greedy_equals_one_pass_for_random_chunkings() -> None:
    rng = random.Random(1)
    gen = torch.Generator().manual_seed(1)
    for _ in range(30):
        T = rng.randint(0, 60)
        logits = peaky_log_probs(T, 6, gen) if rng.random() < 0.5 else torch.randn(T, 6, generator=gen)
        want = ctc_greedy(logits)
        dec = IncrementalGreedyDecoder()
        emitted = []
        cuts = random_chunks(T, rng)
        for a, b in zip(cuts, cuts[1:]):
            emitted += dec.accept(logits[a:b])
        assert (dec.tokens, dec.frames) == want
        assert emitted == list(zip(*want))
        assert dec.num_frames == T
        dec.reset()
        assert dec.tokens == [] and dec.num_frames == 0


def test_incremental_greedy_carries_previous_frame() -> None:
    """A run of the same token across a chunk boundary must be emitted once."""
    logits = F.one_hot(torch.tensor([0, 4, 4, 4, 0, 4]), 5).float()
    dec = IncrementalGreedyDecoder()
    assert dec.accept(logits[:2]) == [(4, 1)]
    assert dec.accept(logits[2:4]) == []
    assert dec.accept(logits[4:]) == [(4, 5)]


# =========================================================================== beam search
def brute_force_labellings(log_probs: torch.Tensor, blank: int = 0) -> dict[tuple[int, ...], float]:
    """Exact log P(labelling) by enumerating every path (tiny T and V only)."""
    T, V = log_probs.shape
    probs: dict[tuple[int, ...], float] = {}
    lp = log_probs.double()
    for path in itertools.product(range(V), repeat=T):
        lab = tuple(k for k, _ in itertools.groupby(path) if k != blank)
        p = float(lp[torch.arange(T), torch.tensor(path)].sum().exp())
        probs[lab] = probs.get(lab, 0.0) + p
    return {k: math.log(v) for k, v in probs.items()}


def ctc_log_likelihood(log_probs: torch.Tensor, tokens: list[int]) -> float:
    T = log_probs.shape[0]
    loss = F.ctc_loss(
        log_probs.double().unsqueeze(1), torch.tensor([tokens], dtype=torch.long),
        torch.tensor([T]), torch.tensor([len(tokens)]), blank=0, reduction="sum",
    )
    return -float(loss)


def test_beam_finds_best_labelling_where_greedy_fails() -> None:
    """Two frames, P(blank)=0.6, P(a)=0.4 each: best path is blank-blank ("", 0.36), but "a"
    collects a-a, a-blank, blank-a = 0.64."""
    lp = torch.tensor([[0.6, 0.4], [0.6, 0.4]], dtype=torch.float64).log()
    assert ctc_greedy(lp)[0] == []
    hyps = ctc_prefix_beam_search(lp, beam_size=4)
    assert hyps[0][0] == [1]
    assert hyps[0][1] == pytest.approx(math.log(0.64), abs=1e-12)
    assert hyps[1][0] == [] and hyps[1][1] == pytest.approx(math.log(0.36), abs=1e-12)


def test_beam_scores_are_exact_ctc_likelihoods() -> None:
    gen = torch.Generator().manual_seed(2)
    for T, V in [(4, 3), (5, 3), (3, 4)]:
        lp = torch.randn(T, V, generator=gen, dtype=torch.float64).log_softmax(-1)
        exact = brute_force_labellings(lp)
        hyps = ctc_prefix_beam_search(lp, beam_size=10_000, top_k=None)  # no pruning at all
        assert len(hyps) == len(exact)
        for tokens, score in hyps:
            assert score == pytest.approx(exact[tuple(tokens)], abs=1e-9)
            assert score == pytest.approx(ctc_log_likelihood(lp, tokens), abs=1e-9)
        assert tuple(hyps[0][0]) == max(exact, key=exact.get)
        # the beam sums over all paths, so the probabilities of all labellings sum to one
        assert sum(math.exp(s) for _, s in hyps) == pytest.approx(1.0, abs=1e-9)


def test_beam_size_one_equals_greedy_on_peaky() -> None:
    gen = torch.Generator().manual_seed(3)
    for _ in range(20):
        lp = peaky_log_probs(50, 9, gen)
        toks, frames = ctc_greedy(lp)
        search = CTCPrefixBeamSearch(beam_size=1)
        search.accept(lp)
        best = search.best
        assert best.tokens == toks and best.frames == frames
        assert ctc_prefix_beam_search(lp, beam_size=1, top_k=2)[0][0] == toks
        # a wider beam agrees on peaky input too, and reports the same spike frames
        wide = CTCPrefixBeamSearch(beam_size=8, top_k=4)
        wide.accept(lp)
        assert wide.best.tokens == toks and wide.best.frames == frames


def test_top_k_pruning_keeps_result_on_peaky() -> None:
    gen = torch.Generator().manual_seed(4)
    lp = peaky_log_probs(60, 30, gen)
    full = ctc_prefix_beam_search(lp, beam_size=5, top_k=None)
    pruned = ctc_prefix_beam_search(lp, beam_size=5, top_k=3)
    assert pruned[0][0] == full[0][0]
    assert pruned[0][1] == pytest.approx(full[0][1], abs=1e-6)


def test_streaming_beam_equals_one_pass() -> None:
    rng = random.Random(5)
    gen = torch.Generator().manual_seed(5)
    for _ in range(10):
        T = rng.randint(0, 40)
        lp = torch.randn(T, 6, generator=gen).log_softmax(-1)
        one = CTCPrefixBeamSearch(beam_size=4, top_k=3)
        one.accept(lp)
        chunked = CTCPrefixBeamSearch(beam_size=4, top_k=3)
        cuts = random_chunks(T, rng)
        for a, b in zip(cuts, cuts[1:]):
            chunked.accept(lp[a:b])
        assert chunked.num_frames == T
        h1, h2 = one.finalize(), chunked.finalize()
        assert [(h.tokens, h.frames) for h in h1] == [(h.tokens, h.frames) for h in h2]
        assert [h.score for h in h1] == pytest.approx([h.score for h in h2], abs=1e-9)


def test_beam_frames_are_valid_spikes() -> None:
    gen = torch.Generator().manual_seed(6)
    lp = torch.randn(30, 5, generator=gen).log_softmax(-1)
    search = CTCPrefixBeamSearch(beam_size=6)
    search.accept(lp)
    for h in search.hypotheses():
        assert len(h.frames) == len(h.tokens)
        assert all(0 <= f < 30 for f in h.frames)
        assert all(b > a for a, b in zip(h.frames, h.frames[1:]))


def test_beam_accepts_logits() -> None:
    """Scores are normalised per frame, so logits and log-probs give identical results."""
    gen = torch.Generator().manual_seed(7)
    logits = torch.randn(12, 5, generator=gen) * 3 + 2
    a = ctc_prefix_beam_search(logits, beam_size=3)
    b = ctc_prefix_beam_search(logits.log_softmax(-1), beam_size=3)
    assert [t for t, _ in a] == [t for t, _ in b]
    assert [s for _, s in a] == pytest.approx([s for _, s in b], abs=1e-5)


# --------------------------------------------------------------------------- hotwords
# Synthetic vocabulary: 0 blank, 1 "▁a", 2 "b" (continues a word), 3 "▁c", 4 "▁d".
WORD_START = {0: False, 1: True, 2: False, 3: True, 4: True}.__getitem__


def frames(*rows: list[float]) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float64).log()


def test_hotword_boost_changes_winner() -> None:
    lp = frames([0.0999, 0.5, 0.0001, 0.4, 0.0], [1.0, 0.0, 0.0, 0.0, 0.0])
    assert ctc_prefix_beam_search(lp, beam_size=4)[0][0] == [1]
    hot = Hotwords({(3,): 2.0}, WORD_START)
    best_tokens, best_score = ctc_prefix_beam_search(lp, beam_size=4, hotwords=hot)[0]
    assert best_tokens == [3]
    assert best_score == pytest.approx(math.log(0.4) + 2.0, abs=1e-9)


def test_hotword_bonus_taken_back_when_word_continues() -> None:
    """Hotword "▁a"; the hypothesis "▁a b" spells a different word ("ab"), so no bonus for it."""
    lp = frames([0.05, 0.9, 0.0, 0.05, 0.0], [0.35, 0.0, 0.6, 0.05, 0.0])
    plain = dict((tuple(t), s) for t, s in ctc_prefix_beam_search(lp, beam_size=8))
    assert max(plain, key=plain.get) == (1, 2)
    boosted = dict((tuple(t), s) for t, s in ctc_prefix_beam_search(lp, beam_size=8, hotwords=Hotwords({(1,): 1.0}, WORD_START)))
    assert max(boosted, key=boosted.get) == (1,)
    assert boosted[(1,)] == pytest.approx(plain[(1,)] + 1.0, abs=1e-9)
    assert boosted[(1, 2)] == pytest.approx(plain[(1, 2)], abs=1e-9)  # continuation: no bonus
    assert boosted[(1, 3)] == pytest.approx(plain[(1, 3)] + 1.0, abs=1e-9)  # next word: kept


def test_hotword_partial_credit_only_until_final() -> None:
    """Hotword "▁a b" (two pieces): after "▁a" the hypothesis has half the bonus while searching,
    nothing once the utterance ends without "b"; the complete word keeps the full bonus."""
    hot = Hotwords({(1, 2): 3.0}, WORD_START)
    ctx = hot.step(hot.initial, 1)
    assert hot.score(ctx) == pytest.approx(1.5) and hot.final_score(ctx) == 0.0
    done = hot.step(ctx, 2)
    assert hot.score(done) == pytest.approx(3.0) and hot.final_score(done) == pytest.approx(3.0)
    after = hot.step(done, 4)  # next word starts: bonus committed
    assert hot.final_score(after) == pytest.approx(3.0)
    assert hot.final_score(hot.step(done, 2)) == 0.0  # "▁a b b" is another word
    # two-word phrase "▁a ▁c"
    phrase = Hotwords({(1, 3): 2.0}, WORD_START)
    c = phrase.step(phrase.step(phrase.initial, 1), 3)
    assert phrase.final_score(c) == pytest.approx(2.0)
    assert phrase.final_score(phrase.step(phrase.step(phrase.initial, 1), 4)) == 0.0
    lp = frames([0.2, 0.8, 0.0, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0, 0.0])
    s = CTCPrefixBeamSearch(beam_size=4, hotwords=hot)
    s.accept(lp)
    part = {tuple(h.tokens): h.score for h in s.hypotheses()}
    fin = {tuple(h.tokens): h.score for h in s.finalize()}
    assert part[(1,)] == pytest.approx(math.log(0.8) + 1.5, abs=1e-9)
    assert fin[(1,)] == pytest.approx(math.log(0.8), abs=1e-9)


def test_hotwords_from_words_with_tokenizer(tok: Tokenizer) -> None:
    word = "gregson"
    ids = tok.encode(word)
    hot = Hotwords.from_words({word: 4.0}, tok)
    ctx = hot.initial
    for i in ids:
        ctx = hot.step(ctx, i)
    assert hot.final_score(ctx) == pytest.approx(4.0)
    # Each piece frame offers the hotword's piece (0.4) or another piece (0.5), then a sure blank:
    # one path per labelling, so P(other) = 0.5^n, P(word) = 0.4^n and the bonus must exceed
    # n*log(1.25) to flip the result.
    n, V = len(ids), tok.vocab_size
    other = [i % (V - 1) + 1 for i in ids]
    probs = torch.zeros(2 * n, V, dtype=torch.float64)
    probs[1::2, 0] = 1.0
    for j in range(n):
        probs[2 * j, [0, ids[j], other[j]]] = torch.tensor([0.1, 0.4, 0.5], dtype=torch.float64)
    lp = probs.log()
    assert ctc_prefix_beam_search(lp, beam_size=8)[0][0] == other
    flip = n * math.log(1.25)
    below = ctc_prefix_beam_search(lp, beam_size=8, hotwords={word: flip - 0.05}, tokenizer=tok)[0]
    above = ctc_prefix_beam_search(lp, beam_size=8, hotwords={word: flip + 0.05}, tokenizer=tok)[0]
    assert below[0] == other
    assert above[0] == ids and tok.decode(above[0]) == word
    assert above[1] == pytest.approx(n * math.log(0.4) + flip + 0.05, abs=1e-9)
    with pytest.raises(ValueError):
        CTCPrefixBeamSearch(4, hotwords={word: 1.0})  # words need a tokenizer


# =========================================================================== alignment
def spell(tokens: list[int], durations: list[int], gaps: list[int], V: int) -> tuple[torch.Tensor, list[int]]:
    """Peaky log-probs: ``gaps[i]`` blank frames, then token i for ``durations[i]`` frames; returns
    the log-probs and each token's first frame."""
    labels, starts = [], []
    for t, d, g in zip(tokens, durations, gaps):
        labels += [0] * g
        starts.append(len(labels))
        labels += [t] * d
    labels += [0] * 3
    logits = torch.full((len(labels), V), -6.0)
    logits[torch.arange(len(labels)), torch.tensor(labels)] = 4.0
    return logits.log_softmax(-1), starts


def test_words_from_greedy_spikes(tok: Tokenizer) -> None:
    text = "the quick brown fox jumps"
    ids = tok.encode(text)
    rng = random.Random(8)
    durations = [rng.randint(1, 3) for _ in ids]
    gaps = [rng.randint(0, 4) if tok.is_word_start(i) else 0 for i in ids]
    gaps = [g if (k == 0 or ids[k] != ids[k - 1]) else max(g, 1) for k, g in enumerate(gaps)]
    lp, starts = spell(ids, durations, gaps, tok.vocab_size)
    toks, frames = ctc_greedy(lp)
    assert toks == ids and frames == starts
    words = words_from_tokens(toks, frames, tok, frame_shift=0.04, log_probs=lp)
    assert [w.word for w in words] == text.split()
    groups = [k for k, i in enumerate(ids) if tok.is_word_start(i)] + [len(ids)]
    for w, a, b in zip(words, groups, groups[1:]):
        assert w.start == pytest.approx(starts[a] * 0.04)
        assert w.end == pytest.approx((starts[b - 1] + 1) * 0.04)
        assert w.confidence == pytest.approx(float(torch.tensor(4.0).exp() / (torch.tensor(4.0).exp() + (tok.vocab_size - 1) * math.exp(-6.0))), rel=1e-5)
    T = lp.shape[0]
    assert all(0 <= w.start < w.end <= T * 0.04 for w in words)
    assert all(b.start >= a.end - 1e-9 for a, b in zip(words, words[1:]))
    # without posteriors there is no confidence; bad frames are rejected
    assert words_from_tokens(toks, frames, tok)[0].confidence is None
    with pytest.raises(ValueError):
        words_from_tokens(toks, frames[::-1], tok)
    with pytest.raises(ValueError):
        words_from_tokens(toks, frames[:-1], tok)


def test_words_confidence_and_streaming_offset(tok: Tokenizer) -> None:
    ids = tok.encode("ten meters")
    T, V = 2 * len(ids) + 4, tok.vocab_size
    probs = torch.full((T, V), 0.0)
    probs[:, 0] = 1.0
    spikes = list(range(2, 2 + 2 * len(ids), 2))
    posts = [0.9, 0.6, 0.3, 0.8, 0.5, 0.7, 0.95, 0.4, 0.85, 0.65][: len(ids)]
    assert len(posts) == len(ids) >= 2
    for f, i, p in zip(spikes, ids, posts):
        probs[f] = (1 - p) / (V - 1)
        probs[f, i] = p
    lp = probs.clamp_min(1e-30).log()
    words = words_from_tokens(ids, spikes, tok, log_probs=lp)
    groups = [k for k, i in enumerate(ids) if tok.is_word_start(i)] + [len(ids)]
    for w, a, b in zip(words, groups, groups[1:]):
        geo = math.exp(sum(math.log(p) for p in posts[a:b]) / (b - a))
        assert w.confidence == pytest.approx(geo, rel=1e-5)
    # streaming: absolute frames 100+, log-probs window starting at frame 100
    shifted = words_from_tokens(ids, [f + 100 for f in spikes], tok, log_probs=lp, frame_offset=100)
    assert [w.confidence for w in shifted] == pytest.approx([w.confidence for w in words])
    assert [w.start for w in shifted] == pytest.approx([w.start + 4.0 for w in words])


def test_forced_align_backends_agree_with_torchaudio_merge_tokens() -> None:
    torchaudio_f = pytest.importorskip("torchaudio.functional")
    gen = torch.Generator().manual_seed(9)
    for T, tokens in [(20, [1, 2, 2, 3]), (9, [4, 4, 4, 1, 2]), (30, [5]), (15, [1, 2, 3, 4, 5, 1, 2])]:
        lp = torch.randn(T, 6, generator=gen).log_softmax(-1)
        ta = forced_align(lp, tokens, backend="torchaudio")
        pt = forced_align(lp, tokens, backend="torch")
        assert [(s.token, s.start, s.end) for s in ta] == [(s.token, s.start, s.end) for s in pt]
        assert [s.score for s in ta] == pytest.approx([s.score for s in pt], rel=1e-5)
        ali, sc = torchaudio_f.forced_align(lp[None], torch.tensor([tokens], dtype=torch.int32), blank=0)
        ref = torchaudio_f.merge_tokens(ali[0], sc[0].exp())
        assert [(s.token, s.start, s.end) for s in ref] == [(s.token, s.start, s.end) for s in ta]
        assert [s.score for s in ref] == pytest.approx([s.score for s in ta], rel=1e-5)
        assert [s.token for s in ta] == tokens
        assert all(b.start >= a.end for a, b in zip(ta, ta[1:]))
    with pytest.raises(ValueError, match="cannot align"):
        forced_align(torch.randn(4, 6).log_softmax(-1), [1, 1, 1], backend="torch")  # needs 5 frames
    with pytest.raises(ValueError):
        forced_align(torch.randn(4, 6).log_softmax(-1), [1, 0])
    assert forced_align(torch.randn(4, 6).log_softmax(-1), []) == []


@pytest.mark.parametrize("backend", ["torchaudio", "torch"])
def test_forced_align_words(tok: Tokenizer, backend: str) -> None:
    if backend == "torchaudio":
        pytest.importorskip("torchaudio.functional")
    text = "go forward ten meters"
    ids = tok.encode(text)
    durations = [2 + (k % 3) for k in range(len(ids))]
    gaps = [3 if tok.is_word_start(i) else 0 for i in ids]
    lp, starts = spell(ids, durations, gaps, tok.vocab_size)
    words = forced_align_words(lp, ids, tok, frame_shift=0.04, backend=backend)
    assert [w.word for w in words] == text.split()
    groups = [k for k, i in enumerate(ids) if tok.is_word_start(i)] + [len(ids)]
    for w, a, b in zip(words, groups, groups[1:]):
        assert w.start == pytest.approx(starts[a] * 0.04)  # spans cover exactly the token frames
        assert w.end == pytest.approx((starts[b - 1] + durations[b - 1]) * 0.04)
        assert 0.99 < w.confidence <= 1.0
    T = lp.shape[0]
    assert all(0 <= w.start < w.end <= T * 0.04 + 1e-9 for w in words)
    assert all(b.start >= a.end for a, b in zip(words, words[1:]))
    # forced spans contain the greedy spike times
    spike_words = words_from_tokens(*ctc_greedy(lp), tok, log_probs=lp)
    for fw, sw in zip(words, spike_words):
        assert isinstance(fw, Word) and fw.word == sw.word
        assert fw.start <= sw.start + 1e-9 and sw.end <= fw.end + 1e-9
