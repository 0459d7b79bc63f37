"""Features of a whole training batch on the training device (``data.features_on_device``).

Why: on the 4x H100 runs of session 5 each GPU waited 7 to 41 % of its steps for the DataLoader
workers, and fbank is the largest share of a worker's time (46 %, ``tools/bench_loader.py``). With
this option the workers only decode and speed-perturb; the trainer computes the log-mel features
of the whole batch in one ``kaldi.fbank`` call (:func:`asr.features.compute_fbank_batch`) on the
GPU, then applies SpecAugment to the padded batch with a few tensor operations.

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
from asr.features import compute_fbank_batch


def batch_features(
    waves: Tensor, wave_lengths: Sequence[int], spec: Optional[SpecAugmentConfig], seeds: Sequence[int]
) -> tuple[Tensor, Tensor]:
    """Log-mel features [B, T, 80] (zero padded) and their lengths [B] of padded waveforms
    [B, N] (on any device), with SpecAugment masks filled with each utterance's mean."""
    waves_list = [waves[i, : int(n)] for i, n in enumerate(wave_lengths)]
    feats_list = compute_fbank_batch(waves_list)
    lengths = torch.tensor([f.shape[0] for f in feats_list], dtype=torch.long)
    feats = pad_sequence(feats_list, batch_first=True)
    B, T, F = feats.shape
    if spec is None or not spec.enabled or T == 0:
        return feats, lengths
    augment = SpecAugment(spec)
    freq_masked = torch.zeros(B, F, dtype=torch.bool)  # drawn on the CPU, two small copies
    time_masked = torch.zeros(B, T, dtype=torch.bool)
    for i, (n, seed) in enumerate(zip(lengths.tolist(), seeds)):
        # the worker seeds torch's global generator with the seed before SpecAugment draws
        freq, time = augment.masks(n, F, torch.Generator().manual_seed(int(seed)))
        for lo, hi in freq:
            freq_masked[i, lo:hi] = True
        for lo, hi in time:
            time_masked[i, lo:hi] = True
    dev = feats.device
    lens = lengths.to(dev)
    valid = torch.arange(T, device=dev)[None, :] < lens[:, None]  # [B, T]
    masked = (freq_masked.to(dev)[:, None, :] & valid[:, :, None]) | time_masked.to(dev)[:, :, None]
    fill = (feats * valid[:, :, None]).sum(dim=(1, 2)) / (lens.clamp(min=1) * F)
    return torch.where(masked, fill[:, None, None], feats), lengths
