"""The word LM as a model file carries it (asr.decode.packed_lm) and the frames the LM search sees
(asr.decode.lexicon.frames_to_search)."""
import lzma
import math
from pathlib import Path

import pytest
import torch
from conftest import BUNDLED_MODEL, LM_SENTENCES

from asr.decode.lexicon import frames_to_search

REPO = Path(__file__).resolve().parents[1]
LOG_ALMOST_ONE = math.log(0.9999)


def test_frames_repeating_a_token_or_deep_in_a_blank_run_are_not_searched():
    # frames:   0  1  2  3  4  5  6  7  8
    best = [0, 0, 0, 5, 5, 0, 7, 7, 0]
    sure = [LOG_ALMOST_ONE, LOG_ALMOST_ONE, LOG_ALMOST_ONE, -9, -9, -0.5, -9, -9, LOG_ALMOST_ONE]
    # 1, 2: blank-dominated after a blank-dominated frame; 4, 7: repeat the previous token
    assert frames_to_search(best, sure, -1, False) == [0, 3, 5, 6, 8]
    assert frames_to_search(best, sure, -1, False, blank_skip=None) == [0, 1, 2, 3, 5, 6, 8]


def test_frames_to_search_carry_over_chunk_boundaries():
    best = [0, 0, 0, 5, 5, 0, 7, 7, 0, 0]
    blank = [LOG_ALMOST_ONE] * 3 + [-9, -9, LOG_ALMOST_ONE, -9, -9, LOG_ALMOST_ONE, LOG_ALMOST_ONE]
    whole = frames_to_search(best, blank, -1, False)
    for cut in range(1, len(best)):
        head = frames_to_search(best[:cut], blank[:cut], -1, False)
        tail = frames_to_search(best[cut:], blank[cut:], best[cut - 1], blank[cut - 1] >= math.log(0.999))
        assert head + [cut + t for t in tail] == whole, cut


# ---------------------------------------------------------------------------------- packing
flashlight = pytest.importorskip("flashlight.lib.text", reason="flashlight-text is in the dev extras")


@pytest.fixture(scope="module")
def packed(sentences_arpa, bundled_tokenizer, build_binary):
    from asr.decode.packed_lm import pack_language_model

    return pack_language_model(sentences_arpa, bundled_tokenizer, build_binary)


def noisy_emissions(bundled_tokenizer, text: str, confidence: float = 0.6, frames_per_piece: int = 2) -> torch.Tensor:
    ids = bundled_tokenizer.encode(text)
    g = torch.Generator().manual_seed(1)
    rows = []
    for i in ids + [0]:
        for k in range(frames_per_piece + 1):
            target = 0 if k == frames_per_piece else i
            row = torch.rand(bundled_tokenizer.vocab_size, generator=g) + 0.2
            row[target] = 0.0
            row = row / row.sum() * (1 - confidence)
            row[target] = confidence
            rows.append(row)
    return torch.stack(rows).log()


def test_a_packed_lm_round_trips_through_a_checkpoint_entry(packed, bundled_tokenizer):
    from asr.decode.packed_lm import PackedLM

    again = PackedLM.from_checkpoint(packed.to_checkpoint())
    assert again.words == packed.words and again.kenlm == packed.kenlm and again.vocab_size == bundled_tokenizer.vocab_size
    assert sorted(packed.words) == sorted({w for s in LM_SENTENCES for w in s.split()})
    assert all(packed.spelling(i) == bundled_tokenizer.encode(w) for i, w in enumerate(packed.words))
    # the trie's look-ahead: log p(w) from the empty context, "the" the likeliest word
    assert packed.words[int(packed.unigram.argmax())] == "the" and bool((packed.unigram < 0).all())


def test_a_packed_lm_decodes_as_its_arpa_file_does(packed, sentences_arpa, bundled_tokenizer):
    from asr.decode.lexicon import LexiconDecoder

    from_arpa, from_packed = LexiconDecoder(bundled_tokenizer, sentences_arpa), LexiconDecoder(bundled_tokenizer, packed)
    for text in ("the cat sat on the mat", "go forward ten meters", "a dog ran to the cat"):
        log_probs = noisy_emissions(bundled_tokenizer, text)
        assert from_packed.tokens_and_frames(log_probs) == from_arpa.tokens_and_frames(log_probs)
        assert from_packed(log_probs) == text


def test_the_search_gives_the_one_pass_result_for_any_chunking(packed, bundled_tokenizer):
    from asr.decode.lexicon import LexiconDecoder

    decoder = LexiconDecoder(bundled_tokenizer, packed)
    log_probs = noisy_emissions(bundled_tokenizer, "the cat sat on the log")
    whole = decoder.tokens_and_frames(log_probs)
    for size in (1, 2, 5):
        search = decoder.search()
        for start in range(0, log_probs.shape[0], size):
            search.accept(log_probs[start:start + size])
        assert search.finish() == whole
        with pytest.raises(RuntimeError, match="finished"):
            search.accept(log_probs[:1])


def test_an_old_model_file_with_arpa_text_still_decodes_with_its_lm(sentences_arpa, packed, tmp_path):
    """Model files from before the packed form carry xz-compressed ARPA text: read as before."""
    from asr.model_file import load_checkpoint, load_inference_parts
    from asr.train.checkpoint import atomic_torch_save

    ckpt = load_checkpoint(BUNDLED_MODEL)
    ckpt.pop("lm", None)
    ckpt["lm_arpa_xz"] = torch.frombuffer(bytearray(lzma.compress(sentences_arpa.read_bytes())), dtype=torch.uint8)
    old = tmp_path / "old.pt"
    atomic_torch_save(ckpt, old)
    ckpt.pop("lm_arpa_xz")
    ckpt["lm"] = packed.to_checkpoint()
    new = tmp_path / "new.pt"
    atomic_torch_save(ckpt, new)
    assert isinstance(load_inference_parts(old).lm, bytes)

    import asr

    audio = REPO / "tests" / "data" / "audio" / "pocketsphinx_goforward.flac"
    assert asr.load_model(old).transcribe(audio).text == asr.load_model(new).transcribe(audio).text


def test_a_damaged_packed_lm_is_a_one_line_error(packed, tmp_path):
    from asr.decode.packed_lm import PackedLM
    from asr.model_file import CheckpointError, load_checkpoint, load_inference_parts
    from asr.train.checkpoint import atomic_torch_save

    entry = packed.to_checkpoint()
    entry["offsets"] = entry["offsets"][:-1]
    with pytest.raises(ValueError, match="damaged"):
        PackedLM.from_checkpoint(entry)
    with pytest.raises(ValueError, match="unknown language-model format 99"):
        PackedLM.from_checkpoint({**packed.to_checkpoint(), "format": 99})
    ckpt = load_checkpoint(BUNDLED_MODEL)
    ckpt["lm"] = entry
    path = tmp_path / "damaged.pt"
    atomic_torch_save(ckpt, path)
    with pytest.raises(CheckpointError, match="damaged"):
        load_inference_parts(path)


def test_packing_without_build_binary_says_how_to_get_it(sentences_arpa, bundled_tokenizer, tmp_path, build_binary):
    from asr.decode.packed_lm import find_build_binary, pack_language_model

    with pytest.raises(FileNotFoundError, match="build_binary not found at"):
        pack_language_model(sentences_arpa, bundled_tokenizer, tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="language model not found"):
        pack_language_model(tmp_path / "none.arpa", bundled_tokenizer)
    assert find_build_binary().is_file()


def test_tune_lm_scores_the_lm_a_model_file_carries(packed, bundled_tokenizer, tmp_path):
    import sys

    sys.path.insert(0, str(REPO / "tools"))
    try:
        import tune_lm
    finally:
        sys.path.pop(0)
    with_lm, without, foreign = tmp_path / "with.pt", tmp_path / "without.pt", tmp_path / "foreign.pt"
    torch.save({"model": {}, "tokenizer": bundled_tokenizer.to_bytes(), "lm": packed.to_checkpoint()}, with_lm)
    torch.save({"model": {}, "tokenizer": bundled_tokenizer.to_bytes()}, without)
    torch.save({"model": {}, "tokenizer": b"another tokenizer", "lm": packed.to_checkpoint()}, foreign)
    carried = tune_lm.resolve_lm(with_lm, bundled_tokenizer)
    assert carried.words == packed.words and carried.kenlm == packed.kenlm
    assert tune_lm.resolve_lm(without, bundled_tokenizer) is None
    assert tune_lm.resolve_lm(tmp_path / "words.arpa", bundled_tokenizer) == tmp_path / "words.arpa"
    with pytest.raises(ValueError, match="tokenizer differs"):
        tune_lm.resolve_lm(foreign, bundled_tokenizer)
