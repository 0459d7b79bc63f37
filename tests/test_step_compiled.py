"""The compiled one-frame step (``prepare_for_inference(compile=True)``, asr/model/token_step.py)
equals the packed and general paths.

The step's arithmetic (layout, weight slices, int8 handling) is tested uncompiled, always: the
traced function run eagerly against ``packed_step``. The compiled step is tested too wherever a C++
compiler is installed (CI has one): compiling takes inductor ~15-20 s per layout for these small
models on a cold cache (~45 s for the float32 and int8 layouts here on 2 cores; a few seconds from
inductor's disk cache). ``ASR_TEST_COMPILE=0`` skips those tests; where inductor cannot build
(no compiler, no Python headers) they skip with the reason, unless ASR_TEST_COMPILE_STRICT is set.
"""
import copy
import os
import random
import shutil

import pytest
import torch
from test_step_fast import random_model, rel_err, run

from asr.model import token_step

needs_compile = pytest.mark.skipif(
    os.environ.get("ASR_TEST_COMPILE") == "0" or not (shutil.which("c++") or shutil.which("g++")),
    reason="compiles C++ with torch.compile's inductor: needs a C++ compiler (ASR_TEST_COMPILE=0 skips)")

#: sizes shared by the tests, so each compiles one float32 and one int8 layout per process
SIZES = dict(d_model=128, n_layers=3, head_size=64)


def compiled_model(seed: int, int8: bool = False, frames: tuple[int, ...] = (1,)):
    model = random_model(seed, **SIZES)
    try:
        assert model.prepare_for_inference(int8=int8, compile=True, compile_frames=frames)
    except Exception as err:  # no C++ compiler, unsupported platform...
        if "ASR_TEST_COMPILE_STRICT" in os.environ:
            raise
        pytest.skip(f"torch.compile's inductor is not usable here: {str(err).splitlines()[0][:200]}")
    return model


class CountCalls:
    """Counts the calls that took the compiled step."""

    def __init__(self, monkeypatch):
        self.n = 0
        original = token_step.CompiledTokenStep.__call__

        def counted(obj, *args):
            self.n += 1
            return original(obj, *args)

        monkeypatch.setattr(token_step.CompiledTokenStep, "__call__", counted)


def one_frame_cuts(total: int, rng: random.Random) -> list[int]:
    """Mostly 4 feature frames (one encoder frame: the compiled step), some other sizes between
    (the packed path, same state), so the two paths hand the state back and forth."""
    out, pos = [], 0
    while pos < total:
        size = min(total - pos, rng.choice([4, 4, 4, 4, 4, 4, 1, 2, 3, 5, 8, 13]))
        out.append(size)
        pos += size
    return out


@pytest.mark.parametrize("int8", [False, True])
def test_token_step_uncompiled_equals_packed_step(int8):
    """The function that gets compiled, run eagerly on calls of 1 to 4 frames: the packed path's
    results (the same frames per call: int8 activation scales are per frame either way)."""
    model = random_model(5, **SIZES)
    model.prepare_for_inference(int8=int8)
    packs = model._packed_blocks()
    with torch.no_grad():
        layout, f32, i8 = token_step._layout_and_buffers(packs, model.ln_out, model.head)
    step = token_step._make_step(layout)
    torch.manual_seed(0)
    xs = torch.randn(20, 128)
    state = model.init_state(1).blocks
    with torch.inference_mode():
        for chunk in xs.split([1, 4, 2, 1, 3, 4, 1, 4]):
            flat = [t for s in state for t in (s.tmix_prev, s.wkv, s.cmix_prev)]  # one stream: [1, ...]
            got, *new = step(chunk, f32, i8, *flat)
            want, state = model._packed_blocks_and_head(chunk.unsqueeze(0), state, packs)
            assert got.shape == want.shape[1:] and rel_err(got, want[0]) < 1e-5
            want_new = [t for s in state for t in (s.tmix_prev, s.wkv, s.cmix_prev)]
            assert len(new) == len(want_new) == 3 * len(packs)
            for a, b in zip(new, want_new):
                assert a.shape == b.shape and rel_err(a, b) < 1e-5


@needs_compile
@pytest.mark.parametrize("seed", range(2))
def test_compiled_step_equals_packed_and_general_paths(seed, monkeypatch):
    model = compiled_model(seed)
    calls = CountCalls(monkeypatch)
    feats = torch.randn(1, 200, 80) * 3 - 8
    sizes = one_frame_cuts(200, random.Random(seed))
    got = run(model, feats, sizes, fast=True)
    assert calls.n >= 20  # the compiled step did run
    want_general = run(model, feats, sizes, fast=False)
    model.prepare_for_inference(compile=False)
    want_packed = run(model, feats, sizes, fast=True)
    assert calls.n >= 20 and got.shape == want_packed.shape
    assert rel_err(got, want_packed) < 1e-5
    assert rel_err(got, want_general) < 1e-5
    # and a single token from a warm state, against the packed path: float rounding only
    model.prepare_for_inference(compile=True)
    state = model.init_state(1)
    with torch.inference_mode():
        _, state = model.step(feats[:, :100], state)
        a, sa = model.step(feats[:, 100:104], state)
        model.prepare_for_inference(compile=False)
        b, sb = model.step(feats[:, 100:104], state)
    assert rel_err(a, b) < 1e-6
    for x, y in zip(sa.blocks, sb.blocks):
        assert rel_err(x.wkv, y.wkv) < 1e-6 and rel_err(x.tmix_prev, y.tmix_prev) < 1e-6
        assert rel_err(x.cmix_prev, y.cmix_prev) < 1e-6
        assert x.wkv.shape == y.wkv.shape and x.tmix_prev.shape == y.tmix_prev.shape


@needs_compile
def test_compiled_step_only_for_one_frame_of_one_stream(monkeypatch):
    model = compiled_model(2)
    calls = CountCalls(monkeypatch)
    feats = torch.randn(2, 48, 80) * 3 - 8
    run(model, feats, [4] * 12, fast=True)  # two streams: packed path
    assert calls.n == 0
    run(model, feats[:1], [8] * 6, fast=True)  # two frames per call: packed path
    assert calls.n == 0
    run(model, feats[:1], [4] * 12, fast=True)
    assert calls.n == 12
    with pytest.raises(ValueError, match="float32"):
        copy.deepcopy(model).double().prepare_for_inference(compile=True)


@needs_compile
def test_compiled_step_follows_weight_changes_and_copies(monkeypatch):
    model = compiled_model(3)
    calls = CountCalls(monkeypatch)
    feats = torch.randn(1, 40, 80) * 3 - 8
    sizes = [4] * 10
    before = run(model, feats, sizes, fast=True)
    with torch.no_grad():
        model.blocks[1].ffn.value.weight.mul_(2)
        model.blocks[0].att.w1.add_(0.5)
        model.head.bias.add_(1.0)
    after = run(model, feats, sizes, fast=True)
    assert calls.n == 20
    assert rel_err(after, before) > 1e-3
    assert rel_err(after, run(model, feats, sizes, fast=False)) < 1e-5
    other = copy.deepcopy(model)  # a copy rebuilds its own buffers (the compiled code is shared)
    assert other.compiled_step
    assert rel_err(run(other, feats, sizes, fast=True), after) < 1e-6
    assert calls.n == 30


@needs_compile
def test_compiled_int8_step_equals_packed_int8_to_quantization_noise(monkeypatch):
    """int8: the same int8 weights, per-row activation scales and exact integer sums; only float
    rounding in the element-wise math differs, which can move a value across an int8 rounding
    step (as streaming vs one pass does, test_step_int8.py): one token from the same state agrees
    to float rounding unless such a step moved (about 1 token in 12 in this model), a stream to the
    quantization noise."""
    model = compiled_model(4, int8=True)
    calls = CountCalls(monkeypatch)
    feats = torch.randn(1, 160, 80) * 3 - 8
    sizes = [4] * 40
    got = run(model, feats, sizes, fast=True)
    assert calls.n == 40
    model.prepare_for_inference(int8=True, compile=False)
    want = run(model, feats, sizes, fast=True)
    assert rel_err(got, want) < 0.03
    assert (got.argmax(-1) == want.argmax(-1)).float().mean() > 0.9
    starts = range(40, 160, 12)  # one token from each of 10 states along the stream
    with torch.inference_mode():
        states = [model.step(feats[:, :t], model.init_state(1))[1] for t in starts]
        packed = [model.step(feats[:, t : t + 4], s)[0] for t, s in zip(starts, states)]
        model.prepare_for_inference(int8=True, compile=True)
        compiled = [model.step(feats[:, t : t + 4], s)[0] for t, s in zip(starts, states)]
    assert calls.n == 40 + len(starts)
    errs = sorted(rel_err(a, b) for a, b in zip(compiled, packed))
    assert errs[-1] < 0.03 and errs[len(errs) // 2] < 1e-5 and sum(e < 1e-5 for e in errs) >= 7, errs


@needs_compile
@pytest.mark.parametrize("int8", [False, True])
def test_compiled_multi_frame_step_equals_packed_path(int8, monkeypatch):
    """``compile_frames=(1, 4)``: calls of one or four encoder frames (40 or 160 ms) run compiled
    steps, any other size the packed path, handing the state back and forth; a stream cut at
    random equals the packed path cut the same way (float32: to float rounding; int8: to the
    quantization noise, as above) and the general path (float32)."""
    model = compiled_model(6, int8, frames=(1, 4))
    calls = CountCalls(monkeypatch)
    feats = torch.randn(1, 400, 80) * 3 - 8
    rng = random.Random(int8)
    sizes, pos = [], 0
    while pos < 400:  # mostly 16 or 4 feature frames (4 or 1 encoder frames), some others
        sizes.append(min(400 - pos, rng.choice([16, 16, 16, 4, 4, 7, 9, 20, 32])))
        pos += sizes[-1]
    got = run(model, feats, sizes, fast=True)
    assert calls.n >= 15
    model.prepare_for_inference(int8=int8, compile=False)
    want = run(model, feats, sizes, fast=True)
    assert got.shape == want.shape
    if int8:
        assert rel_err(got, want) < 0.03
        assert (got.argmax(-1) == want.argmax(-1)).float().mean() > 0.9
    else:
        assert rel_err(got, want) < 1e-5
        assert rel_err(got, run(model, feats, sizes, fast=False)) < 1e-5
    with pytest.raises(ValueError, match="compile_frames"):
        model.prepare_for_inference(compile=True, compile_frames=(0,))


@needs_compile
def test_several_streams_take_the_compiled_wkv_update_and_equal_the_packed_path(monkeypatch):
    """With ``compile=True`` a packed step of several streams runs its wkv update compiled (one
    compile for any stream count); it equals the uncompiled packed path to float rounding, cut at
    random (one and several frames per call), for 2 and 35 streams, also when torch's thread count
    changes between calls (a torch.compile'd version failed there: dynamo guards on it); one
    stream keeps the uncompiled update."""
    model = compiled_model(7)
    taken = []
    compiled = token_step.wkv_token_compiled

    def counting(S, *args):
        taken.append(S.shape[0])
        return compiled(S, *args)

    monkeypatch.setattr(token_step, "wkv_token_compiled", counting)
    sizes = [4, 4, 8, 12, 4, 16, 12]
    threads = torch.get_num_threads()
    try:
        for streams in (35, 2):
            feats = torch.randn(streams, 60, 80) * 3 - 8
            model.prepare_for_inference(compile=True)
            got = []
            for n in (1, 2, 1):  # a thread count per pass: the compiled code must not care
                torch.set_num_threads(n)
                got.append(run(model, feats, sizes, fast=True))
            model.prepare_for_inference(compile=False)
            want = run(model, feats, sizes, fast=True)
            for g in got:
                assert rel_err(g, want) < 1e-5
        assert set(taken) == {35, 2}
        taken.clear()
        model.prepare_for_inference(compile=True)
        run(model, torch.randn(1, 60, 80), [8, 12, 40], fast=True)  # one stream, several frames
        assert not taken
    finally:
        torch.set_num_threads(threads)


@needs_compile
@pytest.mark.parametrize("int8", [False, True])
def test_compiled_front_end_equals_the_eager_one_in_both_phases(int8, monkeypatch):
    """With ``compile=True`` a call of one stream that brings 4 or 16 feature frames runs CMVN and
    the subsampling as a compiled function (asr/model/frontend_step.py), in either phase of
    conv2's cache: a stream that began with 2 feature frames (asr-live's first call) or with 4.
    Calls of other sizes run the eager front end on the same caches. Its outputs and caches
    equal the eager front end's along the whole stream, and CMVN statistics changed after the
    compile are used."""
    from asr.model.frontend_step import CompiledFrontend

    model = compiled_model(8, int8, frames=(1, 4))
    with torch.no_grad():  # after the compile: read on every call, not baked in
        model.cmvn.mean.copy_(torch.randn(80))
        model.cmvn.istd.copy_(torch.rand(80) + 0.5)
    compiled_calls = []
    original = CompiledFrontend.__call__
    monkeypatch.setattr(CompiledFrontend, "__call__",
                        lambda obj, f, *a: compiled_calls.append(f.shape[1]) or original(obj, f, *a))
    feats = torch.randn(1, 260, 80) * 3 - 8
    packs = model._packed_blocks()
    front = model._compiled_frontend(packs)
    int8_front = model._int8_frontend()
    assert (int8_front is not None) == int8
    for cuts in ([2] + [4] * 20 + [16] * 4 + [3] + [4] * 5 + [1] + [16] * 3 + [4] * 3,
                 [4] * 10 + [16] * 5 + [5] + [4] * 5 + [16] * 4 + [7] + [4] * 10):
        compiled_calls.clear()
        eager, mixed = (None, None), (None, None)
        with torch.inference_mode():
            for chunk in feats[:, : sum(cuts)].split(cuts, dim=1):
                want, eager = model.subsampling.stream(model.cmvn(chunk), eager, int8=int8_front)
                if front.applies(chunk, mixed):
                    got, mixed = front(chunk, mixed, model.cmvn.mean, model.cmvn.istd)
                else:
                    got, mixed = model.subsampling.stream(model.cmvn(chunk), mixed, int8=int8_front)
                for a, b in [(got, want), *zip(mixed, eager)]:
                    assert a.shape == b.shape and (b.numel() == 0 or rel_err(a, b) < 1e-6)
        # after an odd call the conv1 cache holds 1 frame: eager until an odd call evens it again
        assert sorted(set(compiled_calls)) == [4, 16] and len(compiled_calls) >= 25
    compiled_calls.clear()  # and model.step takes it
    run(model, feats[:, :64], [4] * 16, fast=True)
    assert compiled_calls == [4] * 16
