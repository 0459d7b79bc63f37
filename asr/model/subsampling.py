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
    #: (tools/bench_frontend.py) channels-last took the front end's training
    #: peak from 2.79 to 2.18 GiB at 21 x 30 s (256 channels; 1.48 -> 1.23 GiB at 64 x 10 s, 128),
    #: at the same speed (0.98-1.03x). A class attribute, so a benchmark can switch it off.
    channels_last: bool = True

    def forward(self, features: Tensor) -> Tensor:
        channels_last = self.channels_last and features.is_cuda
        x = torch.relu(self.conv1(features.unsqueeze(1), channels_last))
        x = torch.relu(self.conv2(x, channels_last))
        return self._project(x)

    def stream(
        self, features: Tensor, caches: tuple[Optional[Tensor], Optional[Tensor]]
    ) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        """Incremental form of ``forward``: concatenated outputs over any split equal one pass.
        Caches: conv1's [B, 1, t, n_mels] and conv2's [B, C, t, F1] input frames (None at the start)."""
        x, cache1 = self.conv1.stream(features.unsqueeze(1), caches[0])
        x, cache2 = self.conv2.stream(torch.relu(x), caches[1])
        return self._project(torch.relu(x)), (cache1, cache2)
