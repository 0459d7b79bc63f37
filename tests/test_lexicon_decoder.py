"""Lexicon + n-gram LM decoding (asr.decode.lexicon over flashlight-text's decoder and KenLM)."""
import json
from pathlib import Path

import pytest
import soundfile as sf
import torch
from conftest import BUNDLED_MODEL, LM_SENTENCES

pytest.importorskip("flashlight.lib.text", reason="flashlight-text is in the dev extras")

from asr.decode.lexicon import LexiconDecoder, arpa_vocabulary  # noqa: E402
from asr.decode.ngram import NGramCounts, write_arpa  # noqa: E402
from asr.model_file import load_for_inference  # noqa: E402


def spelled(bundled_tokenizer, pieces_per_word: list[list[int]], frames_per_piece: int = 3, confidence: float = 0.9):
    """Log-probabilities [T, V] whose best path spells the given pieces, each piece held for a few
    frames and followed by a blank, the rest of the mass spread at random over the other tokens
    (random, not uniform: exact ties between paths make flashlight's search order-dependent)."""
    ids = [i for word in pieces_per_word for i in word]
    V = bundled_tokenizer.vocab_size
    g = torch.Generator().manual_seed(0)
    rows = []
    for i in ids + [None]:
        for k in range(frames_per_piece + 1):
            target = 0 if (i is None or k == frames_per_piece) else i
            row = torch.rand(V, generator=g) + 0.5
            row[target] = 0.0
            row = row / row.sum() * (1 - confidence)
            row[target] = confidence
            rows.append(row)
    return torch.stack(rows).log()


def test_arpa_vocabulary_lists_the_words(sentences_arpa):
    assert sorted(arpa_vocabulary(sentences_arpa)) == sorted({w for s in LM_SENTENCES for w in s.split()})


def test_clean_emissions_decode_to_their_words_at_their_frames(bundled_tokenizer, sentences_arpa):
    """Each piece held for 3 frames: one word each (no repeats), tokens at the frames they start."""
    decoder = LexiconDecoder(bundled_tokenizer, sentences_arpa)
    text = "the cat sat on the mat"
    pieces = [bundled_tokenizer.encode(w) for w in text.split()]
    log_probs = spelled(bundled_tokenizer, pieces, frames_per_piece=3)
    assert decoder(log_probs) == text
    tokens, frames = decoder.tokens_and_frames(log_probs)
    assert tokens == [i for w in pieces for i in w]
    assert frames == [4 * k for k in range(len(tokens))]
    assert decoder(log_probs[:0]) == "" and decoder.tokens_and_frames(log_probs[:0]) == ([], [])


def test_a_misspelling_comes_out_as_the_lexicon_word(bundled_tokenizer, sentences_arpa):
    """Unsure emissions that spell 'meeters' (not a word of the LM) decode to 'meters', the only
    lexicon word that fits, in the LM's likely context: what the LM buys on real errors. Every token
    is tried per frame here: these emissions spread the unsure mass at random over all 255 other
    pieces, so the right one is rarely among a frame's likeliest 16 (DEFAULT_TOKEN_BEAM), as it is
    with a trained model's emissions (equal WER on the bundled model's real and synthetic dev sets)."""
    decoder = LexiconDecoder(bundled_tokenizer, sentences_arpa, lm_weight=1.5, word_score=1.0, beam_size_token=None)
    words = [bundled_tokenizer.encode(w) for w in ("go", "forward", "ten")] + [bundled_tokenizer.encode("meeters")]
    assert bundled_tokenizer.decode([i for w in words for i in w]) == "go forward ten meeters"
    log_probs = spelled(bundled_tokenizer, words, confidence=0.5)
    assert [decoder(log_probs) for _ in range(3)] == ["go forward ten meters"] * 3


def test_missing_language_model_is_a_clear_error(bundled_tokenizer, tmp_path):
    with pytest.raises(FileNotFoundError, match="language model not found"):
        LexiconDecoder(bundled_tokenizer, tmp_path / "nope.arpa")


def test_asr_eval_with_a_missing_lm_is_one_line(tmp_path, capsys):
    from asr.cli import evaluate

    manifest = Path(__file__).resolve().parent / "data"
    entries = sorted(manifest.glob("*.jsonl"))
    if not entries:
        pytest.skip("no test manifest")
    rc = evaluate.main([str(BUNDLED_MODEL), str(entries[0]), "--lm", str(tmp_path / "missing.arpa")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and err[0].startswith("asr-eval: error: --lm: language model not found")


COMMANDS = ["go forward five meters", "go back ten meters", "turn left and go forward", "walk ten meters forward",
            "go forward ten steps", "stop"]
GOFORWARD = Path(__file__).resolve().parent / "data" / "audio" / "pocketsphinx_goforward.flac"


@pytest.fixture(scope="module")
def commands_lm(tmp_path_factory) -> Path:
    """An LM of command phrases that never holds the test sentence itself."""
    path = tmp_path_factory.mktemp("lm") / "commands.arpa"
    with open(path, "w") as f:
        write_arpa(NGramCounts(3).add_all(COMMANDS), f)
    return path


def test_asr_transcribe_with_an_lm_spells_the_words_it_knows(commands_lm, capsys):
    """The bundled model alone gets a word of this recording wrong (greedy: model card); with a
    language model of similar commands the words come out as the words it knows."""
    from asr.cli import transcribe

    rc = transcribe.main([str(GOFORWARD), "--lm", str(commands_lm), "--no-progress"])
    assert rc == 0
    assert capsys.readouterr().out.strip() == "go forward ten meters"


def test_lm_words_are_the_same_one_pass_and_block_by_block(commands_lm):
    """Long inputs go through the streaming recognizer block by block: with an LM the search takes
    the frames as they come, and words and times equal the one-pass result."""
    import asr

    model = asr.load_model(lm=commands_lm)
    one_pass = model.transcribe(GOFORWARD)
    blocks = model.transcribe(GOFORWARD, long_audio_seconds=0.5, block_seconds=0.3)
    assert one_pass.text == "go forward ten meters"
    assert [(w.word, w.start, w.end) for w in blocks.segments[0].words] == \
        [(w.word, w.start, w.end) for w in one_pass.segments[0].words]
    assert all(0 < w.confidence <= 1 for w in one_pass.segments[0].words)
    with pytest.raises(ValueError, match="runs its own beam search"):
        model.transcribe(GOFORWARD, beam_size=4)
    with pytest.raises(ValueError, match="runs its own beam search"):
        model.stream(hotwords={"ten": 2.0})


@pytest.fixture
def keep_threads():
    """asr-live sets torch to one thread for the process; later tests expect the default back."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_asr_live_with_an_lm_gives_the_lm_words_in_its_finals(commands_lm, tmp_path, keep_threads):
    """asr-live --lm: each final segment (after an endpoint, or at the end of the input) comes from
    the LM search; the bundled model alone gets a word of this recording wrong."""
    from asr.cli import live

    out = tmp_path / "finals.txt"
    rc = live.main(["--input", str(GOFORWARD), "--fast", "--lm", str(commands_lm), "--output", str(out)])
    assert rc == 0
    assert out.read_text().split() == "go forward ten meters".split()


def test_asr_live_with_a_missing_lm_is_one_line(tmp_path, capsys, keep_threads):
    from asr.cli import live

    rc = live.main(["--input", str(GOFORWARD), "--fast", "--lm", str(tmp_path / "none.arpa")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 1 and err == [f"asr-live: error: language model not found: {tmp_path / 'none.arpa'}"]


def test_a_model_carries_its_lm_through_export(commands_lm, tmp_path, capsys, build_binary):
    """tools/export_model.py --lm: the model carries the LM (as the bundled one does), decodes with
    it by default, and asr-eval --model-lm scores exactly what --lm with the same file scores. An
    LM that is not ARPA is refused at export, in one line."""
    import sys

    import asr
    from asr.cli import evaluate
    from asr.decode.packed_lm import PackedLM
    from asr.model_file import load_inference_parts

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
    try:
        import export_model
    finally:
        sys.path.pop(0)
    out = tmp_path / "with_commands_lm.pt"
    assert export_model.main([str(BUNDLED_MODEL), str(out), "--int8-weights", "--lm", str(commands_lm)]) == 0
    carried_lm = load_inference_parts(out).lm
    assert isinstance(carried_lm, PackedLM) and sorted(carried_lm.words) == sorted(arpa_vocabulary(commands_lm))
    assert carried_lm.spelling(carried_lm.words.index("forward")) == load_for_inference(BUNDLED_MODEL)[1].encode("forward")
    assert asr.load_model(out).transcribe(GOFORWARD).text == "go forward ten meters"

    manifest = tmp_path / "goforward.jsonl"
    manifest.write_text(json.dumps({"id": "goforward", "audio": str(GOFORWARD), "text": "go forward ten meters",
                                    "duration": sf.info(GOFORWARD).duration}) + "\n")
    capsys.readouterr()
    assert evaluate.main([str(out), str(manifest), "--model-lm", "--worst", "0", "--num-workers", "0"]) == 0
    carried = capsys.readouterr().out.splitlines()[0]
    assert evaluate.main([str(out), str(manifest), "--lm", str(commands_lm), "--worst", "0", "--num-workers", "0"]) == 0
    assert carried == capsys.readouterr().out.splitlines()[0] and "WER 0.00%" in carried
    plain = tmp_path / "plain.pt"
    assert export_model.main([str(BUNDLED_MODEL), str(plain)]) == 0
    assert evaluate.main([str(plain), str(manifest), "--model-lm"]) == 2
    assert capsys.readouterr().err.strip().endswith("carries no language model")

    notes = tmp_path / "notes.arpa"
    notes.write_text("shopping list\n")
    assert export_model.main([str(BUNDLED_MODEL), str(tmp_path / "x.pt"), "--lm", str(notes)]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [f"export_model: error: {notes}: no unigrams found (not an ARPA file?)"]


def test_an_xz_compressed_lm_decodes_like_the_plain_one(commands_lm, tmp_path, capsys):
    """The bundled LM ships xz-compressed; any --lm may be. A damaged .xz file is a one-line error."""
    import lzma

    import asr
    from asr.cli import transcribe

    packed = tmp_path / "commands.arpa.xz"
    packed.write_bytes(lzma.compress(commands_lm.read_bytes()))
    plain = asr.load_model(lm=commands_lm).transcribe(GOFORWARD)
    assert asr.load_model(lm=packed).transcribe(GOFORWARD).text == plain.text == "go forward ten meters"
    broken = tmp_path / "broken.arpa.xz"
    broken.write_bytes(packed.read_bytes()[:200])
    rc = transcribe.main([str(GOFORWARD), "--lm", str(broken), "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and err[0].startswith(f"asr-transcribe: error: {broken}: not a readable xz file")


def test_asr_transcribe_with_a_file_that_is_not_an_lm_is_one_line(tmp_path, capsys):
    from asr.cli import transcribe

    bad = tmp_path / "notes.arpa"
    bad.write_text("shopping list\n")
    rc = transcribe.main([str(GOFORWARD), "--lm", str(bad), "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and err == [f"asr-transcribe: error: {bad}: no unigrams found (not an ARPA file?)"]


@pytest.mark.parametrize("cli, extra", [("transcribe", ["--beam-size", "4"]), ("transcribe", ["--hotword", "ten"]),
                                        ("evaluate", ["--beam-size", "4"]), ("live", ["--beam-size", "4"])])
def test_lm_with_another_beam_search_is_a_usage_error(cli, extra, commands_lm, capsys):
    """--lm brings its own search; asking for the prefix beam search (or hotwords) as well is
    refused with a usage error rather than silently ignored."""
    import importlib

    module = importlib.import_module(f"asr.cli.{cli}")
    args = {"transcribe": [str(GOFORWARD)], "evaluate": [str(BUNDLED_MODEL), str(GOFORWARD)],
            "live": ["--input", str(GOFORWARD), "--fast"]}[cli]
    with pytest.raises(SystemExit) as stop:
        module.main(args + ["--lm", str(commands_lm)] + extra)
    assert stop.value.code == 2
    assert "--lm runs its own beam search" in capsys.readouterr().err
