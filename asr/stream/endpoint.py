"""Endpoint detection for streaming recognition: when does a spoken segment end?

Rules in the style of sherpa-onnx (k2-fsa): an endpoint is detected as soon as ANY rule holds.
Each rule looks at the current segment (everything since the previous endpoint):

* ``contains_nonsilence``: some frame of the segment was not silence (the model heard speech),
* ``trailing_silence``: seconds of silence at the end of the segment,
* ``segment_length``: seconds since the segment started.

A rule holds when (``must_contain_nonsilence`` is false or the segment contains non-silence) and
``trailing_silence >= min_trailing_silence`` and ``segment_length >= min_segment_length``.
The defaults are sherpa-onnx's:

* rule 1 (2.4 s of silence, nothing decoded): a long pause with no speech; the "segment" is empty,
  so nothing is emitted, but the segment start moves on, which bounds what the decoder keeps.
* rule 2 (1.2 s of silence after speech): the normal end of an utterance.
* rule 3 (20 s segment): forces a cut in long monologues so segments (and the decoder's buffers)
  stay bounded; it may cut inside a word when someone talks for 20 s without a 1.2 s pause.

What counts as silence: a 40 ms encoder frame whose CTC arg-max is the blank. A CTC model emits a
short spike per token and blank everywhere else, so within speech the blank runs are short (a few
hundred ms between words), while a pause is a long blank run; the trailing-silence thresholds are
set well above the within-speech runs. Optionally (``energy_threshold_db``) a frame must also be
quiet, below that level in dBFS: useful in quiet rooms so that a long word the model has not
decided on yet (arg-max blank for a while) is not cut; useless in noisy rooms, where it would keep
rule 2 from ever firing (rule 3 still does).

An endpoint only finalises a segment: the recognizer keeps the model's recurrent state and the
decoder's last frame, so the next word's start is heard in context and the concatenated segments
equal the offline transcript (see :mod:`asr.stream.recognizer`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import Tensor

from asr.frames import FEATURE_HOP, FEATURE_WINDOW, FRAME_SECONDS

__all__ = ["EndpointRule", "EndpointConfig", "Endpointer", "StreamingEnergy", "ENERGY_FLOOR_DB"]

#: Level reported for digital silence (mean square 0), in dBFS.
ENERGY_FLOOR_DB = -100.0


@dataclass(frozen=True)
class EndpointRule:
    """One endpoint rule; times in seconds (see the module docstring)."""

    must_contain_nonsilence: bool
    min_trailing_silence: float
    min_segment_length: float

    def holds(self, contains_nonsilence: bool, trailing_silence: float, segment_length: float) -> bool:
        if self.must_contain_nonsilence and not contains_nonsilence:
            return False
        return trailing_silence >= self.min_trailing_silence and segment_length >= self.min_segment_length


@dataclass
class EndpointConfig:
    """Endpointing settings of a :class:`~asr.stream.recognizer.Recognizer`.

    ``enabled=False`` turns endpointing off: the whole stream is one segment, finalised only by
    ``finalize()`` (the decoder then keeps the whole hypothesis, so memory grows with the text).
    """

    enabled: bool = True
    rule1: EndpointRule = field(default_factory=lambda: EndpointRule(False, 2.4, 0.0))
    rule2: EndpointRule = field(default_factory=lambda: EndpointRule(True, 1.2, 0.0))
    rule3: EndpointRule = field(default_factory=lambda: EndpointRule(False, 0.0, 20.0))
    #: If set, a frame is silence only if its arg-max is blank AND its level is below this (dBFS).
    energy_threshold_db: Optional[float] = None

    @classmethod
    def disabled(cls) -> "EndpointConfig":
        return cls(enabled=False)

    @property
    def rules(self) -> tuple[EndpointRule, EndpointRule, EndpointRule]:
        return (self.rule1, self.rule2, self.rule3)

    def __post_init__(self) -> None:
        for i, r in enumerate(self.rules, 1):
            if r.min_trailing_silence < 0 or r.min_segment_length < 0:
                raise ValueError(f"endpoint rule{i}: times must be >= 0, got {r}")
            if r.min_trailing_silence == 0 and r.min_segment_length == 0 and not r.must_contain_nonsilence:
                raise ValueError(f"endpoint rule{i} would fire on every frame: {r}")


class Endpointer:
    """Tracks the current segment frame by frame and says when a rule fires.

    State: three numbers, whatever the stream length. ``update`` is called once per 40 ms encoder
    frame; it returns the number (1-3) of the first rule that holds after that frame, or 0. After
    an endpoint the next frame starts a new segment.
    """

    def __init__(self, config: EndpointConfig, frame_shift: float = FRAME_SECONDS) -> None:
        self.config = config
        self.frame_shift = frame_shift
        # Rules in frames: comparing integers avoids float drift (0.04 * 30 != 1.2 in binary).
        self._rules = [
            (r.must_contain_nonsilence, self._frames(r.min_trailing_silence), self._frames(r.min_segment_length))
            for r in config.rules
        ]
        self.reset()

    def _frames(self, seconds: float) -> int:
        return int(math.ceil(seconds / self.frame_shift - 1e-9))

    def reset(self) -> None:
        """Start a new segment."""
        self.segment_frames = 0
        self.trailing_silence_frames = 0
        self.contains_nonsilence = False

    @property
    def trailing_silence(self) -> float:
        return self.trailing_silence_frames * self.frame_shift

    @property
    def segment_length(self) -> float:
        return self.segment_frames * self.frame_shift

    def update(self, silent: bool) -> int:
        """Account one frame; return the rule that fired (1, 2, 3) or 0. Resets on an endpoint."""
        self.segment_frames += 1
        if silent:
            self.trailing_silence_frames += 1
        else:
            self.trailing_silence_frames = 0
            self.contains_nonsilence = True
        if not self.config.enabled:
            return 0
        for i, (need_speech, min_sil, min_len) in enumerate(self._rules, 1):
            if need_speech and not self.contains_nonsilence:
                continue
            if self.trailing_silence_frames >= min_sil and self.segment_frames >= min_len:
                self.reset()
                return i
        return 0


class StreamingEnergy:
    """Level in dBFS (10 log10 of the mean square, samples in [-1, 1]) of each fbank frame.

    Frames are the ones :class:`asr.features.StreamingFbank` emits for the same input (400 samples
    every 160, only whole frames), so frame i here is feature frame i. State: < 400 samples.
    """

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self._tail = torch.zeros(0, dtype=torch.float32)

    def accept_waveform(self, samples: Tensor) -> Tensor:
        buf = torch.cat([self._tail, samples.to(torch.float32)]) if self._tail.numel() else samples.to(torch.float32)
        if buf.numel() < FEATURE_WINDOW:
            self._tail = buf.clone()
            return torch.zeros(0)
        frames = buf.unfold(0, FEATURE_WINDOW, FEATURE_HOP)  # [t, 400]
        ms = frames.double().square().mean(dim=1)
        db = (10.0 * torch.log10(ms.clamp_min(10 ** (ENERGY_FLOOR_DB / 10)))).float()
        self._tail = buf[frames.shape[0] * FEATURE_HOP :].clone()
        return db
