"""``asr-live``: transcribe the microphone (or a file played at real-time pace) as you speak.

    asr-live [--model PATH] [--device N|NAME] [--samplerate R] [--output FILE] [--format txt|jsonl]
             [--stats] [--save-audio WAV] [--input FILE [--fast]] [--int8] [--compile] [--list-devices]

What it shows: on a terminal, the partial hypothesis of the current segment on one line that is
rewritten in place (``\\r``), and each final segment on its own line once an endpoint (a pause)
closes it. When stdout is not a terminal (a pipe, a file) only the final lines are written, so
the output is clean text. ``--output FILE`` receives each final as it arrives (flushed at once, so
a crash loses nothing already final): plain text lines (``txt``) or one JSON object per segment
with words and times (``jsonl``). Ctrl-C (or SIGTERM) stops recording, transcribes what was still
queued, finalises the last segment, saves, and exits 0.

Failures end with one line on stderr and a non-zero exit: no input device or an unknown
``--device`` (see ``--list-devices``), no PortAudio/sounddevice, an unreadable model or input file.
A device lost mid-stream ends the same way, after saving everything transcribed so far. A device
that cannot record at ``--samplerate`` (default 16 kHz) is opened at its own default rate and the
audio is resampled. Input overflows (the machine fell behind) are counted and reported, and
recording goes on.

``--input FILE`` sends a file through the same path (in 0.1 s blocks, at real-time pace, or as
fast as possible with ``--fast``): for demos, and to test the pipeline without a microphone.
``--save-audio WAV`` writes the audio as received (device rate, float) for later inspection.
``--stats`` prints, at the end: compute time per 40 ms frame (median, p99), the real-time factor,
the delay between a word's end in the audio and its first appearance on screen, and overflow
counts.

``--compile`` records in 160 ms blocks instead of 100 ms and runs the model's step for them
compiled into one C++ function (the ``compiled`` backends of ``asr.infer.InferenceEncoder``,
compile_frames=(4,)): with ``--int8``, ~2.5x less compute per 40 ms than without ``--compile``
(tools/bench_stream.py). It needs a C++ compiler; the first start compiles for up to a minute or two
(inductor caches the result on disk, so later starts take seconds). Words appear up to 60 ms later.

One intra-op thread: per-frame operations are tiny, and 2 OpenMP threads on a busy 2-core machine
stall waiting for each other (slower than 1 thread).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, TextIO

import numpy as np

from asr.stop import StopSignals

BLOCK_SECONDS = 0.1
#: --compile: 4 encoder frames per block, the call the compiled step serves (Emformer's segment too)
COMPILED_BLOCK_SECONDS = 0.16
#: encoder frames per call that --compile compiles a step for (160 ms blocks bring 4 once the
#: frontend is primed; the first block, and odd block sizes after resampling, take the packed path)
COMPILED_FRAMES = (4,)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="asr-live",
        description="Live speech recognition from a microphone (or a file played in real time).",
    )
    p.add_argument("--model", metavar="PATH", help="checkpoint file or training folder (default: the bundled model)")
    p.add_argument("--device", metavar="N|NAME", help="input device index or part of its name (default: system default)")
    p.add_argument("--list-devices", action="store_true", help="list input devices and exit")
    p.add_argument("--samplerate", type=int, metavar="R",
                   help="record at R Hz (default 16000; a device that cannot is recorded at its default rate and resampled)")
    p.add_argument("--output", metavar="FILE", help="write final segments here as they arrive")
    p.add_argument("--format", choices=("txt", "jsonl"), default=None,
                   help="output file format (default: from FILE's extension, else txt)")
    p.add_argument("--stats", action="store_true", help="print timing statistics at the end")
    p.add_argument("--input", metavar="FILE", help="read this audio file instead of the microphone")
    p.add_argument("--fast", action="store_true", help="with --input: do not wait, process as fast as possible")
    p.add_argument("--save-audio", metavar="WAV", help="also save the received audio to this WAV file")
    p.add_argument("--beam-size", type=int, default=1, help="1: greedy decoding (default); >1: CTC prefix beam search")
    p.add_argument("--lm", default=None, metavar="ARPA",
                   help="word n-gram LM (tools/build_lm.py): each final segment decoded over its words; partials stay greedy "
                        "(default: the LM the model carries, as the bundled one does, unless --beam-size)")
    p.add_argument("--no-lm", action="store_true", help="no language model: final segments decoded greedily")
    p.add_argument("--int8", action="store_true",
                   help="int8 block weights (CPU): 1.1-1.8x faster steps, outputs within ~1%% of float32")
    p.add_argument("--compile", action="store_true",
                   help="160 ms blocks through a step compiled with torch.compile (needs a C++ compiler; "
                        "the first start takes up to a minute or two): with --int8 ~2.5x less CPU per 40 ms")
    return p


class Display:
    """The partial line (terminals only) and the final lines on stdout."""

    def __init__(self, out: TextIO) -> None:
        self.out = out
        self.tty = out.isatty()
        self.partial = ""

    def _width(self) -> int:
        return max(20, shutil.get_terminal_size((80, 24)).columns - 1)

    def show_partial(self, text: str) -> None:
        if not self.tty or text == self.partial:
            return
        self.partial = text
        shown = text if len(text) <= self._width() else "…" + text[-(self._width() - 1):]
        self.out.write("\r\033[K" + shown)
        self.out.flush()

    def show_final(self, text: str) -> None:
        if self.tty:
            self.out.write("\r\033[K")
        self.out.write(text + "\n")
        self.out.flush()
        if self.tty:
            self.partial = ""

    def close(self) -> None:
        if self.tty and self.partial:
            self.out.write("\r\033[K")
            self.out.flush()


class Writer:
    """Final segments to the --output file, one line each, flushed as they arrive."""

    def __init__(self, path: Optional[str], fmt: Optional[str]) -> None:
        self.fmt = fmt or ("jsonl" if path and path.endswith((".jsonl", ".json")) else "txt")
        self.file: Optional[TextIO] = None
        if path:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            self.file = open(path, "w", encoding="utf-8")

    def write(self, segment: Any) -> None:
        if self.file is None:
            return
        line = json.dumps(segment.to_dict(), ensure_ascii=False) if self.fmt == "jsonl" else segment.text
        self.file.write(line + "\n")
        self.file.flush()
        os.fsync(self.file.fileno())

    def close(self) -> None:
        if self.file is not None:
            self.file.close()


class Stats:
    """Compute time per frame, real-time factor, and word delay (end of word -> shown)."""

    def __init__(self) -> None:
        self.per_frame: list[float] = []  # seconds per encoder frame, one value per call with frames
        self.compute = 0.0
        self.delays: list[float] = []
        self._seen = 0  # words of the current segment already shown

    def record_call(self, seconds: float, frames: int) -> None:
        self.compute += seconds
        if frames:
            self.per_frame.append(seconds / frames)

    def record_words(self, partial: Any, now: float, arrival: Optional[float], duration: float) -> None:
        """New words in this partial/its finals; the audio at time t arrived at
        ``arrival - (duration - t)`` (blocks come in real time, the last one at ``arrival``)."""
        if arrival is None:
            return
        for seg in partial.segments:
            for w in seg.words[self._seen:]:
                self.delays.append(now - (arrival - (duration - w.end)))
            self._seen = 0
        for w in partial.words[self._seen:]:
            self.delays.append(now - (arrival - (duration - w.end)))
        self._seen = len(partial.words)

    def report(self, audio_seconds: float, mic: Any, state_bytes: int, paced: bool) -> str:
        lines = [f"audio {audio_seconds:.2f} s, compute {self.compute:.3f} s, real-time factor "
                 f"{self.compute / audio_seconds:.4f}" if audio_seconds else "no audio"]
        if self.per_frame:
            ms = sorted(1000 * v for v in self.per_frame)
            p99 = ms[min(len(ms) - 1, int(0.99 * len(ms)))]
            lines.append(f"compute per 40 ms frame: median {statistics.median(ms):.2f} ms, p99 {p99:.2f} ms "
                         f"({len(ms)} calls)")
        if not paced:
            lines.append("word delay: not measured (--fast)")
        elif self.delays:
            d = sorted(self.delays)
            lines.append(f"word delay (word end -> shown): median {statistics.median(d):.2f} s, "
                         f"p90 {d[min(len(d) - 1, int(0.9 * len(d)))]:.2f} s, max {d[-1]:.2f} s ({len(d)} words)")
        if mic is not None:
            s = mic.stats
            lines.append(f"input: {s.blocks} blocks, {s.overflows} overflows, {s.dropped_samples} samples dropped")
        lines.append(f"recognizer state: {state_bytes} bytes")
        return "\n".join("stats: " + line for line in lines)


def _file_blocks(path: str, block_seconds: float = BLOCK_SECONDS) -> Iterator[np.ndarray]:
    from asr.audio import iter_audio_blocks

    for block in iter_audio_blocks(path, block_seconds=block_seconds):
        yield block.numpy()


def _load_model(args: argparse.Namespace) -> Any:
    """``asr.load_model`` as the flags ask (an :class:`asr.api.ASRModel`); a language model that
    cannot be loaded is reported as a warning on stderr (decoding goes on without it)."""
    import warnings

    from asr.api import load_model
    from asr.stream.process import tune_for_streaming

    # the model's own LM unless --no-lm; --beam-size makes stream() leave that default LM out
    lm = args.lm if args.lm is not None else (None if args.no_lm else "auto")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = load_model(args.model, int8=args.int8, compile=args.compile, compile_frames=COMPILED_FRAMES, lm=lm)
    for warning in caught:
        print(f"asr-live: warning: {warning.message}", file=sys.stderr)
    # No garbage-collection stalls mid-stream (asr.stream.process); one stream's states are small,
    # so malloc keeps its defaults.
    tune_for_streaming(keep_freed_memory=False)
    return model


def _error(msg: str) -> int:
    print(f"asr-live: error: {msg}", file=sys.stderr)
    return 1


def _check_args(args: argparse.Namespace) -> None:
    """Exit with argparse's usage error (status 2) for options that contradict each other."""
    if args.fast and not args.input:
        build_parser().error("--fast needs --input FILE")
    if args.beam_size < 1:
        build_parser().error("--beam-size must be >= 1")
    if args.lm is not None and args.beam_size > 1:
        build_parser().error("--lm runs its own beam search: leave out --beam-size with it")
    if args.lm is not None and args.no_lm:
        build_parser().error("--lm and --no-lm contradict each other")


def _listen(mic: Any, feed: Callable, stop: StopSignals) -> int:
    """Feed the microphone's blocks until ``stop``; then the blocks recorded before the stop.
    Returns the exit status (1 when the device failed)."""
    from asr.stream.microphone import MicrophoneError

    status = 0
    try:
        mic.start()
        if mic.rate_note:
            print(f"asr-live: {mic.rate_note}", file=sys.stderr)
        first, reported = True, 0
        while not stop.requested:
            got = mic.read(timeout=0.5)
            if got is None:
                continue
            if first:
                print(f"asr-live: listening on {mic.device_name!r} at {mic.samplerate} Hz "
                      "(Ctrl-C to stop)", file=sys.stderr, flush=True)
                first = False
            feed(got[0], got[1])
            if mic.stats.overflows > reported:
                reported = mic.stats.overflows
                print(f"\nasr-live: warning: input overflow ({reported} so far, "
                      f"{mic.stats.dropped_samples} samples dropped); continuing",
                      file=sys.stderr, flush=True)
    except MicrophoneError as err:
        print(f"\nasr-live: error: {err}", file=sys.stderr)
        status = 1
    finally:
        mic.close()
        for block in mic.drain():  # recorded before the stop: transcribe it too
            feed(block, None)
    return status


def _play(args: argparse.Namespace, rec: Any, feed: Callable, stop: StopSignals, block_seconds: float,
          rate: int) -> None:
    """Feed the input file's blocks, each when its last sample would have been recorded (at once
    with ``--fast``), until the file ends or ``stop``."""
    print(f"asr-live: playing {args.input}" + (" (fast)" if args.fast else " in real time"),
          file=sys.stderr, flush=True)
    start = time.monotonic()
    for block in _file_blocks(args.input, block_seconds):
        if stop.requested:
            break
        if not args.fast:
            due = start + (rec.duration + len(block) / rate)
            while not stop.requested and time.monotonic() < due:
                time.sleep(min(0.02, max(0.0, due - time.monotonic())))
        feed(block, None if args.fast else time.monotonic())


def _load_or_error(args: argparse.Namespace) -> tuple[Any, Optional[str]]:
    """(the model, None), or (None, the one-line error)."""
    from asr.model_file import CheckpointError

    try:
        if args.compile:
            print("asr-live: compiling the model step (up to a minute or two the first time)", file=sys.stderr, flush=True)
        return _load_model(args), None
    except (CheckpointError, OSError, ValueError) as err:  # the model or the LM file: one line
        return None, " ".join(str(err).split())
    except Exception as err:  # no C++ compiler, a model the compiled step does not take...
        what = "--compile" if args.compile else "--int8" if args.int8 else "loading the model"
        return None, f"{what} failed: {' '.join(str(err).split())[:200]}"


def _open_audio_out(path: Optional[str], rate: int) -> tuple[Any, Optional[str]]:
    """(a float WAV writer at ``path``, or None without one; None, or the one-line error)."""
    if not path:
        return None, None
    import soundfile as sf

    try:
        return sf.SoundFile(path, "w", samplerate=rate, channels=1, subtype="FLOAT", format="WAV"), None
    except Exception as err:
        return None, f"cannot write {path}: {' '.join(str(err).split())}"


def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    _check_args(args)
    from asr.stream.microphone import Microphone, MicrophoneError, list_input_devices

    if args.list_devices:
        try:
            print(list_input_devices())
        except MicrophoneError as err:
            return _error(str(err))
        return 0

    import torch

    torch.set_num_threads(1)
    from asr.audio import AudioError

    block_seconds = COMPILED_BLOCK_SECONDS if args.compile else BLOCK_SECONDS
    mic: Optional[Microphone] = None
    if not args.input:
        try:  # resolve the device before the (slower) model load, so a bad device fails fast
            mic = Microphone(args.device, samplerate=args.samplerate, block_seconds=block_seconds)
        except MicrophoneError as err:
            return _error(str(err))
    elif not Path(args.input).is_file():
        return _error(f"{args.input}: file not found")
    model, err = _load_or_error(args)
    if model is None:
        return _error(err)
    rec = model.stream(beam_size=args.beam_size, keep_segments=False)
    try:
        writer = Writer(args.output, args.format)
    except OSError as err:
        return _error(f"cannot write {args.output}: {err.strerror or err}")
    display = Display(sys.stdout)
    stats = Stats()
    rate = mic.samplerate if mic is not None else 16000
    audio_out, err = _open_audio_out(args.save_audio, rate)
    if err:
        return _error(err)

    def feed(block: np.ndarray, arrival: Optional[float]) -> None:
        if audio_out is not None:
            audio_out.write(block)
        t0 = time.perf_counter()
        frames0 = rec.num_frames
        partial = rec.accept_waveform(block, rate)
        stats.record_call(time.perf_counter() - t0, rec.num_frames - frames0)
        for seg in partial.segments:
            display.show_final(seg.text)
            writer.write(seg)
        stats.record_words(partial, time.monotonic(), arrival, rec.duration)
        display.show_partial(partial.text)

    status = 0
    try:
        # a block is never cut in half inside the model; a second Ctrl-C interrupts at once
        with StopSignals(abort_on=(signal.SIGINT,)) as stop:
            if mic is not None:
                status = _listen(mic, feed, stop)
            else:
                _play(args, rec, feed, stop, block_seconds, rate)
    except AudioError as err:
        print(f"\nasr-live: error: {err}", file=sys.stderr)
        status = 1
    finally:
        transcript = rec.finalize()
        for seg in transcript.segments:
            display.show_final(seg.text)
            writer.write(seg)
        display.close()
        writer.close()
        if audio_out is not None:
            audio_out.close()
    if args.stats:
        print(stats.report(rec.duration, mic, rec.state_size_bytes(), not args.fast), file=sys.stderr)
    return status


if __name__ == "__main__":
    raise SystemExit(main())
