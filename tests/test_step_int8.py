"""int8 inference (``CTCModel.prepare_for_inference(int8=True)``): close to float32, independent of
batching, and behind ``load_model(int8=True)``, ``asr-transcribe --int8`` and ``asr-live --int8``.

int8 cannot equal float32 bit for bit; these tests hold it to stated tolerances. About cutting the
audio: activation scales are per row (per frame of each stream), so a frame's quantization never
depends on the other frames or streams of a call; the block step on the same rows gives the same
result whatever else is in the batch (exact, below). Across different cuttings of a stream the
float inputs of the quantizers can still differ by float rounding (the subsampling and the wkv
have cutting-dependent summation orders, as in float32); where such a difference moves a value
across an int8 rounding boundary the output moves by one quantization step, and the recurrence
carries it on. So streamed int8 equals one int8 pass to the size of the quantization noise, not
to float rounding, and the tests bound it so.
"""
import random
import subprocess

import pytest
import torch
from test_step_fast import cuts, random_model, rel_err, run

from asr.model.rwkv7 import packed_step


def int8_model(seed: int = 0, **sizes):
    model = random_model(seed, **sizes)
    assert model.prepare_for_inference(int8=True)
    return model


@pytest.mark.parametrize("seed", range(3))
def test_int8_step_is_close_to_float32_for_random_chunkings(seed):
    model = random_model(seed, **({"head_size": 32} if seed == 2 else {}))
    feats = torch.randn(2, 150, 80) * 3 - 8
    sizes = cuts(150, random.Random(seed))
    want = run(model, feats, sizes, fast=True)  # float32 packed
    model.prepare_for_inference(int8=True)
    got = run(model, feats, sizes, fast=True)
    assert got.shape == want.shape
    # random weights of std 0.1 amplify errors more than trained ones (~0.7 % there, BENCHMARKS.md)
    assert rel_err(got, want) < 0.08
    assert (got.argmax(-1) == want.argmax(-1)).float().mean() > 0.9
    # the general path is the float32 reference, also in int8 mode
    assert rel_err(run(model, feats, sizes, fast=False), want) < 1e-5
    # and switching back gives float32 again
    model.prepare_for_inference(int8=False)
    assert rel_err(run(model, feats, sizes, fast=True), want) < 1e-6


@pytest.mark.parametrize("seed", range(3))
def test_int8_streaming_equals_one_int8_pass_to_quantization_noise(seed):
    model = int8_model(seed)
    feats = torch.randn(2, 150, 80) * 3 - 8
    one = run(model, feats, [150], fast=True)
    with torch.no_grad():  # forward in int8 mode is the same packed int8 pass
        offline, _ = model(feats, torch.tensor([150, 150]))
    assert rel_err(offline, one) < 1e-6
    for sizes in (cuts(150, random.Random(seed)), [4] * 37 + [2]):
        got = run(model, feats, sizes, fast=True)
        assert got.shape == one.shape
        assert rel_err(got, one) < 0.03
        assert (got.argmax(-1) == one.argmax(-1)).float().mean() > 0.9


def test_int8_block_step_is_independent_of_the_batch():
    """Per-row activation scales: a stream's rows give the same block output alone or next to a
    100x louder stream (per-call scales would crush the quiet stream's resolution)."""
    model = int8_model(9)
    block_packs = model._packed_blocks()
    torch.manual_seed(0)
    C = model.config.d_model
    x = torch.randn(1, C)
    loud = torch.randn(2, C) * 100
    with torch.inference_mode():
        alone = model.init_state(1).blocks
        batch = model.init_state(3).blocks
        xa, xb, va, vb = x, torch.cat([x, loud]), None, None
        for p, sa, sb in zip(block_packs, alone, batch):
            xa, sa2, va = packed_step(p, xa, sa, va, 1, 1)
            xb, sb2, vb = packed_step(p, xb, sb, vb, 3, 1)
            torch.testing.assert_close(xb[:1], xa, rtol=1e-6, atol=1e-6)
            torch.testing.assert_close(sb2.wkv[:1], sa2.wkv, rtol=1e-6, atol=1e-6)


def test_int8_needs_a_float32_cpu_model():
    model = random_model(1).double()
    with pytest.raises(ValueError, match="float32"):
        model.prepare_for_inference(int8=True)
    assert not model.int8_inference


def test_int8_greedy_tokens_on_the_overfit_model(overfit_checkpoint):
    """The tiny model that recognises tests/data: int8 greedy decoding gives the same tokens as
    float32, one pass and frame by frame."""
    from conftest import read_test_manifest

    from asr.audio import load_audio
    from asr.decode.greedy import ctc_greedy
    from asr.features import compute_fbank
    from asr.model_file import load_for_inference

    model, tok = load_for_inference(overfit_checkpoint)
    for e in read_test_manifest():
        feats = compute_fbank(load_audio(e["audio"])).unsqueeze(0)
        model.prepare_for_inference(int8=False)
        want = run(model, feats, [feats.shape[1]], fast=True)
        model.prepare_for_inference(int8=True)
        for sizes in ([feats.shape[1]], cuts(feats.shape[1], random.Random(1)), [4] * (feats.shape[1] // 4 + 1)):
            got = run(model, feats, sizes, fast=True)
            assert rel_err(got, want) < 0.05
            assert ctc_greedy(got[0])[0] == ctc_greedy(want[0])[0]
            assert tok.decode(ctc_greedy(got[0])[0]) == e["text"]


def test_load_model_int8_and_cli_flags(overfit_checkpoint, capsys, tmp_path):
    from test_live_mic import DATA, LIVE, env_for_child

    import asr
    from asr.cli import transcribe as cli

    wav = DATA / "audio/pocketsphinx_goforward.flac"
    m = asr.load_model(overfit_checkpoint, int8=True)
    assert m.model.int8_inference
    assert m.transcribe(wav).text == "go forward ten meters"
    assert not asr.load_model(overfit_checkpoint).model.int8_inference
    if not torch.cuda.is_available():
        with pytest.raises(ValueError):
            asr.load_model(overfit_checkpoint, device="cuda", int8=True)
    assert cli.main([str(wav), "--model", str(overfit_checkpoint), "--int8", "--no-progress"]) == 0
    assert capsys.readouterr().out.strip() == "go forward ten meters"
    out = tmp_path / "finals.txt"
    r = subprocess.run(LIVE + ["--model", str(overfit_checkpoint), "--input", str(wav), "--fast", "--int8",
                               "--output", str(out)], capture_output=True, text=True, env=env_for_child(), timeout=120)
    assert r.returncode == 0, r.stderr
    assert out.read_text().splitlines() == ["go forward ten meters"]


@pytest.mark.parametrize("seed", range(2))
def test_int8_front_end_streams_as_one_pass_and_stays_near_float32(seed):
    """int8 mode also runs the subsampling's conv2 and projection in int8 (``Int8Frontend``).
    Streamed in random pieces (small calls take the unfolded-window path, large ones nn.Conv2d
    for conv1) it gives one int8 pass to quantization noise, and stays near the float32 front end."""
    model = int8_model(seed, subsample_channels=32)
    model._packed_blocks()
    pack = model._int8_frontend()
    assert pack is not None and pack.proj.q.dtype == torch.int8
    sub = model.subsampling
    feats = model.cmvn(torch.randn(2, 301, 80) * 3 - 8)
    with torch.no_grad():
        one = sub(feats, int8=pack)
        assert rel_err(one, sub(feats)) < 0.03  # int8 against float32
        for sizes in (cuts(301, random.Random(seed)), [4] * 75 + [1], [200, 101]):
            outs, caches, pos = [], (None, None), 0
            for n in sizes:
                y, caches = sub.stream(feats[:, pos : pos + n], caches, int8=pack)
                outs.append(y)
                pos += n
            got = torch.cat(outs, dim=1)
            assert got.shape == one.shape
            assert rel_err(got, one) < 1e-3  # 0 on the dev box: the same windows, quantized alike
    model.prepare_for_inference(int8=False)
    model._packed_blocks()
    assert model._int8_frontend() is None
