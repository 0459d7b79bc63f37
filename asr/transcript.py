"""Result types shared by file transcription and live streaming, so both report the same things."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Optional

from asr.decode.align import Word

__all__ = ["Word", "Segment", "Transcript"]


@dataclass
class Segment:
    """A stretch of speech between endpoints (or pauses): its text and words, times in seconds
    from the start of the audio."""

    text: str
    start: float
    end: float
    words: list[Word] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"text": self.text, "start": self.start, "end": self.end, "words": [asdict(w) for w in self.words]}


@dataclass
class Transcript:
    """What ``model.transcribe`` returns and what a stream has produced when it is finalised."""

    text: str
    segments: list[Segment] = field(default_factory=list)
    duration: float = 0.0  # seconds of audio seen
    source: Optional[str] = None  # file name, when there is one

    @property
    def words(self) -> list[Word]:
        return [w for s in self.segments for w in s.words]

    def to_dict(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "text": self.text,
            "duration": self.duration,
            "segments": [s.to_dict() for s in self.segments],
            "words": [asdict(w) for w in self.words],
        }
