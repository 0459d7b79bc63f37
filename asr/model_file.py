"""The model file: reading a checkpoint (or an exported model) for inference.

A model file is what ``torch.save`` wrote: a dict of types ``torch.load(weights_only=True)``
accepts, so loading never executes pickled code. Inference needs three entries::

    config      model config dict (ModelConfig.to_dict())
    model       state_dict, CMVN statistics included (buffers of model.cmvn)
    tokenizer   sentencepiece model bytes (Tokenizer.to_bytes())

A training checkpoint holds more (optimizer, scheduler, RNG states...: :mod:`asr.train.checkpoint`
writes them). An exported model (``tools/export_model.py --int8-weights``) may hold its large
matrices in ``model_int8`` instead of ``model`` (int8 values and a float32 scale per output row);
:func:`load_checkpoint` turns them back into float32 entries of ``model``, so every reader sees an
ordinary state_dict. It may also carry its word language model (``lm``: :mod:`asr.decode.packed_lm`'s
packed form, ``--lm``; older files ``lm_arpa_xz``, the bytes of an xz-compressed ARPA file), which it
then decodes with by default, as the bundled model does.

A folder of checkpoints (``ckpt-step<N>.pt`` plus ``checkpoints.json``, the dev WER of each) is
read through :class:`CheckpointFolder`; :func:`resolve_checkpoint` picks its best one.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import zipfile
from pathlib import Path
from typing import Any, Iterator, NamedTuple

import torch

__all__ = [
    "CheckpointError",
    "CheckpointFolder",
    "InferenceParts",
    "load_checkpoint",
    "load_for_inference",
    "load_inference_parts",
    "quantize_weights_int8",
    "resolve_checkpoint",
    "restore_int8_weights",
]

log = logging.getLogger(__name__)

CKPT_RE = re.compile(r"^ckpt-step(\d+)\.pt$")
INDEX_NAME = "checkpoints.json"


class CheckpointError(RuntimeError):
    """A checkpoint is missing, unreadable or lacks what the caller needs; the message says which."""


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


def looks_complete(path: Path) -> bool:
    """Cheap integrity check: torch.save writes a zip whose central directory is at the very end,
    so a truncated file fails ``is_zipfile``. (Atomic writes make this a second line of defence.)"""
    try:
        return zipfile.is_zipfile(path)
    except OSError:
        return False


class CheckpointFolder:
    """A read-only view of a folder of ``ckpt-step<N>.pt`` files and their ``checkpoints.json``
    (dev WER per checkpoint); :class:`asr.train.checkpoint.CheckpointManager` writes one."""

    def __init__(self, directory: str | os.PathLike) -> None:
        self.dir = Path(directory)

    def read_index(self) -> dict[str, float | None]:
        """``{file name: dev WER or None}``; empty when the index is missing or unreadable."""
        p = self.dir / INDEX_NAME
        if not p.is_file():
            return {}
        try:
            return dict(json.loads(p.read_text())["wer"])
        except (ValueError, KeyError, TypeError):
            log.warning("ignoring unreadable %s; best-checkpoint tracking restarts", p)
            return {}

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
            if looks_complete(p):
                return p
            log.warning("skipping damaged checkpoint %s", p)
        return None

    def best(self) -> Path | None:
        """The existing checkpoint with the lowest recorded dev WER (None if none has a WER)."""
        index = self.read_index()
        # Ties go to the newer checkpoint (-step); steps are unique so Paths are never compared.
        scored = [(index[p.name], -step, p) for step, p in self.checkpoints() if index.get(p.name) is not None]
        return min(scored)[2] if scored else None


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """A checkpoint file, or a folder: its best checkpoint by dev WER, else its newest one.

    A training run's output folder works too (its ``checkpoints/`` subfolder is used)."""
    p = Path(path)
    if p.is_file():
        return p
    if p.is_dir():
        folder = p / "checkpoints" if (p / "checkpoints").is_dir() else p
        view = CheckpointFolder(folder)
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
    lm: Any  # PackedLM | bytes | None


def load_for_inference(path: str | os.PathLike, device: str | torch.device = "cpu"):
    """Load ``(CTCModel, Tokenizer)`` from a checkpoint file or folder, in eval mode on ``device``."""
    model, tokenizer, _ = load_inference_parts(path, device)
    return model, tokenizer


def load_inference_parts(path: str | os.PathLike, device: str | torch.device = "cpu") -> InferenceParts:
    """:func:`load_for_inference` plus the word LM the checkpoint carries (None if it has none)."""
    from asr.model import ModelConfig
    from asr.tokenizer import Tokenizer

    file = resolve_checkpoint(path)
    with one_thread():  # restoring int8 weights and building the model: many small operations
        ckpt = load_checkpoint(file)
        for key in ("config", "tokenizer"):
            if key not in ckpt:
                raise CheckpointError(f"{file} lacks '{key}'; it cannot be used for inference")
        model = _model_from_state(ModelConfig.from_dict(ckpt["config"]), ckpt["model"], file)
    model.to(device).eval()
    from asr.decode.packed_lm import carried_language_model

    try:
        lm = carried_language_model(ckpt)
    except ValueError as e:
        raise CheckpointError(f"{file}: {e}") from e
    return InferenceParts(model, Tokenizer.from_bytes(ckpt["tokenizer"]), lm)


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """One intra-op thread inside, the caller's count restored after. For loading: its many small
    operations (initialisation, quantization) run ~30x slower on two threads of a busy machine,
    whose threads then wait on each other, and no faster on an idle one."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _model_from_state(config: Any, state: dict, file: Path) -> Any:
    """A :class:`asr.model.CTCModel` of ``config`` holding the tensors of ``state``.

    Build it on one intra-op thread (:func:`one_thread`): its initialisation (orthogonal matrices by
    QR, all overwritten by the file's weights) takes ~0.25 s so, 30x longer on two busy threads."""
    from asr.model import CTCModel

    model = CTCModel(config)
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise CheckpointError(f"{file}: weights do not match its model config: {e}") from e
    return model
