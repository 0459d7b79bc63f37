"""Causal x4 convolutional subsampling (10 ms feature frames -> 40 ms encoder frames).

Two Conv2d layers with kernel 3 and stride 2 over (time, frequency). Time is padded on the left only,
so output j depends on inputs up to 2j and nothing later: the whole front end is causal, padding at
the end of a batch never changes earlier outputs, and the streaming form needs only a tiny cache of
the last input frames of each layer.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn


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

    def forward(self, features: Tensor) -> Tensor:
        channels_last = self.channels_last and features.is_cuda
        x = torch.relu(self.conv1(features.unsqueeze(1), channels_last))
        x = torch.relu(self.conv2(x, channels_last))
        return self._project(x)

    def stream(self, features: Tensor, caches: tuple[Optional[Tensor], Optional[Tensor]]) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        """Incremental form of ``forward``: concatenated outputs over any split equal one pass."""
        if features.shape[0] * features.shape[1] <= self.SMALL_STREAM_FRAMES and not torch.is_grad_enabled():
            return self._stream_small(features, caches)
        x, cache1 = self.conv1.stream(features.unsqueeze(1), caches[0])
        x = torch.relu(x)
        if caches[1] is None:
            caches = (caches[0], self.conv2.init_cache(x))
        x, cache2 = self.conv2.stream(x, caches[1])
        return self._project(torch.relu(x)), (cache1, cache2)

    #: ``stream`` calls with at most this many new feature frames over the batch (and autograd
    #: off) take :meth:`_stream_small`; beyond it the unfolded windows get big (2304 floats per
    #: output position) and ``nn.Conv2d`` is as fast.
    SMALL_STREAM_FRAMES = 128

    def _stream_small(
        self, features: Tensor, caches: tuple[Optional[Tensor], Optional[Tensor]]
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
