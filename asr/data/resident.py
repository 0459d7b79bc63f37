"""A training corpus held on the training device as int16 samples, served in a few fixed batch shapes.

Why: a compiled training step on one GPU consumes 20,000 audio-seconds per second and more. The
DataLoader workers, which decode Ogg/Opus and compute fbank per utterance, give a few thousand on
16 cores, and a compiled step with CUDA graphs needs the same few tensor shapes again and again.
Here the corpus is decoded once, by a process pool at start, into one int16 tensor on the device
(one hour is 115 MB). A batch is then a gather of its rows, speed perturbation by resampling, fbank
and SpecAugment of the whole batch: a few dozen kernels, no Python per utterance, no workers.

Fixed shapes (:class:`ShapeClasses`): the longest utterance after the slowest speed factor sets
the top length L_0; class k holds utterances of stretched length (after the speed factor drawn
for them this epoch) in (L_{k+1}, L_k] with
``L_k = L_0 * 2 ** (-k / per_octave)``, and every batch of class k has exactly ``rows_k =
batch_seconds // L_k`` rows of ``frames_k`` feature frames. A class's last batch of an epoch is
filled with empty rows (length 0, no target), which cost exactly 0 in the CTC loss. With
``per_octave=1`` padding wastes at most half a row and about a quarter on average; 2 halves that at
twice the shapes.

Randomness: the sampler draws each utterance's speed factor once per epoch, on the host, before it
sorts utterances into classes (so a sped-up utterance can go to a shorter class: on a 22.8 h
corpus of real speech and TTS that fills 68 % of the padded batch instead of 59 %, at the same shapes); SpecAugment masks
come on the device from a generator seeded per batch. All follow from (seed, epoch, batch number),
so a resumed run makes the same batches. The masks follow :class:`asr.data.augment.SpecAugment`'s distribution (widths
uniform below the bound, starts uniform where the mask fits), not its exact draws.
"""
from __future__ import annotations

import logging
import math
import random
from dataclasses import dataclass
from multiprocessing import get_context
from typing import Iterator, NamedTuple, Optional, Sequence

import numpy as np
import torch
import torchaudio.transforms as T
from torch import Tensor

from asr.data.augment import SpecAugmentConfig
from asr.data.dataset import Batch
from asr.data.device_features import fill_masked
from asr.data.sampler import sample_seed
from asr.features import NUM_MEL_BINS
from asr.frames import FEATURE_HOP, FEATURE_WINDOW, SAMPLE_RATE, feature_frames_for_samples

log = logging.getLogger(__name__)

#: a row of a batch that holds no utterance
EMPTY = -1


def _decode_int16(path: str) -> np.ndarray:
    """One file as 16 kHz mono int16 samples: libsndfile's own int16 output where the file is
    16 kHz mono already (3x faster than decoding to float), else :func:`asr.audio.load_audio`."""
    import soundfile as sf

    data, rate = sf.read(path, dtype="int16", always_2d=True)
    if rate == SAMPLE_RATE and data.shape[1] == 1:
        return data[:, 0]
    from asr.audio import load_audio

    wave = load_audio(path).numpy()
    return np.clip(np.round(wave * 32768.0), -32768, 32767).astype(np.int16)


def decode_corpus(paths: Sequence[str], jobs: int = 1) -> tuple[Tensor, list[int], list[int]]:
    """Every file of ``paths`` decoded (16 kHz mono, :func:`asr.audio.load_audio`) into one int16
    tensor ``[N]``, with each file's offset and sample count in it. ``jobs`` processes decode."""
    if jobs > 1 and len(paths) > 1:
        with get_context("spawn").Pool(jobs) as pool:
            waves = pool.map(_decode_int16, paths, chunksize=max(1, min(64, len(paths) // (4 * jobs))))
    else:
        waves = [_decode_int16(p) for p in paths]
    lengths = [len(w) for w in waves]
    offsets = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64).tolist() if waves else []
    flat = torch.from_numpy(np.concatenate(waves)) if waves else torch.zeros(0, dtype=torch.int16)
    return flat, offsets, lengths


@dataclass(frozen=True)
class ShapeClasses:
    """The batch shapes: class k has ``rows[k]`` rows of at most ``samples_in[k]`` samples as read
    (before speed perturbation: the class length at the fastest factor) and ``samples[k]`` samples /
    ``frames[k]`` fbank frames after it."""

    seconds: tuple[float, ...]  # L_k: the longest stretched utterance of the class
    rows: tuple[int, ...]
    samples_in: tuple[int, ...]
    samples: tuple[int, ...]
    frames: tuple[int, ...]
    slowest: float

    @classmethod
    def build(cls, durations: Sequence[float], batch_seconds: float, per_octave: int = 1,
              slowest: float = 1.0, max_rows: int = 0, longest: Optional[float] = None,
              fastest: float = 1.0) -> "ShapeClasses":
        """Classes covering ``durations`` (seconds, as read) once stretched by ``1 / slowest``.
        ``longest``: the top class's length as read (default the longest duration); fixing it (the
        trainer passes ``data.max_duration``) makes the shapes the same for every corpus, so that
        compiled graphs and their cache serve any of them. ``fastest``: the fastest speed factor (an
        utterance played faster fits a class of its stretched length, so it is read longer)."""
        if not durations:
            raise ValueError("no utterances to build batch shapes for")
        if per_octave < 1:
            raise ValueError(f"data.resident_per_octave must be >= 1, got {per_octave}")
        top = (max(durations) if longest is None else max(longest, max(durations))) / slowest
        bottom = min(durations) / slowest
        seconds = [top]
        while seconds[-1] * 2 ** (-1 / per_octave) >= bottom and len(seconds) < 64:
            seconds.append(top * 2 ** (-len(seconds) / per_octave))
        rows, samples_in, samples, frames = [], [], [], []
        for length in seconds:
            r = max(1, int(batch_seconds // length))
            rows.append(min(r, max_rows) if max_rows else r)
            # frames a multiple of 4 (the x4 subsampling), samples exactly those frames' span
            need = math.ceil(length * SAMPLE_RATE)
            t = 4 * math.ceil((1 + max(0, math.ceil((need - FEATURE_WINDOW) / FEATURE_HOP))) / 4)
            samples.append(FEATURE_WINDOW + FEATURE_HOP * (t - 1))
            frames.append(t)
            samples_in.append(math.ceil(length * max(slowest, fastest) * SAMPLE_RATE))
        return cls(tuple(seconds), tuple(rows), tuple(samples_in), tuple(samples), tuple(frames), slowest)

    def __len__(self) -> int:
        return len(self.seconds)

    def of(self, duration: float, factor: Optional[float] = None) -> int:
        """The class of an utterance of ``duration`` seconds (as read) played ``factor`` times faster
        (default: the slowest factor): the shortest class that holds it."""
        stretched = duration / (self.slowest if factor is None else max(factor, self.slowest))
        k = 0
        while k + 1 < len(self.seconds) and stretched <= self.seconds[k + 1]:
            k += 1
        return k

    def describe(self) -> str:
        return ", ".join(f"{r} x {s:.2f} s" for r, s in zip(self.rows, self.seconds))


def check_factors(factors: Sequence[float], shapes: ShapeClasses) -> None:
    """Refuse speed factors the shapes were not built for (``slowest``, ``fastest``)."""
    if min(factors) < shapes.slowest - 1e-9:
        raise ValueError(f"speed factor {min(factors)} is slower than the shapes allow ({shapes.slowest})")
    longest_read = shapes.seconds[0] * max(factors) * SAMPLE_RATE
    if longest_read > shapes.samples_in[0] + 1:
        raise ValueError(f"speed factor {max(factors)} is faster than the shapes allow (build them with fastest=)")


class PlannedBatch(NamedTuple):
    """One batch as the sampler plans it: shape class ``k``, ``rows[k]`` corpus indices (EMPTY for
    an empty row), each row's speed factor, and the seed of the batch's SpecAugment draws."""

    k: int
    indices: list[int]
    factors: list[float]
    seed: int


class FixedShapeSampler:
    """:class:`PlannedBatch` es for an epoch, with the position bookkeeping of
    :class:`asr.data.sampler.BucketingBatchSampler` (``advance`` per consumed batch,
    ``state_dict`` / ``load_state_dict`` for an exact resume).

    ``durations``: each utterance's length as read; ``speed_factors``: drawn uniformly per
    utterance and epoch (the shapes must be built with ``slowest=min(speed_factors)``).

    DDP: batches come in groups of ``world_size`` of one class, and rank r takes the r-th of each
    group, so all ranks run the same shape at every step; a class's incomplete last group is
    dropped (those utterances come back in a later epoch's shuffle)."""

    def __init__(self, durations: Sequence[float], shapes: ShapeClasses, speed_factors: Sequence[float] = (1.0,),
                 seed: int = 0, rank: int = 0, world_size: int = 1) -> None:
        self.durations = [float(d) for d in durations]
        self.speed_factors = [float(f) for f in speed_factors] or [1.0]
        check_factors(self.speed_factors, shapes)
        self.shapes = shapes
        self.seed, self.rank, self.world_size = int(seed), int(rank), int(world_size)
        self.epoch = 0
        self.position = 0
        self._cache: Optional[tuple[int, list]] = None

    def epoch_factors(self, epoch: int) -> list[float]:
        """Each utterance's speed factor in ``epoch``."""
        if len(self.speed_factors) == 1:
            return [self.speed_factors[0]] * len(self.durations)
        rng = random.Random(sample_seed(self.seed, epoch, -3))
        return [rng.choice(self.speed_factors) for _ in self.durations]

    def _global_batches(self, epoch: int, factors: list[float]) -> list[tuple[int, list[int]]]:
        rng = random.Random(sample_seed(self.seed, epoch, -2))
        members: list[list[int]] = [[] for _ in range(len(self.shapes))]
        for i, (d, f) in enumerate(zip(self.durations, factors)):
            members[self.shapes.of(d, f)].append(i)
        groups: list[list[tuple[int, list[int]]]] = []
        for k, idx in enumerate(members):
            rng.shuffle(idx)
            rows = self.shapes.rows[k]
            batches = [idx[s:s + rows] for s in range(0, len(idx), rows)]
            batches = [b + [EMPTY] * (rows - len(b)) for b in batches]
            W = self.world_size
            groups += [[(k, b) for b in batches[g:g + W]] for g in range(0, len(batches) - W + 1, W)]
        rng.shuffle(groups)
        return [b for g in groups for b in g]

    def epoch_batches(self, epoch: Optional[int] = None) -> list[PlannedBatch]:
        """This rank's batches of an epoch (default: the current one)."""
        epoch = self.epoch if epoch is None else epoch
        if self._cache is None or self._cache[0] != epoch:
            factors = self.epoch_factors(epoch)
            every = self._global_batches(epoch, factors)
            mine = [PlannedBatch(k, b, [factors[i] if i != EMPTY else 1.0 for i in b], sample_seed(self.seed, epoch, n))
                    for n, (k, b) in enumerate(every)][self.rank::self.world_size]
            self._cache = (epoch, mine)
        return self._cache[1]

    def __iter__(self) -> Iterator[PlannedBatch]:
        yield from self.epoch_batches()[self.position:]

    def __len__(self) -> int:
        return len(self.epoch_batches())

    def remaining(self) -> int:
        return len(self) - self.position

    def set_epoch(self, epoch: int) -> None:
        self.epoch, self.position = int(epoch), 0

    def advance(self, n: int = 1) -> None:
        self.position += n

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed,
                "world_size": self.world_size, "num_items": len(self.durations), "shapes": len(self.shapes)}

    def load_state_dict(self, state: dict) -> None:
        mine = {"world_size": self.world_size, "num_items": len(self.durations), "seed": self.seed,
                "shapes": len(self.shapes)}
        for key, value in mine.items():
            if key in state and int(state[key]) != value:
                raise ValueError(f"cannot resume the sampler: saved {key}={state[key]} but this run has {key}={value}; "
                                 "the batch order would differ (resume with the same data, seed and processes)")
        self.epoch, self.position = int(state["epoch"]), int(state["position"])


class DeviceFbank:
    """:func:`asr.features.compute_fbank` of every row of a padded batch ``[R, S]``, computed from
    the frames of each row with tensors that stay on the batch's device.

    Why not ``kaldi.fbank`` (which :func:`~asr.features.compute_fbank` calls): it copies its mel
    matrix and its log floor from host memory on every call, and a blocking host-to-device copy
    waits for everything queued on the GPU, so the training loop could not prepare the next batch
    while the GPU runs the current step. This is the same arithmetic for our settings (25 ms Povey
    window, 10 ms shift, DC removed, pre-emphasis 0.97, 512-point power spectrum, 80 mel bins from
    20 Hz, log floored at float32 epsilon, no dither, snip edges), with the mel matrix and window made
    once per device; the tests hold it to ``compute_fbank``."""

    def __init__(self) -> None:
        self._cache: dict[torch.device, tuple[Tensor, Tensor]] = {}

    def _constants(self, device: torch.device) -> tuple[Tensor, Tensor]:
        if device not in self._cache:
            from torchaudio.compliance.kaldi import get_mel_banks

            mel, _ = get_mel_banks(NUM_MEL_BINS, 512, float(SAMPLE_RATE), 20.0, 0.0, 100.0, -500.0, 1.0)
            mel = torch.nn.functional.pad(mel, (0, 1)).T.contiguous()  # [257, 80]: no weight on Nyquist
            window = torch.hann_window(FEATURE_WINDOW, periodic=False, dtype=torch.float64).pow(0.85).float()
            self._cache[device] = (mel.to(device), window.to(device))
        return self._cache[device]

    def __call__(self, waves: Tensor, frame_counts: Tensor) -> Tensor:
        """Log-mel ``[R, T, 80]`` of ``waves [R, S]`` (float in [-1, 1]); frames at or past a row's
        ``frame_counts [R]`` (on the waves' device) are zero. T = feature_frames_for_samples(S)."""
        mel, window = self._constants(waves.device)
        frames = (waves * 32768.0).unfold(1, FEATURE_WINDOW, FEATURE_HOP)  # [R, T, 400]
        frames = frames - frames.mean(dim=-1, keepdim=True)
        previous = torch.cat([frames[..., :1], frames[..., :-1]], dim=-1)
        frames = (frames - 0.97 * previous) * window
        power = torch.fft.rfft(frames, n=512).abs().pow(2)  # [R, T, 257]
        feats = (power @ mel).clamp(min=torch.finfo(torch.float32).eps).log()
        valid = torch.arange(feats.shape[1], device=waves.device)[None, :] < frame_counts[:, None]
        return torch.where(valid[:, :, None], feats, 0.0)


def _speed_ratio(factor: float) -> tuple[int, int]:
    """(source, target) rates of :func:`torchaudio.functional.speed` for ``factor``, reduced."""
    source, target = int(factor * SAMPLE_RATE), SAMPLE_RATE
    g = math.gcd(source, target)
    return source // g, target // g


def spec_augment_batch(feats: Tensor, lengths: Tensor, cfg: SpecAugmentConfig, generator: torch.Generator) -> Tensor:
    """SpecAugment of padded features ``[B, T, F]`` with valid ``lengths [B]`` (on their device):
    ``cfg.freq_masks`` frequency and ``cfg.time_masks`` time masks per row, each of a width uniform
    below its bound (time: ``min(time_width, time_width_ratio * length)``) at a start uniform where
    it fits, filled with the row's mean over its valid frames. Rows of length 0 stay zero."""
    B, T, F = feats.shape
    dev = feats.device
    lengths = lengths.to(dev, non_blocking=True)
    masked = torch.zeros(B, T, F, dtype=torch.bool, device=dev)

    def spans(count: int, bound: Tensor, size: Tensor) -> tuple[Tensor, Tensor]:  # [B, count] each
        width = (torch.rand(B, count, device=dev, generator=generator) * bound[:, None]).long()
        start = (torch.rand(B, count, device=dev, generator=generator) * (size[:, None] - width)).long().clamp(min=0)
        return start, start + width

    if cfg.freq_masks and cfg.freq_width > 0:
        lo, hi = spans(cfg.freq_masks, torch.full((B,), float(cfg.freq_width), device=dev),
                       torch.full((B,), float(F), device=dev))
        f = torch.arange(F, device=dev)[None, None, :]
        masked |= ((f >= lo[:, :, None]) & (f < hi[:, :, None])).any(1)[:, None, :]
    if cfg.time_masks:
        lens = lengths.float()
        bound = torch.minimum(torch.full_like(lens, float(cfg.time_width)), (cfg.time_width_ratio * lens).floor())
        lo, hi = spans(cfg.time_masks, bound, lens)
        t = torch.arange(T, device=dev)[None, None, :]
        masked |= ((t >= lo[:, :, None]) & (t < hi[:, :, None])).any(1)[:, :, None]
    return fill_masked(feats, lengths, masked)


def _to_device(t: Tensor, device: torch.device) -> Tensor:
    """``t`` on ``device`` without waiting for the work queued there: a blocking host-to-device copy
    (``torch.tensor(..., device=...)``, indexing with a list) first waits for the GPU to finish."""
    return t.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else t


class ResidentCorpus:
    """Utterances decoded onto ``device`` once; :meth:`batch` makes a :class:`~asr.data.dataset.Batch`
    of one fixed shape from a :class:`FixedShapeSampler` batch, with its features on the device.

    Args:
        entries: manifest entries (absolute audio paths), already filtered for duration and CTC
            feasibility (e.g. ``ManifestDataset(...).entries``).
        tokenizer: ``encode(text) -> list[int]``.
        shapes: the batch shapes, from :meth:`ShapeClasses.build` over these entries' durations.
        speed_factors: speed perturbation factors drawn uniformly per utterance (``[1.0]``: none);
            ``shapes`` must be built with ``slowest=min(speed_factors)``.
        spec_augment: SpecAugment of the padded batch, or None.
        jobs: processes decoding the audio at start.
    """

    def __init__(self, entries: Sequence[dict], tokenizer, shapes: ShapeClasses, device: torch.device | str,
                 speed_factors: Sequence[float] = (1.0,), spec_augment: Optional[SpecAugmentConfig] = None,
                 jobs: int = 1) -> None:
        self.entries = list(entries)
        self.shapes = shapes
        self.device = torch.device(device)
        self.speed_factors = [float(f) for f in speed_factors] or [1.0]
        check_factors(self.speed_factors, shapes)
        self.spec_augment = spec_augment if spec_augment is not None and spec_augment.enabled else None
        self.fbank = DeviceFbank()
        self._resamplers: dict[tuple[int, int], torch.nn.Module] = {}
        # A file listed several times (a part weighted up by repeating its entries) is decoded and
        # held once; its entries share its samples.
        paths = list(dict.fromkeys(e["audio"] for e in self.entries))
        flat, file_offsets, file_lengths = decode_corpus(paths, jobs)
        where = {path: i for i, path in enumerate(paths)}
        offsets = [file_offsets[where[e["audio"]]] for e in self.entries]
        lengths = [file_lengths[where[e["audio"]]] for e in self.entries]
        self.audio = flat.to(self.device)  # [N] int16, every file end to end
        self.offsets = torch.tensor(offsets + [0], dtype=torch.long, device=self.device)  # [U + 1]: + an empty row's
        self.lengths = lengths + [0]  # samples as decoded; index EMPTY (-1) is the empty row
        tokens = [tokenizer.encode(e["text"]) for e in self.entries]
        self.token_counts = [len(t) for t in tokens] + [0]
        token_offsets = np.concatenate([[0], np.cumsum(self.token_counts[:-1])]).astype(np.int64)
        self.token_offsets = torch.from_numpy(token_offsets).to(self.device)  # [U + 1]
        flat_tokens = [tok for t in tokens for tok in t] + [0]
        self.tokens = torch.tensor(flat_tokens, dtype=torch.long, device=self.device)
        self.max_tokens = [1] * len(shapes)  # per class, over every speed factor that can put an utterance there
        for e, n in zip(self.entries, self.token_counts):
            for f in self.speed_factors:
                k = shapes.of(e["duration"], f)
                self.max_tokens[k] = max(self.max_tokens[k], n)
        log.info("resident corpus: %d utterances (%d files), %.2f h, %.0f MB on %s; %d batch shapes: %s",
                 len(self.entries), len(paths), sum(lengths) / SAMPLE_RATE / 3600, self.audio.numel() * 2 / 1e6,
                 self.device, len(shapes), shapes.describe())

    def _gather(self, flat: Tensor, offsets: Tensor, rows: list[int], counts: list[int], width: int) -> Tensor:
        """Rows ``[len(rows), width]`` of ``flat``: row r is ``counts[r]`` items from ``offsets[rows[r]]``, then 0."""
        dev = self.device
        rows_t = _to_device(torch.tensor(rows, dtype=torch.long), dev)
        counts_t = _to_device(torch.tensor(counts, dtype=torch.long), dev)
        pos = torch.arange(width, device=dev)[None, :]
        index = (offsets[rows_t][:, None] + pos).clamp(max=max(0, flat.numel() - 1))
        return torch.where(pos < counts_t[:, None], flat[index], torch.zeros((), dtype=flat.dtype, device=dev))

    def batch(self, planned: PlannedBatch) -> Batch:
        """The batch of class ``planned.k`` holding ``planned.indices`` (EMPTY for an empty row), each
        row played ``planned.factors`` times faster, SpecAugment drawn with ``planned.seed``:
        features ``[rows_k, frames_k, 80]`` on the device. Each row must fit class ``k`` at its
        factor, as :class:`FixedShapeSampler` plans them (no check here: it would cost Python per row)."""
        sh, k, indices, factors, seed = self.shapes, planned.k, planned.indices, planned.factors, planned.seed
        rows = [i if i != EMPTY else len(self.entries) for i in indices]
        read = [min(self.lengths[r], sh.samples_in[k]) for r in rows]
        waves = self._gather(self.audio, self.offsets, rows, read, sh.samples_in[k]).float() / 32768.0
        waves, lengths = self._perturb(waves, read, factors, sh.samples[k])
        frame_counts = torch.tensor([feature_frames_for_samples(n) for n in lengths], dtype=torch.long)
        counts_dev = _to_device(frame_counts, self.device)
        feats = self.fbank(waves, counts_dev)  # [R, frames_k, 80]
        if self.spec_augment is not None:
            gen = torch.Generator(device=self.device).manual_seed(seed)
            feats = spec_augment_batch(feats, counts_dev, self.spec_augment, gen)
        counts = [self.token_counts[r] for r in rows]
        targets = self._gather(self.tokens, self.token_offsets, rows, counts, self.max_tokens[k])
        real = [i for i in indices if i != EMPTY]
        return Batch(
            ids=[self.entries[i]["id"] for i in real], texts=[self.entries[i]["text"] for i in real],
            features=feats, feature_lengths=frame_counts, targets=targets,
            target_lengths=torch.tensor(counts, dtype=torch.long),
            durations=[self.entries[i]["duration"] for i in real],
        )

    def _resampler(self, source: int, target: int) -> torch.nn.Module:
        """torchaudio's ``Resample(source, target)`` on the corpus device, its sinc kernel made once
        (``torchaudio.functional.resample`` builds it again on every call, a few dozen kernels)."""
        key = (source, target)
        if key not in self._resamplers:
            self._resamplers[key] = T.Resample(source, target).to(self.device)
        return self._resamplers[key]

    def _perturb(self, waves: Tensor, lengths: list[int], factors: list[float], width: int) -> tuple[Tensor, list[int]]:
        """Rows of ``waves`` played ``factors`` times faster (:func:`torchaudio.functional.speed`'s
        resampling), in a ``[R, width]`` batch, and their new lengths."""
        out = torch.zeros(waves.shape[0], width, device=waves.device)
        new_lengths = list(lengths)
        for f in sorted(set(factors)):
            picked = [r for r, g in enumerate(factors) if g == f]
            rows = _to_device(torch.tensor(picked, dtype=torch.long), waves.device)
            part = waves.index_select(0, rows)
            if f != 1.0:
                source, target = _speed_ratio(f)
                part = self._resampler(source, target)(part)
                for r in picked:
                    new_lengths[r] = min(width, math.ceil(lengths[r] * target / source))
            n = min(width, part.shape[1])
            out[:, :n].index_copy_(0, rows, part[:, :n])
        return out, new_lengths


class ResidentBatches:
    """The training loop's iterable of batches (what a DataLoader is to the workers' pipeline):
    each batch of ``sampler``'s current epoch, from its position on, made by ``corpus``."""

    def __init__(self, corpus: ResidentCorpus, sampler: FixedShapeSampler) -> None:
        self.corpus, self.sampler = corpus, sampler

    def __iter__(self) -> Iterator[Batch]:
        for planned in self.sampler:
            yield self.corpus.batch(planned)

    def __len__(self) -> int:
        return self.sampler.remaining()
