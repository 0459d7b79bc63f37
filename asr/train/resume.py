"""Resuming a run: which checkpoint ``trainer.resume`` names, and what a checkpoint holds so a resumed
run continues exactly (retention of checkpoints is :class:`asr.train.checkpoint.CheckpointManager`).

**Exact resume.** A checkpoint holds the model, optimizer, scheduler, sampler position and the RNG
states of every rank; the data pipeline draws its randomness from per-sample seeds
(:mod:`asr.data.sampler`), and the DataLoader gets its own generator so creating an iterator does
not consume the global RNG. On CPU a resumed run ends bit-identical to an uninterrupted one.
"""
from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import Any, Optional

import torch

from asr.model_file import CheckpointError
from asr.train.checkpoint import CheckpointManager, restore_rng_state

log = logging.getLogger("asr.train")


def find_resume(setting: Any, ckpt_dir: Path) -> Optional[Path]:
    """The checkpoint ``trainer.resume`` (``setting``) names, or None to start afresh.

    ``auto``: the newest checkpoint in this run's ``ckpt_dir``, if any; a file: that file; a folder:
    the newest checkpoint in it (or in its ``checkpoints`` sub-folder); none/false/null: None.
    Raises :class:`CheckpointError` for a path that holds no checkpoint."""
    r = setting
    if r is None or r is False or str(r).lower() in ("", "none", "null", "never", "false"):
        return None
    if str(r) == "auto":
        return CheckpointManager(ckpt_dir, writable=False).latest()
    p = Path(str(r))
    if p.is_file():
        return p
    if p.is_dir():
        folder = p / "checkpoints" if (p / "checkpoints").is_dir() else p
        latest = CheckpointManager(folder, writable=False).latest()
        if latest is None:
            raise CheckpointError(f"trainer.resume={r}: no checkpoint in {folder}")
        return latest
    raise CheckpointError(f"trainer.resume={r}: no such file or folder")


def restore_training_state(ckpt: dict, optimizer: torch.optim.Optimizer, scheduler: Any, sampler: Any,
                           rank: int, world_size: int) -> None:
    """Load a checkpoint's optimizer, scheduler, sampler position and this rank's RNG state (the
    RNG states only when the checkpoint has one per rank of this run)."""
    optimizer.load_state_dict(ckpt["optimizer"])
    for group in optimizer.param_groups:  # checkpoints from before the fused optimizer
        group["fused"], group["foreach"] = True, None
    scheduler.load_state_dict(ckpt["scheduler"])
    sampler.load_state_dict(ckpt["sampler"])
    rng = ckpt["rng"]
    if len(rng) == world_size:
        restore_rng_state(rng[rank])
    else:
        log.warning("checkpoint has RNG states of %d ranks, this run has %d: RNG streams not restored",
                    len(rng), world_size)


def state_digest(model: torch.nn.Module) -> str:
    """sha256 over the exact bytes of every state_dict tensor: equal digests mean equal weights."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()
