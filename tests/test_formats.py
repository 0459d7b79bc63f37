"""Transcript writers: every format parses back, and subtitle cues follow their splitting rules.

These use hand-built transcripts (no model) so each rule can be hit exactly; tests/test_transcribe.py
checks the same parsers on real model output.
"""
from __future__ import annotations

import json
import re

import pytest

from asr.formats import (
    FORMATS,
    format_transcript,
    subtitle_cues,
    to_json,
    to_srt,
    to_tsv,
    to_txt,
    to_vtt,
    write_transcript,
)
from asr.transcript import Segment, Transcript, Word

SRT_TIME = re.compile(r"^(\d{2,}):(\d{2}):(\d{2}),(\d{3}) --> (\d{2,}):(\d{2}):(\d{2}),(\d{3})$")
VTT_TIME = re.compile(r"^(\d{2,}):(\d{2}):(\d{2})\.(\d{3}) --> (\d{2,}):(\d{2}):(\d{2})\.(\d{3})$")


def _secs(h: str, m: str, s: str, ms: str) -> float:
    return int(h) * 3600 + int(m) * 60 + int(s) + int(ms) / 1000


def parse_srt(text: str) -> list[tuple[float, float, str]]:
    """Strict SRT reader: numbered blocks 1..n, a timing line, >= 1 text line, blank separators."""
    cues = []
    blocks = [b for b in text.split("\n\n") if b.strip()]
    assert text == "" or text.endswith("\n\n"), "SRT must end with a blank line"
    for n, block in enumerate(blocks, 1):
        lines = block.split("\n")
        assert lines[0] == str(n), f"cue number {lines[0]!r}, expected {n}"
        m = SRT_TIME.match(lines[1])
        assert m, f"bad SRT timing line {lines[1]!r}"
        assert len(lines) >= 3 and all(line.strip() for line in lines[2:]), f"cue {n} has no text"
        cues.append((_secs(*m.groups()[:4]), _secs(*m.groups()[4:]), "\n".join(lines[2:])))
    return cues


def parse_vtt(text: str) -> list[tuple[float, float, str]]:
    assert text.startswith("WEBVTT\n\n"), "WebVTT must start with the WEBVTT header"
    cues = []
    for block in [b for b in text[len("WEBVTT\n\n"):].split("\n\n") if b.strip()]:
        lines = block.split("\n")
        m = VTT_TIME.match(lines[0])
        assert m, f"bad VTT timing line {lines[0]!r}"
        assert len(lines) >= 2 and all(line.strip() for line in lines[1:])
        cues.append((_secs(*m.groups()[:4]), _secs(*m.groups()[4:]), "\n".join(lines[1:])))
    return cues


def parse_tsv(text: str) -> list[tuple[int, int, str]]:
    lines = text.rstrip("\n").split("\n")
    assert lines[0] == "start\tend\ttext"
    rows = []
    for line in lines[1:]:
        start, end, words = line.split("\t")
        rows.append((int(start), int(end), words))
    return rows


def check_cues(cues: list[tuple[float, float, str]], duration: float) -> None:
    """Cue times monotone, non-overlapping, non-empty and inside [0, duration]."""
    prev_end = 0.0
    for start, end, _ in cues:
        assert 0.0 <= start <= end <= duration + 1e-3, (start, end, duration)
        assert start >= prev_end - 1e-9, f"cue at {start} overlaps the previous one ending at {prev_end}"
        prev_end = end


def check_json(text: str, transcript: Transcript) -> dict:
    """The JSON schema: top-level keys and types, segments and words with numeric times."""
    d = json.loads(text)
    assert set(d) == {"source", "text", "duration", "segments", "words"}
    assert isinstance(d["text"], str) and isinstance(d["duration"], (int, float))
    assert d["text"] == transcript.text
    for seg in d["segments"]:
        assert set(seg) == {"text", "start", "end", "words"}
        assert seg["start"] <= seg["end"]
        assert seg["text"] == " ".join(w["word"] for w in seg["words"])
    all_words = [w for seg in d["segments"] for w in seg["words"]]
    assert d["words"] == all_words
    for w in d["words"]:
        assert set(w) == {"word", "start", "end", "confidence"}
        assert isinstance(w["word"], str) and w["word"]
        assert 0.0 <= w["start"] <= w["end"] <= d["duration"] + 1e-3
        assert w["confidence"] is None or 0.0 <= w["confidence"] <= 1.0
    return d


def check_all_formats(transcript: Transcript) -> None:
    """Render every format and parse it back; used here and on real output in test_transcribe."""
    dur = transcript.duration
    check_json(format_transcript(transcript, "json"), transcript)
    srt, vtt = parse_srt(format_transcript(transcript, "srt")), parse_vtt(format_transcript(transcript, "vtt"))
    check_cues(srt, dur)
    check_cues(vtt, dur)
    assert [c[2] for c in srt] == [c[2] for c in vtt]
    cue_words = " ".join(c[2].replace("\n", " ") for c in srt).split()
    assert cue_words == transcript.text.split(), "subtitles must carry every word, in order"
    rows = parse_tsv(format_transcript(transcript, "tsv"))
    assert [r[2] for r in rows] == [s.text for s in transcript.segments]
    assert all(0 <= a <= b <= round(dur * 1000) + 1 for a, b, _ in rows)
    txt = format_transcript(transcript, "txt")
    assert txt.splitlines() == [s.text for s in transcript.segments]


def make_transcript(words: list[tuple[str, float, float]], duration: float, pause: float = 0.8) -> Transcript:
    """Segments split at gaps >= pause, as asr.api builds them."""
    ws = [Word(w, s, e, 0.9) for w, s, e in words]
    segs: list[list[Word]] = []
    for w in ws:
        if segs and w.start - segs[-1][-1].end < pause:
            segs[-1].append(w)
        else:
            segs.append([w])
    segments = [Segment(" ".join(w.word for w in g), g[0].start, g[-1].end, g) for g in segs]
    return Transcript(" ".join(s.text for s in segments), segments, duration, "x.wav")


def test_every_format_parses_and_round_trips_words():
    t = make_transcript([("hello", 0.12000000000000001, 0.4), ("world", 0.48, 0.8), ("again", 2.0, 2.3)], 3.0)
    check_all_formats(t)
    d = json.loads(to_json(t))
    assert d["words"][0]["start"] == 0.12  # float noise rounded to the millisecond
    assert to_txt(t) == "hello world\nagain\n"
    assert parse_tsv(to_tsv(t)) == [(120, 800, "hello world"), (2000, 2300, "again")]


def test_empty_transcript_is_valid_in_every_format():
    t = Transcript("", [], 1.5, "silence.wav")
    check_all_formats(t)
    assert to_txt(t) == ""
    assert to_srt(t) == ""
    assert to_vtt(t) == "WEBVTT\n\n"
    assert json.loads(to_json(t))["segments"] == []


def test_cues_split_at_pauses():
    # 0.9 s gap between "two" and "three" splits; 0.5 s between "one" and "two" does not.
    t = make_transcript([("one", 0.0, 0.3), ("two", 0.8, 1.1), ("three", 2.0, 2.4)], 3.0, pause=10.0)
    assert len(t.segments) == 1  # so the cue split below comes from the pause rule itself
    cues = subtitle_cues(t, pause_seconds=0.8, min_cue_seconds=0.0)
    assert [c.text for c in cues] == ["one two", "three"]
    assert (cues[0].start, cues[0].end) == (0.0, 1.1)


def test_cues_split_at_max_line_length_and_lines():
    words = [(f"word{i:02d}", i * 0.3, i * 0.3 + 0.25) for i in range(20)]  # 6 chars each, no pauses
    t = make_transcript(words, 7.0)
    cues = subtitle_cues(t, max_line_chars=20, max_lines=2, max_cue_seconds=100.0)
    for c in cues:
        assert 1 <= len(c.lines) <= 2
        assert all(len(line) <= 20 for line in c.lines), c.lines
    # 3 words of 6 chars fit a 20-char line (6+1+6+1+6 = 20): 6 words per cue
    assert [len(c.text.split()) for c in cues] == [6, 6, 6, 2]
    assert " ".join(c.text.replace("\n", " ") for c in cues) == t.text


def test_a_word_longer_than_a_line_gets_its_own_line():
    t = make_transcript([("a", 0.0, 0.1), ("x" * 50, 0.2, 0.9), ("b", 1.0, 1.1)], 2.0)
    cues = subtitle_cues(t, max_line_chars=10, max_lines=2)
    assert [c.lines for c in cues] == [("a", "x" * 50), ("b",)]


def test_cues_split_at_max_duration():
    words = [(f"w{i}", i * 0.5, i * 0.5 + 0.4) for i in range(20)]  # 10 s of continuous speech
    cues = subtitle_cues(make_transcript(words, 10.0), max_cue_seconds=3.0, max_line_chars=200)
    assert len(cues) > 1
    assert all(c.end - c.start <= 3.0 + 1e-9 for c in cues)


def test_short_cues_are_held_but_never_overlap_or_pass_the_audio():
    # Spike-based ends make 40 ms words; cues are held for min_cue_seconds, capped by the next
    # cue's start and by the end of the audio.
    t = make_transcript([("a", 0.0, 0.04), ("b", 1.5, 1.54), ("c", 2.0, 2.04)], 2.3, pause=0.4)
    cues = subtitle_cues(t, pause_seconds=0.4, min_cue_seconds=1.0)
    assert [(c.start, c.end) for c in cues] == [(0.0, 1.0), (1.5, 2.0), (2.0, 2.3)]
    check_cues([(c.start, c.end, c.text) for c in cues], 2.3)


def test_clock_format_past_100_hours():
    t = make_transcript([("late", 360000.5, 360001.25)], 360002.0)
    srt = to_srt(t)
    assert "100:00:00,500 --> 100:00:01,500" in srt  # held to 1 s minimum
    assert parse_srt(srt)[0][:2] == (360000.5, 360001.5)


@pytest.mark.parametrize("fmt", FORMATS)
def test_write_transcript_to_path_and_stream(tmp_path, fmt):
    import io

    t = make_transcript([("hi", 0.0, 0.2)], 0.5)
    path = tmp_path / "sub" / f"out.{fmt}"
    write_transcript(t, fmt, path)
    buf = io.StringIO()
    write_transcript(t, fmt, buf)
    assert path.read_text(encoding="utf-8") == buf.getvalue() == format_transcript(t, fmt)


def test_unknown_format_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown format 'doc'"):
        format_transcript(Transcript(""), "doc")
