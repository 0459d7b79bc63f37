"""The inference engine: a trained :class:`asr.model.CTCModel` run by a backend chosen once.

    encoder = InferenceEncoder(model, backend="int8")
    state = encoder.init_state(1)
    logits, state = encoder.step(features, state)      # streaming, any number of new frames
    logits, lengths = encoder.forward(features, lengths)  # whole padded batches

Every backend runs the same arithmetic: the front end of :mod:`asr.infer.frontend` and the block of
:func:`asr.model.rwkv7.block_step`; a backend supplies only the matrix products and kernels:

- ``reference``: the model's own modules (``CTCModel.step`` / ``forward``): any device and dtype.
- ``float``: float32 weights packed once (:class:`asr.infer.products.PackedProducts`), CPU or CUDA.
- ``int8``: int8 weights (per output channel) and per-row activation scales, CPU.
- ``onnx-int8``: calls of one stream with ``compile_frames`` encoder frames run the ``int8``
  arithmetic as one ONNX Runtime graph traced from the same code (:mod:`asr.infer.ort`; exported
  once per model into a cache, or shipped beside the bundled model); other calls run ``int8``.
  The fastest frame by frame, with no compiler: :func:`default_backend`'s choice.
- ``compiled`` / ``compiled-int8``: calls of one stream with ``compile_frames`` encoder frames
  (40 ms each) run the whole step (front end, blocks, head) as one function traced from the same
  code and compiled by inductor (:mod:`asr.infer.compiled`; a C++ compiler, seconds to minutes on
  the first build, cached on disk); other calls run ``float`` / ``int8``, with a compiled wkv
  update for batches of streams.

The engine holds copies of the weights made at construction: build a new one after changing them.

Adding a backend. Either

- **products** (the arithmetic stays :func:`asr.infer.step.encode`'s): a class with the methods of
  :class:`asr.model.rwkv7.BlockProducts` (``time_inputs``, ``output``, ``ffn_key``, ``ffn_value``,
  ``wkv``), built per block like :class:`asr.infer.products.PackedProducts` (``build_plan``'s
  ``products`` argument), and front-end matrices with ``prepare`` / ``mm`` / ``addmm`` as
  :class:`asr.infer.products.FloatMatrix`; or
- **a step runner** (a compiled or exported whole step, e.g. an ONNX Runtime session of
  ``encode``): an object with ``applies(features, cache1, cache2) -> bool`` and
  ``__call__(features, cache1, cache2, states) -> (logits, cache1, cache2, states)`` with
  :func:`asr.infer.step.encode`'s shapes and layouts (caches as :func:`asr.infer.frontend.front`
  takes them; ``states`` a list of :class:`asr.model.rwkv7.BlockState`), set as ``self.runner`` in
  ``__init__`` for its backend name (as :class:`asr.infer.compiled.CompiledSteps`). Calls it does
  not apply to run the eager plan, so it may serve only the shapes it was built for.

Add the name to :data:`BACKENDS`; tests/test_engine.py then runs it through every test.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from asr.infer.frontend import to_front_layout, to_state_layout
from asr.infer.products import PackedProducts
from asr.infer.step import Plan, build_plan, encode
from asr.model import CTCModel, EncoderState
from asr.model.rwkv7 import Block, BlockProducts, ModuleProducts

BACKENDS = ("reference", "float", "int8", "onnx-int8", "compiled", "compiled-int8")


def backend_for(model: CTCModel, int8: bool = False, compile: bool = False) -> str:
    """The backend a loader picks for these options: ``float`` for a float32 model (``reference``
    otherwise), ``int8`` with ``int8``, ``compiled`` / ``compiled-int8`` with ``compile``."""
    if compile:
        return "compiled-int8" if int8 else "compiled"
    if int8:
        return "int8"
    return "float" if model.ln_out.weight.dtype == torch.float32 else "reference"


def default_backend(model: CTCModel) -> str:
    """The backend a recognizer gets unless it asks for one: ``onnx-int8`` for a float32 CPU
    model where ONNX Runtime imports, else what :func:`backend_for` picks without options."""
    w = model.ln_out.weight
    if w.dtype == torch.float32 and w.device.type == "cpu":
        from asr.infer.ort import ort_available

        if ort_available():
            return "onnx-int8"
    return backend_for(model)


def block_products(block: Block, backend: str) -> BlockProducts:
    """The products ``backend`` runs ``block`` with (what :func:`asr.model.rwkv7.block_step` takes;
    the compiled backends' products as they are traced, run eagerly)."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown inference backend {backend!r} (one of {', '.join(BACKENDS)})")
    if backend == "reference":
        return ModuleProducts(block)
    with torch.no_grad():
        if backend.startswith("compiled"):
            from asr.infer.compiled import TracedProducts

            return TracedProducts(block, backend.endswith("int8"))
        if backend == "onnx-int8":
            from asr.infer.ort import ExportProducts

            return ExportProducts(block)
        return PackedProducts(block, backend == "int8")


class InferenceEncoder:
    """``model`` run by ``backend`` (one of :data:`BACKENDS`), chosen once here.

    ``compile_frames``: for the compiled and ``onnx-int8`` backends, the encoder frames per call
    that get a compiled step or an ONNX Runtime graph (each its own build; (1, 4) also serves
    160 ms calls). Compile with the thread count you will run with (``torch.set_num_threads``):
    the generated code keeps it. The ONNX Runtime sessions run on one thread."""

    def __init__(self, model: CTCModel, backend: str = "float", compile_frames: tuple[int, ...] = (1,)) -> None:
        if backend not in BACKENDS:
            raise ValueError(f"unknown inference backend {backend!r} (one of {', '.join(BACKENDS)})")
        w = model.ln_out.weight
        if backend != "reference" and w.dtype != torch.float32:
            raise ValueError(f"backend {backend!r} needs a float32 model (this one: {w.dtype}); use 'reference'")
        if backend not in ("reference", "float") and w.device.type != "cpu":
            raise ValueError(f"backend {backend!r} runs on the CPU only (this model is on {w.device})")
        self.model, self.backend, self.config = model, backend, model.config
        self.subsampling = model.subsampling  # the cache shapes (asr.stream.state)
        int8 = backend.endswith("int8")
        if int8:
            from asr.ops.int_mm import check_int_mm

            check_int_mm()
        self.plan: Optional[Plan] = None if backend == "reference" else build_plan(model, int8)
        self.runner = None
        if backend.startswith("compiled"):
            from asr.infer.compiled import CompiledSteps

            self.runner = CompiledSteps(model, self.plan, int8, compile_frames)
        elif backend == "onnx-int8":
            from asr.infer.ort import OrtSteps

            self.runner = OrtSteps(model, self.plan, compile_frames)

    def __repr__(self) -> str:
        return f"InferenceEncoder(backend={self.backend!r})"

    @property
    def device(self) -> torch.device:
        return self.model.ln_out.weight.device

    def init_state(self, batch_size: int = 1, device: Optional[torch.device] = None) -> EncoderState:
        """The state of ``batch_size`` new streams (:meth:`CTCModel.init_state`)."""
        return self.model.init_state(batch_size, device)

    @torch.no_grad()
    def step(self, features: Tensor, state: EncoderState) -> tuple[Tensor, EncoderState]:
        """New raw feature frames [B, t, n_mels] -> (logits [B, t', V] of the encoder frames they
        complete, the new state). The input state is not modified."""
        if self.plan is None:
            return self.model.step(features, state)
        B = features.shape[0]
        c1, c2 = to_front_layout(state.subsampling, self.plan.front, B, features.shape[2], features)
        if self.runner is not None and self.runner.applies(features, c1, c2):
            logits, c1, c2, blocks = self.runner(features, c1, c2, state.blocks)
        else:
            logits, c1, c2, blocks = encode(self.plan, features, c1, c2, state.blocks)
        return logits, state.advance(to_state_layout(c1, c2), blocks, features.shape[1], logits.shape[1])

    @torch.no_grad()
    def forward(self, features: Tensor, lengths: Tensor) -> tuple[Tensor, Tensor]:
        """Raw log-mel [B, T, n_mels] and lengths -> (CTC logits [B, T', V], their lengths), as
        :meth:`CTCModel.forward` (causal: frames past a length never change its valid outputs)."""
        if self.plan is None:
            return self.model(features, lengths)
        state = self.init_state(features.shape[0], features.device)
        logits, _ = self.step(features, state)
        return logits, self.model.output_lengths(lengths)

    __call__ = forward
