"""Audio input: read any file libsndfile can decode, mix to mono, resample to 16 kHz float32.

Everything that reads audio for the project goes through this module, so that training, batch
transcription and streaming see the same samples, and so that every way a file can be bad ends in
one exception type, :class:`AudioError`, whose message is a single user-facing line naming the file
and the problem (the CLI prints it and moves on to the next file; no soundfile/libsndfile exception
type leaks out).

Formats: whatever ``soundfile`` (libsndfile) reads: WAV/WAVEX/RF64/W64, FLAC, OGG (Vorbis and Opus),
MP3 (libsndfile >= 1.1 built with mpg123), AIFF, CAF, ... Samples are read as float32 in [-1, 1]
(integer PCM is divided by 2^(bits-1) by libsndfile).

Mono: the mean of the channels (not the first channel: a stereo file whose speech is on one side
would otherwise go silent).

Resampling: :func:`torchaudio.functional.resample` (windowed sinc, Hann window, 6 zero crossings,
rolloff 0.99). :class:`StreamingResampler` runs that same function on overlapping segments so that
block-by-block output equals the whole-signal output (see its docstring), which is what
:func:`iter_audio_blocks` uses to read hours-long files with flat memory.

Truncated files: libsndfile refuses a FLAC/OGG/MP3 stream that breaks off (decoder loses sync) and a
WAV whose header is cut; we turn those into AudioError. A WAV whose *data* is cut (a partial
download) is decoded by libsndfile up to the last complete frame; we return that intact prefix and
emit a :class:`TruncatedAudioWarning` naming the declared and the present length, because the
samples present are correct and refusing them would be less useful than saying what happened.
"""
from __future__ import annotations

import functools
import math
import os
import re
import warnings
from pathlib import Path
from typing import BinaryIO, Iterator, Union

import numpy as np
import soundfile as sf
import torch
import torchaudio.functional as taF

from asr.frames import SAMPLE_RATE

AudioSource = Union[str, os.PathLike, BinaryIO]

# torchaudio.functional.resample defaults; only used to size the context StreamingResampler keeps
# (over-estimating the context is harmless, it just costs a few samples of recomputation).
_LOWPASS_FILTER_WIDTH = 6
_ROLLOFF = 0.99
# A sample-rate pair whose reduced ratio is awkward (e.g. 11127 -> 16000 Hz, gcd 1) makes torchaudio
# build a [new, 1, 2*width+orig] filter bank: 16000 x 11141 floats = 700 MB. Refuse such pairs with
# a clear message instead of exhausting memory. 2^25 elements = 128 MB of float32.
_MAX_KERNEL_ELEMENTS = 1 << 25


class AudioError(Exception):
    """A file or waveform that cannot be used as speech input. ``str(err)`` is one line for users."""


class TruncatedAudioWarning(UserWarning):
    """The file declares more audio than it holds; the intact prefix was used."""


def _name_of(source: object) -> str:
    """Human-readable name of a path or file object, for error messages."""
    if isinstance(source, (str, os.PathLike)):
        return os.fspath(source)
    name = getattr(source, "name", None)
    if isinstance(name, (str, os.PathLike)):
        return os.fspath(name)
    return f"<{type(source).__name__}>"


def _one_line(text: object) -> str:
    """Collapse libsndfile's multi-line messages into one line."""
    return " ".join(str(text).split())


def _soundfile_reason(err: BaseException) -> str:
    """The useful part of a soundfile exception (libsndfile's own error string if present)."""
    reason = getattr(err, "error_string", None) or str(err) or type(err).__name__
    return _one_line(reason)


def _open(source: AudioSource) -> sf.SoundFile:
    """Open ``source`` with soundfile, turning every failure into AudioError."""
    name = _name_of(source)
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if not path.exists():
            raise AudioError(f"{name}: file not found")
        if path.is_dir():
            raise AudioError(f"{name}: is a directory, not an audio file")
        if path.stat().st_size == 0:
            raise AudioError(f"{name}: empty file (0 bytes)")
        source = os.fspath(path)
    elif isinstance(source, (bytes, bytearray)):
        raise AudioError("raw bytes given: wrap them in io.BytesIO")
    try:
        return sf.SoundFile(source)
    except (sf.SoundFileError, RuntimeError, OSError, TypeError, ValueError) as err:
        raise AudioError(f"{name}: not a readable audio file ({_soundfile_reason(err)})") from err


def _warn_if_truncated(f: sf.SoundFile, name: str) -> None:
    """Warn when libsndfile reports a data chunk shorter than the header declares (cut WAV)."""
    try:
        info = f.extra_info
    except Exception:  # extra_info is diagnostics only; never fail a read because of it
        return
    m = re.search(r"\ndata\s*:\s*(\d+)\s*\(should be (\d+)\)", info)
    if m and int(m.group(2)) < int(m.group(1)) and f.frames > 0:
        declared, present = int(m.group(1)), int(m.group(2))
        warnings.warn(
            f"{name}: file is truncated (header declares {declared} bytes of audio data, "
            f"{present} present); using the {f.frames} complete frames",
            TruncatedAudioWarning,
            stacklevel=3,
        )


def to_mono(wave: Union[torch.Tensor, np.ndarray], channel_dim: int = -1) -> torch.Tensor:
    """Mix a multi-channel waveform to mono by averaging channels.

    ``channel_dim=-1`` matches soundfile/sounddevice layout ``[frames, channels]``; pass 0 for
    torch/torchaudio layout ``[channels, frames]``. A 1-D input is already mono and returned as is.
    """
    wave = torch.as_tensor(wave)
    if wave.dim() == 1:
        return wave
    if wave.dim() != 2:
        raise ValueError(f"expected a 1-D or 2-D waveform, got shape {tuple(wave.shape)}")
    if wave.shape[channel_dim] == 1:
        return wave.squeeze(channel_dim)
    return wave.mean(dim=channel_dim)


def check_waveform(wave: torch.Tensor, name: str = "waveform", finite_check: bool = True) -> torch.Tensor:
    """Raise AudioError if ``wave`` is empty or has NaN/Inf samples; return it otherwise.

    Non-finite samples (possible in float WAV files) would turn every feature frame they touch
    into NaN and silently poison the recurrent state of a streaming model, so they are refused
    at the door. ``finite_check=False`` skips that scan for samples decoded from integers, which
    cannot be NaN or Inf (the scan costs a training worker ~20 % of its decode time).
    """
    if wave.numel() == 0:
        raise AudioError(f"{name}: contains no audio samples")
    if not finite_check:
        return wave
    finite = torch.isfinite(wave)
    if not bool(finite.all()):
        bad = int((~finite).sum())
        raise AudioError(f"{name}: contains {bad} non-finite samples (NaN or Inf)")
    return wave


def _reduced_rates(orig_rate: int, target_rate: int) -> tuple[int, int, int]:
    """(orig, new, width) as torchaudio's sinc resampler sees them: rates divided by their gcd and
    the one-sided filter half-width in input samples."""
    g = math.gcd(orig_rate, target_rate)
    orig, new = orig_rate // g, target_rate // g
    width = math.ceil(_LOWPASS_FILTER_WIDTH * orig / (min(orig, new) * _ROLLOFF))
    return orig, new, width


def _check_rates(orig_rate: int, target_rate: int) -> None:
    """Validate a rate pair; ValueError with a one-line reason if it cannot be resampled."""
    for label, rate in (("source", orig_rate), ("target", target_rate)):
        if int(rate) != rate or rate <= 0:
            raise ValueError(f"invalid {label} sample rate {rate!r} (need a positive integer in Hz)")
    if orig_rate == target_rate:
        return
    orig, new, width = _reduced_rates(int(orig_rate), int(target_rate))
    if new * (2 * width + orig) > _MAX_KERNEL_ELEMENTS:
        raise ValueError(
            f"unsupported sample rate {orig_rate} Hz: resampling to {target_rate} Hz would need a "
            f"{new}-phase filter; convert the file first (e.g. sox in.wav -r {target_rate} out.wav)"
        )


def resample(wave: torch.Tensor, orig_rate: int, target_rate: int = SAMPLE_RATE) -> torch.Tensor:
    """Resample the last dimension of ``wave`` with torchaudio.functional.resample (float32 result).

    Output length is ceil(N * target_rate / orig_rate). Equal rates return the input unchanged.
    """
    _check_rates(orig_rate, target_rate)
    wave = wave.to(torch.float32)
    if orig_rate == target_rate or wave.shape[-1] == 0:
        return wave
    return taF.resample(wave, int(orig_rate), int(target_rate))


class StreamingResampler:
    """Block-wise resampler whose concatenated output equals ``resample`` of the whole signal.

    torchaudio's resampler (after dividing both rates by their gcd into ``orig`` and ``new``) maps
    each group of ``orig`` input samples, position m, to ``new`` output samples using the input
    window ``[m*orig - width, (m+1)*orig + width)``, with zeros outside the signal. We keep the
    samples not yet fully used plus ``K*orig >= width`` samples of left context, and each call runs
    ``torchaudio.functional.resample`` on ``[context + new samples]``, keeping only the outputs whose
    whole window is real data (its own zero padding only touches the outputs we discard). The segment
    starts on a multiple of ``orig`` so phases line up. :meth:`flush` processes the tail with the
    same zero padding the whole-signal call uses, so the outputs, and the total length
    ceil(N*new/orig), match. Differences are float rounding from conv1d on different lengths
    (measured 0 to ~1e-7 absolute). Equal rates pass samples through untouched.

    State is O(orig + width) samples, independent of stream length and block size.
    """

    def __init__(self, orig_rate: int, target_rate: int = SAMPLE_RATE) -> None:
        _check_rates(orig_rate, target_rate)
        self.orig_rate = int(orig_rate)
        self.target_rate = int(target_rate)
        self._passthrough = self.orig_rate == self.target_rate
        self._orig, self._new, width = _reduced_rates(self.orig_rate, self.target_rate)
        self._width = width
        self._ctx_units = math.ceil(width / self._orig)  # K: left context in units of orig samples
        self.reset()

    def reset(self) -> None:
        """Start a new stream."""
        self._buf = torch.zeros(0, dtype=torch.float32)
        self._buf_start = 0  # global input index of self._buf[0], always a multiple of orig
        self._next_unit = 0  # next m (group of orig input samples) whose outputs are not emitted
        self._finished = False

    @property
    def buffered_samples(self) -> int:
        """Input samples held as state (for tests and memory accounting)."""
        return int(self._buf.numel())

    def _segment_from(self, unit: int) -> tuple[torch.Tensor, int]:
        """Buffered input starting K units before ``unit`` (or at 0), and that start's unit."""
        lo_unit = max(0, unit - self._ctx_units)
        lo = lo_unit * self._orig
        return self._buf[lo - self._buf_start :], lo_unit

    def accept(self, samples: torch.Tensor) -> torch.Tensor:
        """Feed 1-D float samples (any length, 0 included); return the newly final output samples."""
        if self._finished:
            raise RuntimeError("StreamingResampler.accept after flush; call reset() first")
        samples = torch.as_tensor(samples).to(torch.float32).reshape(-1)
        if self._passthrough:
            return samples
        self._buf = torch.cat([self._buf, samples]) if self._buf.numel() else samples
        received = self._buf_start + self._buf.numel()
        # unit m is final once (m+1)*orig + width input samples exist
        end_unit = (received - self._width) // self._orig
        if end_unit <= self._next_unit:
            return torch.zeros(0, dtype=torch.float32)
        segment, lo_unit = self._segment_from(self._next_unit)
        out = _resampler(self.orig_rate, self.target_rate)(segment)
        first = (self._next_unit - lo_unit) * self._new
        out = out[first : first + (end_unit - self._next_unit) * self._new]
        self._next_unit = end_unit
        keep_from = max(0, end_unit - self._ctx_units) * self._orig
        self._buf = self._buf[keep_from - self._buf_start :].clone()
        self._buf_start = keep_from
        return out

    def flush(self) -> torch.Tensor:
        """End of stream: return the remaining output samples (zero padding as in ``resample``)."""
        if self._finished:
            return torch.zeros(0, dtype=torch.float32)
        self._finished = True
        if self._passthrough:
            return torch.zeros(0, dtype=torch.float32)
        segment, lo_unit = self._segment_from(self._next_unit)
        if segment.numel() == 0:
            return torch.zeros(0, dtype=torch.float32)
        out = _resampler(self.orig_rate, self.target_rate)(segment)
        return out[(self._next_unit - lo_unit) * self._new :]


@functools.lru_cache(maxsize=32)
def _resampler(orig_rate: int, target_rate: int) -> torch.nn.Module:
    """``taF.resample(x, orig_rate, target_rate)`` of float32 ``x`` with its sinc kernel made once
    per rate pair, not per call (the same kernel and values)."""
    import torchaudio.transforms

    return torchaudio.transforms.Resample(orig_rate, target_rate, dtype=torch.float32)


def float_mono(samples: Union[torch.Tensor, np.ndarray], name: str = "waveform", channel_dim: int = -1) -> torch.Tensor:
    """Samples as a float32 mono ``[N]`` tensor on the CPU, at their own rate (not checked for NaN).

    Integer arrays are PCM and scaled to [-1, 1] (int16 / 2^15, int32 / 2^31) like soundfile does.
    Multi-channel input is ``[frames, channels]`` unless ``channel_dim=0``.
    """
    arr = torch.as_tensor(np.asarray(samples)) if not isinstance(samples, torch.Tensor) else samples
    arr = arr.detach().cpu()
    if arr.dtype == torch.int16:
        arr = arr.to(torch.float32) / 32768.0
    elif arr.dtype == torch.int32:
        arr = arr.to(torch.float32) / 2147483648.0
    elif not arr.is_floating_point():
        raise AudioError(f"{name}: unsupported sample type {arr.dtype} (use float, int16 or int32)")
    try:
        return to_mono(arr.to(torch.float32), channel_dim=channel_dim).reshape(-1)
    except ValueError as err:
        raise AudioError(f"{name}: {err}") from err


def prepare_waveform(
    samples: Union[torch.Tensor, np.ndarray],
    sample_rate: int,
    target_rate: int = SAMPLE_RATE,
    name: str = "waveform",
    channel_dim: int = -1,
    integer_source: bool = False,
) -> torch.Tensor:
    """In-memory counterpart of :func:`load_audio`: mono, checked, resampled float32 ``[N]``
    (sample types and channel layout as :func:`float_mono`).

    ``integer_source``: the samples were decoded from integer PCM, so they cannot be NaN or Inf
    and only emptiness is checked (``check_waveform``'s ``finite_check``)."""
    wave = float_mono(samples, name, channel_dim)
    check_waveform(wave, name, finite_check=not integer_source)
    try:
        out = resample(wave, sample_rate, target_rate)
    except ValueError as err:
        raise AudioError(f"{name}: {err}") from err
    if sample_rate != target_rate:  # the resampler's output is checked again
        check_waveform(out, name)
    return out.contiguous()


#: libsndfile subtypes whose samples are integers: decoded to float they are always finite.
_INTEGER_SUBTYPES = frozenset({"PCM_S8", "PCM_U8", "PCM_16", "PCM_24", "PCM_32", "ULAW", "ALAW"})


def load_audio(path_or_file: AudioSource, target_rate: int = SAMPLE_RATE) -> torch.Tensor:
    """Read a whole file (path or binary file object) as float32 mono ``[N]`` at ``target_rate``.

    Raises AudioError (one line naming the file) for a missing, unreadable, non-audio, truncated
    (undecodable) or empty file, NaN/Inf samples, or an unsupported sample rate.
    """
    name = _name_of(path_or_file)
    with _open(path_or_file) as f:
        rate = f.samplerate
        try:
            data = f.read(dtype="float32", always_2d=True)
        except (sf.SoundFileError, RuntimeError, OSError, ValueError) as err:
            raise AudioError(f"{name}: cannot decode audio ({_soundfile_reason(err)})") from err
        _warn_if_truncated(f, name)
        integer = f.subtype in _INTEGER_SUBTYPES
    return prepare_waveform(torch.from_numpy(data), rate, target_rate, name=name, integer_source=integer)


def iter_audio_blocks(
    path: AudioSource, block_seconds: float = 30.0, target_rate: int = SAMPLE_RATE
) -> Iterator[torch.Tensor]:
    """Read a file incrementally: yields float32 mono blocks at ``target_rate``, flat memory.

    Reads ``block_seconds`` of source audio at a time with ``soundfile.blocks``. Concatenating the
    blocks gives exactly ``load_audio(path, target_rate)`` when the file is already at
    ``target_rate`` (bit-identical) and, for other rates, the same samples to float rounding
    (< 1e-6 absolute, tested) via :class:`StreamingResampler`. Yielded block lengths vary a little
    around ``block_seconds * target_rate`` (the resampler holds back its look-ahead until the next
    block or the end). Empty blocks are not yielded. Errors are AudioError, possibly raised after
    some blocks were yielded (e.g. NaN in the middle, or a stream that breaks off).
    """
    if not block_seconds > 0:
        raise ValueError(f"block_seconds must be positive, got {block_seconds}")
    name = _name_of(path)
    with _open(path) as f:
        rate = f.samplerate
        try:
            resampler = StreamingResampler(rate, target_rate)
        except ValueError as err:
            raise AudioError(f"{name}: {err}") from err
        _warn_if_truncated(f, name)
        blocksize = max(1, int(round(block_seconds * rate)))
        produced = 0
        offset = 0  # source frames read so far, for error messages
        blocks = f.blocks(blocksize=blocksize, dtype="float32", always_2d=True)
        while True:
            try:
                block = next(blocks)
            except StopIteration:
                break
            except (sf.SoundFileError, RuntimeError, OSError, ValueError) as err:
                raise AudioError(
                    f"{name}: cannot decode audio after {offset / rate:.2f} s ({_soundfile_reason(err)})"
                ) from err
            mono = to_mono(torch.from_numpy(block))
            if mono.numel() == 0:
                continue
            if not bool(torch.isfinite(mono).all()):
                bad = int((~torch.isfinite(mono)).sum())
                raise AudioError(
                    f"{name}: contains {bad} non-finite samples (NaN or Inf) after {offset / rate:.2f} s"
                )
            offset += mono.numel()
            out = resampler.accept(mono)
            if out.numel():
                produced += out.numel()
                yield out
        tail = resampler.flush()
        if tail.numel():
            produced += tail.numel()
            yield tail
        if produced == 0:
            raise AudioError(f"{name}: contains no audio samples")


__all__ = [
    "AudioError",
    "TruncatedAudioWarning",
    "StreamingResampler",
    "check_waveform",
    "iter_audio_blocks",
    "load_audio",
    "prepare_waveform",
    "resample",
    "to_mono",
]
