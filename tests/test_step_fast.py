"""The packed inference step (``CTCModel.step`` without autograd) equals the general path.

``packed_step`` and the small-call subsampling rearrange weights and fuse operations; these tests
hold them to the general path (``step(..., fast=False)``, i.e. ``Block.forward``) on random
weights, for random ways of cutting the input, and after the weights change under them.
"""
import copy
import random

import pytest
import torch
from conftest import rel_err, stream_in_pieces

from asr.model import CTCModel, ModelConfig
from asr.model.subsampling import ConvSubsampling


def random_model(seed: int = 0, dtype=torch.float32, **sizes) -> CTCModel:
    torch.manual_seed(seed)
    cfg = dict(vocab_size=32, d_model=128, n_layers=3, head_size=64, subsample_channels=16)
    cfg.update(sizes)
    model = CTCModel(ModelConfig(**cfg))
    with torch.no_grad():  # every parameter nonzero, so every term shows in the outputs
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
        model.cmvn.set_stats(torch.randn(80) * 2 - 8, torch.rand(80) + 2)
    return model.to(dtype).eval()


def cuts(total: int, rng: random.Random) -> list[int]:
    out, pos = [], 0
    while pos < total:
        size = min(total - pos, rng.choice([0, 1, 3, 4, 4, 4, 5, 8, 16, rng.randint(1, 60)]))
        out.append(size)
        pos += size
    return out


def run(model: CTCModel, feats: torch.Tensor, sizes: list[int], fast: bool) -> torch.Tensor:
    state, outs, pos = model.init_state(feats.shape[0]), [], 0
    with torch.inference_mode():
        for size in sizes:
            logits, state = model.step(feats[:, pos : pos + size], state, fast=fast)
            outs.append(logits)
            pos += size
    return torch.cat(outs, dim=1)


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float64, 1e-12)])
def test_parity_fast_step_equals_general_step(seed, dtype, tol):
    model = random_model(seed, dtype, **({"head_size": 32} if seed == 2 else {}))
    feats = torch.randn(2, 150, 80, dtype=dtype) * 3 - 8
    sizes = cuts(150, random.Random(seed))
    want = run(model, feats, sizes, fast=False)
    got = run(model, feats, sizes, fast=True)
    assert got.shape == want.shape and got.shape[1] == 38
    assert rel_err(got, want) < tol
    # and both equal the parallel pass
    with torch.no_grad():
        offline, _ = model(feats, torch.tensor([150, 150]))
    assert rel_err(got, offline) < 10 * tol


def test_parity_fast_step_frame_by_frame_and_batched():
    """4 feature frames per call (one encoder frame: the T = 1 path), batch of 3."""
    model = random_model(3)
    feats = torch.randn(3, 120, 80) * 3 - 8
    want = run(model, feats, [4] * 30, fast=False)
    got = run(model, feats, [4] * 30, fast=True)
    assert rel_err(got, want) < 1e-5
    assert torch.equal(got.argmax(-1), want.argmax(-1))


@pytest.mark.parametrize("frames_per_call", [8, 16, 24])
def test_parity_fast_step_few_tokens_per_call_batched(frames_per_call):
    """2, 4 and 6 encoder frames per call, batch of 3: the token loop (up to _TOKEN_LOOP_MAX_T
    tokens) and the chunked form beyond it."""
    model = random_model(6)
    feats = torch.randn(3, 144, 80) * 3 - 8
    sizes = [frames_per_call] * (144 // frames_per_call)
    want = run(model, feats, sizes, fast=False)
    got = run(model, feats, sizes, fast=True)
    assert got.shape == want.shape and rel_err(got, want) < 1e-5


def test_fast_step_leaves_the_input_state_alone():
    model = random_model(4)
    feats = torch.randn(1, 20, 80) * 3 - 8
    with torch.inference_mode():
        _, state = model.step(feats[:, :10], model.init_state(1))
        before = copy.deepcopy(state)
        a, _ = model.step(feats[:, 10:], state, fast=True)
        b, _ = model.step(feats[:, 10:], state, fast=True)
    for x, y in zip(before.blocks, state.blocks):
        assert torch.equal(x.wkv, y.wkv) and torch.equal(x.tmix_prev, y.tmix_prev)
        assert torch.equal(x.cmix_prev, y.cmix_prev)
    assert torch.equal(a, b)


def test_fast_step_follows_weight_changes():
    """The packed weights are rebuilt after an optimizer step, load_state_dict (in place and
    assign=True) and a dtype change; never a stale pack."""
    model = random_model(5)
    feats = torch.randn(1, 40, 80) * 3 - 8
    sizes = [4] * 10

    def check():
        assert rel_err(run(model, feats, sizes, True), run(model, feats, sizes, False)) < 1e-5

    before = run(model, feats, sizes, True)
    check()
    # an optimizer step (in-place updates of every parameter)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    logits, _ = model(feats, torch.tensor([40]))
    logits.square().mean().backward()
    opt.step()
    model.eval()
    after = run(model, feats, sizes, True)
    assert rel_err(after, before) > 1e-3  # the weights did change...
    check()  # ...and the fast path saw it
    # load_state_dict, in place and by assignment
    other = random_model(6)
    model.load_state_dict(other.state_dict())
    assert torch.equal(run(model, feats, sizes, True), run(other, feats, sizes, True))
    check()
    model.load_state_dict(random_model(7).state_dict(), assign=True)
    check()
    # one weight edited by hand
    with torch.no_grad():
        model.blocks[1].ffn.value.weight.mul_(2)
        model.blocks[0].att.w1.add_(0.5)
        model.subsampling.conv2.conv.weight.mul_(-1)
    check()
    # dtype change
    model.double()
    feats = feats.double()
    assert rel_err(run(model, feats, sizes, True), run(model, feats, sizes, False)) < 1e-12


def test_frozen_model_skips_the_version_check_but_not_loads_or_training():
    """``prepare_for_inference(freeze=True)`` is a promise that the weights stay as they are: an
    edit by hand is then not seen (the documented cost) until ``drop_inference_cache``; a
    ``load_state_dict`` still is, and ``train()`` ends the promise."""
    model = random_model(8)
    feats = torch.randn(1, 40, 80) * 3 - 8
    sizes = [4] * 10
    assert model.prepare_for_inference(freeze=True)
    before = run(model, feats, sizes, True)
    with torch.no_grad():
        model.blocks[1].ffn.value.weight.mul_(2)
    assert torch.equal(run(model, feats, sizes, True), before)  # the pack was not checked
    model.drop_inference_cache()
    assert rel_err(run(model, feats, sizes, True), run(model, feats, sizes, False)) < 1e-5
    assert rel_err(run(model, feats, sizes, True), before) > 1e-3
    other = random_model(9)
    model.load_state_dict(other.state_dict())
    assert torch.equal(run(model, feats, sizes, True), run(other, feats, sizes, True))
    model.train()
    model.eval()
    with torch.no_grad():
        model.blocks[1].ffn.value.weight.mul_(2)
    assert rel_err(run(model, feats, sizes, True), run(model, feats, sizes, False)) < 1e-5
    model.prepare_for_inference(freeze=True)
    model.prepare_for_inference()  # a call without it ends it too
    with torch.no_grad():
        model.blocks[1].ffn.value.weight.mul_(2)
    assert rel_err(run(model, feats, sizes, True), run(model, feats, sizes, False)) < 1e-5


@pytest.mark.filterwarnings("ignore")
def test_fast_path_only_without_autograd_and_not_for_quantized_linears():
    model = random_model(8)
    feats = torch.randn(1, 8, 80)
    assert model.prepare_for_inference()
    with pytest.raises(RuntimeError, match="packed inference path"):
        model.step(feats, model.init_state(1), fast=True)  # autograd on
    from torch.ao.quantization import quantize_dynamic

    q = quantize_dynamic(copy.deepcopy(model), {torch.nn.Linear}, dtype=torch.qint8)
    assert not q.prepare_for_inference()
    with torch.inference_mode():
        got, _ = q.step(feats, q.init_state(1))  # general path with int8 linears
        want, _ = model.step(feats, model.init_state(1))
    assert got.shape == want.shape and rel_err(got, want) < 0.1


@pytest.mark.parametrize("seed", range(3))
def test_parity_small_call_subsampling_equals_parallel(seed):
    """The im2col form of the subsampling (small calls, autograd off) against one parallel pass,
    mixed with large calls that take the nn.Conv2d form."""
    torch.manual_seed(seed)
    sub = ConvSubsampling(80, 8, 16).double()
    x = torch.randn(2, 101 + seed, 80, dtype=torch.float64)
    with torch.no_grad():
        want = sub(x)
        rng, sizes = random.Random(seed), []
        while sum(sizes) < x.shape[1]:
            sizes.append(rng.choice([0, 1, 2, 3, 4, 5, 9, 40]))
        got = stream_in_pieces(sub, x, sizes)
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
