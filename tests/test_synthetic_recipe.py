"""Tests of the synthetic-speech recipe (recipes/synthetic) and the corpus packer (recipes/bundled).

The text normaliser decides what the model learns, so it is tested in detail: every transcript must
be spelled-out words in the model alphabet and a fixed point of asr.tokenizer.normalize_text.
The end-to-end test runs the real prepare.py (2-3 utterances with espeak-ng and flite) and then
prepare.py on its output plus a tiny real-speech folder; it is skipped when the engines are not
installed (``apt-get install espeak-ng flite opus-tools``, see recipes/synthetic/README.md).
"""
from __future__ import annotations

import importlib.util
import json
import random
import re
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from asr.tokenizer import normalize_text

REPO = Path(__file__).resolve().parents[1]
SYNTH = REPO / "recipes" / "synthetic"
sys.path.insert(0, str(SYNTH))

# Recipe-only dependencies (recipes/synthetic/requirements.txt), not the package's.
pytest.importorskip("num2words")
pytest.importorskip("scipy")

import augment_audio  # noqa: E402
import textnorm  # noqa: E402
import texts  # noqa: E402


def _load(path: Path, name: str):
    """Import a recipe script as a module; registered in sys.modules so that its functions can be
    pickled for the multiprocessing pool the scripts use."""
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


# --- text normalisation ---------------------------------------------------------------------------

@pytest.mark.parametrize("raw, transcript", [
    ("He paid $3.50 at 7:05.", "he paid three dollars and fifty cents at seven oh five"),
    ("Meet me at 10:00!", "meet me at ten o'clock"),
    ("the Titanic sank in 1912", "the titanic sank in nineteen twelve"),
    ("in the 1980s and the '60s", "in the nineteen eighties and the sixties"),
    ("over 25,000 troops", "over twenty five thousand troops"),
    ("a 10-hit attack in the 9th inning", "a ten hit attack in the ninth inning"),
    ("his 2nd and 23rd tries", "his second and twenty third tries"),
    ("an appreciation of 30% in value", "an appreciation of thirty percent in value"),
    ("it weighs 3.25 kilograms", "it weighs three point two five kilograms"),
    ("room 105, please", "room one hundred and five please"),
    ("dial 0815 now", "dial zero eight one five now"),
    ("rock & roll", "rock and roll"),
])
def test_numbers_are_spelled_out(raw: str, transcript: str) -> None:
    speak, text = textnorm.prepare_sentence(raw)
    assert text == transcript
    assert not re.search(r"\d", speak), "the engine must not see digits (it would expand them its own way)"


@pytest.mark.parametrize("raw, transcript", [
    ("And God said, Let there be light: and there was light.", "and god said let there be light and there was light"),
    ("\u201cWhat?\u201d she asked -- twice; then left!", "what she asked twice then left"),
    ("calling it a `score' was typical", "calling it a score was typical"),
    ("he said 'go home' to the boys' dog", "he said go home to the boys' dog"),
    ("don't stop, it's the caf\u00e9's well-known self-service", "don't stop it's the cafe's well known self service"),
])
def test_punctuation_is_removed_and_apostrophes_kept(raw: str, transcript: str) -> None:
    speak, text = textnorm.prepare_sentence(raw)
    assert text == transcript
    # The speakable text keeps the prosody punctuation but has exactly the transcript's words.
    assert re.sub(r"[.,;:?!]", "", speak).split() == text.split()


@pytest.mark.parametrize("raw", [
    "Mr. Smith went to Washington",   # abbreviation: "mister"? "m r"?
    "the U.S. economy",               # dotted abbreviation
    "NATO forces arrived",            # acronym
    "World War II ended",             # Roman numeral
    "hmm, I see",                     # consonant-only token
    "a temperature of 30\u00b0C",     # symbol we cannot spell
    "email me @ home",
    "the /s/ sibilates",              # slashes: phonetic notation or fractions, read unpredictably
])
def test_ambiguous_sentences_are_rejected(raw: str) -> None:
    assert textnorm.prepare_sentence(raw) is None


def test_kjv_capitals_are_words_not_acronyms() -> None:
    assert textnorm.prepare_sentence("the LORD is my shepherd") is None
    assert textnorm.prepare_sentence("the LORD is my shepherd", lowercase_caps=True)[1] == "the lord is my shepherd"


def test_generated_and_source_transcripts_are_in_model_alphabet() -> None:
    rng = random.Random(0)
    raw = texts.command_phrases(rng, 400) + texts.number_phrases(rng, 400)
    prepared = [textnorm.prepare_sentence(t) for t in raw]
    assert sum(p is None for p in prepared) == 0, "generated phrases must all be speakable"
    for _, text in prepared:
        assert re.fullmatch(r"[a-z']+( [a-z']+)*", text), text
        assert normalize_text(text) == text
        assert textnorm.is_valid_transcript(text)
    # Numbers really occur (the point of the numbers source), spelled out.
    words = {w for _, t in prepared for w in t.split()}
    assert {"zero", "oh", "seven", "twenty", "hundred", "thousand", "percent", "dollars"} <= words


def test_is_valid_transcript() -> None:
    assert textnorm.is_valid_transcript("don't go")
    for bad in ["", "Go", "go  now", " go", "go 2", "go!", "'tis"]:
        assert not textnorm.is_valid_transcript(bad), bad


def test_split_clauses_bounds_and_order() -> None:
    verse = ("And if any man shall take away from the words of the book of this prophecy, God shall take "
             "away his part out of the book of life, and out of the holy city, and from the things which "
             "are written in this book.")
    clauses = textnorm.split_clauses(verse, 3, 20)
    assert len(clauses) >= 2
    assert all(3 <= len(c.split()) <= 20 for c in clauses)
    assert " ".join(clauses).split() == verse.split(), "no word lost, added or reordered"
    # A run of 45 words without punctuation is cut between words into near-equal parts.
    long = " ".join(["word"] * 45)
    parts = textnorm.split_clauses(long, 3, 20)
    assert [len(p.split()) for p in parts] == [15, 15, 15]
    # Short sentences merge with a neighbour; a passage below the minimum is dropped.
    assert textnorm.split_clauses("Jesus wept.", 3, 20) == []
    assert textnorm.split_clauses("Amen. And it was so, and God saw it.", 3, 20) == ["Amen. And it was so, and God saw it."]
    with pytest.raises(ValueError):
        textnorm.split_clauses("x", 5, 3)


def test_kjv_and_wordnet_parsers(tmp_path: Path) -> None:
    kjv = tmp_path / "kjv.txt"
    kjv.write_text("\nGenesis 1\n\n  1 In the beginning God created the heaven and the earth.\n"
                   "  2 And the earth was without form.\n\nExodus 1\n\n  1 Now these are the names.\n")
    assert texts.kjv_verses(kjv) == ["In the beginning God created the heaven and the earth.",
                                    "And the earth was without form.", "Now these are the names."]
    wn = tmp_path / "wn"
    wn.mkdir()
    (wn / "data.noun").write_text(
        '  1 This software and database is being provided "as is"\n'
        '00001740 03 n 01 entity 0 003 | that which exists; "the cat sat"; "a dog"\n'
        '00001741 03 n 01 thing 0 003 | a thing; "the cat sat"\n')
    for pos in ("verb", "adj", "adv"):
        (wn / f"data.{pos}").write_text("")
    assert texts.wordnet_examples(wn) == ["the cat sat", "a dog"]  # license header skipped, deduplicated
    with pytest.raises(texts.SourceError):
        texts.wordnet_examples(tmp_path / "missing")


def test_book_pieces_cut_long_lines_and_skip_held_out_lines(tmp_path: Path) -> None:
    import lzma

    lines = [" ".join(f"w{i}" for i in range(47)), "short line of text", "held out sentence here"]
    path = tmp_path / "books.txt.xz"
    with lzma.open(path, "wt", encoding="utf-8") as fh:
        fh.write("\n".join(lines) + "\n")
    pieces = texts.book_pieces(path, random.Random(0), skip_line=lambda line: line.startswith("held"), max_words=20)
    assert pieces[-1] == "short line of text"  # short lines stay whole; the held-out line is gone
    long_pieces = pieces[:-1]
    assert " ".join(long_pieces) == lines[0]  # cut at word boundaries, nothing lost, in order
    assert all(6 <= len(p.split()) <= 20 for p in long_pieces)
    assert texts.book_pieces(path, random.Random(0), max_words=20) == long_pieces + lines[1:]
    with pytest.raises(texts.SourceError):
        texts.book_pieces(tmp_path / "missing.txt", random.Random(0))
    (tmp_path / "broken.txt.xz").write_bytes(b"not xz at all")
    with pytest.raises(texts.SourceError):  # a one-line error, not lzma's traceback
        texts.book_pieces(tmp_path / "broken.txt.xz", random.Random(0))


def test_book_source_is_training_text_only_and_leaves_other_sources_alone() -> None:
    prepare = _load(SYNTH / "prepare.py", "synthetic_prepare")
    weights = prepare.source_weights("train", 0.4)
    assert weights[prepare.BOOK_SOURCE] == 0.4 and abs(sum(weights.values()) - sum(prepare.SOURCE_WEIGHTS.values())) < 1e-9
    assert prepare.source_weights("test", 0.4) == prepare.SOURCE_WEIGHTS  # dev/test sets do not change
    assert prepare.source_weights("train", 0.0) == prepare.SOURCE_WEIGHTS
    pools = {s: [(f"{s} {i}", f"{s} {i}") for i in range(200)] for s in prepare.SOURCE_WEIGHTS}
    with_books = dict(pools, **{prepare.BOOK_SOURCE: [(f"book {i}", f"book {i}") for i in range(50)]})
    hours = {"train": 1.0, "dev": 0.01, "test": 0.02}
    plain, books = prepare.split_sentences(pools, hours), prepare.split_sentences(with_books, hours)
    for split in ("dev", "test"):
        assert books[split] == plain[split]
    assert books["train"][prepare.BOOK_SOURCE] == with_books[prepare.BOOK_SOURCE]
    jobs = prepare.make_jobs("train", books["train"], ["m1"], 0, 400, book_share=0.5)
    share = sum(j["source"] == prepare.BOOK_SOURCE for j in jobs) / len(jobs)
    assert 0.4 < share < 0.6


# --- audio degradation ----------------------------------------------------------------------------

def _tone_bursts(sr: int = 22050) -> np.ndarray:
    """0.2 s silence, 1 s of a 220 Hz tone with harmonics, 0.3 s silence: a stand-in for speech."""
    t = np.arange(sr) / sr
    voice = sum(np.sin(2 * np.pi * 220 * k * t) / k for k in range(1, 8)).astype(np.float32) * 0.3
    return np.concatenate([np.zeros(int(0.2 * sr), np.float32), voice, np.zeros(int(0.3 * sr), np.float32)])


def test_degrade_resamples_changes_speed_and_adds_noise_at_the_snr() -> None:
    x = _tone_bursts()
    cfg = augment_audio.AugmentConfig(speed=(1.1, 1.1), lead_silence=(0.5, 0.5), trail_silence=(0.25, 0.25),
                                      p_reverb=0.0, p_telephone=0.0, p_noise=1.0, snr_db=(10.0, 10.0),
                                      noise_colors=("white",), peak_dbfs=(-6.0, -6.0))
    y, info = augment_audio.degrade(x, 22050, np.random.default_rng(0), cfg)
    assert y.dtype == np.float32 and np.isfinite(y).all()
    # Engine silence trimmed, the 1 s tone played 1.1x faster, plus 0.75 s of new silence.
    expected = 16000 * (1.0 / 1.1 + 0.75 + 2 * 0.02)
    assert abs(len(y) - expected) < 16000 * 0.03
    assert np.isclose(np.abs(y).max(), 10 ** (-6 / 20), rtol=1e-4)
    assert info["noise"] == {"color": "white", "snr_db": 10.0} and info["speed"] == 1.1
    # The leading silence now holds only noise; its power relative to the tone gives the SNR.
    lead = y[: int(0.45 * 16000)]
    tone = y[int(0.6 * 16000): int(1.3 * 16000)]
    snr = 10 * np.log10((np.mean(tone ** 2) - np.mean(lead ** 2)) / np.mean(lead ** 2))
    assert abs(snr - 10.0) < 1.0


def test_degrade_is_reproducible_and_telephone_band_limits() -> None:
    x = _tone_bursts()
    cfg = augment_audio.AugmentConfig(p_telephone=1.0, p_noise=1.0, noise_colors=("white",), p_reverb=0.0)
    a, ia = augment_audio.degrade(x, 22050, np.random.default_rng(7), cfg)
    b, ib = augment_audio.degrade(x, 22050, np.random.default_rng(7), cfg)
    assert np.array_equal(a, b) and ia == ib and ia["telephone"] is True
    spec = np.abs(np.fft.rfft(a)) ** 2
    f = np.fft.rfftfreq(len(a), 1 / 16000)
    in_band = spec[(f > 500) & (f < 3000)].mean()
    assert spec[f > 5000].mean() < in_band * 1e-2


def test_colored_noise_slopes() -> None:
    rng = np.random.default_rng(0)
    f = np.fft.rfftfreq(32000, 1 / 16000)
    ratios = {}
    for color in ("white", "pink", "brown"):
        n = augment_audio.colored_noise(32000, color, rng)
        assert np.isclose(np.sqrt(np.mean(n ** 2)), 1.0, rtol=1e-3)
        p = np.abs(np.fft.rfft(n)) ** 2
        ratios[color] = p[(f > 100) & (f < 200)].mean() / p[(f > 3200) & (f < 6400)].mean()
    assert 0.5 < ratios["white"] < 2            # flat
    assert 10 < ratios["pink"] < 60             # 1/f: about 32x over 5 octaves
    assert ratios["brown"] > 300                # 1/f^2


def test_room_impulse_response() -> None:
    pytest.importorskip("pyroomacoustics")
    h, info = augment_audio.make_rir(np.random.default_rng(0), rt60_range=(0.2, 0.25))
    assert np.argmax(np.abs(h)) < 20, "starts at the direct path: no added delay"
    assert np.isclose(np.sum(h.astype(np.float64) ** 2), 1.0, rtol=1e-4)
    assert 0.2 <= info["rt60"] <= 0.25 and len(info["room"]) == 3
    assert len(h) > 0.05 * 16000, "a reverberant tail, not a bare impulse"


def test_opus_level_and_write_read_roundtrip(tmp_path: Path) -> None:
    assert augment_audio.opus_compression_level(256) == 0.0
    assert augment_audio.opus_compression_level(6) == 1.0
    assert np.isclose(augment_audio.opus_compression_level(12), 0.976)
    y = _tone_bursts(16000)
    augment_audio.write_audio(tmp_path / "a.ogg", y, "opus", 12)
    augment_audio.write_audio(tmp_path / "a.flac", y, "flac")
    augment_audio.write_audio(tmp_path / "a.wav", y, "wav")
    flac, wav = sf.read(tmp_path / "a.flac", dtype="int16")[0], sf.read(tmp_path / "a.wav", dtype="int16")[0]
    assert sf.info(tmp_path / "a.wav").subtype == "PCM_16" and np.array_equal(flac, wav)  # the same samples
    info = sf.info(tmp_path / "a.ogg")
    assert (info.format, info.subtype, info.samplerate, info.frames) == ("OGG", "OPUS", 16000, len(y))
    assert (tmp_path / "a.ogg").stat().st_size < 0.25 * (tmp_path / "a.flac").stat().st_size
    assert not list(tmp_path.glob(".*.tmp")), "no temporary file left behind"
    with pytest.raises(ValueError):
        augment_audio.write_audio(tmp_path / "a.mp3", y, "mp3")


# --- end to end -----------------------------------------------------------------------------------

needs_engines = pytest.mark.skipif(shutil.which("espeak-ng") is None or shutil.which("flite") is None,
                                   reason="espeak-ng/flite not installed (apt-get install espeak-ng flite)")


def _fake_sources(tmp_path: Path) -> tuple[Path, Path]:
    """A tiny KJV text and WordNet folder, so the test needs only the engines, not the text packages."""
    rng = random.Random(1)
    words = ("light water stone bread house river mountain garden morning evening silver golden "
             "window people city road field summer winter child").split()
    verses = [f"  {i} And the {rng.choice(words)} was {rng.choice(words)}, and the {rng.choice(words)} "
              f"came unto the {rng.choice(words)} in {i + 1} days." for i in range(1, 80)]
    kjv = tmp_path / "kjv.txt"
    kjv.write_text("\nGenesis 1\n\n" + "\n".join(verses) + "\n")
    wn = tmp_path / "wordnet"
    wn.mkdir()
    lines = [f'{i:08d} 03 n 01 thing 0 000 | gloss; "the {rng.choice(words)} near the {rng.choice(words)} is {rng.choice(words)}"'
             for i in range(80)]
    (wn / "data.noun").write_text("\n".join(lines) + "\n")
    for pos in ("verb", "adj", "adv"):
        (wn / f"data.{pos}").write_text("")
    return kjv, wn


def _fake_real(tmp_path: Path) -> Path:
    """A real-speech folder in the shared format: 3 speakers (in a source folder that
    recipes/real/prepare.py's fixed split knows) and one misc recording."""
    real = tmp_path / "real"
    rows = []
    for spk, n in (("alice", 4), ("bob", 1), ("carol", 1)):
        for i in range(n):
            rel = f"audio/speechocean/{spk}/{spk}_{i}.flac"
            (real / rel).parent.mkdir(parents=True, exist_ok=True)
            sf.write(real / rel, _tone_bursts(16000) * 0.5, 16000)
            rows.append({"id": f"{spk}_{i}", "audio": rel, "duration": 1.5, "text": "one two", "speaker": spk})
    (real / "audio/misc").mkdir(parents=True)
    sf.write(real / "audio/misc/goforward.flac", _tone_bursts(16000), 16000)
    rows.append({"id": "goforward", "audio": "audio/misc/goforward.flac", "duration": 1.5,
                 "text": "go forward ten meters", "speaker": "ps"})
    (real / "manifest.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return real


@needs_engines
def test_prepare_and_pack_end_to_end(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    prepare = _load(SYNTH / "prepare.py", "synthetic_prepare")
    kjv, wn = _fake_sources(tmp_path)
    real = _fake_real(tmp_path)
    out = tmp_path / "synth"
    rc = prepare.main(["--out", str(out), "--hours", "0.0015", "--dev-hours", "0.0005", "--test-hours", "0.0005",
                       "--rirs", "0", "--jobs", "2", "--kjv-text", str(kjv), "--wordnet-dir", str(wn),
                       "--max-source-sentences", "80", "--exclude-manifest", str(real / "manifest.jsonl")])
    assert rc == 0
    from asr.data.manifest import read_manifest

    m = {s: read_manifest(out / f"{s}.jsonl") for s in ("train", "dev", "test")}
    assert 1 <= len(m["train"]) <= 4 and len(m["dev"]) >= 1 and len(m["test"]) >= 1
    for split, entries in m.items():
        for e in entries:
            info = sf.info(e["audio"])
            assert (info.format, info.subtype, info.samplerate, info.channels) == ("OGG", "OPUS", 16000, 1)
            assert abs(info.frames / 16000 - e["duration"]) < 1e-3
            assert 0.3 < e["duration"] < 20
            assert textnorm.is_valid_transcript(e["text"])
            x, _ = sf.read(e["audio"], dtype="float32")
            assert np.abs(x).max() > 0.01, "audible"
            assert e["text"] != "go forward ten meters"
    # Held-out voices only in test; sentences disjoint between the splits.
    test_voices = {e["speaker"] for e in m["test"]}
    train_voices = {e["speaker"] for e in m["train"] + m["dev"]}
    assert not test_voices & train_voices
    for e in m["test"]:
        assert e["speaker"] == "flite:rms" or e["speaker"].split("+")[1] in prepare.HELD_OUT_VARIANTS
    texts_by = {s: {e["text"] for e in es} for s, es in m.items()}
    assert not texts_by["test"] & (texts_by["train"] | texts_by["dev"])
    assert not texts_by["dev"] & texts_by["train"]
    # Same seed, same corpus (the jobs are drawn in the main process, not by the workers).
    jobs_a = prepare.make_jobs("train", {"kjv": [("a b c", "a b c")], "wordnet": [("d e", "d e")],
                                         "commands": [("f", "f")], "numbers": [("one", "one")]}, ["m1", "m3", "f4"], 0, 20)
    jobs_b = prepare.make_jobs("train", {"kjv": [("a b c", "a b c")], "wordnet": [("d e", "d e")],
                                         "commands": [("f", "f")], "numbers": [("one", "one")]}, ["m1", "m3", "f4"], 0, 20)
    assert jobs_a == jobs_b
    assert all(j.get("variant") in (None, "m1") and j["voice"] != "rms" for j in jobs_a)

    # Pack: real data split speaker-disjoint, misc kept apart, everything Opus, within the size limit.
    pack = _load(REPO / "recipes" / "bundled" / "prepare.py", "prepare")
    bundle = tmp_path / "bundle"
    assert pack.main(["--synthetic", str(out), "--real", str(real), "--out", str(bundle), "--max-mib", "1",
                      "--jobs", "2"]) == 0
    b = {name: read_manifest(bundle / f"{name}.jsonl")
         for name in ("train", "dev", "dev_real", "dev_synth", "test", "misc")}
    assert [e["id"] for e in b["misc"]] == ["goforward"]
    assert "goforward" not in {e["id"] for e in b["train"] + b["dev"] + b["test"]}
    real_train_spk = {e["speaker"] for e in b["train"] if not e["id"].startswith("synth-")}
    assert real_train_spk and not real_train_spk & {e["speaker"] for e in b["dev_real"]}
    assert len(b["dev"]) == len(b["dev_real"]) + len(b["dev_synth"])
    assert {e["id"] for e in b["test"]} == {e["id"] for e in m["test"]}
    for e in b["train"] + b["dev"] + b["test"] + b["misc"]:
        assert Path(e["audio"]).resolve().is_relative_to(bundle.resolve())
        assert sf.info(e["audio"]).subtype == "OPUS"
        assert set(e) == {"id", "audio", "duration", "text", "speaker"}
    assert sum(p.stat().st_size for p in bundle.rglob("*") if p.is_file()) < 2**20
    stats = json.loads((bundle / "stats.json").read_text())
    assert stats["parts"]["misc"]["utterances"] == 1
    # A budget too small for all synthetic training audio keeps fewer utterances, never breaks the limit.
    full = sum(p.stat().st_size for p in bundle.rglob("*") if p.is_file())
    train_audio = stats["parts"]["synth_train"]["audio_bytes"]
    small = tmp_path / "bundle_small"
    monkeypatch.setattr(pack, "RESERVE_BYTES", 4096)  # README + stats of this tiny bundle take < 3 KB
    limit = full - train_audio // 2
    assert pack.main(["--synthetic", str(out), "--real", str(real), "--out", str(small),
                      "--max-mib", f"{limit / 2**20:.9f}", "--jobs", "1"]) == 0
    assert json.loads((small / "stats.json").read_text())["synth_train_left_out"] >= 1
    assert sum(p.stat().st_size for p in small.rglob("*") if p.is_file()) <= limit
    # A budget that cannot even hold the fixed parts is an error, not a bundle without training audio.
    assert pack.main(["--synthetic", str(out), "--real", str(real), "--out", str(tmp_path / "b3"),
                      "--max-mib", "0.001", "--jobs", "1"]) == 1
