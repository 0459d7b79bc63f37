"""Data pipeline: manifests, dataset, collate, bucketing sampler, augmentation."""
from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import pytest
import soundfile as sf
import torch

from asr.data.augment import (
    AugmentConfig,
    NoiseConfig,
    SpecAugment,
    SpecAugmentConfig,
    SpeedConfig,
    WaveAugment,
    fit_length,
    mix_at_snr,
    speed_perturb,
)
from asr.data.dataset import ManifestDataset, collate, output_frames
from asr.data.manifest import ManifestError, read_manifest, read_manifests, write_manifest
from asr.data.sampler import BucketingBatchSampler, sample_seed

DATA = Path(__file__).parent / "data" / "fsdd_small"


def _tone(path: Path, seconds: float, freq: float = 440.0, rate: int = 16000, amp: float = 0.3) -> Path:
    t = torch.arange(int(seconds * rate)) / rate
    sf.write(str(path), (amp * torch.sin(2 * torch.pi * freq * t)).numpy(), rate)
    return path


class _CharTokenizer:
    """Minimal stand-in with the Tokenizer's encode(): one id per letter (ids >= 1)."""

    def encode(self, text: str) -> list[int]:
        return [ord(c) - ord("a") + 2 if c.isalpha() else 1 for c in text.lower()]


@pytest.fixture(scope="module")
def fsdd_entries() -> list[dict]:
    return read_manifest(DATA / "manifest.jsonl")


# ---------------------------------------------------------------------- manifests
def test_manifest_paths_are_relative_and_survive_a_move(tmp_path: Path) -> None:
    (tmp_path / "corpus" / "wav").mkdir(parents=True)
    audio = _tone(tmp_path / "corpus" / "wav" / "a.wav", 0.5)
    out = tmp_path / "corpus" / "manifests" / "train.jsonl"
    n = write_manifest(out, [{"id": "a", "audio": str(audio), "duration": 0.5, "text": "hello", "speaker": "s1", "extra": 7}])
    assert n == 1
    line = json.loads(out.read_text().splitlines()[0])
    assert line["audio"] == "../wav/a.wav" and line["extra"] == 7
    moved = tmp_path / "elsewhere"
    shutil.copytree(tmp_path / "corpus", moved)
    (entry,) = read_manifest(moved / "manifests" / "train.jsonl")
    assert Path(entry["audio"]) == (moved / "wav" / "a.wav").resolve()
    assert Path(entry["audio"]).is_file()
    assert read_manifest(out, absolute=False)[0]["audio"] == "../wav/a.wav"
    assert not list(out.parent.glob(".*.tmp"))  # atomic write left no temporary behind


def test_manifest_errors_name_file_and_line(tmp_path: Path) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": "a", "audio": "a.wav", "duration": 1.0, "text": "x"}\n{"id": "b", "audio": "b.wav", "text": "y"}\n')
    with pytest.raises(ManifestError, match=r"bad.jsonl:2: missing key\(s\) duration"):
        read_manifest(bad)
    bad.write_text("{not json\n")
    with pytest.raises(ManifestError, match=r"bad.jsonl:1: invalid JSON"):
        read_manifest(bad)
    bad.write_text('{"id": "a", "audio": "a.wav", "duration": -1, "text": "x"}\n')
    with pytest.raises(ManifestError, match="negative"):
        read_manifest(bad)
    one = tmp_path / "one.jsonl"
    one.write_text('{"id": "a", "audio": "a.wav", "duration": 1.0, "text": "x"}\n')
    with pytest.raises(ManifestError, match="duplicate utterance id 'a'"):
        read_manifests([one, one])


# ---------------------------------------------------------------------- dataset and collate
def test_dataset_features_tokens_and_filters(fsdd_entries: list[dict]) -> None:
    tok = _CharTokenizer()
    ds = ManifestDataset(fsdd_entries, tok, min_duration=0.3, max_duration=0.6)
    assert 0 < len(ds) < len(fsdd_entries)
    assert all(0.3 <= d <= 0.6 for d in ds.durations)
    assert ds.dropped_duration == len(fsdd_entries) - len(ds)
    item = ds[0]
    n = sf.info(ds.entries[0]["audio"]).frames
    assert item["features"].shape == (1 + (n - 400) // 160, 80)
    assert item["tokens"].tolist() == tok.encode(ds.entries[0]["text"])

    # An utterance with more tokens than encoder frames cannot be aligned by CTC: dropped in training,
    # kept for evaluation.
    long_text = dict(fsdd_entries[0], id="long", text="z" * (output_frames(fsdd_entries[0]["duration"]) + 1))
    assert len(ManifestDataset([long_text], tok)) == 0
    assert len(ManifestDataset([long_text], tok, filter_ctc=False)) == 1


def test_augmented_items_depend_only_on_the_sample_seed(fsdd_entries: list[dict]) -> None:
    aug = AugmentConfig(spec_augment=SpecAugmentConfig(enabled=True), speed=SpeedConfig(enabled=True, factors=[0.9, 1.1]))
    ds = ManifestDataset(fsdd_entries[:4], _CharTokenizer(), augment=aug, dither=1.0)
    before = torch.get_rng_state()
    a, b = ds[(1, 123)]["features"], ds[(1, 123)]["features"]
    assert torch.equal(torch.get_rng_state(), before)  # the caller's RNG stream is untouched
    assert torch.equal(a, b)
    others = [ds[(1, s)]["features"] for s in (124, 125, 126)]
    assert any(o.shape != a.shape or not torch.equal(o, a) for o in others)
    clean = ManifestDataset(fsdd_entries[:4], _CharTokenizer())[1]["features"]
    assert torch.equal(clean, ManifestDataset(fsdd_entries[:4], _CharTokenizer())[(1, 999)]["features"])


def test_collate_pads_features_and_targets(fsdd_entries: list[dict]) -> None:
    ds = ManifestDataset(fsdd_entries[:3], _CharTokenizer())
    items = [ds[i] for i in range(3)]
    batch = collate(items)
    T = max(it["features"].shape[0] for it in items)
    assert batch.features.shape == (3, T, 80)
    for i, it in enumerate(items):
        t = it["features"].shape[0]
        assert batch.feature_lengths[i] == t
        assert torch.equal(batch.features[i, :t], it["features"])
        assert batch.features[i, t:].abs().sum() == 0
        u = it["tokens"].numel()
        assert batch.target_lengths[i] == u
        assert torch.equal(batch.targets[i, :u], it["tokens"]) and batch.targets[i, u:].sum() == 0
    assert batch.ids == [e["id"] for e in fsdd_entries[:3]]


def test_workers_give_the_same_batches_as_the_main_process(fsdd_entries: list[dict]) -> None:
    from torch.utils.data import DataLoader

    aug = AugmentConfig(speed=SpeedConfig(enabled=True))
    ds = ManifestDataset(fsdd_entries[:8], _CharTokenizer(), augment=aug)

    def run(workers: int) -> list[torch.Tensor]:
        sampler = BucketingBatchSampler(ds.durations, 2.0, num_buckets=2, seed=5)
        loader = DataLoader(ds, batch_sampler=sampler, collate_fn=collate, num_workers=workers,
                            generator=torch.Generator())
        return [b.features for b in loader]

    main, workers = run(0), run(2)
    assert len(main) == len(workers)
    # Same augmentation draws in both; only float rounding may differ, because DataLoader workers
    # run torch on one thread and the main process may use several (different FFT reductions).
    # (up to 2e-3 on log-mel of quiet bins). A different draw changes them by orders more.
    for x, y in zip(main, workers):
        assert x.shape == y.shape
        torch.testing.assert_close(x, y, rtol=1e-3, atol=1e-2)


# ---------------------------------------------------------------------- sampler
def _durations(n: int = 200, seed: int = 0) -> list[float]:
    rng = random.Random(seed)
    return [round(rng.uniform(0.5, 15.0), 2) for _ in range(n)]


def test_sampler_respects_budget_and_covers_every_item_once() -> None:
    durs = _durations() + [40.0]  # one utterance longer than the budget gets a batch of its own
    s = BucketingBatchSampler(durs, 60.0, num_buckets=8, seed=3)
    batches = s.epoch_batches(0)
    seen = [i for b in batches for i, _ in b]
    assert sorted(seen) == list(range(len(durs)))
    for b in batches:
        longest = max(durs[i] for i, _ in b)
        assert longest * len(b) <= 60.0 or len(b) == 1
    # per-sample seeds are those of sample_seed(seed, epoch, index)
    assert all(seed == sample_seed(3, 0, i) for b in batches for i, seed in b)
    # bucketing keeps padding small compared with one big bucket
    def padding(bs: list) -> float:
        return sum(max(durs[i] for i, _ in b) * len(b) - sum(durs[i] for i, _ in b) for b in bs)
    assert padding(batches) < 0.5 * padding(BucketingBatchSampler(durs, 60.0, num_buckets=1, seed=3).epoch_batches(0))
    assert BucketingBatchSampler(durs, 60.0, max_batch_size=2).epoch_batches(0) and all(
        len(b) <= 2 for b in BucketingBatchSampler(durs, 60.0, max_batch_size=2).epoch_batches(0))


def test_sampler_is_deterministic_per_epoch_and_reshuffles_between_epochs() -> None:
    durs = _durations()
    a = BucketingBatchSampler(durs, 60.0, seed=7)
    b = BucketingBatchSampler(durs, 60.0, seed=7)
    assert a.epoch_batches(0) == b.epoch_batches(0)
    assert a.epoch_batches(0) != a.epoch_batches(1)
    assert a.epoch_batches(0) != BucketingBatchSampler(durs, 60.0, seed=8).epoch_batches(0)
    fixed = BucketingBatchSampler(durs, 60.0, shuffle=False)
    # without shuffling the order is fixed; only the per-sample seeds change with the epoch
    assert [[i for i, _ in b] for b in fixed.epoch_batches(0)] == [[i for i, _ in b] for b in fixed.epoch_batches(1)]


def test_sampler_shards_for_ddp() -> None:
    durs = _durations(203)
    ranks = [BucketingBatchSampler(durs, 50.0, seed=1, rank=r, world_size=3) for r in range(3)]
    shards = [r.epoch_batches(0) for r in ranks]
    assert len({len(s) for s in shards}) == 1  # equal step counts, or DDP would hang
    items = [i for s in shards for b in s for i, _ in b]
    assert len(items) == len(set(items))  # disjoint
    total_batches = len(BucketingBatchSampler(durs, 50.0, seed=1).epoch_batches(0))
    assert total_batches - 3 < 3 * len(shards[0]) <= total_batches
    # evaluation sharding: every item exactly once, ranks may differ by a batch
    uneven = [BucketingBatchSampler(durs, 50.0, shuffle=False, rank=r, world_size=3, shard_mode="uneven") for r in range(3)]
    assert sorted(i for s in uneven for b in s.epoch_batches(0) for i, _ in b) == list(range(len(durs)))
    padded = [BucketingBatchSampler(durs, 50.0, seed=1, rank=r, world_size=3, shard_mode="pad") for r in range(3)]
    assert len({len(s.epoch_batches(0)) for s in padded}) == 1
    assert {i for s in padded for b in s.epoch_batches(0) for i, _ in b} == set(range(len(durs)))


def test_sampler_resumes_mid_epoch() -> None:
    durs = _durations()
    s = BucketingBatchSampler(durs, 60.0, seed=11, rank=1, world_size=2)
    s.set_epoch(2)
    full = list(s)
    it = iter(s)
    for _ in range(5):
        next(it)
        s.advance()
    state = s.state_dict()
    t = BucketingBatchSampler(durs, 60.0, seed=11, rank=1, world_size=2)
    t.load_state_dict(state)
    assert (t.epoch, t.position) == (2, 5)
    assert list(t) == full[5:]
    assert len(t) == len(full) and t.remaining() == len(full) - 5
    with pytest.raises(ValueError, match="world_size"):
        BucketingBatchSampler(durs, 60.0, seed=11, world_size=1).load_state_dict(state)


# ---------------------------------------------------------------------- augmentation
def test_spec_augment_masks_with_the_mean_and_can_be_disabled() -> None:
    torch.manual_seed(0)
    feats = torch.randn(300, 80) * 3 + 5
    out = SpecAugment(SpecAugmentConfig(freq_masks=2, freq_width=10, time_masks=3, time_width=20))(feats)
    assert out.shape == feats.shape
    changed = out != feats
    assert changed.any()
    assert torch.allclose(out[changed], torch.full_like(out[changed], float(feats.mean())))
    off = SpecAugment(SpecAugmentConfig(enabled=False))(feats)
    assert torch.equal(off, feats)
    # time masks never exceed time_width_ratio of a short utterance
    short = torch.randn(20, 80)
    masked_frames = (SpecAugment(SpecAugmentConfig(freq_masks=0, time_masks=1, time_width_ratio=0.1))(short) != short).all(1)
    assert int(masked_frames.sum()) <= 2


@pytest.mark.parametrize("cfg", [SpecAugmentConfig(), SpecAugmentConfig(freq_width=15, time_masks=2, time_width=25),
                                 SpecAugmentConfig(freq_width=120, freq_masks=3), SpecAugmentConfig(freq_width=0)])
@pytest.mark.parametrize("frames", [7, 60, 400])
def test_spec_augment_equals_torchaudios_masking(cfg, frames) -> None:
    """SpecAugment draws its masks itself (so the trainer can redraw them, asr.data.device_features)
    but is torchaudio's FrequencyMasking then TimeMasking, the same draws from the same generator:
    the same output. freq_width 120 > 80 bins covers a start clamped to 0."""
    import torchaudio.transforms as AT

    for seed in range(20):
        feats = torch.randn(frames, 80) * 3 + 5
        x = feats.t().unsqueeze(0)  # torchaudio's [..., freq, time]
        fill = float(feats.mean())
        torch.manual_seed(seed)
        if cfg.freq_width > 0:
            for _ in range(cfg.freq_masks):
                x = AT.FrequencyMasking(cfg.freq_width)(x, mask_value=fill)
        width = min(cfg.time_width, int(cfg.time_width_ratio * frames))
        if width > 0:
            for _ in range(cfg.time_masks):
                x = AT.TimeMasking(width)(x, mask_value=fill)
        want = x.squeeze(0).t()
        torch.manual_seed(seed)
        assert torch.equal(SpecAugment(cfg)(feats), want), seed


def test_speed_perturbation_changes_duration() -> None:
    wave = torch.randn(16000)
    assert abs(speed_perturb(wave, 1.1).numel() - 16000 / 1.1) <= 2
    assert abs(speed_perturb(wave, 0.9).numel() - 16000 / 0.9) <= 2
    assert speed_perturb(wave, 1.0) is wave


def test_noise_is_mixed_at_the_requested_snr(tmp_path: Path) -> None:
    torch.manual_seed(0)
    speech = torch.sin(torch.arange(16000) * 0.05) * 0.5
    noise = torch.randn(16000) * 0.1
    mixed = mix_at_snr(speech, noise, 10.0)
    residual = mixed - speech
    snr = 10 * torch.log10(speech.pow(2).sum() / residual.pow(2).sum())
    assert abs(float(snr) - 10.0) < 0.01
    assert torch.equal(mix_at_snr(speech, torch.zeros(16000), 10.0), speech)  # silent noise: unchanged
    assert fit_length(torch.arange(5.0), 12, random.Random(0)).numel() == 12

    noise_file = tmp_path / "noise.wav"
    sf.write(str(noise_file), (torch.randn(8000) * 0.2).numpy(), 16000)
    write_manifest(tmp_path / "noise.jsonl", [{"id": "n", "audio": str(noise_file), "duration": 0.5, "text": ""}])
    wa = WaveAugment(SpeedConfig(enabled=False), NoiseConfig(enabled=True, manifest=str(tmp_path / "noise.jsonl"),
                                                             prob=1.0, snr_db=[5.0, 6.0]))
    out = wa(speech, random.Random(1))
    snr = 10 * torch.log10(speech.pow(2).sum() / (out - speech).pow(2).sum())
    assert 4.95 < float(snr) < 6.05
    with pytest.raises(ValueError, match="manifest is not set"):
        WaveAugment(SpeedConfig(), NoiseConfig(enabled=True))


def test_augment_config_from_dict_rejects_unknown_sections() -> None:
    cfg = AugmentConfig.from_dict({"spec_augment": {"enabled": False}, "speed": {"enabled": True, "factors": [1.1]}})
    assert not cfg.spec_augment.enabled and cfg.speed.factors == [1.1] and not cfg.noise.enabled
    with pytest.raises(ValueError, match="unknown"):
        AugmentConfig.from_dict({"reverb": {}})
