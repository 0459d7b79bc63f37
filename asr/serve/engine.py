"""The batcher: one model, many streams, all stepped together through ``step_batch`` on a tick.

Connections hand their audio to a :class:`Stream` (:meth:`Stream.feed`, :meth:`Stream.finish`);
the tick task (:meth:`Engine.run`) wakes at most every ``tick_seconds``, takes every stream's
queued audio, and steps all of them as one batch (:func:`asr.stream.step_batch`) on a single
worker thread, so the event loop keeps serving sockets while the model runs. Streams that sent
eof (or reached ``max_stream_seconds``) are finalised in the same call. Each stream then gets one
:class:`StepResult` in its ``results`` queue, saying how many audio messages it answers.

If a step takes longer than the tick, the next one starts at once with the audio that arrived in
the meantime (in model calls of at most ``MAX_CALL_FRAMES`` frames each). A server that cannot
keep up falls behind: its latency grows; finals stay exact.

Only one thread ever runs the model for streams; ``POST /transcribe`` uses its own worker
(:meth:`Engine.transcribe`). Metrics (:meth:`Engine.metrics`): active streams, real-time factor
and tick latency over the last ``METRIC_WINDOW`` ticks, and running totals.
"""
from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np

from asr.audio import StreamingResampler
from asr.serve.protocol import CLOSE_TRY_LATER, CLOSE_UNSUPPORTED, ProtocolError, StreamConfig
from asr.stream import EndpointConfig, EndpointRule, step_batch
from asr.transcript import Segment, Transcript, Word

log = logging.getLogger("asr.serve")

#: Ticks the latency and real-time-factor metrics are computed over.
METRIC_WINDOW = 200
#: Encoder frames (40 ms each) per batched model call: a tick that took more audio (a slow tick, a
#: client sending large messages) makes several calls, each served by the engine's compiled wkv
#: kernels of batches (1-4 tokens), rather than one call of the chunked form, which pads to 16
#: frames (asr.stream.step_batch).
MAX_CALL_FRAMES = 4
#: Beam width used when a stream asks for hotwords without a beam (boosting re-ranks beams).
HOTWORD_BEAM = 8


@dataclass
class Limits:
    """Server-wide limits (``asr-serve`` options of the same names)."""

    max_streams: int = 200
    max_stream_seconds: float = 3600.0
    tick_seconds: float = 0.1


@dataclass
class StepResult:
    """What one tick produced for one stream.

    ``messages``: audio messages it answers (Vosk sends one reply per message). ``segments``:
    closed since the last result, oldest first. ``text``/``words``: the current open segment.
    ``final``: the stream has ended (``reason`` "eof" or "max_stream_seconds"), and ``end_segments``
    are those the end closed. ``error``: the step failed for this stream (one line).
    """

    messages: int
    segments: list[Segment] = field(default_factory=list)
    text: str = ""
    words: list[Word] = field(default_factory=list)
    final: bool = False
    end_segments: list[Segment] = field(default_factory=list)
    reason: str = ""
    duration: float = 0.0
    error: Optional[str] = None


class Stream:
    """One client's stream: audio queued by the connection, results queued by the tick."""

    def __init__(self, engine: "Engine", sid: int, recognizer: Any, config: StreamConfig) -> None:
        self.engine = engine
        self.id = sid
        self.recognizer = recognizer
        self.config = config
        self.results: asyncio.Queue[StepResult] = asyncio.Queue()
        self._blocks: list[bytes] = []
        self._messages = 0
        self._eof = ""  # why the stream ends ("eof", "max_stream_seconds"), or "" while it runs
        self._samples = 0  # samples received, at the client's rate
        self._max_samples = int(engine.limits.max_stream_seconds * config.sample_rate)
        self.closed = False

    @property
    def ending(self) -> bool:
        """eof received or the length limit reached: no more audio is taken."""
        return bool(self._eof)

    def feed(self, pcm: bytes) -> None:
        """Queue one audio message (16-bit little-endian PCM, even length). Audio past
        ``max_stream_seconds`` is dropped and ends the stream as eof would."""
        if self._eof:
            return
        room = 2 * (self._max_samples - self._samples)
        if len(pcm) >= room:
            pcm = pcm[:room]
            self._eof = "max_stream_seconds"
        self._samples += len(pcm) // 2
        self._blocks.append(pcm)
        self._messages += 1
        self.engine.wake()

    def finish(self) -> None:
        """eof: the next tick steps what is queued, finalises, and reports ``final``."""
        if not self._eof:
            self._eof = "eof"
        self.engine.wake()

    def take(self) -> Optional[tuple[np.ndarray, int, str]]:
        """(queued samples as int16, messages they answer, end reason) and clear the queue;
        None if there is nothing to do."""
        if not self._blocks and not self._eof:
            return None
        pcm = np.frombuffer(bytearray().join(self._blocks), dtype="<i2")  # writable: torch wants it
        n, self._blocks, self._messages = self._messages, [], 0
        return pcm, n, self._eof


@dataclass
class _Work:
    stream: Stream
    pcm: np.ndarray
    messages: int
    end: str


def endpoint_config(options: dict[str, Any]) -> EndpointConfig:
    """EndpointConfig from the rich protocol's ``endpoint`` options (defaults: sherpa-onnx's)."""
    base = EndpointConfig()
    try:
        return EndpointConfig(
            enabled=bool(options.get("enabled", True)),
            rule1=EndpointRule(False, options.get("rule1_min_trailing_silence", base.rule1.min_trailing_silence), 0.0),
            rule2=EndpointRule(True, options.get("rule2_min_trailing_silence", base.rule2.min_trailing_silence), 0.0),
            rule3=EndpointRule(False, 0.0, options.get("rule3_min_segment_length", base.rule3.min_segment_length)),
            energy_threshold_db=options.get("energy_threshold_db"),
        )
    except ValueError as err:
        raise ProtocolError(f"config endpoint: {err}", CLOSE_UNSUPPORTED) from None


class Engine:
    """The model and its streams. ``model``: an :class:`asr.api.ASRModel`. Create it, start
    :meth:`run` as a task on the serving loop, and :meth:`open` a stream per connection."""

    def __init__(self, model: Any, limits: Optional[Limits] = None, worker: int = 0) -> None:
        self.model = model
        self.limits = limits or Limits()
        self.worker = worker  # this process's index among asr-serve's workers (asr.serve.workers)
        self.streams: dict[int, Stream] = {}
        self._ids = itertools.count(1)
        self._wake: Optional[asyncio.Event] = None
        self._step_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="asr-step")
        self._file_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="asr-file")
        self._ticks: deque[tuple[float, float, float, int]] = deque(maxlen=METRIC_WINDOW)
        self.totals = {"streams": 0, "refused": 0, "errors": 0, "ticks": 0, "audio_seconds": 0.0,
                       "compute_seconds": 0.0, "files": 0}
        self.started = time.time()

    # ------------------------------------------------------------------ streams
    def open(self, config: StreamConfig) -> Stream:
        """A new stream; ProtocolError 1013 when ``max_streams`` are open, 1003 for options the
        model cannot honour (a rate the resampler refuses, a beam with the caller's LM, ...)."""
        if len(self.streams) >= self.limits.max_streams:
            self.totals["refused"] += 1
            raise ProtocolError(f"server full: {self.limits.max_streams} streams open (max_streams); try again later",
                                CLOSE_TRY_LATER)
        try:
            StreamingResampler(config.sample_rate)  # refuses rates it cannot resample exactly
        except ValueError as err:
            raise ProtocolError(f"config sample_rate: {err}", CLOSE_UNSUPPORTED) from None
        beam = config.beam_size if not config.hotwords or config.beam_size > 1 else HOTWORD_BEAM
        kwargs: dict[str, Any] = {"endpoint": endpoint_config(config.endpoint), "keep_segments": False,
                                  "beam_size": beam, "hotwords": config.hotwords or None}
        if not config.lm:
            kwargs["lexicon"] = None
        try:
            recognizer = self.model.stream(**kwargs)
        except ValueError as err:
            raise ProtocolError(f"config: {' '.join(str(err).split())}", CLOSE_UNSUPPORTED) from None
        stream = Stream(self, next(self._ids), recognizer, config)
        self.streams[stream.id] = stream
        self.totals["streams"] += 1
        return stream

    def close(self, stream: Stream) -> None:
        """Forget a stream (its connection ended); a step in flight for it is discarded."""
        stream.closed = True
        self.streams.pop(stream.id, None)

    def wake(self) -> None:
        if self._wake is not None:
            self._wake.set()

    # ------------------------------------------------------------------ the tick
    async def run(self) -> None:
        """The tick loop (run it as a task; cancel it to stop)."""
        loop = asyncio.get_running_loop()
        self._wake = asyncio.Event()
        next_tick = loop.time()
        while True:
            await self._wake.wait()
            delay = next_tick - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            self._wake.clear()
            next_tick = loop.time() + self.limits.tick_seconds
            work = [_Work(s, *got) for s in list(self.streams.values()) if (got := s.take()) is not None]
            if not work:
                continue
            t0 = time.perf_counter()
            try:
                results = await loop.run_in_executor(self._step_pool, self._compute, work)
            except Exception as err:  # a bug outside the per-stream guards: fail these streams, keep ticking
                log.exception("tick failed")
                results = [StepResult(messages=w.messages, error=f"tick failed: {type(err).__name__}") for w in work]
            self._record(work, time.perf_counter() - t0)
            for w, res in zip(work, results):
                if not w.stream.closed:
                    w.stream.results.put_nowait(res)

    def _record(self, work: list[_Work], seconds: float) -> None:
        audio = sum(w.pcm.size / w.stream.config.sample_rate for w in work)
        self._ticks.append((time.time(), seconds, audio, len(work)))
        self.totals["ticks"] += 1
        self.totals["audio_seconds"] += audio
        self.totals["compute_seconds"] += seconds

    def _compute(self, work: list[_Work]) -> list[StepResult]:
        """Runs on the step thread: step every stream with audio as one batch, finalise the ended."""
        results = [StepResult(messages=w.messages) for w in work]
        stepping = [i for i, w in enumerate(work) if w.pcm.size]
        partials: dict[int, Any] = {}
        if stepping:
            try:
                got = step_batch([work[i].stream.recognizer for i in stepping], [work[i].pcm for i in stepping],
                                 [work[i].stream.config.sample_rate for i in stepping], max_call_frames=MAX_CALL_FRAMES)
                partials = dict(zip(stepping, got))
            except Exception:  # one stream's failure must not take the others down: step them alone
                log.exception("batched step failed; stepping %d streams one by one", len(stepping))
                for i in stepping:
                    try:
                        partials[i] = work[i].stream.recognizer.accept_waveform(work[i].pcm,
                                                                                work[i].stream.config.sample_rate)
                    except Exception as err:
                        results[i].error = f"step failed: {' '.join(str(err).split())[:200]}"
        for i, (w, res) in enumerate(zip(work, results)):
            if res.error is not None:
                continue
            p = partials.get(i)
            if p is not None:
                res.segments, res.text, res.words = list(p.segments), p.text, list(p.words)
            if w.end:
                res.final, res.reason = True, w.end
                try:
                    end: Transcript = w.stream.recognizer.finalize()
                except Exception as err:
                    res.error = f"finalize failed: {' '.join(str(err).split())[:200]}"
                    continue
                res.end_segments = list(end.segments)
            res.duration = w.stream.recognizer.duration
        return results

    # ------------------------------------------------------------------ files and metrics
    async def transcribe(self, audio: bytes, source: Optional[str]) -> Transcript:
        """A whole file (any format asr.audio reads) on the file worker; AudioError for bad audio."""
        loop = asyncio.get_running_loop()
        result = await loop.run_in_executor(self._file_pool, self.model.transcribe, audio)
        result.source = source
        self.totals["files"] += 1
        return result

    def metrics(self) -> dict[str, Any]:
        """This worker's index, active streams, and over the last METRIC_WINDOW ticks: real-time factor (compute /
        audio), tick compute latency p50/p95/max (seconds), streams per tick; plus totals."""
        ticks = list(self._ticks)
        lat = sorted(t[1] for t in ticks)
        audio = sum(t[2] for t in ticks)

        def q(p: float) -> float:
            return lat[min(len(lat) - 1, int(p * len(lat)))] if lat else 0.0

        return {
            "worker": self.worker,
            "active_streams": len(self.streams),
            "max_streams": self.limits.max_streams,
            "real_time_factor": sum(lat) / audio if audio else 0.0,
            "tick_seconds_p50": q(0.5),
            "tick_seconds_p95": q(0.95),
            "tick_seconds_max": lat[-1] if lat else 0.0,
            "streams_per_tick": sum(t[3] for t in ticks) / len(ticks) if ticks else 0.0,
            **{f"{k}_total": v for k, v in self.totals.items()},
            "uptime_seconds": time.time() - self.started,
        }

    def shutdown(self) -> None:
        self._step_pool.shutdown(wait=False, cancel_futures=True)
        self._file_pool.shutdown(wait=False, cancel_futures=True)
