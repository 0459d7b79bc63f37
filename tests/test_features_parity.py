"""asr.features: offline fbank, streaming parity (any chunking), per-frame locality, global CMVN."""
from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pytest
import torch
import torchaudio.compliance.kaldi as kaldi

from asr.audio import iter_audio_blocks, load_audio
from asr.features import (
    LOG_FLOOR,
    NUM_MEL_BINS,
    GlobalCMVN,
    StreamingFbank,
    accept_waveforms,
    compute_cmvn_stats,
    compute_fbank,
    compute_fbank_batch,
    compute_fbank_padded,
)
from asr.frames import FEATURE_HOP, FEATURE_WINDOW, feature_frames_for_samples

DATA = Path(__file__).parent / "data"
MANIFEST = DATA / "manifest.jsonl"
ROWS = [json.loads(line) for line in MANIFEST.read_text().splitlines() if line.strip()]
GOFORWARD = DATA / "audio" / "pocketsphinx_goforward.flac"
SHARED_REAL = Path(__file__).resolve().parents[2] / "shared" / "data" / "real"

# Streaming vs offline: the same float32 ops per frame; differences are rounding in batched
# matmul/FFT (measured <= 1.9e-6 = 1 ulp at |x| = 16 on log-mel values in about [-16, 25]).
ATOL = 1e-5


@pytest.fixture(autouse=True, scope="module")
def _one_intra_op_thread():
    """Tiny per-call tensors: on a shared 2-core machine, OpenMP's second thread only adds
    wake-up latency (measured 1.5-8 ms per F.pad call with 2 threads vs 0.1 ms with 1)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def random_speechlike(n: int, seed: int) -> torch.Tensor:
    """Noise with a slow envelope and a DC offset, silence at the start: exercises DC removal,
    pre-emphasis and the log floor."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, generator=g) * 0.1
    env = torch.sin(torch.linspace(0, 6 * math.pi, n)).abs()
    x = x * env + 0.05
    x[: min(n, 900)] = 0.0
    return x


def stream(x: torch.Tensor, sizes) -> torch.Tensor:
    """Run StreamingFbank over x cut into pieces of the given sizes (cycled); check its state."""
    fb = StreamingFbank()
    outs, i, k = [], 0, 0
    while i < x.numel():
        n = sizes[k % len(sizes)]
        k += 1
        piece = x[i : i + n]
        i += n
        out = fb.accept_waveform(piece)
        assert out.shape[1] == NUM_MEL_BINS and out.dtype == torch.float32
        assert fb.buffered_samples < FEATURE_WINDOW
        outs.append(out)
    assert fb.num_samples == x.numel() and fb.num_frames == feature_frames_for_samples(x.numel())
    return torch.cat(outs) if outs else torch.zeros(0, NUM_MEL_BINS)


def random_sizes(seed: int, max_size: int, count: int = 4000) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, max_size + 1, (count,), generator=g).tolist()  # includes 0-sized pieces


# ----------------------------------------------------------------------------- offline extractor


@pytest.mark.parametrize("n", [0, 1, 399, 400, 401, 559, 560, 561, 16000, 16123])
def test_frame_count_snip_edges(n):
    feats = compute_fbank(random_speechlike(n, n) if n else torch.zeros(0))
    expected = 0 if n < 400 else 1 + (n - 400) // 160
    assert feats.shape == (expected, NUM_MEL_BINS) == (feature_frames_for_samples(n), NUM_MEL_BINS)
    assert feats.dtype == torch.float32 and torch.isfinite(feats).all()


def test_matches_kaldi_fbank_on_int16_scale():
    """The documented convention: Kaldi fbank of the waveform scaled to int16 range."""
    x = load_audio(GOFORWARD)
    ref = kaldi.fbank(
        (x * 32768).unsqueeze(0), num_mel_bins=80, frame_length=25.0, frame_shift=10.0,
        dither=0.0, energy_floor=0.0, snip_edges=True, sample_frequency=16000.0,
    )
    assert torch.equal(compute_fbank(x), ref)


def test_log_power_scaling():
    """Doubling the amplitude adds log(4) to every bin above the floor: features are log power."""
    x = random_speechlike(8000, 1)[1000:]
    a, b = compute_fbank(x), compute_fbank(2 * x)
    torch.testing.assert_close(b - a, torch.full_like(a, math.log(4.0)), rtol=0, atol=1e-4)


@pytest.mark.parametrize("row", ROWS, ids=[r["id"] for r in ROWS])
def test_int16_scale_keeps_real_audio_off_the_floor(row):
    """Why we scale by 32768: on the [-1, 1] scale some quiet bins of real recordings hit the
    fixed log(eps) floor; on the int16 scale (Kaldi's) none do."""
    x = load_audio(MANIFEST.parent / row["audio"])
    assert compute_fbank(x).min() > LOG_FLOOR + 10


@pytest.mark.parametrize("value", [0.0, 0.25, -1.0])
def test_digital_silence_and_dc_are_finite(value):
    """All-zero or constant input: DC removal leaves exact zeros, the log is floored at
    log(float32 eps) = -15.94 instead of -inf."""
    feats = compute_fbank(torch.full((4000,), value))
    assert feats.shape == (feature_frames_for_samples(4000), NUM_MEL_BINS)
    assert torch.isfinite(feats).all()
    torch.testing.assert_close(feats, torch.full_like(feats, LOG_FLOOR), rtol=0, atol=1e-6)
    assert abs(LOG_FLOOR - math.log(torch.finfo(torch.float32).eps)) < 1e-6


def test_dither_changes_output_only_when_asked():
    x = random_speechlike(4000, 2)
    assert torch.equal(compute_fbank(x), compute_fbank(x))
    torch.manual_seed(0)
    dithered = compute_fbank(x, dither=1.0)
    assert not torch.equal(dithered, compute_fbank(x))
    assert torch.isfinite(dithered).all()
    # dither lifts digital silence off the floor (1 int16 LSB of noise)
    assert compute_fbank(torch.zeros(4000), dither=1.0).min() > LOG_FLOOR + 1


def test_each_frame_depends_only_on_its_400_samples():
    """Why streaming can be exact: DC removal, pre-emphasis, window and FFT are per frame, so
    frame i of the whole signal equals the extractor run on samples [160 i, 160 i + 400) alone."""
    x = load_audio(GOFORWARD)[: 16000]
    whole = compute_fbank(x)
    single = torch.stack(
        [compute_fbank(x[FEATURE_HOP * i : FEATURE_HOP * i + FEATURE_WINDOW])[0] for i in range(whole.shape[0])]
    )
    torch.testing.assert_close(single, whole, rtol=0, atol=ATOL)


# ----------------------------------------------------------------------------- streaming parity


@pytest.mark.parametrize("seed", range(6))
def test_parity_random_chunkings_synthetic(seed):
    x = random_speechlike(16000 + 37 * seed, seed)
    ref = compute_fbank(x)
    max_size = [5, 150, 400, 1000, 7000, 40000][seed]
    got = stream(x, random_sizes(seed, max_size))
    assert got.shape == ref.shape
    torch.testing.assert_close(got, ref, rtol=0, atol=ATOL)


def test_parity_one_sample_pieces_short_audio():
    x = random_speechlike(2000, 7)  # 11 frames, 2000 calls
    ref = compute_fbank(x)
    got = stream(x, [1])
    assert got.shape == ref.shape == (11, NUM_MEL_BINS)
    torch.testing.assert_close(got, ref, rtol=0, atol=ATOL)


@pytest.mark.parametrize("sizes", [[399], [400], [401], [160], [159, 161], [1, 398, 1, 400], [0, 0, 800]])
def test_parity_boundary_piece_sizes(sizes):
    x = random_speechlike(5000, 11)
    ref = compute_fbank(x)
    got = stream(x, sizes)
    assert got.shape == ref.shape
    torch.testing.assert_close(got, ref, rtol=0, atol=ATOL)


def test_parity_whole_signal_in_one_call_and_empty_calls():
    x = random_speechlike(30000, 12)
    fb = StreamingFbank()
    assert fb.accept_waveform(torch.zeros(0)).shape == (0, NUM_MEL_BINS)
    assert fb.accept_waveform(x[:399]).shape == (0, NUM_MEL_BINS)
    out = torch.cat([fb.accept_waveform(x[399:]), fb.accept_waveform(torch.zeros(0))])
    torch.testing.assert_close(out, compute_fbank(x), rtol=0, atol=ATOL)


def test_parity_reset_starts_a_new_stream():
    a, b = random_speechlike(3000, 13), random_speechlike(2500, 14)
    fb = StreamingFbank()
    fb.accept_waveform(a[:1234])
    fb.reset()
    assert fb.buffered_samples == 0 and fb.num_frames == 0 and fb.num_samples == 0
    got = torch.cat([fb.accept_waveform(b[:1000]), fb.accept_waveform(b[1000:])])
    torch.testing.assert_close(got, compute_fbank(b), rtol=0, atol=ATOL)


@pytest.mark.parametrize("row", ROWS, ids=[r["id"] for r in ROWS])
def test_parity_real_files_random_chunkings(row):
    x = load_audio(MANIFEST.parent / row["audio"])
    ref = compute_fbank(x)
    assert ref.shape[0] == feature_frames_for_samples(x.numel()) > 0
    for seed, max_size in enumerate((50, 480, 3200, 100000)):
        got = stream(x, random_sizes(seed, max_size))
        assert got.shape == ref.shape
        torch.testing.assert_close(got, ref, rtol=0, atol=ATOL)


def test_parity_file_blocks_through_streaming_fbank():
    """The batch-transcription path for long files: iter_audio_blocks -> StreamingFbank gives the
    offline features of the whole file."""
    ref = compute_fbank(load_audio(GOFORWARD))
    fb = StreamingFbank()
    got = torch.cat([fb.accept_waveform(b) for b in iter_audio_blocks(GOFORWARD, block_seconds=0.33)])
    torch.testing.assert_close(got, ref, rtol=0, atol=ATOL)


def test_parity_shared_real_file_if_present():
    """One longer file from the shared development set (skipped where ../shared is absent)."""
    manifest = SHARED_REAL / "manifest.jsonl"
    if not manifest.exists():
        pytest.skip("shared real data not available")
    path = SHARED_REAL / "audio" / "misc" / "sphinx4_10001-90210-01803.flac"
    if not path.exists():
        pytest.skip(f"{path} missing")
    x = load_audio(path)
    ref = compute_fbank(x)
    got = stream(x, random_sizes(5, 2000, count=200000))
    torch.testing.assert_close(got, ref, rtol=0, atol=ATOL)


# ----------------------------------------------------------------------------- CMVN


def test_cmvn_stats_streaming_equals_direct():
    feats = [compute_fbank(load_audio(MANIFEST.parent / r["audio"])) for r in ROWS]
    mean, std = compute_cmvn_stats(iter(feats))  # a generator: single pass
    allf = torch.cat(feats).double()
    torch.testing.assert_close(mean, allf.mean(0).float(), rtol=0, atol=1e-5)
    torch.testing.assert_close(std, allf.std(0, unbiased=False).float().clamp_min(1e-2), rtol=1e-5, atol=1e-5)
    assert mean.dtype == std.dtype == torch.float32 and mean.shape == (NUM_MEL_BINS,)


def test_cmvn_stats_float64_accumulation():
    """Large offset, small spread: float32 sum-of-squares would lose the variance entirely."""
    g = torch.Generator().manual_seed(0)
    chunks = [1000.0 + 0.1 * torch.randn(5000, 4, generator=g) for _ in range(20)]
    mean, std = compute_cmvn_stats(chunks, min_std=0.0)
    torch.testing.assert_close(std, torch.full((4,), 0.1), rtol=0.02, atol=0)
    torch.testing.assert_close(mean, torch.full((4,), 1000.0), rtol=0, atol=0.01)


def test_cmvn_std_floor_and_errors():
    const = torch.zeros(100, NUM_MEL_BINS)
    const[:, 1] = torch.arange(100.0)
    mean, std = compute_cmvn_stats([const])
    assert std[0] == pytest.approx(1e-2) and std[1] > 28
    with pytest.raises(ValueError, match="no frames"):
        compute_cmvn_stats([])
    with pytest.raises(ValueError, match="inconsistent"):
        compute_cmvn_stats([torch.zeros(3, 80), torch.zeros(3, 40)])


def test_global_cmvn_module():
    feats = [compute_fbank(load_audio(MANIFEST.parent / r["audio"])) for r in ROWS]
    cmvn = GlobalCMVN()
    x = torch.cat(feats)
    assert torch.equal(cmvn(x), x)  # identity until stats are set
    cmvn.set_stats(*GlobalCMVN.compute_cmvn_stats(feats))
    y = cmvn(x)
    torch.testing.assert_close(y.mean(0), torch.zeros(NUM_MEL_BINS), rtol=0, atol=1e-4)
    torch.testing.assert_close(y.std(0, unbiased=False), torch.ones(NUM_MEL_BINS), rtol=0, atol=1e-4)
    # batched [B, T, 80] input, frame-wise: same result per frame
    torch.testing.assert_close(cmvn(x[:20].view(2, 10, NUM_MEL_BINS)).reshape(20, -1), y[:20])
    # stats live in the state_dict as buffers (so checkpoints carry them), not parameters
    sd = cmvn.state_dict()
    assert set(sd) == {"mean", "istd"} and not list(cmvn.parameters())
    other = GlobalCMVN()
    other.load_state_dict(sd)
    assert torch.equal(other(x), y)
    with pytest.raises(ValueError):
        cmvn(torch.zeros(3, 40))
    with pytest.raises(ValueError):
        cmvn.set_stats(torch.zeros(80), torch.zeros(80))
    with pytest.raises(ValueError):
        cmvn.set_stats(torch.zeros(79), torch.ones(79))


def test_fbank_batch_equals_one_call_per_waveform():
    """Waveforms of every awkward length (empty, one sample short of a frame, exact frames, a
    frame plus a shift minus one) in one call: the frames of each, none from a neighbour."""
    g = torch.Generator().manual_seed(3)
    lengths = [0, 399, 400, 401, 559, 560, 1600, 2963, 0, 16000, 17]
    waves = [torch.randn(n, generator=g) * (0.05 + 0.1 * i) for i, n in enumerate(lengths)]
    got = compute_fbank_batch(waves)
    assert len(got) == len(waves)
    for w, feats in zip(waves, got):
        ref = compute_fbank(w)
        assert feats.shape == ref.shape
        torch.testing.assert_close(feats, ref, rtol=0, atol=ATOL)
    assert [f.shape[0] for f in compute_fbank_batch([torch.zeros(10), torch.zeros(0)])] == [0, 0]


def test_accept_waveforms_equals_separate_streams():
    """Several streams fed random block sizes through accept_waveforms, one fbank call per round,
    give each stream what its own StreamingFbank gives, and keep the same buffered tails."""
    rng = random.Random(11)
    g = torch.Generator().manual_seed(11)
    signals = [torch.randn(n, generator=g) * 0.2 for n in (9000, 4321, 12000)]
    batched = [StreamingFbank() for _ in signals]
    alone = [StreamingFbank() for _ in signals]
    pos = [0] * len(signals)
    outs = [[] for _ in signals]
    refs = [[] for _ in signals]
    while any(p < len(x) for p, x in zip(pos, signals)):
        blocks = []
        for i, x in enumerate(signals):
            n = rng.choice([0, 1, 160, 399, 400, 1000, 2500])
            blocks.append(x[pos[i] : pos[i] + n])
            pos[i] += n
        for i, f in enumerate(accept_waveforms(batched, blocks)):
            outs[i].append(f)
        for i, (s, b) in enumerate(zip(alone, blocks)):
            refs[i].append(s.accept_waveform(b))
    for i in range(len(signals)):
        torch.testing.assert_close(torch.cat(outs[i]), torch.cat(refs[i]), rtol=0, atol=ATOL)
        torch.testing.assert_close(torch.cat(outs[i]), compute_fbank(signals[i]), rtol=0, atol=ATOL)
        assert batched[i].buffered_samples == alone[i].buffered_samples
        assert batched[i].num_frames == alone[i].num_frames and batched[i].num_samples == alone[i].num_samples


def test_fbank_of_padded_rows_equals_one_call_per_waveform():
    """compute_fbank_padded (the trainer's features_on_device): rows of every awkward length, padded
    with zeros to one width (not a multiple of the shift), give each row's own frames, zero past
    its end, and nothing of the next row."""
    g = torch.Generator().manual_seed(4)
    lengths = [0, 399, 400, 401, 559, 560, 1600, 2963, 17, 3001]
    waves = torch.zeros(len(lengths), 3001)
    for i, n in enumerate(lengths):
        waves[i, :n] = torch.randn(n, generator=g) * (0.05 + 0.1 * i)
    waves[0, :] = 0.0
    got = compute_fbank_padded(waves, lengths)
    assert got.shape == (len(lengths), feature_frames_for_samples(3001), 80)
    for i, n in enumerate(lengths):
        ref = compute_fbank(waves[i, :n])
        torch.testing.assert_close(got[i, : ref.shape[0]], ref, rtol=0, atol=ATOL)
        assert not got[i, ref.shape[0]:].any()
    assert compute_fbank_padded(torch.zeros(2, 100), [100, 50]).shape == (2, 0, 80)
