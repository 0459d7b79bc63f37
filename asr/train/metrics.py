"""Word and character error counts with jiwer, kept as raw counts so they can be summed.

WER over a corpus is total edits / total reference words, not the mean of per-utterance WERs;
keeping counts lets DDP ranks (and batches) be combined exactly with one all-reduce.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import jiwer


@dataclass
class ErrorCounts:
    word_errors: int = 0
    words: int = 0
    char_errors: int = 0
    chars: int = 0
    utterances: int = 0

    def __iadd__(self, other: "ErrorCounts") -> "ErrorCounts":
        self.word_errors += other.word_errors
        self.words += other.words
        self.char_errors += other.char_errors
        self.chars += other.chars
        self.utterances += other.utterances
        return self

    @property
    def wer(self) -> float:
        """Corpus WER; an empty reference set with insertions counts as 100 % per inserted word."""
        return self.word_errors / self.words if self.words else float(self.word_errors > 0)

    @property
    def cer(self) -> float:
        return self.char_errors / self.chars if self.chars else float(self.char_errors > 0)

    def as_list(self) -> list[int]:
        return [self.word_errors, self.words, self.char_errors, self.chars, self.utterances]

    @classmethod
    def from_list(cls, values: Sequence[float]) -> "ErrorCounts":
        return cls(*(int(round(v)) for v in values))


def error_counts(refs: Sequence[str], hyps: Sequence[str]) -> ErrorCounts:
    """Edit counts of hypotheses against references (already normalised text)."""
    if len(refs) != len(hyps):
        raise ValueError(f"{len(refs)} references but {len(hyps)} hypotheses")
    if not refs:
        return ErrorCounts()
    w = jiwer.process_words(list(refs), list(hyps))
    c = jiwer.process_characters(list(refs), list(hyps))
    return ErrorCounts(
        word_errors=w.substitutions + w.deletions + w.insertions,
        words=w.substitutions + w.deletions + w.hits,
        char_errors=c.substitutions + c.deletions + c.insertions,
        chars=c.substitutions + c.deletions + c.hits,
        utterances=len(refs),
    )
