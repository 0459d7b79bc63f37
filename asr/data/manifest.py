"""JSON Lines manifests: one utterance per line, audio paths relative to the manifest file.

Format (DESIGN.md): ``{"id", "audio", "duration", "text", "speaker"}`` plus any extra keys, which are
kept untouched. Paths are stored relative to the manifest so a data folder can be moved or mounted
elsewhere together with its manifest; readers turn them into absolute paths.
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, Iterable, Iterator

REQUIRED_KEYS = ("id", "audio", "duration", "text")


class ManifestError(ValueError):
    """A manifest line is not valid JSON or lacks a required key; the message names file and line."""


def _check_entry(entry: Any, where: str) -> dict:
    if not isinstance(entry, dict):
        raise ManifestError(f"{where}: expected a JSON object, got {type(entry).__name__}")
    missing = [k for k in REQUIRED_KEYS if k not in entry]
    if missing:
        raise ManifestError(f"{where}: missing key(s) {', '.join(missing)}")
    try:
        duration = float(entry["duration"])
    except (TypeError, ValueError):
        raise ManifestError(f"{where}: duration {entry['duration']!r} is not a number") from None
    if not duration >= 0.0:  # also rejects NaN
        raise ManifestError(f"{where}: duration {duration} is negative or NaN")
    if not isinstance(entry["text"], str):
        raise ManifestError(f"{where}: text must be a string")
    out = dict(entry)
    out["duration"] = duration
    out["id"] = str(entry["id"])
    out.setdefault("speaker", None)
    return out


def iter_manifest(path: str | os.PathLike, absolute: bool = True) -> Iterator[dict]:
    """Yield validated entries of a manifest; with ``absolute`` the audio paths are resolved
    against the manifest's folder (absolute paths in the file are kept as they are)."""
    path = Path(path)
    base = path.resolve().parent
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            where = f"{path}:{lineno}"
            try:
                raw = json.loads(line)
            except json.JSONDecodeError as e:
                raise ManifestError(f"{where}: invalid JSON ({e.msg})") from None
            entry = _check_entry(raw, where)
            if absolute:
                # normpath folds "a/../b" so ids, logs and reports show clean paths.
                entry["audio"] = os.path.normpath(base / entry["audio"])
            yield entry


def read_manifest(path: str | os.PathLike, absolute: bool = True) -> list[dict]:
    """All entries of a manifest as a list (see :func:`iter_manifest`)."""
    return list(iter_manifest(path, absolute=absolute))


def read_manifests(paths: Iterable[str | os.PathLike] | str | os.PathLike) -> list[dict]:
    """Concatenate several manifests; ids must stay unique because reports and resume refer to them."""
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    entries: list[dict] = []
    seen: dict[str, str] = {}
    for p in paths:
        for e in iter_manifest(p):
            if e["id"] in seen:
                raise ManifestError(f"{p}: duplicate utterance id {e['id']!r} (first seen in {seen[e['id']]})")
            seen[e["id"]] = str(p)
            entries.append(e)
    return entries


def write_manifest(path: str | os.PathLike, entries: Iterable[dict]) -> int:
    """Write entries as JSON Lines with audio paths made relative to the manifest's folder.

    The file is written to a temporary name and renamed, so an interrupted prepare step never
    leaves a half-written manifest that a later training run would silently accept.
    Returns the number of entries written.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    base = path.resolve().parent
    n = 0
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=base)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            for i, e in enumerate(entries):
                entry = _check_entry(e, f"entry {i} for {path}")
                audio = Path(entry["audio"])
                if audio.is_absolute():
                    entry["audio"] = os.path.relpath(audio, base)
                entry["audio"] = Path(entry["audio"]).as_posix()
                entry["duration"] = round(entry["duration"], 4)
                f.write(json.dumps(entry, ensure_ascii=False) + "\n")
                n += 1
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return n


def audio_duration(path: str | os.PathLike) -> float:
    """Duration in seconds from the file header (soundfile), without decoding the samples."""
    import soundfile as sf

    info = sf.info(str(path))
    return info.frames / float(info.samplerate)


def audio_durations(paths: Iterable[str | os.PathLike], jobs: int = 4) -> list[float | None]:
    """Durations of many files (None where the file cannot be read), read in ``jobs`` threads.

    Header reads are I/O bound, so threads give most of the speed-up on network file systems.
    """
    from concurrent.futures import ThreadPoolExecutor

    def one(p: str | os.PathLike) -> float | None:
        try:
            return audio_duration(p)
        except Exception:  # soundfile raises LibsndfileError/RuntimeError/OSError for bad files
            return None

    paths = list(paths)
    if jobs <= 1:
        return [one(p) for p in paths]
    with ThreadPoolExecutor(max_workers=jobs) as ex:
        return list(ex.map(one, paths))
