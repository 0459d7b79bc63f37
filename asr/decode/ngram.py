"""Word n-gram language models in ARPA format, built from text (interpolated Kneser-Ney).

Why here: lexicon decoding with a language model (:mod:`asr.decode.lexicon`) reads an ARPA file
through KenLM, but KenLM's builder (``lmplz``) is a C++ program that neither PyPI nor Debian's main
section ships. This module writes the same kind of model in plain Python. It is hand-written where
a library should have done it (KenLM's ``lmplz``, SRILM's ``ngram-count``); any ARPA file from those
tools works in its place.

The model is interpolated Kneser-Ney (Chen & Goodman 1998) with one discount per order,
``D = n1 / (n1 + 2 n2)`` from the count-of-counts. The highest order uses raw counts, lower orders
continuation counts (in how many distinct contexts an n-gram follows). N-grams that start at the
sentence start ``<s>`` keep raw counts at every order, since nothing can precede ``<s>``. The unigram
distribution is interpolated with the uniform one, which gives ``<unk>`` its probability. An
interpolated model is stored in ARPA's backoff form: a seen n-gram stores its interpolated
probability, and a context stores ``gamma(h) = D * N1+(h .) / c(h)`` as its backoff weight, so every
``p(. | h)`` sums to one (tests/test_ngram.py checks it).

Two ways to make the model smaller (``tools/build_lm.py --max-vocab/--prune``, the bundled LM):

* a vocabulary cap: words outside the ``vocabulary`` given to :class:`NGramCounts` are counted as
  ``<unk>`` (a lexicon decoder can output only the LM's words, so the cap trades coverage for size);
* count pruning (``prune``, one threshold per order, as KenLM's ``lmplz --prune``): an n-gram of
  order k >= 2 whose raw count is at most ``prune[k-1]`` is left out. The discounts, denominators
  and lower-order continuation counts still come from all counts; each context's backoff weight is
  then recomputed so that its distribution sums to one again over the kept n-grams,
  ``bow(h) = (1 - sum_kept p(w | h)) / (1 - sum_kept p_lower(w | h'))``. Thresholds must not
  decrease with the order, so every kept n-gram's prefix and suffix are kept too (raw counts never
  grow with the order).
"""
from __future__ import annotations

import math
from collections import Counter, defaultdict
from typing import Collection, Iterable, Optional, Sequence, TextIO

__all__ = ["NGramCounts", "build_arpa", "prune_thresholds", "top_words", "write_arpa"]

BOS, EOS, UNK = "<s>", "</s>", "<unk>"
Gram = tuple[str, ...]


def top_words(sentences: Iterable[str], max_vocab: int) -> set[str]:
    """The ``max_vocab`` most frequent words of ``sentences`` (ties broken alphabetically)."""
    counts = Counter(w for s in sentences for w in s.split())
    return {w for w, _ in sorted(counts.items(), key=lambda wc: (-wc[1], wc[0]))[:max_vocab]}


class NGramCounts:
    """Raw n-gram counts of every order up to ``order`` over sentences padded with <s> and </s>.

    ``vocabulary``: when given, every other word is counted as ``<unk>``."""

    def __init__(self, order: int = 3, vocabulary: Optional[Collection[str]] = None):
        if order < 1:
            raise ValueError(f"order must be at least 1, got {order}")
        self.order = order
        self.vocabulary = None if vocabulary is None else frozenset(vocabulary)
        self.raw: list[Counter[Gram]] = [Counter() for _ in range(order + 1)]  # [k][gram]

    def add(self, sentence: str) -> None:
        words = sentence.split()
        if not words:
            return
        if self.vocabulary is not None:
            words = [w if w in self.vocabulary else UNK for w in words]
        words = [BOS] + words + [EOS]
        for k in range(1, self.order + 1):
            self.raw[k].update(zip(*(words[i:] for i in range(k))))

    def add_all(self, sentences: Iterable[str]) -> "NGramCounts":
        for s in sentences:
            self.add(s)
        return self


def _discount(counts: dict[Gram, int]) -> float:
    """D = n1 / (n1 + 2 n2), kept inside (0, 1); 0.5 when the counts give no estimate."""
    n1 = sum(1 for c in counts.values() if c == 1)
    n2 = sum(1 for c in counts.values() if c == 2)
    if n1 == 0 or n1 + 2 * n2 == 0:
        return 0.5
    return min(max(n1 / (n1 + 2 * n2), 0.05), 0.95)


def prune_thresholds(prune: Sequence[int], order: int) -> list[int]:
    """Count thresholds per order ``[0, t1, ..., tN]`` (index = order) from ``prune`` as lmplz takes
    it: one value per order, the last repeated for higher orders; unigrams are never pruned.
    ValueError for a negative, decreasing or non-zero unigram threshold."""
    values = list(prune) or [0]
    if values[0] != 0 or any(v < 0 for v in values) or any(b < a for a, b in zip(values, values[1:])):
        raise ValueError(f"prune thresholds must start at 0 (unigrams are kept) and not decrease, got {values}")
    values += [values[-1]] * (order - len(values))
    return [0] + values[:order]


def build_arpa(counts: NGramCounts, prune: Sequence[int] = ()
               ) -> tuple[list[dict[Gram, float]], list[dict[Gram, float]]]:
    """(log10 probabilities, log10 backoff weights) per order [k][gram] of the interpolated KN model,
    without the n-grams ``prune`` drops (:func:`prune_thresholds`; module docstring)."""
    N = counts.order
    threshold = prune_thresholds(prune, N)
    # Counts the model uses per order: raw at the top and for grams starting with <s>, else
    # continuation counts (distinct words seen before the gram).
    used: list[dict[Gram, int]] = [{} for _ in range(N + 1)]
    used[N] = counts.raw[N]
    for k in range(N - 1, 0, -1):
        cont: dict[Gram, int] = defaultdict(int)
        for gram in counts.raw[k + 1]:
            cont[gram[1:]] += 1
        used[k] = {g: (c if g[0] == BOS else cont.get(g, 0) or c) for g, c in counts.raw[k].items()}
    vocab = sorted({g[0] for g in counts.raw[1]} | {UNK})
    predicted = [w for w in vocab if w != BOS]

    logp: list[dict[Gram, float]] = [{} for _ in range(N + 1)]
    backoff: list[dict[Gram, float]] = [{} for _ in range(N + 1)]
    prob: list[dict[Gram, float]] = [{} for _ in range(N + 1)]  # linear, for the next order's interpolation

    # Unigrams: discounted continuation counts, interpolated with the uniform distribution.
    uni = {g: c for g, c in used[1].items() if g[0] != BOS}
    D = _discount(uni)
    total = sum(uni.values())
    gamma = D * len(uni) / total
    for w in predicted:
        p = max(uni.get((w,), 0) - D, 0.0) / total + gamma / len(predicted)
        prob[1][(w,)] = p
        logp[1][(w,)] = math.log10(p)
    logp[1][(BOS,)] = -99.0

    def lower(gram: Gram) -> float:
        """p(w | shorter context) for gram = (h..., w), through backoffs where unseen."""
        k = len(gram)
        if gram in prob[k]:
            return prob[k][gram]
        return 10.0 ** backoff[k - 1].get(gram[:-1], 0.0) * lower(gram[1:])

    for k in range(2, N + 1):
        D = _discount(used[k])
        by_context: dict[Gram, list[tuple[str, int]]] = defaultdict(list)
        for gram, c in used[k].items():
            by_context[gram[:-1]].append((gram[-1], c))
        raw = counts.raw[k]
        for h, followers in by_context.items():
            denom = sum(c for _, c in followers)
            gamma = D * len(followers) / denom
            kept_p = kept_lower = 0.0
            kept = 0
            for w, c in followers:
                if raw[h + (w,)] <= threshold[k]:
                    continue
                p_lower = lower(h[1:] + (w,))
                p = max(c - D, 0.0) / denom + gamma * p_lower
                prob[k][h + (w,)] = p
                logp[k][h + (w,)] = math.log10(p)
                kept_p += p
                kept_lower += p_lower
                kept += 1
            if kept == len(followers):
                backoff[k - 1][h] = math.log10(gamma)
            elif kept:  # the mass the pruned followers leave, spread by the lower order
                backoff[k - 1][h] = math.log10(max(1.0 - kept_p, 1e-12) / max(1.0 - kept_lower, 1e-12))
    return logp, backoff


def write_arpa(counts: NGramCounts, out: TextIO, prune: Sequence[int] = (), decimals: int = 6) -> None:
    """Write the model of :func:`build_arpa` as an ARPA file (KenLM, SRILM and flashlight read it),
    log10 values with ``decimals`` decimals: 4 (a probability to within 0.012 %) makes the bundled
    LM 15 % smaller as xz than 6, and KenLM stores them as float32 anyway."""
    logp, backoff = build_arpa(counts, prune)
    N = counts.order
    out.write("\n\\data\\\n")
    for k in range(1, N + 1):
        out.write(f"ngram {k}={len(logp[k])}\n")
    for k in range(1, N + 1):
        out.write(f"\n\\{k}-grams:\n")
        for gram in sorted(logp[k]):
            line = f"{logp[k][gram]:.{decimals}f}\t{' '.join(gram)}"
            if k < N and gram in backoff[k]:
                line += f"\t{backoff[k][gram]:.{decimals}f}"
            out.write(line + "\n")
    out.write("\n\\end\\\n")
