"""Tokenizer: normalisation, CTC blank at id 0, in-process training, serialisation."""
from __future__ import annotations

import io
import json
import pickle
from pathlib import Path

import pytest
import sentencepiece as spm

from asr.frames import BLANK_ID
from asr.tokenizer import TextFileError, Tokenizer, normalize_text, read_text_lines

MANIFEST = Path("/work/shared/data/real/manifest.jsonl")

# A few dozen sentences (CMU ARCTIC-like prompts, digits, fillers): enough to train small vocabularies.
SENTENCES = [
    "Author of the danger trail, Philip Steels, etc.",
    "Not at this particular case, Tom, apologized Whittemore.",
    "For the twentieth time that evening the two men shook hands.",
    "Lord, but I'm glad to see you again, Phil.",
    "Will we ever forget it.",
    "God bless 'em, I hope I'll go on seeing them forever.",
    "And you always want to see it in the superlative degree.",
    "Gad, your letter came just in time.",
    "He turned sharply, and faced Gregson across the table.",
    "I'm playing a single hand in what looks like a losing game.",
    "If I ever needed a fighter in my life I need one now.",
    "Gregson shoved back his chair and rose to his feet.",
    "He was a head shorter than his companion, of almost delicate physique.",
    "Now you're coming down to business, Phil, he exclaimed.",
    "It's the aurora borealis.",
    "There's fort Churchill, a rifle-shot beyond the ridge, asleep.",
    "From that moment his friendship for Belize turns to hatred and jealousy.",
    "There was a change now.",
    "I followed the line of the proposed railroad, looking for chances.",
    "Clubs and balls and cities grew to be only memories.",
    "It fairly clubbed me into recognizing it.",
    "Hayes took a long breath as he stopped in the doorway.",
    "They were three hundred yards apart.",
    "one two three four five six seven eight nine zero oh",
    "go forward ten meters",
    "ten of clubs and the queen of hearts",
    "uh I mean um you know the quick brown fox jumps over the lazy dog",
    "Montreal forced aligner",
    "m f a is like putty",
    "Northanger Abbey",
    "She said: \u201cdon\u2019t\u201d \u2014 twice, and/or thrice.",
]


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.train(SENTENCES, None, vocab_size=80)


# --------------------------------------------------------------------------- normalize_text
@pytest.mark.parametrize(
    "raw, expected",
    [
        ("Hello, World!", "hello world"),
        ("well-known a/b", "well known a b"),
        ("  lots   of\tspace\n\nhere ", "lots of space here"),
        ("don't stop; it's 9.30", "don't stop it's 930"),
        ("montreal forced aligner i hardly know 'er", "montreal forced aligner i hardly know er"),
        ("the boys' books", "the boys' books"),
        ("Caf\u00e9 na\u00efve r\u00e9sum\u00e9", "cafe naive resume"),  # accents fold, letters kept
        ("don\u2019t \u2018quote\u2019", "don't quote'"),  # typographic apostrophes
        ("em\u2014dash en\u2013dash", "em dash en dash"),
        ("STRASSE Stra\u00dfe \ufb01sh", "strasse strasse fish"),
        ("!!! ... ---", ""),
        ("", ""),
    ],
)
def test_normalize_text(raw: str, expected: str) -> None:
    assert normalize_text(raw) == expected
    assert normalize_text(expected) == expected  # idempotent


def test_normalize_matches_real_manifest() -> None:
    """The manifest's ``text`` is the README normalisation of ``text_raw``, except where the raw
    text has digits: the corpus spells those out as words ("press 1" -> "press one"), so the text
    then holds no digit."""
    if not MANIFEST.is_file():
        pytest.skip("real-speech manifest not available")
    rows = [json.loads(line) for line in MANIFEST.read_text().splitlines() if line.strip()]
    for r in rows:
        assert normalize_text(r["text"]) == r["text"], r["id"]
        if r["id"].startswith("asterisk_"):
            continue  # its text corrects the prompt list's typos ("represenatives", "fourtieth")
        if any(c.isdigit() for c in r["text_raw"]):
            assert not any(c.isdigit() for c in r["text"]), r["id"]
        else:  # abbreviations may keep their letters apart ("A.M." -> "a m"): compare without spaces
            assert normalize_text(r["text_raw"]).replace(" ", "") == r["text"].replace(" ", ""), r["id"]


# --------------------------------------------------------------------------- blank / vocabulary
def test_blank_is_id_zero_and_never_encoded(tok: Tokenizer) -> None:
    assert tok.blank_id == BLANK_ID == 0
    assert tok.id_to_piece(0) == "<blk>"
    assert tok.unk_id == 1
    assert 30 <= tok.vocab_size <= 80
    for s in SENTENCES + ["zebra quixotic jukebox 0123456789"]:
        ids = tok.encode(s)
        assert ids and min(ids) >= 1 and max(ids) < tok.vocab_size


def test_roundtrip_and_unseen_words(tok: Tokenizer) -> None:
    for s in SENTENCES:
        assert tok.decode(tok.encode(s)) == normalize_text(s)
    # Every letter is a required char, so words never seen in training encode without <unk>.
    unseen = "pack my box with five dozen liquor jugs zyzzyva qoph"
    ids = tok.encode(unseen)
    assert tok.unk_id not in ids
    assert tok.decode(ids) == unseen


def test_decode_ignores_blank(tok: Tokenizer) -> None:
    ids = tok.encode("the two men shook hands")
    with_blanks = [0]
    for i in ids:
        with_blanks += [i, 0, 0]
    assert tok.decode(with_blanks) == "the two men shook hands"
    assert tok.decode([0, 0]) == ""
    assert tok.decode([]) == ""
    import torch

    assert tok.decode(torch.tensor(with_blanks)) == "the two men shook hands"
    with pytest.raises(ValueError):
        tok.decode([tok.vocab_size])


def test_word_start_matches_pieces(tok: Tokenizer) -> None:
    pieces = tok.encode_as_pieces("the quick brown fox")
    ids = tok.encode("the quick brown fox")
    assert [tok.id_to_piece(i) for i in ids] == pieces
    assert sum(tok.is_word_start(i) for i in ids) == 4
    assert tok.is_word_start(ids[0])
    assert not tok.is_word_start(0)


# --------------------------------------------------------------------------- training edge cases
def test_small_text_large_vocab_is_soft_limit() -> None:
    t = Tokenizer.train(["hello world", "the cat sat on the mat"], None, vocab_size=2000)
    assert t.vocab_size < 2000  # fewer pieces instead of a sentencepiece error
    assert t.decode(t.encode("hello the mat")) == "hello the mat"
    assert t.decode(t.encode("xylophone")) == "xylophone"  # letters absent from training


def test_vocab_too_small_or_no_text() -> None:
    with pytest.raises(ValueError, match="too small"):
        Tokenizer.train(SENTENCES, None, vocab_size=10)
    with pytest.raises(ValueError, match="no non-empty"):
        Tokenizer.train(["", "  ", "!!!"], None, vocab_size=64)


def test_minimal_vocab_is_characters() -> None:
    t = Tokenizer.train(SENTENCES, None, vocab_size=30)
    assert t.vocab_size == 30
    for s in SENTENCES[:5]:
        assert t.decode(t.encode(s)) == normalize_text(s)


# --------------------------------------------------------------------------- serialisation
def test_files_bytes_and_pickle(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    t = Tokenizer.train(iter(SENTENCES), tmp_path / "sub" / "bpe", vocab_size=64)
    model = tmp_path / "sub" / "bpe.model"
    vocab = (tmp_path / "sub" / "bpe.vocab").read_text(encoding="utf-8").splitlines()
    assert len(vocab) == t.vocab_size and vocab[0].split("\t")[0] == "<blk>"
    from_file = Tokenizer(model)
    from_bytes = Tokenizer.from_bytes(t.to_bytes())
    from_pickle = pickle.loads(pickle.dumps(t))
    s = "the quick brown fox jumps over the lazy dog"
    for other in (from_file, from_bytes, from_pickle):
        assert other == t
        assert other.vocab_size == t.vocab_size
        assert other.encode(s) == t.encode(s)
    assert model.read_bytes() == t.to_bytes()


def test_rejects_model_where_id0_is_a_token() -> None:
    """Sentencepiece's default puts <unk> at id 0, which encode() can emit: unusable for CTC."""
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter([normalize_text(s) for s in SENTENCES]),
        model_writer=buf, model_type="bpe", vocab_size=60, minloglevel=2,
    )
    plain = spm.SentencePieceProcessor(model_proto=buf.getvalue())
    assert 0 in plain.encode("\u00a7")  # the danger is real: id 0 produced for an unknown char
    with pytest.raises(ValueError, match="id 0"):
        Tokenizer.from_bytes(buf.getvalue())
    with pytest.raises(ValueError, match="not a sentencepiece model"):
        Tokenizer.from_bytes(b"definitely not a model")


# --------------------------------------------------------------------------- real transcripts
def test_train_on_real_manifest() -> None:
    if not MANIFEST.is_file():
        pytest.skip("real-speech manifest not available")
    texts = [json.loads(line)["text"] for line in MANIFEST.read_text().splitlines() if line.strip()]
    t = Tokenizer.train(texts, None, vocab_size=256)
    assert t.vocab_size == 256
    for x in texts:
        ids = t.encode(x, normalize=False)
        assert 0 not in ids and t.unk_id not in ids
        assert t.decode(ids) == x
    # BPE learned the frequent words as single pieces.
    from collections import Counter

    frequent = [w for w, _ in Counter(w for x in texts for w in x.split() if len(w) >= 4).most_common(3)]
    assert len(t.encode("seven")) == 1 and len(t.encode(" ".join(frequent))) == 3, frequent


def test_read_text_lines_reads_plain_and_xz_and_names_the_file_when_it_cannot(tmp_path: Path) -> None:
    import lzma

    lines = ["first line", "", "third line"]
    plain, packed = tmp_path / "a.txt", tmp_path / "a.txt.xz"
    plain.write_text("\n".join(lines) + "\n", encoding="utf-8")
    packed.write_bytes(lzma.compress(plain.read_bytes()))
    assert read_text_lines(plain) == read_text_lines(packed) == lines
    (tmp_path / "cut.txt.xz").write_bytes(packed.read_bytes()[:-8])
    (tmp_path / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    for bad, reason in [("missing.txt", "No such file"), ("cut.txt.xz", "not a readable xz file"),
                        ("latin1.txt", "not UTF-8")]:
        with pytest.raises(TextFileError) as err:
            read_text_lines(tmp_path / bad)
        message = str(err.value)
        assert bad in message and reason in message and "\n" not in message
