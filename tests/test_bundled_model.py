"""The bundled default model (asr/pretrained/model.pt) works out of the box, on the CPU.

It must transcribe audio it never saw in training exactly: one synthetic sentence in a held-out
voice (from the synthetic test set), and the ten digits spoken by a held-out real speaker (FSDD's
nicolas, part of the real dev split). Every path a user can take gives the same words: the file API
in float32 and int8, the streaming recognizer fed in random pieces, and ``asr-transcribe`` with no
``--model``. The files are in tests/data/audio/heldout (README.md there says where they come from).
"""
from __future__ import annotations

import random
import subprocess
import sys
from pathlib import Path

import pytest

import asr
from asr.api import BUNDLED_MODEL, ASRModel
from asr.audio import load_audio
from asr.stream.endpoint import EndpointConfig

HELDOUT = Path(__file__).parent / "data" / "audio" / "heldout"
SENTENCE = HELDOUT / "synth_test_000275.ogg"  # unseen voice espeak:en-gb-x-gbclan+m3, unseen sentence
SENTENCE_TEXT = "send a message to liam saying i will be twenty minutes late"
DIGITS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
DIGIT_FILES = [HELDOUT / f"fsdd_{d}_nicolas_00.flac" for d in range(10)]


@pytest.fixture(scope="module")
def bundled() -> ASRModel:
    return asr.load_model()


def test_bundled_model_is_installed_and_small():
    assert BUNDLED_MODEL.is_file(), "asr/pretrained/model.pt is missing"
    assert BUNDLED_MODEL.stat().st_size < 25_000_000


def test_bundled_model_transcribes_a_heldout_sentence(bundled):
    assert bundled.transcribe(SENTENCE).text == SENTENCE_TEXT


def test_bundled_model_transcribes_a_heldout_real_speaker(bundled):
    got = [t.text for t in bundled.transcribe_batch(DIGIT_FILES)]
    assert got == DIGITS


def test_bundled_model_int8_gives_the_same_words():
    int8 = asr.load_model(int8=True)
    assert int8.transcribe(SENTENCE).text == SENTENCE_TEXT
    assert [int8.transcribe(f).text for f in DIGIT_FILES[:3]] == DIGITS[:3]


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
