"""File transcription on real audio: the Python API (one pass, batches, long audio in blocks) and
``asr-transcribe`` (formats, folders, stdin, bad inputs and exit codes).

Uses the session's ``overfit_checkpoint`` (a tiny model that transcribes the three files in
tests/data exactly), so texts can be asserted, not just shapes. Format variants and bad inputs are
generated into tmp_path at test time.
"""
from __future__ import annotations

import io
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from conftest import read_test_manifest
from test_formats import check_all_formats, check_cues, check_json, parse_srt, parse_tsv, parse_vtt

import asr
from asr.api import ASRModel, load_model
from asr.audio import AudioError, load_audio, resample
from asr.cli import main as asr_main
from asr.cli import transcribe as cli
from asr.model_file import CheckpointError

DATA = Path(__file__).parent / "data"
GOFORWARD = DATA / "audio" / "pocketsphinx_goforward.flac"  # "go forward ten meters", 2.79 s
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def model(overfit_checkpoint) -> ASRModel:
    return load_model(overfit_checkpoint, backend="float")  # exact float32: the paths agree to float rounding


def word_tuples(t):
    return [(w.word, w.start, w.end) for w in t.words]


def assert_words_inside_and_ordered(t, duration: float) -> None:
    prev_end = 0.0
    for w in t.words:
        assert 0.0 <= w.start <= w.end <= duration + 1e-9, (w, duration)
        assert w.start >= prev_end - 1e-9, f"{w} starts before the previous word ends ({prev_end})"
        assert w.confidence is not None and 0.0 < w.confidence <= 1.0
        prev_end = w.end
    for seg in t.segments:
        assert seg.start == seg.words[0].start and seg.end == seg.words[-1].end
        assert seg.text == " ".join(w.word for w in seg.words)


# ------------------------------------------------------------------------------------------- API


def test_transcribes_each_test_file_with_words_inside_the_audio(model):
    for entry in read_test_manifest():
        t = model.transcribe(entry["audio"])
        assert t.text == entry["text"]
        assert t.source == entry["audio"]
        assert t.duration == pytest.approx(sf.info(entry["audio"]).duration, abs=1e-6)
        assert [w.word for w in t.words] == entry["text"].split()
        assert_words_inside_and_ordered(t, t.duration)


def test_word_times_and_confidences_are_those_of_the_ctc_spikes(model):
    # Cross-check against asr.decode directly: greedy spikes -> words_from_tokens with the full
    # log-prob matrix (whose confidence definition transcribe reproduces without keeping it).
    from asr.decode.align import words_from_tokens
    from asr.decode.greedy import ctc_greedy
    from asr.features import compute_fbank

    feats = compute_fbank(load_audio(GOFORWARD))[None]
    with torch.no_grad():
        logits, lengths = model.encoder(feats, torch.tensor([feats.shape[1]]))  # the engine transcribe runs
    lp = logits[0, : int(lengths[0])].log_softmax(-1)
    tokens, frames = ctc_greedy(lp)
    expected = words_from_tokens(tokens, frames, model.tokenizer, log_probs=lp)
    got = model.transcribe(GOFORWARD).words
    assert [(w.word, w.start, w.end) for w in got] == [(w.word, w.start, min(w.end, 2.78625)) for w in expected]
    assert [w.confidence for w in got] == pytest.approx([w.confidence for w in expected], abs=1e-6)


def test_load_model_accepts_a_training_folder_and_explains_a_missing_bundled_model(overfit_checkpoint, tmp_path,
                                                                                   monkeypatch):
    run = tmp_path / "run" / "checkpoints"
    run.mkdir(parents=True)
    shutil.copy(overfit_checkpoint, run / "ckpt-step000000010.pt")
    m = asr.load_model(tmp_path / "run")
    assert m.transcribe(GOFORWARD).text == "go forward ten meters"
    # an install without asr/pretrained/model.pt (e.g. a trimmed package) says what to do instead
    monkeypatch.setattr(asr.api, "BUNDLED_MODEL", tmp_path / "pretrained" / "model.pt")
    with pytest.raises(CheckpointError, match="no bundled model.*--model PATH"):
        asr.load_model()
    with pytest.raises(CheckpointError, match="not found"):
        asr.load_model(tmp_path / "nope.pt")


@pytest.fixture(scope="module")
def variants(tmp_path_factory) -> dict[str, Path]:
    """One recording in several containers, codecs, rates and channel counts."""
    d = tmp_path_factory.mktemp("variants")
    x = load_audio(GOFORWARD).numpy()
    out = {"flac": GOFORWARD}
    sf.write(d / "g.wav", x, 16000, subtype="PCM_16")
    out["wav"] = d / "g.wav"
    sf.write(d / "g.ogg", x, 16000, format="OGG", subtype="VORBIS")
    out["ogg"] = d / "g.ogg"
    if "MP3" in sf.available_formats():
        try:
            sf.write(d / "g.mp3", x, 16000, format="MP3", subtype="MPEG_LAYER_III")
            out["mp3"] = d / "g.mp3"
        except (sf.LibsndfileError, TypeError, ValueError):  # listed but built without the encoder
            pass
    x44 = resample(torch.from_numpy(x), 16000, 44100).numpy()
    sf.write(d / "g44.wav", np.stack([x44, x44], axis=1), 44100, subtype="PCM_16")
    out["44k_stereo"] = d / "g44.wav"
    x8 = resample(torch.from_numpy(x), 16000, 8000).numpy()
    sf.write(d / "g8.wav", x8, 8000, subtype="PCM_16")
    out["8k"] = d / "g8.wav"
    return out


def test_same_text_from_every_format_variant(model, variants):
    results = {k: model.transcribe(p) for k, p in variants.items()}
    for k, t in results.items():
        assert t.duration == pytest.approx(sf.info(variants[k]).duration, abs=1e-3), k
        assert_words_inside_and_ordered(t, t.duration)
    # Lossless, lossy (OGG/Vorbis, MP3) and 44.1 kHz stereo versions must all give the text.
    # The 8 kHz version is left out of this equality on purpose: the overfit model memorised these
    # exact samples, 4-8 kHz band included, and has never seen band-limited audio, so it garbles
    # it ("g ovoerennrneners"); that is the tiny model's limit, not the pipeline's. What the
    # pipeline must guarantee for 8 kHz is checked instead: reading the file gives exactly what the
    # same band-limited signal gives as an array, at 8 kHz or already resampled to 16 kHz.
    # MP3 is held to within one letter: the overfit model knows these exact samples, and how much
    # the MP3 round trip changes them depends on the LAME build that the soundfile wheel carries
    # (soundfile 0.14's gives "go forwrd ten meters").
    must_agree = {k: t.text for k, t in results.items() if k not in ("8k", "mp3")}
    assert set(must_agree) >= {"flac", "wav", "ogg", "44k_stereo"}
    assert set(must_agree.values()) == {"go forward ten meters"}, must_agree
    if "mp3" in results:
        import jiwer

        assert jiwer.cer("go forward ten meters", results["mp3"].text) <= 1 / 21, results["mp3"].text
    x8, rate = sf.read(variants["8k"], dtype="float32")
    assert rate == 8000
    from_array = model.transcribe(x8, sample_rate=8000)
    from_16k = model.transcribe(resample(torch.from_numpy(x8), 8000, 16000))
    assert word_tuples(from_array) == word_tuples(results["8k"]) == word_tuples(from_16k)


def test_arrays_int16_and_file_objects(model, variants):
    ref = model.transcribe(GOFORWARD)
    x, rate = sf.read(variants["44k_stereo"], dtype="int16")  # [N, 2] int16 at 44.1 kHz
    assert word_tuples(model.transcribe(x, sample_rate=rate)) == word_tuples(model.transcribe(variants["44k_stereo"]))
    assert model.transcribe(load_audio(GOFORWARD)).text == ref.text  # 16 kHz tensor, default rate
    with open(GOFORWARD, "rb") as f:
        t = model.transcribe(f)
    assert word_tuples(t) == word_tuples(ref)
    assert word_tuples(model.transcribe(GOFORWARD.read_bytes())) == word_tuples(ref)
    with pytest.raises(ValueError, match="sample_rate is only for arrays"):
        model.transcribe(GOFORWARD, sample_rate=16000)
    short = model.transcribe(np.zeros(200, np.float32))  # < one 25 ms frame: nothing to hear
    assert short.text == "" and short.segments == [] and short.duration == 200 / 16000


def test_bad_inputs_raise_one_line_audio_errors(model, tmp_path):
    (tmp_path / "empty.wav").write_bytes(b"")
    (tmp_path / "notes.wav").write_text("not audio\n")
    y = load_audio(GOFORWARD).numpy().copy()
    y[5000] = np.nan
    sf.write(tmp_path / "nan.wav", y, 16000, subtype="FLOAT")
    cases = {"missing.wav": "file not found", "empty.wav": "empty file", "notes.wav": "not a readable audio file",
             "nan.wav": "non-finite"}
    for name, reason in cases.items():
        with pytest.raises(AudioError) as info:
            model.transcribe(tmp_path / name)
        msg = str(info.value)
        assert str(tmp_path / name) in msg and reason in msg and "\n" not in msg
    with pytest.raises(AudioError, match="non-finite"):  # NaN found while reading blocks
        model.transcribe(tmp_path / "nan.wav", long_audio_seconds=0.5, block_seconds=0.2)
    with pytest.raises(AudioError, match="<array>: contains 1 non-finite"):
        model.transcribe(y)


def test_batch_equals_one_by_one_in_input_order(model, tmp_path):
    files = [e["audio"] for e in read_test_manifest()]
    inputs = files + [str(tmp_path / "missing.wav")] + files[::-1]
    results = model.transcribe_batch(inputs, batch_size=2, return_exceptions=True)
    singles = {f: model.transcribe(f) for f in files}
    for inp, res in zip(inputs, results):
        if inp.endswith("missing.wav"):
            assert isinstance(res, AudioError) and "file not found" in str(res)
            continue
        assert res.source == inp
        assert word_tuples(res) == word_tuples(singles[inp])
        for a, b in zip(res.words, singles[inp].words):
            assert a.confidence == pytest.approx(b.confidence, abs=1e-4)
    with pytest.raises(AudioError, match="missing.wav: file not found"):
        model.transcribe_batch(inputs, batch_size=4)


def test_beam_search_and_hotwords(model):
    greedy = model.transcribe(GOFORWARD)
    beam = model.transcribe(GOFORWARD, beam_size=4)
    assert beam.text == greedy.text == "go forward ten meters"
    assert_words_inside_and_ordered(beam, beam.duration)
    hot = model.transcribe(GOFORWARD, hotwords={"forward": 2.0})  # implies beam search
    assert hot.text == "go forward ten meters"


def test_options_object_and_keywords_agree(model):
    opts = asr.TranscribeOptions(beam_size=4, pause_seconds=0.05)
    by_object = model.transcribe(GOFORWARD, options=opts)
    assert by_object.to_dict() == model.transcribe(GOFORWARD, beam_size=4, pause_seconds=0.05).to_dict()
    assert len(by_object.segments) > 1  # the tiny pause took effect: every gap cuts a segment
    # keyword arguments override the object's fields, in every entry point
    default = model.transcribe(GOFORWARD).to_dict()
    assert model.transcribe(GOFORWARD, options=opts, pause_seconds=None, beam_size=1).to_dict() == default
    assert model.transcribe_batch([GOFORWARD], options=opts, pause_seconds=None)[0].to_dict() == \
        model.transcribe(GOFORWARD, beam_size=4).to_dict()
    with pytest.raises(TypeError, match="beams"):
        model.transcribe(GOFORWARD, beams=4)


def _long_audio(seconds: float, seed: int) -> np.ndarray:
    """Test utterances separated by 0.9-2 s of silence with faint noise, repeated to ``seconds``."""
    rng = np.random.default_rng(seed)
    utts = [load_audio(e["audio"]).numpy() for e in read_test_manifest()]
    parts, total, i = [], 0, 0
    while total < seconds * 16000:
        gap = np.zeros(int(16000 * rng.uniform(0.9, 2.0)), np.float32)
        parts += [utts[i % len(utts)], gap]
        total += len(parts[-2]) + len(gap)
        i += 1
    x = np.concatenate(parts)[: int(seconds * 16000)]
    return x + rng.normal(0, 1e-3, x.shape).astype(np.float32)


def _assert_same_transcript(a, b) -> None:
    assert a.text == b.text
    assert word_tuples(a) == word_tuples(b)  # same tokens at the same frames: exact times
    assert [(s.text, s.start, s.end) for s in a.segments] == [(s.text, s.start, s.end) for s in b.segments]
    assert a.duration == b.duration
    for x, y in zip(a.words, b.words):
        assert x.confidence == pytest.approx(y.confidence, abs=1e-4)


def test_long_audio_in_blocks_equals_one_pass(model, tmp_path):
    # 90 s of real speech and pauses: over the 60 s default threshold, so transcribe() reads it in
    # blocks (7.3 s, to cross many block boundaries at odd places) through the recurrent path.
    # (Minutes more only cost test time: the state is carried the same way across every block.)
    seconds = 90.0
    path = tmp_path / "long.wav"
    sf.write(path, _long_audio(seconds, seed=0), 16000, subtype="PCM_16")
    calls: list[float] = []
    blocks = model.transcribe(path, block_seconds=7.3, progress=calls.append)
    assert len(calls) >= seconds / 7.3, "the long input must have been read block by block"
    assert sum(calls) == pytest.approx(seconds, abs=1e-3)
    one_pass = model.transcribe(path, long_audio_seconds=math.inf)
    _assert_same_transcript(blocks, one_pass)
    assert len(blocks.words) > 30 and len(blocks.segments) > 5, "pauses must split segments"
    assert_words_inside_and_ordered(blocks, seconds)
    for s1, s2 in zip(blocks.segments, blocks.segments[1:]):
        assert s2.start - s1.end >= model.pause_seconds
    for s in blocks.segments:
        assert all(b.start - a.end < model.pause_seconds for a, b in zip(s.words, s.words[1:]))
    check_all_formats(blocks)


def test_long_audio_resampled_stereo_with_beam_search_equals_one_pass(model, tmp_path):
    # 44.1 kHz stereo exercises the block-wise resampler; beam search the streaming beam decoder.
    x = resample(torch.from_numpy(_long_audio(20.0, seed=1)), 16000, 44100).numpy()
    path = tmp_path / "long44.flac"
    sf.write(path, np.stack([x, 0.5 * x], axis=1), 44100, subtype="PCM_16")
    blocks = model.transcribe(path, beam_size=3, long_audio_seconds=10.0, block_seconds=4.1)
    one_pass = model.transcribe(path, beam_size=3)
    _assert_same_transcript(blocks, one_pass)
    assert len(blocks.words) > 5
    # an array longer than the threshold goes through the same block path
    arr = model.transcribe(load_audio(path), beam_size=3, long_audio_seconds=10.0, block_seconds=4.1)
    _assert_same_transcript(arr, one_pass)


def test_stream_returns_the_recognizer(model):
    recognizer = pytest.importorskip("asr.stream.recognizer")
    r = model.stream()
    assert isinstance(r, recognizer.Recognizer)


@pytest.mark.skipif(os.environ.get("ASR_TEST_COMPILE") == "0" or not (shutil.which("c++") or shutil.which("g++")),
                    reason="compiles C++ with torch.compile's inductor (ASR_TEST_COMPILE=0 skips)")
def test_load_model_compile_streams_160ms_chunks_through_the_compiled_step(overfit_checkpoint, model, monkeypatch):
    from asr.infer.compiled import CompiledSteps

    calls = []
    original = CompiledSteps.__call__
    monkeypatch.setattr(CompiledSteps, "__call__",
                        lambda obj, x, *rest: calls.append(x.shape[1] // 4) or original(obj, x, *rest))
    compiled = load_model(overfit_checkpoint, compile=True)
    assert compiled.encoder.backend == "compiled"
    audio = load_audio(GOFORWARD)
    stream = compiled.stream()
    for start in range(0, len(audio), 2560):  # 160 ms chunks: 4 encoder frames each
        stream.accept_waveform(audio[start : start + 2560])
    assert stream.finalize().text == model.transcribe(GOFORWARD).text == "go forward ten meters"
    assert len(calls) >= len(audio) // 2560 - 2 and 4 in calls
    with pytest.raises(ValueError, match="CPU only"):
        load_model(overfit_checkpoint, device="meta", compile=True)


# ------------------------------------------------------------------------------------------- CLI


def run_cli(capsys, *args: str) -> tuple[int, str, list[str]]:
    code = cli.main([*map(str, args), "--no-progress"])
    out, err = capsys.readouterr()
    return code, out, err.splitlines()


def test_cli_one_file_to_stdout_in_every_format(capsys, overfit_checkpoint):
    code, out, err = run_cli(capsys, GOFORWARD, "--model", overfit_checkpoint)
    assert (code, out, err) == (0, "go forward ten meters\n", [])
    dur = sf.info(GOFORWARD).duration
    for fmt in ("json", "srt", "vtt", "tsv"):
        code, out, err = run_cli(capsys, GOFORWARD, "--model", overfit_checkpoint, "--format", fmt)
        assert code == 0 and err == []
        if fmt == "json":
            d = json.loads(out)
            assert d["text"] == "go forward ten meters" and d["source"] == str(GOFORWARD)
            assert [w["word"] for w in d["words"]] == ["go", "forward", "ten", "meters"]
        elif fmt == "srt":
            cues = parse_srt(out)
            check_cues(cues, dur)
            assert " ".join(c[2] for c in cues) == "go forward ten meters"
        elif fmt == "vtt":
            check_cues(parse_vtt(out), dur)
        else:
            assert [r[2] for r in parse_tsv(out)] == ["go forward ten meters"]


def test_cli_folder_to_output_dir_every_format_parses(capsys, overfit_checkpoint, tmp_path, variants):
    src = tmp_path / "in"
    (src / "sub").mkdir(parents=True)
    for e in read_test_manifest():
        shutil.copy(e["audio"], src / Path(e["audio"]).name)
    shutil.copy(variants["ogg"], src / "sub" / "g.ogg")
    (src / "README.txt").write_text("not audio, and not an audio extension: skipped")
    # (every format on one file: test_cli_one_file_to_stdout_in_every_format)
    for fmt in ("txt", "json", "srt"):
        out = tmp_path / f"out_{fmt}"
        code, stdout, err = run_cli(capsys, src, "--model", overfit_checkpoint, "-f", fmt, "-o", out,
                                    "--batch-size", "2")
        assert code == 0 and stdout == "" and err == []
        written = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
        assert written == sorted([f"fsdd_7_jackson_00.{fmt}", f"pocketsphinx_cards_001.{fmt}",
                                  f"pocketsphinx_goforward.{fmt}", f"sub/g.{fmt}"])
        for p in out.rglob("*.json"):
            check_json(p.read_text(), asr.Transcript(json.loads(p.read_text())["text"]))
        for p in out.rglob("*.srt"):
            check_cues(parse_srt(p.read_text()), 3.0)
    assert (tmp_path / "out_txt" / "sub" / "g.txt").read_text() == "go forward ten meters\n"


@pytest.fixture
def bad_inputs(tmp_path) -> dict[str, Path]:
    """Every kind of bad input, keyed by what must appear in its error line."""
    d = tmp_path / "bad"
    d.mkdir()
    x = load_audio(GOFORWARD).numpy()
    flac = GOFORWARD.read_bytes()
    (d / "cut.flac").write_bytes(flac[: len(flac) // 2])
    (d / "empty.wav").write_bytes(b"")
    (d / "notes.wav").write_text("this is not audio\n")
    y = x.copy()
    y[1000] = np.nan
    sf.write(d / "nan.wav", y, 16000, subtype="FLOAT")
    sf.write(d / "zero.wav", np.zeros(0, np.float32), 16000, subtype="PCM_16")
    (tmp_path / "no_audio").mkdir()
    (tmp_path / "no_audio" / "notes.txt").write_text("hello")
    return {
        "file not found": d / "missing.wav",
        "folder contains no audio files": tmp_path / "no_audio",
        "empty file (0 bytes)": d / "empty.wav",
        "cannot decode audio": d / "cut.flac",
        "not a readable audio file": d / "notes.wav",
        "non-finite samples": d / "nan.wav",
        "contains no audio samples": d / "zero.wav",
    }


def test_cli_bad_inputs_one_line_each_others_still_done(capsys, overfit_checkpoint, tmp_path, bad_inputs):
    out = tmp_path / "out"
    args = [GOFORWARD, *bad_inputs.values(), DATA / "audio" / "fsdd_7_jackson_00.flac"]
    code, stdout, err = run_cli(capsys, *args, "--model", overfit_checkpoint, "-o", out)
    assert code == 1
    assert stdout == ""
    assert not any("Traceback" in line for line in err)
    assert len(err) == len(bad_inputs), err  # exactly one line per bad input, nothing else
    for reason, path in bad_inputs.items():
        lines = [line for line in err if str(path) in line]
        assert len(lines) == 1, (path, err)
        assert lines[0].startswith("asr-transcribe: error: ") and reason in lines[0], lines[0]
    assert (out / "pocketsphinx_goforward.txt").read_text() == "go forward ten meters\n"
    assert (out / "fsdd_7_jackson_00.txt").read_text() == "seven\n"


def test_cli_single_bad_input_and_debug_traceback(capsys, overfit_checkpoint, bad_inputs):
    code, out, err = run_cli(capsys, bad_inputs["non-finite samples"], "--model", overfit_checkpoint)
    assert code == 1 and out == "" and len(err) == 1 and "non-finite samples" in err[0]
    code, out, err = run_cli(capsys, bad_inputs["non-finite samples"], "--model", overfit_checkpoint, "--debug")
    assert code == 1 and any("Traceback" in line for line in err) and "non-finite samples" in err[-1]


def test_cli_truncated_wav_is_a_one_line_warning_and_transcribed(capsys, overfit_checkpoint, tmp_path):
    # A WAV whose data is cut (partial download): its intact prefix is used, with a warning.
    full = tmp_path / "full.wav"
    sf.write(full, load_audio(GOFORWARD).numpy(), 16000, subtype="PCM_16")
    data = full.read_bytes()
    cut = tmp_path / "cut.wav"
    cut.write_bytes(data[: int(len(data) * 0.9)])
    code, out, err = run_cli(capsys, cut, "--model", overfit_checkpoint)
    assert code == 0 and out.strip()
    assert len(err) == 1 and err[0].startswith("asr-transcribe: warning: ") and "truncated" in err[0]


def test_cli_usage_errors_exit_2(capsys, overfit_checkpoint, tmp_path):
    for args in ([], [str(GOFORWARD), "--beam-size", "0"], [str(GOFORWARD), "--format", "doc"],
                 ["-", "-"], [str(GOFORWARD), "--batch-size", "0"], [str(GOFORWARD), "--hotword", "x:big"]):
        with pytest.raises(SystemExit) as info:
            cli.main(args)
        assert info.value.code == 2, args
        assert "Traceback" not in capsys.readouterr().err
    code, out, err = run_cli(capsys, GOFORWARD, "--model", tmp_path / "nope.pt")
    assert code == 2 and len(err) == 1 and "checkpoint not found" in err[0]
    code, out, err = run_cli(capsys, GOFORWARD, "--model", GOFORWARD)  # not a checkpoint
    assert code == 2 and len(err) == 1 and "cannot read checkpoint" in err[0]


def test_cli_asr_transcribe_subcommand_and_version(capsys, overfit_checkpoint):
    assert asr_main.main(["transcribe", str(GOFORWARD), "--model", str(overfit_checkpoint), "--no-progress"]) == 0
    assert capsys.readouterr().out == "go forward ten meters\n"
    with pytest.raises(SystemExit) as info:
        asr_main.main(["--version"])
    assert info.value.code == 0 and capsys.readouterr().out.strip() == f"rwkv-asr {asr.__version__}"


def test_cli_reads_stdin_in_a_real_process(overfit_checkpoint, tmp_path):
    # A real subprocess: stdin is a pipe (not seekable), stderr is not a TTY (one input: no bar).
    cmd = [sys.executable, "-m", "asr.cli.transcribe", "-", "--model", str(overfit_checkpoint), "-f", "json"]
    proc = subprocess.run(cmd, input=GOFORWARD.read_bytes(), capture_output=True, cwd=REPO, timeout=120)
    assert proc.returncode == 0, proc.stderr.decode()
    assert proc.stderr == b""
    d = json.loads(proc.stdout)
    assert d["source"] == "<stdin>" and d["text"] == "go forward ten meters"


def test_cli_empty_stdin(capsys, monkeypatch, overfit_checkpoint):
    class _Stdin:
        buffer = io.BytesIO(b"")

    monkeypatch.setattr(sys, "stdin", _Stdin())
    code, out, err = run_cli(capsys, "-", "--model", overfit_checkpoint)
    assert (code, out, err) == (1, "", ["asr-transcribe: error: <stdin>: empty input (0 bytes)"])
