"""One training micro-batch: forward, CTC loss and backward (:class:`EagerTrainStep`).

The loop (:mod:`asr.train.loop`) calls ``step(batch, micro_batches) -> loss`` once per micro-batch and does
everything else (accumulation, the optimizer, logging); another step with the same call (e.g. one
compiled per fixed batch shape) plugs in without touching the loop.
"""
from __future__ import annotations

import contextlib
import logging
import time
from typing import Any, Callable, Optional, Protocol

import torch
from torch import Tensor

from asr.data.dataset import Batch
from asr.model import CTCModel, ctc_loss
from asr.train.padding import pad_frames, pad_rows

log = logging.getLogger("asr.train")


class TrainStep(Protocol):
    def __call__(self, batch: Batch, micro_batches: int) -> Tensor:
        """Add the gradient of ``batch``'s CTC loss / ``micro_batches`` (the micro-batches of this
        optimizer step) into the parameters' ``.grad``; return that loss (a detached scalar on the
        training device: mean over the batch's utterances, not divided)."""
        ...


class EagerTrainStep:
    """The trainer's step: the batch to the device (features made there with
    ``data.features_on_device``, SpecAugment there), padded to a few shapes (``trainer.pad_*``,
    :mod:`asr.train.padding`), forward under ``autocast`` through ``forward`` (the model, its DDP
    wrapper or :class:`asr.train.cuda_graphs.GraphedTrainForward`), CTC loss, backward.

    ``cuda_graphs``: inductor replays CUDA graphs (``trainer.compile=cudagraphs``); they reuse
    their output memory, so each forward is marked as the start of a new step (no output of the
    previous one is read after it).

    The first step of each padded batch shape is timed to its end on the device and logged: with
    compiled code (``trainer.compile``) or CUDA graphs that time is the shape's compilation or
    recording, the start-up cost of a run. Only the first ``LOGGED_SHAPES`` shapes are: unpadded
    eager batches make a new shape at almost every step."""

    LOGGED_SHAPES = 32

    def __init__(self, model: CTCModel, forward: Callable[..., tuple[Tensor, Tensor]], device: torch.device,
                 autocast: Callable[[], Any] = contextlib.nullcontext, spec_augment: Optional[Any] = None,
                 pad_multiple: int = 0, pad_batch: int = 0, per_octave: int = 0, cuda_graphs: bool = False):
        self.model, self.forward, self.device, self.autocast = model, forward, device, autocast
        self.spec_augment = spec_augment
        self.pad_multiple, self.pad_batch, self.per_octave = pad_multiple, pad_batch, per_octave
        self.cuda_graphs = cuda_graphs
        self.shapes_seen: set[tuple[int, ...]] = set()

    def __call__(self, batch: Batch, micro_batches: int) -> Tensor:
        # CTC copies its lengths to the CPU anyway: hand it the batch's CPU ones (no GPU read).
        out_lens = self.model.output_lengths(batch.feature_lengths)  # [B] frames after subsampling
        target_lens = batch.target_lengths  # [B]
        batch = batch.to(self.device).with_device_features(self.spec_augment)  # features [B, T, F]
        if self.cuda_graphs:
            torch.compiler.cudagraph_mark_step_begin()
        # [B', T', F] with B' >= B empty utterances and T' >= T zero frames appended
        features, feature_lens, targets, padded_out_lens, padded_target_lens = pad_rows(
            self.pad_batch, pad_frames(batch.features, self.pad_multiple, self.per_octave), batch.feature_lengths,
            batch.targets, out_lens, target_lens, per_octave=self.per_octave)
        first_of_shape = len(self.shapes_seen) < self.LOGGED_SHAPES and tuple(features.shape) not in self.shapes_seen
        start = time.perf_counter()
        with self.autocast():
            logits, _ = self.forward(features, feature_lens)  # [B', T' / subsampling, V]
        loss = ctc_loss(logits, padded_out_lens, targets, padded_target_lens, utterances=len(batch))
        (loss / micro_batches).backward()
        if first_of_shape:
            self._log_first_step(tuple(features.shape), start)
        return loss.detach()

    def _log_first_step(self, shape: tuple[int, ...], start: float) -> None:
        """Log how long the first forward + backward of batch shape ``shape`` took, to its end on the device."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.shapes_seen.add(shape)
        log.info("first step of batch shape %s: %.1f s (shape %d)", "x".join(map(str, shape[:2])),
                 time.perf_counter() - start, len(self.shapes_seen))
