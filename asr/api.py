"""Python API for file transcription, in the spirit of whisper's::

    import asr
    model = asr.load_model()                      # the bundled model, or load_model("ckpt.pt" / "run_dir")
    result = model.transcribe("talk.flac")        # path, file object, bytes, or array (+ sample_rate)
    result.text, result.words, result.segments    # words: (word, start, end, confidence), seconds
    results = model.transcribe_batch(["a.wav", "b.wav", ...], batch_size=16)
    stream = model.stream()                       # live audio: asr.stream.Recognizer

Two ways through the same weights, picked per input by its length:

* **one pass** (inputs up to ``long_audio_seconds``, 60 s by default): the whole file is loaded and
  run through the parallel (chunked) path at once. :meth:`ASRModel.transcribe_batch` pads many short
  inputs into batches sorted by length (the model is causal, so padding never changes a result).
* **blocks** (longer inputs): the file is read incrementally (:func:`asr.audio.iter_audio_blocks`,
  ``block_seconds`` at a time) and fed to the streaming recognizer
  (:class:`asr.stream.recognizer.Recognizer`: StreamingFbank -> ``model.step`` with the encoder
  state carried -> incremental greedy or prefix-beam decoder), with endpointing off so the whole
  file is one decoding pass. Memory is flat in the length of the audio (only the transcript
  itself grows), and the result equals the one-pass result: the frontend, the model and the
  decoders are exact under any cutting of the input (their parity tests), both paths build words
  the same way (spike times, same confidence) and both cut segments with
  :func:`_transcript_from_words`. ``tests/test_transcribe.py`` checks it on minutes of audio.

Timestamps come from the CTC spikes (:func:`asr.decode.align.words_from_tokens`): a word starts at
its first piece's spike frame and ends one 40 ms frame after its last piece's spike, clamped to the
audio. CTC spikes are narrow, so ``end`` is a lower bound of the spoken word's end, and a causal
model fires a little after the sound; good enough for captions and seeking. ``confidence`` is the
geometric mean of the posteriors of the word's pieces at their spikes. Segments are cut where the
gap between two words is at least ``pause_seconds`` (0.8 s).
"""
from __future__ import annotations

import io
import os
import warnings
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping, Optional, Sequence, Union

import numpy as np
import soundfile as sf
import torch
from torch import Tensor

from asr.audio import AudioError, iter_audio_blocks, load_audio, prepare_waveform
from asr.decode.align import Word, words_from_tokens
from asr.decode.beam import Hotwords
from asr.decode.incremental import HypothesisDecoder, hypothesis_decoder
from asr.features import compute_fbank
from asr.frames import SAMPLE_RATE
from asr.transcript import Segment, Transcript

__all__ = [
    "ASRModel",
    "TranscribeOptions",
    "BUNDLED_MODEL",
    "DEFAULT_BLOCK_SECONDS",
    "DEFAULT_LONG_AUDIO_SECONDS",
    "DEFAULT_PAUSE_SECONDS",
    "AudioInput",
    "load_model",
    "probe_seconds",
]

#: Where the default model lives inside the package (``asr.load_model()`` with no path).
BUNDLED_MODEL = Path(__file__).resolve().parent / "pretrained" / "model.pt"
#: Inputs longer than this go through the block-wise recurrent path (flat memory).
DEFAULT_LONG_AUDIO_SECONDS = 60.0
#: Seconds of source audio read and encoded per block on the long-audio path.
DEFAULT_BLOCK_SECONDS = 30.0
#: A gap of at least this many seconds between two words starts a new segment.
DEFAULT_PAUSE_SECONDS = 0.8
#: Cap on padded audio per batch in :meth:`ASRModel.iter_transcribe`, so a batch of long-ish
#: inputs cannot exhaust memory whatever ``batch_size`` says (batch_size x length <= this).
MAX_BATCH_SECONDS = 600.0

#: What ``transcribe`` accepts: a path, a binary file object, raw encoded bytes, or samples.
AudioInput = Union[str, os.PathLike, io.IOBase, bytes, bytearray, np.ndarray, Tensor]
#: Called with seconds of (16 kHz) audio just processed, for progress bars.
ProgressCallback = Callable[[float], None]


@dataclass(frozen=True)
class TranscribeOptions:
    """How :meth:`ASRModel.transcribe`, :meth:`~ASRModel.transcribe_batch` and
    :meth:`~ASRModel.iter_transcribe` decode. Those methods take an ``options`` object, or the same
    fields as keyword arguments (which override the object's), as whisper's ``DecodingOptions``.

    ``beam_size`` > 1: CTC prefix beam search; ``hotwords`` ({word or phrase: bonus in nats})
    boosts words and implies beam search (``beam_size`` 1 becomes 8). With a language model
    (``load_model(lm=...)``) both are refused: the LM search is the beam search.
    Inputs longer than ``long_audio_seconds`` go through the block-wise recurrent path
    (``block_seconds`` per block); the result is the same, memory stays flat. A gap of at least
    ``pause_seconds`` between words starts a new segment. ``None``: the model's attribute of the
    same name (:data:`DEFAULT_LONG_AUDIO_SECONDS`, :data:`DEFAULT_BLOCK_SECONDS`,
    :data:`DEFAULT_PAUSE_SECONDS` unless set).
    """

    beam_size: int = 1
    hotwords: Optional[Mapping[str, float]] = None
    long_audio_seconds: Optional[float] = None
    block_seconds: Optional[float] = None
    pause_seconds: Optional[float] = None


@dataclass(frozen=True)
class _Plan:
    """Options resolved against a model: what one call decodes with."""

    beam_size: int
    hotwords: Optional[Hotwords]
    hotwords_map: Optional[dict]
    lexicon: Any
    long_audio_seconds: float
    block_seconds: float
    pause_seconds: float


def load_model(
    path: Union[str, os.PathLike, None] = None, device: Union[str, torch.device] = "cpu", *, int8: bool = False,
    compile: bool = False, lm: Union[str, os.PathLike, None] = "auto", lm_weight: Optional[float] = None,
    word_score: Optional[float] = None, compile_frames: tuple[int, ...] = (1, 4), backend: Optional[str] = None,
) -> "ASRModel":
    """Load a model for transcription.

    ``path``: a checkpoint file, or a training output / checkpoint folder (its best checkpoint by
    dev WER, else its newest); ``None`` loads the bundled model ``asr/pretrained/model.pt``.
    ``device``: ``"cpu"``, ``"cuda"``, ``"cuda:N"`` or ``"auto"`` (CUDA when available).
    ``backend``: the :class:`asr.infer.InferenceEncoder` backend, chosen once here. ``None`` (the
    default, unless ``int8`` or ``compile`` asks for another): the fastest available,
    :func:`asr.infer.default_backend`: on the CPU ``onnx-int8`` (int8 weights, the step run by
    ONNX Runtime: outputs within about 1 % of float32; its graph is exported once per model into
    ``~/.cache/rwkv-asr``, seconds, unless it ships beside the model); if that backend cannot be
    built, one warning and the ``int8`` backend. ``"float"``: exact float32.
    ``int8``: the ``int8`` backend (PyTorch, CPU only).
    ``compile``: compile the streaming step for one and for four encoder frames per call (40 and
    160 ms of audio; CPU only, needs a C++ compiler, up to a minute or two the first time; the
    ``compiled`` / ``compiled-int8`` backends): a :meth:`ASRModel.stream` fed 160 ms chunks
    then runs ~2.5x faster with ``int8``. Off by default. ``compile_frames``: the encoder frames per
    call compiled for (``asr-live --compile`` feeds 160 ms blocks and compiles ``(4,)`` only).
    The engine copies the weights when it is built: after editing ``ASRModel.model``'s parameters,
    load the model again.
    ``lm``: an ARPA word n-gram model (``tools/build_lm.py``): final hypotheses then come from a
    beam search over the LM's words (:mod:`asr.decode.lexicon`, needs flashlight-text), with
    ``lm_weight`` and ``word_score`` (defaults tuned on the real dev set: conf/lm/bundled.yaml).
    Words outside the LM cannot be produced; ``beam_size`` and ``hotwords`` are then refused
    (``ValueError``): the LM search is the beam search. ``"auto"`` (the default): the LM the
    checkpoint carries, if any (the bundled model carries its word 3-gram, as pocketsphinx ships
    its LM), when flashlight-text is installed; a call with ``beam_size`` > 1 or ``hotwords`` then
    decodes without it instead of refusing. ``None``: no LM (greedy unless a call asks for a beam).
    Raises :class:`asr.model_file.CheckpointError` with a one-line message when the model is
    missing or unusable, and ``ValueError`` for an unavailable device.
    """
    from asr.model_file import CheckpointError, load_inference_parts

    dev = _resolve_device(device)
    if int8 and dev.type != "cpu":
        raise ValueError(f"int8 inference runs on the CPU only (device {dev} requested)")
    if compile and dev.type != "cpu":
        raise ValueError(f"the compiled streaming step runs on the CPU only (device {dev} requested)")
    if path is None:
        if not BUNDLED_MODEL.is_file():
            raise CheckpointError(
                f"no bundled model: {BUNDLED_MODEL} is not installed in this version of rwkv-asr; "
                "pass a checkpoint instead (asr.load_model('path/to/ckpt.pt') or --model PATH)"
            )
        path = BUNDLED_MODEL
    model, tokenizer, carried_lm = load_inference_parts(path, device=dev)
    encoder = _build_encoder(model.eval(), backend, int8, compile, compile_frames)
    lexicon, default_lm = language_model_decoder(tokenizer, lm, carried_lm, lm_weight=lm_weight, word_score=word_score)
    return ASRModel(model, tokenizer, device=dev, lexicon=lexicon, lexicon_optional=default_lm, encoder=encoder)


def _build_encoder(model: torch.nn.Module, backend: Optional[str], int8: bool, compile: bool,
                   compile_frames: tuple[int, ...]) -> Any:
    """The engine :func:`load_model` runs ``model`` with: ``backend`` if named, the options'
    backend with ``int8`` / ``compile``, else the fastest (falling back to ``int8`` with a warning
    where ONNX Runtime cannot run the model's graph)."""
    from asr.infer import InferenceEncoder, backend_for, default_backend
    from asr.model_file import one_thread

    if backend is None and (int8 or compile):
        backend = backend_for(model, int8, compile)
    if backend is not None and backend.startswith("compiled"):  # compiled for the caller's thread count
        return InferenceEncoder(model, backend, compile_frames=compile_frames)
    with one_thread():  # packing the weights: many small operations (asr.model_file.one_thread)
        if backend is not None:
            return InferenceEncoder(model, backend, compile_frames=compile_frames)
        backend = default_backend(model)
        try:  # the one-frame graph only: the one that ships beside the bundled model (no export on first use)
            return InferenceEncoder(model, backend, compile_frames=(1,) if backend == "onnx-int8" else compile_frames)
        except Exception as err:  # an export or ONNX Runtime failure: the same arithmetic, eagerly
            if backend != "onnx-int8":
                raise
            warnings.warn(f"the onnx-int8 engine could not be built ({' '.join(str(err).split())[:200]}); "
                          "running the int8 backend", stacklevel=3)
            return InferenceEncoder(model, "int8", compile_frames=compile_frames)


def language_model_decoder(
    tokenizer: Any, lm: Union[str, os.PathLike, None], carried_lm: Optional[bytes], *,
    lm_weight: Optional[float] = None, word_score: Optional[float] = None,
    warn: Callable[[str], None] = lambda message: warnings.warn(message, stacklevel=3),
) -> tuple[Any, bool]:
    """``(LexiconDecoder or None, whether it is the default)`` for ``lm`` as :func:`load_model` and
    ``asr-live`` take it: ``"auto"`` the LM the checkpoint carries (``carried_lm``) where
    flashlight-text can run it, None none, anything else an ARPA file.

    The default LM was not the caller's choice, so if it cannot be loaded (a damaged install, no
    room in the temp folder), decoding goes on without it after one ``warn``ing; a named LM that
    cannot be loaded raises."""
    default = isinstance(lm, str) and lm == "auto"
    if default:
        lm = carried_lm if _flashlight_available() else None
    if lm is None:
        return None, default
    from asr.decode.lexicon import LexiconDecoder

    try:
        return LexiconDecoder(tokenizer, lm, lm_weight=lm_weight, word_score=word_score), default
    except (OSError, RuntimeError, ValueError) as err:
        if not default:
            raise
        warn(f"the model's language model could not be loaded ({' '.join(str(err).split())}); decoding greedily")
        return None, default


def _flashlight_available() -> bool:
    """Whether torchaudio's lexicon decoder can run (flashlight-text installed: no wheel for every
    Python, e.g. none for 3.13 in 0.0.7, so a model's own LM is used only where it is)."""
    import importlib.util

    return importlib.util.find_spec("flashlight") is not None


def _resolve_device(device: Union[str, torch.device]) -> torch.device:
    """A torch.device, refusing CUDA early (with a clear message) on a machine without it."""
    if isinstance(device, str) and device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!s} requested but CUDA is not available on this machine")
    return dev


# --------------------------------------------------------------------------------------------------
# decoding of the one-pass path (the long-audio path uses asr.stream.recognizer)


def _build_transcript(dec: HypothesisDecoder, tokenizer: Any, duration: float, source: Optional[str],
                      pause_seconds: float) -> Transcript:
    """Words (spike times, confidences from the decoder's log-posteriors) and pause-split segments.

    The streaming recognizer builds its words with the same call, so both paths report identical
    words; times are clamped to ``duration`` (the last encoder frame can reach up to 15 ms past the
    last sample)."""
    tokens, frames, lps = dec.hypothesis(final=True)
    words = words_from_tokens(tokens, frames, tokenizer, num_frames=dec.num_frames, token_logprobs=lps,
                              max_time=duration)
    return _transcript_from_words(words, duration, source, pause_seconds)


def _transcript_from_words(words: Sequence[Word], duration: float, source: Optional[str], pause_seconds: float) -> Transcript:
    """Segments cut where the gap between two words is at least ``pause_seconds``."""
    segments: list[Segment] = []
    current: list[Word] = []
    for w in words:
        if current and w.start - current[-1].end >= pause_seconds:
            segments.append(_segment(current))
            current = []
        current.append(w)
    if current:
        segments.append(_segment(current))
    return Transcript(text=" ".join(s.text for s in segments), segments=segments, duration=duration, source=source)


def _segment(words: list[Word]) -> Segment:
    return Segment(text=" ".join(w.word for w in words), start=words[0].start, end=words[-1].end, words=list(words))


# --------------------------------------------------------------------------------------------------
# inputs


def _source_name(audio: Any) -> Optional[str]:
    """The name a Transcript and error messages use for an input (None for in-memory samples)."""
    if isinstance(audio, (str, os.PathLike)):
        return os.fspath(audio)
    name = getattr(audio, "name", None)
    if isinstance(name, (str, os.PathLike)):
        return os.fspath(name)
    return None


def _is_samples(audio: Any) -> bool:
    return isinstance(audio, (np.ndarray, Tensor))


def probe_seconds(audio: Any, sample_rate: Optional[int] = None) -> Optional[float]:
    """Duration without decoding (header only); None if unknown. Errors are left for the loader,
    which reports them properly (so a bad file fails in exactly one place with one message)."""
    if _is_samples(audio):
        n = audio.shape[0] if audio.ndim >= 1 else 0
        return n / float(sample_rate or SAMPLE_RATE)
    try:
        if isinstance(audio, (str, os.PathLike)):
            if not os.path.isfile(audio):
                return None
            info = sf.info(os.fspath(audio))
            return info.frames / info.samplerate if info.samplerate > 0 else None
        if hasattr(audio, "read") and hasattr(audio, "seek"):
            pos = audio.tell()
            try:
                with sf.SoundFile(audio) as f:
                    return f.frames / f.samplerate if f.samplerate > 0 else None
            finally:
                audio.seek(pos)
    except Exception:  # unreadable: load_audio will raise the user-facing AudioError
        return None
    return None


def _as_file(audio: Any) -> Any:
    """Raw encoded bytes become a named in-memory file; everything else passes through."""
    if isinstance(audio, (bytes, bytearray)):
        bio = io.BytesIO(bytes(audio))
        bio.name = "<bytes>"  # type: ignore[attr-defined]  # used in error messages
        return bio
    return audio


def _check_sample_rate(audio: Any, sample_rate: Optional[int]) -> None:
    if sample_rate is not None and not _is_samples(audio):
        raise ValueError("sample_rate is only for arrays of samples; files carry their own rate")


# --------------------------------------------------------------------------------------------------
# the model


class ASRModel:
    """A loaded model with its tokenizer: file transcription (any length) and streaming.

    Attributes ``long_audio_seconds``, ``block_seconds`` and ``pause_seconds`` are the defaults
    for the per-call arguments of the same names.
    """

    sample_rate = SAMPLE_RATE

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer: Any,
        device: Union[str, torch.device] = "cpu",
        *,
        long_audio_seconds: float = DEFAULT_LONG_AUDIO_SECONDS,
        block_seconds: float = DEFAULT_BLOCK_SECONDS,
        pause_seconds: float = DEFAULT_PAUSE_SECONDS,
        lexicon: Any = None,
        lexicon_optional: bool = False,
        encoder: Any = None,
    ) -> None:
        self.device = torch.device(device)
        self.lexicon = lexicon  # asr.decode.lexicon.LexiconDecoder: final words from the LM search
        # True for the model's own LM, chosen by default: a call asking for a beam or hotwords decodes
        # without it rather than failing (an LM the caller passed makes such calls an error).
        self.lexicon_optional = bool(lexicon_optional)
        self.model = model.to(self.device).eval()
        if encoder is None:
            from asr.infer import InferenceEncoder, backend_for

            encoder = InferenceEncoder(self.model, backend_for(self.model))
        #: the inference engine (:class:`asr.infer.InferenceEncoder`) that runs ``model``
        self.encoder = encoder
        self.tokenizer = tokenizer
        self.long_audio_seconds = float(long_audio_seconds)
        self.block_seconds = float(block_seconds)
        self.pause_seconds = float(pause_seconds)

    def __repr__(self) -> str:
        cfg = getattr(self.model, "config", None)
        size = f"d_model={cfg.d_model}, n_layers={cfg.n_layers}, " if cfg is not None else ""
        return f"ASRModel({size}vocab_size={self.tokenizer.vocab_size}, device={self.device})"

    # ---------------------------------------------------------------- single input
    def transcribe(
        self,
        audio: AudioInput,
        sample_rate: Optional[int] = None,
        *,
        options: Optional[TranscribeOptions] = None,
        progress: Optional[ProgressCallback] = None,
        **kwargs: Any,
    ) -> Transcript:
        """Transcribe one input: text, words with times and confidence, pause-split segments.

        ``audio``: a path, a binary file object (seekable), encoded bytes, or samples as a numpy
        array / tensor shaped ``[N]`` or ``[N, channels]`` (float in [-1, 1], or int16/int32 PCM)
        at ``sample_rate`` (default 16000). Any format soundfile reads, any rate and channel count.
        ``options`` and keyword arguments (``beam_size``, ``hotwords``, ``long_audio_seconds``,
        ``block_seconds``, ``pause_seconds``): see :class:`TranscribeOptions`.
        ``progress`` is called with seconds of audio done, as they are done.

        Raises :class:`asr.audio.AudioError` (one line naming the input) for missing, unreadable,
        empty, truncated or non-finite audio. Audio shorter than one 25 ms frame gives an empty
        transcript.
        """
        _check_sample_rate(audio, sample_rate)
        opts = self._plan(options, kwargs)
        audio = _as_file(audio)
        seconds = probe_seconds(audio, sample_rate)
        if seconds is not None and seconds > opts.long_audio_seconds:
            blocks = self._blocks(audio, sample_rate, opts.block_seconds)
            return self._transcribe_blocks(blocks, _source_name(audio), opts, progress)
        wave = self._load(audio, sample_rate)
        result = self._transcribe_batch_waves([wave], [_source_name(audio)], opts)[0]
        if progress is not None:
            progress(result.duration)
        return result

    # ---------------------------------------------------------------- many inputs
    def transcribe_batch(
        self,
        inputs: Iterable[AudioInput],
        batch_size: int = 8,
        sample_rate: Optional[int] = None,
        *,
        return_exceptions: bool = False,
        **kwargs: Any,
    ) -> list[Union[Transcript, AudioError]]:
        """Transcribe many inputs; results in input order.

        Short inputs are sorted by length and run as padded parallel batches of up to
        ``batch_size`` (and at most MAX_BATCH_SECONDS of padded audio); long ones one at a time
        through the block path. With ``return_exceptions=True`` a bad input's AudioError takes its
        place in the list instead of being raised (the other inputs are still transcribed).
        Other keyword arguments (``options``, ``progress``, the fields of :class:`TranscribeOptions`)
        as for :meth:`iter_transcribe`.
        """
        inputs = list(inputs)
        out: list[Any] = [None] * len(inputs)
        for i, res in self.iter_transcribe(inputs, batch_size, sample_rate, **kwargs):
            if isinstance(res, AudioError) and not return_exceptions:
                raise res
            out[i] = res
        return out

    def iter_transcribe(
        self,
        inputs: Sequence[AudioInput],
        batch_size: int = 8,
        sample_rate: Optional[int] = None,
        *,
        options: Optional[TranscribeOptions] = None,
        progress: Optional[ProgressCallback] = None,
        durations: Optional[Sequence[Optional[float]]] = None,
        **kwargs: Any,
    ) -> Iterator[tuple[int, Union[Transcript, AudioError]]]:
        """Like :meth:`transcribe_batch` but yields ``(index, Transcript or AudioError)`` as each
        input finishes (the CLI writes outputs and advances its progress bar from this).

        Only one batch of decoded audio is in memory at a time: inputs are sorted by their header
        durations and loaded batch by batch. ``durations`` (seconds, None where unknown) skips
        reading the headers again when the caller already did (see :func:`probe_seconds`).
        ``options`` and the other keyword arguments: see :class:`TranscribeOptions`.
        """
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        opts = self._plan(options, kwargs)
        if sample_rate is not None and not all(_is_samples(a) for a in inputs):
            raise ValueError("sample_rate is only for arrays of samples; files carry their own rate")
        items = [_as_file(a) for a in inputs]
        short: list[tuple[float, int]] = []
        if durations is not None and len(durations) != len(items):
            raise ValueError(f"{len(durations)} durations for {len(items)} inputs")
        for i, a in enumerate(items):
            seconds = probe_seconds(a, sample_rate) if durations is None else durations[i]
            if seconds is not None and seconds > opts.long_audio_seconds:
                try:
                    blocks = self._blocks(a, sample_rate, opts.block_seconds)
                    yield i, self._transcribe_blocks(blocks, _source_name(a), opts, progress)
                except AudioError as err:
                    yield i, err
            else:
                # unknown length (unreadable header): sorts first, fails alone when loaded
                short.append((-1.0 if seconds is None else seconds, i))
        short.sort()
        start = 0
        while start < len(short):
            # grow the batch while the padded length (longest x count) stays within the cap
            end = start + 1
            while end < len(short) and end - start < batch_size and \
                    short[end][0] * (end - start + 1) <= MAX_BATCH_SECONDS:
                end += 1
            waves, names, idx = [], [], []
            for _, i in short[start:end]:
                try:
                    waves.append(self._load(items[i], sample_rate))
                except AudioError as err:
                    yield i, err
                    continue
                names.append(_source_name(items[i]))
                idx.append(i)
            if waves:
                for i, res in zip(idx, self._transcribe_batch_waves(waves, names, opts)):
                    if progress is not None:
                        progress(res.duration)
                    yield i, res
            start = end

    # ---------------------------------------------------------------- streaming
    def stream(self, **kwargs: Any) -> Any:
        """A live-audio recognizer sharing this model: ``asr.stream.Recognizer(model, tokenizer,
        device=..., **kwargs)`` (see that class for endpointing and partial results)."""
        from asr.stream.recognizer import Recognizer  # lazy: streaming pulls in its own extras

        kwargs.setdefault("device", self.device)
        kwargs.setdefault("lexicon", self._lexicon_for(int(kwargs.get("beam_size", 1) or 1), kwargs.get("hotwords")))
        return Recognizer(self.encoder, self.tokenizer, **kwargs)

    # ---------------------------------------------------------------- internals
    def _lexicon_for(self, beam_size: int, hotwords: Optional[Mapping[str, float]]) -> Any:
        """The LM search a call decodes with: this model's, except that the default LM gives way
        to a beam search or hotwords asked for (an LM the caller chose stays, and the decoder then
        refuses the combination)."""
        if self.lexicon_optional and (beam_size > 1 or hotwords):
            return None
        return self.lexicon

    def _plan(self, options: Optional[TranscribeOptions], overrides: Mapping[str, Any]) -> _Plan:
        """``options`` with ``overrides`` (keyword arguments of a call) applied, resolved against
        this model's defaults and language model; a ``TypeError`` names an unknown keyword."""
        opts = replace(options or TranscribeOptions(), **overrides)
        beam_size, hotwords = int(opts.beam_size), opts.hotwords
        if beam_size < 1:
            raise ValueError(f"beam_size must be >= 1, got {beam_size}")
        lexicon = self._lexicon_for(beam_size, hotwords)
        if lexicon is not None and (beam_size > 1 or hotwords):
            raise ValueError("this model decodes with a language model (load_model(lm=...)), which runs its own "
                             "beam search: leave out beam_size and hotwords")
        hot: Optional[Hotwords] = None
        hot_map = dict(hotwords) if hotwords else None
        if hot_map:
            hot = Hotwords.from_words(hot_map, self.tokenizer)
            if beam_size == 1:
                beam_size = 8  # boosting works by re-ranking beams; greedy has none to re-rank
        return _Plan(
            beam_size=beam_size, hotwords=hot, hotwords_map=hot_map, lexicon=lexicon,
            long_audio_seconds=float(_default(opts.long_audio_seconds, self.long_audio_seconds)),
            block_seconds=float(_default(opts.block_seconds, self.block_seconds)),
            pause_seconds=float(_default(opts.pause_seconds, self.pause_seconds)),
        )

    def _decoder(self, opts: _Plan) -> Any:
        return hypothesis_decoder(opts.beam_size, opts.hotwords, self.tokenizer, lexicon=opts.lexicon)

    def _load(self, audio: Any, sample_rate: Optional[int]) -> Tensor:
        """16 kHz mono float32 samples of a file or an array (AudioError on bad input)."""
        if _is_samples(audio):
            return prepare_waveform(audio, sample_rate or SAMPLE_RATE, name="<array>")
        return load_audio(audio)

    def _blocks(self, audio: Any, sample_rate: Optional[int], block_seconds: float) -> Iterator[Tensor]:
        """16 kHz blocks of a long input: read incrementally from a file, or sliced from an array."""
        if not _is_samples(audio):
            return iter_audio_blocks(audio, block_seconds=block_seconds)
        # samples already in memory: resample once (exact), then slice
        wave = prepare_waveform(audio, sample_rate or SAMPLE_RATE, name="<array>")
        n = max(1, int(block_seconds * SAMPLE_RATE))
        return (wave[i : i + n] for i in range(0, wave.numel(), n))

    @torch.inference_mode()
    def _transcribe_batch_waves(self, waves: list[Tensor], names: list[Optional[str]], opts: _Plan) -> list[Transcript]:
        """One-pass path: fbank per input, padded batch through the parallel model, decode each."""
        feats = [compute_fbank(w) for w in waves]
        lengths = torch.tensor([f.shape[0] for f in feats])
        results: list[Transcript] = []
        logits = out_lengths = None
        if int(lengths.max()) > 0:
            batch = torch.nn.utils.rnn.pad_sequence(feats, batch_first=True).to(self.device)
            logits, out_lengths = self.encoder(batch, lengths.to(self.device))
            out_lengths = out_lengths.cpu()
        for b, (wave, name) in enumerate(zip(waves, names)):
            dec = self._decoder(opts)
            n_out = 0 if logits is None or int(lengths[b]) == 0 else int(out_lengths[b])  # type: ignore[index]
            if n_out:
                dec.accept(logits[b, :n_out].float().log_softmax(dim=-1))  # type: ignore[index]
            results.append(self._finish(dec, wave.numel(), name, opts))
        return results

    @torch.inference_mode()
    def _transcribe_blocks(
        self, blocks: Iterable[Tensor], name: Optional[str], opts: _Plan, progress: Optional[ProgressCallback]
    ) -> Transcript:
        """Block path: the streaming recognizer (StreamingFbank -> model.step with the state
        carried -> incremental greedy / prefix beam decoder -> spike words) fed block by block.

        Endpointing is off: the whole file is one decoding pass, exactly like the one-pass path
        (with endpoints a beam search would restart at each one, and the 20 s rule may cut inside a
        word), so the words equal the one-pass words; segments are then cut at pauses here, the
        same way for both paths.
        """
        from asr.stream.endpoint import EndpointConfig
        from asr.stream.recognizer import Recognizer

        rec = Recognizer(self.encoder, self.tokenizer, endpoint=EndpointConfig.disabled(), beam_size=opts.beam_size,
                         hotwords=opts.hotwords_map, device=self.device, lexicon=opts.lexicon)
        for block in blocks:
            rec.accept_waveform(block, SAMPLE_RATE)
            if progress is not None:
                progress(block.numel() / SAMPLE_RATE)
        streamed = rec.finalize()
        return _transcript_from_words(streamed.words, streamed.duration, name, opts.pause_seconds)

    def _finish(self, dec: HypothesisDecoder, num_samples: int, name: Optional[str], opts: _Plan) -> Transcript:
        return _build_transcript(dec, self.tokenizer, num_samples / SAMPLE_RATE, name, opts.pause_seconds)


def _default(value: Optional[float], default: float) -> float:
    return default if value is None else value
