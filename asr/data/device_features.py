"""Features of a whole training batch on the training device (``data.features_on_device``).

Why: on the 4x H100 runs of session 5 each GPU waited 7 to 41 % of its steps for the DataLoader
workers, and fbank is the largest share of a worker's time (46 %, ``tools/bench_loader.py``). With
this option the workers only decode and speed-perturb; the trainer computes the log-mel features
of the whole batch in one ``kaldi.fbank`` call (:func:`asr.features.compute_fbank_batch`) on the
GPU, then applies SpecAugment to the padded batch with a few tensor operations.

Same features as the workers would make: the same fbank frames, and the same SpecAugment masks,
drawn in the same order from a generator seeded with the utterance's sampler seed, as
:class:`asr.data.augment.SpecAugment` draws them (torchaudio's ``mask_along_axis``) after the
worker seeds torch's global generator with it. That needs ``data.dither == 0`` (the default): a
dither would draw from the generator before SpecAugment does.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor
from torch.nn.utils.rnn import pad_sequence

from asr.data.augment import SpecAugmentConfig
from asr.features import compute_fbank_batch


def _draw(mask_param: int, size: int, g: torch.Generator) -> tuple[int, int]:
    """One mask as torchaudio's ``mask_along_axis`` draws it (p = 1): [start, end)."""
    value = torch.rand(1, generator=g) * mask_param
    min_value = torch.rand(1, generator=g) * (size - value)
    start = int(min_value.long())
    return start, start + int(value.long())


def spec_augment_masks(cfg: SpecAugmentConfig, num_frames: int, num_bins: int,
                       seed: int) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """The frequency and time masks ([start, end) each) that :class:`asr.data.augment.SpecAugment`
    applies to an utterance of ``num_frames`` frames after ``torch.manual_seed(seed)``."""
    if not cfg.enabled or num_frames == 0:
        return [], []
    g = torch.Generator().manual_seed(seed)
    freq = [_draw(cfg.freq_width, num_bins, g) for _ in range(cfg.freq_masks)] if cfg.freq_width >= 1 else []
    width = min(cfg.time_width, int(cfg.time_width_ratio * num_frames))
    time = [_draw(width, num_frames, g) for _ in range(cfg.time_masks)] if width >= 1 else []
    return freq, time


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
    freq_masked = torch.zeros(B, F, dtype=torch.bool)  # drawn on the CPU, two small copies
    time_masked = torch.zeros(B, T, dtype=torch.bool)
    for i, (n, seed) in enumerate(zip(lengths.tolist(), seeds)):
        freq, time = spec_augment_masks(spec, n, F, int(seed))
        for lo, hi in freq:
            freq_masked[i, lo:hi] = True
        for lo, hi in time:
            time_masked[i, lo:hi] = True
    dev = feats.device
    valid = torch.arange(T, device=dev)[None, :] < lengths.to(dev)[:, None]  # [B, T]
    masked = (freq_masked.to(dev)[:, None, :] & valid[:, :, None]) | time_masked.to(dev)[:, :, None]
    fill = (feats * valid[:, :, None]).sum(dim=(1, 2)) / (lengths.to(dev).clamp(min=1) * F)
    return torch.where(masked, fill[:, None, None], feats), lengths
