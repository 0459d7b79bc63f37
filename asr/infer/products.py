"""Matrix products for the inference engine: float32 and int8, on weights packed once.

Each backend implements :class:`asr.model.rwkv7.BlockProducts` (the block's arithmetic itself is
:func:`asr.model.rwkv7.block_step`, shared by all) and the front end's two products. At one
40 ms token a block's cost is not arithmetic but the number of PyTorch calls and how the weights
stream from memory, so the packs:

- copy all of a block's matrices into one buffer in the order the step reads them (one run from
  memory: ~15 % faster than separately allocated matrices at one token);
- make r, k, v one ``bmm`` over [3, C, C] (float32);
- make the LoRA down-projections one product with the concatenated [C, D] factors applied to all
  LoRA inputs at once, a block-diagonal 0/1 mask keeping each input's own columns (the waste is
  multiply-adds; the product is bound by reading the weights), and the up-projections one product
  with the stacked [D, C] factors: row i of (mask * h) @ [B_v; B_w; B_a; B_g] is h_i B_i (float32
  calls of ``SEPARATE_LORA_ROWS`` rows or more, batches of streams, run each LoRA's own products);
- fuse the residual adds into the output products (``addmm``).

int8 (:class:`Int8Matrix`): one scale per output channel of the weights, one dynamic scale per row
of activations (per frame of each stream, never per call, so outputs do not depend on how the
audio is cut or which streams share a batch), exact int32 sums (:func:`asr.ops.int_mm.int_mm`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional, Union

import torch
from torch import Tensor, nn

from asr.model.rwkv7 import Block
from asr.ops.int_mm import int_mm
from asr.ops.wkv7 import wkv7

Rows = Union[Tensor, tuple[Tensor, Tensor]]  # float rows, or (int8 rows, row maxima)
#: float32 rows (streams x frames) from which each LoRA is its own pair of products: with many rows
#: the masked concatenated products' wasted multiply-adds (n x the needed, for n LoRAs) cost more
#: than the weight reads they save (~3x faster at 125 rows, one thread)
SEPARATE_LORA_ROWS = 16


def quant_rows(x: Tensor) -> tuple[Tensor, Tensor]:
    """Dynamic symmetric int8 of the rows of x [..., K]: (q int8, amax [..., 1]), x ~= q amax/127.
    The row maximum is ``abs().amax`` (``vector_norm(x, inf)`` is the same value, ~10x slower)."""
    amax = x.abs().amax(dim=-1, keepdim=True).clamp_(min=1e-30)
    return torch.mul(x, 127.0 / amax).round_().to(torch.int8), amax


@dataclass
class FloatMatrix:
    """A weight W [K, N] used as ``x @ W`` (possibly a transposed view of an [N, K] copy)."""

    w: Tensor

    def prepare(self, x: Tensor) -> Tensor:
        return x

    def mm(self, x: Rows) -> Tensor:
        return torch.mm(x, self.w)

    def addmm(self, base: Tensor, x: Rows) -> Tensor:
        return torch.addmm(base, x, self.w)


@dataclass
class Int8Matrix:
    """W [K, N] in int8, one scale per output column: ``W[:, n] ~= q[:, n] * amax_n / 127``;
    ``scale`` holds ``amax_n / 127**2`` (the activation's 1/127 folded in). The int8 values are
    kept in both layouts oneDNN is fastest with: ``q`` [K, N] for several rows, ``qt`` [N, K]
    (used transposed) for one row (~2x faster there); a workload reads only one of them."""

    q: Tensor
    qt: Tensor
    scale: Tensor

    def prepare(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return quant_rows(x)

    def _acc(self, x: tuple[Tensor, Tensor]) -> Tensor:
        q, amax = x
        return int_mm(q, self.qt.t() if q.shape[0] == 1 else self.q) * amax

    def mm(self, x: Rows) -> Tensor:
        return self._acc(x).mul_(self.scale)

    def addmm(self, base: Tensor, x: Rows) -> Tensor:
        return torch.addcmul(base, self._acc(x), self.scale)


Matrix = Union[FloatMatrix, Int8Matrix]


def _rows(x: Tensor) -> Tensor:
    return x.reshape(-1, x.shape[-1])


class PackedProducts:
    """:class:`asr.model.rwkv7.BlockProducts` of one block from packed float32 or int8 weights."""

    def __init__(self, block: Block, int8: bool, arena_dtype: torch.dtype = torch.float32) -> None:
        att, ffn = block.att, block.ffn
        pairs = block.lora_pairs()
        edges = [0]
        for first, _ in pairs:
            edges.append(edges[-1] + first.shape[1])
        self.spans = list(zip(edges[:-1], edges[1:]))
        self.mask = att.w1.new_zeros(len(pairs), 1, edges[-1])
        for i, (lo, hi) in enumerate(self.spans):
            self.mask[i, :, lo:hi] = 1
        self.int8 = int8
        # every matrix as [K, N] for x @ W, in the order the step reads them
        mats = [att.receptance.weight.t(), att.key.weight.t(), att.value.weight.t(),
                torch.cat([a for a, _ in pairs], dim=1), torch.cat([b for _, b in pairs], dim=0),
                att.output.weight.t(), ffn.key.weight.t(), ffn.value.weight.t()]
        if int8:
            packed = _pack_int8(mats)
            self.rkv: Union[Tensor, list[Int8Matrix]] = packed[:3]
        else:  # stored as read: r, k, v as one [3, C, C]; W_o and the FFN value as their [N, K] rows
            stored = [torch.stack(mats[:3]), *mats[3:5], mats[5].t(), mats[6], mats[7].t()]
            views = _in_one_buffer(stored)
            self.rkv = views[0]
            packed = [None] * 3 + [FloatMatrix(w) for w in (views[1], views[2], views[3].t(), views[4], views[5].t())]
        self.down, self.up, self.out, self.key, self.value = packed[3:]
        self.kernel: Optional[Any] = None  # the compiled wkv of batches (asr.infer.compiled.BatchedWkv)
        self._loras: Optional[list[tuple[Tensor, Tensor]]] = None

    def time_inputs(self, mixes: Tensor, acts: tuple[str, ...]) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        _, B, T, C = mixes.shape
        M, n = B * T, len(acts)
        m = mixes.view(6, M, C)
        if self.int8:  # all six inputs quantized at once, one scale per row
            rows = self.quantized_rows(m)
            r, k, v = (self.rkv[i].mm(rows(i, i + 1)) for i in range(3))
            h = self.down.mm(rows(6 - n, 6))
        else:
            r, k, v = torch.bmm(m[:3], self.rkv).unbind(0)
            if M >= SEPARATE_LORA_ROWS:
                up = torch.stack([self._lora(i, m[6 - n + i], act) for i, act in enumerate(acts)])
                return r.view(B, T, C), k.view(B, T, C), v.view(B, T, C), up.view(n, B, T, C)
            h = self.down.mm(m[6 - n:].reshape(n * M, C))
        h = h.view(n, M, -1).mul_(self.mask)
        for i, act in enumerate(acts):
            if act:  # in place on the LoRA's own columns (the masked zeros stay zeros)
                getattr(h[i, :, self.spans[i][0] : self.spans[i][1]], act + "_")()
        up = self.up.mm(self.up.prepare(h.view(n * M, -1))).view(n, B, T, C)
        return r.view(B, T, C), k.view(B, T, C), v.view(B, T, C), up

    def _lora(self, i: int, x: Tensor, act: str) -> Tensor:
        """LoRA ``i`` of the n in ``time_inputs`` (float32) on rows x [M, C] alone: act(x A_i) B_i."""
        if self._loras is None:  # [C, d_i] and [d_i, C] of each LoRA, contiguous (made on first use)
            down, up = self.down.w, self.up.w
            self._loras = [(down[:, lo:hi].contiguous(), up[lo:hi].contiguous()) for lo, hi in self.spans]
        a, b = self._loras[i]
        h = torch.mm(x, a)
        if act:
            getattr(h, act + "_")()
        return torch.mm(h, b)

    @staticmethod
    def quantized_rows(m: Tensor) -> Callable[[int, int], tuple[Tensor, Tensor]]:
        """m [6, M, C] quantized per row; returns ``rows(lo, hi)``: m[lo:hi] as int8 rows [n M, C]
        and their maxima [n M, 1]."""
        qm, am = quant_rows(m)
        return lambda lo, hi: (qm[lo:hi].reshape(-1, qm.shape[-1]), am[lo:hi].reshape(-1, 1))

    def output(self, x: Tensor, o: Tensor) -> Tensor:
        return self.out.addmm(_rows(x), self.out.prepare(_rows(o))).view_as(x)

    def ffn_key(self, x: Tensor) -> Tensor:
        return self.key.mm(self.key.prepare(_rows(x))).view(*x.shape[:-1], -1)

    def ffn_value(self, x: Tensor, hidden: Tensor) -> Tensor:
        return self.value.addmm(_rows(x), self.value.prepare(_rows(hidden))).view_as(x)

    def wkv(self, r: Tensor, w: Tensor, k: Tensor, v: Tensor, a: Tensor, b: Tensor,
            state: Optional[Tensor]) -> tuple[Tensor, Tensor]:
        if self.kernel is not None and self.kernel.applies(r, state):
            return self.kernel(r, w, k, v, a, b, state)
        return wkv7(r, w, k, v, a, b, state)


def _in_one_buffer(tensors: list[Tensor]) -> list[Tensor]:
    """Contiguous copies of ``tensors`` in one buffer, in order (views of it)."""
    arena = tensors[0].new_empty(sum(t.numel() for t in tensors))
    out, pos = [], 0
    for t in tensors:
        out.append(arena[pos : pos + t.numel()].view(t.shape).copy_(t))
        pos += t.numel()
    return out


def _pack_int8(mats: list[Tensor]) -> list[Int8Matrix]:
    """mats [K, N] quantized per output column, into two int8 buffers (the two layouts), in order."""
    total = sum(m.numel() for m in mats)
    arenas = [torch.empty(total, dtype=torch.int8, device=mats[0].device) for _ in range(2)]
    out, pos = [], 0
    for m in mats:
        K, N = m.shape
        out.append(quantize_columns(m, arenas[0][pos : pos + m.numel()].view(K, N),
                                    arenas[1][pos : pos + m.numel()].view(N, K)))
        pos += m.numel()
    return out


def quantize_columns(w: Tensor, q_out: Optional[Tensor] = None, qt_out: Optional[Tensor] = None) -> Int8Matrix:
    """Per-output-channel symmetric int8 of w [K, N] (written into the given int8 views)."""
    w = w.detach().float()
    amax = w.abs().amax(dim=0).clamp_(min=1e-30)
    q = torch.round(w * (127.0 / amax)).to(torch.int8)
    q_out = q.clone() if q_out is None else q_out.copy_(q)
    qt_out = q.t().contiguous() if qt_out is None else qt_out.copy_(q.t())
    return Int8Matrix(q=q_out, qt=qt_out, scale=amax / 127.0**2)


@dataclass
class FrontProducts:
    """The subsampling's weights for the im2col front end (:mod:`asr.infer.frontend`): conv1 stays
    float32 (one input channel, 9 taps); conv2 [9C, C] (windows with channels innermost) and the
    projection [C * F2, d_model] are float or int8 matrices."""

    conv1_w: Tensor  # [9, C]
    conv1_b: Tensor
    conv2: Matrix
    conv2_b: Tensor
    proj: Matrix
    proj_b: Tensor


def pack_front(sub: nn.Module, int8: bool) -> FrontProducts:
    """The front-end weights of ``sub`` (:class:`asr.model.subsampling.ConvSubsampling`)."""
    conv1, conv2 = sub.conv1.conv, sub.conv2.conv
    C = conv1.out_channels
    w2 = conv2.weight.detach().permute(0, 2, 3, 1).reshape(C, -1)  # [out, kt * kf * in]
    wp = sub.proj.weight.detach()
    if int8:
        m2, mp = quantize_columns(w2.t()), quantize_columns(wp.t())
    else:
        m2, mp = FloatMatrix(w2.contiguous().t()), FloatMatrix(wp.contiguous().t())
    return FrontProducts(conv1.weight.detach().reshape(C, -1).t().contiguous(), conv1.bias.detach(), m2,
                         conv2.bias.detach(), mp, sub.proj.bias.detach())
