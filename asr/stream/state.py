"""Stacking the recurrent states of several streams into one batch, and splitting them again.

``CTCModel.step`` runs a batch of streams at once if their :class:`~asr.model.EncoderState`\\ s are
stacked along the batch dimension: the weights are then read once per step for all streams, which
is what makes many concurrent streams cheap (a single stream's step is bound by reading weights).

What may be stacked: every tensor of the state has a fixed shape except the subsampling caches,
whose time length depends on how many feature frames the stream has consumed modulo 4 (the two
stride-2 convolutions keep 1 or 2 input frames each). At a multiple of 4 (and at the start, where
the caches are still ``None`` and equal to zeros) the caches have exactly the shapes of
:func:`initial_caches`, so streams in that "phase 0" stack. :class:`asr.stream.recognizer` steps
batched streams in multiples of 4 feature frames (one encoder frame) to keep them there.

``frames_in``/``frames_out`` are per stream and do not survive stacking: :func:`stack_states` sets
them to 0 and :func:`split_state` takes the per-stream values to restore.

Stacking copies every state (~0.7 MB per stream for the bundled model; ~14 ms per call for 104
streams on two threads, measured). A server that steps the same streams call after call need not
pay it: :func:`split_state` returns views into the batched state and records where each came from
(``EncoderState.stacked_from``), and :func:`stack_states` given exactly those views, all rows in
order, hands back the batched tensors themselves. States are values here: ``step`` returns new ones
and nothing assigns to a state's fields, so a view still is what its row holds.

The per-stream block states are made when read (:class:`_RowBlocks`), not at the split: a
server that restacks the same streams never reads them. Made eagerly they would cost 24 tensor
views per stream and call (~2 ms at 100 streams), and their ~2,600 new Python objects per call
would set off the interpreter's full garbage collections (~145 ms each, every few dozen calls).
"""
from __future__ import annotations

from typing import Optional, Sequence, Union, overload

import torch
from torch import Tensor

from asr.frames import FEATURES_PER_FRAME
from asr.model import CTCModel, EncoderState
from asr.model.rwkv7 import BlockState

__all__ = ["initial_caches", "is_stackable", "stack_states", "split_state", "take_rows", "put_rows"]


def initial_caches(model: CTCModel, batch: int, device: torch.device, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """The subsampling caches a stream has before its first frame (what ``None`` stands for)."""
    sub = model.subsampling
    n_mels = model.config.n_mels
    c1 = torch.zeros(batch, 1, sub.conv1.kernel - 1, n_mels, device=device, dtype=dtype)
    f1 = sub.conv1._out_freq(n_mels)
    c2 = torch.zeros(batch, sub.conv2.conv.in_channels, sub.conv2.kernel - 1, f1, device=device, dtype=dtype)
    return c1, c2


def is_stackable(state: EncoderState) -> bool:
    """True when the state's caches have the phase-0 shapes (see the module docstring)."""
    return state.frames_in % FEATURES_PER_FRAME == 0


def _caches(model: CTCModel, state: EncoderState) -> tuple[Tensor, Tensor]:
    c1, c2 = state.subsampling
    if c1 is None or c2 is None:
        ref = state.blocks[0].tmix_prev
        init = initial_caches(model, ref.shape[0], ref.device, ref.dtype)
        c1 = init[0] if c1 is None else c1
        c2 = init[1] if c2 is None else c2
    return c1, c2


def stack_states(model: CTCModel, states: Sequence[EncoderState]) -> EncoderState:
    """One batched state from per-stream states (each with batch size 1 or more, all phase 0)."""
    if not states:
        raise ValueError("stack_states needs at least one state")
    for s in states:
        if not is_stackable(s):
            raise ValueError(f"a state at feature frame {s.frames_in} (not a multiple of "
                             f"{FEATURES_PER_FRAME}) cannot be stacked with others")
    reused = _whole_batch(states)
    if reused is not None:
        return EncoderState(subsampling=reused.subsampling, blocks=reused.blocks)
    caches = [_caches(model, s) for s in states]
    blocks = []
    for i in range(len(states[0].blocks)):
        parts = [s.blocks[i] for s in states]
        blocks.append(BlockState(
            tmix_prev=torch.cat([p.tmix_prev for p in parts]),
            wkv=torch.cat([p.wkv for p in parts]),
            cmix_prev=torch.cat([p.cmix_prev for p in parts]),
        ))
    return EncoderState(
        subsampling=(torch.cat([c[0] for c in caches]), torch.cat([c[1] for c in caches])),
        blocks=blocks,
    )


def _whole_batch(states: Sequence[EncoderState]) -> Optional[EncoderState]:
    """The batched state these per-stream states were split from, if they are all its rows in order."""
    origin = states[0].stacked_from
    if origin is None or len(states) < 2:
        return None
    parent = origin[0]
    if parent.blocks[0].tmix_prev.shape[0] != len(states):
        return None
    for row, s in enumerate(states):
        if s.stacked_from is None or s.stacked_from[0] is not parent or s.stacked_from[1] != row:
            return None
    return parent


def split_state(
    state: EncoderState,
    frames_in: Optional[Sequence[int]] = None,
    frames_out: Optional[Sequence[int]] = None,
) -> list[EncoderState]:
    """Per-stream states (batch size 1 each) of a batched state; views, no copies (each records its
    origin, so :func:`stack_states` of all of them in order is free).

    ``frames_in``/``frames_out``: the per-stream counters to put back (default 0).
    """
    n = state.blocks[0].tmix_prev.shape[0]
    fin = list(frames_in) if frames_in is not None else [0] * n
    fout = list(frames_out) if frames_out is not None else [0] * n
    if len(fin) != n or len(fout) != n:
        raise ValueError(f"{n} streams in the state but {len(fin)}/{len(fout)} frame counters")
    c1, c2 = state.subsampling
    out = []
    for b in range(n):
        out.append(EncoderState(
            subsampling=(None if c1 is None else c1[b : b + 1], None if c2 is None else c2[b : b + 1]),
            blocks=_RowBlocks(state.blocks, b),  # type: ignore[arg-type]
            frames_in=fin[b],
            frames_out=fout[b],
            stacked_from=(state, b),
        ))
    return out


class _RowBlocks(Sequence[BlockState]):
    """Row ``row`` of each batched block state, as batch-size-1 views made on each access.

    Stands in for ``EncoderState.blocks`` (a list) in the states :func:`split_state` returns:
    indexing, iteration and ``len`` behave as on the list of views it replaces."""

    __slots__ = ("_batched", "_row")

    def __init__(self, batched: Sequence[BlockState], row: int) -> None:
        self._batched = batched
        self._row = row

    def __len__(self) -> int:
        return len(self._batched)

    @overload
    def __getitem__(self, i: int) -> BlockState: ...
    @overload
    def __getitem__(self, i: slice) -> list[BlockState]: ...

    def __getitem__(self, i: Union[int, slice]) -> Union[BlockState, list[BlockState]]:
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        s, b = self._batched[i], self._row
        return BlockState(s.tmix_prev[b : b + 1], s.wkv[b : b + 1], s.cmix_prev[b : b + 1])


def _tensors(state: EncoderState) -> list[Tensor]:
    """The state's tensors in a fixed order (caches, then each block's three); caches must be set."""
    assert all(c is not None for c in state.subsampling), "a stepped state has its caches"
    return _tensors_or_none(state)


def _from_tensors(tensors: Sequence[Tensor]) -> EncoderState:
    blocks = [BlockState(*tensors[i : i + 3]) for i in range(2, len(tensors), 3)]
    return EncoderState(subsampling=(tensors[0], tensors[1]), blocks=blocks)


def take_rows(state: EncoderState, rows: Tensor) -> EncoderState:
    """Rows ``rows`` (int64 indices) of a batched state, copied (its counters are 0)."""
    return _from_tensors([t.index_select(0, rows) for t in _tensors(state)])


def put_rows(state: EncoderState, rows: Tensor, part: EncoderState, inputs: Sequence[EncoderState] = ()) -> EncoderState:
    """Write ``part`` (a state of ``len(rows)`` streams) into rows ``rows`` of the batched ``state``,
    in place where that is safe, and return the result. A tensor of ``state`` that shares memory
    with a tensor of ``inputs`` (states someone else may still hold, e.g. the ones a step was given
    and returned unchanged) is copied first, so only memory that ``state`` alone owns is written."""
    held = {t.untyped_storage().data_ptr() for s in inputs for t in _tensors_or_none(s)}
    out = []
    for t, new in zip(_tensors(state), _tensors(part)):
        if t.untyped_storage().data_ptr() in held:
            t = t.clone()
        t[rows] = new
        out.append(t)
    return _from_tensors(out)


def _tensors_or_none(state: EncoderState) -> list[Tensor]:
    """The state's tensors in :func:`_tensors`' order, leaving out caches that are not set."""
    tensors = [t for t in state.subsampling if t is not None]
    return tensors + [t for b in state.blocks for t in (b.tmix_prev, b.wkv, b.cmix_prev)]
