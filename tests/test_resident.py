"""The device-resident corpus (``data.resident``): fixed batch shapes, the sampler's epochs and
resume, and batches whose features equal the per-utterance pipeline's."""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from asr.audio import load_audio
from asr.data.augment import SpecAugmentConfig, speed_perturb
from asr.data.manifest import read_manifests
from asr.data.resident import (
    EMPTY,
    FixedShapeSampler,
    PlannedBatch,
    ResidentBatches,
    ResidentCorpus,
    ShapeClasses,
    spec_augment_batch,
)
from asr.features import compute_fbank

DATA = Path(__file__).parent / "data"


class _CharTokenizer:
    def encode(self, text: str) -> list[int]:
        return [1 + ord(c) - ord("a") if c.isalpha() else 27 for c in text]


def _entries() -> list[dict]:
    small = read_manifests([str(DATA / "fsdd_small" / "manifest.jsonl")])
    ids = {e["id"] for e in small}
    return small + [e for e in read_manifests([str(DATA / "manifest.jsonl")]) if e["id"] not in ids]


@pytest.mark.parametrize("per_octave,slowest", [(1, 1.0), (2, 0.9)])
def test_every_utterance_fits_its_shape_and_batches_stay_within_budget(per_octave, slowest):
    durations = [0.3, 0.45, 0.8, 1.1, 2.0, 2.8, 7.5, 13.0, 29.9]
    shapes = ShapeClasses.build(durations, batch_seconds=60.0, per_octave=per_octave, slowest=slowest)
    assert all(b < a for a, b in zip(shapes.seconds, shapes.seconds[1:]))
    for d in durations:
        k = shapes.of(d)
        assert d / slowest <= shapes.seconds[k] + 1e-9
        if k + 1 < len(shapes):
            assert d / slowest > shapes.seconds[k + 1]  # the shortest class that holds it
        assert shapes.samples_in[k] >= d * 16000
        assert shapes.samples[k] >= shapes.seconds[k] * 16000  # the stretched class length, whole
    for rows, seconds, frames in zip(shapes.rows, shapes.seconds, shapes.frames):
        assert frames % 4 == 0
        assert rows == 1 or rows * seconds <= 60.0
    assert len(shapes) <= per_octave * math.ceil(math.log2(29.9 / 0.3)) + 1
    fixed = ShapeClasses.build(durations[:5], batch_seconds=60.0, per_octave=per_octave, slowest=slowest, longest=30.0)
    again = ShapeClasses.build(durations[2:], batch_seconds=60.0, per_octave=per_octave, slowest=slowest, longest=30.0)
    n = min(len(fixed), len(again))
    assert fixed.frames[:n] == again.frames[:n] and fixed.rows[:n] == again.rows[:n]  # same shapes, any corpus


def test_sampler_covers_the_epoch_once_and_resumes_exactly():
    durations = [0.3 + 0.1 * (i % 37) for i in range(200)]
    shapes = ShapeClasses.build(durations, batch_seconds=8.0)
    sampler = FixedShapeSampler(durations, shapes, seed=3)
    batches = list(sampler)
    seen = [i for b in batches for i in b.indices if i != EMPTY]
    assert sorted(seen) == list(range(200))
    for b in batches:
        assert len(b.indices) == len(b.factors) == shapes.rows[b.k]
        assert all(shapes.of(durations[i]) == b.k for i in b.indices if i != EMPTY)
    sampler.set_epoch(1)
    assert [b.indices for b in sampler] != [b.indices for b in batches]  # a new order each epoch
    sampler.advance(5)
    state = sampler.state_dict()
    resumed = FixedShapeSampler(durations, shapes, seed=3)
    resumed.load_state_dict(state)
    assert list(resumed) == list(sampler)
    with pytest.raises(ValueError, match="seed"):
        FixedShapeSampler(durations, shapes, seed=4).load_state_dict(state)


def test_speed_factors_are_drawn_per_epoch_and_sped_up_utterances_take_shorter_classes():
    """Classes by the length each utterance has at its own factor: a sped-up one may go one class
    shorter, so batches carry less padding than classes built for the slowest factor would."""
    durations = [0.3 + 0.1 * (i % 37) for i in range(400)]
    factors = (0.9, 1.0, 1.1)
    shapes = ShapeClasses.build(durations, batch_seconds=8.0, slowest=0.9, fastest=1.1)
    sampler = FixedShapeSampler(durations, shapes, factors, seed=5)
    batches = list(sampler)
    drawn = {i: f for b in batches for i, f in zip(b.indices, b.factors) if i != EMPTY}
    assert sorted(drawn) == list(range(400)) and set(drawn.values()) == set(factors)
    for b in batches:
        for i, f in zip(b.indices, b.factors):
            if i != EMPTY:
                assert durations[i] / f <= shapes.seconds[b.k] + 1e-9  # fits at its own speed
                assert durations[i] * 16000 <= shapes.samples_in[b.k]  # and is read whole
    moved = sum(shapes.of(durations[i], f) > shapes.of(durations[i]) for i, f in drawn.items())
    assert moved > 0
    padded = sum(shapes.rows[b.k] * shapes.seconds[b.k] for b in batches)
    at_slowest = FixedShapeSampler(durations, shapes, (0.9,), seed=5)
    assert padded < sum(shapes.rows[b.k] * shapes.seconds[b.k] for b in at_slowest)
    sampler.set_epoch(1)
    assert sampler.epoch_factors(1) != sampler.epoch_factors(0)
    with pytest.raises(ValueError, match="faster"):
        FixedShapeSampler(durations, ShapeClasses.build(durations, batch_seconds=8.0, slowest=0.9), factors)


def test_ranks_run_the_same_shape_at_every_step_on_disjoint_utterances():
    durations = [0.3 + 0.05 * (i % 61) for i in range(300)]
    shapes = ShapeClasses.build(durations, batch_seconds=6.0, slowest=0.9, fastest=1.1)
    ranks = [list(FixedShapeSampler(durations, shapes, (0.9, 1.0, 1.1), seed=1, rank=r, world_size=2)) for r in range(2)]
    assert len(ranks[0]) == len(ranks[1]) > 0
    assert [b.k for b in ranks[0]] == [b.k for b in ranks[1]]
    mine = [{i for b in r for i in b.indices if i != EMPTY} for r in ranks]
    assert not mine[0] & mine[1]


def _corpus(speed=(1.0,), spec=None) -> ResidentCorpus:
    entries = _entries()
    shapes = ShapeClasses.build([e["duration"] for e in entries], batch_seconds=4.0, slowest=min(speed), fastest=max(speed))
    return ResidentCorpus(entries, _CharTokenizer(), shapes, "cpu", speed_factors=speed, spec_augment=spec)


def _sampler(corpus: ResidentCorpus) -> FixedShapeSampler:
    return FixedShapeSampler([e["duration"] for e in corpus.entries], corpus.shapes, corpus.speed_factors, seed=0)


def test_batch_features_and_targets_equal_each_utterance_alone():
    corpus = _corpus()
    sampler = _sampler(corpus)
    checked = 0
    for (k, indices, _, _), batch in zip(sampler.epoch_batches(), ResidentBatches(corpus, sampler)):
        sh = corpus.shapes
        assert batch.features.shape == (sh.rows[k], sh.frames[k], 80)
        assert batch.targets.shape[0] == sh.rows[k]
        for row, i in enumerate(indices):
            n = int(batch.feature_lengths[row])
            if i == EMPTY:
                assert n == 0 and int(batch.target_lengths[row]) == 0
                assert batch.features[row].abs().max() == 0
                continue
            e = corpus.entries[i]
            want = compute_fbank(load_audio(e["audio"]))
            assert n == want.shape[0]
            torch.testing.assert_close(batch.features[row, :n], want, atol=2e-3, rtol=1e-4)
            assert batch.features[row, n:].abs().max() == 0
            tokens = _CharTokenizer().encode(e["text"])
            assert batch.targets[row, : len(tokens)].tolist() == tokens
            checked += 1
        assert len(batch) == sum(i != EMPTY for i in indices)
    assert checked == len(corpus.entries)


def test_a_file_listed_twice_is_held_once_and_batched_as_itself():
    """A part weighted up by repeating its entries (tools/device/jobs/corpus.sh) costs no second copy."""
    entries = _entries()
    twice = entries + [dict(e, id=e["id"] + "#1") for e in entries]
    shapes = ShapeClasses.build([e["duration"] for e in twice], batch_seconds=4.0)
    corpus = ResidentCorpus(twice, _CharTokenizer(), shapes, "cpu")
    once = ResidentCorpus(entries, _CharTokenizer(), shapes, "cpu")
    assert corpus.audio.numel() == once.audio.numel()
    n = len(entries)
    for i in range(n):
        k = shapes.of(entries[i]["duration"])
        a, b = corpus.batch(PlannedBatch(k, [i], [1.0], 0)), corpus.batch(PlannedBatch(k, [i + n], [1.0], 0))
        assert torch.equal(a.features, b.features) and torch.equal(a.targets, b.targets)


def test_speed_perturbed_rows_equal_torchaudio_speed_of_the_utterance():
    corpus = _corpus(speed=(0.9, 1.1))
    planned = _sampler(corpus).epoch_batches()[0]
    batch = corpus.batch(planned)
    for row, (i, f) in enumerate(zip(planned.indices, planned.factors)):
        if i == EMPTY:
            continue
        want = compute_fbank(speed_perturb(load_audio(corpus.entries[i]["audio"]), f))
        n = int(batch.feature_lengths[row])
        assert abs(n - want.shape[0]) <= 1
        m = min(n, want.shape[0]) - 2  # the last frames see the resampler's edge differently
        torch.testing.assert_close(batch.features[row, :m], want[:m], atol=0.05, rtol=0.01)


def test_spec_augment_masks_only_valid_frames_with_the_row_mean():
    torch.manual_seed(0)
    feats = torch.randn(4, 200, 80) + 5.0
    lengths = torch.tensor([200, 120, 30, 0])
    feats[1, 120:] = 0
    feats[2, 30:] = 0
    feats[3] = 0
    cfg = SpecAugmentConfig(enabled=True, freq_masks=2, freq_width=20, time_masks=3, time_width=40, time_width_ratio=0.2)
    out = spec_augment_batch(feats, lengths, cfg, torch.Generator().manual_seed(1))
    changed = out != feats
    for b, n in enumerate(lengths.tolist()):
        assert not changed[b, n:].any()  # padding untouched
        if n:
            mean = feats[b, :n].mean()
            torch.testing.assert_close(out[b][changed[b]], mean.expand(int(changed[b].sum())))
    assert changed[0].any()
    # a time mask of row 2 spans at most 0.2 * 30 = 6 frames each, 3 masks
    fully_masked_frames = changed[2, :30].all(dim=1).sum()
    assert fully_masked_frames <= 18
    again = spec_augment_batch(feats, lengths, cfg, torch.Generator().manual_seed(1))
    assert torch.equal(out, again)


# ---------------------------------------------------------------------- in the trainer
def _trainer(tmp_path: Path, run: str, *extra: str):
    from hydra import compose, initialize_config_dir

    import asr.cli.train  # noqa: F401  (resolvers)
    from asr.data.manifest import read_manifest, write_manifest
    from asr.train.trainer import Trainer

    entries = read_manifest(DATA / "fsdd_small" / "manifest.jsonl")
    if not (tmp_path / "train.jsonl").exists():
        write_manifest(tmp_path / "train.jsonl", [e for e in entries if e["speaker"] == "fsdd_george"])
    overrides = [
        "model=tiny", "trainer=cpu", "trainer.num_threads=1", f"data.train_manifests=[{tmp_path / 'train.jsonl'}]",
        "data.dev_manifests=[]", "data.num_workers=0", "data.max_batch_seconds=3", "data.cmvn_utterances=20",
        "tokenizer.vocab_size=40", f"tokenizer.dir={tmp_path / 'tok'}", "optim.warmup_steps=5", "optim.lr=3e-3",
        "trainer.log_every=1", "data.resident=true", "data.augment.speed.enabled=true", *extra,
    ]
    conf = Path(__file__).resolve().parents[1] / "conf"
    with initialize_config_dir(config_dir=str(conf), version_base="1.3"):
        cfg = compose("config", overrides=overrides)
    return Trainer(cfg, tmp_path / run)


def _losses(run_dir: Path) -> list[float]:
    import json

    return [json.loads(line)["train/loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()
            if "train/loss" in line]


def test_trainer_learns_from_the_resident_corpus_and_resumes_exactly(tmp_path: Path):
    """data.resident=true trains (the loss falls), and a run stopped and resumed makes the same
    batches and ends with the same weights as one that was not stopped."""
    whole = _trainer(tmp_path, "whole", "trainer.max_steps=30")
    summary = whole.fit()
    losses = _losses(tmp_path / "whole")
    assert len(losses) == 30
    assert sum(losses[-5:]) < 0.7 * sum(losses[:5])
    assert whole.train_sampler.epoch >= 1  # the epochs roll over
    keep = ("trainer.max_steps=30", "trainer.save_every=12", "trainer.keep_last=5")
    _trainer(tmp_path, "split", *keep).fit()  # writes step 12 ...
    first = _trainer(tmp_path, "resumed", *keep)
    import shutil

    shutil.copytree(tmp_path / "split", tmp_path / "resumed", dirs_exist_ok=True)
    kept = sorted((tmp_path / "resumed" / "checkpoints").glob("ckpt-step*.pt"))
    assert [p.name for p in kept] == [f"ckpt-step{s:09d}.pt" for s in (12, 24, 30)]
    kept = kept[1:]
    for ckpt in kept:
        ckpt.unlink()  # ... and continues from step 12 alone
    resumed = first.fit()
    assert first.train_sampler.position > 0 or first.train_sampler.epoch > 0
    assert len(_losses(tmp_path / "resumed")) == 30 + 18  # the split run's 30 lines, then steps 13..30
    assert resumed["weights_sha256"] == summary["weights_sha256"]


def test_compile_fixed_needs_the_resident_corpus(tmp_path: Path):
    with pytest.raises(ValueError, match="data.resident"):
        _trainer(tmp_path, "x", "trainer.max_steps=1", "data.resident=false", "trainer.compile=fixed").fit()


def test_device_fbank_equals_kaldi_fbank_of_each_row():
    """The resident batches' fbank (no host copies) is compute_fbank's, row by row, zero past a row."""
    from asr.data.resident import DeviceFbank
    from asr.frames import feature_frames_for_samples

    torch.manual_seed(0)
    lengths = [16000, 9000, 401, 0]
    waves = torch.zeros(4, 16000)
    for r, n in enumerate(lengths):
        waves[r, :n] = 0.3 * torch.randn(n) * torch.linspace(0.1, 1.0, n)
    counts = torch.tensor([feature_frames_for_samples(n) for n in lengths])
    feats = DeviceFbank()(waves, counts)
    assert feats.shape == (4, feature_frames_for_samples(16000), 80)
    for r, n in enumerate(lengths):
        t = int(counts[r])
        if t:
            torch.testing.assert_close(feats[r, :t], compute_fbank(waves[r, :n]), atol=2e-3, rtol=1e-4)
        assert not feats[r, t:].any()
