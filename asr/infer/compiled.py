"""The compiled backends: :func:`asr.infer.engine.encode` traced for fixed shapes and compiled by
inductor (:func:`asr.ops.inductor.compile_graph`), with products written for it.

Why: at one token the eager step is bound by ~65 small matrix-vector products through MKL's gemv
(~10 GB/s where the machine reads ~45 GB/s) and ~1,000 ATen calls. Traced, the front end, every
block, the final LayerNorm and the head are one C++ function; each float product is a multiply
and a row sum over weights in [out, in] layout (:class:`RowsMatrix`), which inductor writes as its
own loops with the element-wise work fused around them: ~2x faster per frame. int8 products stay
``int_mm`` (exact int32 sums, as the eager int8 backend), one product per LoRA at one frame (the
concatenated LoRA products of the eager backend from two frames on, where they are faster).

Weights are graph inputs, not constants: they are copied into one float32 and one int8 buffer in
the order the step reads them (one run from memory) and the traced function takes views of them at
offsets baked into the graph. A stream's shapes differ with its phase (1 or 2 of conv2's inputs
cached); each (frames per call, phase) is its own compiled function, built here.
"""
from __future__ import annotations

import copy
from typing import Any, Callable, Optional

import torch
from torch import Tensor

from asr.infer.products import FloatMatrix, FrontProducts, Int8Matrix, PackedProducts
from asr.infer.step import Plan, build_plan, encode
from asr.model import CTCModel
from asr.model.rwkv7 import Block, BlockParams, BlockState
from asr.ops.inductor import compile_graph
from asr.ops.wkv7 import wkv7_token

_PHASES = (1, 2)  # conv2 input frames cached by a stream whose feature frames come in pairs
_ALIGN = 16  # elements: buffer offsets of the weights (64-byte aligned float32)
_TRACE_STREAMS = 32  # the example batch of the symbolic trace of the batched wkv update


class RowsMatrix:
    """A weight W [N, K] ([out, in], contiguous) used as ``x @ W^T``: per frame a multiply and a
    row sum, which inductor writes as its own loops. (One broadcast product [N, T, K] made inductor
    recompute each frame's input inside the product: 10-20x slower.)"""

    def __init__(self, w: Tensor) -> None:
        self.w = w

    def prepare(self, x: Tensor) -> Tensor:
        return x

    def mm(self, x: Tensor) -> Tensor:
        return torch.stack([(self.w * x[t]).sum(-1) for t in range(x.shape[0])])

    def addmm(self, base: Tensor, x: Tensor) -> Tensor:
        return base + self.mm(x)


def _quantized(m: Int8Matrix, lo: int, hi: int, rows: bool) -> Int8Matrix:
    """Part of an int8 [K, N] matrix: input rows [lo, hi) (their output scales shared) or output
    columns [lo, hi) (with their own scales)."""
    if rows:
        return Int8Matrix(m.q[lo:hi].contiguous(), m.qt[:, lo:hi].contiguous(), m.scale)
    return Int8Matrix(m.q[:, lo:hi].contiguous(), m.qt[lo:hi].contiguous(), m.scale[lo:hi].contiguous())


class TracedProducts(PackedProducts):
    """:class:`PackedProducts` for tracing: float32 as :class:`RowsMatrix`, int8 as there; one
    product per LoRA (int8 from two frames on: the concatenated form of the packed path)."""

    def __init__(self, block: Block, int8: bool) -> None:
        super().__init__(block, int8)
        if int8:
            self.downs = [_quantized(self.down, lo, hi, rows=False) for lo, hi in self.spans]
            self.ups = [_quantized(self.up, lo, hi, rows=True) for lo, hi in self.spans]
            return
        att, ffn = block.att, block.ffn
        rows = lambda w: RowsMatrix(w.detach().contiguous())  # noqa: E731
        self.rkv = [rows(att.receptance.weight), rows(att.key.weight), rows(att.value.weight)]
        self.downs = [rows(a.t()) for a, _ in block.lora_pairs()]
        self.ups = [rows(b.t()) for _, b in block.lora_pairs()]
        self.out, self.key, self.value = rows(att.output.weight), rows(ffn.key.weight), rows(ffn.value.weight)
        self.down = self.up = None

    def time_inputs(self, mixes: Tensor, acts: tuple[str, ...]) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        _, B, T, C = mixes.shape
        if self.int8 and B * T > 1:
            return super().time_inputs(mixes, acts)
        m = mixes.view(6, B * T, C)
        rows = self.quantized_rows(m) if self.int8 else None
        row = lambda i: m[i] if rows is None else rows(i, i + 1)  # noqa: E731
        r, k, v = (self.rkv[i].mm(row(i)).view(B, T, C) for i in range(3))
        ups = []
        for i, (down, up, act) in enumerate(zip(self.downs, self.ups, acts)):
            h = down.mm(row(6 - len(acts) + i))
            h = getattr(torch, act)(h) if act else h
            ups.append(up.mm(up.prepare(h)).view(B, T, C))
        return r, k, v, torch.stack(ups)

    @staticmethod
    def quantized_rows(m: Tensor) -> Callable[[int, int], tuple[Tensor, Tensor]]:
        """As :meth:`PackedProducts.quantized_rows`, the rows made int8 per product: inductor
        miscomputed ``int_mm`` on row slices of one int8 intermediate that two products share (the
        v row, from layer 1 on: ~6 % of the logits, torch 2.14)."""
        amax = m.abs().amax(dim=-1, keepdim=True).clamp(min=1e-30)
        rounded = torch.mul(m, 127.0 / amax).round()
        return lambda lo, hi: (rounded[lo:hi].reshape(-1, m.shape[-1]).to(torch.int8), amax[lo:hi].reshape(-1, 1))


_CLASSES = (Plan, PackedProducts, FloatMatrix, Int8Matrix, RowsMatrix, FrontProducts, BlockParams)


def _map_tensors(obj: Any, fn: Callable[[Tensor], Tensor]) -> Any:
    """``obj`` (a plan and what it holds) with every tensor replaced by ``fn(tensor)``, in a fixed order."""
    if isinstance(obj, Tensor):
        return fn(obj)
    if isinstance(obj, (list, tuple)):
        return type(obj)(_map_tensors(o, fn) for o in obj)
    if isinstance(obj, _CLASSES):
        new = copy.copy(obj)
        for name, value in vars(obj).items():
            setattr(new, name, _map_tensors(value, fn))
        return new
    return obj


class _Buffers:
    """A plan's tensors copied into one buffer per dtype (aligned offsets, read order), and the
    recipe that rebuilds the plan from views of those buffers (inside a traced function)."""

    def __init__(self, plan: Plan) -> None:
        self.slots: list[tuple[torch.dtype, int, tuple[int, ...], bool]] = []  # dtype, offset, shape, transposed
        parts: dict[torch.dtype, list[tuple[int, Tensor]]] = {torch.float32: [], torch.int8: []}
        sizes = {torch.float32: 0, torch.int8: 0}

        def record(t: Tensor) -> Tensor:
            transposed = t.dim() == 2 and not t.is_contiguous() and t.t().is_contiguous()
            src = (t.t() if transposed else t).contiguous()
            offset = sizes[t.dtype]
            parts[t.dtype].append((offset, src))
            sizes[t.dtype] = offset + -(-src.numel() // _ALIGN) * _ALIGN
            self.slots.append((t.dtype, offset, tuple(src.shape), transposed))
            return t

        self.plan = _map_tensors(plan, record)
        self.buffers = {}
        for dtype, items in parts.items():
            buf = torch.zeros(max(sizes[dtype], 1), dtype=dtype)
            for offset, src in items:
                buf[offset : offset + src.numel()].copy_(src.reshape(-1))
            self.buffers[dtype] = buf

    def rebuild(self, f32: Tensor, i8: Tensor) -> Plan:
        slots = iter(self.slots)

        def view(_: Tensor) -> Tensor:
            dtype, offset, shape, transposed = next(slots)
            buf = f32 if dtype == torch.float32 else i8
            n = 1
            for s in shape:
                n *= s
            t = buf[offset : offset + n].view(shape)
            return t.t() if transposed else t

        return _map_tensors(self.plan, view)


def _wkv7_tokens(T: int) -> Callable[..., tuple[Tensor, Tensor]]:
    """T tokens of :func:`wkv7_token` as one function: S [B, H, N, N], r, w, k, a, b [B, T, H, N],
    v [B, T, H, N] -> (y [B, T, H, N], S'). Traced, inductor keeps each row of S in cache through
    all T tokens and writes S' once (per-token calls read and write the whole state per token)."""

    def tokens(S: Tensor, r: Tensor, w: Tensor, k: Tensor, v: Tensor, a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
        ys = []
        for t in range(T):
            row = lambda x: x[:, t].unsqueeze(2)  # noqa: E731  [B, H, 1, N]
            y, S = wkv7_token(S, row(r), row(w), row(k), v[:, t].unsqueeze(3), row(a), row(b))
            ys.append(y)
        return torch.stack(ys, dim=1), S

    return tokens


class BatchedWkv:
    """The wkv update of batches of streams (:meth:`PackedProducts.wkv` with B >= 2), compiled once
    per token count 1..``max_tokens`` with the batch size symbolic: each call carries every row of
    the state through all its tokens in one pass (~4x faster than a compiled per-token update called
    per token at 50 streams and 2-3 tokens; the same values: the same per-token arithmetic)."""

    def __init__(self, heads: int, head_size: int, max_tokens: int = 4) -> None:
        H, N = heads, head_size
        self.fns = {}
        for T in range(1, max_tokens + 1):
            rows = [torch.zeros(_TRACE_STREAMS, T, H, N) for _ in range(6)]
            self.fns[T] = compile_graph(_wkv7_tokens(T), [torch.zeros(_TRACE_STREAMS, H, N, N), *rows], symbolic=True)

    def applies(self, r: Tensor, state: Optional[Tensor]) -> bool:
        """B >= 2 streams, a compiled token count, a float32 state."""
        return r.shape[0] >= 2 and r.shape[1] in self.fns and state is not None \
            and state.dtype == r.dtype == torch.float32

    def __call__(self, r: Tensor, w: Tensor, k: Tensor, v: Tensor, a: Tensor, b: Tensor,
                 state: Tensor) -> tuple[Tensor, Tensor]:
        """:func:`asr.ops.wkv7.wkv7`'s arguments ([B, T, H, N], state [B, H, N, N]) and results."""
        fn = self.fns[r.shape[1]]
        return fn(state.contiguous(), *(t.contiguous() for t in (r, w, k, v, a, b)))


class CompiledSteps:
    """The compiled steps of one model: one per (encoder frames per call, phase)."""

    def __init__(self, model: CTCModel, eager: Plan, int8: bool, frames: tuple[int, ...]) -> None:
        frames = tuple(sorted({int(t) for t in frames}))
        if not frames or frames[0] < 1:
            raise ValueError(f"compile_frames must be frame counts >= 1, got {frames!r}")
        self.frames, self.n_mels = frames, model.config.n_mels
        self.calls = 0  # calls served compiled
        self.buffers = _Buffers(build_plan(model, int8, TracedProducts))
        cfg = model.config
        C1, F1 = model.subsampling.conv1.conv.out_channels, model.subsampling.conv1._out_freq(cfg.n_mels)
        H, N = cfg.d_model // cfg.head_size, cfg.head_size
        state = [t for _ in range(cfg.n_layers) for t in
                 (torch.zeros(1, cfg.d_model), torch.zeros(1, H, N, N), torch.zeros(1, cfg.d_model))]
        f32, i8 = self.buffers.buffers[torch.float32], self.buffers.buffers[torch.int8]
        self.fns = {}
        for T in frames:
            for phase in _PHASES:
                examples = [torch.zeros(1, 4 * T, cfg.n_mels), torch.zeros(1, 2, cfg.n_mels),
                            torch.zeros(1, phase, F1, C1), f32, i8, *state]
                self.fns[(T, phase)] = compile_graph(self._traced, examples)
        kernel = BatchedWkv(H, N)
        for products in eager.products:
            products.kernel = kernel

    def _traced(self, features: Tensor, c1: Tensor, c2: Tensor, f32: Tensor, i8: Tensor,
                *states: Tensor) -> tuple[Tensor, ...]:
        plan = self.buffers.rebuild(f32, i8)
        blocks = [BlockState(*states[i : i + 3]) for i in range(0, len(states), 3)]
        logits, c1, c2, new = encode(plan, features, c1, c2, blocks)
        return (logits, c1, c2, *(t for s in new for t in (s.tmix_prev, s.wkv, s.cmix_prev)))

    def applies(self, features: Tensor, c1: Tensor, c2: Tensor) -> bool:
        """Whether a compiled step serves this call: one stream, 4 T float32 CPU feature frames (T
        in ``frames``), caches of a compiled phase."""
        B, t, n_mels = features.shape
        return B == 1 and t % 4 == 0 and (t // 4) in self.frames and n_mels == self.n_mels \
            and features.dtype == torch.float32 and features.device.type == "cpu" \
            and c1.shape[1] == 2 and c2.shape[1] in _PHASES

    def __call__(self, features: Tensor, c1: Tensor, c2: Tensor,
                 states: list[BlockState]) -> tuple[Tensor, Tensor, Tensor, list[BlockState]]:
        fn = self.fns[(features.shape[1] // 4, c2.shape[1])]
        self.calls += 1
        flat = [t.contiguous() for s in states for t in (s.tmix_prev, s.wkv, s.cmix_prev)]
        f32, i8 = self.buffers.buffers[torch.float32], self.buffers.buffers[torch.int8]
        logits, c1, c2, *new = fn(features.contiguous(), c1.contiguous(), c2.contiguous(), f32, i8, *flat)
        return logits, c1, c2, [BlockState(*new[i : i + 3]) for i in range(0, len(new), 3)]
