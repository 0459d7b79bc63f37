"""tools/bench_accuracy.py: the side-by-side WER table of our model and pocketsphinx (real run on 3
short recordings, plus the scoring on hand-made hypotheses). CI installs pocketsphinx (pyproject.toml's
``dev`` extra), so this test does not skip without it."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DATA = Path(__file__).parent / "data"


def _bench():
    spec = importlib.util.spec_from_file_location("bench_accuracy", REPO / "tools" / "bench_accuracy.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _dev_dir(tmp_path: Path) -> Path:
    """dev_digits.jsonl (the FSDD "seven") and dev_commands.jsonl (two pocketsphinx test phrases)."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    lines = [json.loads(line) for line in (DATA / "manifest.jsonl").read_text().splitlines() if line.strip()]
    for e in lines:
        e["audio"] = str(DATA / e["audio"])
    (tmp_path / "dev_digits.jsonl").write_text(json.dumps(lines[0]) + "\n")
    (tmp_path / "dev_commands.jsonl").write_text("".join(json.dumps(e) + "\n" for e in lines[1:]))
    return tmp_path


def test_bench_runs_both_systems_on_the_same_audio(tmp_path: Path, capsys) -> None:
    bench = _bench()
    out = tmp_path / "bench.json"
    dev = _dev_dir(tmp_path / "dev")
    assert bench.main(["--dev-dir", str(dev), "--parts", "digits,commands", "--jobs", "1", "--json", str(out)]) == 0
    table = capsys.readouterr().out
    assert "| pocketsphinx |" in table.splitlines()[0] and "ours (bundled LM)" in table.splitlines()[0]
    assert "| digits | 1 |" in table and "| commands | 2 |" in table and "real-time factor" in table
    payload = json.loads(out.read_text())
    utts = payload["utterances"]
    assert len(utts) == 3 * 3  # 3 utterances x 3 systems
    assert {u["system"] for u in utts} == {"ours-lm", "ours-greedy", "pocketsphinx"}
    ps = {u["id"]: u["hyp"] for u in utts if u["system"] == "pocketsphinx"}
    assert "forward" in ps["pocketsphinx_goforward"]  # pocketsphinx's own test recording: it recognises it
    for system, numbers in payload["table"].items():
        rows = numbers["rows"]
        assert rows["all (pooled)"]["words"] == 1 + 4 + 3
        assert rows["all (pooled)"]["errors"] == rows["digits"]["errors"] + rows["commands"]["errors"]
        assert 0.0 < numbers["rtf"] < 5.0, system


def test_bench_scores_pooled_rows_by_words() -> None:
    bench = _bench()
    refs = {"a": "one two three four", "b": "yes", "c": "the cat sat"}
    results = [
        {"id": "a", "part": "librispeech", "system": "x", "hyp": "one two three four", "cpu_s": 1.0, "audio_s": 10.0},
        {"id": "b", "part": "commands", "system": "x", "hyp": "<sil> no [noise]", "cpu_s": 0.5, "audio_s": 1.0},
        {"id": "c", "part": "read", "system": "x", "hyp": "The cat, sat!", "cpu_s": 0.5, "audio_s": 4.0},
    ]
    rows = bench.score(results, refs, ["x"], ["read", "librispeech", "commands"])["x"]["rows"]
    assert rows["read"]["wer"] == 0.0  # case and punctuation are normalised away
    assert rows["commands"]["wer"] == 100.0 and rows["commands"]["errors"] == 1  # fillers dropped
    assert rows["native read"]["words"] == 7 and rows["native read"]["wer"] == 0.0
    assert rows["all (pooled)"]["wer"] == pytest.approx(100.0 / 8)
    assert rows["mean of parts"]["wer"] == pytest.approx(100.0 / 3)
    assert bench.score(results, refs, ["x"], ["read"])["x"]["rtf"] == pytest.approx(2.0 / 15.0)


def test_bench_rejects_bad_input(tmp_path: Path, capsys) -> None:
    bench = _bench()
    dev = _dev_dir(tmp_path)
    assert bench.main(["--dev-dir", str(dev), "--parts", "digits,poetry"]) == 2
    assert "unknown part poetry" in capsys.readouterr().err
    assert bench.main(["--dev-dir", str(dev), "--parts", "read"]) == 2
    assert "dev_read.jsonl not found" in capsys.readouterr().err
    assert bench.main(["--dev-dir", str(dev), "--parts", "digits", "--model", str(tmp_path / "nope.pt")]) == 2
    assert "no such file" in capsys.readouterr().err


def test_bench_resumes_from_its_cache(tmp_path: Path, capsys) -> None:
    bench = _bench()
    dev = _dev_dir(tmp_path / "dev")
    cache = tmp_path / "cache.jsonl"
    args = ["--dev-dir", str(dev), "--parts", "commands", "--systems", "ours-greedy", "--jobs", "1",
            "--cache", str(cache), "--json", str(tmp_path / "b.json")]
    assert bench.main(args) == 0
    lines = [json.loads(line) for line in cache.read_text().splitlines()]
    assert sorted(r["id"] for r in lines) == ["pocketsphinx_cards_001", "pocketsphinx_goforward"]
    # A rerun recognises nothing again: it takes the cached hypotheses (here edited to be right).
    refs = {"pocketsphinx_cards_001": "ten of clubs", "pocketsphinx_goforward": "go forward ten meters"}
    cache.write_text("".join(json.dumps(dict(r, hyp=refs[r["id"]])) + "\n" for r in lines))
    assert bench.main(args) == 0
    assert json.loads((tmp_path / "b.json").read_text())["table"]["ours-greedy"]["rows"]["commands"]["wer"] == 0.0
    assert len(cache.read_text().splitlines()) == 2
    # --max-utts takes a prefix of the same fixed order
    assert [e["id"] for e in bench.select([{"id": str(i)} for i in range(9)], 3)] == \
        [e["id"] for e in bench.spread_order([{"id": str(i)} for i in range(9)])][:3]
