"""The ARPA n-gram builder: a proper distribution after every context, ARPA backoff semantics."""
import io
import math

import pytest

from asr.decode.ngram import BOS, UNK, NGramCounts, build_arpa, prune_thresholds, top_words, write_arpa

SENTENCES = [
    "the cat sat on the mat",
    "the dog sat on the log",
    "a cat and a dog",
    "the cat ran",
    "on the mat the dog sat",
    "seven four two",
    "two two",
]


def read_arpa(text: str) -> tuple[dict, dict]:
    """ARPA text -> ({gram: log10 p}, {gram: log10 backoff}) as a reader (KenLM) sees it."""
    logp, backoff, section = {}, {}, None
    for line in text.splitlines():
        line = line.strip()
        if line.endswith("-grams:"):
            section = int(line[1])
            continue
        if not line or line.startswith("\\") or section is None or line.startswith("ngram"):
            continue
        fields = line.split("\t")
        gram = tuple(fields[1].split())
        logp[gram] = float(fields[0])
        if len(fields) > 2:
            backoff[gram] = float(fields[2])
    return logp, backoff


def score(logp: dict, backoff: dict, history: tuple, word: str) -> float:
    """log10 p(word | history) by ARPA's backoff rule."""
    if history + (word,) in logp:
        return logp[history + (word,)]
    if not history:
        return logp[(UNK,)]
    return backoff.get(history, 0.0) + score(logp, backoff, history[1:], word)


@pytest.mark.parametrize("order", [1, 2, 3, 4])
def test_every_context_gives_a_distribution(order):
    counts = NGramCounts(order).add_all(SENTENCES)
    buf = io.StringIO()
    write_arpa(counts, buf)
    logp, backoff = read_arpa(buf.getvalue())
    vocab = [g[0] for g in logp if len(g) == 1 and g[0] != BOS]
    assert UNK in vocab and "</s>" in vocab
    contexts = {()} | {g for g in logp if len(g) < order and g[-1] != "</s>"}
    for h in contexts:
        total = sum(10 ** score(logp, backoff, h, w) for w in vocab)
        assert total == pytest.approx(1.0, abs=1e-5), h


def test_seen_continuations_beat_unseen_ones():
    logp, backoff = (d[1:] for d in build_arpa(NGramCounts(3).add_all(SENTENCES)))
    flat_p = {g: v for d in logp for g, v in d.items()}
    flat_b = {g: v for d in backoff for g, v in d.items()}
    assert score(flat_p, flat_b, ("sat", "on"), "the") > score(flat_p, flat_b, ("sat", "on"), "cat")
    assert score(flat_p, flat_b, (BOS, "the"), "cat") > score(flat_p, flat_b, (BOS, "the"), "two")
    # Kneser-Ney: "mat" follows only "the", so as a new continuation it is less likely than "the"
    assert score(flat_p, flat_b, ("ran",), "mat") < score(flat_p, flat_b, ("ran",), "the")
    assert math.isfinite(score(flat_p, flat_b, ("zebra",), "quux"))


def test_build_lm_drops_excluded_sentences(tmp_path, capsys):
    """tools/build_lm.py: text and manifest sentences, normalised; an evaluation manifest's
    sentences never reach the model; bad input is one line and exit 2."""
    import json
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
    import build_lm

    from asr.decode.lexicon import arpa_vocabulary

    text = tmp_path / "train.txt"
    text.write_text("The cat sat.\nA dog ran\n")
    heldout = tmp_path / "test.jsonl"
    heldout.write_text(json.dumps({"id": "t1", "audio": "x.wav", "duration": 1.0, "text": "zebras graze"}) + "\n")
    train_manifest = tmp_path / "train.jsonl"
    train_manifest.write_text("".join(json.dumps({"id": f"u{i}", "audio": "x.wav", "duration": 1.0, "text": t}) + "\n"
                                      for i, t in enumerate(["zebras graze", "birds fly"])))
    out = tmp_path / "lm.arpa"
    assert build_lm.main(["--text", str(text), "--manifest", str(train_manifest), "--exclude-manifest", str(heldout),
                          "--order", "2", "--out", str(out)]) == 0
    assert sorted(arpa_vocabulary(out)) == ["a", "birds", "cat", "dog", "fly", "ran", "sat", "the"]
    capsys.readouterr()
    assert build_lm.main(["--text", str(tmp_path / "missing.txt"), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("build_lm: error:")


@pytest.mark.parametrize("order,prune", [(2, [0, 1]), (3, [0, 1, 1]), (3, [0, 0, 1]), (4, [0, 1, 2])])
def test_a_pruned_model_is_still_a_distribution_and_smaller(order, prune):
    counts = NGramCounts(order).add_all(SENTENCES * 2 + ["the cat sat on the log", "a dog ran"])
    full, _ = build_arpa(counts)
    pruned, _ = build_arpa(counts, prune)
    for k in range(2, order + 1):  # exactly the n-grams seen more often than the threshold stay
        assert set(pruned[k]) == {g for g, c in counts.raw[k].items() if c > prune[min(k, len(prune)) - 1]}
    assert sum(map(len, pruned)) < sum(map(len, full))
    buf = io.StringIO()
    write_arpa(counts, buf, prune)
    logp, backoff = read_arpa(buf.getvalue())
    vocab = [g[0] for g in logp if len(g) == 1 and g[0] != BOS]
    contexts = {()} | {g for g in logp if len(g) < order and g[-1] != "</s>"}
    for h in contexts:
        total = sum(10 ** score(logp, backoff, h, w) for w in vocab)
        assert total == pytest.approx(1.0, abs=1e-5), h


def test_prune_thresholds_follow_lmplz():
    assert prune_thresholds([0, 1], 4) == [0, 0, 1, 1, 1]
    assert prune_thresholds([], 3) == [0, 0, 0, 0]
    for bad in ([1, 1], [0, 2, 1], [0, -1]):
        with pytest.raises(ValueError):
            prune_thresholds(bad, 3)


def test_words_outside_the_vocabulary_count_as_unk():
    vocab = top_words(SENTENCES, 4)
    assert vocab == {"the", "cat", "dog", "on"}  # 5 words seen 3 times: ties go alphabetically
    counts = NGramCounts(2, vocab).add_all(SENTENCES)
    assert {g[0] for g in counts.raw[1]} == vocab | {BOS, "</s>", UNK}
    assert counts.raw[2][(UNK, "on")] == 2 and counts.raw[2][(UNK, "</s>")] == 6  # "sat on"; mat, log, ...


def test_fewer_decimals_stay_a_distribution():
    counts = NGramCounts(3).add_all(SENTENCES)
    buf = io.StringIO()
    write_arpa(counts, buf, [0, 1, 1], decimals=3)
    logp, backoff = read_arpa(buf.getvalue())
    numbers = [v for line in buf.getvalue().splitlines() if "\t" in line for v in line.split("\t")[::2]]
    assert numbers and all(len(v.split(".")[1]) == 3 for v in numbers)
    vocab = [g[0] for g in logp if len(g) == 1 and g[0] != BOS]
    for h in [(), ("the",), ("the", "cat")]:
        assert sum(10 ** score(logp, backoff, h, w) for w in vocab) == pytest.approx(1.0, abs=0.01)
