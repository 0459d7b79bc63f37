"""The streaming front end (global CMVN and the causal x4 subsampling) as compiled C++ functions,
for the calls that the compiled step serves (:mod:`asr.model.token_step`).

Opt-in with it: :meth:`asr.model.CTCModel.prepare_for_inference` with ``compile=True``. A call of
one stream that brings 4 T feature frames, T in ``compile_frames``, then runs CMVN, both
convolutions and the projection as one compiled function, and the blocks as the compiled step.

Why: for one encoder frame the eager front end (:meth:`ConvSubsampling._stream_small`) makes ~35
small ATen calls (concatenations, window gathers, quantization, three products), ~0.24 ms on one
thread of the 2-core dev box, a quarter of the whole int8 step; compiled, ~0.10 ms with the same
results (session 11, the bundled model, alternating in one process).

The shapes differ with the phase of the stream: how many of conv2's input frames wait in its cache
(1 or 2: a stream that started with an even number of feature frames holds 2, ``asr-live``'s first
call of 2 feature frames leaves 1). Each phase is its own compiled function (a few seconds each,
compiled with the step). Calls with an odd feature-frame count in the caches, or any other shape,
keep the eager front end; the caches keep the layout the eager code uses, so the two can follow
each other in one stream.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import Tensor

from asr.model.subsampling import ConvSubsampling, Int8Frontend
from asr.model.token_step import _quant, compile_graph

#: conv2 input frames that can wait in its cache when the stream's feature frames come in pairs
_PHASES = (1, 2)
_CACHE1 = 2  # conv1 input frames cached between calls in those streams
_KERNEL, _STRIDE = 3, 2  # both convolutions' (ConvSubsampling's defaults; see CompiledFrontend.supports)


@dataclass(frozen=True)
class _FrontLayout:
    """The sizes a compiled front end is specialised for (constants of its graph)."""

    n_mels: int
    channels: int
    d_model: int
    int8: bool
    feature_frames: int
    cache2: int


def _front_frames(L: _FrontLayout) -> Callable[..., tuple[Tensor, Tensor, Tensor]]:
    """The front end for ``L.feature_frames`` new frames of one stream, as ``_stream_small`` computes
    it: (features [t, n_mels] raw, cache1 [2, n_mels] normalized, cache2 [c, F1, C] channels-last,
    CMVN mean and istd, conv1 weight [C, 9] and bias, conv2 weight and bias, projection weight and
    bias, and with int8 the two weights' per-channel scales) -> (x [T, d_model], cache1, cache2)."""
    k, s = _KERNEL, _STRIDE

    def front(feats: Tensor, c1: Tensor, c2: Tensor, mean: Tensor, istd: Tensor, w1: Tensor, b1: Tensor,
              w2: Tensor, b2: Tensor, wp: Tensor, bp: Tensor, *scales: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        C = L.channels
        x = torch.cat([c1, (feats - mean) * istd])  # [t + 2, n_mels]
        n1 = (x.shape[0] - k) // s + 1
        rows = x[: (n1 - 1) * s + k].unfold(0, k, s).unfold(1, k, s)  # [n1, F1, kt, kf]
        F1 = rows.shape[1]
        y1 = torch.relu(torch.addmm(b1, rows.reshape(n1 * F1, k * k), w1.t())).view(n1, F1, C)
        x2 = torch.cat([c2, y1])  # [c + n1, F1, C]
        n2 = (x2.shape[0] - k) // s + 1
        windows = x2[: (n2 - 1) * s + k].unfold(0, k, s).unfold(1, k, s)  # [n2, F2, C, kt, kf]
        F2 = windows.shape[1]
        r2 = windows.permute(0, 1, 3, 4, 2).reshape(n2 * F2, k * k * C)
        if L.int8:  # as ConvSubsampling._conv2_int8 / _project_int8: per-row scales, exact int32 sums
            q, amax = _quant(r2)
            y2 = torch.relu(torch._int_mm(q.to(torch.int8), w2) * amax * scales[0] + b2)
        else:
            y2 = torch.relu(torch.addmm(b2, r2, w2.t()))
        flat = y2.view(n2, F2, C).transpose(1, 2).reshape(n2, C * F2)  # (C, F) as ConvSubsampling._project
        if L.int8:
            q, amax = _quant(flat)
            out = torch._int_mm(q.to(torch.int8), wp) * amax * scales[1] + bp
        else:
            out = torch.addmm(bp, flat, wp.t())
        return out, x[n1 * s :].clone(), x2[n2 * s :].clone()

    return front


#: compiled front ends by layout, shared by all models of the same sizes (they hold no weights)
_COMPILED: dict[_FrontLayout, Callable[..., tuple[Tensor, Tensor, Tensor]]] = {}


class CompiledFrontend:
    """The compiled front ends of one model, one per encoder-frame count in ``frames`` and phase.

    Call :meth:`update` with the current packs' key before each use (cheap when unchanged): it
    collects the weights the compiled functions read, views of the model's own parameters or of
    its int8 pack (:class:`asr.model.subsampling.Int8Frontend`), in the strides they were traced
    with. CMVN's statistics are read on every call (buffers, not covered by the packs' check).
    """

    def __init__(self, frames: tuple[int, ...]) -> None:
        self.frames = tuple(sorted(set(frames)))
        self._key: Optional[object] = None
        self._n_mels = 0
        self._fns: dict[tuple[int, int], tuple[Callable[..., tuple[Tensor, Tensor, Tensor]], list[Tensor]]] = {}
        self._cache2_shape = (0, 0)  # (F1, C) of conv2's cache, channels-last

    @staticmethod
    def supports(sub: ConvSubsampling) -> bool:
        """Whether this front end has the form the compiled function computes."""
        convs = (sub.conv1, sub.conv2)
        return type(sub.proj) is torch.nn.Linear and all(c.kernel == _KERNEL and c.stride == _STRIDE for c in convs) \
            and sub.conv1.conv.in_channels == 1 and sub.proj.weight.dtype == torch.float32

    def current(self, key: object) -> bool:
        """Whether the weights were collected for ``key`` (the packs)."""
        return key is self._key

    def update(self, key: object, sub: ConvSubsampling, n_mels: int, int8: Optional[Int8Frontend]) -> None:
        """Collect the weights (and compile what is missing) unless ``key`` (the packs) is unchanged."""
        if key is self._key:
            return
        conv1 = sub.conv1.conv
        C = conv1.out_channels
        self._n_mels, self._cache2_shape = n_mels, (sub.conv1._out_freq(n_mels), C)
        fns = {}
        with torch.no_grad():
            # float weights contiguous, as traced (no copies for a model's own parameters)
            first = [conv1.weight.detach().reshape(C, -1).contiguous(), conv1.bias.detach()]
            for T in self.frames:
                if int8 is not None:  # one row: the transposed layout oneDNN is fastest with (as _mm8)
                    proj = int8.proj.q_t if T == 1 else int8.proj.q
                    weights = first + [int8.conv2.q, int8.conv2_bias, proj, int8.proj_bias,
                                       int8.conv2.scale, int8.proj.scale]
                else:
                    weights = first + [sub._conv2_weight_rows(), sub.conv2.conv.bias.detach(),
                                       sub.proj.weight.detach().contiguous(), sub.proj.bias.detach()]
                for c2 in _PHASES:
                    layout = _FrontLayout(n_mels, C, sub.proj.out_features, int8 is not None, 4 * T, c2)
                    fns[(T, c2)] = (self._compiled(layout, weights), weights)
        self._key, self._fns = key, fns

    @staticmethod
    def _compiled(layout: _FrontLayout, weights: list[Tensor]) -> Callable[..., tuple[Tensor, Tensor, Tensor]]:
        fn = _COMPILED.get(layout)
        if fn is None:
            F1 = (layout.n_mels - _KERNEL) // _STRIDE + 1
            # distinct tensors: the trace would take one tensor given twice for one input
            examples = [torch.zeros(layout.feature_frames, layout.n_mels), torch.zeros(_CACHE1, layout.n_mels),
                        torch.zeros(layout.cache2, F1, layout.channels), torch.zeros(layout.n_mels),
                        torch.zeros(layout.n_mels)] + weights
            fn = _COMPILED[layout] = compile_graph(_front_frames(layout), examples)
        return fn

    def release(self) -> None:
        """Drop the weight references (the compiled code stays, for a later :meth:`update`)."""
        self._key, self._fns = None, {}

    def applies(self, features: Tensor, caches: tuple[Optional[Tensor], Optional[Tensor]]) -> bool:
        """Whether a compiled front end serves this call: one stream, 4 T new float32 CPU frames (T
        in ``frames``), caches of a compiled phase (none yet: the phase of a new stream)."""
        B, t, n_mels = features.shape
        c1, c2 = caches
        return B == 1 and n_mels == self._n_mels and t % 4 == 0 and (t // 4) in self.frames and features.dtype == torch.float32 \
            and features.device.type == "cpu" and (c1 is None or c1.shape[2] == _CACHE1) \
            and (c2 is None or c2.shape[2] in _PHASES)

    def __call__(self, features: Tensor, caches: tuple[Optional[Tensor], Optional[Tensor]], mean: Tensor,
                 istd: Tensor) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        """Raw features [1, 4T, n_mels] (:meth:`applies`) -> (x [1, T, d_model], the new caches in
        the layout of :meth:`ConvSubsampling.stream`: [1, 1, 2, n_mels], [1, C, c, F1])."""
        c1, c2 = caches
        fn, weights = self._fns[(features.shape[1] // 4, 2 if c2 is None else c2.shape[2])]
        if c1 is None:  # a new stream: the left padding
            c1 = features.new_zeros(1, 1, _CACHE1, features.shape[2])
        if c2 is None:
            c2 = features.new_zeros(1, 2, *self._cache2_shape).permute(0, 3, 1, 2)
        # the caches as the eager code leaves them are these layouts already: no copies
        x, new1, new2 = fn(features[0].contiguous(), c1[0, 0].contiguous(), c2[0].permute(1, 2, 0).contiguous(),
                           mean, istd, *weights)
        return x.unsqueeze(0), (new1[None, None], new2.unsqueeze(0).permute(0, 3, 1, 2))
