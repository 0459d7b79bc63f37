"""Batch shapes for compiled code: round a batch's frame count and utterance count up to few values.

Compiled code specialises (CUDA graphs record) per batch shape; the bucketing sampler makes many.
Padding frames at the end and appending empty utterances changes no loss or gradient (the model is
causal, its rows are independent, and CTC reads only each utterance's own frames), so the trainer
may pad to any size; these helpers choose sizes that keep the shapes few and the waste bounded.
"""
from __future__ import annotations

import torch

from asr.train.errors import TrainConfigError


def padded_size(n: int, multiple: int = 0, per_octave: int = 0) -> int:
    """``n`` rounded up for a batch shape: first to one of ``per_octave`` values per octave (a power
    of two; 0: off), then to a multiple of ``multiple`` (0 or 1: off).

    Why both: CUDA graphs are recorded (compiled code specialises) per batch shape, so shapes must
    be few; a fixed multiple that is coarse enough for long batches pads short ones several times
    over (real speech of 0.5 s padded to 128 frames is 2.5x the work), while rounding to a few
    values per octave wastes at most 1/per_octave of any batch (25 % at 4, 12.5 % at 8)."""
    if per_octave > 1 and n > per_octave:
        step = 1 << (n.bit_length() - per_octave.bit_length())  # n in [2^k, 2^(k+1)): 2^k / per_octave
        n = -(-n // step) * step
    if multiple > 1:
        n = -(-n // multiple) * multiple
    return n


def check_per_octave(per_octave: int) -> int:
    """``trainer.pad_per_octave``, refused in one line unless 0 or a power of two."""
    if per_octave < 0 or per_octave & (per_octave - 1):
        raise TrainConfigError(f"trainer.pad_per_octave must be 0 or a power of two, not {per_octave}")
    return per_octave


def pad_frames(features: torch.Tensor, multiple: int, per_octave: int = 0) -> torch.Tensor:
    """Zero-pad features [B, T, F] at the end to :func:`padded_size` frames (as is when that is T).

    Why: compiled code specialises (CUDA graphs record) per batch shape; rounding T up makes the
    shapes few. The model is causal and CTC reads only each utterance's own frames, so the padding
    changes no loss or gradient (tests/test_train.py checks this)."""
    extra = padded_size(features.shape[1], multiple, per_octave) - features.shape[1]
    return torch.nn.functional.pad(features, (0, 0, 0, extra)) if extra else features


def pad_rows(multiple: int, *tensors: torch.Tensor, per_octave: int = 0) -> tuple[torch.Tensor, ...]:
    """Append all-zero rows to every tensor (dim 0) up to :func:`padded_size` rows (as they are
    when that is their count). For a batch's features, lengths, targets and target lengths: empty
    utterances.

    Why: with the bucketing sampler the utterance count of a batch takes many values; CUDA graphs
    record one graph per batch shape. An empty utterance (no frames, no targets) changes nothing:
    the model's rows are independent, its CTC loss is exactly 0 with zero gradient, and the loss is
    normalised by the real utterances (``ctc_loss(utterances=...)``; tests/test_train.py)."""
    rows = tensors[0].shape[0]
    extra = padded_size(rows, multiple, per_octave) - rows
    if not extra:
        return tensors
    return tuple(torch.cat([t, t.new_zeros(extra, *t.shape[1:])]) for t in tensors)
