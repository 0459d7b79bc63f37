"""Text-to-speech engines from Debian main: espeak-ng and flite, called as programs.

Each ``synth_*`` function returns ``(samples float32 [N] in [-1, 1], sample_rate)`` or raises
:class:`EngineError`. The engines are called through their command-line programs (not a Python
binding) so the recipe needs nothing beyond ``apt-get install espeak-ng flite``, and the same calls
work on a machine where the .deb files were only unpacked with ``dpkg -x`` (put their ``usr/bin`` on
PATH and set ``ESPEAK_DATA_PATH``).

Voices:

* espeak-ng: a base voice (accent and pronunciation rules, e.g. ``en-us``, ``en-gb-scotland``) plus
  a *variant* (formants, pitch range, breathiness: ``+m3``, ``+f2``, ``+klatt``...), plus the words
  per minute (``-s``) and base pitch (``-p``). The mbrola voices listed by ``--voices=en`` need the
  non-free mbrola program (not in Debian main) and are not used.
* flite: ``kal`` (8 kHz diphone), ``kal16`` (16 kHz diphone, same speaker), ``awb`` (Scottish male),
  ``rms`` (US male) and ``slt`` (US female), the last three clustergen (statistical parametric)
  voices. Speed through ``duration_stretch``; pitch through ``int_f0_target_mean``, which ``rms``
  ignores (its pitch still varies through the speed perturbation of :mod:`augment_audio`).
"""
from __future__ import annotations

import io
import os
import re
import shutil
import subprocess
import tempfile

import numpy as np
import soundfile as sf

#: espeak-ng base voices usable without mbrola (``espeak-ng --voices=en``, files under gmw/).
ESPEAK_VOICES = ["en-us", "en-gb", "en-gb-scotland", "en-gb-x-gbclan", "en-gb-x-rp",
                 "en-gb-x-gbcwmd", "en-029", "en-us-nyc"]
#: Variants left out because they are sound effects rather than voices (robots, a demon, a
#: public-address announcer): a recogniser should not spend capacity on them.
ESPEAK_EXCLUDED_VARIANTS = {"Demonic", "announcer", "UniRobot", "anikaRobot", "robosoft", "robosoft2",
                            "robosoft3", "robosoft4", "robosoft5", "robosoft6", "robosoft7", "robosoft8"}
FLITE_VOICES = ["kal", "kal16", "awb", "rms", "slt"]
#: Range of int_f0_target_mean (Hz) per flite voice, around each voice's natural pitch.
FLITE_F0 = {"kal": (85, 140), "kal16": (85, 140), "awb": (85, 145), "rms": (90, 130), "slt": (150, 250)}

_TIMEOUT_S = 60


class EngineError(RuntimeError):
    """A TTS engine is missing or failed on one input; the message says which and why."""


def have_espeak() -> bool:
    return shutil.which("espeak-ng") is not None


def have_flite() -> bool:
    return shutil.which("flite") is not None


def espeak_variants() -> list[str]:
    """Variant names usable as ``<voice>+<name>``, sorted, sound-effect variants excluded.

    Read from ``espeak-ng --voices=variant`` (its File column is ``!v/<name>``), so the list follows
    the installed espeak-ng data rather than a hard-coded copy.
    """
    if not have_espeak():
        raise EngineError("espeak-ng is not installed: apt-get install espeak-ng")
    out = subprocess.run(["espeak-ng", "--voices=variant"], check=True, capture_output=True, text=True).stdout
    names = set()
    for line in out.splitlines()[1:]:
        m = re.search(r"!v/(\S+)", line)
        if m and m.group(1) not in ESPEAK_EXCLUDED_VARIANTS:
            names.add(m.group(1))
    return sorted(names)


def _read_wav(data: bytes, what: str) -> tuple[np.ndarray, int]:
    try:
        x, sr = sf.read(io.BytesIO(data), dtype="float32", always_2d=True)
    except Exception as e:  # soundfile raises several types for a broken stream
        raise EngineError(f"{what}: unreadable output ({e})") from None
    x = x.mean(axis=1)
    if x.size == 0 or not np.isfinite(x).all() or np.abs(x).max() < 1e-4:
        raise EngineError(f"{what}: empty or silent output")
    return x, int(sr)


def synth_espeak(text: str, voice: str, variant: str | None = None, rate: int = 175,
                 pitch: int = 50, word_gap: int = 0) -> tuple[np.ndarray, int]:
    """Speak ``text`` with espeak-ng (22.05 kHz). ``rate`` in words per minute, ``pitch`` 0..99,
    ``word_gap`` extra pause between words in units of 10 ms. Text goes in on stdin, so no
    character of it can be taken for an option."""
    name = f"{voice}+{variant}" if variant else voice
    cmd = ["espeak-ng", "-v", name, "-s", str(rate), "-p", str(pitch), "-g", str(word_gap), "--stdout"]
    try:
        res = subprocess.run(cmd, input=text.encode(), capture_output=True, timeout=_TIMEOUT_S)
    except FileNotFoundError:
        raise EngineError("espeak-ng is not installed: apt-get install espeak-ng") from None
    except subprocess.TimeoutExpired:
        raise EngineError(f"espeak-ng {name}: timed out") from None
    if res.returncode != 0:
        raise EngineError(f"espeak-ng {name}: exit {res.returncode}: {res.stderr.decode(errors='replace').strip()}")
    return _read_wav(res.stdout, f"espeak-ng {name}")


def synth_flite(text: str, voice: str, duration_stretch: float = 1.0,
                f0_mean: float | None = None) -> tuple[np.ndarray, int]:
    """Speak ``text`` with flite (8 kHz for ``kal``, 16 kHz for the others). flite writes a file,
    not stdout, so a temporary file is used and removed."""
    fd, path = tempfile.mkstemp(suffix=".wav", prefix="flite_")
    os.close(fd)
    cmd = ["flite", "-voice", voice, "--setf", f"duration_stretch={duration_stretch:.3f}"]
    if f0_mean is not None:
        cmd += ["--setf", f"int_f0_target_mean={f0_mean:.1f}"]
    cmd += ["-t", text, "-o", path]
    try:
        res = subprocess.run(cmd, capture_output=True, timeout=_TIMEOUT_S)
        if res.returncode != 0:
            raise EngineError(f"flite {voice}: exit {res.returncode}: {res.stderr.decode(errors='replace').strip()}")
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        raise EngineError("flite is not installed: apt-get install flite") from None
    except subprocess.TimeoutExpired:
        raise EngineError(f"flite {voice}: timed out") from None
    finally:
        if os.path.exists(path):
            os.unlink(path)
    return _read_wav(data, f"flite {voice}")
