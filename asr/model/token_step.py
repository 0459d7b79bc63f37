"""The streaming step as one compiled C++ function (``torch.compile``, inductor on the CPU).

Opt-in: :meth:`asr.model.CTCModel.prepare_for_inference` with ``compile=True``. It then serves
``CTCModel.step`` calls that bring exactly one new encoder frame (40 ms) of one stream, the call a
live recognizer makes 25 times a second, and, with ``compile_frames``, calls of other frame
counts (4 frames: 160 ms, a segment of a 160 ms-latency stream), each its own compiled function;
every other call keeps the packed path.

Why: at one token the packed path (:func:`asr.model.rwkv7.packed_step`) is bound by two things
that no rearrangement of PyTorch calls removes (profiled on a 2-core x86 box, one thread, the
8-layer d=320 model): its ~65 matrix-vector products go through MKL's small-matrix gemv at
~10 GB/s, while the same machine reads memory at ~45 GB/s; and ~1,250 ATen calls per token cost
another ~1.5 ms. Here every block of the stack, the final LayerNorm and the CTC head are one
traced graph, and each product is written as a multiply and a row sum over weights in [out, in]
layout (a row dot product, contiguous in memory), so inductor generates its own mat-vec loops and
fuses the element-wise work around them into the same C++ function: ~2x faster per frame.

The arithmetic is that of ``packed_step`` (same operations, same order of the element-wise math),
built from the same packs (:class:`asr.model.rwkv7.PackedBlock`), so the two agree to float
rounding (float32: summation order in the products only). With int8 packs the weights are the
packs' own int8 values and per-channel scales, activations are quantized per row as there, and the
int8 products go through ``torch._int_mm`` (oneDNN, exact int32 sums) as in the packed path, at any
frame count. So it equals the int8 packed path up to where float rounding moves a value across an
int8 rounding step (as streaming vs one pass does, tests/test_step_int8.py).

Costs: compiling takes ~10-80 s (a C++ compiler must be installed; inductor caches the result on
disk, later processes take a few seconds), and the weights are copied once more into one flat
buffer in the order the step reads them (float32: ~+100 % of the block weights; int8: one byte
per weight), because a single run streams from memory faster than separate matrices and passing
one buffer keeps the compiled function's input checks (dynamo guards) cheap.
"""
from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from typing import Callable, Iterator, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from asr.model.rwkv7 import NEG_EXP_HALF, BlockState, Int8Matrix, PackedBlock, _wkv_token
from asr.model.rwkv7 import _shift as _packed_shift


@dataclass(frozen=True)
class _Slot:
    """Where one tensor lives in a flat buffer: a contiguous block at ``offset`` of ``shape``, or
    with ``cols``, columns [cols[0], cols[1]) of that block (a [rows, cols] matrix)."""

    offset: int
    shape: tuple[int, ...]
    cols: Optional[tuple[int, int]] = None

    def get(self, buf: Tensor) -> Tensor:
        n = 1
        for s in self.shape:
            n *= s
        t = buf[self.offset : self.offset + n].view(self.shape)
        return t if self.cols is None else t[:, self.cols[0] : self.cols[1]]

    def columns(self, start: int, end: int) -> "_Slot":
        """Columns [start, end) of this [rows, cols] slot (a strided view)."""
        return _Slot(self.offset, self.shape, (start, end))

    def rows(self, start: int, end: int) -> "_Slot":
        """Rows [start, end) of this [rows, cols] slot (contiguous)."""
        cols = self.shape[1]
        return _Slot(self.offset + start * cols, (end - start, cols))

    def part(self, start: int, end: int) -> "_Slot":
        """Elements [start, end) of this 1-D slot."""
        return _Slot(self.offset + start, (end - start,))


class _Arena:
    """Collects tensors into one flat buffer, in the order they are added (the step's read order)."""

    def __init__(self, dtype: torch.dtype):
        self.dtype = dtype
        self.parts: list[Tensor] = []
        self.size = 0

    def add(self, t: Tensor) -> _Slot:
        slot = _Slot(self.size, tuple(t.shape))
        self.parts.append(t.detach().reshape(-1))
        self.size += t.numel()
        return slot

    def build(self) -> Tensor:
        if not self.parts:
            return torch.empty(0, dtype=self.dtype)
        buf = torch.empty(self.size, dtype=self.dtype, device=self.parts[0].device)
        pos = 0
        for p in self.parts:
            buf[pos : pos + p.numel()].copy_(p)
            pos += p.numel()
        return buf


@dataclass(frozen=True)
class _Mat:
    """A weight in [out, in] layout: float32 (``w`` in the float buffer) or int8 (``w`` in the int8
    buffer and its per-output scale ``scale`` in the float buffer)."""

    w: _Slot
    scale: Optional[_Slot] = None


@dataclass(frozen=True)
class _BlockLayout:
    """One block's slots (all Python ints: constants of the traced graph)."""

    C: int
    H: int
    N: int
    int8: bool
    ln0: Optional[tuple[_Slot, _Slot, float]]
    ln1: tuple[_Slot, _Slot, float]
    ln2: tuple[_Slot, _Slot, float]
    mu: _Slot  # [6, C]: x_r, x_k, x_v, x_w, x_a, x_g
    rkv: tuple[_Mat, _Mat, _Mat]
    downs: tuple[_Mat, ...]  # LoRA down-projections, (v,) w, a, g: [rank, C] each
    ups: tuple[_Mat, ...]  # LoRA up-projections, same order: [C, rank] each
    down_all: _Mat  # the same, concatenated as in the pack: [D, C] (all ranks, D = their sum)
    up_all: _Mat  # [C, D]
    lora_mask: _Slot  # [n, D]: 1 where column d belongs to LoRA n (the pack's block diagonal)
    bias: _Slot  # [n - 1, C]: (v0,) w0, a0
    k_k: _Slot
    k_a: _Slot
    one_minus_k_a: _Slot
    r_k: _Slot  # [H, N]
    ln_x: tuple[_Slot, _Slot, float]
    w_o: _Mat
    cmix_mu: _Slot
    ffn_key: _Mat
    ffn_value: _Mat


@dataclass(frozen=True)
class _Layout:
    blocks: tuple[_BlockLayout, ...]
    ln_out: tuple[_Slot, _Slot, float]
    head_w: _Slot  # [V, C]
    head_b: _Slot
    f32_size: int  # elements of the two buffers
    i8_size: int


def _layout_and_buffers(
    packs: list[PackedBlock], ln_out: torch.nn.LayerNorm, head: torch.nn.Linear
) -> tuple[_Layout, Tensor, Tensor]:
    """The packs' weights copied into a float32 buffer (and an int8 one for int8 packs), [out, in]."""
    f32, i8 = _Arena(torch.float32), _Arena(torch.int8)

    def mat(w: "Tensor | Int8Matrix") -> _Mat:  # w as used by packed_step: x @ w, w [in, out]
        if isinstance(w, Int8Matrix):
            return _Mat(i8.add(w.q_t.t()), f32.add(w.scale))
        return _Mat(f32.add(w.t()))

    def split(m: "Tensor | Int8Matrix", edges: list[int], outputs: bool) -> tuple[_Mat, tuple[_Mat, ...]]:
        """A concatenated LoRA matrix, added once: its slot, and one slot per LoRA: its rows of
        [out, in] (``outputs``: the down-projections [D, C]) or its columns (the up-projections [C, D])."""
        whole = mat(m)
        out = []
        for lo, hi in zip(edges[:-1], edges[1:]):
            if outputs:  # own rows, and the scales of those outputs
                scale = None if whole.scale is None else whole.scale.part(lo, hi)
                out.append(_Mat(whole.w.rows(lo, hi), scale))
            else:  # own input columns; every output (and its scale) is shared
                out.append(_Mat(whole.w.columns(lo, hi), whole.scale))
        return whole, tuple(out)

    def ln(t: tuple[Tensor, Tensor, float]) -> tuple[_Slot, _Slot, float]:
        return f32.add(t[0]), f32.add(t[1]), float(t[2])

    blocks = []
    for p in packs:
        C, H, N = p.channels, p.n_heads, p.head_size
        mask = p.lora_mask.view(p.lora_mask.shape[0], -1)  # [n, D] block diagonal 0/1
        edges = [0]
        for row in mask:
            edges.append(edges[-1] + int(row.sum().item()))
        ln0 = ln(p.ln0) if p.ln0 is not None else None
        l1 = ln(p.ln1)
        mu = f32.add(p.mu.view(6, C))
        rkv = tuple(mat(w) for w in (p.w_rkv if p.int8 else p.w_rkv.unbind(0)))
        down_all, downs = split(p.w_down, edges, outputs=True)
        up_all, ups = split(p.w_up, edges, outputs=False)
        blocks.append(_BlockLayout(
            C=C, H=H, N=N, int8=p.int8, ln0=ln0, ln1=l1, ln2=ln(p.ln2), mu=mu, rkv=rkv, downs=downs, ups=ups,
            down_all=down_all, up_all=up_all, lora_mask=f32.add(mask),
            bias=f32.add(p.bias.view(-1, C)), k_k=f32.add(p.k_k), k_a=f32.add(p.k_a),
            one_minus_k_a=f32.add(p.one_minus_k_a), r_k=f32.add(p.r_k), ln_x=ln(p.ln_x), w_o=mat(p.w_o),
            cmix_mu=f32.add(p.cmix_mu), ffn_key=mat(p.w_ffn_key), ffn_value=mat(p.w_ffn_value),
        ))
    ln_o, head_w, head_b = ln((ln_out.weight, ln_out.bias, ln_out.eps)), f32.add(head.weight), f32.add(head.bias)
    layout = _Layout(tuple(blocks), ln_o, head_w, head_b, f32.size, i8.size)
    return layout, f32.build(), i8.build()


def _quant(x: Tensor) -> tuple[Tensor, Tensor]:
    """:func:`asr.model.rwkv7._quant_rows` on rows x [..., K], the int8 values kept as float32."""
    amax = x.abs().amax(dim=-1, keepdim=True).clamp(min=1e-30)
    return torch.mul(x, 127.0 / amax).round(), amax


def _rows_dot(w: Tensor, x: Tensor) -> Tensor:
    """x [T, K] @ w.T for w [out, K]: per frame a multiply and a row sum, which inductor writes as
    its own loops. Measured on the bundled model (one thread): 1.25 ms per frame at T = 4 against
    2.0 at T = 1. The single broadcast product [out, T, K] summed over K, which reads as the
    better loop, made inductor recompute each frame's input inside the product: 10-20x slower."""
    return torch.stack([(w * x[t]).sum(-1) for t in range(x.shape[0])])


def _mv(m: _Mat, x: Tensor, f32: Tensor, i8: Tensor, q: Optional[tuple[Tensor, Tensor]] = None) -> Tensor:
    """x [T, K] @ W for a weight in [out, in] layout (:func:`_rows_dot`). int8 weights: x quantized
    per row (or given quantized, ``q``), the sum of integer products, then scaled per row and per
    column as :func:`asr.model.rwkv7._mm8`, the products in ``torch._int_mm`` (oneDNN, int32 sums,
    as the packed path) at any T. Inductor's own loops for them (int8 converted to float, summed
    in float32) were slower. At T = 4 they took 1.75 ms per frame against 0.61, converting each
    weight once per frame. At T = 1 the generated C++ recomputed each product's quantized input
    (layer norm, token shift, scale, rounding) inside the product loop, once per output row;
    ``_int_mm`` takes it computed once. Session 9, A/B inside one process, both orders:
    ``model.step`` per frame took 0.81x and 0.86x the time (2.10 against 2.58 and 2.45 ms)."""
    if m.scale is None:
        return _rows_dot(m.w.get(f32), x)
    qx, amax = q if q is not None else _quant(x)
    acc = torch._int_mm(qx.to(torch.int8), m.w.get(i8).t()).to(torch.float32)
    return (acc * amax) * m.scale.get(f32)


def _shift(u: Tensor, prev: Tensor) -> Tensor:
    """Token shift of one stream's frames u [T, C] after ``prev`` [C]: u_{t-1} - u_t (the packed
    path's :func:`asr.model.rwkv7._shift` with one stream)."""
    return _packed_shift(u, prev.unsqueeze(0), 1, u.shape[0])[0]


def _int8_loras(L: _BlockLayout, f32: Tensor, i8: Tensor, qm: tuple[Tensor, Tensor], T: int) -> list[Tensor]:
    """The LoRAs of an int8 block as the packed path computes them: all down-projections in one
    product (each LoRA's input row against every LoRA's columns, the others' masked off), then all
    up-projections in one (each row nonzero in its own LoRA's columns only). The same values as
    one product per LoRA: the int32 sums are exact, and a masked row's maximum is its own LoRA's.
    Why: 8 int8 products per block become 2, and the products' rows grow from T to 4 T, which
    ``torch._int_mm`` (oneDNN) runs at a lower cost per row. Used from 2 frames per call: at 4
    frames the compiled step took 0.92x the time of one product per LoRA, at one frame 1.16x
    (bundled model, one thread, the two alternating in one process, session 11), so one frame
    keeps a product per LoRA. Returns the up-projections' rows [T, C]: (v,) w, a, g."""
    n = len(L.downs)
    lo = 6 - n
    C, D = L.C, L.lora_mask.shape[1]
    rows = (qm[0][lo:].reshape(n * T, C), qm[1][lo:].reshape(n * T, 1))
    mask = L.lora_mask.get(f32).unsqueeze(1)  # [n, 1, D]
    h = (_mv(L.down_all, rows[0], f32, i8, rows).view(n, T, D) * mask).unbind(0)
    h = [*h[: n - 3], torch.tanh(h[n - 3]), h[n - 2], torch.sigmoid(h[n - 1]) * mask[n - 1]]  # tanh(0) = 0
    return list(_mv(L.up_all, torch.stack(h).view(n * T, D), f32, i8).view(n, T, C).unbind(0))


def _block_frames(
    L: _BlockLayout, f32: Tensor, i8: Tensor, x: Tensor, tmix_prev: Tensor, S: Tensor, cmix_prev: Tensor,
    v_first: Optional[Tensor],
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """:func:`asr.model.rwkv7.packed_step` for T frames of one stream: x [T, C], prevs [C],
    S [H, N, N]. Returns (x, new tmix_prev, new S, new cmix_prev, v_first)."""
    C, H, N = L.C, L.H, L.N
    T = x.shape[0]
    g_ = lambda s: s.get(f32)  # noqa: E731
    if L.ln0 is not None:
        x = F.layer_norm(x, (C,), g_(L.ln0[0]), g_(L.ln0[1]), L.ln0[2])
    # ---- time mix
    u = F.layer_norm(x, (C,), g_(L.ln1[0]), g_(L.ln1[1]), L.ln1[2])
    mixes = torch.addcmul(u, _shift(u, tmix_prev), g_(L.mu).unsqueeze(1))  # [6, T, C]: x_r, x_k, x_v, x_w, x_a, x_g
    qm = _quant(mixes) if L.int8 else None
    row = lambda i: None if qm is None else (qm[0][i], qm[1][i])  # noqa: E731
    r, k, v = (_mv(L.rkv[i], mixes[i], f32, i8, row(i)) for i in range(3))
    n = len(L.downs)
    lo = 6 - n  # mixes rows of the LoRAs: (x_v,) x_w, x_a, x_g
    if L.int8 and T > 1:
        up = _int8_loras(L, f32, i8, qm, T)
    else:
        h = [_mv(L.downs[i], mixes[lo + i], f32, i8, row(lo + i)) for i in range(n)]
        h[n - 3] = torch.tanh(h[n - 3])
        h[n - 1] = torch.sigmoid(h[n - 1])
        up = [_mv(L.ups[i], h[i], f32, i8) for i in range(n)]  # rows: (v,) w, a, g
    bias = g_(L.bias)
    gates = [torch.sigmoid(up[i] + bias[i]) for i in range(n - 1)]
    g = up[n - 1]
    if n == 4:
        assert v_first is not None, "layers after the first need layer 0's v"
        v = torch.lerp(v, v_first, gates[0])
    else:
        v_first = v
    w_sig, a = gates[n - 3], gates[n - 2]
    kk = F.normalize((k * g_(L.k_k)).view(T, H, N), dim=-1, p=2.0, eps=1e-12)
    k = k * torch.addcmul(g_(L.one_minus_k_a), a, g_(L.k_a))
    b = kk * a.view(T, H, N)
    # wkv, token by token: S' = S diag(exp(w)) - (S kk)(kk a)^T + v k^T; y = S' r
    decay = torch.exp(w_sig * NEG_EXP_HALF).view(T, H, 1, N)
    ys = []
    for t in range(T):
        s_kk = (S * kk[t].view(H, 1, N)).sum(dim=-1, keepdim=True)
        S = S * decay[t] - s_kk * b[t].view(H, 1, N) + v[t].view(H, N, 1) * k[t].view(H, 1, N)
        ys.append((S * r[t].view(H, 1, N)).sum(dim=-1).view(1, C))
    y = ys[0] if T == 1 else torch.cat(ys)
    y = F.group_norm(y, H, g_(L.ln_x[0]), g_(L.ln_x[1]), L.ln_x[2])
    bonus = ((r * k).view(T, H, N) * g_(L.r_k)).sum(dim=-1, keepdim=True) * v.view(T, H, N)
    x = x + _mv(L.w_o, (y + bonus.view(T, C)) * g, f32, i8)
    # ---- channel mix
    u2 = F.layer_norm(x, (C,), g_(L.ln2[0]), g_(L.ln2[1]), L.ln2[2])
    hidden = torch.relu(_mv(L.ffn_key, torch.addcmul(u2, _shift(u2, cmix_prev), g_(L.cmix_mu)), f32, i8)).square()
    x = x + _mv(L.ffn_value, hidden, f32, i8)
    return x, u[-1], S, u2[-1], v_first


def _make_step(layout: _Layout) -> Callable[..., tuple[Tensor, ...]]:
    """The whole stack for T frames of one stream, the layout baked in: (x [T, C], f32, i8, *states)
    -> (logits [T, V], *new states), states flat as (tmix_prev [1, C], S [1, H, N, N], cmix_prev
    [1, C]) per block: the shapes of a :class:`BlockState` of one stream, so that the caller passes
    and keeps them without reshaping (~50 ATen calls per frame fewer)."""

    def step(x: Tensor, f32: Tensor, i8: Tensor, *states: Tensor) -> tuple[Tensor, ...]:
        v_first = None
        new: list[Tensor] = []
        for i, L in enumerate(layout.blocks):
            x, tp, S, cp, v_first = _block_frames(L, f32, i8, x, states[3 * i].view(L.C), states[3 * i + 1][0],
                                                  states[3 * i + 2].view(L.C), v_first)
            new += [tp.view(1, L.C), S.unsqueeze(0), cp.view(1, L.C)]
        w, b, eps = layout.ln_out
        x = F.layer_norm(x, (x.shape[-1],), w.get(f32), b.get(f32), eps)
        return (_rows_dot(layout.head_w.get(f32), x) + layout.head_b.get(f32), *new)

    return step


#: Compiled steps by (layout, frames per call), shared by all models of the same sizes (they hold
#: no weights).
_COMPILED: dict[tuple[_Layout, int], Callable[..., tuple[Tensor, ...]]] = {}


def _compiled_step(layout: _Layout, frames: int) -> Callable[..., tuple[Tensor, ...]]:
    """The step of ``layout`` for ``frames`` frames per call, traced to an FX graph of ATen ops
    (``make_fx``: the layout's Python ints and the frame count become constants of the graph; the
    wkv recurrence is unrolled over the frames) and compiled by inductor, without dynamo.

    ``torch.compile`` on the same function works as well, but dynamo re-checks every layout int
    and input tensor it reads on every call (its guards: ~0.2-0.5 ms a token, measured); here the
    caller guarantees the input shapes instead (:meth:`CompiledTokenStep.__call__`). The example
    inputs are fake tensors with a shape environment: that lets inductor's FX graph cache (on disk)
    serve later processes (~1.5 s instead of ~15 s for the 8-layer model).

    The wrapper that calls the generated kernels, and the ~110 int8 products (``torch._int_mm``)
    between them, is C++ too (inductor's ``cpp_wrapper``): per frame it makes ~180 tensor views and
    ~70 allocations, which Python made at ~0.28 ms per frame. The compiled function alone, bundled
    model, int8, one thread, alternating in one process: 0.479 ms per frame against 0.758 (session
    10). It costs ~30 s more on the first compile (C++ to build; the disk cache keeps it)."""
    fn = _COMPILED.get((layout, frames))
    if fn is not None:
        return fn
    L0 = layout.blocks[0]
    C, H, N = L0.C, L0.H, L0.N
    shapes = [(frames, C), (layout.f32_size,), (layout.i8_size,)] + [s for _ in layout.blocks for s in ((1, C), (1, H, N, N), (1, C))]
    dtypes = [torch.float32, torch.float32, torch.int8] + [torch.float32] * (3 * len(layout.blocks))
    fn = compile_graph(_make_step(layout), [torch.empty(s, dtype=d) for s, d in zip(shapes, dtypes)])
    _COMPILED[(layout, frames)] = fn
    return fn


def compile_graph(fn: Callable[..., tuple[Tensor, ...]], examples: list[Tensor]) -> Callable[..., tuple[Tensor, ...]]:
    """``fn`` traced for inputs of exactly the examples' shapes, strides and dtypes (``make_fx`` on
    fake tensors with a shape environment, so inductor's FX graph cache on disk serves later
    processes) and compiled by inductor with its C++ wrapper, without dynamo: the caller
    guarantees the inputs' shapes and strides (see :func:`_compiled_step` for why). The examples
    must be distinct tensors: the trace takes one tensor given twice for one input, and reads
    it for both (a front end traced with one zero tensor for CMVN's mean and istd did)."""
    from torch._inductor import compile as inductor_compile
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.proxy_tensor import make_fx
    from torch.fx.experimental.symbolic_shapes import ShapeEnv

    fake_mode = FakeTensorMode(shape_env=ShapeEnv())
    with _quiet_cpp_build(), torch.no_grad():
        fakes = [fake_mode.from_tensor(t, static_shapes=True) for t in examples]  # strides kept, memory unread
        gm = make_fx(fn)(*fakes)
        return inductor_compile(gm, fakes, options={"cpp_wrapper": True})


@contextlib.contextmanager
def _quiet_cpp_build() -> Iterator[None]:
    """Quiet two warnings of a compile that are noise for someone starting asr-live: inductor's C++
    build imports torch.utils.cpp_extension, which warns "No CUDA runtime is found" on every
    CPU-only machine; and for the symbolically traced wkv update, inductor's disk cache fails to
    pickle a cache key and logs it with a traceback (torch 2.14: the graph is then compiled
    without that cache, ~4 s per process)."""
    loggers = [logging.getLogger(name) for name in ("torch.utils.cpp_extension", "torch._inductor.codecache")]
    levels = [log.level for log in loggers]
    for log in loggers:
        log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for log, level in zip(loggers, levels):
            log.setLevel(level)


# ---------------------------------------------------------------------------------------------
# The wkv update of several streams at once (the packed path's token loop, for step_batch).
#
# At 100 streams of the bundled model the packed step's wkv update makes several passes over each
# block's [100, 5, 64, 64] state (8 MB), each into a fresh tensor; compiled, inductor fuses them.
# Unlike the one-stream step above the stream count changes from call to call, so it is traced
# with a symbolic batch dimension: one compile per head layout serves any number of streams.
# Without dynamo on purpose: a torch.compile'd function is guarded on torch's thread count, and
# code that changes it (the test suite; asr-live sets one thread) recompiled it until dynamo's
# recompile limit failed the call (session 8).
# ---------------------------------------------------------------------------------------------

_COMPILED_WKV: dict[tuple[int, int], Callable[..., tuple[Tensor, Tensor]]] = {}
_TRACE_STREAMS = 32  # the example batch of the symbolic trace (any count >= 2 runs the result)


def _wkv_rows(
    S: Tensor, r: Tensor, w_sig: Tensor, k: Tensor, v: Tensor, kk: Tensor, b: Tensor
) -> tuple[Tensor, Tensor]:
    """``_wkv_token`` with its sizes read off the state, so a symbolic trace keeps them symbolic."""
    B, H, N, _ = S.shape
    return _wkv_token(S, r, w_sig, k, v, kk, b, B, H, N)


def compiled_wkv_update(heads: int, head_size: int) -> Callable[..., tuple[Tensor, Tensor]]:
    """:func:`asr.model.rwkv7._wkv_token` for ``heads`` heads of ``head_size``, compiled by inductor
    for any number of streams (``make_fx`` with symbolic shapes, then inductor; ~4 s once per
    process and layout). Call it through :func:`wkv_token_compiled`."""
    fn = _COMPILED_WKV.get((heads, head_size))
    if fn is None:
        from torch._inductor import compile as inductor_compile
        from torch.fx.experimental.proxy_tensor import make_fx

        B, H, N = _TRACE_STREAMS, heads, head_size
        example = [torch.zeros(B, H, N, N)] + [torch.zeros(B, H * N) for _ in range(6)]
        with _quiet_cpp_build(), torch.no_grad():
            gm = make_fx(_wkv_rows, tracing_mode="symbolic")(*example)
            fn = inductor_compile(gm, [n.meta["val"] for n in gm.graph.nodes if n.op == "placeholder"])
        _COMPILED_WKV[(heads, head_size)] = fn
    return fn


def wkv_token_compiled(
    S: Tensor, r: Tensor, w_sig: Tensor, k: Tensor, v: Tensor, kk: Tensor, b: Tensor, B: int, H: int, N: int
) -> tuple[Tensor, Tensor]:
    """:func:`asr.model.rwkv7._wkv_token` (same arguments and results, to float rounding) through
    :func:`compiled_wkv_update`, for B >= 2 streams. The compiled code checks only the shapes and
    strides it was traced with, so the rows come as contiguous [B, H * N]."""
    rows = (t.reshape(B, H * N).contiguous() for t in (r, w_sig, k, v, kk, b))
    y, S_new = compiled_wkv_update(H, N)(S.contiguous(), *rows)
    return y, S_new


class CompiledTokenStep:
    """The compiled steps of a model's packs (:meth:`CTCModel.prepare_for_inference`), one per
    number of encoder frames per call in ``frames``.

    Call :meth:`update` with the current packs before each use (cheap when they are the same
    objects); the buffers are rebuilt when the packs were. Compiled functions are kept per layout
    (model sizes, float32 or int8 packs) and frame count for the whole process, so each compiles
    once.
    """

    def __init__(self, frames: tuple[int, ...] = (1,)) -> None:
        self.frames = tuple(sorted(set(frames)))
        self._packs: Optional[list[PackedBlock]] = None
        self._layout: Optional[_Layout] = None
        self._fns: dict[int, Callable[..., tuple[Tensor, ...]]] = {}
        self._f32 = self._i8 = torch.empty(0)

    def release(self) -> None:
        """Drop the weight buffers (the compiled code stays, for a later :meth:`update`)."""
        self._packs, self._layout, self._fns = None, None, {}
        self._f32 = self._i8 = torch.empty(0)

    def update(self, packs: list[PackedBlock], ln_out: torch.nn.LayerNorm, head: torch.nn.Linear) -> None:
        if packs is self._packs:
            return
        with torch.no_grad():
            layout, self._f32, self._i8 = _layout_and_buffers(packs, ln_out, head)
        self._layout, self._packs = layout, packs
        self._fns = {t: _compiled_step(layout, t) for t in self.frames}

    def __call__(self, x: Tensor, states: list[BlockState]) -> tuple[Tensor, list[BlockState]]:
        """x [T, C] (T frames of one stream, T in ``frames``) and its block states -> logits [T, V],
        new states."""
        assert self._layout is not None, "update() first"
        T = x.shape[0]
        # the compiled code takes contiguous inputs of the shapes it was traced with (no-ops here)
        flat = [t.contiguous() for s in states for t in (s.tmix_prev, s.wkv, s.cmix_prev)]
        logits, *new = self._fns[T](x.contiguous(), self._f32, self._i8, *flat)
        return logits, [BlockState(*new[i : i + 3]) for i in range(0, len(new), 3)]
