"""The two WebSocket protocols of ``asr-serve``: parsing what clients send, rendering what they get.

**Vosk** (path ``/``), as Vosk's ``asr_server.py`` speaks it, so Vosk clients work unchanged:

* client: an optional text message ``{"config": {"sample_rate": N, "words": bool,
  "max_alternatives": N, "phrase_list": [...]}}`` (``phrase_list`` becomes hotwords; other keys are
  ignored with a log line), binary messages of 16-bit little-endian mono PCM, then ``{"eof" : 1}``;
* server: exactly one message per audio message, ``{"partial": "..."}`` or, where an endpoint
  closed a segment, ``{"result": [{"conf", "end", "start", "word"}, ...], "text": "..."}``
  (``{"alternatives": [{"confidence", "result", "text"}]}`` when ``max_alternatives`` > 0); at
  eof the final result, then a normal close (1000).

**Rich** (path ``/stream``, this project's own): the same audio and eof messages; the config takes
the decoding and endpointing options of ``asr-live`` (:func:`parse_rich_config`). The server sends
``{"type": "ready", ...}`` after the config, then only what changed: ``{"type": "partial",
"segment": k, "is_final": false, "text", "words"}`` and ``{"type": "final", "segment": k,
"is_final": true, "text", "start", "end", "words"}``, and after eof ``{"type": "done", "segments": n,
"duration": s, "reason": "eof"}`` and a normal close (``reason`` "max_stream_seconds" when the
stream reached the server's length limit instead). Words are ``{"word", "start", "end", "confidence"}`` with
times in seconds from the start of the stream.

Both: a bad message gets ``{"error": "one line", "code": C}`` and a close with code ``C``
(:class:`ProtocolError`, codes below).
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from typing import Any, Iterable, Optional, Sequence

from asr.transcript import Segment, Word

log = logging.getLogger("asr.serve")

# WebSocket close codes (RFC 6455, section 7.4.1) the server uses.
CLOSE_NORMAL = 1000
CLOSE_GOING_AWAY = 1001  # the server shuts down
CLOSE_UNSUPPORTED = 1003  # a config value the server cannot honour
CLOSE_INVALID = 1007  # a malformed message: not JSON, odd-length PCM, unknown message
CLOSE_POLICY = 1008  # audio before config, idle timeout, a client too slow to read
CLOSE_TOO_BIG = 1009  # a message over the size limit
CLOSE_INTERNAL = 1011  # the server failed on this stream
CLOSE_TRY_LATER = 1013  # all stream slots taken

#: Vosk's default hotword bonus for ``phrase_list`` entries (nats, as ``asr-transcribe --hotword``).
PHRASE_BONUS = 2.0
#: Sample rates a config may ask for (the resampler also refuses rates it cannot handle in this range).
MIN_RATE, MAX_RATE = 4000, 192000

VOSK_KEYS = {"sample_rate", "words", "max_alternatives", "phrase_list"}
RICH_KEYS = VOSK_KEYS | {"beam_size", "hotwords", "endpoint", "lm", "partials"}
ENDPOINT_KEYS = {"enabled", "rule1_min_trailing_silence", "rule2_min_trailing_silence",
                 "rule3_min_segment_length", "energy_threshold_db"}


class ProtocolError(Exception):
    """A client error: ``str(err)`` is the one-line message, ``code`` the close code."""

    def __init__(self, message: str, code: int = CLOSE_INVALID) -> None:
        super().__init__(message)
        self.code = code

    def to_json(self) -> str:
        return json.dumps({"error": str(self), "code": self.code})


@dataclass
class StreamConfig:
    """What a client asked for. ``hotwords``: {word: bonus}; ``endpoint``: keyword arguments of
    the endpoint rules (see :func:`asr.serve.engine.endpoint_config`); ``lm``: False turns the
    model's language model off for this stream."""

    sample_rate: int
    words: bool = True
    max_alternatives: int = 0
    beam_size: int = 1
    hotwords: dict[str, float] = field(default_factory=dict)
    endpoint: dict[str, Any] = field(default_factory=dict)
    lm: bool = True
    partials: bool = True


@dataclass
class Message:
    """One parsed text message: a config or eof (``kind``)."""

    kind: str  # "config" | "eof"
    config: Optional[dict[str, Any]] = None


def parse_text(text: str) -> Message:
    """A client text message -> :class:`Message`; ProtocolError (1007) if it is neither."""
    try:
        obj = json.loads(text)
    except ValueError:
        raise ProtocolError(f"text message is not JSON: {text[:60]!r}") from None
    if not isinstance(obj, dict):
        raise ProtocolError("text message must be a JSON object")
    if "config" in obj:
        if not isinstance(obj["config"], dict):
            raise ProtocolError('"config" must be a JSON object')
        return Message("config", obj["config"])
    if "eof" in obj:
        return Message("eof")
    raise ProtocolError(f"unknown message (expected config or eof): {text[:60]!r}")


def pcm_samples_bytes(data: bytes) -> bytes:
    """Check a binary message as 16-bit PCM (ProtocolError 1007 for an odd length)."""
    if len(data) % 2:
        raise ProtocolError(f"audio message of {len(data)} bytes: 16-bit PCM needs an even number of bytes")
    return data


def _number(cfg: dict, key: str, kind: type, lo: float, hi: float, default: Any) -> Any:
    if key not in cfg:
        return default
    value = cfg[key]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind is int and int(value) != value):
        raise ProtocolError(f"config {key}: expected {'an integer' if kind is int else 'a number'}, got {value!r}",
                            CLOSE_INVALID)
    if not lo <= value <= hi:
        raise ProtocolError(f"config {key}: {value} is out of range [{lo}, {hi}]", CLOSE_UNSUPPORTED)
    return kind(value)


def _flag(cfg: dict, key: str, default: bool) -> bool:
    if key not in cfg:
        return default
    value = cfg[key]
    if isinstance(value, bool) or value in (0, 1):
        return bool(value)
    raise ProtocolError(f"config {key}: expected true or false, got {value!r}")


def _phrases(value: Any) -> dict[str, float]:
    if not isinstance(value, list) or not all(isinstance(p, str) for p in value):
        raise ProtocolError("config phrase_list: expected a list of strings")
    return {" ".join(p.lower().split()): PHRASE_BONUS for p in value if p.strip()}


def _hotwords(value: Any) -> dict[str, float]:
    if isinstance(value, list):
        return _phrases(value)
    if not isinstance(value, dict):
        raise ProtocolError("config hotwords: expected {word: bonus} or a list of words")
    out = {}
    for word, bonus in value.items():
        if isinstance(bonus, bool) or not isinstance(bonus, (int, float)) or not -50 <= bonus <= 50:
            raise ProtocolError(f"config hotwords: bonus of {word!r} must be a number in [-50, 50]")
        if word.strip():
            out[" ".join(word.lower().split())] = float(bonus)
    return out


def _endpoint(value: Any) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ProtocolError("config endpoint: expected a JSON object")
    unknown = set(value) - ENDPOINT_KEYS
    if unknown:
        raise ProtocolError(f"config endpoint: unknown keys {sorted(unknown)} (known: {sorted(ENDPOINT_KEYS)})")
    out: dict[str, Any] = {}
    if "enabled" in value:
        out["enabled"] = _flag(value, "enabled", True)
    for key in ("rule1_min_trailing_silence", "rule2_min_trailing_silence", "rule3_min_segment_length"):
        if key in value:
            out[key] = _number(value, key, float, 0.04, 3600.0, None)
    if "energy_threshold_db" in value:
        out["energy_threshold_db"] = _number(value, "energy_threshold_db", float, -120.0, 0.0, None)
    return out


def parse_vosk_config(cfg: dict[str, Any], default_rate: Optional[int] = None) -> StreamConfig:
    """Vosk's config object -> StreamConfig. Unknown keys are logged and ignored, as Vosk does."""
    for key in sorted(set(cfg) - VOSK_KEYS):
        log.info("vosk config: ignoring unknown key %r", key)
    return _common(cfg, default_rate)


def parse_rich_config(cfg: dict[str, Any], default_rate: Optional[int] = None) -> StreamConfig:
    """The rich protocol's config -> StreamConfig. Keys: those of Vosk, plus ``beam_size`` (1-64),
    ``hotwords`` ({word: bonus} or [words]), ``endpoint`` ({``enabled``,
    ``rule1_min_trailing_silence``, ``rule2_min_trailing_silence``, ``rule3_min_segment_length``,
    ``energy_threshold_db``}), ``lm`` (false: no language model), ``partials`` (false: finals only).
    Unknown keys are refused (1007): a typo should not silently change nothing."""
    unknown = set(cfg) - RICH_KEYS
    if unknown:
        raise ProtocolError(f"config: unknown keys {sorted(unknown)} (known: {sorted(RICH_KEYS)})")
    sc = _common(cfg, default_rate)
    sc.beam_size = _number(cfg, "beam_size", int, 1, 64, 1)
    if "hotwords" in cfg:
        sc.hotwords.update(_hotwords(cfg["hotwords"]))
    if "endpoint" in cfg:
        sc.endpoint = _endpoint(cfg["endpoint"])
    sc.lm = _flag(cfg, "lm", True)
    sc.partials = _flag(cfg, "partials", True)
    return sc


def _common(cfg: dict[str, Any], default_rate: Optional[int]) -> StreamConfig:
    rate = _number(cfg, "sample_rate", float, MIN_RATE, MAX_RATE, default_rate)
    if rate is None:
        raise ProtocolError("config: sample_rate is required (this server has no default rate)")
    if int(rate) != rate:
        raise ProtocolError(f"config sample_rate: {rate} Hz is not a whole number of Hz", CLOSE_UNSUPPORTED)
    sc = StreamConfig(sample_rate=int(rate))
    sc.words = _flag(cfg, "words", True)
    sc.max_alternatives = _number(cfg, "max_alternatives", int, 0, 100, 0)
    if "phrase_list" in cfg:
        sc.hotwords = _phrases(cfg["phrase_list"])
    return sc


# ------------------------------------------------------------------------------------ rendering
def _merge(segments: Sequence[Segment]) -> Segment:
    words = [w for s in segments for w in s.words]
    return Segment(text=" ".join(s.text for s in segments if s.text),
                   start=segments[0].start, end=segments[-1].end, words=words)


def _vosk_word(w: Word) -> dict[str, Any]:
    conf = 1.0 if w.confidence is None else round(float(w.confidence), 6)
    return {"conf": conf, "end": round(w.end, 3), "start": round(w.start, 3), "word": w.word}


def vosk_result(segment: Optional[Segment], config: StreamConfig) -> str:
    """Vosk's result message for one segment (None: nothing was said)."""
    words = segment.words if segment is not None else []
    text = segment.text if segment is not None else ""
    if config.max_alternatives > 0:
        if not words:  # as vosk-api's empty result
            return json.dumps({"alternatives": [{"text": "", "confidence": 1.0}]})
        conf = sum(1.0 if w.confidence is None else w.confidence for w in words) / len(words)
        alt: dict[str, Any] = {"confidence": round(conf, 6), "text": text}
        if config.words:
            alt["result"] = [{k: v for k, v in _vosk_word(w).items() if k != "conf"} for w in words]
        return json.dumps({"alternatives": [alt]})
    out: dict[str, Any] = {}
    if config.words and words:
        out["result"] = [_vosk_word(w) for w in words]
    out["text"] = text
    return json.dumps(out)


def vosk_partial(text: str) -> str:
    return json.dumps({"partial": text})


def vosk_replies(n_messages: int, segments: Sequence[Segment], partial: str, config: StreamConfig) -> list[str]:
    """Exactly ``n_messages`` replies to that many audio messages stepped together: a result per
    segment closed (oldest first; if there are more segments than messages the oldest are merged
    into one result), then partials of the current text."""
    if n_messages <= 0:
        return []
    segs = list(segments)
    if len(segs) > n_messages:
        k = len(segs) - n_messages + 1
        segs = [_merge(segs[:k])] + segs[k:]
    replies = [vosk_result(s, config) for s in segs]
    return replies + [vosk_partial(partial)] * (n_messages - len(replies))


def vosk_final(segments: Sequence[Segment], config: StreamConfig) -> str:
    """The reply to eof: all segments still open, as one result."""
    return vosk_result(_merge(segments) if segments else None, config)


def word_dict(w: Word) -> dict[str, Any]:
    conf = None if w.confidence is None else round(float(w.confidence), 4)
    return {"word": w.word, "start": round(w.start, 3), "end": round(w.end, 3), "confidence": conf}


class RichRenderer:
    """Turns a stream's step results into rich-protocol messages; tracks segment ids and sends a
    partial only when its text changed."""

    def __init__(self, config: StreamConfig) -> None:
        self.config = config
        self.segment = 0
        self._last_partial: Optional[str] = None

    def step(self, segments: Iterable[Segment], text: str, words: Sequence[Word]) -> list[str]:
        out = [self._final(s) for s in segments]
        if self.config.partials and text != self._last_partial:
            self._last_partial = text
            out.append(json.dumps({"type": "partial", "segment": self.segment, "is_final": False, "text": text,
                                   "words": [word_dict(w) for w in words] if self.config.words else []}))
        return out

    def _final(self, seg: Segment) -> str:
        msg = json.dumps({"type": "final", "segment": self.segment, "is_final": True, "text": seg.text,
                          "start": round(seg.start, 3), "end": round(seg.end, 3),
                          "words": [word_dict(w) for w in seg.words] if self.config.words else []})
        self.segment += 1
        self._last_partial = None
        return msg

    def done(self, segments: Iterable[Segment], duration: float, reason: str = "eof") -> list[str]:
        """The last segments, then ``done`` (``reason``: "eof" or "max_stream_seconds")."""
        out = [self._final(s) for s in segments]
        out.append(json.dumps({"type": "done", "segments": self.segment, "duration": round(duration, 3),
                               "reason": reason}))
        return out

    @staticmethod
    def ready(session: int, config: StreamConfig) -> str:
        return json.dumps({"type": "ready", "session": session, "sample_rate": config.sample_rate,
                           "beam_size": config.beam_size, "hotwords": config.hotwords})
