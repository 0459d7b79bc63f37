"""One step of the engine, written once: the plan (the weights as a backend packed them) and
:func:`encode`, which every backend runs, eagerly or traced (:mod:`asr.infer.compiled`)."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from asr.infer.frontend import front
from asr.infer.products import FrontProducts, PackedProducts, pack_front
from asr.model import CTCModel
from asr.model.rwkv7 import BlockParams, BlockProducts, BlockState, Norm, block_step


@dataclass
class Plan:
    """Everything a step reads, as a backend packed it."""

    mean: Tensor  # CMVN [n_mels]
    istd: Tensor
    front: FrontProducts
    params: list[BlockParams]
    products: list[BlockProducts]
    ln_out: Norm
    head_w: Tensor  # [C, V], used as x @ W
    head_b: Tensor


def build_plan(model: CTCModel, int8: bool, products: type = PackedProducts) -> Plan:
    """``model``'s weights packed for ``products`` (float32 or int8)."""
    with torch.no_grad():
        ln = model.ln_out
        params = [_detached(b.params()) for b in model.blocks]
        return Plan(model.cmvn.mean.detach(), model.cmvn.istd.detach(), pack_front(model.subsampling, int8), params,
                    [products(b, int8) for b in model.blocks], (ln.weight.detach(), ln.bias.detach(), ln.eps),
                    model.head.weight.detach().t(), model.head.bias.detach())


def _detached(p: BlockParams) -> BlockParams:
    fields = {k: (v.detach() if isinstance(v, Tensor) else v) for k, v in vars(p).items()}
    for k in ("ln0", "ln1", "ln2", "ln_x"):
        if fields[k] is not None:
            fields[k] = (fields[k][0].detach(), fields[k][1].detach(), fields[k][2])
    return BlockParams(**fields)


def encode(plan: Plan, features: Tensor, cache1: Tensor, cache2: Tensor,
           states: list[BlockState]) -> tuple[Tensor, Tensor, Tensor, list[BlockState]]:
    """The step every backend runs: raw features [B, t, n_mels] and the caches in
    :func:`asr.infer.frontend.front`'s layout -> (logits [B, T, V], new caches, new block states)."""
    x, cache1, cache2 = front(plan.front, (features - plan.mean) * plan.istd, cache1, cache2)
    B, T, C = x.shape
    if T == 0:
        return x.new_zeros(B, 0, plan.head_b.shape[0]), cache1, cache2, states
    v_first, new = None, []
    for p, mm, state in zip(plan.params, plan.products, states):
        x, state, v_first = block_step(p, mm, x, state, v_first)
        new.append(state)
    x = F.layer_norm(x, (C,), *plan.ln_out)
    return torch.addmm(plan.head_b, x.reshape(B * T, C), plan.head_w).view(B, T, -1), cache1, cache2, new


