"""The ``onnx-int8`` backend: the engine's step (:func:`asr.infer.step.encode`) traced to ONNX once
per model and run by ONNX Runtime, in the state layout of every other backend.

Why: at one 40 ms frame the eager int8 step is bound by ~1,000 PyTorch calls, not by arithmetic.
ONNX Runtime runs the same graph of int8 products and element-wise work with a far smaller cost
per operation, and needs no compiler on the user's machine (the ``compiled`` backends do).

The graph is the int8 backend's arithmetic, not an approximation of it: every product quantizes
its input rows symmetrically, one scale per row (per frame of each stream), as
:class:`asr.infer.products.Int8Matrix` does (``QuantizeLinear`` divides by amax / 127 where the
eager path multiplies by 127 / amax: the same integers but where that float rounding moves a value
across a rounding boundary); the int8 rows go into ``MatMulInteger`` shifted by 128 to unsigned
with a zero point of 128 (the same integer sums: ONNX Runtime's fast int8 kernels take unsigned
activations). The wkv update is :func:`asr.ops.wkv7.wkv7_token` with its contractions written
as matrix products (fewer passes over the state), which sums in another order. So its logits equal
the eager ``int8`` backend's to float rounding almost everywhere, and to one int8 step where a
rounding moved (tests/test_engine.py holds both backends to the same bounds).

Graphs: one per number of encoder frames per call (``frames``; 4 T feature frames in), batch 1,
the front-end caches and block states as inputs and outputs in :class:`asr.model.EncoderState`'s
layout. :class:`OrtSteps` serves a call of one stream cut anywhere (up to
:attr:`OrtSteps.max_features` feature frames); batches of streams and longer calls run the eager
``int8`` plan, the same arithmetic.

Where the graph comes from (:func:`step_graph`): a file named by a key of the model's weights,
looked up in the folders of :func:`graph_dirs` (beside the bundled model, where
``tools/ship_step_graph.py`` writes one, then the user's cache), else exported into the cache on
first use (seconds, once per model). ONNX Runtime's optimized form of it is cached beside it (it
may hold optimizations for this CPU, so it is never shipped).
"""
from __future__ import annotations

import functools
import hashlib
import json
import os
import warnings
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
from torch import Tensor

from asr.infer.frontend import front, to_state_layout
from asr.infer.products import Int8Matrix, PackedProducts
from asr.infer.step import Plan, build_plan, encode
from asr.model import CTCModel
from asr.model.rwkv7 import BlockState
from asr.ops.int_mm import int_mm
from asr.ops.wkv7 import wkv7_recurrent, wkv7_token

#: bump when the traced arithmetic or the graph's inputs change: older cached graphs are then unused
GRAPH_VERSION = 5
#: the ONNX opset the graphs are written with
OPSET = 17
ZERO_POINT = 128


def cache_dir() -> Path:
    """The user's cache of step graphs: ``$RWKV_ASR_CACHE/onnx``, else
    ``$XDG_CACHE_HOME/rwkv-asr/onnx`` (``~/.cache/rwkv-asr/onnx``)."""
    root = os.environ.get("RWKV_ASR_CACHE")
    if root:
        return Path(root) / "onnx"
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "rwkv-asr" / "onnx"


def graph_dirs() -> list[Path]:
    """Where step graphs are looked for, in order: beside the bundled model, then the cache."""
    return [Path(__file__).resolve().parents[1] / "pretrained", cache_dir()]


def ort_available() -> bool:
    """Whether ONNX Runtime imports (a core dependency; a broken install falls back)."""
    try:
        import onnxruntime  # noqa: F401
    except Exception:
        return False
    return True


# ---------------------------------------------------------------------------------------------- the products


def _const(g, value: Tensor):
    return g.op("Constant", value_t=value)


class _MatMulU8(torch.autograd.Function):
    """Unsigned rows (int8 + 128) @ int8 W [K, N] -> exact int32 sums; ``MatMulInteger`` in ONNX."""

    @staticmethod
    def forward(ctx, q: Tensor, w: Tensor) -> Tensor:  # noqa: D102
        return int_mm((q.to(torch.int16) - ZERO_POINT).to(torch.int8), w)

    @staticmethod
    def symbolic(g, q, w):  # noqa: D102
        return g.op("MatMulInteger", q, w, _const(g, torch.tensor(ZERO_POINT, dtype=torch.uint8)))


def quant_rows_u8(x: Tensor) -> tuple[Tensor, Tensor]:
    """:func:`asr.infer.products.quant_rows` shifted to unsigned: (q + 128 as uint8, amax)."""
    amax = x.abs().amax(dim=-1, keepdim=True).clamp(min=1e-30)
    return (torch.mul(x, 127.0 / amax).round() + ZERO_POINT).to(torch.uint8), amax


class _QuantRows(torch.autograd.Function):
    """Rows x [R, K] -> :func:`quant_rows_u8`; in ONNX one per-row ``QuantizeLinear`` (x / (amax /
    127), rounded half to even, + 128: the same integers up to the float rounding of the scale)."""

    @staticmethod
    def forward(ctx, x: Tensor) -> tuple[Tensor, Tensor]:  # noqa: D102
        return quant_rows_u8(x)

    @staticmethod
    def symbolic(g, x):  # noqa: D102
        rows = x.type().sizes()[0]  # static: every shape in the graph is
        amax = g.op("Clip", g.op("ReduceMax", g.op("Abs", x), axes_i=[1], keepdims_i=0), _const(g, torch.tensor(1e-30)))
        scale = g.op("Div", amax, _const(g, torch.tensor(127.0)))
        q = g.op("QuantizeLinear", x, scale, _const(g, torch.full((rows,), ZERO_POINT, dtype=torch.uint8)), axis_i=0)
        return q, g.op("Unsqueeze", amax, _const(g, torch.tensor([1])))


_wkv_token_matmul = functools.partial(wkv7_token, matmul=True)


class ExportInt8Matrix(Int8Matrix):
    """:class:`Int8Matrix` with unsigned rows (module docstring): the form the graph is traced from.
    (ONNX Runtime's fused ``MatMulIntegerToFloat`` took 3x the time of ``MatMulInteger`` and two
    multiplies at one row, onnxruntime 1.32.)"""

    def prepare(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return _QuantRows.apply(x)

    def _acc(self, x: tuple[Tensor, Tensor]) -> Tensor:
        q, amax = x
        return _MatMulU8.apply(q, self.q) * amax


def _export_matrix(m: object) -> object:
    return ExportInt8Matrix(m.q, m.qt, m.scale) if isinstance(m, Int8Matrix) else m


class ExportProducts(PackedProducts):
    """The int8 :class:`PackedProducts` as traced to ONNX: unsigned rows; r, k, v and the LoRA
    down-projections as one product of all six token-shift mixes with ``[W_r | W_k | W_v | A]``
    (the columns quantized as before, so the same integers and scales), of which each mix keeps
    its own columns (one ``MatMulInteger`` and its epilogue instead of four: at one frame a
    product's cost is its weights' reading and the operations around it, not the multiply-adds);
    the LoRA activations applied as masks over whole rows (no in-place writes to slices)."""

    def __init__(self, block, int8: bool = True) -> None:  # int8 always (the argument: build_plan's call)
        super().__init__(block, True)
        self.rkv = [_export_matrix(m) for m in self.rkv]
        self.down, self.up, self.out, self.key, self.value = (
            _export_matrix(m) for m in (self.down, self.up, self.out, self.key, self.value))
        parts = [*self.rkv, self.down]
        q = torch.cat([m.q for m in parts], dim=1)
        self.inputs = ExportInt8Matrix(q, q.t(), torch.cat([m.scale for m in parts]))

    def wkv(self, r: Tensor, w: Tensor, k: Tensor, v: Tensor, a: Tensor, b: Tensor,
            state: Optional[Tensor]) -> tuple[Tensor, Tensor]:
        """The per-token update with its contractions as matrix products (fewer passes over the
        state: :func:`asr.ops.wkv7.wkv7_token`'s ``matmul``)."""
        B, T, H, N = r.shape
        if T != 1 or state is None:
            return wkv7_recurrent(r, w, k, v, a, b, state, token=_wkv_token_matmul)
        rows = [t.reshape(B, H, 1, N) for t in (r, w, k, a, b)]  # one token: reshapes, not transposes
        y, state = _wkv_token_matmul(state, rows[0], rows[1], rows[2], v.reshape(B, H, N, 1), rows[3], rows[4])
        return y.reshape(B, 1, H, N), state

    def time_inputs(self, mixes: Tensor, acts: tuple[str, ...]) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        _, B, T, C = mixes.shape
        M, n = B * T, len(acts)
        y = self.inputs.mm(self.inputs.prepare(mixes.reshape(6 * M, C))).view(6, B, T, -1)
        r, k, v = y[0, ..., :C], y[1, ..., C : 2 * C], y[2, ..., 2 * C : 3 * C]
        h = y[6 - n :, ..., 3 * C :].reshape(n, M, -1)
        h = sum(f(h) * mask for f, mask in self._activation_masks(acts))
        up = self.up.mm(self.up.prepare(h.view(n * M, -1))).view(n, B, T, C)
        return r, k, v, up

    def _activation_masks(self, acts: tuple[str, ...]) -> list[tuple[object, Tensor]]:
        """(activation, 0/1 mask [n, 1, D]) pairs: LoRA i's activation on its own columns of row i."""
        out = []
        for name in dict.fromkeys(acts):
            mask = self.mask.clone()
            for i, act in enumerate(acts):
                if act != name:
                    mask[i] = 0
            out.append((getattr(torch, name) if name else (lambda t: t), mask))
        return out


def export_plan(model: CTCModel) -> Plan:
    """``model``'s int8 plan in the traced form (:class:`ExportProducts`)."""
    plan = build_plan(model, True, ExportProducts)
    plan.front.conv2, plan.front.proj = _export_matrix(plan.front.conv2), _export_matrix(plan.front.proj)
    return plan


# ---------------------------------------------------------------------------------------------- the graph


def state_names(n_layers: int) -> list[str]:
    """The graph's state inputs, in order (outputs: the same with ``_out``)."""
    return ["cache1", "cache2"] + [f"{name}{i}" for i in range(n_layers) for name in ("tmix", "wkv", "cmix")]


class _StepGraph(torch.nn.Module):
    """:func:`encode` with the caches in the state layout and the block states flattened."""

    def __init__(self, plan: Plan) -> None:
        super().__init__()
        self.plan = plan

    def forward(self, features: Tensor, cache1: Tensor, cache2: Tensor, *flat: Tensor) -> tuple[Tensor, ...]:
        blocks = [BlockState(*flat[i : i + 3]) for i in range(0, len(flat), 3)]
        logits, c1, c2, new = encode(self.plan, features, cache1[:, 0], cache2.permute(0, 2, 3, 1), blocks)
        c1, c2 = to_state_layout(c1, c2)
        return (logits, c1, c2, *(t for s in new for t in (s.tmix_prev, s.wkv, s.cmix_prev)))


def example_state(model: CTCModel) -> list[Tensor]:
    """A new stream's state as the graph takes it: [cache1, cache2, (tmix, wkv, cmix) per block]."""
    cfg, sub = model.config, model.subsampling
    f1 = sub.conv1._out_freq(cfg.n_mels)
    H, N = cfg.d_model // cfg.head_size, cfg.head_size
    out = [torch.zeros(1, 1, 2, cfg.n_mels), torch.zeros(1, sub.conv2.conv.in_channels, 2, f1)]
    for _ in range(cfg.n_layers):
        out += [torch.zeros(1, cfg.d_model), torch.zeros(1, H, N, N), torch.zeros(1, cfg.d_model)]
    return out


def export_step_graph(model: CTCModel, path: Path, frames: int = 1) -> Path:
    """Trace the int8 step of ``frames`` encoder frames per call (batch 1) into the ONNX file
    ``path`` (written to a temporary name, then renamed: readers never see half a file)."""
    import importlib.util

    if importlib.util.find_spec("onnx") is None:  # torch.onnx.export writes through it
        raise RuntimeError("exporting this model's onnx-int8 step graph needs the onnx package "
                           "(pip install 'rwkv-asr[onnx]')")
    names = state_names(model.config.n_layers)
    example = (torch.zeros(1, 4 * frames, model.config.n_mels), *example_state(model))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the legacy exporter's deprecation note; shapes fixed by design
        torch.onnx.export(_StepGraph(export_plan(model.eval())), example, str(tmp), dynamo=False,
                          opset_version=OPSET, input_names=["features", *names],
                          output_names=["logits", *(f"{n}_out" for n in names)], do_constant_folding=True)
    _slim(tmp)
    os.replace(tmp, path)
    return path


def _slim(path: Path) -> None:
    """Simplify the graph at ``path`` in place with onnxslim where it is installed (the ``onnx``
    extra): the same arithmetic, ~8 % faster a step in ONNX Runtime on one thread (folded shape
    operations, merged constants, nodes in an order that reuses what the previous one wrote);
    without it the traced graph is used as it is."""
    try:
        import onnx
        import onnxslim
    except ImportError:
        return
    onnx.save(onnxslim.slim(str(path)), str(path))


def weights_key(model: CTCModel) -> str:
    """A key of everything the graph depends on: the weights, the config, :data:`GRAPH_VERSION`."""
    h = hashlib.sha256(json.dumps([GRAPH_VERSION, model.config.to_dict()], sort_keys=True).encode())
    for name, t in model.state_dict().items():
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:20]


def graph_name(key: str, frames: int) -> str:
    return f"step{frames}-int8-{key}.onnx"


def step_graph(model: CTCModel, frames: int = 1, key: Optional[str] = None) -> Path:
    """The step graph of ``model`` (module docstring): found, or exported into the cache now."""
    name = graph_name(key or weights_key(model), frames)
    for folder in graph_dirs():
        if (folder / name).is_file():
            return folder / name
    return export_step_graph(model, cache_dir() / name, frames)


def create_session(path: Path, threads: int = 1):
    """An ONNX Runtime CPU session of ``path`` on ``threads`` intra-op threads, all graph
    optimizations; the optimized graph is cached (:func:`cache_dir`, keyed by the file's name,
    ONNX Runtime's version and ``threads``) and a later session loads it without optimizing."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.log_severity_level = 3  # errors only: the optimized graph's "hardware specific" note is expected
    optimized = cache_dir() / f"{path.stem}.ort{ort.__version__}-t{threads}.optimized.onnx"
    if optimized.is_file():
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        try:
            return ort.InferenceSession(str(optimized), opts, providers=["CPUExecutionProvider"])
        except Exception:  # a damaged cache entry: optimize again from the graph
            pass
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    try:
        optimized.parent.mkdir(parents=True, exist_ok=True)
        opts.optimized_model_filepath = str(optimized)
    except OSError:  # no writable cache: optimize in memory each time
        pass
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


# ---------------------------------------------------------------------------------------------- the runner


#: conv1 / conv2 cache rows -> the stream's phase (feature frames since its last encoder frame
#: boundary, mod 4): a stream at phase 0 is where the graphs start
_PHASE = {(2, 2): 0, (1, 1): 1, (2, 1): 2, (1, 2): 3}


class OrtSteps:
    """The step runner of the ``onnx-int8`` backend (:class:`asr.infer.engine.InferenceEncoder`'s
    ``applies`` / ``__call__`` contract): one session per number of encoder frames per call.

    A call of one stream with any number of feature frames is served, the graphs running the
    blocks of every frame it completes (module docstring): frames that lead to the next encoder
    frame boundary only move the front end's caches (no blocks: the eager front end); whole
    encoder frames go through the graphs, largest first; a tail of 1-3 frames completes one more
    encoder frame (frame j needs feature frames up to 4 j only), so the one-frame graph runs on it
    padded with zeros, and the caches the real frames leave are cut from its inputs and outputs."""

    def __init__(self, model: CTCModel, eager: Plan, frames: Sequence[int] = (1,), threads: int = 1) -> None:
        frames = sorted({int(t) for t in frames} | {1})
        if frames[0] < 1:
            raise ValueError(f"frames per call must be counts >= 1, got {frames!r}")
        self.frames, self.n_mels, self.eager = frames, model.config.n_mels, eager
        self.calls = 0  # graph calls made
        key = weights_key(model)
        self.sessions = {t: create_session(step_graph(model, t, key), threads) for t in frames}
        self.names = ["features", *state_names(model.config.n_layers)]
        #: calls with more feature frames than this run eagerly (a long call is faster as one product)
        self.max_features = 16 * frames[-1]

    def applies(self, features: Tensor, c1: Tensor, c2: Tensor) -> bool:
        """One stream of float32 CPU features, at most :attr:`max_features` of them."""
        B, t, n_mels = features.shape
        return B == 1 and 0 < t <= self.max_features and n_mels == self.n_mels \
            and features.dtype == torch.float32 and features.device.type == "cpu" \
            and (c1.shape[1], c2.shape[1]) in _PHASE

    def __call__(self, features: Tensor, c1: Tensor, c2: Tensor,
                 states: list[BlockState]) -> tuple[Tensor, Tensor, Tensor, list[BlockState]]:
        lead = (4 - _PHASE[(c1.shape[1], c2.shape[1])]) % 4
        outs = []
        if lead:  # completes no encoder frame: the caches move, the blocks do not run
            c1, c2 = self._front(features[:, :lead], c1, c2)
        pos, t = min(lead, features.shape[1]), features.shape[1]
        for frames in reversed(self.frames):
            while t - pos >= 4 * frames:
                logits, c1, c2, states = self._run(features[:, pos : pos + 4 * frames], c1, c2, states)
                outs.append(logits)
                pos += 4 * frames
        if pos < t:  # 1-3 frames: one encoder frame, the caches those frames leave
            logits, c1, c2, states = self._tail(features[:, pos:], c1, c2, states)
            outs.append(logits)
        if not outs:
            return features.new_zeros(1, 0, self.eager.head_b.shape[0]), c1, c2, states
        return (outs[0] if len(outs) == 1 else torch.cat(outs, dim=1)), c1, c2, states

    def _tail(self, tail: Tensor, c1: Tensor, c2: Tensor,
              states: list[BlockState]) -> tuple[Tensor, Tensor, Tensor, list[BlockState]]:
        """r = 1-3 feature frames at phase 0: the one-frame graph on them padded with zeros gives
        the encoder frame they complete and the block states (the frame reads no later feature
        frame). Of the caches: conv1's new rows are the graph's conv2 cache (the second row, read
        only for r = 3, is made of real frames then), conv1's inputs the r normalised frames'
        last (r - 1) // 2 ... r - 1 (:func:`asr.infer.frontend.front`'s slicing)."""
        r = tail.shape[1]
        padded = torch.cat([tail, tail.new_zeros(1, 4 - r, tail.shape[2])], dim=1)
        logits, _, rows, states = self._run(padded, c1, c2, states)
        n1 = (r - 1) // 2 + 1  # conv1 outputs the r frames complete
        c1 = (tail[:, 2 * n1 - 2 :] - self.eager.mean) * self.eager.istd
        return logits, c1, rows[:, :n1], states

    def _front(self, features: Tensor, c1: Tensor, c2: Tensor) -> tuple[Tensor, Tensor]:
        _, c1, c2 = front(self.eager.front, (features - self.eager.mean) * self.eager.istd, c1, c2)
        return c1, c2

    def _run(self, features: Tensor, c1: Tensor, c2: Tensor,
             states: list[BlockState]) -> tuple[Tensor, Tensor, Tensor, list[BlockState]]:
        """One graph call at phase 0: (logits, caches in the front end's layout, block states)."""
        session = self.sessions[features.shape[1] // 4]
        self.calls += 1
        c1, c2 = to_state_layout(c1, c2)
        values = [features, c1, c2, *(t for s in states for t in (s.tmix_prev, s.wkv, s.cmix_prev))]
        out = session.run(None, {n: _array(t) for n, t in zip(self.names, values)})
        new = [torch.from_numpy(a) for a in out]
        return new[0], new[1][:, 0], new[2].permute(0, 2, 3, 1), [BlockState(*new[i : i + 3]) for i in range(3, len(new), 3)]


def _array(t: Tensor) -> np.ndarray:
    return (t if t.is_contiguous() else t.contiguous()).numpy()
