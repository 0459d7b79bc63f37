"""Streaming equals offline for the whole model: subsampling, blocks, head, and the frontend too.

The rule (DESIGN.md): for any audio and any way of cutting it into pieces, the recurrent outputs equal
the parallel outputs (logits within 1e-4 relative in float32) and the greedy tokens are identical.
"""
import random

import pytest
import torch
from conftest import rel_err, stream_in_pieces

from asr.decode.greedy import ctc_greedy
from asr.features import StreamingFbank, compute_fbank
from asr.model import CTCModel, ModelConfig
from asr.model.subsampling import ConvSubsampling


def tiny_model(seed: int = 0, dtype=torch.float32) -> CTCModel:
    torch.manual_seed(seed)
    model = CTCModel(ModelConfig(vocab_size=32, d_model=64, n_layers=2, head_size=32, subsample_channels=8))
    # The reference init zeroes W_o, the channel-mix output and the first LoRA factors; perturb every
    # parameter so each term of the model shows in the outputs being compared.
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
        model.cmvn.set_stats(torch.randn(80) * 2 - 8, torch.rand(80) + 2)
    return model.to(dtype).eval()


def random_cuts(total: int, rng: random.Random, max_piece: int) -> list[int]:
    cuts, pos = [], 0
    while pos < total:
        size = rng.choice([0, 1, 2, 3, rng.randint(1, max_piece)])
        cuts.append(min(size, total - pos))
        pos += cuts[-1]
    return cuts


@pytest.mark.parametrize("seed", range(4))
def test_parity_subsampling_stream_equals_parallel(seed):
    torch.manual_seed(seed)
    sub = ConvSubsampling(80, 4, 16).double()
    x = torch.randn(2, 53 + seed, 80, dtype=torch.float64)
    want = sub(x)
    got = stream_in_pieces(sub, x, random_cuts(x.shape[1], random.Random(seed), 9))
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("seed", range(3))
def test_parity_model_step_equals_forward_on_features(seed):
    model = tiny_model(seed, torch.float64)
    feats = torch.randn(2, 97, 80, dtype=torch.float64) * 3 - 8
    with torch.no_grad():
        want, lengths = model(feats, torch.tensor([97, 97]))
        state, outs, pos = model.init_state(2), [], 0
        for size in random_cuts(97, random.Random(seed), 25):
            logits, state = model.step(feats[:, pos : pos + size], state)
            outs.append(logits)
            pos += size
    got = torch.cat(outs, dim=1)
    assert got.shape == want.shape and int(lengths[0]) == want.shape[1]
    assert rel_err(got, want) < 1e-10
    assert state.frames_in == 97 and state.frames_out == want.shape[1]


def test_parity_padding_does_not_change_valid_outputs():
    """A causal model: appending anything past a sequence's length leaves its valid logits alone."""
    model = tiny_model(1)
    short = torch.randn(1, 61, 80) - 8
    padded = torch.cat([short, torch.randn(1, 40, 80) * 50], dim=1)
    with torch.no_grad():
        want, want_len = model(short, torch.tensor([61]))
        got, got_len = model(padded, torch.tensor([61]))
    assert int(got_len[0]) == int(want_len[0]) == want.shape[1]
    assert rel_err(got[:, : want.shape[1]], want) < 1e-5


def test_parity_batch_of_different_lengths_equals_one_by_one():
    model = tiny_model(2)
    lengths = [90, 45, 13]
    utts = [torch.randn(1, n, 80) - 8 for n in lengths]
    batch = torch.zeros(3, 90, 80)
    for i, u in enumerate(utts):
        batch[i, : u.shape[1]] = u[0]
    with torch.no_grad():
        logits, out_lengths = model(batch, torch.tensor(lengths))
        for i, u in enumerate(utts):
            single, _ = model(u, torch.tensor([lengths[i]]))
            n = int(out_lengths[i])
            assert n == single.shape[1]
            assert rel_err(logits[i, :n], single[0]) < 1e-5


def synthetic_speechlike(seconds: float, seed: int) -> torch.Tensor:
    """Tones with a moving pitch plus noise: enough spectral structure to exercise the frontend."""
    g = torch.Generator().manual_seed(seed)
    t = torch.arange(int(seconds * 16000)) / 16000
    f0 = 150 + 80 * torch.sin(2 * torch.pi * 0.7 * t)
    phase = 2 * torch.pi * torch.cumsum(f0, 0) / 16000
    wave = sum(torch.sin(h * phase) / h for h in range(1, 8)) * (0.5 + 0.5 * torch.sin(2 * torch.pi * 2 * t))
    return (0.2 * wave + 0.01 * torch.randn(t.shape, generator=g)).float()


@pytest.mark.parametrize("seed", range(3))
def test_parity_whole_model_audio_in_random_pieces(seed):
    """Frontend included: random sample blocks -> streaming fbank -> model.step == offline pass."""
    model = tiny_model(seed)
    wave = synthetic_speechlike(1.3 + 0.17 * seed, seed)
    with torch.no_grad():
        feats = compute_fbank(wave)
        want, _ = model(feats[None], torch.tensor([feats.shape[0]]))
        fbank, state, outs, pos = StreamingFbank(), model.init_state(1), [], 0
        rng = random.Random(seed)
        while pos < wave.numel():
            size = rng.choice([1, 7, 160, 399, 400, 401, rng.randint(1, 4000)])
            frames = fbank.accept_waveform(wave[pos : pos + size])
            logits, state = model.step(frames[None], state)
            outs.append(logits)
            pos += size
    got = torch.cat(outs, dim=1)
    assert got.shape == want.shape
    assert rel_err(got, want) < 1e-4
    assert ctc_greedy(got[0])[0] == ctc_greedy(want[0])[0]


def test_state_size_is_constant():
    model = tiny_model(0)
    state = model.init_state(1)
    size0 = state.size_bytes()
    with torch.no_grad():
        for _ in range(3):
            _, state = model.step(torch.randn(1, 37, 80), state)
            assert state.size_bytes() <= size0 + 4 * 3 * 80 * 4 + 8 * 3 * 39 * 4


def test_channels_last_convolutions_give_the_nchw_values():
    """ConvSubsampling.channels_last (a CUDA speed switch) changes the memory layout only: the conv
    stack run channels-last equals the NCHW one (checked here on the CPU, where the switch is
    normally ignored, by calling the convolutions with it directly)."""
    torch.manual_seed(0)
    sub = ConvSubsampling(80, 16, 32)
    x = torch.randn(2, 1, 57, 80)
    nchw = sub.conv2(torch.relu(sub.conv1(x)))
    nhwc = sub.conv2(torch.relu(sub.conv1(x, channels_last=True)), channels_last=True)
    assert nhwc.is_contiguous(memory_format=torch.channels_last) and not nchw.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(nhwc, nchw, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("impl", ["recurrent", "chunked"])
def test_training_forward_under_bf16_autocast_follows_float32(impl):
    """The trainer runs the parallel pass under bf16 autocast: matmul outputs are bf16 beside fp32
    parameters and gates, and every op must take that mix (torch.lerp, for one, refuses it). The
    logits and gradients follow the fp32 pass within bf16 rounding."""
    model = tiny_model(seed=1).train()
    features, lengths = torch.randn(2, 60, 80) * 3 - 8, torch.tensor([60, 45])
    ref, _ = model(features, lengths, impl=impl)
    ref.sum().backward()
    ref_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, _ = model(features, lengths, impl=impl)
    out.float().sum().backward()
    assert out.dtype == torch.bfloat16
    assert rel_err(out.float(), ref) < 0.05
    for p, g in zip(model.parameters(), ref_grads):
        assert torch.isfinite(p.grad).all()
    assert rel_err(torch.cat([p.grad.flatten() for p in model.parameters()]),
                   torch.cat([g.flatten() for g in ref_grads])) < 0.1
