"""``data.features_on_device``: fbank and SpecAugment for a whole batch where the batch is
(asr/data/device_features.py) give the features the DataLoader workers would have made."""
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from asr.data.augment import AugmentConfig, SpecAugmentConfig, SpeedConfig
from asr.data.dataset import ManifestDataset, collate
from asr.data.manifest import read_manifest

DATA = Path(__file__).parent / "data"


def entries() -> list[dict]:
    fsdd = read_manifest(DATA / "fsdd_small" / "manifest.jsonl")[:6]
    long = {"id": "goforward", "audio": str(DATA / "audio/pocketsphinx_goforward.flac"), "duration": 2.9,
            "text": "go forward ten meters"}
    return fsdd + [long]


@pytest.mark.parametrize("spec", [SpecAugmentConfig(), SpecAugmentConfig(freq_width=15, time_masks=2, time_width=25),
                                  SpecAugmentConfig(enabled=False)])
def test_device_features_equal_the_workers_features(spec):
    augment = AugmentConfig(spec_augment=spec, speed=SpeedConfig(enabled=True))
    in_worker = ManifestDataset(entries(), augment=augment)
    on_device = ManifestDataset(entries(), augment=augment, features_on_device=True)
    refs = [(i, 1000 + 7 * i) for i in range(len(in_worker))]  # (index, sampler seed): training items
    want = collate([in_worker[r] for r in refs])
    batch = collate([on_device[r] for r in refs])
    assert batch.features is None and batch.waves is not None
    assert batch.feature_lengths.tolist() == want.feature_lengths.tolist()
    assert (batch.spec_masks is not None) == spec.enabled  # the workers drew them
    got = batch.with_device_features(spec)
    assert got.waves is None and got.features.shape == want.features.shape
    torch.testing.assert_close(got.features, want.features, rtol=1e-5, atol=1e-4)
    # a batch without the workers' masks draws the same ones itself
    redrawn = replace(batch, spec_masks=None).with_device_features(spec)
    torch.testing.assert_close(redrawn.features, want.features, rtol=1e-5, atol=1e-4)
    if spec.enabled:  # the masks were there to match: without them the features differ
        plain = collate([ManifestDataset(entries(), augment=AugmentConfig(
            spec_augment=SpecAugmentConfig(enabled=False), speed=SpeedConfig(enabled=True)))[r] for r in refs])
        assert (plain.features - want.features).abs().amax() > 1.0
    # evaluation items (no seed) keep their features in the worker
    assert on_device[0]["features"].shape == in_worker[0]["features"].shape


def test_features_on_device_needs_no_dither():
    with pytest.raises(ValueError, match="dither"):
        ManifestDataset(entries(), dither=1.0, features_on_device=True)
