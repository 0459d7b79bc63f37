"""ONNX export (asr.export.onnx) and its ONNX Runtime encoder (asr.export.runtime) against the
PyTorch model: same logits to float rounding, same frames emitted at the same calls, streaming
under random cuts equal to one pass; int8 within int8 rounding with the same greedy tokens."""
from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

from conftest import read_test_manifest, rel_err  # noqa: E402

from asr.audio import load_audio  # noqa: E402
from asr.cli.export import main as export_main  # noqa: E402
from asr.decode.greedy import ctc_greedy  # noqa: E402
from asr.export.onnx import export_onnx  # noqa: E402
from asr.export.runtime import OnnxEncoder, OnnxExportError  # noqa: E402
from asr.features import compute_fbank  # noqa: E402
from asr.model import CTCModel, ModelConfig  # noqa: E402
from asr.model_file import load_for_inference  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


def random_model(seed: int = 0) -> CTCModel:
    """A tiny model with every weight non-zero (the reference init zeroes some matrices)."""
    torch.manual_seed(seed)
    model = CTCModel(ModelConfig(vocab_size=30, d_model=64, n_layers=2, head_size=32, subsample_channels=16))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
        model.cmvn.set_stats(torch.full((80,), 5.0), torch.full((80,), 2.0))
    return model.eval()


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    model = random_model()
    folder = tmp_path_factory.mktemp("onnx") / "tiny"
    export_onnx(model, folder, frames=(1, 4), int8=True)
    return model, folder


def features(batch: int, frames: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, frames, 80, generator=torch.Generator().manual_seed(seed)) * 2 + 5


def test_streaming_random_cuts_match_model_step(exported, tmp_path):
    """Every call emits the frames CTCModel.step emits for the same cut, with its logits; the
    whole stream equals the model's one pass and OnnxEncoder.forward."""
    model, folder = exported
    enc = OnnxEncoder(folder, cache_dir=tmp_path)
    x = features(2, 157)
    rng = random.Random(0)
    state, ref_state, outs, pos = enc.init_state(2), model.init_state(2), [], 0
    while pos < x.shape[1]:
        n = rng.choice([0, 1, 2, 3, 4, 5, 9, 17])
        got, state = enc.step(x[:, pos : pos + n], state)
        with torch.no_grad():
            want, ref_state = model.step(x[:, pos : pos + n], ref_state)
        assert got.shape == want.shape
        if want.shape[1]:
            assert rel_err(got, want) < 1e-4
        outs.append(got)
        pos += n
    assert state.frames_out == ref_state.frames_out
    with torch.no_grad():
        full, lengths = model(x, torch.tensor([157, 157]))
    assert rel_err(torch.cat(outs, dim=1), full) < 1e-4
    one_pass, one_lengths = enc.forward(x, torch.tensor([157, 157]))
    assert torch.equal(one_lengths, lengths)
    assert rel_err(one_pass, full) < 1e-4


def test_forward_padded_batch_matches_model(exported, tmp_path):
    model, folder = exported
    enc = OnnxEncoder(folder, cache_dir=None)
    x, lengths = features(3, 61, seed=2), torch.tensor([61, 40, 1])
    with torch.no_grad():
        want, want_len = model(x, lengths)
    got, got_len = enc.forward(x, lengths)
    assert torch.equal(got_len, want_len) and got.shape == want.shape
    for b, n in enumerate(want_len.tolist()):
        assert rel_err(got[b, :n], want[b, :n]) < 1e-4


def test_int8_close_to_float_and_streaming_close_to_one_pass(exported, tmp_path):
    """ONNX Runtime's dynamic int8 scales activations per call, so the 4-frame graph and the
    one-frame graph round differently: equal to int8 rounding, not bit for bit."""
    model, folder = exported
    enc = OnnxEncoder(folder, int8=True, cache_dir=tmp_path, step_frames=(1,))
    x = features(1, 120, seed=3)
    with torch.no_grad():
        ref, _ = model(x, torch.tensor([120]))
    stream, state = [], enc.init_state(1)
    for pos in range(0, 120, 4):
        out, state = enc.step(x[:, pos : pos + 4], state)
        stream.append(out)
    stream = torch.cat(stream, dim=1)
    one_pass, _ = enc.forward(x, torch.tensor([120]))
    assert stream.shape == one_pass.shape == ref.shape
    assert rel_err(stream, ref) < 0.05 and rel_err(one_pass, ref) < 0.05
    assert rel_err(stream, one_pass) < 0.05


def test_trained_model_same_greedy_tokens(overfit_checkpoint, tmp_path):
    """On a model that recognises the test recordings, float32 and int8 ONNX Runtime decode the
    same tokens as PyTorch, streaming 40 ms at a time."""
    model, _ = load_for_inference(overfit_checkpoint)
    export_onnx(model, tmp_path / "m", frames=(1, 16), int8=True)
    for entry in read_test_manifest():
        x = compute_fbank(load_audio(entry["audio"]))[None]
        lengths = torch.tensor([x.shape[1]])
        with torch.no_grad():
            ref, ref_len = model(x, lengths)
        want = ctc_greedy(ref, ref_len)[0]
        for int8 in (False, True):
            enc = OnnxEncoder(tmp_path / "m", int8=int8, cache_dir=tmp_path / "cache")
            state, outs = enc.init_state(1), []
            for pos in range(0, x.shape[1], 4):
                out, state = enc.step(x[:, pos : pos + 4], state)
                outs.append(out)
            stream = torch.cat(outs, dim=1)
            assert ctc_greedy(stream, ref_len)[0] == want, (entry["id"], int8)
            one_pass, out_len = enc.forward(x, lengths)
            assert ctc_greedy(one_pass, out_len)[0] == want, (entry["id"], int8)


def test_optimized_graph_cache_is_written_then_read(exported, tmp_path):
    model, folder = exported
    x = features(1, 24, seed=4)
    first = OnnxEncoder(folder, cache_dir=tmp_path / "cache")
    cached = list((tmp_path / "cache").glob("*.onnx"))
    assert len(cached) == 1
    mtime = cached[0].stat().st_mtime_ns
    second = OnnxEncoder(folder, cache_dir=tmp_path / "cache")
    assert cached[0].stat().st_mtime_ns == mtime
    assert torch.equal(first.forward(x, torch.tensor([24]))[0], second.forward(x, torch.tensor([24]))[0])


def test_not_an_export_is_a_clear_error(tmp_path):
    with pytest.raises(OnnxExportError, match="not an ONNX export"):
        OnnxEncoder(tmp_path)


def test_cli_writes_an_export_and_rejects_bad_input(overfit_checkpoint, tmp_path, capsys):
    assert export_main([str(overfit_checkpoint), str(tmp_path / "out"), "--format", "onnx", "--frames", "1",
                        "--no-int8"]) == 0
    assert (tmp_path / "out" / "encoder_step1.onnx").is_file()
    assert (tmp_path / "out" / "tokenizer.model").is_file()
    assert not (tmp_path / "out" / "encoder_step1.int8.onnx").exists()
    assert export_main([str(tmp_path / "missing.pt"), str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("asr-export: error:")
    assert export_main([str(overfit_checkpoint), str(tmp_path / "y"), "--frames", "0"]) == 2


def test_bundled_model_step_matches(tmp_path):
    """The bundled model (8 x 320): the exported one-frame step equals model.step on 1 s of speech."""
    model, _ = load_for_inference(Path(__file__).resolve().parents[1] / "asr" / "pretrained" / "model.pt")
    export_onnx(model, tmp_path / "b", frames=(1,), int8=False)
    enc = OnnxEncoder(tmp_path / "b", cache_dir=None)
    entry = read_test_manifest()[0]
    x = compute_fbank(load_audio(entry["audio"]))[None, :100]
    assert x.shape[1] > 40
    state, ref_state = enc.init_state(1), model.init_state(1)
    for pos in range(0, x.shape[1], 4):
        got, state = enc.step(x[:, pos : pos + 4], state)
        with torch.no_grad():
            want, ref_state = model.step(x[:, pos : pos + 4], ref_state)
        assert got.shape == want.shape == (1, 1, model.config.vocab_size) and rel_err(got, want) < 1e-4
