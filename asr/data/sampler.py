"""Bucketing batch sampler: batches of similar-length utterances bounded by padded seconds.

Why bucketing: padding is wasted compute, and a fixed batch *size* either wastes memory on short
utterances or runs out of it on long ones. Batches are therefore filled up to a budget of padded
audio seconds (``max duration in the batch * batch size``), which is what memory actually scales
with.

Determinism and resume: the batch list of an epoch is a pure function of (seed, epoch, dataset
durations, world size). The position inside the epoch is *not* counted by ``__iter__`` because
DataLoader workers prefetch batches ahead of the training loop; the trainer calls :meth:`advance`
once per batch it has actually consumed, and :meth:`state_dict` records that position.

Each yielded batch is a list of ``(index, sample_seed)`` pairs. The per-sample seed makes random
augmentation depend only on (seed, epoch, index), never on which worker processed the sample or on
whether the run was resumed.

DDP: every rank builds the same global batch list and takes every ``world_size``-th batch, after
the list is cut to a multiple of the world size so all ranks run the same number of steps
(a rank that runs out early would hang the others in the gradient all-reduce).
"""
from __future__ import annotations

import random
from typing import Iterator, Sequence

SampleRef = tuple[int, int]


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """A 63-bit seed for one sample in one epoch, stable across processes and Python versions."""
    x = (seed * 0x9E3779B97F4A7C15 + epoch * 0xBF58476D1CE4E5B9 + index * 0x94D049BB133111EB) & (2**64 - 1)
    # splitmix64 finaliser: decorrelates neighbouring (epoch, index) pairs.
    x ^= x >> 30
    x = (x * 0xBF58476D1CE4E5B9) & (2**64 - 1)
    x ^= x >> 27
    x = (x * 0x94D049BB133111EB) & (2**64 - 1)
    x ^= x >> 31
    return x & (2**63 - 1)


class BucketingBatchSampler:
    """Yield batches (lists of ``(index, sample_seed)``) whose padded duration stays under a budget.

    Args:
        durations: duration in seconds of every dataset item, in dataset order.
        max_batch_seconds: budget for ``max(duration in batch) * len(batch)``; an utterance longer
            than the budget forms a batch on its own rather than being dropped silently.
        num_buckets: utterances are sorted by duration and cut into this many equal-count buckets;
            batches never mix buckets. More buckets: less padding, less randomness.
        max_batch_size: optional cap on utterances per batch (0 or None: no cap).
        shuffle: shuffle within buckets and the order of batches (training); False gives a fixed,
            duration-sorted order (validation).
        seed: base seed; the epoch's order is derived from (seed, epoch).
        rank, world_size: DDP shard of this process.
        shard_mode: how to share the global batch list between ranks when its length is not a
            multiple of ``world_size``. ``"drop"`` (training): drop the last few batches, so every
            rank runs the same number of steps. ``"pad"``: repeat batches from the start of the
            epoch instead. ``"uneven"`` (evaluation): every batch exactly once, ranks may differ by
            one batch; only for loops without collectives per batch.
    """

    def __init__(
        self,
        durations: Sequence[float],
        max_batch_seconds: float,
        num_buckets: int = 10,
        max_batch_size: int | None = None,
        shuffle: bool = True,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        shard_mode: str = "drop",
    ) -> None:
        if max_batch_seconds <= 0:
            raise ValueError(f"max_batch_seconds must be positive, got {max_batch_seconds}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world size {world_size}")
        if len(durations) == 0:
            raise ValueError("cannot sample from an empty dataset (check the manifest and the duration filter)")
        self.durations = [float(d) for d in durations]
        self.max_batch_seconds = float(max_batch_seconds)
        self.num_buckets = max(1, int(num_buckets))
        self.max_batch_size = int(max_batch_size) if max_batch_size else 0
        self.shuffle = shuffle
        self.seed = int(seed)
        self.rank = rank
        self.world_size = world_size
        if shard_mode not in ("drop", "pad", "uneven"):
            raise ValueError(f"shard_mode must be drop, pad or uneven, got {shard_mode!r}")
        self.shard_mode = shard_mode
        self.epoch = 0
        self.position = 0  # batches of this rank already consumed in self.epoch
        self._cache: tuple[int, list[list[SampleRef]]] | None = None

    # ----------------------------------------------------------------- batch construction
    def _global_batches(self, epoch: int) -> list[list[int]]:
        rng = random.Random(sample_seed(self.seed, epoch, -1))
        order = sorted(range(len(self.durations)), key=lambda i: (self.durations[i], i))
        n_buckets = min(self.num_buckets, len(order))
        bounds = [round(b * len(order) / n_buckets) for b in range(n_buckets + 1)]
        batches: list[list[int]] = []
        for b in range(n_buckets):
            bucket = order[bounds[b] : bounds[b + 1]]
            if self.shuffle:
                rng.shuffle(bucket)
            batch: list[int] = []
            longest = 0.0
            for i in bucket:
                d = self.durations[i]
                new_longest = max(longest, d)
                too_long = batch and new_longest * (len(batch) + 1) > self.max_batch_seconds
                too_many = self.max_batch_size and len(batch) >= self.max_batch_size
                if too_long or too_many:
                    batches.append(batch)
                    batch, new_longest = [], d
                batch.append(i)
                longest = new_longest
            if batch:
                batches.append(batch)
        if self.shuffle:
            rng.shuffle(batches)
        if self.world_size > 1 and self.shard_mode != "uneven":
            rem = len(batches) % self.world_size
            if rem:
                if self.shard_mode == "drop" and len(batches) >= self.world_size:
                    batches = batches[: len(batches) - rem]
                else:
                    need = self.world_size - rem
                    batches = batches + [batches[k % len(batches)] for k in range(need)]
        return batches

    def epoch_batches(self, epoch: int | None = None) -> list[list[SampleRef]]:
        """This rank's batches for an epoch (default: the current one), with per-sample seeds."""
        epoch = self.epoch if epoch is None else epoch
        if self._cache is not None and self._cache[0] == epoch:
            return self._cache[1]
        mine = self._global_batches(epoch)[self.rank :: self.world_size]
        out = [[(i, sample_seed(self.seed, epoch, i)) for i in b] for b in mine]
        self._cache = (epoch, out)
        return out

    # ----------------------------------------------------------------- iteration and position
    def __iter__(self) -> Iterator[list[SampleRef]]:
        batches = self.epoch_batches()
        start = self.position
        for b in batches[start:]:
            yield b

    def __len__(self) -> int:
        """Batches per epoch on this rank (the whole epoch, regardless of the resume position)."""
        return len(self.epoch_batches())

    def remaining(self) -> int:
        """Batches left in the current epoch on this rank."""
        return len(self) - self.position

    def set_epoch(self, epoch: int) -> None:
        """Start ``epoch`` from its first batch."""
        self.epoch = int(epoch)
        self.position = 0

    def advance(self, n: int = 1) -> None:
        """Record that the training loop consumed ``n`` more batches of the current epoch."""
        self.position += n

    def state_dict(self) -> dict:
        return {
            "epoch": self.epoch,
            "position": self.position,
            "seed": self.seed,
            "world_size": self.world_size,
            "num_items": len(self.durations),
        }

    def load_state_dict(self, state: dict) -> None:
        """Continue where a saved run stopped; refuses changes that would silently change the order."""
        for key, mine in (("world_size", self.world_size), ("num_items", len(self.durations)), ("seed", self.seed)):
            if key in state and int(state[key]) != mine:
                raise ValueError(
                    f"cannot resume the sampler: saved {key}={state[key]} but this run has {key}={mine}; "
                    "the batch order would differ (resume with the same data, seed and number of processes)"
                )
        self.epoch = int(state["epoch"])
        self.position = int(state["position"])

    def total_seconds(self, epoch: int | None = None) -> float:
        """Audio seconds (unpadded) in this rank's batches of an epoch."""
        return sum(self.durations[i] for b in self.epoch_batches(epoch) for i, _ in b)
