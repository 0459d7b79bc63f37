"""The RWKV-7 ("Goose") wkv recurrence in three interchangeable forms.

Per head, with the state S laid out [value, key] (DESIGN.md):

    S_t = S_{t-1} diag(exp(w_t)) + (S_{t-1} a_t) b_t^T + v_t k_t^T
    y_t = S_t r_t

In the model ``a = -kk`` and ``b = kk * a_lr`` (fla's convention, so every form here takes the same
arguments as fla's ``chunk_rwkv7``). ``w`` is the log-decay (``decay = exp(w)``).

Every form takes ``[B, T, H, N]`` inputs and an optional state ``[B, H, N, N]`` (value x key, the
transpose of fla's ``[B, H, K, V]``) and returns ``(y [B, T, H, N], final_state [B, H, N, N])``.

- ``wkv7_recurrent``: a loop over time. The reference, and the streaming step (T = 1).
- ``wkv7_chunked``: chunk-parallel pure PyTorch. Within a chunk the in-context terms are solved as
  one unit-lower-triangular system (the WY/UT trick), across chunks the state is carried. Used for
  CPU training and as a second opinion on the CUDA kernel.
- ``wkv7_fla``: flash-linear-attention's Triton ``chunk_rwkv7`` (CUDA only, bf16 inputs, fp32 state).

``wkv7`` picks one by device and availability.
"""
from __future__ import annotations

import functools
import math
from typing import Callable, Optional

import torch
from torch import Tensor

from asr.ops.dispatch import autograd_inside_op

__all__ = ["wkv7", "wkv7_token", "wkv7_recurrent", "wkv7_chunked", "wkv7_fla", "fla_available",
           "mark_constants_for_compile"]


def _zero_state(r: Tensor, dtype: torch.dtype) -> Tensor:
    batch, _, heads, size = r.shape
    return r.new_zeros(batch, heads, size, size, dtype=dtype)


def wkv7_token(S: Tensor, r: Tensor, w: Tensor, k: Tensor, v: Tensor, a: Tensor, b: Tensor,
               matmul: bool = False) -> tuple[Tensor, Tensor]:
    """One token of the recurrence, the only per-token update in the project: S [B, H, N, N]
    (value x key, not modified), r, w, k, a, b as rows [B, H, 1, N], v as a column [B, H, N, 1].
    Returns (y [B, H, N], S').

    The mat-vecs are written as multiply + sum by default: for 64 x 64 heads that is ~2x faster
    than batched matmul calls in eager PyTorch on the CPU, and inductor fuses it into one pass over
    S (the compiled kernels). ``matmul``: the same contractions as batched matrix products, the
    two rank-one updates as one product ``[S a, v] [b; k]`` (5 passes over S instead of 9): the
    form traced for ONNX Runtime, where each pass over S is a separate operation."""
    if matmul:  # rows [.., 1, N] as columns [.., N, 1]: reshapes (a transpose is a copy in ONNX Runtime)
        column = lambda t: t.reshape(*t.shape[:-2], t.shape[-1], 1)  # noqa: E731
        sa = torch.matmul(S, column(a))  # [B, H, N, 1]
        S = S * torch.exp(w) + torch.matmul(torch.cat([sa, v], dim=-1), torch.cat([b, k], dim=-2))
        return torch.matmul(S, column(r)).squeeze(-1), S
    sa = (S * a).sum(dim=-1, keepdim=True)  # [B, H, N, 1]
    S = (S * torch.exp(w)).addcmul_(sa, b).addcmul_(v, k)
    return (S * r).sum(dim=-1), S


def wkv7_recurrent(
    r: Tensor, w: Tensor, k: Tensor, v: Tensor, a: Tensor, b: Tensor, state: Optional[Tensor] = None,
    token: Callable[..., tuple[Tensor, Tensor]] = wkv7_token,
) -> tuple[Tensor, Tensor]:
    """Reference loop over time of :func:`wkv7_token` (or ``token``, a compiled form of it); the
    state is kept in float32 (or float64 for float64 inputs)."""
    compute = torch.float64 if r.dtype == torch.float64 else torch.float32
    out_dtype = r.dtype
    if r.dtype != compute:
        r, w, k, v, a, b = (t.to(compute) for t in (r, w, k, v, a, b))
    S = _zero_state(r, compute) if state is None else state if state.dtype == compute else state.to(compute)
    T = r.shape[1]
    rows = [t.transpose(1, 2) for t in (r, w, k, a, b)]  # [B, H, T, N]
    cols = v.permute(0, 2, 3, 1)  # [B, H, N, T]
    if T == 1:
        y, S = token(S, rows[0], rows[1], rows[2], cols, rows[3], rows[4])
        y = y.unsqueeze(1)
    else:
        ys = []
        for t in range(T):
            rt, wt, kt, at, bt = (x[:, :, t : t + 1] for x in rows)
            y, S = token(S, rt, wt, kt, cols[..., t : t + 1], at, bt)
            ys.append(y)
        y = torch.stack(ys, dim=1) if ys else r.new_zeros(r.shape)
    return (y if y.dtype == out_dtype else y.to(out_dtype)), S


def wkv7_chunked(
    r: Tensor,
    w: Tensor,
    k: Tensor,
    v: Tensor,
    a: Tensor,
    b: Tensor,
    state: Optional[Tensor] = None,
    chunk_size: int = 16,
) -> tuple[Tensor, Tensor]:
    """Chunk-parallel form, exact up to rounding.

    Inside a chunk (positions 1..L, state S_0 before it) let g_t = exp(cumsum w) (per key channel).
    Writing z_t = S_{t-1} a_t, the recurrence unrolls to

        S_t = (S_0 + sum_{s<=t} z_s (b_s/g_s)^T + v_s (k_s/g_s)^T) diag(g_t)
        z_t = S_0 (g_{t-1} a_t) + sum_{s<t} z_s <g_{t-1} a_t, b_s/g_s> + v_s <g_{t-1} a_t, k_s/g_s>

    so Z solves a unit-lower-triangular system (I - M_b) Z = A_hat S_0^T + M_k V, and y follows from
    Z and V with two more masked products. The ratios g_t/g_s are at most exp(0.61 * chunk_size)
    for the model's decay range (w >= -exp(-0.5)), which keeps chunk_size = 16 safe in float32.
    """
    compute = torch.float64 if r.dtype == torch.float64 else torch.float32
    out_dtype = r.dtype
    B, T, H, N = r.shape
    S = _zero_state(r, compute) if state is None else state.to(compute)
    if T == 0:
        return r.new_zeros(r.shape), S
    L = chunk_size
    pad = (-T) % L
    # [B, H, n_chunks, L, N]
    def prep(x: Tensor) -> Tensor:
        x = x.to(compute)
        if pad:
            x = torch.nn.functional.pad(x, (0, 0, 0, 0, 0, pad))
        return x.view(B, (T + pad) // L, L, H, N).permute(0, 3, 1, 2, 4)

    r_, w_, k_, v_, a_, b_ = (prep(x) for x in (r, w, k, v, a, b))
    cum = torch.cumsum(w_, dim=3)  # log g_t, inclusive
    cum_prev = cum - w_  # log g_{t-1}
    g_inv = torch.exp(-cum)
    a_hat = a_ * torch.exp(cum_prev)
    r_hat = r_ * torch.exp(cum)
    b_tilde = b_ * g_inv
    k_tilde = k_ * g_inv
    strict = torch.ones(L, L, dtype=torch.bool, device=r.device).tril(-1)
    incl = torch.ones(L, L, dtype=torch.bool, device=r.device).tril(0)
    m_b = (a_hat @ b_tilde.transpose(-1, -2)).masked_fill(~strict, 0.0)
    m_k = (a_hat @ k_tilde.transpose(-1, -2)).masked_fill(~strict, 0.0)
    q_b = (r_hat @ b_tilde.transpose(-1, -2)).masked_fill(~incl, 0.0)
    q_k = (r_hat @ k_tilde.transpose(-1, -2)).masked_fill(~incl, 0.0)
    eye = torch.eye(L, dtype=compute, device=r.device)
    # (I - M_b)^{-1} for every chunk at once; unit lower triangular so always solvable.
    solve = torch.linalg.solve_triangular(eye - m_b, eye.expand_as(m_b), upper=False, unitriangular=True)
    # Terms that do not depend on the incoming state, computed for all chunks in parallel.
    zv = solve @ (m_k @ v_)  # part of Z driven by the chunk's own values
    yv = q_k @ v_ + q_b @ zv
    decay_last = torch.exp(cum[..., -1:, :] - cum)  # g_L / g_s, <= 1
    b_to_end = b_ * decay_last
    k_to_end = k_ * decay_last
    g_last = torch.exp(cum[..., -1, :])  # [B, H, n, N]
    ys = []
    for c in range(cum.shape[2]):
        s_t = S.transpose(-1, -2)  # [B, H, K, V]
        z = zv[:, :, c] + solve[:, :, c] @ (a_hat[:, :, c] @ s_t)
        y = yv[:, :, c] + r_hat[:, :, c] @ s_t + q_b[:, :, c] @ (z - zv[:, :, c])
        ys.append(y)
        # S_L = S_0 diag(g_L) + sum_s z_s (b_s g_L/g_s)^T + v_s (k_s g_L/g_s)^T
        S = (
            S * g_last[:, :, c, None, :]
            + z.transpose(-1, -2) @ b_to_end[:, :, c]
            + v_[:, :, c].transpose(-1, -2) @ k_to_end[:, :, c]
        )
    y = torch.stack(ys, dim=2).permute(0, 2, 3, 1, 4).reshape(B, T + pad, H, N)[:, :T]
    return y.to(out_dtype), S


@functools.lru_cache(maxsize=1)
def _fla_imports() -> bool:
    try:
        from fla.ops.rwkv7 import chunk_rwkv7  # noqa: F401
    except Exception:
        return False
    return True


def fla_available() -> bool:
    """True when flash-linear-attention's rwkv7 kernels import (they still need a CUDA tensor).
    Before ``torch.compile`` traces code that calls it, call :func:`mark_constants_for_compile`."""
    return _fla_imports()


def mark_constants_for_compile() -> None:
    """Make ``torch.compile`` take :func:`fla_available`'s answer as a constant (it then traces no
    import, nor the ``lru_cache`` around it). Called where compilation starts
    (:func:`asr.train.compile.compile_model`), not at import: ``torch.compiler.assume_constant_result``
    imports ``torch._dynamo``, over a second of every process's start."""
    torch.compiler.assume_constant_result(fla_available)  # marks the function itself


FLA_CHUNK_SIZE = 64  # with bounded decay fla's tensor-core path; _fla_backward must match it


def _fla_kernel_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype fla runs on for inputs of ``dtype``: bf16, fp16 kept."""
    return dtype if dtype in (torch.bfloat16, torch.float16) else torch.bfloat16


def _fla_inputs(
    r: Tensor, w: Tensor, k: Tensor, v: Tensor, a: Tensor, b: Tensor, state: Optional[Tensor]
) -> tuple[list[Tensor], Optional[Tensor]]:
    """fla's view of a call: the vectors in bf16 (fp16 kept) and contiguous, the state in float32
    as [B, H, K, V] (the transpose of ours)."""
    kernel_dtype = _fla_kernel_dtype(r.dtype)
    vectors = [t.to(kernel_dtype).contiguous() for t in (r, w, k, v, a, b)]
    return vectors, None if state is None else state.float().transpose(-1, -2).contiguous()


def wkv7_fla(
    r: Tensor,
    w: Tensor,
    k: Tensor,
    v: Tensor,
    a: Tensor,
    b: Tensor,
    state: Optional[Tensor] = None,
    chunk_size: Optional[int] = FLA_CHUNK_SIZE,
    bounded_decay: bool = True,
) -> tuple[Tensor, Tensor]:
    """flash-linear-attention's Triton kernel: bf16 inputs (fp32 and fp64 are cast), fp32 state.

    fla's state is [B, H, K, V]; we transpose in and out so callers only ever see [value, key].
    ``bounded_decay`` tells fla that w lies in [-exp(-0.5), 0), true for our model by construction;
    it licenses fla's faster tensor-core path with 64-token chunks.
    """
    from fla.ops.rwkv7 import chunk_rwkv7

    out_dtype = r.dtype
    (r, w, k, v, a, b), initial = _fla_inputs(r, w, k, v, a, b, state)
    y, final = chunk_rwkv7(
        r=r,
        w=w,
        k=k,
        v=v,
        a=a,
        b=b,
        scale=1.0,
        initial_state=initial,
        output_final_state=True,
        chunk_size=chunk_size,
        **({"safe_gate": True, "lower_bound": -math.exp(-0.5)} if bounded_decay else {}),
    )
    return y.to(out_dtype), final.transpose(-1, -2)


def _fla_backward(
    r: Tensor, w: Tensor, k: Tensor, v: Tensor, a: Tensor, b: Tensor, state: Optional[Tensor],
    grad_y: Tensor, grad_state: Tensor,
) -> list[Tensor]:
    """Gradients of :func:`wkv7_fla` (default arguments) from its inputs alone, by fla's own
    backward (:mod:`asr.ops.fla_backward`); tests/test_wkv_parity.py checks it on a GPU."""
    from asr.ops.fla_backward import fla_chunk_backward

    vectors, initial = _fla_inputs(r, w, k, v, a, b, state)
    grads = fla_chunk_backward(vectors, initial, grad_y.to(vectors[0].dtype),
                               grad_state.float().transpose(-1, -2), FLA_CHUNK_SIZE)
    out = [g.to(x.dtype).contiguous() for g, x in zip(grads[:6], (r, w, k, v, a, b))]
    dh0 = grads[6]
    if state is not None:
        out.append(torch.zeros_like(state) if dh0 is None else dh0.transpose(-1, -2).to(state.dtype).contiguous())
    return out


_FORMS = {"recurrent": wkv7_recurrent, "chunked": wkv7_chunked, "fla": wkv7_fla}


def _state_dtype(r: Tensor, impl: str) -> torch.dtype:
    return torch.float64 if r.dtype == torch.float64 and impl != "fla" else torch.float32


def _run_form(r, w, k, v, a, b, state, impl):  # noqa: ANN001, ANN202 (the op's schema types them)
    """One form with autocast off (each form picks its own compute dtype), outputs fresh and
    contiguous: an op's outputs may not alias its inputs, and compiled code trusts the strides
    the fake below reports."""
    with torch.autocast(r.device.type, enabled=False):
        y, s = _FORMS[impl](r, w, k, v, a, b, state)
    y, s = y.contiguous(), s.contiguous()
    if state is not None and s.data_ptr() == state.data_ptr():  # T = 0 hands the state back
        s = s.clone()
    return y, s


# The wkv recurrence as one opaque operator for torch.compile. Why: traced graphs cannot look into
# fla's Triton autograd Function (fla marks it compiler.disable), so every block used to break into
# two graphs around it, with Python between them. As a custom op the whole block (or model) is one
# graph: inductor fuses the element-wise work on both sides and nothing in between runs in Python.
# The backward of the PyTorch forms recomputes the form's forward with autograd and differentiates
# it (an op cannot hand a saved autograd graph to its backward); fla's is called on the saved inputs
# (_fla_backward), as fla's own backward rebuilds its intermediates from them anyway.
@torch.library.custom_op("asr::wkv7", mutates_args=())
def _wkv7_op(
    r: Tensor, w: Tensor, k: Tensor, v: Tensor, a: Tensor, b: Tensor, state: Optional[Tensor], impl: str
) -> tuple[Tensor, Tensor]:
    return _run_form(r, w, k, v, a, b, state, impl)


@_wkv7_op.register_fake
def _wkv7_fake(r, w, k, v, a, b, state, impl):  # noqa: ANN001, ANN202
    batch, _, heads, size = r.shape
    return torch.empty_like(r, memory_format=torch.contiguous_format), r.new_empty(
        batch, heads, size, size, dtype=_state_dtype(r, impl)
    )


@torch.library.custom_op("asr::wkv7_backward", mutates_args=())
def _wkv7_backward_op(
    r: Tensor, w: Tensor, k: Tensor, v: Tensor, a: Tensor, b: Tensor, state: Optional[Tensor],
    grad_y: Tensor, grad_state: Tensor, impl: str,
) -> list[Tensor]:
    if impl == "fla":
        return _fla_backward(r, w, k, v, a, b, state, grad_y, grad_state)
    inputs = [t.detach().requires_grad_() for t in (r, w, k, v, a, b)]
    if state is not None:
        inputs.append(state.detach().requires_grad_())
    with autograd_inside_op(), torch.enable_grad():
        y, s = _run_form(*inputs[:6], inputs[6] if state is not None else None, impl)
        grads = torch.autograd.grad((y, s), inputs, (grad_y, grad_state.to(s.dtype)), allow_unused=True)
    return [torch.zeros_like(x) if g is None else g.contiguous() for x, g in zip(inputs, grads)]


@_wkv7_backward_op.register_fake
def _wkv7_backward_fake(r, w, k, v, a, b, state, grad_y, grad_state, impl):  # noqa: ANN001, ANN202
    inputs = (r, w, k, v, a, b) + (() if state is None else (state,))
    return [torch.empty_like(x, memory_format=torch.contiguous_format) for x in inputs]


def _wkv7_setup_context(ctx, inputs, output) -> None:  # noqa: ANN001
    r, w, k, v, a, b, state, impl = inputs
    ctx.impl = impl
    ctx.has_state = state is not None
    ctx.save_for_backward(r, w, k, v, a, b, *(() if state is None else (state,)))


def _wkv7_backward(ctx, grad_y, grad_state):  # noqa: ANN001, ANN202
    saved = ctx.saved_tensors
    r, state = saved[0], (saved[6] if ctx.has_state else None)
    if grad_y is None:
        grad_y = torch.zeros_like(r)
    if grad_state is None:
        batch, _, heads, size = r.shape
        grad_state = r.new_zeros(batch, heads, size, size, dtype=_state_dtype(r, ctx.impl))
    grads = torch.ops.asr.wkv7_backward(*saved[:6], state, grad_y, grad_state, ctx.impl)
    return (*grads[:6], grads[6] if ctx.has_state else None, None)


_wkv7_op.register_autograd(_wkv7_backward, setup_context=_wkv7_setup_context)


def wkv7(
    r: Tensor,
    w: Tensor,
    k: Tensor,
    v: Tensor,
    a: Tensor,
    b: Tensor,
    state: Optional[Tensor] = None,
    impl: str = "auto",
) -> tuple[Tensor, Tensor]:
    """Dispatch to a wkv form.

    ``impl``: ``"auto"`` (fla on CUDA when installed, the loop for a few tokens, else chunked),
    ``"recurrent"``, ``"chunked"`` or ``"fla"``. Eager calls run the form directly (fla keeps its
    own autograd); under ``torch.compile`` the form runs as the opaque ``asr::wkv7`` op above.
    For fla, the casts of its inputs to bf16 and of its output back happen in the traced graph, not
    in the op: inductor fuses them into the kernels that make and read those tensors, where the
    op's own casts were separate copies (the same values: fla gets bf16 either way).
    """
    if impl == "auto":
        if r.is_cuda and fla_available() and r.shape[1] > 1:
            impl = "fla"
        elif r.shape[1] <= 4:
            impl = "recurrent"
        else:
            impl = "chunked"
    if impl not in _FORMS:
        raise ValueError(f"unknown wkv7 implementation {impl!r}")
    if torch.compiler.is_compiling():
        if impl == "fla":  # fla's bf16 casts in the traced graph, where inductor fuses them
            out_dtype = r.dtype
            kernel_dtype = _fla_kernel_dtype(r.dtype)
            r, w, k, v, a, b = (t.to(kernel_dtype) for t in (r, w, k, v, a, b))
            y, new_state = torch.ops.asr.wkv7(r, w, k, v, a, b, state, impl)
            return y.to(out_dtype), new_state
        return torch.ops.asr.wkv7(r, w, k, v, a, b, state, impl)
    return _FORMS[impl](r, w, k, v, a, b, state)
