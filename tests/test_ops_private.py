"""Each private torch / fla API the project relies on, one test per module of asr/ops that wraps it:
an upgrade that breaks one fails here, in the test named after it."""
import shutil

import pytest
import torch

from asr.ops import dispatch, fla_backward, inductor, int_mm


def test_int_mm():
    """``torch._int_mm`` (asr.ops.int_mm): exact int32 sums of int8 products, both layouts the int8
    engine uses (contiguous and a transposed view)."""
    g = torch.Generator().manual_seed(0)
    a = torch.randint(-127, 128, (3, 64), generator=g, dtype=torch.int8)
    b = torch.randint(-127, 128, (64, 40), generator=g, dtype=torch.int8)
    want = a.long() @ b.long()
    assert torch.equal(int_mm.int_mm(a, b).long(), want)
    assert torch.equal(int_mm.int_mm(a[:1], b.t().contiguous().t()).long(), want[:1])
    int_mm.check_int_mm()  # no error on this torch


@pytest.mark.skipif(not (shutil.which("c++") or shutil.which("g++")), reason="needs a C++ compiler")
def test_compile_graph():
    """make_fx + fake tensors + inductor (asr.ops.inductor): a traced function with a loop
    compiles for fixed shapes (C++ wrapper) and for a symbolic batch, and equals eager."""
    def f(x, w):
        return (torch.stack([(w * x[t]).sum(-1) for t in range(x.shape[0])]).relu(),)

    x, w = torch.randn(3, 16), torch.randn(8, 16)
    fixed = inductor.compile_graph(f, [torch.zeros(3, 16), torch.zeros(8, 16)])
    torch.testing.assert_close(fixed(x, w)[0], f(x, w)[0])

    def g(s, v):
        return s * v.unsqueeze(-1), v.sum(-1)

    sym = inductor.compile_graph(g, [torch.zeros(32, 4, 4), torch.zeros(32, 4)], symbolic=True)
    s, v = torch.randn(5, 4, 4), torch.randn(5, 4)
    for got, want in zip(sym(s, v), g(s, v)):
        torch.testing.assert_close(got, want)


def test_autograd_inside_op():
    """torch._C dispatch-key guards (asr.ops.dispatch): inside a custom op's kernel, where the
    autograd keys are excluded, the guard lets a recomputed forward record a graph."""
    @torch.library.custom_op("asr_test::square_grad", mutates_args=())
    def square_grad(x: torch.Tensor) -> torch.Tensor:
        leaf = x.detach().requires_grad_()
        with dispatch.autograd_inside_op(), torch.enable_grad():
            (grad,) = torch.autograd.grad(leaf.square().sum(), leaf)
        return grad

    x = torch.randn(5)
    torch.testing.assert_close(square_grad(x), 2 * x)


def test_fla_backward():
    """fla's backward on a stand-in context (asr.ops.fla_backward): refused with one line unless
    the pinned fla version is installed; on a GPU with it, tests/test_wkv_parity.py compares it
    with fla's own autograd."""
    try:
        fla_backward.check_fla_version()
    except RuntimeError as err:
        assert fla_backward.FLA_VERSION in str(err) and "\n" not in str(err)
        return
    pytest.importorskip("fla")  # the pinned version is installed: its parity test runs on CUDA
