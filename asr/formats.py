"""Writers for transcripts: plain text, JSON, SubRip (SRT), WebVTT and TSV.

    from asr.formats import format_transcript, write_transcript
    print(format_transcript(result, "srt"))
    write_transcript(result, "vtt", "talk.vtt")

* ``txt``  one segment (stretch of speech between pauses) per line.
* ``json`` ``Transcript.to_dict()``: ``{"source", "text", "duration", "segments": [{"text", "start",
  "end", "words": [...]}], "words": [{"word", "start", "end", "confidence"}]}``; times in seconds
  rounded to the millisecond, confidences to 4 digits (the raw values carry float noise such as
  0.12000000000000001 from 40 ms frame arithmetic).
* ``srt`` / ``vtt`` subtitle cues (:func:`subtitle_cues`): a cue ends at a pause between words, or
  when the next word would not fit in ``max_lines`` lines of ``max_line_chars`` characters, or would
  make the cue longer than ``max_cue_seconds``. CTC word ends are spike-based lower bounds (often
  40 ms after a word starts), so a cue shorter than ``min_cue_seconds`` is held on screen longer,
  but never past the next cue's start or the end of the audio: cue times stay monotone,
  non-overlapping and inside the audio.
* ``tsv`` whisper-compatible: header ``start\\tend\\ttext``, one segment per row, integer milliseconds.
"""
from __future__ import annotations

import io
import json
import os
from dataclasses import dataclass
from typing import Any, Callable, TextIO, Union

from asr.transcript import Transcript, Word

__all__ = [
    "FORMATS",
    "Cue",
    "format_transcript",
    "subtitle_cues",
    "to_json",
    "to_srt",
    "to_tsv",
    "to_txt",
    "to_vtt",
    "write_transcript",
]

FORMATS = ("txt", "json", "srt", "vtt", "tsv")

MAX_LINE_CHARS = 42  # the common broadcast/Netflix limit for one subtitle line
MAX_LINES = 2
MAX_CUE_SECONDS = 7.0
MIN_CUE_SECONDS = 1.0
PAUSE_SECONDS = 0.8


@dataclass(frozen=True)
class Cue:
    """One subtitle: shown from ``start`` to ``end`` seconds, ``lines`` of text."""

    start: float
    end: float
    lines: tuple[str, ...]

    @property
    def text(self) -> str:
        return "\n".join(self.lines)


def _wrap(words: list[str], max_line_chars: int) -> list[str]:
    """Greedy line filling; a word longer than a line gets a line of its own."""
    lines: list[str] = []
    for w in words:
        if lines and len(lines[-1]) + 1 + len(w) <= max_line_chars:
            lines[-1] += " " + w
        else:
            lines.append(w)
    return lines


def subtitle_cues(
    transcript: Transcript,
    max_line_chars: int = MAX_LINE_CHARS,
    max_lines: int = MAX_LINES,
    pause_seconds: float = PAUSE_SECONDS,
    max_cue_seconds: float = MAX_CUE_SECONDS,
    min_cue_seconds: float = MIN_CUE_SECONDS,
) -> list[Cue]:
    """Cut a transcript's words into subtitle cues (see the module docstring for the rules).

    Cues never cross a segment boundary. A segment without word times (not produced by this
    package, but a Transcript may be built by hand) becomes one cue over the segment's span.
    """
    if max_line_chars < 1 or max_lines < 1:
        raise ValueError("max_line_chars and max_lines must be >= 1")
    groups: list[tuple[float, float, list[str]]] = []  # (start, end, words) before min-duration fix
    for seg in transcript.segments:
        if not seg.words:
            if seg.text.strip():
                groups.append((seg.start, seg.end, seg.text.split()))
            continue
        cur: list[Word] = []
        for w in seg.words:
            if cur:
                gap = w.start - cur[-1].end
                candidate = [x.word for x in cur] + [w.word]
                too_long = len(_wrap(candidate, max_line_chars)) > max_lines
                if gap >= pause_seconds or too_long or w.end - cur[0].start > max_cue_seconds:
                    groups.append((cur[0].start, cur[-1].end, [x.word for x in cur]))
                    cur = []
            cur.append(w)
        if cur:
            groups.append((cur[0].start, cur[-1].end, [x.word for x in cur]))
    duration = transcript.duration if transcript.duration and transcript.duration > 0 else None
    cues: list[Cue] = []
    for i, (start, end, words) in enumerate(groups):
        limit = groups[i + 1][0] if i + 1 < len(groups) else (duration if duration is not None else start + min_cue_seconds)
        if end - start < min_cue_seconds:
            end = max(end, min(start + min_cue_seconds, limit))
        cues.append(Cue(start, end, tuple(_wrap(words, max_line_chars))))
    return cues


def _ms(seconds: float) -> int:
    return max(0, int(round(seconds * 1000)))


def _clock(seconds: float, sep: str) -> str:
    """HH:MM:SS<sep>mmm (hours grow past two digits for very long audio)."""
    ms = _ms(seconds)
    h, rest = divmod(ms, 3_600_000)
    m, rest = divmod(rest, 60_000)
    s, ms = divmod(rest, 1000)
    return f"{h:02d}:{m:02d}:{s:02d}{sep}{ms:03d}"


def to_txt(transcript: Transcript, **_: Any) -> str:
    """One segment per line ('' for a transcript without speech)."""
    lines = [s.text for s in transcript.segments if s.text]
    if not lines and transcript.text:
        lines = [transcript.text]
    return "".join(line + "\n" for line in lines)


def _rounded(obj: Any, key: str = "") -> Any:
    if isinstance(obj, float):
        return round(obj, 4 if key == "confidence" else 3)
    if isinstance(obj, dict):
        return {k: _rounded(v, k) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_rounded(v) for v in obj]
    return obj


def to_json(transcript: Transcript, indent: int | None = 2, **_: Any) -> str:
    """``Transcript.to_dict()`` as JSON (times rounded to ms); ``indent=None`` for one line."""
    return json.dumps(_rounded(transcript.to_dict()), indent=indent, ensure_ascii=False) + "\n"


def to_srt(transcript: Transcript, **cue_options: Any) -> str:
    """SubRip: numbered cues, ``HH:MM:SS,mmm --> HH:MM:SS,mmm``, blank line after each."""
    out = io.StringIO()
    for i, cue in enumerate(subtitle_cues(transcript, **cue_options), 1):
        out.write(f"{i}\n{_clock(cue.start, ',')} --> {_clock(cue.end, ',')}\n{cue.text}\n\n")
    return out.getvalue()


def to_vtt(transcript: Transcript, **cue_options: Any) -> str:
    """WebVTT: ``WEBVTT`` header, cues ``HH:MM:SS.mmm --> HH:MM:SS.mmm``."""
    out = io.StringIO()
    out.write("WEBVTT\n\n")
    for cue in subtitle_cues(transcript, **cue_options):
        out.write(f"{_clock(cue.start, '.')} --> {_clock(cue.end, '.')}\n{cue.text}\n\n")
    return out.getvalue()


def to_tsv(transcript: Transcript, **_: Any) -> str:
    """``start\\tend\\ttext`` with integer milliseconds, one segment per row (as whisper writes)."""
    rows = ["start\tend\ttext"]
    for s in transcript.segments:
        text = " ".join(s.text.split())  # no tabs or newlines inside a field
        rows.append(f"{_ms(s.start)}\t{_ms(s.end)}\t{text}")
    return "\n".join(rows) + "\n"


_WRITERS: dict[str, Callable[..., str]] = {"txt": to_txt, "json": to_json, "srt": to_srt, "vtt": to_vtt, "tsv": to_tsv}


def format_transcript(transcript: Transcript, fmt: str, **options: Any) -> str:
    """The transcript rendered in ``fmt`` (one of FORMATS); options go to the writer
    (``indent`` for json; ``max_line_chars``, ``max_lines``, ``pause_seconds``, ``max_cue_seconds``,
    ``min_cue_seconds`` for srt/vtt)."""
    try:
        writer = _WRITERS[fmt]
    except KeyError:
        raise ValueError(f"unknown format {fmt!r}; choose from {', '.join(FORMATS)}") from None
    return writer(transcript, **options)


def write_transcript(
    transcript: Transcript, fmt: str, file: Union[str, os.PathLike, TextIO], **options: Any
) -> None:
    """Write the transcript in ``fmt`` to a path (UTF-8, parent folders created) or a text stream."""
    text = format_transcript(transcript, fmt, **options)
    if isinstance(file, (str, os.PathLike)):
        path = os.fspath(file)
        parent = os.path.dirname(path)
        if parent:
            os.makedirs(parent, exist_ok=True)
        with open(path, "w", encoding="utf-8", newline="\n") as f:
            f.write(text)
    else:
        file.write(text)
