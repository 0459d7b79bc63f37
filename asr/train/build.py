"""Building a run's parts from its composed Hydra config (``conf/``): manifests, tokenizer, model,
CMVN statistics, data loaders, optimizer and learning-rate schedule. Each function takes the config
section it reads and returns the part; :class:`asr.train.trainer.Trainer` calls them in order.
"""
from __future__ import annotations

import logging
import math
import os
import random
from dataclasses import fields
from pathlib import Path
from typing import Any, Callable, Iterable, Optional

import torch
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader

from asr.data.augment import AugmentConfig
from asr.data.dataset import Batch, ManifestDataset, collate
from asr.data.manifest import ManifestError, read_manifests
from asr.data.resident import FixedShapeSampler, ResidentBatches, ResidentCorpus, ShapeClasses
from asr.data.sampler import BucketingBatchSampler
from asr.model import CTCModel, ModelConfig
from asr.train.checkpoint import atomic_write_bytes
from asr.train.distributed import DistEnv, barrier, broadcast
from asr.train.errors import TrainConfigError

log = logging.getLogger("asr.train")

TOKENIZER_FILE = "tokenizer.model"


def as_list(x: Any) -> list[str]:
    """A config value that may be one path or a list of them, as a list of strings."""
    if x is None:
        return []
    if isinstance(x, (str, os.PathLike)):
        return [str(x)]
    return [str(v) for v in x]


def check_audio_exists(entries: list[dict], what: str) -> None:
    """Fail before training when audio files of a (dev) manifest are missing.

    Why: validation first reads the dev audio at the first ``val_every`` step or at the end of the
    schedule, possibly hours in. Dev sets are small, so checking every file costs nothing; training
    manifests are too large to stat up front."""
    missing = [e["audio"] for e in entries if not os.path.exists(e["audio"])]
    if missing:
        raise ManifestError(f"{what}: {len(missing)} of {len(entries)} audio files are missing (first: {missing[0]}); "
                            f"fix the manifest or train without them ({what}=[])")


def read_data(dc: DictConfig) -> tuple[list[dict], list[dict]]:
    """(training entries, dev entries) of ``data.train_manifests`` / ``data.dev_manifests``; refuses
    empty training manifests and dev entries whose audio is missing."""
    train_entries = read_manifests(as_list(dc.train_manifests))
    dev_entries = read_manifests(as_list(dc.dev_manifests)) if as_list(dc.get("dev_manifests")) else []
    if not train_entries:
        raise ValueError("the training manifests are empty")
    check_audio_exists(dev_entries, "data.dev_manifests")
    return train_entries, dev_entries


def prepare_tokenizer(tcfg: DictConfig, train_entries: list[dict], env: DistEnv):
    """Tokenizer stage: reuse ``<tokenizer.dir>/tokenizer.model`` or train it (rank 0) from the
    training text; ``tcfg``: the ``tokenizer`` config."""
    from asr.tokenizer import Tokenizer

    path = Path(str(tcfg.dir)) / TOKENIZER_FILE
    if not path.is_file() and env.is_main:
        log.info("training a %d-piece BPE tokenizer on %d transcripts -> %s", tcfg.vocab_size, len(train_entries), path)
        tok = Tokenizer.train(
            (e["text"] for e in train_entries), None, int(tcfg.vocab_size),
            max_sentences=int(tcfg.get("max_sentences", 0) or 0),
        )
        atomic_write_bytes(path, lambda f: f.write(tok.to_bytes()))
    barrier()
    tok = Tokenizer(path)
    if tok.vocab_size != int(tcfg.vocab_size):
        log.warning("tokenizer %s has %d pieces (config asks %d): the text is too small for more, or the file "
                    "was made with another size", path, tok.vocab_size, tcfg.vocab_size)
    return tok


def _model_options(model_cfg: DictConfig) -> dict:
    """``model_cfg`` (the ``model`` config) as a dict of ModelConfig fields (and Hydra's ``name``);
    refuses options ModelConfig does not have."""
    model_dict = OmegaConf.to_container(model_cfg, resolve=True)
    assert isinstance(model_dict, dict)
    known = {f.name for f in fields(ModelConfig)}
    unknown = set(model_dict) - known - {"name", "_target_"}
    if unknown:
        raise ValueError(f"unknown model option(s) {sorted(unknown)}; ModelConfig has {sorted(known)}")
    return model_dict


def model_config(model_cfg: DictConfig, vocab_size: int) -> ModelConfig:
    """The :class:`ModelConfig` that ``model_cfg`` (the ``model`` config) describes, with
    ``vocab_size`` classes."""
    return ModelConfig.from_dict({**_model_options(model_cfg), "vocab_size": vocab_size})


def build_model(model_cfg: DictConfig, vocab_size: int, ckpt_config: Optional[dict], seed: int,
                warn: bool = True) -> CTCModel:
    """The CTC model ``model_cfg`` (the ``model`` config) describes, with ``vocab_size`` classes, or
    the one ``ckpt_config`` (a checkpoint's model config) describes, which wins (a warning lists
    the differences when ``warn``). Initial weights come from ``seed``: identical on every rank."""
    model_dict = _model_options(model_cfg)
    if ckpt_config is not None:
        mcfg = ModelConfig.from_dict(ckpt_config)
        known = {f.name for f in fields(ModelConfig)}
        differing = {k: (v, ckpt_config.get(k)) for k, v in model_dict.items()
                     if k in known and k != "vocab_size" and ckpt_config.get(k) != v}
        if differing and warn:
            log.warning("model config differs from the checkpoint's, which wins (config vs checkpoint): %s", differing)
    else:
        mcfg = model_config(model_cfg, vocab_size)
    torch.manual_seed(seed)
    return CTCModel(mcfg)


def compute_cmvn(model: CTCModel, entries: list[dict], dc: DictConfig, seed: int, env: DistEnv) -> None:
    """Global CMVN statistics from a fixed random subset of training utterances (rank 0, broadcast);
    ``dc``: the ``data`` config (``cmvn_utterances``, ``num_workers``)."""
    from asr.features import compute_cmvn_stats

    n = int(dc.get("cmvn_utterances", 500))
    stats = torch.zeros(2, model.cmvn.num_bins, device=env.device)
    if env.is_main:
        idx = sorted(random.Random(seed).sample(range(len(entries)), min(n, len(entries))))
        ds = ManifestDataset([entries[i] for i in idx])
        loader = DataLoader(ds, batch_size=None, num_workers=int(dc.num_workers), generator=torch.Generator())
        mean, std = compute_cmvn_stats(item["features"] for item in loader)
        stats[0], stats[1] = mean.to(env.device), std.to(env.device)
        log.info("CMVN statistics from %d utterances", len(ds))
    if env.world_size > 1:
        broadcast(stats, src=0)
    model.cmvn.set_stats(stats[0].cpu(), stats[1].cpu())


def make_loader(ds: ManifestDataset, sampler: BucketingBatchSampler, dc: DictConfig, seed: int,
                pin: bool) -> DataLoader:
    """A DataLoader of :class:`asr.data.dataset.Batch` over ``sampler``'s batches, with a generator of
    its own (creating an iterator does not consume the global RNG).

    ``pin``: pinned batches. Off with ``trainer.cuda_graphs``: the DataLoader's pinning thread makes
    CUDA calls (pinned allocations) as it runs, and on torch 2.11 make_graphed_callables records in
    "global" mode, where such a call from any thread invalidates the recording."""
    g = torch.Generator()
    g.manual_seed(seed)
    workers = int(dc.num_workers)
    kwargs: dict[str, Any] = {}
    if workers > 0:
        kwargs["prefetch_factor"] = int(dc.get("prefetch_factor", 2))
    return DataLoader(ds, batch_sampler=sampler, collate_fn=collate, num_workers=workers,
                      pin_memory=pin, generator=g, **kwargs)


def build_train_data(entries: list[dict], tokenizer: Any, dc: DictConfig, seed: int, env: DistEnv,
                     pin: bool) -> tuple[Iterable[Batch], Any, Any]:
    """(training batches, their sampler, the SpecAugment settings applied on the device) for ``dc``
    (the ``data`` config): duration filter, augmentation, bucketed batches sharded over the ranks,
    made by DataLoader workers or, with ``data.resident``, on the training device."""
    augment = AugmentConfig.from_dict(OmegaConf.to_container(dc.augment, resolve=True))  # type: ignore[arg-type]
    ds = ManifestDataset(entries, tokenizer, float(dc.min_duration), float(dc.max_duration),
                         augment=augment, dither=float(dc.get("dither", 0.0)),
                         features_on_device=bool(dc.get("features_on_device", False)))
    if dc.get("resident", False):
        return (*build_resident_data(ds, tokenizer, dc, seed, env), augment.spec_augment)
    sampler = BucketingBatchSampler(
        ds.durations, float(dc.max_batch_seconds), int(dc.num_buckets), int(dc.get("max_batch_size", 0) or 0),
        shuffle=True, seed=seed, rank=env.rank, world_size=env.world_size, shard_mode="drop",
    )
    return make_loader(ds, sampler, dc, seed, pin), sampler, augment.spec_augment


def build_resident_data(ds: ManifestDataset, tokenizer: Any, dc: DictConfig, seed: int,
                        env: DistEnv) -> tuple[ResidentBatches, FixedShapeSampler]:
    """``data.resident``: ``ds``'s utterances decoded onto ``env.device``, batches of a few fixed
    shapes made there (:mod:`asr.data.resident`), and their sampler."""
    aug = ds.augment
    if aug.noise.enabled or ds.dither:
        raise TrainConfigError("data.resident makes no noise mixing and no dither: set "
                               "data.augment.noise.enabled=false and data.dither=0")
    factors = [float(f) for f in aug.speed.factors] if aug.speed.enabled else [1.0]
    longest = float(dc.max_duration) if math.isfinite(float(dc.max_duration)) else None
    shapes = ShapeClasses.build(ds.durations, float(dc.max_batch_seconds), int(dc.get("resident_per_octave", 1)),
                                min(factors), int(dc.get("max_batch_size", 0) or 0), longest=longest,
                                fastest=max(factors))
    corpus = ResidentCorpus(ds.entries, tokenizer, shapes, env.device, factors, aug.spec_augment,
                            jobs=max(1, int(dc.num_workers)))
    sampler = FixedShapeSampler(ds.durations, shapes, factors, seed=seed, rank=env.rank, world_size=env.world_size)
    return ResidentBatches(corpus, sampler), sampler


def build_dev_loader(entries: list[dict], tokenizer: Any, dc: DictConfig, seed: int, env: DistEnv,
                     pin: bool) -> Optional[DataLoader]:
    """The dev loader (every utterance, in order, split unevenly over the ranks), or None without
    dev entries."""
    if not entries:
        return None
    ds = ManifestDataset(entries, tokenizer, filter_ctc=False)
    sampler = BucketingBatchSampler(
        ds.durations, float(dc.get("dev_max_batch_seconds") or dc.max_batch_seconds), int(dc.num_buckets),
        shuffle=False, seed=seed, rank=env.rank, world_size=env.world_size, shard_mode="uneven",
    )
    return make_loader(ds, sampler, dc, seed, pin)


# ---------------------------------------------------------------------- optimizer and schedule
def lr_factor(step: int, warmup_steps: int, max_steps: int, schedule: str, min_lr_ratio: float) -> float:
    """Multiplier of the base learning rate for optimizer step ``step`` (0-based).

    Linear warm-up from 1/warmup to 1 over ``warmup_steps``, then ``cosine`` or ``linear`` decay to
    ``min_lr_ratio`` at ``max_steps``, or ``constant``.
    """
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup_steps) / max(1, max_steps - warmup_steps))
    if schedule == "cosine":
        return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))
    if schedule == "linear":
        return min_lr_ratio + (1.0 - min_lr_ratio) * (1.0 - progress)
    raise ValueError(f"optim.schedule must be cosine, linear or constant, got {schedule!r}")


def build_optimizer(model: CTCModel, oc: DictConfig) -> torch.optim.AdamW:
    """AdamW over ``model.param_groups`` for ``oc`` (the ``optim`` config). Fused (CPU and CUDA): one
    kernel for all parameters, and it honours ``found_inf`` (the loop's skip of non-finite steps)."""
    return torch.optim.AdamW(
        model.param_groups(float(oc.weight_decay), float(oc.lr)), lr=float(oc.lr),
        betas=tuple(float(b) for b in oc.betas), eps=float(oc.eps), fused=True,
    )


def build_scheduler(optimizer: torch.optim.Optimizer, oc: DictConfig,
                    max_steps: Callable[[], int]) -> torch.optim.lr_scheduler.LambdaLR:
    """The :func:`lr_factor` schedule of ``oc``; ``max_steps()`` is read at every step, so fitting
    the run to a time budget moves the end of the schedule too."""
    warmup, schedule, min_ratio = int(oc.warmup_steps), str(oc.schedule), float(oc.min_lr_ratio)
    lr_factor(0, warmup, max_steps(), schedule, min_ratio)  # validate the schedule name early
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, warmup, max_steps(), schedule, min_ratio)
    )
