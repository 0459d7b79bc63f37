"""The streaming recognizer: audio in as it arrives, partial text and final segments out.

Per call of :meth:`Recognizer.accept_waveform`::

    samples (any rate, any block size, int16 or float)
      -> StreamingResampler (to 16 kHz; exact w.r.t. resampling the whole signal)
      -> StreamingFbank      (the frames whose 400 samples have arrived)
      -> encoder.step        (subsampling caches + RWKV-7 state carried: one 40 ms frame per 4 feature frames)
      -> CTC decoding        (incremental greedy, or prefix beam search), per frame
      -> endpointing         (asr.stream.endpoint; a segment ends after a pause)
      -> Partial             (text of the current segment, segments finalised in this call)

Exactness: every stage is exact under any cutting of the input (the frontend, model and decoder
parity tests), the model is causal and the greedy decoder carries its last frame across
endpoints, so with greedy decoding the words of all segments, with their times, equal offline
transcription of the whole recording (model forward + ``ctc_greedy`` + ``words_from_tokens``)
for any block sizes, including 0- and 1-sample blocks (``tests/test_stream.py``). The only
difference is float rounding in the model (logits agree to ~1e-6), which could only flip an
arg-max between two near-tied classes.

Endpoints keep the recurrent state (resetting it would lose the context in which the next word
starts, and the first frames after a reset are exactly where a causal model is least sure). The
state is constant in size, and per segment the decoder keeps only the current segment's tokens,
bounded by endpoint rule 3 (20 s): a stream can run for hours with flat memory. Final segments
are kept in :attr:`Recognizer.segments` for :meth:`finalize`; a long-running consumer should take
them as they come (``Partial.segments``) and pass ``keep_segments=False`` (or call
:meth:`Recognizer.pop_segments`), so the transcript itself does not accumulate.

Timestamps are in seconds from the start of the stream (not of the segment), as the file API
reports them: a word starts at its first piece's CTC spike and ends one frame after its last
piece's spike, clamped to the audio received; confidence is the geometric mean of the pieces'
posteriors at their spikes.

Several streams can be stepped as one batch (:func:`step_batch`), sharing each weight read.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Mapping, Optional, Sequence, Union

import numpy as np
import torch
from torch import Tensor

from asr.audio import AudioError, StreamingResampler, float_mono
from asr.decode.align import Word, words_from_tokens
from asr.decode.incremental import hypothesis_decoder
from asr.features import NUM_MEL_BINS, StreamingFbank, accept_waveforms
from asr.frames import BLANK_ID, FEATURES_PER_FRAME, FRAME_SECONDS, SAMPLE_RATE
from asr.model import CTCModel, EncoderState

if TYPE_CHECKING:
    from asr.infer import InferenceEncoder
from asr.stream.endpoint import EndpointConfig, Endpointer, StreamingEnergy
from asr.stream.state import is_stackable, put_rows, split_state, stack_states, take_rows
from asr.transcript import Segment, Transcript

__all__ = ["Partial", "Recognizer", "check_block", "step_batch"]

Samples = Union[np.ndarray, Tensor, Sequence[float]]


@dataclass
class Partial:
    """What one ``accept_waveform`` call reports.

    ``text``/``words``: the current (unfinished) segment so far; it may still change (beam search
    can revise it, greedy only appends). ``segments``: segments finalised during this call, oldest
    first; each is final and will not be reported again. ``duration``: seconds of audio accepted.
    """

    text: str
    segments: list[Segment] = field(default_factory=list)
    words: list[Word] = field(default_factory=list)
    duration: float = 0.0

    @property
    def is_endpoint(self) -> bool:
        return bool(self.segments)


def check_block(samples: Samples) -> Tensor:
    """Mono float32 1-D tensor from float/int16/int32 samples ([n] or [n, channels]); raises
    :class:`asr.audio.AudioError` for NaN/Inf samples or a bad shape."""
    wave = float_mono(samples, name="stream")
    if wave.numel() and not bool(torch.isfinite(wave).all()):
        # NaN would poison the recurrent state for the rest of the stream: refuse the block whole.
        raise AudioError(f"stream: block contains {int((~torch.isfinite(wave)).sum())} non-finite samples")
    return wave


class Recognizer:
    """One audio stream: ``accept_waveform`` as audio arrives, ``finalize`` at the end.

    Args:
        model, tokenizer: the encoder that runs the model (an :class:`asr.infer.InferenceEncoder`,
            as :meth:`asr.api.ASRModel.stream` passes; a plain :class:`CTCModel` runs as the
            reference) and the tokenizer, e.g. from :func:`asr.model_file.load_for_inference`.
            The encoder is shared (not copied), so many recognizers can serve one model.
        endpoint: endpoint rules; ``None`` uses the defaults (:class:`EndpointConfig`);
            ``EndpointConfig.disabled()`` makes the stream one segment.
        beam_size: 1 = greedy (exact offline parity); > 1 = CTC prefix beam search per segment
            (the search restarts at each endpoint, i.e. after >= 1.2 s of blank).
        hotwords: ``{word: bonus}`` for beam search (see :mod:`asr.decode.beam`).
        device: where the state lives and the model runs (the model must be there already).
        keep_segments: keep final segments for :meth:`finalize` (default); ``False`` only hands
            them out through ``Partial.segments``, so hours of transcript do not accumulate.
        lexicon: an :class:`asr.decode.lexicon.LexiconDecoder`: each segment's final words come
            from its lexicon and LM search (with ``beam_size`` 1 and no ``hotwords``), partials stay greedy.
    """

    def __init__(
        self,
        model: Union[CTCModel, "InferenceEncoder"],
        tokenizer: Any,
        *,
        endpoint: Optional[EndpointConfig] = None,
        beam_size: int = 1,
        hotwords: Optional[Mapping[str, float]] = None,
        device: Union[str, torch.device] = "cpu",
        keep_segments: bool = True,
        lexicon: Any = None,
    ) -> None:
        if beam_size < 1:
            raise ValueError(f"beam_size must be >= 1, got {beam_size}")
        self.model = model
        self.tokenizer = tokenizer
        self.endpoint_config = endpoint if endpoint is not None else EndpointConfig()
        self.beam_size = beam_size
        self.hotwords = dict(hotwords) if hotwords else None
        self.device = torch.device(device)
        self.keep_segments = keep_segments
        self.lexicon = lexicon
        self.blank = BLANK_ID
        self.reset()

    # ------------------------------------------------------------------ lifecycle
    def reset(self) -> None:
        """Forget everything: the next sample starts a new stream (new state, times from 0)."""
        self._fbank = StreamingFbank()
        self._energy = StreamingEnergy() if self.endpoint_config.energy_threshold_db is not None else None
        self._energies: list[float] = []  # levels of feature frames not yet judged, from index _energy_base
        self._energy_base = 0
        self._resampler: Optional[StreamingResampler] = None
        self._rate: Optional[int] = None
        self._state: EncoderState = self.model.init_state(1, device=self.device)
        self._held = torch.zeros(0, NUM_MEL_BINS)  # feature frames not yet given to the model (batch mode)
        self._endpointer = Endpointer(self.endpoint_config, FRAME_SECONDS)
        self._num_samples = 0  # 16 kHz samples accepted
        self._num_frames = 0  # encoder frames decoded
        self._segments: list[Segment] = []
        self._finished = False
        self._last_new: list[Segment] = []  # segments finalize() produced (keep_segments=False)
        # current segment: the same incremental decoder as file transcription
        self._decoder = hypothesis_decoder(self.beam_size, self.hotwords, self.tokenizer, self.blank, self.lexicon)
        self._words_cache: tuple[int, list[Word]] = (-1, [])

    @property
    def duration(self) -> float:
        """Seconds of (16 kHz) audio accepted so far."""
        return self._num_samples / SAMPLE_RATE

    @property
    def num_frames(self) -> int:
        """40 ms encoder frames decoded so far."""
        return self._num_frames

    @property
    def segments(self) -> list[Segment]:
        """Final segments kept so far (see ``keep_segments``)."""
        return list(self._segments)

    def pop_segments(self) -> list[Segment]:
        """Return the kept final segments and forget them (for long-running streams)."""
        out, self._segments = self._segments, []
        return out

    @property
    def state(self) -> EncoderState:
        """The encoder state; a batched step (:func:`step_batch`) sets the stream's part of its result."""
        return self._state

    @state.setter
    def state(self, state: EncoderState) -> None:
        self._state = state

    def state_size_bytes(self) -> int:
        """Bytes of recurrent state: model state + frontend buffers (constant in stream length)."""
        n = self._state.size_bytes()
        n += 4 * (self._fbank.buffered_samples + int(self._held.numel()))
        if self._resampler is not None:
            n += 4 * self._resampler.buffered_samples
        return n

    # ------------------------------------------------------------------ audio in
    @torch.inference_mode()
    def accept_waveform(self, samples: Samples, sample_rate: int = SAMPLE_RATE) -> Partial:
        """Feed a block of audio (float in [-1, 1], or int16/int32 PCM; mono ``[n]`` or
        ``[n, channels]``; any ``n`` >= 0) at ``sample_rate``; return the partial result.

        Raises :class:`asr.audio.AudioError` for NaN/Inf samples or an unusable rate (the block is
        then ignored and the stream stays usable)."""
        feats = self._ingest(samples, sample_rate)
        if self._held.shape[0]:
            feats = torch.cat([self._held, feats])
            self._held = self._held[:0]
        return self.accept_features(feats)

    @torch.inference_mode()
    def finalize(self) -> Transcript:
        """End of stream: flush the resampler, finalise the last segment, return the transcript.

        The transcript holds the kept segments (all of them by default; with
        ``keep_segments=False`` only those finalised by this call). Audio after the last whole
        10 ms feature frame is dropped, as offline feature extraction drops it. Calling it again
        returns the same; :meth:`reset` starts a new stream.
        """
        new: list[Segment] = []
        if not self._finished:
            feats = self._held
            self._held = self._held[:0]
            if self._resampler is not None:
                tail = self._resampler.flush()
                self._num_samples += tail.numel()
                feats = torch.cat([feats, self._features(tail)])
            new = self.accept_features(feats).segments
            seg = self._end_segment()
            if seg is not None:
                self._emit(seg, new)
            self._finished = True
            self._last_new = new
        segs = list(self._segments) if self.keep_segments else list(self._last_new)
        return Transcript(text=" ".join(s.text for s in segs), segments=segs, duration=self.duration)

    # ------------------------------------------------------------------ pipeline stages
    def _ingest(self, samples: Samples, sample_rate: int) -> Tensor:
        """Samples -> 16 kHz -> new feature frames [t, 80] (levels recorded for endpointing)."""
        return self._features(self._to_16k(check_block(samples), sample_rate))

    def _to_16k(self, wave: Tensor, sample_rate: int) -> Tensor:
        """A checked mono waveform (``_as_waveform``) at ``sample_rate`` -> the new 16 kHz samples."""
        if self._finished:
            raise RuntimeError("accept_waveform after finalize(); call reset() to start a new stream")
        rate = int(sample_rate)
        head = torch.zeros(0)
        if rate != self._rate:
            if self._resampler is not None:
                head = self._resampler.flush()  # the old rate's signal ends here, as at a file's end
            try:
                self._resampler = None if rate == SAMPLE_RATE else StreamingResampler(rate, SAMPLE_RATE)
            except ValueError as err:
                raise AudioError(f"stream: {err}") from err
            self._rate = rate
        if self._resampler is not None:
            wave = self._resampler.accept(wave)
        if head.numel():
            wave = torch.cat([head, wave])
        self._num_samples += wave.numel()
        return wave

    def _features(self, wave: Tensor) -> Tensor:
        self._record_levels(wave)
        return self._fbank.accept_waveform(wave)

    def _record_levels(self, wave: Tensor) -> None:
        if self._energy is not None:
            self._energies.extend(self._energy.accept_waveform(wave).tolist())

    @torch.inference_mode()
    def _run(self, feats: Tensor) -> Tensor:
        """Feature frames [t, 80] -> logits [t', V] of the encoder frames they complete."""
        if feats.shape[0] == 0:
            return torch.zeros(0, self.model.config.vocab_size)
        logits, self._state = self.model.step(feats.to(self.device)[None], self._state)
        return logits[0]

    def accept_logits(self, logits: Tensor, decoded: Optional[tuple[Tensor, list[int]]] = None) -> Partial:
        """Decode new encoder frames [t', V] of this stream (the model already stepped its state);
        cut segments where an endpoint fires. ``decoded``: their log-probs (on the CPU) and arg-max
        ids, when the caller computed them already (:func:`step_batch` does, for all streams at once)."""
        new: list[Segment] = []
        T = logits.shape[0]
        if T:
            lp, best = decoded if decoded is not None else _log_probs_and_best(logits)
            silent = [tok == self.blank for tok in best]
            if self._energy is not None:
                silent = self._gate_by_energy(silent)
            start = 0
            for t in range(T):
                if self._endpointer.update(bool(silent[t])):
                    self._decode(lp[start : t + 1], best[start : t + 1])
                    start = t + 1
                    seg = self._end_segment()
                    if seg is not None:
                        self._emit(seg, new)
            self._decode(lp[start:], best[start:])
        words = self._current_words()
        return Partial(text=" ".join(w.word for w in words), segments=new, words=words, duration=self.duration)

    def _gate_by_energy(self, silent: list[bool]) -> list[bool]:
        """A blank frame counts as silence only if quiet too. Encoder frame j has seen feature
        frames up to 4j; its level is the loudest of the 4 feature frames 4j-3..4j."""
        thr = self.endpoint_config.energy_threshold_db
        out = []
        for t, s in enumerate(silent):
            j = self._num_frames + t
            hi = FEATURES_PER_FRAME * j
            lo = max(0, hi - FEATURES_PER_FRAME + 1)
            lv = self._energies[lo - self._energy_base : hi - self._energy_base + 1]
            out.append(bool(s) and bool(lv) and max(lv) < thr)  # type: ignore[operator]
        last = FEATURES_PER_FRAME * (self._num_frames + len(silent) - 1)
        drop = max(0, last + 1 - self._energy_base)
        del self._energies[:drop]
        self._energy_base += drop
        return out

    def _decode(self, lp: Tensor, best: list[int]) -> None:
        """Feed log-probs [t, V] of the current segment (and their arg-max ids) to the decoder."""
        self._decoder.accept(lp, best)
        self._num_frames += lp.shape[0]

    def _words(self, tokens: Sequence[int], frames: Sequence[int], logprobs: Optional[Sequence[float]]) -> list[Word]:
        """Words of a hypothesis, built exactly as the file API builds them."""
        return words_from_tokens(tokens, frames, self.tokenizer, num_frames=self._num_frames,
                                 token_logprobs=logprobs, max_time=self.duration)

    def _current_words(self) -> list[Word]:
        """The partial words, recomputed only when the decoder's :meth:`partial_key` says the
        partial hypothesis may have changed (greedy partials only append)."""
        key = self._decoder.partial_key()
        if key is None:
            return self._words(*self._decoder.hypothesis(final=False))
        if self._words_cache[0] != key:
            self._words_cache = (key, self._words(*self._decoder.hypothesis(final=False)))
        return self._words_cache[1]

    def _end_segment(self) -> Optional[Segment]:
        """Close the current segment; return it (None if it has no words) and start a new one."""
        words = self._words(*self._decoder.hypothesis(final=True))
        self._decoder.start_segment()
        self._words_cache = (-1, [])
        if not words:
            return None
        return Segment(text=" ".join(w.word for w in words), start=words[0].start, end=words[-1].end, words=words)

    def _emit(self, seg: Segment, new: list[Segment]) -> None:
        new.append(seg)
        if self.keep_segments:
            self._segments.append(seg)

    # ------------------------------------------------------------------ batching (step_batch)
    @property
    def finished(self) -> bool:
        """True after :meth:`finalize` (until :meth:`reset`)."""
        return self._finished

    @property
    def feature_extractor(self) -> StreamingFbank:
        """The stream's feature extractor (:func:`asr.features.accept_waveforms` runs many at once)."""
        return self._fbank

    def accept_samples(self, wave: Tensor, sample_rate: int) -> Tensor:
        """A checked mono block (:func:`check_block`) at ``sample_rate`` -> its new 16 kHz samples,
        counted in :attr:`duration` and their levels kept for endpointing; the caller turns them
        into features with :attr:`feature_extractor`."""
        wave = self._to_16k(wave, sample_rate)
        self._record_levels(wave)
        return wave

    def accept_features(self, feats: Tensor) -> Partial:
        """Feature frames [t, 80] -> the model stepped alone on this stream, then decoded."""
        return self.accept_logits(self._run(feats))

    def frames_to_step(self, feats: Tensor) -> Tensor:
        """New feature frames -> the frames to step now, holding back the rest.

        The frames returned end on a multiple of 4 feature frames since the stream start (one
        encoder frame), so afterwards the state is stackable (asr.stream.state); the 0-3 frames
        held (<= 30 ms) would not complete an encoder frame anyway, except the very next one:
        that frame's output is delayed by one call.
        """
        if self._held.shape[0]:
            feats = torch.cat([self._held, feats])
        n = max(0, feats.shape[0] - (self._state.frames_in + feats.shape[0]) % FEATURES_PER_FRAME)
        self._held = feats[n:].clone()
        return feats[:n]


@torch.inference_mode()
def step_batch(
    recognizers: Sequence[Recognizer], blocks: Sequence[Samples], sample_rate: Union[int, Sequence[int]] = SAMPLE_RATE,
    max_call_frames: Optional[int] = None,
) -> list[Partial]:
    """``accept_waveform`` for several streams at once, running the model on them as one batch.

    All recognizers must share one model. Streams are stepped in multiples of one encoder frame
    (4 feature frames), so up to 30 ms of audio per stream waits for the next call (``finalize``
    flushes it). Streams that received more audio than others run their extra frames in a
    smaller batch (packed stepping); a stream that was stepped alone with odd frame counts before
    is stepped alone once to get back in phase. Results equal per-stream ``accept_waveform``
    calls up to float rounding in the model (batched matrix products may round differently).
    Each stream leaves as a row of one batched state, so that stacking the same streams in the
    same order on the next call is free (a server's steady state; otherwise each state is copied
    once); the features of all streams come from one fbank call. Bad samples in any block (NaN, wrong shape)
    raise :class:`asr.audio.AudioError` before any stream has taken its block.
    ``max_call_frames``: at most this many encoder frames per model call (longer feeds take
    several calls); a server passes 4, the most tokens the compiled batched wkv serves (longer
    calls run the chunked form, which pads every call to 16 frames). None: no limit.

    A server that calls this for many streams should call
    :func:`asr.stream.tune_for_streaming` once after loading the model (garbage-collection stalls
    of ~150-300 ms every few dozen calls, and ~4-8 ms per call of memory mapped and zeroed again
    at 100 streams, otherwise; :mod:`asr.stream.process`). ``asr-live`` and
    ``tools/bench_stream.py`` do.
    """
    if len(recognizers) != len(blocks):
        raise ValueError(f"{len(recognizers)} recognizers but {len(blocks)} blocks")
    if not recognizers:
        return []
    rates = [int(sample_rate)] * len(blocks) if isinstance(sample_rate, (int, np.integer)) else list(sample_rate)
    model = recognizers[0].model
    if any(r.model is not model for r in recognizers):
        raise ValueError("step_batch: all recognizers must share one model")
    if len({id(r) for r in recognizers}) != len(recognizers):
        raise ValueError("step_batch: a recognizer appears twice")
    stackable = [is_stackable(r.state) for r in recognizers]
    if any(r.finished for r in recognizers):
        raise RuntimeError("step_batch: a stream was finalized; call reset() to start a new stream")
    checked = [check_block(b) for b in blocks]  # a bad block raises before any stream has moved on
    waves = [r.accept_samples(w, rate) for r, w, rate in zip(recognizers, checked, rates)]
    new_feats = accept_waveforms([r.feature_extractor for r in recognizers], waves)  # one fbank call for all
    feats = [r.frames_to_step(f) for r, f in zip(recognizers, new_feats)]
    # per stackable stream: (logits, (log-probs, arg-max ids)) of each batched call it took part in
    logits: list[list[tuple[Tensor, Optional[tuple[Tensor, list[int]]]]]] = [[] for _ in recognizers]
    stepping = [i for i, ok in enumerate(stackable) if ok and feats[i].shape[0]]
    if stepping:
        limit = None if max_call_frames is None else FEATURES_PER_FRAME * max_call_frames
        _step_packed(model, [recognizers[i] for i in stepping], [feats[i] for i in stepping],
                     [logits[i] for i in stepping], limit)
    vocab = model.config.vocab_size
    results = []
    for i, (rec, lg) in enumerate(zip(recognizers, logits)):
        if not stackable[i]:  # stepped alone, with its own frame count
            results.append(rec.accept_features(feats[i]))
        elif len(lg) == 1:  # the usual case: one row of one batched call
            results.append(rec.accept_logits(*lg[0]))
        else:
            joined = torch.cat([part[0] for part in lg]) if lg else torch.zeros(0, vocab)
            results.append(rec.accept_logits(joined))
    return results


def _step_packed(model: Any, recognizers: Sequence[Recognizer], feats: Sequence[Tensor],
                 logits: Sequence[list[tuple[Tensor, Optional[tuple[Tensor, list[int]]]]]],
                 limit: Optional[int] = None) -> None:
    """Packed stepping of stackable streams with >= 1 frame each: one call for all of them, in
    the order given, for the frames every one has (at most ``limit`` feature frames per call);
    then the longer ones, and so on. The later
    calls take their rows out of the first call's state and put them back, so that every stream
    leaves as a row of one batched state: a server that steps the same streams in the same order
    next time stacks them for free (asr.stream.state). Appends each call's logits to ``logits``."""
    device = recognizers[0].device
    first_in = stack_states(model, [r.state for r in recognizers])
    batch: Optional[EncoderState] = None
    active = list(range(len(recognizers)))
    emitted = [0] * len(recognizers)
    done = 0
    while active:
        n = min(feats[j].shape[0] for j in active)
        n = n if limit is None else min(n, done + limit)
        x = torch.stack([feats[j][done:n] for j in active]).to(device)
        if batch is None:
            out, batch = model.step(x, first_in)
        elif len(active) == len(recognizers):  # every row: the batch itself, no rows to move
            out, batch = model.step(x, batch)
        else:
            rows = torch.tensor(active, device=device)
            out, part = model.step(x, take_rows(batch, rows))
            batch = put_rows(batch, rows, part, inputs=(first_in,))
        lp, best = _log_probs_and_best(out)
        for k, j in enumerate(active):
            logits[j].append((out[k], (lp[k], best[k])))
            emitted[j] += out.shape[1]
        done = n
        active = [j for j in active if feats[j].shape[0] > n]
    assert batch is not None
    parts = split_state(batch, [r.state.frames_in + f.shape[0] for r, f in zip(recognizers, feats)],
                        [r.state.frames_out + e for r, e in zip(recognizers, emitted)])
    for r, part in zip(recognizers, parts):
        r.state = part


def _log_probs_and_best(logits: Tensor) -> tuple[Tensor, list[int]]:
    """Log-softmax on the CPU and the arg-max ids of logits [..., T, V] (for all streams at once in
    :func:`step_batch`: one call instead of one per stream)."""
    lp = logits.detach().float().cpu().log_softmax(dim=-1)
    return lp, lp.argmax(dim=-1).tolist()
