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

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(nn.functional.pad(x, (0, 0, self.kernel - 1, 0)))

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

    def forward(self, features: Tensor) -> Tensor:
        x = torch.relu(self.conv1(features.unsqueeze(1)))
        x = torch.relu(self.conv2(x))
        return self._project(x)

    def stream(self, features: Tensor, caches: tuple[Optional[Tensor], Optional[Tensor]]) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        """Incremental form of ``forward``: concatenated outputs over any split equal one pass."""
        x, cache1 = self.conv1.stream(features.unsqueeze(1), caches[0])
        x = torch.relu(x)
        if caches[1] is None:
            caches = (caches[0], self.conv2.init_cache(x))
        x, cache2 = self.conv2.stream(x, caches[1])
        return self._project(torch.relu(x)), (cache1, cache2)
