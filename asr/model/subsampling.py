"""Causal x4 convolutional subsampling (10 ms feature frames -> 40 ms encoder frames).

Two Conv2d layers with kernel 3 and stride 2 over (time, frequency). Time is padded on the left only,
so output j depends on inputs up to 2j and nothing later: the whole front end is causal, padding at
the end of a batch never changes earlier outputs, and the streaming form needs only a tiny cache of
the last input frames of each layer.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor, nn

from asr.model.rwkv7 import Int8Matrix, _mm8, _quant_rows, _quantize_columns


@dataclass(frozen=True)
class Int8Frontend:
    """The second convolution and the projection of :class:`ConvSubsampling` with int8 weights,
    for int8 inference (``CTCModel.prepare_for_inference(int8=True)``; built by
    :meth:`ConvSubsampling.pack_int8`).

    As in the blocks (:func:`asr.model.rwkv7._mm8`): one scale per output channel of the weights,
    one dynamic scale per row of inputs (per output position of conv2: its 3 x 3 x C window; per
    encoder frame of the projection), exact int32 sums in ``torch._int_mm``. A row's result
    depends on that row alone, so streaming and one pass give the same int8 values. The first
    convolution (one input channel, 9 taps) stays float32.

    Why: these two are 0.9 M of the bundled model's 11.7 M weights but a third of its streaming
    arithmetic (conv2 runs at 19 frequency positions per frame), and in float32 the projection
    alone reads 3.1 MB per frame. One stream, frame by frame, the float32 front end took ~0.45 ms
    of a ~2 ms int8 step (session 9)."""

    conv2: Int8Matrix  # [kt * kf * in, out]: windows with channels innermost
    conv2_bias: Tensor
    proj: Int8Matrix  # [C * F, d_model]
    proj_bias: Tensor


class CausalConv2d(nn.Module):
    """Conv2d over [B, C, T, F], left-padded in time; ``stream`` runs it incrementally from a cache."""

    def __init__(self, in_channels: int, out_channels: int, kernel: int = 3, stride: int = 2):
        super().__init__()
        self.kernel = kernel
        self.stride = stride
        self.conv = nn.Conv2d(in_channels, out_channels, kernel, stride=stride)

    def output_length(self, length: Tensor) -> Tensor:
        return torch.div(length + self.stride - 1, self.stride, rounding_mode="floor")

    def forward(self, x: Tensor, channels_last: bool = False) -> Tensor:
        x = nn.functional.pad(x, (0, 0, self.kernel - 1, 0))
        if not channels_last:
            return self.conv(x)
        # A channels-last weight makes the output channels-last (NHWC) even where the input is
        # ambiguous (one channel); ``.to`` restrides it where ``.contiguous`` would not.
        weight = self.conv.weight.to(memory_format=torch.channels_last)
        return nn.functional.conv2d(x, weight, self.conv.bias, stride=self.stride)

    def init_cache(self, x_like: Tensor) -> Tensor:
        """The left padding: the cache holds the inputs the next output window still needs."""
        B, C, _, F = x_like.shape
        return x_like.new_zeros(B, C, self.kernel - 1, F)

    def stream(self, x: Tensor, cache: Optional[Tensor]) -> tuple[Tensor, Tensor]:
        """Feed new frames [B, C, t, F]; return the outputs that became complete and the new cache."""
        if cache is None:
            cache = self.init_cache(x)
        x = torch.cat([cache, x], dim=2)
        n_out = max(0, (x.shape[2] - self.kernel) // self.stride + 1)
        if n_out == 0:
            return x.new_zeros(x.shape[0], self.conv.out_channels, 0, self._out_freq(x.shape[3])), x
        y = self.conv(x[:, :, : (n_out - 1) * self.stride + self.kernel])
        return y, x[:, :, n_out * self.stride :]

    def _out_freq(self, freq: int) -> int:
        return (freq - self.kernel) // self.stride + 1


class ConvSubsampling(nn.Module):
    """[B, T, n_mels] -> [B, ceil(ceil(T/2)/2), d_model]."""

    def __init__(self, n_mels: int, channels: int, d_model: int):
        super().__init__()
        self.conv1 = CausalConv2d(1, channels)
        self.conv2 = CausalConv2d(channels, channels)
        freq = self.conv2._out_freq(self.conv1._out_freq(n_mels))
        self.proj = nn.Linear(channels * freq, d_model)

    def output_length(self, length: Tensor) -> Tensor:
        return self.conv2.output_length(self.conv1.output_length(length))

    def _project(self, x: Tensor) -> Tensor:
        B, C, T, F = x.shape
        return self.proj(x.transpose(1, 2).reshape(B, T, C * F))

    #: Run the convolutions channels-last (NHWC) on CUDA (the CPU keeps NCHW). Why: cuDNN's bf16
    #: kernels work in NHWC; in NCHW it transposes the feature maps around them. On an H100
    #: (tools/bench_frontend.py, BENCHMARKS.md session 8) channels-last took the front end's training
    #: peak from 2.79 to 2.18 GiB at 21 x 30 s (256 channels; 1.48 -> 1.23 GiB at 64 x 10 s, 128),
    #: at the same speed (0.98-1.03x). A class attribute, so a benchmark can switch it off.
    channels_last: bool = True

    def forward(self, features: Tensor, int8: Optional[Int8Frontend] = None) -> Tensor:
        """``int8``: conv2 and the projection with int8 weights (:class:`Int8Frontend`)."""
        channels_last = self.channels_last and features.is_cuda
        x = torch.relu(self.conv1(features.unsqueeze(1), channels_last))
        if int8 is not None:
            x = nn.functional.pad(x, (0, 0, self.conv2.kernel - 1, 0)).permute(0, 2, 3, 1)  # [B, T1, F1, C]
            return self._project_int8(self._conv2_int8(x, int8), int8)
        x = torch.relu(self.conv2(x, channels_last))
        return self._project(x)

    def stream(
        self, features: Tensor, caches: tuple[Optional[Tensor], Optional[Tensor]], int8: Optional[Int8Frontend] = None
    ) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        """Incremental form of ``forward``: concatenated outputs over any split equal one pass
        (``int8``: as ``forward`` with it)."""
        if features.shape[0] * features.shape[1] <= self.SMALL_STREAM_FRAMES and not torch.is_grad_enabled():
            return self._stream_small(features, caches, int8)
        x, cache1 = self.conv1.stream(features.unsqueeze(1), caches[0])
        x = torch.relu(x)
        if caches[1] is None:
            caches = (caches[0], self.conv2.init_cache(x))
        if int8 is not None:
            x = torch.cat([caches[1], x], dim=2)  # [B, C, t, F1], as CausalConv2d.stream
            n2 = max(0, (x.shape[2] - self.conv2.kernel) // self.conv2.stride + 1)
            y = self._conv2_int8(x.permute(0, 2, 3, 1), int8)
            return self._project_int8(y, int8), (cache1, x[:, :, n2 * self.conv2.stride :])
        x, cache2 = self.conv2.stream(x, caches[1])
        return self._project(torch.relu(x)), (cache1, cache2)

    def pack_int8(self) -> Int8Frontend:
        """conv2 and the projection quantized for int8 inference (see :class:`Int8Frontend`)."""
        with torch.no_grad():
            def quantized(w: Tensor) -> Int8Matrix:  # w [K, N], used as x @ w
                K, N = w.shape
                return _quantize_columns(w, torch.empty(K, N, dtype=torch.int8), torch.empty(N, K, dtype=torch.int8))

            return Int8Frontend(conv2=quantized(self._conv2_weight_rows().t()), conv2_bias=self.conv2.conv.bias.detach(),
                                proj=quantized(self.proj.weight.t()), proj_bias=self.proj.bias.detach())

    #: Output positions of conv2 (in time) per int8 product in :meth:`_conv2_int8`: bounds the
    #: unfolded windows of a long file to ~20 MB per utterance of the batch.
    INT8_TIME_CHUNK = 256

    def _conv2_int8(self, x: Tensor, w: Int8Frontend) -> Tensor:
        """relu(conv2) of channels-last input x [B, T, F1, C] whose first frames are the left
        padding (or cache): [B, n2, F2, C], each window's product in int8 (:class:`Int8Frontend`)."""
        k, s = self.conv2.kernel, self.conv2.stride
        B, T, F1, C = x.shape
        n2, F2 = max(0, (T - k) // s + 1), self.conv2._out_freq(F1)
        parts = []
        for t0 in range(0, n2, self.INT8_TIME_CHUNK):
            t1 = min(n2, t0 + self.INT8_TIME_CHUNK)
            windows = x[:, t0 * s : (t1 - 1) * s + k].unfold(1, k, s).unfold(2, k, s)  # [B, t, F2, C, kt, kf]
            rows = windows.permute(0, 1, 2, 4, 5, 3).reshape(B * (t1 - t0) * F2, k * k * C)
            y = _mm8(*_quant_rows(rows), w.conv2).add_(w.conv2_bias).relu_()
            parts.append(y.view(B, t1 - t0, F2, C))
        if not parts:
            return x.new_zeros(B, 0, F2, C)
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)

    def _project_int8(self, y: Tensor, w: Int8Frontend) -> Tensor:
        """The projection of channels-last conv2 outputs y [B, T, F2, C] -> [B, T, d_model], in int8."""
        B, T, F2, C = y.shape
        if T == 0:
            return y.new_zeros(B, 0, self.proj.out_features)
        flat = y.transpose(2, 3).reshape(B * T, C * F2)  # (C, F) as _project
        return _mm8(*_quant_rows(flat), w.proj).add_(w.proj_bias).view(B, T, -1)

    #: ``stream`` calls with at most this many new feature frames over the batch (and autograd
    #: off) take :meth:`_stream_small`; beyond it the unfolded windows get big (2304 floats per
    #: output position) and ``nn.Conv2d`` is as fast.
    SMALL_STREAM_FRAMES = 128

    def _stream_small(
        self, features: Tensor, caches: tuple[Optional[Tensor], Optional[Tensor]], int8: Optional[Int8Frontend] = None
    ) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        """``stream`` for the few frames of a streaming call, with each convolution as one matrix
        product over unfolded input windows (im2col), channels-last in between.

        For one or two output frames ``nn.Conv2d`` costs more in choosing and preparing its
        algorithm than in arithmetic; the product form is ~2x faster on one CPU thread. The
        second convolution's windows are gathered with channels innermost (runs of C floats, a
        cheap copy), which needs its weight as [out, kt, kf, in]: a copy cached here and rebuilt
        when the weight changes. The caches keep the layout ``stream`` uses ([B, C, t, F], here
        as permuted views), so the two forms can follow each other in one stream. Same sums, so
        the same results to float rounding.
        """
        k, s = self.conv1.kernel, self.conv1.stride
        c1, c2 = caches
        B, _, n_mels = features.shape
        conv1, conv2 = self.conv1.conv, self.conv2.conv
        C, F1 = conv1.out_channels, self.conv1._out_freq(n_mels)
        F2 = self.conv2._out_freq(F1)
        if c1 is None:
            c1 = features.new_zeros(B, 1, k - 1, n_mels)
        x = torch.cat([c1[:, 0], features], dim=1)  # [B, T, n_mels]
        n1 = max(0, (x.shape[1] - k) // s + 1)
        cache1 = x[:, n1 * s :].unsqueeze(1)
        if n1:
            rows = x[:, : (n1 - 1) * s + k].unfold(1, k, s).unfold(2, k, s)  # [B, n1, F1, kt, kf]
            y1 = torch.addmm(conv1.bias, rows.reshape(B * n1 * F1, k * k), conv1.weight.view(C, k * k).t())
            y1 = y1.relu_().view(B, n1, F1, C)
        else:
            y1 = features.new_zeros(B, 0, F1, C)
        c2 = features.new_zeros(B, k - 1, F1, C) if c2 is None else c2.permute(0, 2, 3, 1)
        x = torch.cat([c2, y1], dim=1)  # [B, T1, F1, C]
        n2 = max(0, (x.shape[1] - k) // s + 1)
        cache2 = x[:, n2 * s :].permute(0, 3, 1, 2)  # [B, C, t, F1]
        if n2 == 0:
            return features.new_zeros(B, 0, self.proj.out_features), (cache1, cache2)
        if int8 is not None:
            return self._project_int8(self._conv2_int8(x, int8), int8), (cache1, cache2)
        rows = x[:, : (n2 - 1) * s + k].unfold(1, k, s).unfold(2, k, s)  # [B, n2, F2, C, kt, kf]
        rows = rows.permute(0, 1, 2, 4, 5, 3).reshape(B * n2 * F2, k * k * C)
        y2 = torch.addmm(conv2.bias, rows, self._conv2_weight_rows().t()).relu_()  # [B*n2*F2, C]
        flat = y2.view(B * n2, F2, C).transpose(1, 2).reshape(B * n2, C * F2)  # (C, F) as _project
        return self.proj(flat).view(B, n2, -1), (cache1, cache2)  # a module call: may be quantized

    def _conv2_weight_rows(self) -> Tensor:
        """conv2's weight as [out, kt * kf * in] (channels innermost), cached per weight version."""
        w = self.conv2.conv.weight
        key = (w.data_ptr(), w._version, w.dtype, w.device)
        cached = self.__dict__.get("_w2_rows")
        if cached is None or cached[0] != key:
            with torch.no_grad():
                cached = (key, w.permute(0, 2, 3, 1).reshape(w.shape[0], -1).contiguous())
            self.__dict__["_w2_rows"] = cached
        return cached[1]
