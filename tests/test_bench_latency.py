"""tools/bench_stream.py --latency: the word emission delays it reports, on a tiny model that knows
the test recordings' words (so every word is recognised and greedy streaming equals the offline pass)."""
import importlib.util
from pathlib import Path

import pytest
from conftest import read_test_manifest

import asr
from asr.audio import load_audio

pytestmark = pytest.mark.usefixtures("one_thread")
ROOT = Path(__file__).resolve().parents[1]


def _bench():
    spec = importlib.util.spec_from_file_location("bench_stream", ROOT / "tools" / "bench_stream.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_words_show_in_the_block_that_completes_their_last_frame(overfit_checkpoint):
    bench = _bench()
    model = asr.load_model(overfit_checkpoint, lm=None)
    for entry in read_test_manifest()[:3]:
        wave = load_audio(entry["audio"])
        refs = bench.reference_words(model, wave, entry["text"])
        assert [r.word for r in refs] == entry["text"].split()
        seen, missed = bench.word_delays(model, wave, refs)
        assert missed == 0 and len(seen) == len(refs)
        assert all(by_partial for _, _, by_partial in seen)
        # no lookahead and nothing buffered: a word shows no later than the block holding its
        # aligned end (earlier when its last piece's aligned span runs over several frames)
        assert all(-1.0 < delay <= 1e-9 for delay, _, _ in seen), [d for d, _, _ in seen]
        assert all(with_compute >= delay for delay, with_compute, _ in seen)


def test_missing_recordings_are_a_one_line_error(tmp_path, capsys):
    rc = _bench().main(["--latency-only", "--latency-data", str(tmp_path)])
    assert rc == 1 and "no dev_*.jsonl in" in capsys.readouterr().err


def test_step_rows_ask_only_for_measured_groups_and_pair_each_engine_at_40_and_160_ms():
    bench = _bench()
    echo = type("Echo", (dict,), {"__getitem__": lambda self, key: key})()  # a row's timings: its key
    base = bench.step_rows(echo, set())
    assert [key for _, key in base] == ["step_ort_int8", "step_False", "step_True", "step_int8",
                                        "step4_ort_int8", "step4_False", "step4_True", "step4_int8"]
    every = bench.step_rows(echo, {"compiled", "onnx"})
    keys = [key for _, key in every]
    assert keys.index("recognizer_compiled") < keys.index("step_onnx") < keys.index("step4_ort_int8")
    at_160 = [(label, key) for label, key in every if key.startswith("step4_")]
    assert [key[len("step4_"):] for _, key in at_160] == [key[len("step_"):] for key in keys if key.startswith("step_")]
    assert all("160 ms (4 frames) per call, per 40 ms" in label for label, _ in at_160)
