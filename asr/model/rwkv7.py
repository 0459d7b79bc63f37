"""RWKV-7 blocks (time-mix + channel-mix): the block's arithmetic, written once.

:func:`block_step` is the whole block: token shift, LoRAs, gates, kk normalisation, the wkv
recurrence, GroupNorm, bonus and the channel mix. It reads the element-wise parameters from a
:class:`BlockParams` and leaves every matrix product, and the wkv kernel, to a
:class:`BlockProducts`. ``Block.forward`` (training, the reference) runs it with the module's own
layers (:class:`ModuleProducts`); the inference engine (:mod:`asr.infer`) runs the same function
with packed float32, int8 or traced products. Parallel and streaming are one call: a carried state
(the previous token's inputs for the token shifts, and the wkv state) goes in, the new one comes
out; the parallel path is the same call from an all-zero state.

Parameter names follow BlinkDL's RWKV-LM (``att.x_r``, ``att.w1``, ``ffn.key`` ...) so reference
weights and the golden test vectors load without renaming; per-channel vectors are stored as [C].
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from asr.ops.wkv7 import wkv7

NEG_EXP_HALF = -math.exp(-0.5)  # log-decay lower bound: decay = exp(w) lies in (0.545, 1)

#: The hidden activation of each LoRA, in the order (v-mix,) w, a, g: ``tanh`` for the decay,
#: ``sigmoid`` for the gate, none for the others. Products apply them between their two factors.
LORA_ACTIVATIONS = ("", "tanh", "", "sigmoid")

Norm = tuple[Tensor, Tensor, float]  # (weight, bias, eps)


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
        prev = torch.zeros_like(u[:, 0])
    prev = (prev if prev.dtype == u.dtype else prev.to(u.dtype)).unsqueeze(1)
    if u.shape[1] == 1:
        return prev - u, u[:, -1]
    return torch.cat([prev, u[:, :-1]], dim=1) - u, u[:, -1]


@dataclass
class BlockParams:
    """The element-wise parameters of one block, as :func:`block_step` reads them."""

    n_heads: int
    head_size: int
    ln0: Optional[Norm]  # layer 0 only
    ln1: Norm
    ln2: Norm
    mu: Tensor  # [6, 1, 1, C]: x_r, x_k, x_v, x_w, x_a, x_g
    bias: Tensor  # [n - 1, 1, 1, C]: (v0,) w0, a0, n = number of LoRAs
    k_k: Tensor
    k_a: Tensor
    one_minus_k_a: Tensor
    r_k: Tensor  # [H, N]
    ln_x: Norm
    cmix_mu: Tensor  # [C]

    @property
    def has_v_mix(self) -> bool:
        """Layers after the first mix in layer 0's v (and have its LoRA)."""
        return self.bias.shape[0] == 3


class BlockProducts(Protocol):
    """The matrix products of one block and its wkv kernel: what a backend supplies.

    Inputs and outputs are [..., C] (the engine passes [B, T, C]); every product returns new tensors.
    """

    def time_inputs(self, mixes: Tensor, acts: tuple[str, ...]) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """mixes [6, B, T, C] (r, k, v, w, a, g inputs) -> (r, k, v, up [n, B, T, C]), with
        ``up[i] = act_i(mixes[6 - n + i] A_i) B_i`` for the n LoRAs ((v,) w, a, g; ``acts`` their
        :data:`LORA_ACTIVATIONS`)."""

    def output(self, x: Tensor, o: Tensor) -> Tensor:
        """x + o W_o^T (the residual add may be fused)."""

    def ffn_key(self, x: Tensor) -> Tensor:
        """x W_k^T: [..., C] -> [..., 4C]."""

    def ffn_value(self, x: Tensor, hidden: Tensor) -> Tensor:
        """x + hidden W_v^T."""

    def wkv(self, r: Tensor, w: Tensor, k: Tensor, v: Tensor, a: Tensor, b: Tensor,
            state: Optional[Tensor]) -> tuple[Tensor, Tensor]:
        """The recurrence (:func:`asr.ops.wkv7.wkv7`'s arguments and results)."""


def block_step(
    p: BlockParams, mm: BlockProducts, x: Tensor, state: Optional[BlockState], v_first: Optional[Tensor]
) -> tuple[Tensor, BlockState, Tensor]:
    """One RWKV-7 block (DESIGN.md) on x [B, T, C] from ``state`` (None: a stream's start).
    Returns (x, new state, v_first). The input state is not modified.

    No sizes are read off x into Python ints (they come from the parameters): under the trainer's
    torch.compile a size handed from one traced piece to the next became an int graph output that
    DDP's graph splitting fails on."""
    H, N = p.n_heads, p.head_size
    heads = lambda t: t.unflatten(-1, (H, N))  # noqa: E731  [B, T, C] -> [B, T, H, N]
    if p.ln0 is not None:
        x = F.layer_norm(x, p.ln0[0].shape, *p.ln0)
    # ---- time mix
    u = F.layer_norm(x, p.ln1[0].shape, *p.ln1)
    xx, tmix_prev = token_shift(u, None if state is None else state.tmix_prev)
    mixes = torch.addcmul(u, xx, p.mu)
    n = p.bias.shape[0] + 1
    r, k, v, up = mm.time_inputs(mixes, LORA_ACTIVATIONS[4 - n:])
    gates = torch.sigmoid(up[:-1] + p.bias)  # (v-mix,) w, a
    g = up[-1]
    if p.has_v_mix:
        assert v_first is not None, "layers after the first need layer 0's v"
        v = v + (v_first - v) * gates[0]  # not torch.lerp: under autocast v is bf16, the gate fp32
    else:
        v_first = v
    w, a = gates[-2] * NEG_EXP_HALF, gates[-1]
    kk = F.normalize(heads(k * p.k_k), dim=-1, p=2.0, eps=1e-12)
    k = k * torch.addcmul(p.one_minus_k_a, a, p.k_a)  # k (1 + (a - 1) k_a)
    r, k, v = heads(r), heads(k), heads(v)
    y, wkv_state = mm.wkv(r, heads(w), k, v, -kk, kk * heads(a), None if state is None else state.wkv)
    y = F.group_norm(y.flatten(0, -3).flatten(1), H, *p.ln_x).view_as(g)  # per token and head
    bonus = (r * k * p.r_k).sum(dim=-1, keepdim=True) * v
    x = mm.output(x, (y + bonus.flatten(-2)) * g)
    # ---- channel mix
    u2 = F.layer_norm(x, p.ln2[0].shape, *p.ln2)
    xx, cmix_prev = token_shift(u2, None if state is None else state.cmix_prev)
    hidden = torch.relu(mm.ffn_key(torch.addcmul(u2, xx, p.cmix_mu))).square()
    x = mm.ffn_value(x, hidden)
    return x, BlockState(tmix_prev, wkv_state, cmix_prev), v_first


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

    def lora_pairs(self) -> list[tuple[Tensor, Tensor]]:
        """The LoRA factors (A [C, D], B [D, C]) in :data:`LORA_ACTIVATIONS` order: (v,) w, a, g."""
        att = self.att
        return ([(att.v1, att.v2)] if self.layer_id > 0 else []) + [(att.w1, att.w2), (att.a1, att.a2), (att.g1, att.g2)]

    def params(self) -> BlockParams:
        """The element-wise parameters as :func:`block_step` reads them (stacked from the module's
        own parameters, so gradients flow back to them)."""
        att, norm = self.att, lambda m: (m.weight, m.bias, m.eps)
        C = self.channels
        return BlockParams(
            n_heads=att.n_heads, head_size=att.head_size, ln0=norm(self.ln0) if self.layer_id == 0 else None,
            ln1=norm(self.ln1), ln2=norm(self.ln2),
            mu=torch.stack([att.x_r, att.x_k, att.x_v, att.x_w, att.x_a, att.x_g]).view(6, 1, 1, C),
            bias=torch.stack(([att.v0] if self.layer_id > 0 else []) + [att.w0, att.a0]).unsqueeze(1).unsqueeze(1),
            k_k=att.k_k, k_a=att.k_a, one_minus_k_a=1 - att.k_a, r_k=att.r_k, ln_x=norm(att.ln_x), cmix_mu=self.ffn.x_k,
        )

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
        """x: [B, T, C]. state None means the start of a stream. Returns (x, new state, v_first).
        ``impl``: the wkv form (:func:`asr.ops.wkv7.wkv7`)."""
        return block_step(self.params(), ModuleProducts(self, impl), x, state, v_first)


class ModuleProducts:
    """:class:`BlockProducts` from a block's own layers (any dtype or device, autograd, or
    ``nn.Linear`` replacements such as torch.ao's quantized ones): the reference."""

    def __init__(self, block: Block, impl: str = "auto"):
        self.block, self.impl = block, impl

    def time_inputs(self, mixes: Tensor, acts: tuple[str, ...]) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        att = self.block.att
        ups = []
        for x, (first, second), act in zip(mixes[6 - len(acts):], self.block.lora_pairs(), acts):
            h = x @ first
            ups.append((getattr(torch, act)(h) if act else h) @ second)
        return att.receptance(mixes[0]), att.key(mixes[1]), att.value(mixes[2]), torch.stack(ups)

    def output(self, x: Tensor, o: Tensor) -> Tensor:
        return x + self.block.att.output(o)

    def ffn_key(self, x: Tensor) -> Tensor:
        return self.block.ffn.key(x)

    def ffn_value(self, x: Tensor, hidden: Tensor) -> Tensor:
        return x + self.block.ffn.value(hidden)

    def wkv(self, r: Tensor, w: Tensor, k: Tensor, v: Tensor, a: Tensor, b: Tensor,
            state: Optional[Tensor]) -> tuple[Tensor, Tensor]:
        return wkv7(r, w, k, v, a, b, state, impl=self.impl)
