"""Make clean TTS output sound like a recording: speed, room, channel, noise, level, silences.

TTS engines give perfectly clean, perfectly levelled, band-unlimited speech with no room and no
noise, framed by a fixed amount of digital silence. A model trained on that learns the engines'
artefacts (and fails on a phone call in a kitchen). :func:`degrade` applies, with a per-utterance
``numpy.random.Generator`` so every utterance is reproducible from its seed:

1. trim the engine's own leading/trailing silence (each engine pads differently: a give-away);
2. speed perturbation by resampling (factor 0.9..1.1, also shifts pitch, like Kaldi's speed perturb),
   done together with the conversion to 16 kHz in one polyphase resampling;
3. leading and trailing silence of random length;
4. reverberation (some utterances): convolution with a room impulse response simulated by
   pyroomacoustics in a random shoebox room, Sabine RT60 0.2..0.8 s (see :func:`make_rir`);
5. telephone channel (some utterances): 300..3400 Hz band-pass;
6. additive white, pink or brown noise (most utterances) at a random SNR of 5..30 dB, measured
   against the speech power of the active part only (so long silences do not inflate the SNR);
7. random gain: peak level -20..-1 dBFS.

The returned dict records what was applied; it goes into the manifest, so WER can be broken down
by condition later.
"""
from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction

import numpy as np
from scipy import signal

SAMPLE_RATE = 16000


@dataclass(frozen=True)
class AugmentConfig:
    """Probabilities and ranges of the degradations (defaults: the recipe's corpus)."""

    speed: tuple[float, float] = (0.9, 1.1)
    lead_silence: tuple[float, float] = (0.05, 0.6)   # seconds
    trail_silence: tuple[float, float] = (0.05, 0.6)
    p_reverb: float = 0.35
    p_telephone: float = 0.15
    p_noise: float = 0.85
    snr_db: tuple[float, float] = (5.0, 30.0)
    noise_colors: tuple[str, ...] = ("white", "pink", "brown")
    peak_dbfs: tuple[float, float] = (-20.0, -1.0)
    trim: bool = True                                 # step 1 (False with no speed change and no
                                                      # added silence keeps the length: recordings)


def trim_silence(x: np.ndarray, sr: int, threshold_db: float = -50.0, keep_s: float = 0.02) -> np.ndarray:
    """Cut leading/trailing samples whose 10 ms frame energy is ``threshold_db`` below the loudest
    frame, keeping ``keep_s`` of margin so the first consonant's onset is not clipped."""
    frame = max(1, int(0.01 * sr))
    n = len(x) // frame
    if n == 0:
        return x
    energy = (x[: n * frame].reshape(n, frame) ** 2).mean(axis=1)
    active = np.flatnonzero(energy > energy.max() * 10 ** (threshold_db / 10))
    if active.size == 0:
        return x
    keep = int(keep_s * sr)
    start = max(0, active[0] * frame - keep)
    end = min(len(x), (active[-1] + 1) * frame + keep)
    return x[start:end]


def resample(x: np.ndarray, orig_sr: int, target_sr: int = SAMPLE_RATE, speed: float = 1.0) -> np.ndarray:
    """Resample to ``target_sr`` and at the same time play ``speed`` times faster (duration / speed,
    pitch * speed), with one polyphase filter. The ratio is rounded to a fraction with a
    denominator <= 1000 (speed error < 0.1 %)."""
    ratio = Fraction(target_sr, 1) / (Fraction(orig_sr, 1) * Fraction(speed).limit_denominator(1000))
    ratio = ratio.limit_denominator(1000)
    if ratio == 1:
        return x.astype(np.float32, copy=True)
    return signal.resample_poly(x, ratio.numerator, ratio.denominator).astype(np.float32)


def colored_noise(n: int, color: str, rng: np.random.Generator) -> np.ndarray:
    """Unit-RMS noise with a power spectrum flat (white), 1/f (pink) or 1/f^2 (brown), made by
    shaping white Gaussian noise in the frequency domain."""
    if n <= 0:
        return np.zeros(0, dtype=np.float32)
    white = rng.standard_normal(n)
    if color != "white":
        exponent = {"pink": 0.5, "brown": 1.0}[color]  # amplitude ~ f^-exponent
        spec = np.fft.rfft(white)
        f = np.fft.rfftfreq(n, d=1.0 / SAMPLE_RATE)
        f[0] = f[1] if n > 1 else 1.0
        # Below 20 Hz the 1/f slopes would put most of the power in inaudible rumble.
        spec *= np.maximum(f, 20.0) ** -exponent
        white = np.fft.irfft(spec, n)
    white -= white.mean()
    rms = np.sqrt(np.mean(white ** 2))
    return (white / max(rms, 1e-12)).astype(np.float32)


def active_power(x: np.ndarray, sr: int = SAMPLE_RATE, threshold_db: float = -40.0) -> float:
    """Mean power of the 20 ms frames within ``threshold_db`` of the loudest one (the speech)."""
    frame = int(0.02 * sr)
    n = len(x) // frame
    if n == 0:
        return float(np.mean(x ** 2)) if len(x) else 0.0
    energy = (x[: n * frame].reshape(n, frame) ** 2).mean(axis=1)
    return float(energy[energy > energy.max() * 10 ** (threshold_db / 10)].mean())


def make_rir(rng: np.random.Generator, rt60_range: tuple[float, float] = (0.2, 0.8),
             sr: int = SAMPLE_RATE) -> tuple[np.ndarray, dict]:
    """Simulate one room impulse response with pyroomacoustics' image source method.

    A random shoebox room (3..10 x 3..8 x 2.4..3.5 m), wall absorption from Sabine's formula for a
    random target RT60, source and microphone at random positions at least 0.5 m from the walls.
    The response starts at the direct path (propagation delay removed, so the transcript's timing
    is unchanged) and is cut where 99.9 % of its energy has arrived. Returns (rir, info).
    """
    import pyroomacoustics as pra  # imported here: only the RIR pool needs it, and it is slow to import

    dims = np.array([rng.uniform(3.0, 10.0), rng.uniform(3.0, 8.0), rng.uniform(2.4, 3.5)])
    rt60 = float(rng.uniform(*rt60_range))
    e_absorption, max_order = pra.inverse_sabine(rt60, dims)
    room = pra.ShoeBox(dims, fs=sr, materials=pra.Material(e_absorption), max_order=int(max_order))
    src = np.array([rng.uniform(0.5, d - 0.5) for d in dims[:2]] + [rng.uniform(1.2, 1.9)])
    mic = np.array([rng.uniform(0.5, d - 0.5) for d in dims[:2]] + [rng.uniform(0.8, 1.6)])
    room.add_source(src)
    room.add_microphone(mic)
    room.compute_rir()
    h = np.asarray(room.rir[0][0], dtype=np.float64)
    start = max(0, int(np.argmax(np.abs(h))) - 16)
    h = h[start:]
    cum = np.cumsum(h ** 2)
    end = int(np.searchsorted(cum, 0.999 * cum[-1])) + 1
    h = h[:end]
    h /= np.sqrt(np.sum(h ** 2))
    info = {"rt60": round(rt60, 2), "room": [round(float(d), 1) for d in dims],
            "distance": round(float(np.linalg.norm(src - mic)), 2)}
    return h.astype(np.float32), info


def degrade(x: np.ndarray, sr: int, rng: np.random.Generator, cfg: AugmentConfig = AugmentConfig(),
            rirs: list[tuple[np.ndarray, dict]] | None = None) -> tuple[np.ndarray, dict]:
    """Apply the chain of the module docstring to engine output ``x`` at rate ``sr``.

    Returns 16 kHz float32 audio with peak below 1.0 and a dict of the parameters drawn.
    ``rirs`` is the pool of impulse responses to draw from (no reverberation when None/empty).
    """
    info: dict = {}
    x = np.asarray(x, dtype=np.float32)
    if cfg.trim:
        x = trim_silence(x, sr)
    speed = float(rng.uniform(*cfg.speed))
    info["speed"] = round(speed, 3)
    y = resample(x, sr, SAMPLE_RATE, speed)
    lead = int(rng.uniform(*cfg.lead_silence) * SAMPLE_RATE)
    trail = int(rng.uniform(*cfg.trail_silence) * SAMPLE_RATE)
    y = np.concatenate([np.zeros(lead, np.float32), y, np.zeros(trail, np.float32)])
    y /= max(float(np.abs(y).max()), 1e-9)

    if rirs and rng.random() < cfg.p_reverb:
        k = int(rng.integers(len(rirs)))
        h, rinfo = rirs[k]
        # Keep the original length: the reverberant tail runs into the trailing silence.
        y = signal.fftconvolve(y, h)[: len(y)].astype(np.float32)
        info["reverb"] = {"rir": k, **rinfo}

    if rng.random() < cfg.p_telephone:
        sos = signal.butter(4, [300.0, 3400.0], btype="bandpass", fs=SAMPLE_RATE, output="sos")
        y = signal.sosfilt(sos, y).astype(np.float32)
        info["telephone"] = True

    if rng.random() < cfg.p_noise:
        color = str(rng.choice(cfg.noise_colors))
        snr = float(rng.uniform(*cfg.snr_db))
        noise = colored_noise(len(y), color, rng)
        p_speech = active_power(y)
        y = y + noise * np.float32(np.sqrt(p_speech / 10 ** (snr / 10)))
        info["noise"] = {"color": color, "snr_db": round(snr, 1)}

    peak_db = float(rng.uniform(*cfg.peak_dbfs))
    y = y * np.float32(10 ** (peak_db / 20) / max(float(np.abs(y).max()), 1e-9))
    info["peak_dbfs"] = round(peak_db, 1)
    return y.astype(np.float32), info


# --- writing -----------------------------------------------------------------------------------------

#: libsndfile maps SFC_SET_COMPRESSION_LEVEL linearly onto the Opus bit rate: level 0 is 256 kb/s,
#: level 1 is 6 kb/s (measured with libsndfile 1.2.2: level 0.95 gives 18.6 kb/s, 0.9 gives 31.7 kb/s).
_OPUS_MAX_BPS, _OPUS_MIN_BPS = 256_000, 6_000


def opus_compression_level(kbps: float) -> float:
    """The soundfile ``compression_level`` that makes libsndfile's Opus encoder aim at ``kbps``.

    Below about 10 kb/s Opus switches from wideband (8 kHz audio bandwidth) to narrowband, which would
    cut the top third of the 80 mel bins, so the recipe uses 12 kb/s.
    """
    level = (_OPUS_MAX_BPS - kbps * 1000.0) / (_OPUS_MAX_BPS - _OPUS_MIN_BPS)
    return float(min(max(level, 0.0), 1.0))


def write_audio(path, y: np.ndarray, fmt: str = "opus", kbps: float = 12.0, sr: int = SAMPLE_RATE) -> None:
    """Write mono float audio as OGG/Opus at ``kbps`` (``fmt="opus"``), 16-bit FLAC (``"flac"``) or
    16-bit WAV (``"wav"``: the same samples as FLAC, ~1.7x the size, decoded ~2x faster by a
    training worker, ``tools/bench_loader.py``).

    Opus goes through ``opusenc`` (Debian ``opus-tools``) when it is installed, and through
    soundfile/libsndfile otherwise. Both use libopus at complexity 10 and give the same bit rate
    and quality (log-mel distance to the original within 2 % of each other), but opusenc is about
    2.5x faster, and encoding is the slowest step of the corpus generation. ``--padding 0`` drops
    the 512 bytes opusenc reserves for later tag edits by default: a third of a 1 s utterance.
    The file is written under a temporary name and renamed, so an interrupted run leaves no
    truncated file that a later step would take for a finished one.
    """
    import io
    import shutil
    import subprocess
    from pathlib import Path

    import soundfile as sf

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    y = np.clip(np.asarray(y, dtype=np.float32), -1.0, 1.0)
    if fmt == "opus":
        exe = shutil.which("opusenc")
        if exe:
            wav = io.BytesIO()
            sf.write(wav, y, sr, format="WAV", subtype="PCM_16")
            res = subprocess.run([exe, "--quiet", "--bitrate", f"{kbps:g}", "--comp", "10", "--padding", "0", "-", str(tmp)],
                                 input=wav.getvalue(), capture_output=True)
            if res.returncode != 0:
                raise RuntimeError(f"opusenc failed for {path}: {res.stderr.decode(errors='replace').strip()}")
        else:
            sf.write(tmp, y, sr, format="OGG", subtype="OPUS", compression_level=opus_compression_level(kbps))
    elif fmt == "flac":
        sf.write(tmp, y, sr, format="FLAC", subtype="PCM_16")
    elif fmt == "wav":  # rounded as libsndfile rounds for FLAC (it truncates for WAV): the same samples
        pcm = np.clip(np.rint(y * np.float32(32768.0)), -32768, 32767).astype(np.int16)
        sf.write(tmp, pcm, sr, format="WAV", subtype="PCM_16")
    else:
        raise ValueError(f"unknown audio format {fmt!r} (opus, flac or wav)")
    tmp.replace(path)
