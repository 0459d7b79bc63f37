"""Training-time augmentation: speed perturbation and additive noise on the waveform, SpecAugment
on the filterbank. Each part is switched on and tuned from the ``data.augment`` config.

All randomness comes from a ``random.Random`` and the torch generator that the dataset seeds per
sample (see :func:`asr.data.sampler.sample_seed`), so an augmented sample is a pure function of
(seed, epoch, index): identical across worker counts, across ranks and after a resume.
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Sequence

import torch
import torchaudio.functional as AF


@dataclass
class SpecAugmentConfig:
    """SpecAugment (Park et al. 2019) without time warping. Time masks are bounded both in frames
    and as a fraction of the utterance, so short utterances (digits) are not wiped out."""

    enabled: bool = True
    freq_masks: int = 2
    freq_width: int = 27
    time_masks: int = 5
    time_width: int = 40
    time_width_ratio: float = 0.05


@dataclass
class SpeedConfig:
    """Speed perturbation (Ko et al. 2015): resampling changes tempo and pitch together."""

    enabled: bool = False
    factors: Sequence[float] = (0.9, 1.0, 1.1)


@dataclass
class NoiseConfig:
    """Additive noise from a manifest of noise recordings at a uniform random SNR in dB."""

    enabled: bool = False
    manifest: str | None = None
    prob: float = 0.5
    snr_db: Sequence[float] = (5.0, 20.0)


@dataclass
class AugmentConfig:
    spec_augment: SpecAugmentConfig = field(default_factory=SpecAugmentConfig)
    speed: SpeedConfig = field(default_factory=SpeedConfig)
    noise: NoiseConfig = field(default_factory=NoiseConfig)

    @classmethod
    def from_dict(cls, d: dict | None) -> "AugmentConfig":
        """Build from a plain dict (e.g. ``OmegaConf.to_container(cfg.data.augment)``); unknown keys fail loudly."""
        d = dict(d or {})
        unknown = set(d) - {"spec_augment", "speed", "noise"}
        if unknown:
            raise ValueError(f"unknown augment section(s): {sorted(unknown)}")
        return cls(
            spec_augment=SpecAugmentConfig(**(d.get("spec_augment") or {})),
            speed=SpeedConfig(**(d.get("speed") or {})),
            noise=NoiseConfig(**(d.get("noise") or {})),
        )


def _draw_mask(mask_param: int, size: int, generator: torch.Generator | None) -> tuple[int, int]:
    """One mask [start, end) on an axis of ``size``, drawn as torchaudio's ``mask_along_axis`` draws
    it (``p=1``: two ``torch.rand(1)``), start clamped to 0 as its ``arange`` comparison does."""
    value = torch.rand(1, generator=generator) * mask_param
    min_value = torch.rand(1, generator=generator) * (size - value)
    start = int(min_value.long())
    return max(0, start), start + int(value.long())


class SpecAugment:
    """Frequency and time masks on one utterance's features ``[T, F]``.

    The features here are raw log-mel (CMVN lives inside the model), where 0 is not "silence" but a
    fairly loud value; masks are therefore filled with the utterance's mean, which CMVN maps near 0.
    The masks are torchaudio's ``FrequencyMasking`` / ``TimeMasking`` (tests/test_data.py checks the
    equality), drawn by :meth:`masks` so that the trainer can redraw them for features it computes
    itself (``data.features_on_device``, :mod:`asr.data.device_features`).
    """

    def __init__(self, cfg: SpecAugmentConfig) -> None:
        self.cfg = cfg

    def masks(self, num_frames: int, num_bins: int,
              generator: torch.Generator | None = None) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
        """The frequency and time masks ([start, end) each) for an utterance of ``num_frames``
        frames, drawn from ``generator`` (default: torch's global one): frequency masks first."""
        cfg = self.cfg
        if not cfg.enabled or num_frames == 0:
            return [], []
        freq = [_draw_mask(cfg.freq_width, num_bins, generator) for _ in range(cfg.freq_masks)] \
            if cfg.freq_width > 0 else []
        width = min(cfg.time_width, int(cfg.time_width_ratio * num_frames))
        time = [_draw_mask(width, num_frames, generator) for _ in range(cfg.time_masks)] if width > 0 else []
        return freq, time

    def __call__(self, feats: torch.Tensor) -> torch.Tensor:
        if not self.cfg.enabled or feats.shape[0] == 0:
            return feats
        freq, time = self.masks(feats.shape[0], feats.shape[1])
        fill = float(feats.mean())
        out = feats.clone()
        for lo, hi in freq:
            out[:, lo:hi] = fill
        for lo, hi in time:
            out[lo:hi, :] = fill
        return out


def speed_perturb(wave: torch.Tensor, factor: float, sample_rate: int = 16000) -> torch.Tensor:
    """Play ``wave`` ``factor`` times faster (duration / factor) via torchaudio.functional.speed."""
    if factor == 1.0:
        return wave
    out, _ = AF.speed(wave.unsqueeze(0), sample_rate, factor)
    return out.squeeze(0)


def mix_at_snr(speech: torch.Tensor, noise: torch.Tensor, snr_db: float) -> torch.Tensor:
    """Add ``noise`` (tiled or cropped to the speech length by the caller) at ``snr_db`` dB.

    torchaudio.functional.add_noise does the scaling; silent speech or silent noise is returned
    unchanged instead of producing NaN.
    """
    if speech.numel() == 0 or float(noise.pow(2).sum()) == 0.0 or float(speech.pow(2).sum()) == 0.0:
        return speech
    return AF.add_noise(speech.unsqueeze(0), noise.unsqueeze(0), torch.tensor([float(snr_db)])).squeeze(0)


def fit_length(noise: torch.Tensor, n: int, rng: random.Random) -> torch.Tensor:
    """A random length-``n`` excerpt of ``noise``, tiling it when it is shorter."""
    if noise.numel() == 0:
        return torch.zeros(n)
    if noise.numel() < n:
        noise = noise.repeat(n // noise.numel() + 1)
    start = rng.randrange(0, noise.numel() - n + 1)
    return noise[start : start + n]


class WaveAugment:
    """Speed perturbation then additive noise on a 16 kHz waveform."""

    def __init__(self, speed: SpeedConfig, noise: NoiseConfig, sample_rate: int = 16000) -> None:
        self.speed = speed
        self.noise = noise
        self.sample_rate = sample_rate
        self.noise_paths: list[str] = []
        if noise.enabled:
            if not noise.manifest:
                raise ValueError("data.augment.noise.enabled is true but data.augment.noise.manifest is not set")
            from asr.data.manifest import read_manifest

            self.noise_paths = [e["audio"] for e in read_manifest(noise.manifest)]
            if not self.noise_paths:
                raise ValueError(f"noise manifest {noise.manifest} is empty")
            lo, hi = noise.snr_db
            if lo > hi:
                raise ValueError(f"noise.snr_db must be [low, high], got {list(noise.snr_db)}")

    def __call__(self, wave: torch.Tensor, rng: random.Random) -> torch.Tensor:
        if self.speed.enabled and self.speed.factors:
            wave = speed_perturb(wave, float(rng.choice(list(self.speed.factors))), self.sample_rate)
        if self.noise.enabled and rng.random() < self.noise.prob:
            from asr.audio import load_audio

            noise = load_audio(rng.choice(self.noise_paths), target_rate=self.sample_rate)
            wave = mix_at_snr(wave, fit_length(noise, wave.numel(), rng), rng.uniform(*self.noise.snr_db))
        return wave
