"""Manifest dataset: audio is decoded and turned into filterbanks on the fly, in DataLoader workers.

Why on the fly: precomputed features fix one augmentation per utterance and cost disk; decoding
and fbank are cheap next to the model, and with ``num_workers > 0`` they overlap with training.

Items are addressed by ``(index, sample_seed)`` pairs from :class:`asr.data.sampler.BucketingBatchSampler`
(a plain ``int`` index means "no augmentation randomness"). Every random choice in an item is drawn
from generators seeded with that seed, so results do not depend on the worker that computes them.
"""
from __future__ import annotations

import logging
import math
import random
from dataclasses import dataclass, replace
from typing import Any, Callable, Sequence

import torch
from torch.nn.utils.rnn import pad_sequence
from torch.utils.data import Dataset

from asr.data.augment import AugmentConfig, SpecAugment, SpecAugmentConfig, WaveAugment

log = logging.getLogger(__name__)

def output_frames(duration: float) -> int:
    """Encoder output frames for ``duration`` seconds: fbank frames (25 ms window, 10 ms shift,
    snip edges), then the x4 subsampling of the contract, T' = ceil(ceil(T / 2) / 2)."""
    n = int(round(duration * 16000))
    t = 0 if n < 400 else 1 + (n - 400) // 160
    return math.ceil(math.ceil(t / 2) / 2)


class ManifestDataset(Dataset):
    """Utterances of one or more manifests, filtered by duration and CTC feasibility.

    Args:
        entries: manifest entries with absolute audio paths (``asr.data.manifest.read_manifests``).
        tokenizer: object with ``encode(text) -> list[int]``; None gives items without targets
            (feature statistics, inference).
        min_duration, max_duration: keep utterances with min <= duration <= max (seconds).
        augment: augmentation config; None or all parts disabled gives clean features.
        dither: kaldi fbank dither in int16 units (training regularisation; 0 for evaluation).
        filter_ctc: drop utterances CTC cannot align (below); False for evaluation sets, whose
            WER must cover every utterance.
        features_on_device: training items (those asked for with a seed) carry the augmented
            waveform and the seed instead of features; the trainer computes fbank and SpecAugment
            for the whole batch on its device (:mod:`asr.data.device_features`, same features).
            Needs ``dither == 0``.

    Utterances with more tokens than encoder output frames (at the fastest speed factor) are
    dropped: CTC cannot align them, they would only contribute an infinite (zeroed) loss.
    """

    def __init__(
        self,
        entries: Sequence[dict],
        tokenizer: Any | None = None,
        min_duration: float = 0.0,
        max_duration: float = float("inf"),
        augment: AugmentConfig | None = None,
        dither: float = 0.0,
        filter_ctc: bool = True,
        features_on_device: bool = False,
    ) -> None:
        from asr.features import compute_fbank  # imported here: frontend module owned by another helper

        self._fbank: Callable[..., torch.Tensor] = compute_fbank
        self.tokenizer = tokenizer
        self.dither = float(dither)
        if features_on_device and self.dither != 0.0:
            raise ValueError("data.features_on_device needs data.dither=0: a dither would draw from the random "
                             "generator before SpecAugment does, so the device could not redraw the same masks")
        self.features_on_device = bool(features_on_device)
        # No config means clean features (evaluation); SpecAugment is on by default only in configs.
        aug = augment or AugmentConfig(spec_augment=SpecAugmentConfig(enabled=False))
        self.augment = aug
        self.spec_augment = SpecAugment(aug.spec_augment) if aug.spec_augment.enabled else None
        self.wave_augment = WaveAugment(aug.speed, aug.noise) if (aug.speed.enabled or aug.noise.enabled) else None
        max_speed = max(aug.speed.factors) if aug.speed.enabled and aug.speed.factors else 1.0

        kept: list[dict] = []
        dropped_duration = dropped_ctc = 0
        for e in entries:
            d = e["duration"]
            if not (min_duration <= d <= max_duration):
                dropped_duration += 1
                continue
            if tokenizer is not None and filter_ctc:
                # CTC needs at least one output frame per token; such utterances only give inf loss.
                n_tokens = len(tokenizer.encode(e["text"]))
                if n_tokens > output_frames(d / max_speed) or output_frames(d / max_speed) == 0:
                    dropped_ctc += 1
                    continue
            kept.append(e)
        self.entries = kept
        self.dropped_duration = dropped_duration
        self.dropped_ctc = dropped_ctc
        if dropped_duration or dropped_ctc:
            log.info(
                "dataset: kept %d utterances, dropped %d outside [%.2f, %.2f] s and %d with more tokens than frames",
                len(kept), dropped_duration, min_duration, max_duration, dropped_ctc,
            )

    def __len__(self) -> int:
        return len(self.entries)

    @property
    def durations(self) -> list[float]:
        return [e["duration"] for e in self.entries]

    def __getitem__(self, ref: int | tuple[int, int]) -> dict:
        if isinstance(ref, (tuple, list)):
            index, seed = int(ref[0]), int(ref[1])
        else:
            index, seed = int(ref), None
        entry = self.entries[index]
        from asr.audio import load_audio

        # fork_rng: torchaudio's masks and kaldi dither draw from the global torch generator; seeding
        # a forked copy keeps them reproducible without disturbing the caller's RNG stream.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed if seed is not None else index)
            rng = random.Random(seed if seed is not None else index)
            wave = load_audio(entry["audio"])
            if self.wave_augment is not None and seed is not None:
                wave = self.wave_augment(wave, rng)
            if self.features_on_device and seed is not None:
                item: dict = {"wave": wave, "seed": seed}
                if self.spec_augment is not None:  # drawn here, off the training loop
                    from asr.data.device_features import utterance_masks
                    from asr.frames import feature_frames_for_samples

                    item["spec_masks"] = utterance_masks(self.spec_augment, feature_frames_for_samples(wave.numel()), seed)
            else:
                feats = self._fbank(wave, dither=self.dither if seed is not None else 0.0)
                if self.spec_augment is not None and seed is not None:
                    feats = self.spec_augment(feats)
                item = {"features": feats.float()}
        item.update(id=entry["id"], text=entry["text"], duration=entry["duration"])
        if self.tokenizer is not None:
            item["tokens"] = torch.tensor(self.tokenizer.encode(entry["text"]), dtype=torch.long)
        return item


@dataclass
class Batch:
    """A padded batch. ``targets`` are padded with 0 (the blank id, never a real target).

    With ``data.features_on_device`` a training batch holds the waveforms instead of the features
    (``features`` is None; ``feature_lengths`` are already the fbank frame counts) until
    :meth:`with_device_features` computes them where the batch is."""

    ids: list[str]
    texts: list[str]
    features: torch.Tensor | None  # [B, T, 80] raw log-mel, zero padded at the end
    feature_lengths: torch.Tensor  # [B] long
    targets: torch.Tensor | None  # [B, U] long
    target_lengths: torch.Tensor | None  # [B] long
    durations: list[float]
    waves: torch.Tensor | None = None  # [B, N] float32, zero padded: features_on_device only
    wave_lengths: list[int] | None = None
    seeds: list[int] | None = None  # the sampler's per-utterance seeds (SpecAugment's masks)
    spec_masks: tuple[torch.Tensor, torch.Tensor] | None = None  # the workers' SpecAugment masks (device_features)

    def _map(self, fn) -> "Batch":
        opt = lambda t: None if t is None else fn(t)  # noqa: E731
        return replace(self, features=opt(self.features), feature_lengths=fn(self.feature_lengths),
                       targets=opt(self.targets), target_lengths=opt(self.target_lengths), waves=opt(self.waves),
                       spec_masks=None if self.spec_masks is None else (fn(self.spec_masks[0]), fn(self.spec_masks[1])))

    def to(self, device: torch.device | str) -> "Batch":
        nb = torch.device(device).type == "cuda"
        return self._map(lambda t: t.to(device, non_blocking=nb))

    def pin_memory(self) -> "Batch":
        """Called by DataLoader(pin_memory=True) so host-to-GPU copies can be asynchronous."""
        return self._map(lambda t: t.pin_memory())

    def with_device_features(self, spec_augment: SpecAugmentConfig | None) -> "Batch":
        """The batch with its features computed from its waveforms, on the waveforms' device."""
        if self.features is not None:
            return self
        from asr.data.device_features import batch_features

        assert self.waves is not None and self.wave_lengths is not None and self.seeds is not None
        # feature_lengths stay collate's feature_frames_for_samples(wave length): compute_fbank_padded makes exactly those
        feats, _ = batch_features(self.waves, self.wave_lengths, spec_augment, self.seeds, self.spec_masks)
        return replace(self, features=feats, waves=None)

    def __len__(self) -> int:
        return len(self.ids)


def collate(items: list[dict]) -> Batch:
    """Pad features (or, with ``features_on_device``, waveforms) and targets of dataset items into
    a :class:`Batch`."""
    if not items:
        raise ValueError("empty batch")
    waves = wave_lengths = seeds = feats = spec_masks = None
    if "wave" in items[0]:
        from asr.frames import feature_frames_for_samples

        wave_lengths = [it["wave"].numel() for it in items]
        waves = pad_sequence([it["wave"] for it in items], batch_first=True)  # zeros after each end
        lengths = torch.tensor([feature_frames_for_samples(n) for n in wave_lengths], dtype=torch.long)
        seeds = [int(it["seed"]) for it in items]
        if "spec_masks" in items[0]:
            from asr.data.device_features import stack_masks

            spec_masks = stack_masks([it["spec_masks"] for it in items])
    else:
        lengths = torch.tensor([it["features"].shape[0] for it in items], dtype=torch.long)
        feats = pad_sequence([it["features"] for it in items], batch_first=True)  # [B, T, 80], zero padded
    targets = target_lengths = None
    if "tokens" in items[0]:
        target_lengths = torch.tensor([it["tokens"].numel() for it in items], dtype=torch.long)
        targets = torch.zeros(len(items), max(1, int(target_lengths.max())), dtype=torch.long)
        for i, it in enumerate(items):
            targets[i, : it["tokens"].numel()] = it["tokens"]
    return Batch(
        ids=[it["id"] for it in items],
        texts=[it["text"] for it in items],
        features=feats,
        feature_lengths=lengths,
        targets=targets,
        target_lengths=target_lengths,
        durations=[it["duration"] for it in items],
        waves=waves,
        wave_lengths=wave_lengths,
        seeds=seeds,
        spec_masks=spec_masks,
    )
