"""Checkpoints: atomic writes, retention (last K plus best by dev WER), loading for resume and inference.

Atomicity: a checkpoint is written to a temporary file in the same folder, flushed and fsync'ed,
then ``os.replace``d onto its final name (atomic on POSIX within one file system) and the folder is
fsync'ed. A process killed at any moment therefore leaves either the previous set of checkpoints
or the previous set plus the complete new one, never a truncated ``ckpt-*.pt``; a leftover
temporary file is deleted the next time a :class:`CheckpointManager` opens the folder.

Contents (every value is a type ``torch.load(weights_only=True)`` accepts, so loading a checkpoint
never executes pickled code)::

    config      model config dict (ModelConfig.to_dict())
    model       state_dict, CMVN statistics included (buffers of model.cmvn)
    tokenizer   sentencepiece model bytes (Tokenizer.to_bytes())
    optimizer, scheduler, sampler, rng (one entry per rank), step, epoch, best_wer, skipped_steps,
    train_config (the resolved Hydra config as YAML text)

Only ``config``, ``model`` and ``tokenizer`` are needed for inference. An exported model
(``tools/export_model.py --int8-weights``) may hold its large matrices in ``model_int8`` instead of
``model`` (int8 values and a float32 scale per output row); :func:`load_checkpoint` turns them back
into float32 entries of ``model``, so every reader sees an ordinary state_dict. It may also carry
its word language model (``lm``: :mod:`asr.decode.packed_lm`'s packed form, ``--lm``; older files
``lm_arpa_xz``, the bytes of an xz-compressed ARPA file), which it then decodes with by default, as
the bundled model does.
"""
from __future__ import annotations

import json
import logging
import os
import random
import re
import tempfile
import zipfile
from pathlib import Path
from typing import Any, NamedTuple, Optional

import numpy as np
import torch

log = logging.getLogger(__name__)

CKPT_RE = re.compile(r"^ckpt-step(\d+)\.pt$")
INDEX_NAME = "checkpoints.json"


class CheckpointError(RuntimeError):
    """A checkpoint is missing, unreadable or lacks what the caller needs; the message says which."""


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


#: Float weights with at least this many elements (and two or more dimensions) are stored in int8
#: by ``quantize_weights_int8``: the block and front-end matrices, ~93 % of the bundled model's
#: parameters. The small ones (LoRA, mixing coefficients, norms) stay float16: they are cheap, and
#: the decay LoRA feeds an exponential.
INT8_MIN_NUMEL = 65536


def quantize_weights_int8(state: dict[str, torch.Tensor], min_numel: int = INT8_MIN_NUMEL
                          ) -> tuple[dict[str, torch.Tensor], dict[str, dict[str, torch.Tensor]]]:
    """Split a state_dict into (the rest, int8 matrices) for a smaller model file.

    Why: the bundled model must stay under 25 MB with its language model beside it. Each large
    matrix is stored as symmetric int8 per output row (row = first dimension) with a float32 scale,
    max |w| / 127 of the row: the rounding error is at most half a step, 0.4 % of the row's largest
    weight. ``restore_int8_weights`` inverts it (up to that rounding)."""
    rest: dict[str, torch.Tensor] = {}
    packed: dict[str, dict[str, torch.Tensor]] = {}
    for name, t in state.items():
        if t.is_floating_point() and t.dim() >= 2 and t.numel() >= min_numel and not name.startswith("cmvn."):
            rows = t.detach().float().reshape(t.shape[0], -1)
            scale = rows.abs().amax(dim=1).clamp_min(1e-12) / 127.0
            q = torch.round(rows / scale[:, None]).clamp_(-127, 127).to(torch.int8).reshape(t.shape)
            packed[name] = {"q": q, "scale": scale}
        else:
            rest[name] = t
    return rest, packed


def restore_int8_weights(ckpt: dict) -> dict:
    """Move ``ckpt["model_int8"]`` (if any) back into ``ckpt["model"]`` as float32; returns ``ckpt``."""
    packed = ckpt.pop("model_int8", None)
    if packed:
        for name, entry in packed.items():
            q, scale = entry["q"], entry["scale"]
            ckpt["model"][name] = (q.float().reshape(q.shape[0], -1) * scale.float()[:, None]).reshape(q.shape)
    return ckpt


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict:
    """Load a checkpoint file safely (weights_only), with a readable error for bad files; int8-stored
    weights come back as float32 (:func:`restore_int8_weights`)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # zip errors, unpickling errors, truncated files
        raise CheckpointError(f"cannot read checkpoint {path}: {e}") from e
    if not isinstance(ckpt, dict) or "model" not in ckpt:
        raise CheckpointError(f"{path} is not an rwkv-asr checkpoint (no 'model' entry)")
    try:
        return restore_int8_weights(ckpt)
    except (KeyError, TypeError, AttributeError, RuntimeError) as e:
        raise CheckpointError(f"{path}: its int8 weights are malformed: {e}") from e


def _looks_complete(path: Path) -> bool:
    """Cheap integrity check: torch.save writes a zip whose central directory is at the very end,
    so a truncated file fails ``is_zipfile``. (Atomic writes make this a second line of defence.)"""
    try:
        return zipfile.is_zipfile(path)
    except OSError:
        return False


class CheckpointManager:
    """A folder of ``ckpt-step<N>.pt`` files plus ``checkpoints.json`` (dev WER per checkpoint).

    ``keep_last`` newest checkpoints and the ``keep_best`` ones with the lowest dev WER are kept;
    others are deleted after each save. Only rank 0 should create a manager that writes;
    ``writable=False`` gives a read-only view (it neither creates the folder nor deletes the
    temporary files of a run that may still be writing).
    """

    def __init__(
        self, directory: str | os.PathLike, keep_last: int = 3, keep_best: int = 1, writable: bool = True
    ) -> None:
        self.dir = Path(directory)
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

    # ------------------------------------------------------------------ index of WERs
    def _read_index(self) -> dict[str, float | None]:
        p = self.dir / INDEX_NAME
        if not p.is_file():
            return {}
        try:
            return dict(json.loads(p.read_text())["wer"])
        except (ValueError, KeyError, TypeError):
            log.warning("ignoring unreadable %s; best-checkpoint tracking restarts", p)
            return {}

    def _write_index(self, index: dict[str, float | None]) -> None:
        data = json.dumps({"wer": index}, indent=1, sort_keys=True).encode()
        atomic_write_bytes(self.dir / INDEX_NAME, lambda f: f.write(data))

    # ------------------------------------------------------------------ queries
    def checkpoints(self) -> list[tuple[int, Path]]:
        """(step, path) of all complete checkpoints, oldest first."""
        out = []
        if not self.dir.is_dir():
            return out
        for p in self.dir.iterdir():
            m = CKPT_RE.match(p.name)
            if m:
                out.append((int(m.group(1)), p))
        return sorted(out)

    def latest(self) -> Path | None:
        """The newest checkpoint that passes the integrity check (others are reported and skipped)."""
        for step, p in reversed(self.checkpoints()):
            if _looks_complete(p):
                return p
            log.warning("skipping damaged checkpoint %s", p)
        return None

    def best(self) -> Path | None:
        """The existing checkpoint with the lowest recorded dev WER (None if none has a WER)."""
        index = self._read_index()
        # Ties go to the newer checkpoint (-step); steps are unique so Paths are never compared.
        scored = [(index[p.name], -step, p) for step, p in self.checkpoints() if index.get(p.name) is not None]
        return min(scored)[2] if scored else None

    # ------------------------------------------------------------------ writing
    def save(self, state: dict, step: int, wer: float | None = None) -> Path:
        """Write ``state`` as the checkpoint of ``step`` (atomically), record its WER, prune old ones."""
        if not self.writable:
            raise CheckpointError(f"read-only view of {self.dir}")
        path = self.dir / f"ckpt-step{step:09d}.pt"
        atomic_torch_save(state, path)
        index = self._read_index()
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


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """A checkpoint file, or a folder: its best checkpoint by dev WER, else its newest one.

    A training run's output folder works too (its ``checkpoints/`` subfolder is used)."""
    p = Path(path)
    if p.is_file():
        return p
    if p.is_dir():
        folder = p / "checkpoints" if (p / "checkpoints").is_dir() else p
        view = CheckpointManager(folder, writable=False)
        found = view.best() or view.latest()
        if found is None:
            raise CheckpointError(f"no checkpoint (ckpt-step*.pt) in {folder}")
        return found
    raise CheckpointError(f"checkpoint not found: {p}")


class InferenceParts(NamedTuple):
    """What a checkpoint holds for inference: the model (eval mode), its tokenizer, and the word LM
    it carries, if any (``asr.decode.packed_lm.carried_language_model``: a ``PackedLM``, or an older
    file's xz-compressed ARPA bytes; ``asr.decode.lexicon.LexiconDecoder`` takes either)."""

    model: Any
    tokenizer: Any
    lm_arpa_xz: Any  # PackedLM | bytes | None (the name predates the packed form)


def load_for_inference(path: str | os.PathLike, device: str | torch.device = "cpu"):
    """Load ``(CTCModel, Tokenizer)`` from a checkpoint file or folder, in eval mode on ``device``."""
    model, tokenizer, _ = load_inference_parts(path, device)
    return model, tokenizer


def load_inference_parts(path: str | os.PathLike, device: str | torch.device = "cpu") -> InferenceParts:
    """:func:`load_for_inference` plus the word LM the checkpoint carries (None if it has none)."""
    from asr.model import CTCModel, ModelConfig
    from asr.tokenizer import Tokenizer

    file = resolve_checkpoint(path)
    ckpt = load_checkpoint(file)
    for key in ("config", "tokenizer"):
        if key not in ckpt:
            raise CheckpointError(f"{file} lacks '{key}'; it cannot be used for inference")
    model = CTCModel(ModelConfig.from_dict(ckpt["config"]))
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError as e:
        raise CheckpointError(f"{file}: weights do not match its model config: {e}") from e
    model.to(device).eval()
    from asr.decode.packed_lm import carried_language_model

    try:
        lm = carried_language_model(ckpt)
    except ValueError as e:
        raise CheckpointError(f"{file}: {e}") from e
    return InferenceParts(model, Tokenizer.from_bytes(ckpt["tokenizer"]), lm)


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
