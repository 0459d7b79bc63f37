"""``asr-live`` end to end: a file through the live path, a missing device, and a virtual microphone.

The virtual-microphone test records through the real PortAudio/PulseAudio path: it starts its own
PulseAudio daemon (in a temporary folder, so nothing of the machine's audio setup is touched) with
a null sink ``vmic`` whose monitor is the default source, runs ``asr-live`` as a subprocess, waits
until it reports that audio is flowing, plays a WAV into the sink with ``paplay``, then stops it
with SIGINT as a user's Ctrl-C would. It needs the system packages ``pulseaudio``,
``pulseaudio-utils`` (paplay, pactl) and ``libportaudio2``, and the ``sounddevice`` module; it
installs nothing and skips, naming what is missing, without them.
"""
from __future__ import annotations

import ctypes.util
import importlib
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from asr.audio import load_audio
from asr.decode.align import words_from_tokens
from asr.decode.greedy import ctc_greedy
from asr.features import compute_fbank
from asr.model_file import load_for_inference

DATA = Path(__file__).parent / "data"
STREAM_MODEL = DATA / "stream_tiny.pt"
SR = 16000
LIVE = [sys.executable, "-m", "asr.cli.live"]


def offline_words(ckpt: Path, wave: torch.Tensor) -> list[tuple[str, float, float]]:
    """(word, start, end) of offline greedy transcription of the whole recording."""
    torch.set_num_threads(1)
    model, tok = load_for_inference(ckpt)
    feats = compute_fbank(wave)
    with torch.no_grad():
        logits, _ = model(feats[None], torch.tensor([feats.shape[0]]))
    tokens, frames = ctc_greedy(logits[0])
    duration = wave.numel() / SR
    out, group = [], []
    for i, t in enumerate(tokens + [None]):
        if group and (t is None or tok.is_word_start(t)):
            got = words_from_tokens([tokens[j] for j in group], [frames[j] for j in group], tok,
                                    num_frames=logits.shape[1])
            if got:
                out.append((got[0].word, min(got[0].start, duration), min(got[0].end, duration)))
            group = []
        if t is not None:
            group.append(i)
    return out


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def env_for_child(**extra: str) -> dict:
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", **extra)
    root = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    return env


def test_live_input_fast_gives_the_offline_transcript(overfit_checkpoint, tmp_path):
    wav = DATA / "audio/pocketsphinx_goforward.flac"
    out = tmp_path / "finals.jsonl"
    r = subprocess.run(LIVE + ["--model", str(overfit_checkpoint), "--input", str(wav), "--fast",
                               "--output", str(out), "--stats"],
                       capture_output=True, text=True, env=env_for_child(), timeout=120)
    assert r.returncode == 0, r.stderr
    finals = read_jsonl(out)
    words = [(w["word"], w["start"], w["end"]) for s in finals for w in s["words"]]
    assert words == offline_words(overfit_checkpoint, load_audio(wav))
    assert " ".join(s["text"] for s in finals) == "go forward ten meters"
    assert r.stdout.splitlines() == [s["text"] for s in finals]  # not a TTY: finals only, no \r
    assert "real-time factor" in r.stderr and "per 40 ms frame" in r.stderr
    # txt format: one line per final
    txt = tmp_path / "finals.txt"
    r = subprocess.run(LIVE + ["--model", str(overfit_checkpoint), "--input", str(wav), "--fast", "--output", str(txt)],
                       capture_output=True, text=True, env=env_for_child(), timeout=120)
    assert r.returncode == 0 and txt.read_text().splitlines() == ["go forward ten meters"]


@pytest.mark.skipif(os.environ.get("ASR_TEST_COMPILE") == "0" or not (shutil.which("c++") or shutil.which("g++")),
                    reason="--compile builds C++ with torch.compile's inductor (ASR_TEST_COMPILE=0 skips)")
def test_live_compile_gives_the_offline_transcript(overfit_checkpoint, tmp_path, monkeypatch, capsys):
    """--compile: 160 ms blocks through the compiled 4-frame step (float32: the float backend's
    results to float rounding), so the words and times are the offline ones. In-process, to count
    the calls that took the compiled step."""
    from asr.cli import live
    from asr.infer.compiled import CompiledSteps

    calls = []
    original = CompiledSteps.__call__
    monkeypatch.setattr(CompiledSteps, "__call__",
                        lambda obj, x, *rest: calls.append(x.shape[1] // 4) or original(obj, x, *rest))
    wav = DATA / "audio/pocketsphinx_goforward.flac"
    out = tmp_path / "finals.jsonl"
    threads = torch.get_num_threads()
    try:
        rc = live.main(["--model", str(overfit_checkpoint), "--input", str(wav), "--fast", "--compile",
                        "--output", str(out)])
    finally:
        torch.set_num_threads(threads)  # asr-live runs on one thread
    assert rc == 0, capsys.readouterr().err
    audio = load_audio(wav)
    assert len(calls) >= len(audio) / 16000 / 0.16 - 3 and set(calls) == {4}  # ~every block, 4 frames each
    words = [(w["word"], w["start"], w["end"]) for s in read_jsonl(out) for w in s["words"]]
    assert words == offline_words(overfit_checkpoint, audio)


def test_live_compile_failure_is_a_one_line_error(overfit_checkpoint, monkeypatch, capsys):
    """No C++ compiler (or any other compile failure): one line on stderr, exit 1, no traceback."""
    from asr.cli import live
    from asr.infer.compiled import CompiledSteps

    def no_compiler(self, *args, **kwargs):
        raise RuntimeError("InvalidCxxCompiler: No working C++ compiler found in\ntorch._inductor.config.cpp.cxx")

    monkeypatch.setattr(CompiledSteps, "__init__", no_compiler)
    threads = torch.get_num_threads()
    try:
        rc = live.main(["--model", str(overfit_checkpoint), "--input", str(DATA / "audio/pocketsphinx_goforward.flac"),
                        "--fast", "--compile"])
    finally:
        torch.set_num_threads(threads)
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 1
    assert err[-1].startswith("asr-live: error: --compile failed: InvalidCxxCompiler: No working C++ compiler")
    assert not any("Traceback" in line for line in err)


@pytest.mark.parametrize("args", [["--device", "no-such-device-xyz"], ["--device", "987"]])
def test_missing_device_is_a_one_line_error(overfit_checkpoint, args, tmp_path):
    # No PulseAudio server reachable: whatever PortAudio finds, this device is not among them.
    env = env_for_child(PULSE_SERVER=f"unix:{tmp_path}/no-server")
    r = subprocess.run(LIVE + ["--model", str(overfit_checkpoint)] + args, capture_output=True, text=True,
                       env=env, timeout=120)
    assert r.returncode != 0
    lines = [line for line in r.stderr.splitlines() if line.startswith("asr-live")]
    assert len(lines) == 1 and lines[0].startswith("asr-live: error:"), r.stderr
    assert "Traceback" not in r.stderr


def test_missing_model_and_input_are_one_line_errors(tmp_path):
    r = subprocess.run(LIVE + ["--model", str(tmp_path / "nope.pt"), "--input", str(DATA / "audio/fsdd_7_jackson_00.flac")],
                       capture_output=True, text=True, env=env_for_child(), timeout=120)
    assert r.returncode == 1 and r.stderr.startswith("asr-live: error:") and "Traceback" not in r.stderr
    r = subprocess.run(LIVE + ["--input", str(tmp_path / "none.wav")], capture_output=True, text=True,
                       env=env_for_child(), timeout=120)
    assert r.returncode == 1 and "file not found" in r.stderr


# ---------------------------------------------------------------------------------------------- Microphone logic
class _FakeStream:
    def __init__(self, sd, kw):
        self.sd, self.kw, self.active = sd, kw, False
        sd.streams.append(self)

    def start(self):
        self.active = True

    def abort(self):
        self.active = False

    def close(self):
        pass


class _FakeSD:
    """Stands in for the sounddevice module: one device, 'Fake Mic', that records only at 48 kHz."""

    class PortAudioError(Exception):
        pass

    def __init__(self, has_device: bool = True):
        self.has_device = has_device
        self.streams: list[_FakeStream] = []

    def query_devices(self, device=None, kind=None):
        if not self.has_device:
            raise self.PortAudioError("Error querying device -1")
        if device not in (None, 0) and not (isinstance(device, str) and device in "Fake Mic"):
            raise ValueError(f"No input device matching {device!r}")
        return {"name": "Fake Mic", "default_samplerate": 48000.0, "max_input_channels": 1, "hostapi": 0}

    def check_input_settings(self, device=None, channels=None, dtype=None, samplerate=None):
        if samplerate != 48000:
            raise self.PortAudioError("Invalid sample rate [PaErrorCode -9997]")

    def InputStream(self, **kw):
        return _FakeStream(self, kw)


class _Status:
    def __init__(self, overflow: bool):
        self.input_overflow = overflow

    def __bool__(self):
        return self.input_overflow


class _Time:
    def __init__(self, adc: float):
        self.inputBufferAdcTime = adc


@pytest.fixture
def fake_sd(monkeypatch):
    import asr.stream.microphone as mic_mod

    fake = _FakeSD()
    monkeypatch.setattr(mic_mod, "import_sounddevice", lambda: fake)
    return fake


def test_microphone_falls_back_to_the_device_rate_and_counts_overflows(fake_sd):
    from asr.stream.microphone import Microphone

    mic = Microphone(None, block_seconds=0.1)
    assert mic.samplerate == 48000 and "16000" in mic.rate_note and "resampling" in mic.rate_note
    mic.start()
    cb = fake_sd.streams[0].kw["callback"]
    block = np.zeros((4800, 1), dtype=np.float32)
    cb(block, 4800, _Time(1.0), _Status(False))
    cb(block + 0.5, 4800, _Time(1.1), _Status(False))
    cb(block, 4800, _Time(1.3), _Status(True))  # 0.1 s (4800 samples) went missing before this block
    assert mic.stats.overflows == 1 and mic.stats.dropped_samples == 4800
    got = [mic.read(0.1) for _ in range(3)]
    assert [float(b[0][0]) for b in got] == [0.0, 0.5, 0.0] and mic.stats.samples == 3 * 4800
    mic.close()
    assert not fake_sd.streams[0].active


def test_microphone_drops_oldest_blocks_when_the_reader_falls_behind(fake_sd):
    from asr.stream.microphone import Microphone

    mic = Microphone("Fake", samplerate=48000, block_seconds=0.1, max_queue_seconds=0.2)  # 2 blocks
    mic.start()
    cb = fake_sd.streams[0].kw["callback"]
    for i in range(5):
        cb(np.full((4800, 1), i, dtype=np.float32), 4800, _Time(0.0), _Status(False))
    assert mic.stats.dropped_samples == 3 * 4800 and mic.stats.overflows == 3
    assert [float(mic.read(0.1)[0][0]) for _ in range(2)] == [3.0, 4.0]  # the newest are kept
    mic.close()
    assert mic.read(0.01) is None  # closed and empty: nothing more, no error


def test_microphone_reports_a_lost_device(fake_sd):
    from asr.stream.microphone import Microphone, MicrophoneError

    mic = Microphone(stall_timeout=0.2)
    mic.start()
    cb = fake_sd.streams[0].kw["callback"]
    cb(np.zeros((4800, 1), dtype=np.float32), 4800, _Time(0.0), _Status(False))
    assert mic.read(0.1) is not None
    time.sleep(0.3)  # the device stops delivering while the stream claims to run
    with pytest.raises(MicrophoneError, match="lost: no audio for"):
        mic.read(0.05)
    fake_sd.streams[0].active = False  # PortAudio stopped the stream
    with pytest.raises(MicrophoneError, match="lost: the input stream stopped"):
        mic.read(0.05)


def test_microphone_errors_are_one_line(monkeypatch):
    import asr.stream.microphone as mic_mod

    monkeypatch.setattr(mic_mod, "import_sounddevice", lambda: _FakeSD(has_device=False))
    with pytest.raises(mic_mod.MicrophoneError, match="no audio input device found") as e:
        mic_mod.Microphone()
    assert "\n" not in str(e.value)
    monkeypatch.setattr(mic_mod, "import_sounddevice", lambda: _FakeSD())
    with pytest.raises(mic_mod.MicrophoneError, match="no such audio input device: 3"):
        mic_mod.Microphone("3")


# ---------------------------------------------------------------------------------------------- virtual mic
def _missing_for_virtual_mic() -> list[str]:
    missing = [b for b in ("pulseaudio", "pactl", "paplay") if shutil.which(b) is None]
    if ctypes.util.find_library("portaudio") is None:
        missing.append("libportaudio2")
    try:
        importlib.import_module("sounddevice")  # also loads PortAudio
    except (ImportError, OSError):
        missing.append("sounddevice (pip)")
    return missing


class PulseServer:
    """A private PulseAudio daemon with a null sink ``vmic`` whose monitor is the default source."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.socket = root / "native"
        self.server = f"unix:{self.socket}"
        conf = root / "vmic.pa"
        conf.write_text(
            f"load-module module-native-protocol-unix socket={self.socket} auth-anonymous=1\n"
            "load-module module-null-sink sink_name=vmic rate=16000 channels=1 norewinds=1\n"
            "set-default-sink vmic\n"
            "set-default-source vmic.monitor\n"
        )
        # HOME/XDG_RUNTIME_DIR in the temp folder: the daemon's cookie, pid file and state go there.
        self.env = dict(os.environ, HOME=str(root), XDG_RUNTIME_DIR=str(root), PULSE_SERVER=self.server,
                        PULSE_RUNTIME_PATH=str(root / "runtime"))
        subprocess.run(["pulseaudio", "--daemonize=yes", "--exit-idle-time=-1", "-n", "-F", str(conf),
                        "--log-target=file:" + str(root / "pulse.log")],
                       env=self.env, check=True, timeout=30, capture_output=True)
        deadline = time.monotonic() + 20
        while subprocess.run(["pactl", "info"], env=self.env, capture_output=True, timeout=10).returncode != 0:
            if time.monotonic() > deadline:
                raise RuntimeError("pulseaudio did not answer: " + (root / "pulse.log").read_text()[-2000:])
            time.sleep(0.2)

    def stop(self) -> None:
        subprocess.run(["pactl", "exit"], env=self.env, capture_output=True, timeout=10)


class StderrReader:
    """Collects a child's stderr lines in a thread (the only reader of that pipe)."""

    def __init__(self, stream) -> None:
        self.lines: list[str] = []
        self._new = threading.Condition()
        self._thread = threading.Thread(target=self._run, args=(stream,), daemon=True)
        self._thread.start()

    def _run(self, stream) -> None:
        for line in stream:
            with self._new:
                self.lines.append(line)
                self._new.notify_all()

    def wait_for(self, needle: str, timeout: float) -> bool:
        with self._new:
            return self._new.wait_for(lambda: any(needle in line for line in self.lines), timeout)

    def text(self) -> str:
        self._thread.join(timeout=10)  # the child has exited: read to EOF
        return "".join(self.lines)


def _finish(proc: subprocess.Popen, timeout: float) -> str:
    """Wait for the child; return its stdout (stderr goes to its StderrReader)."""
    proc.wait(timeout=timeout)
    return proc.stdout.read()


def _find(haystack: np.ndarray, needle: np.ndarray) -> int:
    """Offset where ``needle`` sits in ``haystack`` (best match of the first 4000 samples)."""
    head = needle[:4000]
    scores = np.correlate(haystack, head, mode="valid")
    return int(np.argmax(scores))


def test_virtual_microphone_transcribes_what_is_played(tmp_path):
    missing = _missing_for_virtual_mic()
    if missing:
        pytest.skip("virtual microphone needs " + ", ".join(missing) +
                    " (apt-get install pulseaudio pulseaudio-utils libportaudio2; pip install sounddevice)")
    torch.set_num_threads(1)
    # What is played: two utterances with a 2 s pause, then 2 s of silence (16 kHz mono 16-bit).
    cards = load_audio(DATA / "audio/pocketsphinx_cards_001.flac")
    fwd = load_audio(DATA / "audio/pocketsphinx_goforward.flac")
    played = torch.cat([cards, torch.zeros(2 * SR), fwd, torch.zeros(2 * SR)])
    wav = tmp_path / "played.wav"
    sf.write(wav, played.numpy(), SR, subtype="PCM_16")
    played = torch.from_numpy(sf.read(wav, dtype="float32")[0])  # exactly what paplay sends

    pulse = PulseServer(tmp_path)
    proc = None
    try:
        out, captured = tmp_path / "finals.jsonl", tmp_path / "captured.wav"
        proc = subprocess.Popen(LIVE + ["--model", str(STREAM_MODEL), "--output", str(out), "--save-audio", str(captured),
                                        "--stats"],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                env=env_for_child(**{k: pulse.env[k] for k in ("PULSE_SERVER", "HOME", "XDG_RUNTIME_DIR")}))
        err = StderrReader(proc.stderr)
        assert err.wait_for("listening on", timeout=60), "asr-live did not start recording: " + "".join(err.lines)
        subprocess.run(["paplay", "--device=vmic", str(wav)], env=pulse.env, check=True, timeout=60)
        time.sleep(0.5)  # let the tail of the playback reach the recorder
        proc.send_signal(signal.SIGINT)
        stdout = _finish(proc, timeout=60)
        stderr = err.text()
        assert proc.returncode == 0, stderr
        assert "real-time factor" in stderr
    finally:
        if proc is not None and proc.poll() is None:
            proc.kill()
        pulse.stop()

    finals = read_jsonl(out)
    got_words = [(w["word"], w["start"], w["end"]) for s in finals for w in s["words"]]
    # 1. The microphone path delivered the played samples unchanged, with silence around them.
    rec = torch.from_numpy(sf.read(captured, dtype="float32")[0])
    off = _find(rec.numpy(), played.numpy())
    assert off + len(played) <= len(rec)
    torch.testing.assert_close(rec[off : off + len(played)], played, rtol=0, atol=2e-4)
    assert rec[:off].abs().max() <= 2e-4 if off else True
    assert rec[off + len(played):].abs().max() <= 2e-4 if off + len(played) < len(rec) else True
    # 2. The finals equal offline transcription of exactly what was recorded (words and times).
    assert got_words == offline_words(STREAM_MODEL, rec)
    # 3. ... which is the transcript of the played file: only the leading silence differs
    #    (times shift by it), and each utterance is its own segment (the 2 s pause is an endpoint).
    assert [s["text"] for s in finals] == ["ten of clubs", "go forward ten meters"]
    want = offline_words(STREAM_MODEL, played)
    assert [w for w, _, _ in got_words] == [w for w, _, _ in want]
    shift = off / SR
    for (_, s1, e1), (_, s2, e2) in zip(got_words, want):
        assert abs(s1 - (s2 + shift)) <= 0.08 and abs(e1 - (e2 + shift)) <= 0.08
    assert stdout.splitlines() == [s["text"] for s in finals]


def test_virtual_microphone_lost_mid_stream_saves_what_was_heard(tmp_path):
    """The audio server goes away while asr-live records: one clear error line, exit 1, and the
    finals written are the transcript of everything recorded before."""
    missing = _missing_for_virtual_mic()
    if missing:
        pytest.skip("virtual microphone needs " + ", ".join(missing))
    torch.set_num_threads(1)
    wav = tmp_path / "played.wav"
    cards = load_audio(DATA / "audio/pocketsphinx_cards_001.flac")
    sf.write(wav, torch.cat([cards, torch.zeros(int(1.5 * SR))]).numpy(), SR, subtype="PCM_16")
    pulse = PulseServer(tmp_path)
    out, captured = tmp_path / "finals.txt", tmp_path / "captured.wav"
    proc = subprocess.Popen(LIVE + ["--model", str(STREAM_MODEL), "--output", str(out), "--save-audio", str(captured)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env_for_child(**{k: pulse.env[k] for k in ("PULSE_SERVER", "HOME", "XDG_RUNTIME_DIR")}))
    err = StderrReader(proc.stderr)
    try:
        assert err.wait_for("listening on", timeout=60), "asr-live did not start recording: " + "".join(err.lines)
        subprocess.run(["paplay", "--device=vmic", str(wav)], env=pulse.env, check=True, timeout=60)
    finally:
        pulse.stop()  # the "device" disappears
    try:
        _finish(proc, timeout=30)  # it must notice and end by itself
    finally:
        if proc.poll() is None:
            proc.kill()
    stderr = err.text()
    ours = [line for line in stderr.splitlines() if line.startswith("asr-live: error")]
    assert proc.returncode == 1 and len(ours) == 1 and "lost" in ours[0], stderr
    rec = torch.from_numpy(sf.read(captured, dtype="float32")[0])
    want = " ".join(w for w, _, _ in offline_words(STREAM_MODEL, rec))
    assert " ".join(out.read_text().split()) == want == "ten of clubs"
