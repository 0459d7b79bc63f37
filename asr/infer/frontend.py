"""The engine's front end: CMVN and the causal x4 subsampling, each convolution one matrix product
over unfolded input windows (im2col), channels-last in between.

The same values as :class:`asr.model.subsampling.ConvSubsampling` (``forward`` and ``stream``),
for any split of the input; for the few frames of a streaming call ``nn.Conv2d`` costs more in
choosing its algorithm than in arithmetic, and this form is ~2x faster on one CPU thread. The
products come from :class:`asr.infer.products.FrontProducts` (float32 or int8: one scale per
output position of conv2 and per frame of the projection, so streaming and one pass agree).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from asr.infer.products import FrontProducts

KERNEL, STRIDE = 3, 2  # both convolutions' (ConvSubsampling's)
#: conv2 output positions (in time) per product: bounds the unfolded windows of a long file
TIME_CHUNK = 256


def _windows(x: Tensor, n: int) -> Tensor:
    """x [B, T, F, ...] -> the n time windows of every stride-2, kernel-3 position: [B, n, F', ..., kt, kf].

    Eagerly two ``unfold`` views; traced to ONNX, where an ``unfold`` becomes a slice per window
    position, each axis' three strided slices stacked (the same values, a few operations)."""
    if not torch.onnx.is_in_onnx_export():
        return x[:, : (n - 1) * STRIDE + KERNEL].unfold(1, KERNEL, STRIDE).unfold(2, KERNEL, STRIDE)
    F_out = (x.shape[2] - KERNEL) // STRIDE + 1
    x = _strided_windows(x, 1, n)  # [B, n, F, ..., kt]
    return _strided_windows(x, 2, F_out)


def _strided_windows(x: Tensor, dim: int, n: int) -> Tensor:
    """The n stride-2, kernel-3 windows along ``dim`` of x, the kernel axis appended last."""
    span = STRIDE * (n - 1) + 1
    return torch.stack([x.narrow(dim, k, span)[(slice(None),) * dim + (slice(None, None, STRIDE),)]
                        for k in range(KERNEL)], dim=-1)


def front(fp: FrontProducts, x: Tensor, cache1: Tensor, cache2: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Normalised features x [B, t, n_mels] after the caches (conv1's inputs [B, c1, n_mels],
    conv2's channels-last [B, c2, F1, C]; zeros at a stream's start: the causal left padding)
    -> (encoder inputs [B, T, d_model], the new caches)."""
    x = torch.cat([cache1, x], dim=1)
    B, C = x.shape[0], fp.conv1_b.shape[0]
    n1 = max(0, (x.shape[1] - KERNEL) // STRIDE + 1)
    F1 = (x.shape[2] - KERNEL) // STRIDE + 1
    if n1:
        rows = _windows(x, n1).reshape(B * n1 * F1, KERNEL * KERNEL)
        y1 = torch.addmm(fp.conv1_b, rows, fp.conv1_w).relu_().view(B, n1, F1, C)
    else:
        y1 = x.new_zeros(B, 0, F1, C)
    x2 = torch.cat([cache2, y1], dim=1)  # [B, T1, F1, C]
    n2 = max(0, (x2.shape[1] - KERNEL) // STRIDE + 1)
    F2 = (F1 - KERNEL) // STRIDE + 1
    parts = []
    for t0 in range(0, n2, TIME_CHUNK):
        t1 = min(n2, t0 + TIME_CHUNK)
        windows = _windows(x2[:, t0 * STRIDE :], t1 - t0)  # [B, t, F2, C, kt, kf]
        rows = windows.permute(0, 1, 2, 4, 5, 3).reshape(B * (t1 - t0) * F2, KERNEL * KERNEL * C)
        y2 = fp.conv2.addmm(fp.conv2_b, fp.conv2.prepare(rows)).relu_()
        flat = y2.view(B * (t1 - t0), F2, C).transpose(1, 2).reshape(B * (t1 - t0), C * F2)  # (C, F) as proj
        parts.append(fp.proj.addmm(fp.proj_b, fp.proj.prepare(flat)).view(B, t1 - t0, -1))
    if not parts:
        out = x.new_zeros(B, 0, fp.proj_b.shape[0])
    else:
        out = parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)
    return out, x[:, n1 * STRIDE :], x2[:, n2 * STRIDE :]


def initial_caches(fp: FrontProducts, batch: int, n_mels: int, like: Tensor) -> tuple[Tensor, Tensor]:
    """The caches of a new stream in the layouts :func:`front` takes: zeros."""
    C, F1 = fp.conv1_b.shape[0], (n_mels - KERNEL) // STRIDE + 1
    return like.new_zeros(batch, KERNEL - 1, n_mels), like.new_zeros(batch, KERNEL - 1, F1, C)


def to_front_layout(caches: tuple[Optional[Tensor], Optional[Tensor]], fp: FrontProducts, batch: int,
                    n_mels: int, like: Tensor) -> tuple[Tensor, Tensor]:
    """:class:`asr.model.EncoderState` caches ([B, 1, t, n_mels], [B, C, t, F1], or None) as
    :func:`front` takes them (views: the engine keeps them as permuted views of its own layout)."""
    c1, c2 = caches
    if c1 is None or c2 is None:
        z1, z2 = initial_caches(fp, batch, n_mels, like)
    return (z1 if c1 is None else c1[:, 0]), (z2 if c2 is None else c2.permute(0, 2, 3, 1))


def to_state_layout(c1: Tensor, c2: Tensor) -> tuple[Tensor, Tensor]:
    """:func:`front`'s caches in the layout of :meth:`ConvSubsampling.stream` (views)."""
    return c1.unsqueeze(1), c2.permute(0, 3, 1, 2)
