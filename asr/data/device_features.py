"""Features of a whole training batch on the training device (``data.features_on_device``).

Why: in 4x H100 training runs each GPU waited 7 to 41 % of its steps for the DataLoader
workers, and fbank is the largest share of a worker's time (46 %, ``tools/bench_loader.py``). With
this option the workers only decode and speed-perturb; the trainer computes the log-mel features
of the whole batch in one ``kaldi.fbank`` call (:func:`asr.features.compute_fbank_padded`) on the
GPU, then applies SpecAugment to the padded batch with a few tensor operations; the workers draw
its masks (:func:`spec_masks`), so the training loop runs no Python per utterance.

Same features as the workers would make: the same fbank frames, and the same SpecAugment masks
(:meth:`asr.data.augment.SpecAugment.masks`), drawn from a generator seeded with the utterance's
sampler seed, as the worker draws them after seeding torch's global generator with it. That
needs ``data.dither == 0`` (the default): a dither would draw from the generator before
SpecAugment does.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor
from torch.nn.utils.rnn import pad_sequence

from asr.data.augment import SpecAugment, SpecAugmentConfig
from asr.features import NUM_MEL_BINS, compute_fbank_padded
from asr.frames import feature_frames_for_samples


def utterance_masks(spec: SpecAugment, frames: int, seed: int, num_bins: int = NUM_MEL_BINS) -> tuple[Tensor, Tensor]:
    """SpecAugment's masks of one utterance of ``frames`` frames as booleans, frequency
    ``[num_bins]`` and time ``[frames]``, drawn from a generator seeded with ``seed``: the draws
    the workers' own features make, as they seed torch's global generator with it first. The
    DataLoader workers call this (:class:`asr.data.dataset.ManifestDataset`), so the training loop
    runs no Python per utterance."""
    freq_masked = torch.zeros(num_bins, dtype=torch.bool)
    time_masked = torch.zeros(frames, dtype=torch.bool)
    freq, time = spec.masks(int(frames), num_bins, torch.Generator().manual_seed(int(seed)))
    for lo, hi in freq:
        freq_masked[lo:hi] = True
    for lo, hi in time:
        time_masked[lo:hi] = True
    return freq_masked, time_masked


def spec_masks(spec: SpecAugment, frames: Sequence[int], seeds: Sequence[int],
               num_bins: int = NUM_MEL_BINS) -> tuple[Tensor, Tensor]:
    """:func:`utterance_masks` of a batch: frequency ``[B, num_bins]``, time ``[B, max(frames)]``."""
    per_utterance = [utterance_masks(spec, n, seed, num_bins) for n, seed in zip(frames, seeds)]
    return stack_masks(per_utterance, num_bins)


def stack_masks(per_utterance: Sequence[tuple[Tensor, Tensor]], num_bins: int = NUM_MEL_BINS) -> tuple[Tensor, Tensor]:
    """Batch :func:`utterance_masks`' pairs: ``[B, num_bins]`` and ``[B, T]`` (False past an end)."""
    if not per_utterance:
        return torch.zeros(0, num_bins, dtype=torch.bool), torch.zeros(0, 0, dtype=torch.bool)
    freq = torch.stack([f for f, _ in per_utterance])
    time = pad_sequence([t for _, t in per_utterance], batch_first=True, padding_value=False)
    return freq, time


def batch_features(
    waves: Tensor, wave_lengths: Sequence[int], spec: Optional[SpecAugmentConfig], seeds: Sequence[int],
    masks: Optional[tuple[Tensor, Tensor]] = None,
) -> tuple[Tensor, Tensor]:
    """Log-mel features [B, T, 80] (zero padded) and their lengths [B] of padded waveforms
    [B, N] (on any device), with SpecAugment masks filled with each utterance's mean. ``masks``:
    :func:`spec_masks` already drawn (by the workers), else drawn here."""
    lengths = torch.tensor([feature_frames_for_samples(int(n)) for n in wave_lengths], dtype=torch.long)
    feats = compute_fbank_padded(waves, wave_lengths)
    B, T, F = feats.shape
    if spec is None or not spec.enabled or T == 0:
        return feats, lengths
    if masks is None:
        masks = spec_masks(SpecAugment(spec), lengths.tolist(), seeds, F)
    freq_masked, time_masked = masks
    dev = feats.device
    masked = freq_masked.to(dev)[:, None, :] | time_masked[:, :T].to(dev)[:, :, None]
    return fill_masked(feats, lengths.to(dev), masked), lengths


def fill_masked(feats: Tensor, lengths: Tensor, masked: Tensor) -> Tensor:
    """``feats [B, T, F]`` with the entries of ``masked [B, T, F]`` (broadcastable) that lie within
    each row's ``lengths [B]`` (on the features' device) replaced by that row's mean over its valid
    frames: SpecAugment's fill (CMVN maps the mean near 0). Rows of length 0 stay as they are."""
    B, T, F = feats.shape
    valid = torch.arange(T, device=feats.device)[None, :] < lengths[:, None]  # [B, T]
    fill = (feats * valid[:, :, None]).sum(dim=(1, 2)) / (lengths.clamp(min=1) * F)
    return torch.where(masked & valid[:, :, None], fill[:, None, None], feats)
