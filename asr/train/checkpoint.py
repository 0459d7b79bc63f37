"""Training checkpoints: atomic writes, retention (last K plus best by dev WER), RNG state for resume.

Atomicity: a checkpoint is written to a temporary file in the same folder, flushed and fsync'ed,
then ``os.replace``d onto its final name (atomic on POSIX within one file system) and the folder is
fsync'ed. A process killed at any moment therefore leaves either the previous set of checkpoints
or the previous set plus the complete new one, never a truncated ``ckpt-*.pt``; a leftover
temporary file is deleted the next time a :class:`CheckpointManager` opens the folder.

Contents: the model file's entries (``config``, ``model``, ``tokenizer``: :mod:`asr.model_file`,
which reads checkpoints for inference and resume) plus optimizer, scheduler, sampler, rng (one
entry per rank), step, epoch, best_wer, skipped_steps and train_config (the resolved Hydra config
as YAML text); every value is a type ``torch.load(weights_only=True)`` accepts.
"""
from __future__ import annotations

import json
import logging
import os
import random
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from asr.model_file import INDEX_NAME, CheckpointError, CheckpointFolder

log = logging.getLogger(__name__)


def _fsync_dir(directory: Path) -> None:
    """Persist a rename: without it, a power loss can forget the new directory entry."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_bytes(path: str | os.PathLike, write: Any) -> None:
    """Call ``write(fileobj)`` on a temporary file beside ``path``, then atomically rename it to ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    _fsync_dir(path.parent)


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save`` that never leaves a partial file under ``path``."""
    atomic_write_bytes(path, lambda f: torch.save(obj, f))


class CheckpointManager(CheckpointFolder):
    """A folder of ``ckpt-step<N>.pt`` files plus ``checkpoints.json`` (dev WER per checkpoint), written.

    ``keep_last`` newest checkpoints and the ``keep_best`` ones with the lowest dev WER are kept;
    others are deleted after each save. Only rank 0 should create a manager that writes;
    ``writable=False`` gives a read-only view (it neither creates the folder nor deletes the
    temporary files of a run that may still be writing).
    """

    def __init__(
        self, directory: str | os.PathLike, keep_last: int = 3, keep_best: int = 1, writable: bool = True
    ) -> None:
        super().__init__(directory)
        self.keep_last = max(1, int(keep_last))
        self.keep_best = max(0, int(keep_best))
        self.writable = writable
        if writable:
            self.dir.mkdir(parents=True, exist_ok=True)
            self._remove_temporaries()

    def _remove_temporaries(self) -> None:
        for p in self.dir.glob(".*.tmp"):
            log.warning("removing incomplete checkpoint write %s (a previous run was interrupted)", p)
            p.unlink(missing_ok=True)

    def _write_index(self, index: dict[str, float | None]) -> None:
        data = json.dumps({"wer": index}, indent=1, sort_keys=True).encode()
        atomic_write_bytes(self.dir / INDEX_NAME, lambda f: f.write(data))

    # ------------------------------------------------------------------ writing
    def save(self, state: dict, step: int, wer: float | None = None) -> Path:
        """Write ``state`` as the checkpoint of ``step`` (atomically), record its WER, prune old ones."""
        if not self.writable:
            raise CheckpointError(f"read-only view of {self.dir}")
        path = self.dir / f"ckpt-step{step:09d}.pt"
        atomic_torch_save(state, path)
        index = self.read_index()
        index[path.name] = None if wer is None else float(wer)
        self._prune(index)
        return path

    def _prune(self, index: dict[str, float | None]) -> None:
        ckpts = self.checkpoints()
        keep = {p.name for _, p in ckpts[-self.keep_last :]}
        scored = sorted(
            ((index[p.name], -step, p.name) for step, p in ckpts if index.get(p.name) is not None),
        )
        keep |= {name for _, _, name in scored[: self.keep_best]}
        for _, p in ckpts:
            if p.name not in keep:
                p.unlink(missing_ok=True)
        self._write_index({k: v for k, v in index.items() if k in keep})


# ---------------------------------------------------------------------- RNG state
def capture_rng_state() -> dict:
    """Python, numpy, torch CPU and CUDA generator states, in weights_only-loadable types."""
    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": {
            "keys": torch.from_numpy(np.asarray(np_state[1], dtype=np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached_gaussian": float(np_state[4]),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict) -> None:
    """Inverse of :func:`capture_rng_state`."""
    random.setstate(_as_tuple(state["python"]))
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        cuda_states = state["cuda"]
        if len(cuda_states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda_states)
        else:
            log.warning("checkpoint has %d CUDA RNG states, this machine %d GPUs: CUDA RNG not restored",
                        len(cuda_states), torch.cuda.device_count())


def _as_tuple(x: Any) -> Any:
    """random.setstate needs tuples; a round trip through some serialisers yields lists."""
    if isinstance(x, (list, tuple)):
        return tuple(_as_tuple(v) for v in x)
    return x
