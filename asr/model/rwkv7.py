"""RWKV-7 blocks (time-mix + channel-mix) that run both in parallel and one token at a time.

There is one code path for both modes: every mixer takes an optional carried state (the previous
token's input for the token shift, and the wkv state) and returns the new one. The parallel path
is the same call with an all-zero state and a chunked wkv kernel; the recurrent path feeds the
returned state back in. The only difference between the two is the wkv form, and those are tested
against each other, so the streaming model cannot drift from the trained one.

Parameter names follow BlinkDL's RWKV-LM (``att.x_r``, ``att.w1``, ``ffn.key`` ...) so reference
weights and the golden test vectors load without renaming; per-channel vectors are stored as [C].
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from asr.ops.wkv7 import wkv7

NEG_EXP_HALF = -math.exp(-0.5)  # log-decay lower bound: decay = exp(w) lies in (0.545, 1)


@dataclass
class BlockState:
    """What one block carries between tokens: constant in size, whatever the stream length."""

    tmix_prev: Tensor  # [B, C] last LN1 output (time-mix token shift)
    wkv: Tensor  # [B, H, N, N] wkv state, [value, key], float32
    cmix_prev: Tensor  # [B, C] last LN2 output (channel-mix token shift)


def _lora_rank(channels: int, factor: float, power: float = 0.5) -> int:
    """RWKV-LM's rule of thumb for LoRA ranks: a multiple of 32, at least 32."""
    return max(32, int(round(factor * channels**power / 32) * 32))


def default_lora_ranks(channels: int) -> dict[str, int]:
    return {
        "decay": _lora_rank(channels, 1.8),
        "aaa": _lora_rank(channels, 1.8),
        "mv": _lora_rank(channels, 1.3),
        "gate": _lora_rank(channels, 0.6, 0.8),
    }


def token_shift(u: Tensor, prev: Optional[Tensor]) -> tuple[Tensor, Tensor]:
    """Return (u_{t-1} - u_t, new prev). u: [B, T, C]; prev: [B, C] or None (stream start = 0)."""
    if prev is None:
        prev = u.new_zeros(u.shape[0], u.shape[2])
    shifted = torch.cat([prev.to(u.dtype).unsqueeze(1), u[:, :-1]], dim=1)
    return shifted - u, u[:, -1]


class TimeMix(nn.Module):
    def __init__(self, channels: int, head_size: int, layer_id: int, n_layers: int, ranks: dict[str, int]):
        super().__init__()
        if channels % head_size:
            raise ValueError(f"channels {channels} must be a multiple of head_size {head_size}")
        self.layer_id = layer_id
        self.head_size = head_size
        self.n_heads = channels // head_size
        C, H, N = channels, self.n_heads, head_size
        self.x_r, self.x_w, self.x_k, self.x_v, self.x_a, self.x_g = (
            nn.Parameter(torch.zeros(C)) for _ in range(6)
        )
        self.w0 = nn.Parameter(torch.zeros(C))
        self.w1 = nn.Parameter(torch.zeros(C, ranks["decay"]))
        self.w2 = nn.Parameter(torch.zeros(ranks["decay"], C))
        self.a0 = nn.Parameter(torch.zeros(C))
        self.a1 = nn.Parameter(torch.zeros(C, ranks["aaa"]))
        self.a2 = nn.Parameter(torch.zeros(ranks["aaa"], C))
        if layer_id > 0:  # layer 0 makes v_first and never mixes it in
            self.v0 = nn.Parameter(torch.zeros(C))
            self.v1 = nn.Parameter(torch.zeros(C, ranks["mv"]))
            self.v2 = nn.Parameter(torch.zeros(ranks["mv"], C))
        self.g1 = nn.Parameter(torch.zeros(C, ranks["gate"]))
        self.g2 = nn.Parameter(torch.zeros(ranks["gate"], C))
        self.k_k = nn.Parameter(torch.zeros(C))
        self.k_a = nn.Parameter(torch.zeros(C))
        self.r_k = nn.Parameter(torch.zeros(H, N))
        self.receptance = nn.Linear(C, C, bias=False)
        self.key = nn.Linear(C, C, bias=False)
        self.value = nn.Linear(C, C, bias=False)
        self.output = nn.Linear(C, C, bias=False)
        self.ln_x = nn.GroupNorm(H, C, eps=64e-5)
        self.reset_parameters(n_layers)

    @torch.no_grad()
    def reset_parameters(self, n_layers: int) -> None:
        """RWKV-LM's v7 initialisation (DESIGN.md); it matters for stable training."""
        C, N, layer = self.x_r.numel(), self.head_size, self.layer_id
        ratio_0_to_1 = layer / max(n_layers - 1, 1)
        ratio_1_to_almost0 = 1.0 - layer / n_layers
        ddd = torch.arange(C, dtype=torch.float64) / C
        self.x_r.copy_(1.0 - ddd.pow(0.2 * ratio_1_to_almost0))
        self.x_w.copy_(1.0 - ddd.pow(0.9 * ratio_1_to_almost0))
        self.x_k.copy_(1.0 - ddd.pow(0.7 * ratio_1_to_almost0))
        self.x_v.copy_(1.0 - ddd.pow(0.7 * ratio_1_to_almost0))
        self.x_a.copy_(1.0 - ddd.pow(0.9 * ratio_1_to_almost0))
        self.x_g.copy_(1.0 - ddd.pow(0.2 * ratio_1_to_almost0))
        n = torch.arange(C, dtype=torch.float64)
        linear = n / (C - 1) - 0.5
        zigzag = ((n % N) - (N - 1) / 2) / ((N - 1) / 2)
        zigzag = zigzag * zigzag.abs()
        www = -6 + 6 * (n / (C - 1)).pow(1 + 1 * ratio_0_to_1**0.3)
        self.w0.copy_(www + 0.5 + zigzag * 2.5)
        self.a0.copy_(-0.19 + zigzag * 0.3 + linear * 0.4)
        self.k_k.copy_(0.71 - linear * 0.1)
        self.k_a.fill_(1.02)
        self.r_k.fill_(-0.04)
        lora_pairs = [(self.w1, self.w2), (self.a1, self.a2), (self.g1, self.g2)]
        if self.layer_id > 0:
            self.v0.copy_(0.73 - linear * 0.4)
            lora_pairs.append((self.v1, self.v2))
        for first, second in lora_pairs:
            first.zero_()
            nn.init.orthogonal_(second, gain=0.1)
        nn.init.orthogonal_(self.receptance.weight)
        nn.init.orthogonal_(self.key.weight, gain=0.1)
        nn.init.orthogonal_(self.value.weight)
        self.output.weight.zero_()
        self.ln_x.weight.fill_(((layer + 1) / n_layers) ** 0.7)
        self.ln_x.bias.zero_()

    def forward(
        self,
        u: Tensor,
        prev: Optional[Tensor],
        wkv_state: Optional[Tensor],
        v_first: Optional[Tensor],
        impl: str = "auto",
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """u: LN1 output [B, T, C]. Returns (out, new prev, new wkv state, v_first)."""
        # No sizes are read off u into Python ints: under trainer.compile, wkv7 is a graph break, and
        # a static size (C) that the traced piece before it hands to the code after it becomes an
        # int output of a graph. DDP's graph splitting (dynamo's DDPOptimizer) then fails in
        # AOTAutograd ("'int' object has no attribute 'meta'"). Shapes come from the tensors instead.
        H, N = self.n_heads, self.head_size
        heads = lambda t: t.unflatten(-1, (H, N))  # noqa: E731  [B, T, C] -> [B, T, H, N]
        xx, new_prev = token_shift(u, prev)
        xr, xw, xk, xv, xa, xg = (u + xx * mu for mu in (self.x_r, self.x_w, self.x_k, self.x_v, self.x_a, self.x_g))
        r = self.receptance(xr)
        w = NEG_EXP_HALF * torch.sigmoid(self.w0 + torch.tanh(xw @ self.w1) @ self.w2)
        k = self.key(xk)
        v = self.value(xv)
        if self.layer_id == 0:
            v_first = v
        else:
            assert v_first is not None, "layers after the first need layer 0's v"
            v = v + (v_first - v) * torch.sigmoid(self.v0 + (xv @ self.v1) @ self.v2)
        a = torch.sigmoid(self.a0 + (xa @ self.a1) @ self.a2)
        g = torch.sigmoid(xg @ self.g1) @ self.g2
        kk = F.normalize(heads(k * self.k_k), dim=-1, p=2.0, eps=1e-12)
        k = k * (1 + (a - 1) * self.k_a)

        y, new_state = wkv7(heads(r), heads(w), heads(k), heads(v), -kk, kk * heads(a), wkv_state, impl=impl)
        y = self.ln_x(y.flatten(2).flatten(0, 1)).view_as(r)  # GroupNorm over [B * T, C] rows
        bonus = (heads(r) * heads(k) * self.r_k).sum(dim=-1, keepdim=True) * heads(v)
        out = self.output((y + bonus.flatten(2)) * g)
        return out, new_prev, new_state, v_first


class ChannelMix(nn.Module):
    def __init__(self, channels: int, layer_id: int, n_layers: int, hidden_mult: int = 4):
        super().__init__()
        self.layer_id = layer_id
        self.x_k = nn.Parameter(torch.zeros(channels))
        self.key = nn.Linear(channels, hidden_mult * channels, bias=False)
        self.value = nn.Linear(hidden_mult * channels, channels, bias=False)
        self.reset_parameters(n_layers)

    @torch.no_grad()
    def reset_parameters(self, n_layers: int) -> None:
        C = self.x_k.numel()
        ddd = torch.arange(C, dtype=torch.float64) / C
        self.x_k.copy_(1.0 - ddd.pow((1.0 - self.layer_id / n_layers) ** 4))
        bound = 0.5 / math.sqrt(C)
        nn.init.uniform_(self.key.weight, -bound, bound)
        self.value.weight.zero_()

    def forward(self, u: Tensor, prev: Optional[Tensor]) -> tuple[Tensor, Tensor]:
        xx, new_prev = token_shift(u, prev)
        hidden = torch.relu(self.key(u + xx * self.x_k)).square()
        return self.value(hidden), new_prev


class Block(nn.Module):
    """Pre-norm residual block: x += TimeMix(LN1 x); x += ChannelMix(LN2 x). Layer 0 also has LN0."""

    def __init__(
        self,
        channels: int,
        head_size: int,
        layer_id: int,
        n_layers: int,
        ranks: Optional[dict[str, int]] = None,
        ffn_mult: int = 4,
    ):
        super().__init__()
        ranks = ranks or default_lora_ranks(channels)
        self.layer_id = layer_id
        self.channels = channels
        self.head_size = head_size
        if layer_id == 0:
            self.ln0 = nn.LayerNorm(channels)
        self.ln1 = nn.LayerNorm(channels)
        self.ln2 = nn.LayerNorm(channels)
        self.att = TimeMix(channels, head_size, layer_id, n_layers, ranks)
        self.ffn = ChannelMix(channels, layer_id, n_layers, ffn_mult)

    def pack(self, int8: bool = False) -> "PackedBlock":
        """This block's weights rearranged for :func:`packed_step` (copies where needed); with
        ``int8``, its large matrices quantized to int8 (per output channel)."""
        return _pack_block(self, int8)

    def init_state(self, batch: int, device=None, dtype: torch.dtype = torch.float32) -> BlockState:
        H, N = self.channels // self.head_size, self.head_size
        return BlockState(
            tmix_prev=torch.zeros(batch, self.channels, device=device, dtype=dtype),
            wkv=torch.zeros(batch, H, N, N, device=device, dtype=torch.float64 if dtype == torch.float64 else torch.float32),
            cmix_prev=torch.zeros(batch, self.channels, device=device, dtype=dtype),
        )

    def forward(
        self,
        x: Tensor,
        state: Optional[BlockState] = None,
        v_first: Optional[Tensor] = None,
        impl: str = "auto",
    ) -> tuple[Tensor, BlockState, Tensor]:
        """x: [B, T, C]. state None means the start of a stream. Returns (x, new state, v_first)."""
        if self.layer_id == 0:
            x = self.ln0(x)
        att, tmix_prev, wkv_state, v_first = self.att(
            self.ln1(x),
            None if state is None else state.tmix_prev,
            None if state is None else state.wkv,
            v_first,
            impl,
        )
        x = x + att
        ffn, cmix_prev = self.ffn(self.ln2(x), None if state is None else state.cmix_prev)
        x = x + ffn
        return x, BlockState(tmix_prev, wkv_state, cmix_prev), v_first


# ---------------------------------------------------------------------------------------------
# Inference step: the same block, laid out for a few tokens at a time on the CPU.
#
# The general forward above is written for clarity and for training (autograd, long T). At
# streaming time it runs one 40 ms token at a time, where its cost is not arithmetic but ~300
# small PyTorch calls per block (module attribute look-ups, 6 separate token-shift mixes, 14
# separate matrix products, the einsum-based wkv loop) and matrix products whose weights are read
# from DRAM in an unfavourable shape. ``Block.pack`` rearranges the weights once; ``packed_step``
# then runs the block in ~45 calls with the same arithmetic:
#
# - the 6 token-shift mixes are one ``addcmul`` into a [6, M, C] tensor (M = B * T rows);
# - r, k, v are one ``bmm`` over pre-transposed [3, C, C] weights;
# - the four LoRA down-projections (v, w, a, g) are one product with the concatenated [C, D]
#   factors, applied to all four mixes at once; a block-diagonal 0/1 mask keeps each mix's own
#   columns (the rest is waste, but the product is bound by reading the weights, not by the
#   few extra multiply-adds), and the four up-projections are then one product with the stacked
#   [D, C] factors: row s of (mask * h) @ [v2; w2; a2; g2] is exactly h_s @ B_s;
# - the sigmoids of w, a and the v-mix are one call on the stacked rows;
# - at T = 1 the wkv update is inlined (one mat-vec for S kk, two rank-1 ``addcmul_`` updates of
#   the fresh state, one mat-vec for S r); for T > 1 it calls the same ``wkv7`` as ``forward``;
# - residual adds are fused into the output products (``addmm``).
#
# Nothing is approximated: the results equal ``Block.forward`` to float rounding (tests compare
# them on random weights and random chunkings). Pre-computing exp(w) is not possible (w depends on
# the input); precomputed are only weight rearrangements and 1 - k_a.
# ---------------------------------------------------------------------------------------------


@dataclass
class Int8Matrix:
    """A weight W [K, N] (used as ``x @ W``) in int8 with one scale per output channel (column).

    ``W[:, n] ~= q[:, n] * amax_n / 127`` with ``amax_n = max_k |W[k, n]|``; ``scale`` holds
    ``amax_n / 127**2``, the activation's own ``1 / 127`` folded in (see :func:`_mm8`). The int8
    values are kept twice, in the two layouts ``torch._int_mm`` (oneDNN) is fastest with: ``q``
    [K, N] contiguous for several rows, ``q_t`` (a [K, N] view of an [N, K] copy) for one row
    (~2x faster there). A workload reads only one of them, so the cache footprint is one copy.
    """

    q: Tensor  # [K, N] int8, contiguous
    q_t: Tensor  # [K, N] int8, transposed view of an [N, K] contiguous copy
    scale: Tensor  # [N] float32: amax_n / 127**2


def _quantize_columns(w: Tensor, nn_out: Tensor, nt_out: Tensor) -> Int8Matrix:
    """Per-output-channel symmetric int8 of w [K, N], written into the given int8 views."""
    w = w.float()
    amax = w.abs().amax(dim=0).clamp_(min=1e-30)
    q = torch.round(w * (127.0 / amax)).to(torch.int8)
    nn_out.copy_(q)
    nt_out.copy_(q.t())
    return Int8Matrix(q=nn_out, q_t=nt_out.t(), scale=amax / 127.0**2)


def _quant_rows(x: Tensor) -> tuple[Tensor, Tensor]:
    """Dynamic symmetric int8 of the rows of x [..., K]: (q int8, amax [..., 1]), x ~= q amax/127.

    One scale per row (per frame of each stream), never per call: a row's product depends on that
    row alone, so outputs do not depend on how the audio is cut into calls or which streams
    share a batch.

    The row maximum is ``x.abs().amax``, not ``linalg.vector_norm(x, inf)`` (the same value): on
    the 2-core dev box, 2 threads, [6, 100, 320] rows took 20 us against 287 us that way, which at
    100 streams was ~5 ms of a 33 ms step (session 10)."""
    amax = x.abs().amax(dim=-1, keepdim=True).clamp_(min=1e-30)
    return torch.mul(x, 127.0 / amax).round_().to(torch.int8), amax


def _mm8(q: Tensor, amax: Tensor, w: Int8Matrix) -> Tensor:
    """(rows q [M, K] int8 with row maxima amax [M, 1]) @ w, in float32: exact int32 sums
    (|sum| <= 127**2 K < 2**24 for K <= 1024, so also exact as float32), scaled per row and column."""
    return (torch._int_mm(q, w.q_t if q.shape[0] == 1 else w.q) * amax).mul_(w.scale)


def _addmm8(x: Tensor, q: Tensor, amax: Tensor, w: Int8Matrix) -> Tensor:
    """x + :func:`_mm8` (q, amax, w), the residual add fused into the column scaling."""
    return torch.addcmul(x, torch._int_mm(q, w.q_t if q.shape[0] == 1 else w.q) * amax, w.scale)


@dataclass
class PackedBlock:
    """One block's weights rearranged for :func:`packed_step` (built by :meth:`Block.pack`).

    Tensors here are either the module's own parameters (or views of them) or copies derived from
    them; the owner (``CTCModel``) rebuilds the pack when any parameter changes.

    With ``int8`` (``Block.pack(int8=True)``) the large products are :class:`Int8Matrix`: r/k/v
    (``w_rkv`` a tuple of three), the output, the FFN key and value, and the LoRA down and up
    factors; everything else stays float32.
    """

    channels: int
    n_heads: int
    head_size: int
    has_v_mix: bool  # layers > 0 mix in layer 0's v
    ln0: Optional[tuple[Tensor, Tensor, float]]
    ln1: tuple[Tensor, Tensor, float]
    ln2: tuple[Tensor, Tensor, float]
    mu: Tensor  # [6, 1, C]: x_r, x_k, x_v, x_w, x_a, x_g
    w_rkv: Union[Tensor, tuple[Int8Matrix, Int8Matrix, Int8Matrix]]  # [3, C, C]: W_r^T, W_k^T, W_v^T
    lora_first_row: int  # rows of the mixes that feed LoRAs: (v,) w, a, g -> 2 or 3
    w_down: Union[Tensor, Int8Matrix]  # [C, D]: (v1 |) w1 | a1 | g1
    lora_mask: Tensor  # [n, 1, D] block diagonal 0/1
    w_span: tuple[int, int]  # columns of w1 in w_down (tanh goes there)
    g_span: tuple[int, int]  # columns of g1 (sigmoid goes there)
    w_up: Union[Tensor, Int8Matrix]  # [D, C]: (v2;) w2; a2; g2
    bias: Tensor  # [n - 1, 1, C]: (v0,) w0, a0
    k_k: Tensor
    k_a: Tensor
    one_minus_k_a: Tensor
    r_k: Tensor  # [H, N]
    ln_x: tuple[Tensor, Tensor, float]
    w_o: Union[Tensor, Int8Matrix]  # [C, C] W_o^T (transposed view of a copy)
    cmix_mu: Tensor  # [C]
    w_ffn_key: Union[Tensor, Int8Matrix]  # [C, 4C] W_k^T
    w_ffn_value: Union[Tensor, Int8Matrix]  # [4C, C] W_v^T (transposed view of a copy: W_v has rows of 4C)
    int8: bool = False


def _ln(norm: nn.LayerNorm) -> tuple[Tensor, Tensor, float]:
    return norm.weight, norm.bias, norm.eps


def _pack_block(block: "Block", int8: bool = False) -> PackedBlock:
    att, ffn = block.att, block.ffn
    C = block.channels
    has_v = block.layer_id > 0
    downs = ([att.v1] if has_v else []) + [att.w1, att.a1, att.g1]
    ups = ([att.v2] if has_v else []) + [att.w2, att.a2, att.g2]
    ranks = [d.shape[1] for d in downs]
    edges = [0]
    for r in ranks:
        edges.append(edges[-1] + r)
    mask = att.w1.new_zeros(len(ranks), 1, edges[-1])
    for i in range(len(ranks)):
        mask[i, :, edges[i] : edges[i + 1]] = 1
    iw = 1 if has_v else 0
    # All matrices of the block, copied into one buffer in the order the step reads them: one
    # block's weights then stream from memory as a single run (measured ~15 % faster than the
    # same products on separately allocated matrices, which is what bounds a one-token step).
    mats = [
        torch.stack([att.receptance.weight.t(), att.key.weight.t(), att.value.weight.t()]),  # [3, C, C]
        torch.cat(downs, dim=1),  # [C, D]
        torch.cat(ups, dim=0),  # [D, C]
        att.output.weight,  # [C, C], used transposed
        ffn.key.weight.t(),  # [C, 4C]: rows of 4C stream faster than rows of C
        ffn.value.weight,  # [C, 4C], used transposed (rows of 4C again)
    ]
    if int8:
        # the same order, as int8 with per-output-channel scales, in two buffers (see Int8Matrix);
        # every matrix as [K, N] for x @ W
        mats = [*mats[0], mats[1], mats[2], mats[3].t(), mats[4], mats[5].t()]
        total = sum(m.numel() for m in mats)
        arenas = [torch.empty(total, dtype=torch.int8, device=att.w1.device) for _ in range(2)]
        q, pos = [], 0
        for m in mats:
            K, N = m.shape
            q.append(_quantize_columns(m, arenas[0][pos : pos + m.numel()].view(K, N),
                                       arenas[1][pos : pos + m.numel()].view(N, K)))
            pos += m.numel()
        w_rkv, (w_down, w_up, w_o, w_key, w_value) = tuple(q[:3]), q[3:]
    else:
        arena = att.w1.new_empty(sum(m.numel() for m in mats))
        views, pos = [], 0
        for m in mats:
            views.append(arena[pos : pos + m.numel()].view(m.shape).copy_(m))
            pos += m.numel()
        w_rkv, w_down, w_up, w_o, w_key, w_value = views
        w_o, w_value = w_o.t(), w_value.t()
    return PackedBlock(
        channels=C,
        n_heads=att.n_heads,
        head_size=att.head_size,
        has_v_mix=has_v,
        ln0=_ln(block.ln0) if block.layer_id == 0 else None,
        ln1=_ln(block.ln1),
        ln2=_ln(block.ln2),
        mu=torch.stack([att.x_r, att.x_k, att.x_v, att.x_w, att.x_a, att.x_g]).view(6, 1, C),
        w_rkv=w_rkv,
        lora_first_row=2 if has_v else 3,
        w_down=w_down,
        lora_mask=mask,
        w_span=(edges[iw], edges[iw + 1]),
        g_span=(edges[-2], edges[-1]),
        w_up=w_up,
        bias=torch.stack(([att.v0] if has_v else []) + [att.w0, att.a0]).unsqueeze(1),
        k_k=att.k_k,
        k_a=att.k_a,
        one_minus_k_a=1 - att.k_a,
        r_k=att.r_k,
        ln_x=(att.ln_x.weight, att.ln_x.bias, att.ln_x.eps),
        w_o=w_o,
        cmix_mu=ffn.x_k,
        w_ffn_key=w_key,
        w_ffn_value=w_value,
        int8=int8,
    )


def _shift(u: Tensor, prev: Tensor, B: int, T: int) -> tuple[Tensor, Tensor]:
    """Token shift on [M, C] rows (M = B * T): (u_{t-1} - u_t, last u of each stream)."""
    if T == 1:
        return prev - u, u
    u3 = u.view(B, T, -1)
    xx = torch.cat([prev.unsqueeze(1), u3[:, :-1]], dim=1) - u3
    return xx.view(B * T, -1), u3[:, -1]


def _wkv_token(
    S: Tensor, r: Tensor, w_sig: Tensor, k: Tensor, v: Tensor, kk: Tensor, b: Tensor, B: int, H: int, N: int
) -> tuple[Tensor, Tensor]:
    """wkv7_recurrent for one token of B streams (rows [B, C]; S [B, H, N, N], not modified):
    S' = S diag(exp(w)) - (S kk)(kk a)^T + v k^T; y = S' r. Returns (y [B, C], S').

    The mat-vecs are written as multiply + sum: for 64 x 64 heads that is ~2x faster than batched
    matmul calls on the CPU (whose per-call cost dominates at this size)."""
    decay = torch.exp(w_sig * NEG_EXP_HALF).reshape(B, H, 1, N)
    s_kk = (S * kk.reshape(B, H, 1, N)).sum(dim=-1, keepdim=True)
    S = S * decay
    S.addcmul_(s_kk, b.reshape(B, H, 1, N), value=-1.0)
    S.addcmul_(v.reshape(B, H, N, 1), k.reshape(B, H, 1, N))
    y = (S * r.reshape(B, H, 1, N)).sum(dim=-1).view(B, H * N)
    return y, S


#: From this many streams in one packed step, with the compiled step on
#: (``prepare_for_inference(compile=True)``), the token loop runs the wkv update compiled
#: (:func:`asr.model.token_step.wkv_token_compiled`). Measured on the 2-core dev box, 2 threads,
#: the whole ``model.step`` of the bundled model for one frame, interleaved with the uncompiled
#: update (BENCHMARKS.md session 8): 1.03x at 2 streams, 1.09x at 16 and 32, 1.13x at 64, 1.23x at
#: 100 (52.5 -> 42.7 ms), 1.36x at 128.
COMPILED_WKV_MIN_STREAMS = 2


#: Up to this many tokens per call the packed step loops over _wkv_token; beyond, the chunked form
#: wins. Measured on the 2-core x86 dev box, one thread, 4 heads of 64: at 4 tokens the loop takes
#: 0.16 / 2.5 / 4.6 / 11 ms for 1 / 16 / 32 / 64 streams against 0.23 / 5.2 / 13 / 28 ms for the
#: reference loop (wkv7_recurrent) and 0.24 / 2.8 / 6.3 / 11 ms for the chunked form; at 16 tokens
#: the chunked form is 1.5x to 2x faster than the loop from 4 streams up.
_TOKEN_LOOP_MAX_T = 4


def packed_step(
    p: PackedBlock, x: Tensor, state: BlockState, v_first: Optional[Tensor], B: int, T: int,
    compiled_wkv: bool = False,
) -> tuple[Tensor, BlockState, Tensor]:
    """``Block.forward`` for inference on rows x [B * T, C] with a carried state; same results.

    Returns (x [B * T, C], new state, v_first [B * T, C]). The input state is not modified.
    ``compiled_wkv``: from ``COMPILED_WKV_MIN_STREAMS`` streams on, the wkv update compiled.
    """
    C, H, N = p.channels, p.n_heads, p.head_size
    M = B * T
    if p.ln0 is not None:
        x = F.layer_norm(x, (C,), *p.ln0[:2], p.ln0[2])
    # ---- time mix
    u = F.layer_norm(x, (C,), *p.ln1[:2], p.ln1[2])
    xx, tmix_prev = _shift(u, state.tmix_prev, B, T)
    mixes = torch.addcmul(u, xx, p.mu)  # [6, M, C]: x_r, x_k, x_v, x_w, x_a, x_g
    lo = p.lora_first_row
    n = 6 - lo
    if p.int8:  # all six mixes quantized at once, one scale per row
        qm, am = _quant_rows(mixes)
        r, k, v = (_mm8(qm[i], am[i], p.w_rkv[i]) for i in range(3))
        h = _mm8(qm[lo:].view(n * M, C), am[lo:].view(n * M, 1), p.w_down)
    else:
        rkv = torch.bmm(mixes[:3], p.w_rkv)
        r, k, v = rkv[0], rkv[1], rkv[2]
        h = torch.mm(mixes[lo:].view(n * M, C), p.w_down)
    h = h.view(n, M, -1).mul_(p.lora_mask)
    h[n - 3, :, p.w_span[0] : p.w_span[1]].tanh_()
    h[n - 1, :, p.g_span[0] : p.g_span[1]].sigmoid_()
    if p.int8:
        up = _mm8(*_quant_rows(h.view(n * M, -1)), p.w_up).view(n, M, C)
    else:
        up = torch.mm(h.view(n * M, -1), p.w_up).view(n, M, C)  # rows: (v,) w, a, g
    gates = torch.sigmoid(up[:-1] + p.bias)  # rows: (v-mix,) w, a
    g = up[-1]
    if p.has_v_mix:
        v = torch.lerp(v, v_first, gates[0])
    else:
        v_first = v
    w_sig, a = gates[n - 3], gates[n - 2]
    kk = F.normalize((k * p.k_k).view(M, H, N), dim=-1, p=2.0, eps=1e-12)
    k = k * torch.addcmul(p.one_minus_k_a, a, p.k_a)
    b = kk * a.view(M, H, N)
    S = state.wkv
    if T <= _TOKEN_LOOP_MAX_T and S.dtype == x.dtype:
        token = _wkv_token
        if compiled_wkv and B >= COMPILED_WKV_MIN_STREAMS and S.dtype == torch.float32:
            from asr.model.token_step import wkv_token_compiled as token
        if T == 1:
            y, S = token(S, r, w_sig, k, v, kk, b, B, H, N)
        else:
            ys = []
            for rows in zip(*(z.view(B, T, C).unbind(1) for z in (r, w_sig, k, v, kk, b))):
                y_t, S = token(S, *rows, B, H, N)
                ys.append(y_t)
            y = torch.stack(ys, dim=1).view(M, C)
    else:
        heads = lambda t: t.reshape(B, T, H, N)  # noqa: E731
        y, S = wkv7(heads(r), heads(w_sig * NEG_EXP_HALF), heads(k), heads(v), heads(-kk), heads(b), S)
        y = y.reshape(M, C)
    y = F.group_norm(y, H, *p.ln_x[:2], p.ln_x[2])
    bonus = ((r * k).view(M, H, N) * p.r_k).sum(dim=-1, keepdim=True) * v.reshape(M, H, N)
    if p.int8:
        x = _addmm8(x, *_quant_rows((y + bonus.view(M, C)) * g), p.w_o)
    else:
        x = torch.addmm(x, (y + bonus.view(M, C)) * g, p.w_o)
    # ---- channel mix
    u = F.layer_norm(x, (C,), *p.ln2[:2], p.ln2[2])
    xx, cmix_prev = _shift(u, state.cmix_prev, B, T)
    if p.int8:
        hidden = _mm8(*_quant_rows(torch.addcmul(u, xx, p.cmix_mu)), p.w_ffn_key).relu_().square_()
        x = _addmm8(x, *_quant_rows(hidden), p.w_ffn_value)
    else:
        hidden = torch.mm(torch.addcmul(u, xx, p.cmix_mu), p.w_ffn_key).relu_().square_()
        x = torch.addmm(x, hidden, p.w_ffn_value)
    return x, BlockState(tmix_prev, S, cmix_prev), v_first
