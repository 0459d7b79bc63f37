"""``asr-transcribe``: transcribe audio files, folders and standard input.

    asr-transcribe talk.flac                          # transcript to stdout
    asr-transcribe talk.mp3 --format srt > talk.srt
    asr-transcribe recordings/ --format json --output-dir out/   # folders: recursively
    cat talk.wav | asr-transcribe -                   # '-' reads standard input
    asr-transcribe a.wav b.ogg --model exp/run1 --beam-size 8 --hotword "rwkv:3"

Where the output goes: with exactly one input argument that is a file or ``-`` and no
``--output-dir``, the transcript is written to stdout. Otherwise each input gets a file
``<name>.<format>`` in ``--output-dir`` (default: the current folder); files found in a folder
argument keep their sub-folders below it, and a name already used in this run gets ``-2``, ``-3``...

Bad inputs (missing, a folder without audio, empty, truncated, not audio, NaN/Inf samples, ...)
each give one line ``asr-transcribe: error: <file>: <reason>`` on stderr; the other inputs are
still transcribed. Exit status: 0 all transcribed, 1 some input failed, 2 usage error or unusable
model, 130 interrupted. ``--debug`` adds tracebacks.

Progress: a bar on stderr over audio seconds (and files), shown when stderr is a terminal or
there are several inputs; ``--no-progress`` turns it off.
"""
from __future__ import annotations

import argparse
import io
import sys
import traceback
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Optional, TextIO

if TYPE_CHECKING:
    from asr.api import ASRModel

PROG = "asr-transcribe"

#: Extensions looked for in folder arguments (libsndfile reads them; case-insensitive).
AUDIO_EXTENSIONS = frozenset(
    {".wav", ".wave", ".flac", ".ogg", ".oga", ".opus", ".mp3", ".aif", ".aiff", ".aifc", ".caf", ".au",
     ".snd", ".w64", ".rf64", ".sph", ".nist"}
)

_FORMATS = ("txt", "json", "srt", "vtt", "tsv")  # = asr.formats.FORMATS, kept here so --help is torch-free


@dataclass
class Source:
    """One thing to transcribe: its name in messages, what the API reads, and its output name."""

    display: str
    audio: Any  # a path string or an in-memory file (stdin)
    output_rel: Path  # output file name relative to the output folder, without the format suffix


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog=PROG,
        description="Transcribe speech in audio files (any format soundfile reads: WAV, FLAC, OGG/Vorbis, "
        "Opus, MP3, ...; any sample rate and channel count).",
        epilog="Exit status: 0 all inputs transcribed, 1 some failed, 2 usage error or unusable model.",
    )
    ap.add_argument("inputs", nargs="+", metavar="FILE_OR_DIR",
                    help="audio files, folders (searched recursively by audio extension), or - for stdin")
    ap.add_argument("--model", default=None, metavar="PATH",
                    help="checkpoint file or training output folder (default: the bundled model)")
    ap.add_argument("--format", "-f", default="txt", choices=_FORMATS, help="output format (default: %(default)s)")
    ap.add_argument("--output-dir", "-o", type=Path, default=None, metavar="DIR",
                    help="write <name>.<format> files here (default: stdout for one input, else the current folder)")
    ap.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto (default: %(default)s)")
    ap.add_argument("--batch-size", type=int, default=8, metavar="N",
                    help="short inputs transcribed together in one padded batch (default: %(default)s)")
    ap.add_argument("--beam-size", type=int, default=1, metavar="N",
                    help="1: greedy decoding; >1: CTC prefix beam search (default: %(default)s)")
    ap.add_argument("--hotword", action="append", default=[], metavar="WORDS[:BONUS]",
                    help="boost a word or phrase (bonus in nats, default 2.0); repeatable; implies beam search")
    ap.add_argument("--lm", default=None, metavar="ARPA",
                    help="word n-gram language model (tools/build_lm.py): decode over its words (needs flashlight-text; "
                         "default: the LM the model carries, as the bundled one does)")
    ap.add_argument("--no-lm", action="store_true",
                    help="no language model: greedy decoding of the model's own pieces, any word possible")
    ap.add_argument("--lm-weight", type=float, default=None, help="language-model weight (default: tuned, see asr.decode.lexicon)")
    ap.add_argument("--word-score", type=float, default=None, help="score per word with --lm (default: tuned)")
    ap.add_argument("--long-audio-seconds", type=float, default=None, metavar="S",
                    help="inputs longer than this are read and decoded block by block (default: 60)")
    ap.add_argument("--int8", action="store_true",
                    help="int8 block weights (CPU only): faster, outputs within ~1%% of float32")
    ap.add_argument("--no-progress", action="store_true", help="never show the progress bar")
    ap.add_argument("--debug", action="store_true", help="print tracebacks for errors")
    return ap


def _one_line(text: object) -> str:
    return " ".join(str(text).split())


def _parse_hotwords(values: list[str], ap: argparse.ArgumentParser) -> dict[str, float]:
    out: dict[str, float] = {}
    for v in values:
        words, sep, bonus = v.rpartition(":")
        if not sep:
            words, bonus = v, "2.0"
        try:
            out[words.strip()] = float(bonus)
        except ValueError:
            ap.error(f"--hotword {v!r}: the bonus after ':' must be a number")
        if not words.strip():
            ap.error(f"--hotword {v!r}: no words given")
    return out


def expand_inputs(args: list[str]) -> tuple[list[Source], list[str]]:
    """Sources to transcribe and one-line errors for arguments that yield none (missing paths
    are kept as sources: the loader reports them with the other per-file errors, in order)."""
    sources: list[Source] = []
    errors: list[str] = []
    for arg in args:
        if arg == "-":
            sources.append(Source("<stdin>", None, Path("stdin")))
            continue
        p = Path(arg)
        if p.is_dir():
            found = sorted(f for f in p.rglob("*") if f.suffix.lower() in AUDIO_EXTENSIONS and f.is_file())
            if not found:
                exts = ", ".join(sorted(AUDIO_EXTENSIONS))
                errors.append(f"{arg}: folder contains no audio files (looked for {exts})")
            for f in found:
                sources.append(Source(str(f), str(f), f.relative_to(p).with_suffix("")))
        else:
            sources.append(Source(arg, arg, Path(p.name).with_suffix("") if p.name else Path("audio")))
    return sources, errors


def _read_stdin() -> io.BytesIO:
    """All of stdin in memory (soundfile needs to seek, and a pipe cannot)."""
    data = sys.stdin.buffer.read()
    bio = io.BytesIO(data)
    bio.name = "<stdin>"  # type: ignore[attr-defined]  # names the input in AudioError messages
    return bio


def _unique_outputs(sources: list[Source], out_dir: Path, fmt: str) -> list[Path]:
    used: set[Path] = set()
    paths = []
    for s in sources:
        base = out_dir / s.output_rel
        candidate = base.with_name(base.name + "." + fmt)
        n = 2
        while candidate in used:
            candidate = base.with_name(f"{base.name}-{n}.{fmt}")
            n += 1
        used.add(candidate)
        paths.append(candidate)
    return paths


class _Console:
    """stderr messages that do not tear the progress bar, and the run's failure count."""

    def __init__(self, debug: bool) -> None:
        self.debug = debug
        self.failures = 0
        self.bar: Any = None

    def _write(self, line: str) -> None:
        if self.bar is not None and not self.bar.disable:
            self.bar.write(line, file=sys.stderr)
        else:
            print(line, file=sys.stderr, flush=True)

    def error(self, message: str, exc: Optional[BaseException] = None) -> None:
        self.failures += 1
        if self.debug and exc is not None:
            self._write("".join(traceback.format_exception(type(exc), exc, exc.__traceback__)).rstrip())
        self._write(f"{PROG}: error: {_one_line(message)}")

    def warning(self, message: str) -> None:
        self._write(f"{PROG}: warning: {_one_line(message)}")


@contextmanager
def _one_line_warnings(console: _Console) -> Iterator[None]:
    """Show warnings (e.g. a truncated WAV whose intact part was used) as one stderr line."""
    old = warnings.showwarning

    def show(message, category, filename, lineno, file=None, line=None):  # noqa: ANN001
        console.warning(str(message))

    warnings.showwarning = show
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("default")
            warnings.showwarning = show
            yield
    finally:
        warnings.showwarning = old


def main(argv: Optional[list[str]] = None) -> int:
    ap = build_parser()
    args = ap.parse_intermixed_args(argv)  # options may come after file names
    if args.inputs.count("-") > 1:
        ap.error("'-' (standard input) can be given only once")
    if args.batch_size < 1:
        ap.error("--batch-size must be at least 1")
    if args.beam_size < 1:
        ap.error("--beam-size must be at least 1")
    if args.long_audio_seconds is not None and args.long_audio_seconds <= 0:
        ap.error("--long-audio-seconds must be positive")
    if args.output_dir is not None and args.output_dir.exists() and not args.output_dir.is_dir():
        ap.error(f"--output-dir {args.output_dir}: exists and is not a folder")
    hotwords = _parse_hotwords(args.hotword, ap)
    if args.lm is not None and (hotwords or args.beam_size > 1):
        ap.error("--lm runs its own beam search: leave out --beam-size and --hotword with it")
    if args.lm is not None and args.no_lm:
        ap.error("--lm and --no-lm contradict each other")
    console = _Console(args.debug)
    try:
        with _one_line_warnings(console):
            return _run(args, hotwords, console)
    except KeyboardInterrupt:
        print(f"\n{PROG}: interrupted", file=sys.stderr)
        return 130


def _run(args: argparse.Namespace, hotwords: dict[str, float], console: _Console) -> int:
    sources, expand_errors = expand_inputs(args.inputs)
    for e in expand_errors:
        console.error(e)
    if not sources:
        return 1
    to_stdout = args.output_dir is None and len(args.inputs) == 1 and len(sources) == 1 \
        and not Path(args.inputs[0]).is_dir()
    for s in sources:
        if s.audio is None:
            s.audio = _read_stdin()
            if not s.audio.getbuffer().nbytes:
                console.error("<stdin>: empty input (0 bytes)")
                sources = [x for x in sources if x is not s]
    if not sources:
        return 1

    from tqdm import tqdm  # heavy imports (torch via asr.api) only once there is work to do

    from asr.api import probe_seconds
    from asr.audio import AudioError
    from asr.formats import format_transcript

    model = _load_model(args)
    if model is None:
        return 2
    out_paths = None if to_stdout else _unique_outputs(sources, args.output_dir or Path("."), args.format)

    durations = [probe_seconds(s.audio) for s in sources]  # headers only; read once, used twice
    total = sum(d for d in durations if d is not None)
    show = not args.no_progress and (sys.stderr.isatty() or len(sources) > 1)
    done = 0
    bar = tqdm(total=round(total, 1), unit="s", desc="transcribing", file=sys.stderr, disable=not show,
               dynamic_ncols=True, bar_format="{l_bar}{bar}| {n:.0f}/{total:.0f} s audio [{elapsed}<{remaining}{postfix}]")
    console.bar = bar
    bar.set_postfix_str(f"files 0/{len(sources)}")

    def advance(seconds: float) -> None:
        bar.update(min(seconds, max(0.0, bar.total - bar.n)) if bar.total else 0)

    try:
        results = model.iter_transcribe(
            [s.audio for s in sources], batch_size=args.batch_size, beam_size=args.beam_size,
            hotwords=hotwords or None, long_audio_seconds=args.long_audio_seconds, progress=advance,
            durations=durations,
        )
        for i, res in results:
            src = sources[i]
            done += 1
            bar.set_postfix_str(f"files {done}/{len(sources)}")
            if isinstance(res, AudioError):
                console.error(str(res) if str(res).startswith(src.display) else f"{src.display}: {res}", res)
                continue
            text = format_transcript(res, args.format)
            if out_paths is None:
                _emit(sys.stdout, text)
                continue
            try:
                out_paths[i].parent.mkdir(parents=True, exist_ok=True)
                out_paths[i].write_text(text, encoding="utf-8")
            except OSError as err:
                console.error(f"{src.display}: cannot write {out_paths[i]}: {err.strerror or err}", err)
    except KeyboardInterrupt:
        raise
    except Exception as err:  # not a bad input: the model or the machine failed; stop here
        console.error(f"{type(err).__name__}: {err}", err)
        return 1
    finally:
        bar.close()
    if out_paths is not None and show:
        ok = len(sources) - (console.failures - len(expand_errors))
        print(f"{PROG}: wrote {ok} transcript(s) to {args.output_dir or Path('.')}", file=sys.stderr)
    return 1 if console.failures else 0


def _load_model(args: argparse.Namespace) -> Optional[ASRModel]:
    """The :class:`asr.api.ASRModel` that ``args`` ask for (``--model``, ``--device``, ``--int8`` and
    the LM options), or None after a one-line error on stderr (the traceback too with ``--debug``)."""
    from asr.api import load_model
    from asr.model_file import CheckpointError

    try:
        # "auto": the LM the model carries, if any (it gives way to --beam-size / --hotword)
        lm = None if args.no_lm else (args.lm if args.lm is not None else "auto")
        return load_model(args.model, device=args.device, int8=args.int8, lm=lm, lm_weight=args.lm_weight,
                          word_score=args.word_score)
    except (CheckpointError, ValueError, OSError, RuntimeError) as err:
        if args.debug:
            traceback.print_exc()
        print(f"{PROG}: error: {_one_line(err)}", file=sys.stderr)
        return None


def _emit(stream: TextIO, text: str) -> None:
    stream.write(text)
    stream.flush()


if __name__ == "__main__":
    sys.exit(main())
