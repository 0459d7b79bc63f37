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
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
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
    ) -> None:
        from asr.features import compute_fbank  # imported here: frontend module owned by another helper

        self._fbank: Callable[..., torch.Tensor] = compute_fbank
        self.tokenizer = tokenizer
        self.dither = float(dither)
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
            feats = self._fbank(wave, dither=self.dither if seed is not None else 0.0)
            if self.spec_augment is not None and seed is not None:
                feats = self.spec_augment(feats)
        item = {
            "id": entry["id"],
            "features": feats.float(),
            "text": entry["text"],
            "duration": entry["duration"],
        }
        if self.tokenizer is not None:
            item["tokens"] = torch.tensor(self.tokenizer.encode(entry["text"]), dtype=torch.long)
        return item


@dataclass
class Batch:
    """A padded batch. ``targets`` are padded with 0 (the blank id, never a real target)."""

    ids: list[str]
    texts: list[str]
    features: torch.Tensor  # [B, T, 80] raw log-mel, zero padded at the end
    feature_lengths: torch.Tensor  # [B] long
    targets: torch.Tensor | None  # [B, U] long
    target_lengths: torch.Tensor | None  # [B] long
    durations: list[float]

    def to(self, device: torch.device | str) -> "Batch":
        nb = torch.device(device).type == "cuda"
        return Batch(
            self.ids,
            self.texts,
            self.features.to(device, non_blocking=nb),
            self.feature_lengths.to(device, non_blocking=nb),
            None if self.targets is None else self.targets.to(device, non_blocking=nb),
            None if self.target_lengths is None else self.target_lengths.to(device, non_blocking=nb),
            self.durations,
        )

    def pin_memory(self) -> "Batch":
        """Called by DataLoader(pin_memory=True) so host-to-GPU copies can be asynchronous."""
        return Batch(
            self.ids, self.texts, self.features.pin_memory(), self.feature_lengths.pin_memory(),
            None if self.targets is None else self.targets.pin_memory(),
            None if self.target_lengths is None else self.target_lengths.pin_memory(),
            self.durations,
        )

    def __len__(self) -> int:
        return len(self.ids)


def collate(items: list[dict]) -> Batch:
    """Pad features and targets of dataset items into a :class:`Batch`."""
    if not items:
        raise ValueError("empty batch")
    n_mels = items[0]["features"].shape[-1]
    lengths = torch.tensor([it["features"].shape[0] for it in items], dtype=torch.long)
    feats = torch.zeros(len(items), int(lengths.max()), n_mels)
    for i, it in enumerate(items):
        feats[i, : it["features"].shape[0]] = it["features"]
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
    )
