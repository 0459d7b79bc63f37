"""tools/build_lm.py's preset build: its text sources, what it must exclude, the size bound."""
import json
import lzma
import random
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tools"))
sys.path.insert(0, str(REPO / "recipes" / "synthetic"))

_prepare = sys.modules.get("prepare")
import build_lm  # noqa: E402
import lm_text  # noqa: E402

# lm_text imports recipes/synthetic/prepare.py as "prepare"; tests/test_synthetic_recipe.py loads
# recipes/bundled/prepare.py under that name, so the name is left as it was (lm_text keeps its own).
if _prepare is None:
    sys.modules.pop("prepare", None)
else:
    sys.modules["prepare"] = _prepare

from asr.decode.lexicon import arpa_vocabulary  # noqa: E402
from asr.decode.ngram import BOS, EOS  # noqa: E402

BOOK = ["the old man walked slowly to the river", "she read the letter twice", "the river was cold and dark",
        "he said nothing at all", "they walked home in the rain"]


def fake_sources(tmp_path: Path) -> tuple[Path, Path]:
    """A tiny KJV text and WordNet folder (the synthetic recipe's sources need Debian packages)."""
    rng = random.Random(3)
    words = "light water stone bread house river garden morning evening silver window people".split()
    kjv = tmp_path / "kjv.txt"
    kjv.write_text("Genesis 1\n" + "".join(f"  {i} And the {rng.choice(words)} was {rng.choice(words)}.\n"
                                         for i in range(1, 80)))
    wn = tmp_path / "wordnet"
    wn.mkdir()
    (wn / "data.noun").write_text("".join(f'{i:08d} 03 n 01 thing 0 000 | gloss; "the {rng.choice(words)} is '
                                          f'{rng.choice(words)}"\n' for i in range(80)))
    for pos in ("verb", "adj", "adv"):
        (wn / f"data.{pos}").write_text("")
    return kjv, wn


def arpa_grams(path: Path) -> set[tuple[str, ...]]:
    with lzma.open(path, "rt") if path.suffix == ".xz" else open(path) as f:
        return {tuple(line.split("\t")[1].split()) for line in f if line.count("\t") >= 1}


@pytest.fixture
def preset(tmp_path, monkeypatch):
    """A preset like conf/lm/bundled.yaml over tiny inputs; returns (name, synthetic spec, real manifest)."""
    kjv, wn = fake_sources(tmp_path)
    synthetic = {"sources": ["commands", "numbers"], "seed": 0, "dev_hours": 0.0005, "test_hours": 0.0005,
                 "kjv_text": str(kjv), "wordnet_dir": str(wn), "max_source_sentences": 80}
    real, oov = tmp_path / "real.jsonl", tmp_path / "oov.jsonl"
    for path, texts in ((real, ["Zebras graze quietly!", "she read the letter twice", "the river was cold"]),
                        (oov, ["Zebras graze quietly!", "the river was cold"])):
        path.write_text("".join(json.dumps({"id": f"r{i}", "audio": "a.wav", "duration": 1.0, "text": t}) + "\n"
                                for i, t in enumerate(texts)))
    book = tmp_path / "book.txt.xz"
    train, held_out = lm_text.training_text(0, 0.0005, 0.0005, [real], kjv, wn, 80)
    short_held_out = sorted(s for s in held_out if len(s.split()) <= 5)[:5]
    with lzma.open(book, "wt") as f:  # the book also holds evaluation sentences: they must go
        f.write("\n".join(BOOK + ["zebras graze quietly"] + short_held_out) + "\n")
    conf = tmp_path / "conf"
    conf.mkdir()
    (conf / "tiny.yaml").write_text(json.dumps({
        "text": [str(book)], "synthetic": synthetic, "exclude_manifest": [str(real)], "oov_manifest": [str(oov)],
        "order": 7, "prune": [0], "max_vocab": 100000}))
    monkeypatch.setattr(build_lm, "PRESET_DIR", conf)
    return "tiny", train, short_held_out


def test_preset_build_keeps_evaluation_sentences_out(preset, tmp_path, capsys):
    name, train, short_held_out = preset
    assert short_held_out, "the fake sources give short dev/test sentences"
    out = tmp_path / "lm.arpa.xz"
    assert build_lm.main(["--preset", name, "--out", str(out)]) == 0
    grams = arpa_grams(out)
    whole = lambda s: (BOS, *s.split(), EOS)  # noqa: E731  (order 7: a whole short sentence is one n-gram)
    assert whole("he said nothing at all") in grams  # the book
    assert any(whole(s) in grams for s in train["commands"] if len(s.split()) <= 5)  # the commands
    assert any(whole(s) in grams for s in train["numbers"] if len(s.split()) <= 5)  # the numbers
    assert not any(whole(s) in grams for s in short_held_out)  # synthetic dev/test: gone from the book too
    assert whole("she read the letter twice") not in grams  # a real transcript
    assert "zebras" not in arpa_vocabulary(_plain(out, tmp_path))
    assert not {s for s in train["kjv"] + train["wordnet"]} & {" ".join(g[1:-1]) for g in grams if g[0] == BOS}
    report = capsys.readouterr().out
    assert "OOV 42.86 % of the 7 words" in report  # "zebras graze quietly" unknown, "the river was cold" known


def _plain(path: Path, tmp_path: Path) -> Path:
    plain = tmp_path / "plain.arpa"
    plain.write_bytes(lzma.open(path).read())
    return plain


def test_vocabulary_cap_and_pruning_shrink_the_model_and_the_bound_holds(preset, tmp_path, capsys):
    name = preset[0]
    full, small = tmp_path / "full.arpa", tmp_path / "small.arpa"
    assert build_lm.main(["--preset", name, "--order", "3", "--out", str(full)]) == 0
    assert build_lm.main(["--preset", name, "--order", "3", "--prune", "0", "1", "--max-vocab", "20",
                          "--out", str(small)]) == 0
    assert len(arpa_vocabulary(small)) == 20 < len(arpa_vocabulary(full))
    assert small.stat().st_size < full.stat().st_size / 2
    capsys.readouterr()
    bounded = tmp_path / "bounded.arpa"
    assert build_lm.main(["--preset", name, "--order", "3", "--max-xz-mb", "0.001", "--out", str(bounded)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "over the bound of 0.001 MB" in err[0] and not bounded.exists()


@pytest.mark.parametrize("args,message", [
    (["--preset", "nonexistent"], "no preset 'nonexistent'"),
    (["--text", "missing.txt"], "missing.txt"),
    (["--text", "{book}", "--prune", "0", "2", "1"], "--prune"),
])
def test_bad_input_is_one_line(args, message, tmp_path, capsys):
    book = tmp_path / "book.txt"
    book.write_text("\n".join(BOOK) + "\n")
    args = [a.format(book=book) for a in args]
    assert build_lm.main(args + ["--out", str(tmp_path / "x.arpa")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("build_lm: error:") and message in err[0]


def test_an_exported_model_reexports_with_a_new_lm_and_the_same_weights(tmp_path, capsys, build_binary):
    """The bundled LM is swapped by exporting the shipped model again: its int8 weights must come
    through unchanged (re-quantising int8-restored weights is exact) and the new LM replace the old."""
    import export_model
    import torch

    bundled = REPO / "asr" / "pretrained" / "model.pt"
    if not bundled.is_file():
        pytest.skip("no bundled model in this checkout")
    book = tmp_path / "book.txt"
    book.write_text("\n".join(BOOK) + "\n")
    lm, out = tmp_path / "lm.arpa.xz", tmp_path / "model.pt"
    assert build_lm.main(["--text", str(book), "--out", str(lm)]) == 0
    assert export_model.main([str(bundled), str(out), "--int8-weights", "--lm", str(lm)]) == 0
    old, new = (torch.load(p, weights_only=True) for p in (bundled, out))
    assert old["model_int8"].keys() == new["model_int8"].keys()
    for name, packed in old["model_int8"].items():
        assert torch.equal(packed["q"], new["model_int8"][name]["q"]), name
        assert torch.equal(packed["scale"], new["model_int8"][name]["scale"]), name
    assert all(torch.equal(t, new["model"][name]) for name, t in old["model"].items())
    from asr.decode.lexicon import plain_arpa
    from asr.decode.packed_lm import PackedLM

    assert "lm_arpa_xz" not in new
    with plain_arpa(lm) as arpa:
        assert sorted(PackedLM.from_checkpoint(new["lm"]).words) == sorted(arpa_vocabulary(arpa))


def test_lm_text_writes_only_the_sources_asked_for(preset, tmp_path, capsys):
    _, train, _ = preset
    kjv, wn = tmp_path / "kjv.txt", tmp_path / "wordnet"
    out = tmp_path / "commands.txt"
    assert lm_text.main(["--out", str(out), "--sources", "commands,numbers", "--kjv-text", str(kjv),
                         "--wordnet-dir", str(wn), "--max-source-sentences", "80", "--dev-hours", "0.0005",
                         "--test-hours", "0.0005", "--exclude-manifest", str(tmp_path / "real.jsonl")]) == 0
    assert out.read_text().splitlines() == train["commands"] + train["numbers"]
    with pytest.raises(SystemExit):
        lm_text.main(["--out", str(out), "--sources", "commands,psalms"])
    assert "sources are some of" in capsys.readouterr().err


def test_tune_lm_picks_a_fixed_subset_per_part():
    import tune_lm

    entries = [{"id": f"{p}_{i}", "audio": f"/data/real/audio/{p}/x{i}.opus", "text": "a", "duration": 1.0}
               for p in ("librispeech", "mfa", "an4") for i in range(10)]
    chosen = tune_lm.select(entries, ["mfa", "an4"], 4, seed=0)
    assert [tune_lm.part_of(e) for e in chosen] == ["mfa"] * 4 + ["an4"] * 4
    assert chosen == tune_lm.select(entries, ["mfa", "an4"], 4, seed=0)  # reproducible
    assert chosen != tune_lm.select(entries, ["mfa", "an4"], 4, seed=1)
    assert len(tune_lm.select(entries, None, None, seed=0)) == 30
