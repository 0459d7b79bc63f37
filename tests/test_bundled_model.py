"""The bundled default model (asr/pretrained/model.pt, carrying its word LM) works out of the box, on
the CPU.

It must transcribe audio it never saw in training exactly: one synthetic sentence in a held-out
voice (from the synthetic test set), and the ten digits spoken by a held-out real speaker (FSDD's
nicolas, part of the real dev split). Every path a user can take gives the same words: the file API
with its default LM and without it, in float32 and int8, the streaming recognizer fed in random
pieces, and ``asr-transcribe`` with no ``--model``. The files are in tests/data/audio/heldout
(README.md there says where they come from). The README's main command (``asr-transcribe`` on
pocketsphinx's "go forward ten meters", a real recording the model never trained on) must print
exactly that.
"""
from __future__ import annotations

import importlib.util
import random
import subprocess
import sys
from pathlib import Path

import pytest

import asr
from asr.api import BUNDLED_MODEL, ASRModel
from asr.audio import load_audio
from asr.model_file import load_checkpoint, load_inference_parts
from asr.stream.endpoint import EndpointConfig
from asr.train.checkpoint import atomic_torch_save

HELDOUT = Path(__file__).parent / "data" / "audio" / "heldout"
SENTENCE = HELDOUT / "speechocean_090700006.opus"  # a non-native adult reader of the real dev split, never trained on
SENTENCE_TEXT = "he could not see himself"
DIGITS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
DIGIT_FILES = [HELDOUT / f"fsdd_{d}_nicolas_00.flac" for d in range(10)]
GOFORWARD = Path(__file__).parent / "data" / "audio" / "pocketsphinx_goforward.flac"  # the README's main command
needs_lm = pytest.mark.skipif(importlib.util.find_spec("flashlight") is None, reason="flashlight-text is not installed")


@pytest.fixture(scope="module")
def bundled() -> ASRModel:
    return asr.load_model()


@pytest.fixture(scope="module")
def greedy() -> ASRModel:
    return asr.load_model(lm=None)


def _bundled_copy(tmp_path: Path, lm) -> Path:
    """The bundled checkpoint with its carried LM replaced (None: removed)."""
    ckpt = load_checkpoint(BUNDLED_MODEL)
    ckpt.pop("lm_arpa_xz", None)
    ckpt.pop("lm", None)
    if lm is not None:
        ckpt["lm_arpa_xz"] = lm
    path = tmp_path / "model.pt"
    atomic_torch_save(ckpt, path)
    return path


def test_bundled_model_is_installed_and_small():
    assert BUNDLED_MODEL.is_file(), "asr/pretrained/model.pt is missing"
    # The budget of what the package ships: the model file with its LM, and its ONNX step graph
    shipped = [BUNDLED_MODEL, *BUNDLED_MODEL.parent.glob("*.onnx")]
    assert sum(p.stat().st_size for p in shipped) <= 48_000_000, [(p.name, p.stat().st_size) for p in shipped]
    assert load_inference_parts(BUNDLED_MODEL).lm, "the bundled model carries no language model"


@needs_lm
def test_bundled_model_decodes_with_its_lm_by_default(bundled, greedy, tmp_path):
    assert bundled.lexicon is not None and greedy.lexicon is None
    # the default LM is the one a checkpoint carries: without it, no LM
    assert asr.load_model(_bundled_copy(tmp_path, None)).lexicon is None


def test_without_flashlight_the_bundled_model_decodes_greedily(monkeypatch):
    """flashlight-text has no wheel for every Python (none for 3.13 in 0.0.7): there the bundled
    model still loads and decodes, greedily, instead of failing."""
    import asr.api

    monkeypatch.setattr(asr.api, "_flashlight_available", lambda: False)
    model = asr.load_model()
    assert model.lexicon is None
    assert model.transcribe(DIGIT_FILES[3]).text == "three"


@needs_lm
def test_a_default_lm_that_cannot_load_falls_back_to_greedy_with_one_warning(tmp_path, greedy):
    """The model's own LM was not the user's choice: if it cannot be read (damaged install, no room
    in the temp folder), transcription goes on greedily with a one-line warning instead of failing."""
    import torch

    damaged = _bundled_copy(tmp_path, torch.frombuffer(bytearray(b"not xz at all"), dtype=torch.uint8))
    with pytest.warns(UserWarning, match="language model could not be loaded .*not a readable xz file"):
        model = asr.load_model(damaged)
    assert model.lexicon is None
    assert model.transcribe(GOFORWARD).text == greedy.transcribe(GOFORWARD).text
    broken = tmp_path / "lm.arpa.xz"
    broken.write_bytes(b"not xz at all")
    with pytest.raises(ValueError, match="not a readable xz file"):
        asr.load_model(lm=broken)  # an LM the caller named fails loudly


@pytest.mark.parametrize("decoding", ["lm", "greedy"])
def test_bundled_model_transcribes_a_heldout_sentence(decoding, bundled, greedy):
    model = bundled if decoding == "lm" else greedy
    assert model.transcribe(SENTENCE).text == SENTENCE_TEXT


@pytest.mark.parametrize("decoding", ["lm", "greedy"])
def test_bundled_model_transcribes_a_heldout_real_speaker(decoding, bundled, greedy):
    """At least 8 of the 10 digits of a held-out speaker (8 kHz recordings), none of them wrong words:
    the model's digits dev WER is 15-20 % (asr/pretrained/MODEL.md), so one or two may come out
    empty."""
    model = bundled if decoding == "lm" else greedy
    got = [t.text for t in model.transcribe_batch(DIGIT_FILES)]
    assert sum(g == d for g, d in zip(got, DIGITS)) >= 8, got
    assert all(g in (d, "") for g, d in zip(got, DIGITS)), got


@needs_lm
def test_readme_main_command_prints_the_right_words():
    out = subprocess.run([sys.executable, "-m", "asr.cli.transcribe", str(GOFORWARD)],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "go forward ten meters"


@needs_lm
def test_asr_live_finals_use_the_bundled_lm(tmp_path):
    out = tmp_path / "finals.txt"
    proc = subprocess.run([sys.executable, "-m", "asr.cli.live", "--input", str(GOFORWARD), "--fast",
                           "--output", str(out)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert out.read_text().split() == "go forward ten meters".split()


def test_no_lm_decodes_greedily(greedy):
    out = subprocess.run([sys.executable, "-m", "asr.cli.transcribe", str(GOFORWARD), "--no-lm"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == greedy.transcribe(GOFORWARD).text


@needs_lm
def test_default_lm_gives_way_to_a_beam_search(bundled, greedy):
    """The default LM is not the caller's choice: asking for a beam or hotwords decodes without it
    (an LM passed explicitly refuses them instead: tests/test_lexicon_decoder.py)."""
    assert bundled.transcribe(GOFORWARD, beam_size=4).text == greedy.transcribe(GOFORWARD, beam_size=4).text
    assert bundled.stream(beam_size=4).lexicon is None and bundled.stream().lexicon is bundled.lexicon


@needs_lm
def test_the_lm_search_tries_few_tokens_per_frame_and_finds_what_the_full_search_finds(bundled):
    """The default LM search extends hypotheses with the likeliest 16 tokens of each frame only
    (DEFAULT_TOKEN_BEAM, 6-10x faster): on the held-out files it must find the words the search over
    all 256 tokens finds."""
    from asr.decode.lexicon import DEFAULT_TOKEN_BEAM, LexiconDecoder

    model, tokenizer, lm = load_inference_parts(BUNDLED_MODEL)
    full_search = ASRModel(model, tokenizer, lexicon=LexiconDecoder(tokenizer, lm, beam_size_token=None),
                           encoder=bundled.encoder)  # the same logits: only the search differs
    assert DEFAULT_TOKEN_BEAM < tokenizer.vocab_size
    files = [SENTENCE, GOFORWARD, *DIGIT_FILES]
    assert [t.text for t in bundled.transcribe_batch(files)] == [t.text for t in full_search.transcribe_batch(files)]


def test_bundled_model_int8_gives_the_same_words(bundled):
    int8 = asr.load_model(int8=True)
    assert int8.transcribe(SENTENCE).text == SENTENCE_TEXT
    assert [int8.transcribe(f).text for f in DIGIT_FILES[:3]] == [bundled.transcribe(f).text for f in DIGIT_FILES[:3]]


def test_bundled_model_streams_the_same_words_in_random_pieces(bundled):
    wave = load_audio(SENTENCE)
    rng = random.Random(7)
    for _ in range(2):
        stream = bundled.stream(endpoint=EndpointConfig.disabled())
        start = 0
        while start < len(wave):
            size = rng.randint(1, 6000)
            stream.accept_waveform(wave[start:start + size])
            start += size
        assert stream.finalize().text == SENTENCE_TEXT


def test_asr_transcribe_uses_the_bundled_model_without_model_argument():
    out = subprocess.run([sys.executable, "-m", "asr.cli.transcribe", str(SENTENCE)],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == SENTENCE_TEXT
