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
"""
from __future__ import annotations

import math
from collections import defaultdict
from typing import Iterable, TextIO

__all__ = ["NGramCounts", "build_arpa", "write_arpa"]

BOS, EOS, UNK = "<s>", "</s>", "<unk>"
Gram = tuple[str, ...]


class NGramCounts:
    """Raw n-gram counts of every order up to ``order`` over sentences padded with <s> and </s>."""

    def __init__(self, order: int = 3):
        if order < 1:
            raise ValueError(f"order must be at least 1, got {order}")
        self.order = order
        self.raw: list[dict[Gram, int]] = [defaultdict(int) for _ in range(order + 1)]  # [k][gram]

    def add(self, sentence: str) -> None:
        words = [BOS] + sentence.split() + [EOS]
        if len(words) == 2:
            return
        for k in range(1, self.order + 1):
            for i in range(len(words) - k + 1):
                self.raw[k][tuple(words[i : i + k])] += 1

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


def build_arpa(counts: NGramCounts) -> tuple[list[dict[Gram, float]], list[dict[Gram, float]]]:
    """(log10 probabilities, log10 backoff weights) per order [k][gram] of the interpolated KN model."""
    N = counts.order
    # Counts the model uses per order: raw at the top and for grams starting with <s>, else
    # continuation counts (distinct words seen before the gram).
    used: list[dict[Gram, int]] = [{} for _ in range(N + 1)]
    used[N] = dict(counts.raw[N])
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
        for h, followers in by_context.items():
            denom = sum(c for _, c in followers)
            gamma = D * len(followers) / denom
            backoff[k - 1][h] = math.log10(gamma)
            for w, c in followers:
                p = max(c - D, 0.0) / denom + gamma * lower(h[1:] + (w,))
                prob[k][h + (w,)] = p
                logp[k][h + (w,)] = math.log10(p)
    return logp, backoff


def write_arpa(counts: NGramCounts, out: TextIO) -> None:
    """Write the model of :func:`build_arpa` as an ARPA file (KenLM, SRILM and flashlight read it)."""
    logp, backoff = build_arpa(counts)
    N = counts.order
    out.write("\n\\data\\\n")
    for k in range(1, N + 1):
        out.write(f"ngram {k}={len(logp[k])}\n")
    for k in range(1, N + 1):
        out.write(f"\n\\{k}-grams:\n")
        for gram in sorted(logp[k]):
            line = f"{logp[k][gram]:.6f}\t{' '.join(gram)}"
            if k < N and gram in backoff[k]:
                line += f"\t{backoff[k][gram]:.6f}"
            out.write(line + "\n")
    out.write("\n\\end\\\n")
