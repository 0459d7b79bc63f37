"""Microphone input through PortAudio (``sounddevice``), with failures turned into clear messages.

``sounddevice`` and the PortAudio library it loads (Debian/Ubuntu: ``libportaudio2``; then
``pip install sounddevice`` or ``pip install rwkv-asr[mic]``) are imported only here, and only when
a microphone is opened or listed, so everything else in the package works without them.

How audio flows: PortAudio calls :meth:`Microphone._callback` on its own thread with each block;
the callback only copies the block into a bounded queue (it must never block or allocate much:
PortAudio drops input while it runs). The reader (:meth:`Microphone.read`) takes blocks from the
queue on the main thread, where the recognizer runs.

Failures and what happens:

* no input device / unknown ``--device`` / no PortAudio / no sounddevice: :class:`MicrophoneError`
  with a one-line message before anything is recorded.
* unsupported sample rate: the stream is opened at the device's default rate instead and the
  recognizer resamples (``Microphone.samplerate`` says which rate is in use; ``rate_note`` why).
* input overflow (the reader fell behind, or PortAudio did): recording goes on; PortAudio's
  overflow flags are counted, and samples lost are counted when we drop them ourselves (queue
  full: the oldest blocks go first) or estimated from gaps in PortAudio's capture timestamps.
* device lost mid-stream (unplugged, server gone): PortAudio stops calling back or reports an
  error; :meth:`read` raises :class:`MicrophoneError` ("device lost") after ``stall_timeout``
  seconds without audio, and the caller keeps what it has transcribed.
"""
from __future__ import annotations

import queue
import threading
import time
from dataclasses import dataclass
from typing import Any, Optional, Union

import numpy as np

__all__ = ["MicrophoneError", "Microphone", "MicStats", "list_input_devices", "import_sounddevice"]

TARGET_RATE = 16000


class MicrophoneError(Exception):
    """The microphone cannot be used (or stopped working). ``str(err)`` is one line for users."""


def import_sounddevice() -> Any:
    """Import sounddevice, explaining what to install when it or PortAudio is missing."""
    try:
        import sounddevice as sd
    except ImportError as err:
        raise MicrophoneError("microphone input needs the 'sounddevice' package: pip install sounddevice "
                              f"(or pip install rwkv-asr[mic]) ({err})") from err
    except OSError as err:  # sounddevice raises OSError when libportaudio cannot be loaded
        raise MicrophoneError("microphone input needs the PortAudio library: install it (Debian/Ubuntu: "
                              f"apt-get install libportaudio2; macOS: brew install portaudio) ({err})") from err
    return sd


def _one_line(err: BaseException) -> str:
    text = " ".join(str(err).split())
    return text or type(err).__name__


def list_input_devices() -> str:
    """A table of the input devices PortAudio sees (``asr-live --list-devices``)."""
    sd = import_sounddevice()
    try:
        devices = sd.query_devices()
        hostapis = sd.query_hostapis()
    except Exception as err:  # PortAudioError and friends
        raise MicrophoneError(f"cannot list audio devices: {_one_line(err)}") from err
    try:
        default_in = sd.default.device[0]
    except Exception:
        default_in = -1
    lines = []
    for i, d in enumerate(devices):
        if d["max_input_channels"] <= 0:
            continue
        mark = "*" if i == default_in else " "
        api = hostapis[d["hostapi"]]["name"] if 0 <= d["hostapi"] < len(hostapis) else "?"
        lines.append(f"{mark} {i:3d}  {d['name']}  ({api}, {d['max_input_channels']} in, "
                     f"default {d['default_samplerate']:.0f} Hz)")
    if not lines:
        return "no input devices found"
    return "input devices (* = default):\n" + "\n".join(lines)


def _parse_device(device: Union[int, str, None]) -> Union[int, str, None]:
    if isinstance(device, str) and device.strip().lstrip("-").isdigit():
        return int(device)
    return device


@dataclass
class MicStats:
    """Counters for the live statistics and the final report."""

    blocks: int = 0
    samples: int = 0  # samples delivered to the reader
    overflows: int = 0  # PortAudio input-overflow flags seen
    dropped_samples: int = 0  # samples known lost (queue full) or estimated lost (timestamp gaps)


class Microphone:
    """A mono input stream; use as a context manager, then call :meth:`read` in a loop.

    Args:
        device: PortAudio device index, or a substring of its name; ``None`` = the default input.
        samplerate: preferred rate (default 16 kHz, what the model wants). If the device refuses
            it, the device's default rate is used and :attr:`rate_note` says so.
        block_seconds: audio per callback block (latency vs. overhead; 0.1 s by default).
        max_queue_seconds: audio the queue holds before the oldest blocks are dropped.
        stall_timeout: seconds without any block after which the device counts as lost.
    """

    def __init__(
        self,
        device: Union[int, str, None] = None,
        samplerate: Optional[int] = None,
        block_seconds: float = 0.1,
        max_queue_seconds: float = 30.0,
        stall_timeout: float = 3.0,
    ) -> None:
        self._sd = import_sounddevice()
        self.device = _parse_device(device)
        self.stall_timeout = stall_timeout
        self.stats = MicStats()
        self.rate_note: Optional[str] = None
        self.device_name, self.samplerate = self._choose(samplerate)
        self.blocksize = max(1, int(round(block_seconds * self.samplerate)))
        maxblocks = max(2, int(max_queue_seconds / block_seconds))
        self._queue: "queue.Queue[tuple[np.ndarray, float]]" = queue.Queue(maxsize=maxblocks)
        self._lock = threading.Lock()
        self._stream: Any = None
        self._next_adc: Optional[float] = None
        self._error: Optional[str] = None
        self._finished = threading.Event()
        self._last_block = time.monotonic()

    # ------------------------------------------------------------------ opening
    def _choose(self, samplerate: Optional[int]) -> tuple[str, int]:
        """Resolve the device and a rate it accepts (requested/16 kHz, else its default)."""
        sd = self._sd
        try:
            info = sd.query_devices(self.device, "input")
        except ValueError as err:  # unknown index/name, or not an input device
            raise MicrophoneError(f"no such audio input device: {self.device!r} ({_one_line(err)}); "
                                  "see asr-live --list-devices") from err
        except Exception as err:  # PortAudioError: no default input device, no host API ...
            what = "no audio input device found" if self.device is None else f"cannot use audio device {self.device!r}"
            raise MicrophoneError(f"{what} ({_one_line(err)}); see asr-live --list-devices") from err
        name = str(info["name"])
        want = int(samplerate or TARGET_RATE)
        try:
            sd.check_input_settings(device=self.device, channels=1, dtype="float32", samplerate=want)
            return name, want
        except Exception as err:
            default = int(info["default_samplerate"])
            self.rate_note = (f"{name} does not record at {want} Hz ({_one_line(err)}); recording at its "
                              f"default {default} Hz and resampling to {TARGET_RATE} Hz")
            try:
                sd.check_input_settings(device=self.device, channels=1, dtype="float32", samplerate=default)
            except Exception as err2:
                raise MicrophoneError(f"audio device {name!r} cannot record mono audio at {want} Hz or at its "
                                      f"default {default} Hz ({_one_line(err2)})") from err2
            return name, default

    def __enter__(self) -> "Microphone":
        self.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def start(self) -> None:
        sd = self._sd
        try:
            self._stream = sd.InputStream(
                device=self.device, samplerate=self.samplerate, channels=1, dtype="float32",
                blocksize=self.blocksize, callback=self._callback, finished_callback=self._finished.set,
            )
            self._stream.start()
        except Exception as err:
            raise MicrophoneError(f"cannot open audio device {self.device_name!r} at {self.samplerate} Hz "
                                  f"({_one_line(err)})") from err
        self._last_block = time.monotonic()

    def close(self) -> None:
        """Stop recording (idempotent). Blocks still queued can be read with ``read(0)``."""
        stream, self._stream = self._stream, None
        if stream is not None:
            try:
                stream.abort()  # abort, not stop: do not wait for pending buffers of a dead device
                stream.close()
            except Exception:  # a lost device may fail to close; nothing is left to save there
                pass

    # ------------------------------------------------------------------ the PortAudio thread
    def _callback(self, indata: np.ndarray, frames: int, time_info: Any, status: Any) -> None:
        """Copy the block into the queue; count overflows and gaps. Runs on PortAudio's thread."""
        try:
            adc = float(time_info.inputBufferAdcTime)
        except Exception:
            adc = 0.0
        with self._lock:
            if status and getattr(status, "input_overflow", False):
                self.stats.overflows += 1
                # PortAudio does not say how much was lost; its capture clock does (when it has one).
                if self._next_adc is not None and adc > 0:
                    gap = int(round((adc - self._next_adc) * self.samplerate))
                    if gap > 0:
                        self.stats.dropped_samples += gap
            if adc > 0:
                self._next_adc = adc + frames / self.samplerate
        block = indata[:, 0].copy()
        try:
            self._queue.put_nowait((block, time.monotonic()))
        except queue.Full:  # the reader is too slow: drop the oldest block, keep the newest
            try:
                old, _ = self._queue.get_nowait()
                with self._lock:
                    self.stats.dropped_samples += len(old)
                    self.stats.overflows += 1
                self._queue.put_nowait((block, time.monotonic()))
            except (queue.Empty, queue.Full):
                with self._lock:
                    self.stats.dropped_samples += len(block)

    # ------------------------------------------------------------------ the reader
    def read(self, timeout: Optional[float] = None) -> Optional[tuple[np.ndarray, float]]:
        """The next block ``(samples float32 [n], arrival time.monotonic())``; ``None`` if none
        arrived within ``timeout`` seconds (default: the block length x 5).

        Raises MicrophoneError when the device is lost: the stream finished on its own, or no
        block came for ``stall_timeout`` seconds while the stream should be running.
        """
        wait = timeout if timeout is not None else 5 * self.blocksize / self.samplerate
        try:
            block, t = self._queue.get(timeout=wait)
        except queue.Empty:
            if self._stream is None:
                return None
            stalled = time.monotonic() - self._last_block
            if self._finished.is_set() or not self._stream_active():
                raise MicrophoneError(f"audio device {self.device_name!r} lost: the input stream stopped")
            if stalled > self.stall_timeout:
                raise MicrophoneError(f"audio device {self.device_name!r} lost: no audio for {stalled:.1f} s")
            return None
        self._last_block = time.monotonic()
        self.stats.blocks += 1
        self.stats.samples += len(block)
        return block, t

    def _stream_active(self) -> bool:
        try:
            return bool(self._stream is not None and self._stream.active)
        except Exception:
            return False

    def drain(self) -> list[np.ndarray]:
        """Blocks still queued (after :meth:`close`), so nothing recorded is lost."""
        out = []
        while True:
            try:
                block, _ = self._queue.get_nowait()
            except queue.Empty:
                return out
            self.stats.blocks += 1
            self.stats.samples += len(block)
            out.append(block)
