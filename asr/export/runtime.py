"""Run an ONNX export (:mod:`asr.export.onnx`) with ONNX Runtime: a streaming encoder with the
``init_state`` / ``step`` / ``forward`` contract of :class:`~asr.model.CTCModel`.

    enc = OnnxEncoder("exp/onnx", int8=True)        # a folder written by asr-export --format onnx
    state = enc.init_state(1)
    logits, state = enc.step(features, state)       # features [B, t, n_mels] -> logits [B, t', V]
    logits, lengths = enc.forward(features, lengths)  # whole (padded) utterances

``step`` emits the same frames at the same moments as ``CTCModel.step`` (``ceil(n / 4)`` encoder
frames after n feature frames, for any cut of the input) and the same logits to float rounding
(int8: to int8 rounding) when its smallest step graph has one frame per call. It keeps the feature
frames that do not fill a graph call pending in the state (fewer than 4 with the one-frame graph).
``forward`` runs the largest exported graph over the utterance (streaming equals one pass, so
that is the whole-utterance forward).

int8 graphs quantize each product's input per call (ONNX Runtime's ``DynamicQuantizeLinear``: one
scale per tensor), so their outputs depend slightly on the frames per call and on which streams
share a batch (within int8 rounding; the PyTorch int8 path scales per row and does not).

Sessions run on ``threads`` intra-op threads (default 1, as a live stream runs), sequentially, with
all graph optimizations. The optimized graph is saved in ``cache_dir`` on first use (keyed by the
file, ONNX Runtime's version and the options) and loaded from there later with the optimizations
off, so a later start skips them; the cached graph may hold optimizations for this CPU, which is
why it is a per-machine cache and not part of the export. Each step call binds its inputs and
outputs with ``IOBinding``; the state stays in ONNX Runtime's ``OrtValue``s between calls (no
conversion to numpy and back).
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np
import torch
from torch import Tensor

from asr.export.onnx import FEATURES_PER_FRAME, FORMAT, META_FILE, OUTPUT_NAMES, PRE_ROLL, STATE_NAMES
from asr.model import ModelConfig


class OnnxExportError(ValueError):
    """The folder is not a readable ONNX export of this format."""


@dataclass
class OnnxEncoderState:
    """What :class:`OnnxEncoder` carries between ``step`` calls for a batch of streams."""

    pending: np.ndarray  # [B, p, n_mels] feature frames not yet in a graph call (p < 4)
    pending_valid: np.ndarray  # [B, p] 1.0 real, 0.0 the pre-roll of a new stream
    tensors: dict  # the graph's state inputs (onnxruntime.OrtValue), by name (asr.export.onnx.STATE_NAMES)
    frames_in: int = 0  # feature frames consumed so far
    frames_out: int = 0  # encoder frames emitted so far

    def size_bytes(self) -> int:
        state = sum(4 * int(np.prod(v.shape())) for v in self.tensors.values())  # float32
        return state + self.pending.nbytes + self.pending_valid.nbytes


def default_cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "rwkv-asr" / "onnx"


def read_meta(folder: Union[str, Path]) -> dict:
    """The export's metadata (``onnx_model.json``); a clear error if the folder is not an export."""
    path = Path(folder) / META_FILE
    try:
        meta = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise OnnxExportError(f"{folder} is not an ONNX export (cannot read {META_FILE}: {err})") from None
    if meta.get("format") != FORMAT:
        raise OnnxExportError(f"{path}: format {meta.get('format')!r}, expected {FORMAT!r}")
    return meta


def create_session(path: Path, threads: int = 1, cache_dir: Optional[Path] = None):
    """An ONNX Runtime CPU session for ``path``: ``threads`` intra-op threads, one inter-op,
    sequential, all graph optimizations; with ``cache_dir``, through the optimized-graph cache
    (module docstring)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.log_severity_level = 3  # errors only: the cache's "hardware specific" note is expected
    source = path
    if cache_dir is not None:
        stat = path.stat()
        key = f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}|{ort.__version__}|{threads}"
        cached = Path(cache_dir) / f"{path.stem}.{hashlib.sha1(key.encode()).hexdigest()[:16]}.onnx"
        if cached.is_file():
            source = cached
            opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        else:
            cached.parent.mkdir(parents=True, exist_ok=True)
            opts.optimized_model_filepath = str(cached)
    return ort.InferenceSession(str(source), opts, providers=["CPUExecutionProvider"])


class OnnxEncoder:
    """An exported model under ONNX Runtime with ``init_state`` / ``step`` / ``forward``
    (module docstring). ``int8`` picks the int8 graphs; ``cache_dir=None`` turns the
    optimized-graph cache off (default: ``~/.cache/rwkv-asr/onnx``, or ``$XDG_CACHE_HOME``).
    ``step_frames``: the graphs (frames per call) ``step`` may use, loaded now; a call runs the
    largest that its completed frames fill, then smaller ones (default: the smallest graph alone).
    ``forward`` runs the largest exported graph, loaded on first use."""

    def __init__(self, folder: Union[str, Path], int8: bool = False, threads: int = 1,
                 cache_dir: Union[str, Path, None, bool] = True, step_frames: Optional[Sequence[int]] = None):
        self.folder = Path(folder)
        self.meta = read_meta(self.folder)
        if self.meta["features_per_frame"] != FEATURES_PER_FRAME or self.meta["pre_roll"] != PRE_ROLL:
            raise OnnxExportError(f"{self.folder}: an export for another front end "
                                  f"({self.meta['features_per_frame']} features per frame)")
        self.kind = "int8" if int8 else "float32"
        self.frames = sorted(int(t) for t, files in self.meta["files"].items() if self.kind in files)
        if not self.frames:
            raise OnnxExportError(f"{self.folder} has no {self.kind} graphs (export it with --int8?)")
        self.threads = threads
        self.cache_dir = default_cache_dir() if cache_dir is True else (Path(cache_dir) if cache_dir else None)
        self.config = ModelConfig.from_dict(self.meta["config"])
        self.n_mels, self.vocab_size = self.config.n_mels, self.config.vocab_size
        self._sessions: dict[int, object] = {}
        self._bindings: dict[int, "_Binding"] = {}
        self.step_frames = sorted(set(step_frames or self.frames[:1]), reverse=True)
        missing = [t for t in self.step_frames if t not in self.frames]
        if missing:
            raise OnnxExportError(f"{self.folder} has no {self.kind} graph of {missing[0]} frames per call "
                                  f"(it has {self.frames})")
        for frames in self.step_frames:
            self.session(frames)

    def session(self, frames: int):
        """The session of the graph of ``frames`` encoder frames per call (created on first use)."""
        if frames not in self._sessions:
            path = self.folder / self.meta["files"][str(frames)][self.kind]
            if not path.is_file():
                raise OnnxExportError(f"{path} is missing from the export")
            self._sessions[frames] = create_session(path, self.threads, self.cache_dir)
        return self._sessions[frames]

    def init_state(self, batch_size: int = 1, device: Optional[torch.device] = None) -> OnnxEncoderState:
        """The state of ``batch_size`` new streams: zero caches and the pre-roll pending.
        ``device``: as ``CTCModel.init_state``'s; only the CPU is served."""
        from onnxruntime import OrtValue

        if device is not None and torch.device(device).type != "cpu":
            raise ValueError(f"OnnxEncoder runs on the CPU, not {device}")
        shapes = {name: list(shape) for name, shape in self.meta["state_shapes"].items()}
        shapes["shifts"][2] = shapes["wkv"][1] = batch_size
        for name in ("conv1_cache", "conv2_cache"):
            shapes[name][0] = batch_size
        return OnnxEncoderState(
            pending=np.zeros((batch_size, PRE_ROLL, self.n_mels), np.float32),
            pending_valid=np.zeros((batch_size, PRE_ROLL), np.float32),
            tensors={name: OrtValue.ortvalue_from_numpy(np.zeros(shapes[name], np.float32)) for name in STATE_NAMES},
        )

    def step(self, features: Tensor, state: OnnxEncoderState) -> tuple[Tensor, OnnxEncoderState]:
        """Feed new raw feature frames [B, t, n_mels] (t >= 0); return the logits of the encoder
        frames they complete [B, t', V] and the new state. The input state is not modified."""
        feats = np.ascontiguousarray(features.detach().cpu().numpy(), dtype=np.float32)
        B = feats.shape[0]
        if feats.ndim != 3 or feats.shape[2] != self.n_mels or B != state.pending.shape[0]:
            raise ValueError(f"features must be [{state.pending.shape[0]}, t, {self.n_mels}], got {tuple(feats.shape)}")
        x = np.concatenate([state.pending, feats], axis=1)
        valid = np.concatenate([state.pending_valid, np.ones((B, feats.shape[1]), np.float32)], axis=1)
        n = x.shape[1] // FEATURES_PER_FRAME
        tensors, outs, j = state.tensors, [], 0
        for frames in self.step_frames:
            while n - j >= frames:
                cut = slice(FEATURES_PER_FRAME * j, FEATURES_PER_FRAME * (j + frames))
                logits, tensors = self._binding(frames).run(x[:, cut], valid[:, cut], tensors)
                outs.append(logits)
                j += frames
        done = FEATURES_PER_FRAME * j
        logits = np.concatenate(outs, axis=1) if outs else np.zeros((B, 0, self.vocab_size), np.float32)
        new = OnnxEncoderState(pending=x[:, done:].copy(), pending_valid=valid[:, done:].copy(), tensors=tensors,
                               frames_in=state.frames_in + feats.shape[1],
                               frames_out=state.frames_out + logits.shape[1])
        return torch.from_numpy(logits), new

    def forward(self, features: Tensor, lengths: Tensor) -> tuple[Tensor, Tensor]:
        """features: raw log-mel [B, T, n_mels] (padded); returns CTC logits [B, ceil(T / 4), V] and
        the output lengths ``ceil(lengths / 4)``, as ``CTCModel.forward``. Runs the largest graph
        over the utterance, the end padded to its size (the model is causal: padding changes
        only frames past the end, which are cut)."""
        B, T, _ = features.shape
        frames = self.frames[-1]
        per_call = FEATURES_PER_FRAME * frames
        total = PRE_ROLL + T
        calls = -(-total // per_call)
        x = np.zeros((B, calls * per_call, self.n_mels), np.float32)
        x[:, PRE_ROLL:total] = features.detach().cpu().numpy()
        valid = np.ones((B, x.shape[1]), np.float32)
        valid[:, :PRE_ROLL] = 0.0
        tensors = self.init_state(B).tensors
        binding, outs = self._binding(frames), []
        for c in range(calls):
            cut = slice(c * per_call, (c + 1) * per_call)
            logits, tensors = binding.run(x[:, cut], valid[:, cut], tensors)
            outs.append(logits)
        out_len = -(-T // FEATURES_PER_FRAME)
        logits = torch.from_numpy(np.concatenate(outs, axis=1)[:, :out_len])
        return logits, torch.div(lengths + FEATURES_PER_FRAME - 1, FEATURES_PER_FRAME, rounding_mode="floor")

    def _binding(self, frames: int) -> "_Binding":
        if frames not in self._bindings:
            self._bindings[frames] = _Binding(self.session(frames))
        return self._bindings[frames]


class _Binding:
    """One graph's IOBinding: state inputs bound as ``OrtValue``s, outputs allocated by ONNX
    Runtime (from its arena: no copy, and a state handed out is never written again)."""

    def __init__(self, session):
        self.session = session
        self.io = session.io_binding()

    def run(self, features: np.ndarray, valid: np.ndarray, tensors: dict) -> tuple[np.ndarray, dict]:
        """One graph call: (logits [B, T, V], the new state's ``OrtValue``s by name)."""
        io = self.io
        io.bind_cpu_input("features", np.ascontiguousarray(features))
        io.bind_cpu_input("valid", np.ascontiguousarray(valid))
        for name, value in tensors.items():
            io.bind_ortvalue_input(name, value)
        for name in OUTPUT_NAMES:
            io.bind_output(name, "cpu")
        self.session.run_with_iobinding(io)
        out = io.get_outputs()
        return out[0].numpy(), dict(zip(STATE_NAMES, out[1:]))
