"""Lexicon + n-gram LM decoding (asr.decode.lexicon over torchaudio's flashlight decoder)."""
from pathlib import Path

import pytest
import torch

pytest.importorskip("flashlight.lib.text", reason="flashlight-text is in the dev extras")

from asr.decode.lexicon import LexiconDecoder, arpa_vocabulary  # noqa: E402
from asr.decode.ngram import NGramCounts, write_arpa  # noqa: E402
from asr.train.checkpoint import load_for_inference  # noqa: E402

BUNDLED = Path(__file__).resolve().parents[1] / "asr" / "pretrained" / "model.pt"
SENTENCES = ["the cat sat on the mat", "a dog sat on the log", "the cat ran to the dog", "go forward ten meters"]


@pytest.fixture(scope="module")
def tokenizer():
    return load_for_inference(BUNDLED)[1]


@pytest.fixture(scope="module")
def lm(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("lm") / "lm.arpa"
    with open(path, "w") as f:
        write_arpa(NGramCounts(3).add_all(SENTENCES * 5), f)
    return path


def spelled(tokenizer, pieces_per_word: list[list[int]], frames_per_piece: int = 3, confidence: float = 0.9):
    """Log-probabilities [T, V] whose best path spells the given pieces, each piece held for a few
    frames and followed by a blank, the rest of the mass spread over the other tokens."""
    ids = [i for word in pieces_per_word for i in word]
    V = tokenizer.vocab_size
    rows = []
    for i in ids + [None]:
        for k in range(frames_per_piece + 1):
            target = 0 if (i is None or k == frames_per_piece) else i
            row = torch.full((V,), (1 - confidence) / (V - 1))
            row[target] = confidence
            rows.append(row)
    return torch.stack(rows).log()


def test_arpa_vocabulary_lists_the_words(lm):
    assert sorted(arpa_vocabulary(lm)) == sorted({w for s in SENTENCES for w in s.split()})


def test_clean_emissions_decode_to_their_words(tokenizer, lm):
    decoder = LexiconDecoder(tokenizer, lm)
    text = "the cat sat on the mat"
    log_probs = spelled(tokenizer, [tokenizer.encode(w) for w in text.split()])
    assert decoder(log_probs) == text
    assert decoder(log_probs[:0]) == ""


def test_a_misspelling_comes_out_as_the_lexicon_word(tokenizer, lm):
    """Unsure emissions that spell 'meeters' (not a word of the LM) decode to 'meters', the only
    lexicon word that fits, in the LM's likely context: what the LM buys on real errors."""
    decoder = LexiconDecoder(tokenizer, lm)
    words = [tokenizer.encode(w) for w in ("go", "forward", "ten")] + [tokenizer.encode("meeters")]
    assert tokenizer.decode([i for w in words for i in w]) == "go forward ten meeters"
    assert decoder(spelled(tokenizer, words, confidence=0.5)) == "go forward ten meters"


def test_missing_language_model_is_a_clear_error(tokenizer, tmp_path):
    with pytest.raises(FileNotFoundError, match="language model not found"):
        LexiconDecoder(tokenizer, tmp_path / "nope.arpa")


def test_asr_eval_with_a_missing_lm_is_one_line(tmp_path, capsys):
    from asr.cli import evaluate

    manifest = Path(__file__).resolve().parent / "data"
    entries = sorted(manifest.glob("*.jsonl"))
    if not entries:
        pytest.skip("no test manifest")
    rc = evaluate.main([str(BUNDLED), str(entries[0]), "--lm", str(tmp_path / "missing.arpa")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and err[0].startswith("asr-eval: error: --lm: language model not found")
