"""The training forward and backward replayed as CUDA graphs, one pair per batch shape
(``trainer.cuda_graphs``).

Why: at the sizes we train, an eager step is thousands of small kernels and the GPU waits on the
Python that launches them. ``torch.cuda.make_graphed_callables`` records the model's forward and
its backward once for a shape and then replays each with one launch: 1.79x the eager step on an
H100 at 21 x 30 s (tools/bench_train.py, ``rwkv7_graphed``), with no compiler, so a new shape
costs a few eager steps of warm-up instead of minutes of compilation. The trainer's batch shapes
change with the bucketing sampler; ``trainer.pad_per_octave`` (or ``pad_frames_multiple`` and
``pad_batch_multiple``) rounds them so that a few dozen graphs cover a run.

How the graphs share memory: all of them are recorded into one memory pool, so the activations
cost the largest shape's, not the sum. That is safe because a shape's forward and its backward
always run back to back (the loss between them is eager, outside the pool), and nothing a graph
leaves in the pool is read after the next graph runs: the logits are consumed by the loss, the
weight gradients are added into ``.grad`` by autograd as the backward ends. The one thing that
must not happen is autograd *adopting* a graph's gradient buffer as ``.grad`` (it does when
``.grad`` is None): the next replay would overwrite it. :func:`keep_grads_allocated` and
``zero_grad(set_to_none=False)`` in the trainer prevent that.

What each graph keeps: its static inputs and outputs and one weight-gradient buffer per
parameter (about 4 bytes per parameter per shape), hence ``max_shapes``.
"""
from __future__ import annotations

import logging
from typing import Callable, Optional

import torch
from torch import Tensor, nn

log = logging.getLogger(__name__)

MAX_SHAPES = 64  # graphs kept; batches of further shapes run eagerly (each graph holds ~4 B/parameter)

# ``torch.cuda.make_graphed_callables``' signature: (module, sample_args, *, pool=...) -> callable
Capture = Callable[..., Callable[..., tuple[Tensor, Tensor]]]


class _Forward(nn.Module):
    """``model(features, lengths)`` as a module of its own: ``make_graphed_callables`` replaces the
    ``forward`` of the module it is given, so each shape gets a fresh one (the weights are shared)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, features: Tensor, lengths: Tensor) -> tuple[Tensor, Tensor]:
        return self.model(features, lengths)


def keep_grads_allocated(params: list[nn.Parameter]) -> None:
    """Give every parameter a zero ``.grad`` so graphed backwards add into it (see module doc)."""
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)


class GraphedTrainForward:
    """Call like the model in training (``features [B, T, F], lengths [B] -> (logits, lengths)``);
    the first batch of each shape records a CUDA graph pair, later ones replay it.

    ``autocast_dtype``: the trainer's autocast (bf16) or None; recording needs autocast's weight
    cache off, replay needs no autocast at all (the casts are inside the graph). ``capture`` is
    ``torch.cuda.make_graphed_callables`` (tests put a stand-in there to check the bookkeeping on a
    CPU). Batches of a new shape once ``max_shapes`` graphs exist run the eager model.
    """

    def __init__(self, model: nn.Module, autocast_dtype: Optional[torch.dtype], max_shapes: int = MAX_SHAPES,
                 capture: Optional[Capture] = None):
        self.model = model
        self.autocast_dtype = autocast_dtype
        self.max_shapes = max_shapes
        self.capture = capture or torch.cuda.make_graphed_callables
        self.graphs: dict[tuple, Callable[..., tuple[Tensor, Tensor]]] = {}
        self.eager_batches = 0  # batches past max_shapes, run eagerly
        self._pool = None

    def __call__(self, features: Tensor, lengths: Tensor) -> tuple[Tensor, Tensor]:
        key = (tuple(features.shape), features.dtype, tuple(lengths.shape), lengths.dtype)
        graphed = self.graphs.get(key)
        if graphed is None:
            if len(self.graphs) >= self.max_shapes:
                if self.eager_batches == 0:
                    log.warning("trainer.cuda_graphs: %d batch shapes recorded, further new shapes run eagerly; "
                                "a smaller trainer.pad_per_octave makes fewer shapes",
                                self.max_shapes)
                self.eager_batches += 1
                return self._eager(features, lengths)
            graphed = self.graphs[key] = self._record(features, lengths)
        return graphed(features, lengths)

    def _eager(self, features: Tensor, lengths: Tensor) -> tuple[Tensor, Tensor]:
        if self.autocast_dtype is None:
            return self.model(features, lengths)
        with torch.autocast(features.device.type, dtype=self.autocast_dtype):
            return self.model(features, lengths)

    def _record(self, features: Tensor, lengths: Tensor) -> Callable[..., tuple[Tensor, Tensor]]:
        if self._pool is None and features.is_cuda:
            self._pool = torch.cuda.graph_pool_handle()
        # The graph reads its inputs from these buffers; each call copies the batch in.
        sample = (features.detach().clone(), lengths.clone())
        if self.autocast_dtype is None:
            graphed = self.capture(_Forward(self.model), sample, pool=self._pool)
        else:
            with torch.autocast(features.device.type, dtype=self.autocast_dtype, cache_enabled=False):
                graphed = self.capture(_Forward(self.model), sample, pool=self._pool)
        log.info("trainer.cuda_graphs: recorded batch shape %s (%d graphs)", tuple(features.shape),
                 len(self.graphs) + 1)
        return graphed
