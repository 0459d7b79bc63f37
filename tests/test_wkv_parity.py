"""Each wkv form against the recurrent reference in float64: values, final states and gradients."""
import math

import pytest
import torch

from asr.ops.wkv7 import fla_available, wkv7_chunked, wkv7_fla, wkv7_recurrent


def random_inputs(B=2, T=37, H=2, N=64, seed=0, dtype=torch.float64, device="cpu"):
    """Inputs shaped like the model makes them: w in the model's log-decay range, kk unit-norm."""
    g = torch.Generator().manual_seed(seed)
    rnd = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    r, k, v = rnd(B, T, H, N), rnd(B, T, H, N), rnd(B, T, H, N)
    w = -math.exp(-0.5) * torch.sigmoid(rnd(B, T, H, N) * 2)
    kk = torch.nn.functional.normalize(rnd(B, T, H, N), dim=-1)
    lr = torch.sigmoid(rnd(B, T, H, N))
    state = rnd(B, H, N, N) * 0.3
    tensors = [r, w, k, v, -kk, kk * lr, state]
    return [t.to(device=device, dtype=dtype) for t in tensors]


@pytest.mark.parametrize("T", [1, 5, 16, 37, 64])
@pytest.mark.parametrize("chunk_size", [4, 16])
def test_parity_chunked_equals_recurrent_values(T, chunk_size):
    *inputs, state = random_inputs(T=T, seed=T)
    y_ref, s_ref = wkv7_recurrent(*inputs, state=state)
    y, s = wkv7_chunked(*inputs, state=state, chunk_size=chunk_size)
    torch.testing.assert_close(y, y_ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(s, s_ref, rtol=1e-10, atol=1e-10)


def test_parity_chunked_equals_recurrent_gradients():
    """T = 23 is not a multiple of the chunk size: the padded tail must not leak into gradients."""
    *inputs, state = random_inputs(B=1, T=23, H=1, N=16, seed=3)
    grads = []
    for fn in (wkv7_recurrent, lambda *a, state: wkv7_chunked(*a, state=state, chunk_size=8)):
        leaves = [t.clone().requires_grad_(True) for t in (*inputs, state)]
        y, s = fn(*leaves[:-1], state=leaves[-1])
        weights = torch.linspace(-1, 1, y.numel(), dtype=y.dtype).view_as(y)
        ((y * weights).sum() + (s**2).sum() * 0.1).backward()
        grads.append([leaf.grad for leaf in leaves])
    for g_ref, g in zip(*grads):
        torch.testing.assert_close(g, g_ref, rtol=1e-9, atol=1e-9)


def test_parity_gradcheck_chunked():
    """Autograd's own numerical check on a tiny problem, so the chunked backward is right by itself."""
    *inputs, state = random_inputs(B=1, T=6, H=1, N=4, seed=7)
    leaves = [t.clone().requires_grad_(True) for t in (*inputs, state)]
    fn = lambda *a: wkv7_chunked(*a[:-1], state=a[-1], chunk_size=4)  # noqa: E731
    assert torch.autograd.gradcheck(fn, leaves, eps=1e-6, atol=1e-6)


def test_parity_float32_chunked_close_to_float64_reference():
    *inputs, state = random_inputs(T=100, seed=11)
    y_ref, s_ref = wkv7_recurrent(*inputs, state=state)
    y, s = wkv7_chunked(*(t.float() for t in inputs), state=state.float())
    assert ((y.double() - y_ref).abs().max() / y_ref.abs().max()) < 1e-5
    assert ((s.double() - s_ref).abs().max() / s_ref.abs().max()) < 1e-5


def test_split_sequence_carries_state():
    """Running [0, t) then [t, T) with the state carried equals one pass (what streaming relies on)."""
    *inputs, state = random_inputs(T=30, seed=5)
    y_full, s_full = wkv7_chunked(*inputs, state=state)
    y1, s1 = wkv7_chunked(*(x[:, :13] for x in inputs), state=state)
    y2, s2 = wkv7_recurrent(*(x[:, 13:] for x in inputs), state=s1)
    torch.testing.assert_close(torch.cat([y1, y2], 1), y_full, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(s2, s_full, rtol=1e-10, atol=1e-10)


@pytest.mark.skipif(not (torch.cuda.is_available() and fla_available()), reason="needs CUDA and fla")
def test_parity_fla_close_to_recurrent_on_cuda():
    *inputs, state = random_inputs(B=2, T=200, H=4, seed=2, dtype=torch.float32, device="cuda")
    y_ref, s_ref = wkv7_recurrent(*inputs, state=state)
    y, s = wkv7_fla(*(t.bfloat16() for t in inputs), state=state)
    assert ((y.float() - y_ref).abs().max() / y_ref.abs().max()) < 2e-2
    assert ((s - s_ref).abs().max() / s_ref.abs().max()) < 2e-2


@pytest.mark.parametrize("impl", ["recurrent", "chunked"])
@pytest.mark.parametrize("with_state", [True, False])
def test_wkv7_op_passes_torch_library_checks(impl, with_state):
    """The ``asr::wkv7`` op that torch.compile sees: schema, fake (shapes/dtypes/strides for
    tracing), and autograd registration, checked by torch.library.opcheck (eager, AOT dispatch)."""
    *inputs, state = random_inputs(B=2, T=21, H=2, N=8, seed=4)
    args = [t.requires_grad_() for t in inputs] + [state.requires_grad_() if with_state else None, impl]
    torch.library.opcheck(torch.ops.asr.wkv7.default, tuple(args))


@pytest.mark.parametrize("impl", ["recurrent", "chunked"])
def test_wkv7_op_gradients_equal_the_forms_own(impl):
    """The op's backward (recompute the form, differentiate it) gives the gradients autograd gives
    through the form itself, for every input and the initial state."""
    *inputs, state = random_inputs(B=2, T=37, H=2, N=16, seed=5)
    form = {"recurrent": wkv7_recurrent, "chunked": wkv7_chunked}[impl]

    def grads(fn):
        leaves = [t.detach().clone().requires_grad_() for t in (*inputs, state)]
        y, s = fn(*leaves)
        (y.square().sum() + (s * torch.linspace(-1, 1, s.numel(), dtype=s.dtype).view_as(s)).sum()).backward()
        return [y.detach(), s.detach()] + [t.grad for t in leaves]

    via_op = grads(lambda *t: torch.ops.asr.wkv7(*t, impl))
    direct = grads(lambda *t: form(*t[:6], state=t[6]))
    for got, want in zip(via_op, direct):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


@pytest.mark.skipif(not (torch.cuda.is_available() and fla_available()), reason="needs CUDA and fla")
@pytest.mark.parametrize("with_state", [True, False])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_wkv7_op_fla_backward_equals_flas_autograd(with_state, dtype):
    """The op's fla backward (fla's backward called on the saved inputs, no recomputed forward)
    gives the gradients fla's own autograd gives: same kernels, so equal to rounding; float32
    inputs get float32 gradients (cast like the forward casts them)."""
    *inputs, state = random_inputs(B=3, T=150, H=4, N=64, seed=7, dtype=torch.float32, device="cuda")
    weight = torch.randn(inputs[0].shape, device="cuda")
    state_weight = torch.randn(state.shape, device="cuda")

    def grads(fn):
        leaves = [t.to(dtype).clone().requires_grad_() for t in inputs]
        start = state.clone().requires_grad_() if with_state else None
        y, s = fn(*leaves, start)
        ((y.float() * weight).sum() + (s * state_weight).sum()).backward()
        return [t.grad for t in leaves] + ([start.grad] if with_state else [])

    via_op = grads(lambda *t: torch.ops.asr.wkv7(*t, "fla"))
    via_fla = grads(lambda *t: wkv7_fla(*t[:6], state=t[6]))
    for got, want in zip(via_op, via_fla):
        assert got.dtype == want.dtype
        torch.testing.assert_close(got, want, rtol=2e-2, atol=1e-3 * want.abs().max().item())


@pytest.mark.skipif(not (torch.cuda.is_available() and fla_available()), reason="needs CUDA and fla")
def test_wkv7_fla_under_compile_equals_eager_with_the_casts_in_the_graph():
    """Compiled, ``wkv7(impl="fla")`` casts its float32 inputs to bf16 in the traced graph and
    its output back (no copies inside the op); values, output dtype and gradients equal the eager
    call's."""
    from asr.ops.wkv7 import wkv7

    *inputs, state = random_inputs(B=2, T=130, H=4, N=64, seed=8, dtype=torch.float32, device="cuda")
    weight = torch.randn(inputs[0].shape, device="cuda")

    def run(fn):
        leaves = [t.clone().requires_grad_() for t in (*inputs, state)]
        y, s = fn(*leaves)
        ((y * weight).sum() + s.sum()).backward()
        return y, s, [t.grad for t in leaves]

    def f(*t):
        return wkv7(*t[:6], state=t[6], impl="fla")

    y_c, s_c, g_c = run(torch.compile(f, backend="aot_eager", fullgraph=True))
    y_e, s_e, g_e = run(f)
    torch._dynamo.reset()
    assert y_c.dtype == y_e.dtype == torch.float32
    torch.testing.assert_close(y_c, y_e, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(s_c, s_e, rtol=1e-5, atol=1e-5)
    for got, want in zip(g_c, g_e):
        assert got.dtype == want.dtype
        torch.testing.assert_close(got, want, rtol=2e-2, atol=1e-3 * want.abs().max().item())


def test_wkv7_traces_as_one_op_under_compile():
    """Under torch.compile the dispatcher emits the op (no graph break: fullgraph would raise) and
    the compiled function's values and gradients equal eager ones."""
    from asr.ops.wkv7 import wkv7

    *inputs, state = random_inputs(B=1, T=20, H=2, N=8, seed=6)

    def f(*t):
        y, s = wkv7(*(x * 1.5 for x in t[:6]), state=t[6], impl="chunked")
        return y.sum() + s.sum()

    compiled = torch.compile(f, backend="aot_eager", fullgraph=True, dynamic=True)
    eager_leaves = [t.clone().requires_grad_() for t in (*inputs, state)]
    compiled_leaves = [t.clone().requires_grad_() for t in (*inputs, state)]
    f(*eager_leaves).backward()
    out = compiled(*compiled_leaves)
    out.backward()
    torch.testing.assert_close(out, f(*inputs, state))
    for a, b in zip(compiled_leaves, eager_leaves):
        torch.testing.assert_close(a.grad, b.grad)
    torch._dynamo.reset()


def test_fla_available_is_a_constant_under_compile():
    """Traced code takes fla_available() as a constant: no import is traced, and dynamo does not
    warn about tracing through an lru_cache (it did on the GPU before, once per compile)."""
    import warnings

    from asr.ops.wkv7 import fla_available, mark_constants_for_compile

    mark_constants_for_compile()  # as asr.train.compile.compile_model does

    def f(x):
        return x * 3 if fla_available() else x + 1

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = torch.compile(f, fullgraph=True, backend="aot_eager")(torch.ones(2))
    torch._dynamo.reset()
    assert torch.equal(out, f(torch.ones(2)))
    assert not [w for w in caught if "lru_cache" in str(w.message)]
