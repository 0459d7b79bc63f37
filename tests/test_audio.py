"""asr.audio: reading real and malformed files, mono mixing, resampling, block-wise reading."""
from __future__ import annotations

import io
import json
import math
import warnings
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
import torchaudio.functional as taF

from asr.audio import (
    AudioError,
    StreamingResampler,
    TruncatedAudioWarning,
    check_waveform,
    iter_audio_blocks,
    load_audio,
    prepare_waveform,
    resample,
    to_mono,
)
from asr.frames import SAMPLE_RATE

DATA = Path(__file__).parent / "data"
MANIFEST = DATA / "manifest.jsonl"
ROWS = [json.loads(line) for line in MANIFEST.read_text().splitlines() if line.strip()]
GOFORWARD = DATA / "audio" / "pocketsphinx_goforward.flac"


@pytest.fixture(autouse=True, scope="module")
def _one_intra_op_thread():
    """Tiny per-call tensors: on a shared 2-core machine, OpenMP's second thread only adds
    wake-up latency (measured 1.5-8 ms per F.pad call with 2 threads vs 0.1 ms with 1)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tone(freqs_amps: list[tuple[float, float]], rate: int, seconds: float) -> np.ndarray:
    """Sum of sines, float32."""
    t = np.arange(int(round(rate * seconds))) / rate
    return sum(a * np.sin(2 * np.pi * f * t) for f, a in freqs_amps).astype(np.float32)


def band_rms(wave: torch.Tensor, rate: int, f: float, half_width: float = 50.0) -> float:
    """RMS of the spectrum around frequency f (Hann-windowed), for alias/peak checks."""
    w = wave.double() * torch.hann_window(wave.numel(), dtype=torch.float64)
    spec = torch.fft.rfft(w).abs()
    freqs = torch.fft.rfftfreq(wave.numel(), 1.0 / rate)
    band = (freqs > f - half_width) & (freqs < f + half_width)
    return float(spec[band].square().mean().sqrt())


def assert_one_line_error(err: pytest.ExceptionInfo, *needles: str) -> None:
    msg = str(err.value)
    assert "\n" not in msg, msg
    for needle in needles:
        assert needle in msg, (needle, msg)


# ----------------------------------------------------------------------------- real files


@pytest.mark.parametrize("row", ROWS, ids=[r["id"] for r in ROWS])
def test_real_files_load_as_16k_mono_float32(row):
    wave = load_audio(MANIFEST.parent / row["audio"])
    assert wave.dtype == torch.float32 and wave.dim() == 1
    assert abs(wave.numel() / SAMPLE_RATE - row["duration"]) < 2e-3
    assert torch.isfinite(wave).all() and wave.abs().max() <= 1.0
    assert wave.square().mean().sqrt() > 1e-3  # speech, not silence
    # FLAC 16-bit: every sample is k / 32768 exactly
    assert torch.equal(wave * 32768, torch.round(wave * 32768))


def test_file_like_objects_equal_path():
    ref = load_audio(GOFORWARD)
    assert torch.equal(load_audio(io.BytesIO(GOFORWARD.read_bytes())), ref)
    assert torch.equal(load_audio(str(GOFORWARD)), ref)
    with open(GOFORWARD, "rb") as f:
        assert torch.equal(load_audio(f), ref)


def test_file_like_garbage_is_audio_error():
    with pytest.raises(AudioError) as err:
        load_audio(io.BytesIO(b"definitely not audio" * 20))
    assert_one_line_error(err, "<BytesIO>", "not a readable audio file")


# ----------------------------------------------------------------------------- bad inputs


def test_missing_file(tmp_path):
    path = tmp_path / "nope.wav"
    with pytest.raises(AudioError) as err:
        load_audio(path)
    assert_one_line_error(err, str(path), "not found")
    with pytest.raises(AudioError):
        next(iter_audio_blocks(path))


def test_directory(tmp_path):
    with pytest.raises(AudioError) as err:
        load_audio(tmp_path)
    assert_one_line_error(err, str(tmp_path), "directory")


def test_zero_byte_file(tmp_path):
    path = tmp_path / "empty.wav"
    path.write_bytes(b"")
    with pytest.raises(AudioError) as err:
        load_audio(path)
    assert_one_line_error(err, str(path), "empty")


def test_valid_wav_with_zero_samples(tmp_path):
    path = tmp_path / "zero.wav"
    sf.write(path, np.zeros(0, np.float32), 16000, subtype="PCM_16")
    with pytest.raises(AudioError) as err:
        load_audio(path)
    assert_one_line_error(err, str(path), "no audio samples")
    with pytest.raises(AudioError) as err:
        list(iter_audio_blocks(path))
    assert_one_line_error(err, str(path), "no audio samples")


def test_text_file_renamed_wav(tmp_path):
    path = tmp_path / "notes.wav"
    path.write_text("this is a text file, not audio\n" * 20)
    with pytest.raises(AudioError) as err:
        load_audio(path)
    assert_one_line_error(err, str(path), "not a readable audio file")
    with pytest.raises(AudioError):
        next(iter_audio_blocks(path))


@pytest.mark.parametrize("cut", [12, 20, 44])
def test_wav_truncated_in_header(tmp_path, cut):
    src = tmp_path / "full.wav"
    sf.write(src, tone([(440, 0.3)], 16000, 0.5), 16000, subtype="PCM_16")
    path = tmp_path / "cut.wav"
    path.write_bytes(src.read_bytes()[:cut])
    with pytest.raises(AudioError) as err:
        load_audio(path)
    assert_one_line_error(err, str(path))


def test_wav_truncated_in_data_returns_intact_prefix_with_warning(tmp_path):
    """libsndfile decodes a WAV cut mid-data up to the last whole frame; we keep those samples
    (they are exact) and warn that the file is truncated."""
    x = tone([(440, 0.3)], 16000, 1.0)
    src = tmp_path / "full.wav"
    sf.write(src, x, 16000, subtype="PCM_16")
    path = tmp_path / "cut.wav"
    path.write_bytes(src.read_bytes()[: 44 + 2 * 5000 + 1])  # 5000 whole frames and half a frame
    with pytest.warns(TruncatedAudioWarning, match="truncated"):
        wave = load_audio(path)
    full = load_audio(src)
    assert wave.numel() == 5000
    assert torch.equal(wave, full[:5000])
    with pytest.warns(TruncatedAudioWarning):
        assert torch.equal(torch.cat(list(iter_audio_blocks(path, block_seconds=0.1))), wave)


def test_complete_file_does_not_warn(tmp_path):
    path = tmp_path / "ok.wav"
    sf.write(path, tone([(440, 0.3)], 16000, 0.2), 16000, subtype="PCM_16")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_audio(path)


def test_flac_truncated_is_audio_error(tmp_path):
    path = tmp_path / "cut.flac"
    data = GOFORWARD.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(AudioError) as err:
        load_audio(path)
    assert_one_line_error(err, str(path))
    with pytest.raises(AudioError) as err:
        list(iter_audio_blocks(path, block_seconds=0.25))
    assert_one_line_error(err, str(path))


@pytest.mark.parametrize("subtype", ["PCM_16", "FLOAT"])
def test_header_only_file_has_no_samples(tmp_path, subtype):
    """Integer PCM skips the finite check (it cannot hold NaN) but not the emptiness check."""
    path = tmp_path / f"none_{subtype}.wav"
    sf.write(path, np.zeros(0, dtype=np.float32), 16000, subtype=subtype)
    with pytest.raises(AudioError) as err:
        load_audio(path)
    assert_one_line_error(err, str(path), "no audio samples")


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_float_wav(tmp_path, bad):
    x = tone([(300, 0.3)], 16000, 1.0)
    x[12000] = bad
    path = tmp_path / "bad.wav"
    sf.write(path, x, 16000, subtype="FLOAT")
    with pytest.raises(AudioError) as err:
        load_audio(path)
    assert_one_line_error(err, str(path), "non-finite")
    # block reader: the first block (0.5 s) is clean and comes out, the second one raises
    blocks = iter_audio_blocks(path, block_seconds=0.5)
    assert next(blocks).numel() == 8000
    with pytest.raises(AudioError) as err:
        next(blocks)
    assert_one_line_error(err, str(path), "non-finite", "0.50 s")


def test_unsupported_odd_sample_rate_is_audio_error(tmp_path):
    """11127 Hz (old Macintosh rate) has gcd 1 with 16000: torchaudio would build a 700 MB filter."""
    path = tmp_path / "mac.wav"
    sf.write(path, tone([(300, 0.3)], 11127, 0.1), 11127, subtype="PCM_16")
    with pytest.raises(AudioError) as err:
        load_audio(path)
    assert_one_line_error(err, str(path), "unsupported sample rate 11127")


# ----------------------------------------------------------------------------- channels and rates


def test_stereo_is_mean_of_channels(tmp_path):
    left = tone([(300, 0.4)], 16000, 0.5)
    right = tone([(1000, 0.2)], 16000, 0.5)
    path = tmp_path / "stereo.wav"
    sf.write(path, np.stack([left, right], axis=1), 16000, subtype="FLOAT")
    wave = load_audio(path)
    expected = (torch.from_numpy(left) + torch.from_numpy(right)) / 2
    torch.testing.assert_close(wave, expected, rtol=0, atol=1e-7)
    # speech only on one side is kept (at half amplitude), not dropped
    path2 = tmp_path / "one_side.wav"
    sf.write(path2, np.stack([np.zeros_like(left), left], axis=1), 16000, subtype="FLOAT")
    torch.testing.assert_close(load_audio(path2), torch.from_numpy(left) / 2, rtol=0, atol=1e-7)


def test_int16_pcm_scaling(tmp_path):
    ints = np.array([0, 1, -1, 16384, -32768, 32767] * 100, dtype=np.int16)
    path = tmp_path / "pcm.wav"
    sf.write(path, ints, 16000, subtype="PCM_16")
    assert torch.equal(load_audio(path), torch.from_numpy(ints.astype(np.float32) / 32768))


def test_8k_input_is_upsampled_correctly(tmp_path):
    x = tone([(440, 0.5)], 8000, 1.0)
    path = tmp_path / "8k.wav"
    sf.write(path, x, 8000, subtype="FLOAT")
    wave = load_audio(path)
    assert wave.numel() == 16000
    torch.testing.assert_close(wave, taF.resample(torch.from_numpy(x), 8000, 16000), rtol=0, atol=1e-7)
    # same tone, same level (away from the zero-padded edges)
    mid = wave[2000:14000]
    ideal = torch.from_numpy(tone([(440, 0.5)], 16000, 1.0))[2000:14000]
    assert (mid - ideal).abs().max() < 0.01


def test_44k_input_is_downsampled_without_aliasing(tmp_path):
    """A 10 kHz component is above the 8 kHz Nyquist of 16 kHz: it must be filtered out, not
    folded to 6 kHz at full level. torchaudio's default filter (Hann-windowed sinc, 6 zero
    crossings) attenuates it by about 45 dB here; we require 40 dB."""
    x = tone([(1000, 0.3), (10000, 0.3)], 44100, 1.0)
    path = tmp_path / "44k.wav"
    sf.write(path, x, 44100, subtype="FLOAT")
    wave = load_audio(path)
    assert wave.numel() == 16000
    keep, alias = band_rms(wave, 16000, 1000), band_rms(wave, 16000, 6000)
    assert alias < 1e-2 * keep, (keep, alias)
    torch.testing.assert_close(wave, taF.resample(torch.from_numpy(x), 44100, 16000), rtol=0, atol=1e-7)


@pytest.mark.parametrize(
    "fmt,subtype,ext,rate",
    [("OGG", "VORBIS", "ogg", 44100), ("OGG", "OPUS", "opus", 48000), ("MP3", "MPEG_LAYER_III", "mp3", 22050)],
)
def test_compressed_formats(tmp_path, fmt, subtype, ext, rate):
    if fmt not in sf.available_formats() or subtype not in sf.available_subtypes(fmt):
        pytest.skip(f"libsndfile {sf.__libsndfile_version__} lacks {fmt}/{subtype}")
    x = tone([(440, 0.3)], rate, 1.0)
    path = tmp_path / f"tone.{ext}"
    sf.write(path, x, rate, format=fmt, subtype=subtype)
    wave = load_audio(path)
    assert abs(wave.numel() - 16000) < 0.05 * 16000
    assert abs(float(wave.square().mean().sqrt()) - 0.3 / math.sqrt(2)) < 0.03
    assert band_rms(wave, 16000, 440) > 100 * band_rms(wave, 16000, 3000)


def test_prepare_waveform_in_memory():
    ints = (tone([(440, 0.3)], 8000, 0.25) * 32767).astype(np.int16)
    stereo = np.stack([ints, ints], axis=1)  # [frames, channels] like sounddevice
    wave = prepare_waveform(stereo, 8000)
    torch.testing.assert_close(wave, resample(torch.from_numpy(ints.astype(np.float32) / 32768), 8000))
    torch.testing.assert_close(prepare_waveform(stereo.T.copy(), 8000, channel_dim=0), wave)
    with pytest.raises(AudioError):
        prepare_waveform(np.zeros(0, np.float32), 16000)
    with pytest.raises(AudioError):
        prepare_waveform(np.zeros((2, 3, 4), np.float32), 16000)


def test_to_mono_and_check_waveform():
    x = torch.tensor([[1.0, 3.0], [2.0, 4.0]])
    assert torch.equal(to_mono(x), torch.tensor([2.0, 3.0]))
    assert torch.equal(to_mono(x, channel_dim=0), torch.tensor([1.5, 3.5]))
    assert torch.equal(to_mono(torch.ones(5)), torch.ones(5))
    assert torch.equal(to_mono(torch.ones(5, 1)), torch.ones(5))
    assert check_waveform(torch.ones(3)).numel() == 3
    with pytest.raises(AudioError, match="clip.wav: contains no audio"):
        check_waveform(torch.zeros(0), "clip.wav")
    with pytest.raises(AudioError, match="2 non-finite"):
        check_waveform(torch.tensor([0.0, float("nan"), float("inf")]), "x")


# ----------------------------------------------------------------------------- block reading


@pytest.mark.parametrize("block_seconds", [30.0, 0.1, 0.0371])
def test_iter_blocks_16k_is_bit_exact(block_seconds):
    whole = load_audio(GOFORWARD)
    blocks = list(iter_audio_blocks(GOFORWARD, block_seconds=block_seconds))
    assert torch.equal(torch.cat(blocks), whole)
    if block_seconds < 1:
        assert max(b.numel() for b in blocks) <= round(block_seconds * 16000)


@pytest.mark.parametrize("rate", [8000, 22050, 44100, 48000])
def test_iter_blocks_resampled_match_whole_file(tmp_path, rate):
    """Stereo file at another rate, read in blocks that are not multiples of the resampler's
    period: same length as load_audio and the same samples to float rounding (measured <= 2.4e-7)."""
    rng = np.random.default_rng(rate)
    x = (rng.standard_normal((int(rate * 1.3) + 7, 2)) * 0.2).astype(np.float32)
    path = tmp_path / f"noise_{rate}.wav"
    sf.write(path, x, rate, subtype="FLOAT")
    whole = load_audio(path)
    for block_seconds in (0.0173, 0.25, 30.0):
        got = torch.cat(list(iter_audio_blocks(path, block_seconds=block_seconds)))
        assert got.shape == whole.shape
        torch.testing.assert_close(got, whole, rtol=0, atol=1e-6)


def test_streaming_resampler_random_chunkings_and_bounded_state():
    g = torch.Generator().manual_seed(0)
    for rate in (8000, 44100, 48000, 16000):
        for max_piece in (1, 3, 700, 50000):
            seconds = 0.03 if max_piece <= 3 else 0.3  # tiny pieces: keep the call count small
            x = torch.randn(int(rate * seconds) + 3, generator=g) * 0.3
            ref = resample(x, rate)
            r = StreamingResampler(rate)
            outs, i = [], 0
            while i < x.numel():
                n = int(torch.randint(0, max_piece + 1, (1,), generator=g))  # 0-sample pieces too
                outs.append(r.accept(x[i : i + n]))
                i += n
                # state: left context + one period + look-ahead, never the stream
                assert r.buffered_samples < 2 * 441 + 2 * 17 + max_piece
            outs.append(r.flush())
            got = torch.cat(outs)
            assert got.shape == ref.shape, (rate, max_piece)
            torch.testing.assert_close(got, ref, rtol=0, atol=1e-6)
    r = StreamingResampler(44100)
    r.flush()
    with pytest.raises(RuntimeError):
        r.accept(torch.zeros(10))
    r.reset()
    assert r.accept(torch.zeros(10)).numel() == 0
