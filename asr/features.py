"""80-dim log-mel filterbank features (Kaldi-compatible), their streaming form, and global CMVN.

Extractor: :func:`torchaudio.compliance.kaldi.fbank` with Kaldi's defaults except 80 bins, dither 0
(inference; pass ``dither`` for training) and ``energy_floor=0`` (that option only floors the log
energy column, which we do not output; 0 skips computing log(floor)). Per frame it does: take 400
samples (25 ms) every 160 (10 ms), ``snip_edges`` (only whole frames: T = 0 if N < 400 else
1 + (N - 400) // 160), remove the frame's DC offset, pre-emphasis 0.97 within the frame, Povey
window, zero-pad to 512, power spectrum, 80 triangular mel filters 20 Hz..8 kHz, log.

Why kaldi.fbank and not torchaudio.transforms.MelSpectrogram: both are far faster than the model
(over 1000x real time on one CPU core), so speed does not decide; kaldi.fbank gives the contract's
frame count (``MelSpectrogram(center=False)`` needs n_fft = 512 samples per frame, so it returns
one frame fewer than snip_edges on most lengths, and it has no DC removal / pre-emphasis), and its
features match Kaldi/WeNet/k2 recipes. With 2 intra-op threads on a busy 2-core machine, tiny calls can
stall for milliseconds in OpenMP wake-ups; for streaming, 1 thread is faster.

Scale: input is float in [-1, 1] (what :mod:`asr.audio` returns) and is multiplied by 32768
before extraction, i.e. features are computed on the int16 scale like Kaldi's ``compute-fbank-feats``
(and WeNet). This (a) makes ``dither=1.0`` mean one int16 LSB as in Kaldi, and (b) puts the fixed
log floor, log(float32 eps) = -15.94, far below any real 16-bit signal, instead of 2^30 times
higher in relative terms where it clips quiet bins (on the [-1, 1] scale 0.35 % of the log-mel
values of our real test files sit on the floor, e.g. above 4 kHz in 8 kHz recordings upsampled to
16 kHz; on the int16 scale none do, their minimum is -0.4 to 4). Digital silence (all zeros, or
any constant) gives exactly -15.94 in every bin: finite, no NaN/-inf. Global CMVN removes the
constant offset log(32768^2) = 20.79 either way.

Streaming: every step above uses only the 400 samples of its frame (DC removal, pre-emphasis,
window and FFT are per frame; verified by a test that compares each frame with the extractor run
on that frame alone), so :class:`StreamingFbank` computes the frames whose 400 samples have arrived
and keeps the rest (< 400 samples). Its output equals :func:`compute_fbank` of the whole signal to
float rounding (measured max abs difference 1.9e-6, one float32 ulp at 16, on log-mel values of
about -16..25; tests allow 1e-5). With
snip_edges there is nothing to flush at the end: the offline extractor also drops the last < 400
samples that do not fill a frame.
"""
from __future__ import annotations

import functools
from typing import Iterable, Optional, Sequence

import torch
import torchaudio.compliance.kaldi as kaldi
from torch import nn

from asr.frames import FEATURE_HOP, FEATURE_WINDOW, SAMPLE_RATE, feature_frames_for_samples

NUM_MEL_BINS = 80
WAVE_SCALE = 32768.0  # float [-1, 1] -> int16 scale, as Kaldi reads 16-bit PCM
LOG_FLOOR = float(torch.log(torch.tensor(torch.finfo(torch.float32).eps)))  # -15.9424, value of silence


def compute_fbank(wave: torch.Tensor, dither: float = 0.0) -> torch.Tensor:
    """Log-mel filterbank ``[T, 80]`` (float32) of a 16 kHz mono float waveform ``[N]`` in [-1, 1].

    T = 0 if N < 400 else 1 + (N - 400) // 160. ``dither`` is in int16 units (Kaldi's meaning);
    keep 0 at inference (random dither makes outputs non-deterministic and breaks streaming parity).
    """
    wave = torch.as_tensor(wave)
    if wave.dim() != 1:
        raise ValueError(f"compute_fbank expects a 1-D waveform [N], got shape {tuple(wave.shape)}")
    wave = wave.to(torch.float32)
    t = feature_frames_for_samples(wave.numel())
    if t == 0:
        return torch.zeros(0, NUM_MEL_BINS, dtype=torch.float32, device=wave.device)
    if dither == 0.0 and wave.device.type == "cpu":
        feats = _fbank_no_dither(wave * WAVE_SCALE, t)
        assert feats.shape == (t, NUM_MEL_BINS), (feats.shape, t)
        return feats
    feats = kaldi.fbank(
        (wave * WAVE_SCALE).unsqueeze(0),
        num_mel_bins=NUM_MEL_BINS,
        frame_length=1000.0 * FEATURE_WINDOW / SAMPLE_RATE,
        frame_shift=1000.0 * FEATURE_HOP / SAMPLE_RATE,
        dither=dither,
        energy_floor=0.0,
        snip_edges=True,
        sample_frequency=float(SAMPLE_RATE),
    )
    assert feats.shape == (t, NUM_MEL_BINS), (feats.shape, t)
    return feats


PADDED_WINDOW = 512  # the FFT size: the 400-sample window zero-padded to a power of two
PREEMPHASIS = 0.97


@functools.lru_cache(maxsize=None)
def _fbank_constants() -> tuple[torch.Tensor, torch.Tensor]:
    """(Povey window [1, 400], mel filters [80, 257]) as ``kaldi.fbank`` makes them on every call."""
    window = torch.hann_window(FEATURE_WINDOW, periodic=False, dtype=torch.float32).pow(0.85).unsqueeze(0)
    mel, _ = kaldi.get_mel_banks(NUM_MEL_BINS, PADDED_WINDOW, float(SAMPLE_RATE), 20.0, 0.0, 100.0, -500.0, 1.0)
    mel = torch.nn.functional.pad(mel.to(torch.float32), (0, 1), mode="constant", value=0)
    return window, mel


def _fbank_no_dither(wave: torch.Tensor, t: int) -> torch.Tensor:
    """``kaldi.fbank`` with :func:`compute_fbank`'s options and no dither, on a CPU int16-scale
    waveform [N] with ``t`` >= 1 frames: the same operations in the same order (so the same
    values), its constants made once (:func:`_fbank_constants`) instead of per call (a streaming
    call of 40 ms spent ~60 % of its fbank time remaking them)."""
    window, mel = _fbank_constants()
    wave = wave.contiguous()
    frames = wave.as_strided((t, FEATURE_WINDOW), (FEATURE_HOP, 1))
    frames = frames - torch.mean(frames, dim=1).unsqueeze(1)  # DC offset
    previous = torch.cat([frames[:, :1], frames[:, :-1]], dim=1)  # x[j - 1], x[0] at j = 0
    frames = (frames - PREEMPHASIS * previous) * window
    frames = torch.nn.functional.pad(frames, (0, PADDED_WINDOW - FEATURE_WINDOW), mode="constant", value=0)
    power = torch.fft.rfft(frames).abs().pow(2.0)
    return torch.max(torch.mm(power, mel.T), torch.tensor(torch.finfo(torch.float32).eps)).log()


def compute_fbank_batch(waves: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """:func:`compute_fbank` of several waveforms with one ``kaldi.fbank`` call; same frames.

    Why: a batch of live streams needs a few frames from each of many short buffers, and one call
    per buffer costs ~0.3 ms of fixed overhead, about a fifth of a batched model step per stream.
    Every Kaldi frame is computed from its own 400 samples alone (DC removal, pre-emphasis, window,
    FFT and mel per frame), so the waveforms are laid end to end, each starting on a multiple of
    the 160-sample shift and padded to the next one; the frames of one call then are the frames of
    each waveform, plus a few that straddle two waveforms, which are dropped.
    """
    waves = [torch.as_tensor(w).to(torch.float32) for w in waves]
    counts = [feature_frames_for_samples(w.numel()) for w in waves]
    pieces: list[torch.Tensor] = []
    first_frame: list[int] = []
    pos = 0
    for w, t in zip(waves, counts):
        first_frame.append(pos // FEATURE_HOP)
        if t == 0:
            continue
        used = (t - 1) * FEATURE_HOP + FEATURE_WINDOW  # samples the frames read
        span = -(-used // FEATURE_HOP) * FEATURE_HOP
        pieces.append(w[:used])
        if span > used:
            pieces.append(w.new_zeros(span - used))
        pos += span
    if not pieces:
        device = waves[0].device if waves else None
        return [torch.zeros(0, NUM_MEL_BINS, dtype=torch.float32, device=device) for _ in waves]
    feats = compute_fbank(torch.cat(pieces))
    return [feats[f : f + t] for f, t in zip(first_frame, counts)]


def compute_fbank_padded(waves: torch.Tensor, lengths: Sequence[int]) -> torch.Tensor:
    """:func:`compute_fbank` of each row of zero-padded waveforms ``[B, N]`` (row ``b`` has
    ``lengths[b]`` samples), as one zero-padded batch ``[B, T, 80]`` (T: the longest row's frames),
    in one ``kaldi.fbank`` call and a few tensor operations, whatever B.

    Why: the trainer's ``data.features_on_device`` batches hold hundreds of short utterances;
    :func:`compute_fbank_batch` slices, pads and splits them one by one (~2,000 small GPU launches
    per batch). Here the rows, each padded to a multiple of the 160-sample shift, *are* the
    waveforms laid end to end: the frames of row ``b`` start at a known frame index, and its valid
    frames read its own samples only (as in :func:`compute_fbank_batch`); frames past a row's
    length, which read padding or the next row, are zeroed."""
    B = waves.shape[0]
    counts = [feature_frames_for_samples(int(n)) for n in lengths]
    T = max(counts, default=0)
    if B == 0 or T == 0:
        return torch.zeros(B, T, NUM_MEL_BINS, dtype=torch.float32, device=waves.device)
    row = -(-waves.shape[1] // FEATURE_HOP) * FEATURE_HOP  # samples per row, a multiple of the shift
    flat = torch.nn.functional.pad(waves.to(torch.float32), (0, row - waves.shape[1])).reshape(-1)
    feats = compute_fbank(flat)  # frame f of row b is frame b * row / shift + f of the whole
    per_row = row // FEATURE_HOP
    feats = torch.nn.functional.pad(feats, (0, 0, 0, B * per_row - feats.shape[0])).reshape(B, per_row, -1)[:, :T]
    valid = torch.arange(T, device=waves.device)[None, :] < torch.tensor(counts, device=waves.device)[:, None]
    return torch.where(valid[:, :, None], feats, 0.0)


class StreamingFbank:
    """Incremental :func:`compute_fbank`: feed sample blocks of any size, get the new frames.

    The concatenation of all outputs equals ``compute_fbank(concatenation of all inputs)`` to float
    rounding, for any way of cutting the input. State: fewer than 400 samples (the start of the
    next, incomplete frame). No dither: streaming is for inference.
    """

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        """Forget all input; the next sample starts a new stream."""
        self._tail = torch.zeros(0, dtype=torch.float32)
        self.num_samples = 0  # total samples accepted since reset
        self.num_frames = 0  # total frames emitted since reset

    @property
    def buffered_samples(self) -> int:
        """Samples kept as state (always < FEATURE_WINDOW)."""
        return int(self._tail.numel())

    def accept_waveform(self, samples: torch.Tensor) -> torch.Tensor:
        """Append 16 kHz float samples ``[n]`` (n >= 0); return the frames ``[t, 80]`` now complete."""
        buf = self._append(samples)
        feats = compute_fbank(buf)
        self._advance(buf, feats.shape[0])
        return feats

    def _append(self, samples: torch.Tensor) -> torch.Tensor:
        """The kept tail followed by ``samples``: everything the next frames are made from."""
        samples = torch.as_tensor(samples)
        if samples.dim() != 1:
            raise ValueError(f"accept_waveform expects 1-D samples [n], got shape {tuple(samples.shape)}")
        samples = samples.to(torch.float32)
        if self._tail.device != samples.device:
            self._tail = self._tail.to(samples.device)
        self.num_samples += samples.numel()
        return torch.cat([self._tail, samples]) if self._tail.numel() else samples

    def _advance(self, buf: torch.Tensor, frames: int) -> None:
        """``frames`` frames of ``buf`` were computed: keep from the start of the first frame not yet
        computed (< FEATURE_WINDOW samples remain)."""
        self._tail = buf[frames * FEATURE_HOP :].clone()
        self.num_frames += frames


def accept_waveforms(streams: Sequence[StreamingFbank], blocks: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """``[s.accept_waveform(b) for s, b in zip(streams, blocks)]`` with one fbank call for all."""
    bufs = [s._append(b) for s, b in zip(streams, blocks)]
    feats = compute_fbank_batch(bufs)
    for s, buf, f in zip(streams, bufs, feats):
        s._advance(buf, f.shape[0])
    return feats


class GlobalCMVN(nn.Module):
    """Global mean/variance normalisation with statistics from the training set.

    Never per-utterance: per-utterance statistics need the whole utterance, which breaks streaming.
    ``mean`` and ``istd`` (1/std) are buffers, so they are saved in the model's state_dict and the
    checkpoint carries them. Identity until :meth:`set_stats` is called.
    """

    mean: torch.Tensor
    istd: torch.Tensor

    def __init__(self, num_bins: int = NUM_MEL_BINS) -> None:
        super().__init__()
        self.num_bins = num_bins
        self.register_buffer("mean", torch.zeros(num_bins))
        self.register_buffer("istd", torch.ones(num_bins))

    def set_stats(self, mean: torch.Tensor, std: torch.Tensor) -> None:
        """Set the statistics (``std`` must be finite and > 0; see compute_cmvn_stats' floor)."""
        mean = torch.as_tensor(mean, dtype=torch.float64).reshape(-1)
        std = torch.as_tensor(std, dtype=torch.float64).reshape(-1)
        if mean.numel() != self.num_bins or std.numel() != self.num_bins:
            raise ValueError(f"expected {self.num_bins} values, got mean {mean.numel()}, std {std.numel()}")
        if not (torch.isfinite(mean).all() and torch.isfinite(std).all() and (std > 0).all()):
            raise ValueError("CMVN stats must be finite with std > 0")
        with torch.no_grad():
            self.mean.copy_(mean.to(self.mean.dtype))
            self.istd.copy_((1.0 / std).to(self.istd.dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(x - mean) * istd`` over the last dimension (``[..., num_bins]``)."""
        if x.shape[-1] != self.num_bins:
            raise ValueError(f"GlobalCMVN expects last dim {self.num_bins}, got shape {tuple(x.shape)}")
        return (x - self.mean) * self.istd

    @staticmethod
    def compute_cmvn_stats(feats: Iterable[torch.Tensor], min_std: float = 1e-2) -> tuple[torch.Tensor, torch.Tensor]:
        """Alias of :func:`compute_cmvn_stats`."""
        return compute_cmvn_stats(feats, min_std=min_std)

    def extra_repr(self) -> str:
        return f"num_bins={self.num_bins}"


def compute_cmvn_stats(
    feats: Iterable[torch.Tensor], min_std: float = 1e-2, num_bins: Optional[int] = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and std per bin over all frames of an iterable of fbank tensors ``[T, bins]``.

    Streaming accumulation of count, sum and sum of squares in float64 (float32 sums over millions of
    frames lose digits; E[x^2] - mean^2 then cancels badly). Pass unpadded utterances: padding frames
    would be counted. ``std`` is floored at ``min_std`` so a bin that is constant in the data (e.g.
    always the silence floor) cannot produce a huge 1/std. Returns float32 tensors ``[bins]``.
    """
    total = 0
    acc_sum: Optional[torch.Tensor] = None
    acc_sq: Optional[torch.Tensor] = None
    for f in feats:
        f = torch.as_tensor(f)
        if f.dim() < 2:
            raise ValueError(f"expected fbank [T, bins], got shape {tuple(f.shape)}")
        f = f.detach().reshape(-1, f.shape[-1]).to(device="cpu", dtype=torch.float64)
        if acc_sum is None:
            if num_bins is not None and f.shape[1] != num_bins:
                raise ValueError(f"expected {num_bins} bins, got {f.shape[1]}")
            acc_sum = torch.zeros(f.shape[1], dtype=torch.float64)
            acc_sq = torch.zeros(f.shape[1], dtype=torch.float64)
        elif f.shape[1] != acc_sum.numel():
            raise ValueError(f"inconsistent number of bins: {f.shape[1]} vs {acc_sum.numel()}")
        acc_sum += f.sum(0)
        acc_sq += (f * f).sum(0)
        total += f.shape[0]
    if total == 0 or acc_sum is None or acc_sq is None:
        raise ValueError("compute_cmvn_stats: no frames")
    mean = acc_sum / total
    var = (acc_sq / total - mean * mean).clamp_min(0.0)
    std = var.sqrt().clamp_min(min_std)
    if not (torch.isfinite(mean).all() and torch.isfinite(std).all()):
        raise ValueError("compute_cmvn_stats: non-finite features in input")
    return mean.to(torch.float32), std.to(torch.float32)


__all__ = [
    "NUM_MEL_BINS",
    "LOG_FLOOR",
    "WAVE_SCALE",
    "GlobalCMVN",
    "StreamingFbank",
    "accept_waveforms",
    "compute_cmvn_stats",
    "compute_fbank",
    "compute_fbank_batch",
]
