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
from typing import Optional

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
        B, T, C = u.shape
        H, N = self.n_heads, self.head_size
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
        kk = F.normalize((k * self.k_k).view(B, T, H, N), dim=-1, p=2.0, eps=1e-12)
        k = k * (1 + (a - 1) * self.k_a)

        heads = lambda t: t.view(B, T, H, N)  # noqa: E731
        y, new_state = wkv7(heads(r), heads(w), heads(k), heads(v), -kk, kk * heads(a), wkv_state, impl=impl)
        y = self.ln_x(y.reshape(B * T, C)).view(B, T, C)
        bonus = (heads(r) * heads(k) * self.r_k).sum(dim=-1, keepdim=True) * heads(v)
        out = self.output((y + bonus.reshape(B, T, C)) * g)
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
