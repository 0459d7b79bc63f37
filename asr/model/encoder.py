"""The acoustic model: CMVN -> causal x4 subsampling -> RWKV-7 blocks -> LayerNorm -> CTC head.

One object, two ways to run it:

- ``forward(features, lengths)``: whole padded batches (training, batch transcription). The wkv
  recurrence runs chunk-parallel (fla on CUDA, our chunked form on CPU).
- ``init_state(batch)`` / ``step(features, state)``: any number of new feature frames at a time, the
  state carried explicitly (streaming). Its size is constant: per layer two C-vectors and one
  H x 64 x 64 wkv state, plus a few cached feature frames for the subsampling.

Both share every line except the wkv form, so streaming output equals offline output to float
tolerance for any split of the input (tests/test_model_parity.py).

Inference fast path: without autograd, ``step`` runs the blocks through
:func:`asr.model.rwkv7.packed_step` on weights rearranged once (:meth:`CTCModel.prepare_for_inference`,
built lazily and rebuilt when a parameter changes). Same arithmetic, ~5x fewer PyTorch calls;
``step(..., fast=False)`` is the general path it is tested against. ``prepare_for_inference(int8=True)``
gives the packed path int8 weights (per output channel) and per-frame dynamic activation scales;
``prepare_for_inference(compile=True)`` serves calls of one stream that bring one encoder frame (or
as many as ``compile_frames`` lists) with the blocks and head compiled into one C++ function
(:mod:`asr.model.token_step`, ~2x faster per frame, opt-in) and the front end into another
(:mod:`asr.model.frontend_step`).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any, Optional

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import Tensor, nn

from asr.features import GlobalCMVN
from asr.model.frontend_step import CompiledFrontend
from asr.model.rwkv7 import Block, BlockState, PackedBlock, default_lora_ranks, packed_step
from asr.model.subsampling import ConvSubsampling, Int8Frontend
from asr.model.token_step import CompiledTokenStep, compiled_wkv_update


@dataclass
class ModelConfig:
    """Sizes of the model; a plain dataclass so Hydra configs and checkpoints map onto it 1:1."""

    vocab_size: int = 256  # including the CTC blank (id 0)
    n_mels: int = 80
    d_model: int = 256
    n_layers: int = 12
    head_size: int = 64
    subsample_channels: int = 256
    ffn_mult: int = 4
    lora_decay: Optional[int] = None  # None: RWKV-LM's rule of thumb for d_model
    lora_aaa: Optional[int] = None
    lora_mv: Optional[int] = None
    lora_gate: Optional[int] = None
    dropout: float = 0.0

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "ModelConfig":
        """Build from a dict, ignoring keys that are not model sizes (e.g. Hydra's ``_target_``)."""
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in names})

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def lora_ranks(self) -> dict[str, int]:
        ranks = default_lora_ranks(self.d_model)
        for name in ranks:
            value = getattr(self, f"lora_{name}")
            if value is not None:
                ranks[name] = value
        return ranks


@dataclass
class EncoderState:
    """Everything the model carries between calls of ``step`` for a batch of streams."""

    subsampling: tuple[Optional[Tensor], Optional[Tensor]]
    blocks: list[BlockState] = field(default_factory=list)
    frames_in: int = 0  # feature frames consumed so far
    frames_out: int = 0  # encoder frames emitted so far
    #: set by :func:`asr.stream.state.split_state`: (the batched state, this stream's row), so that
    #: stacking the same streams again in the same order reuses the batch instead of copying
    stacked_from: Optional[tuple["EncoderState", int]] = field(default=None, repr=False, compare=False)

    def size_bytes(self) -> int:
        tensors = [t for t in self.subsampling if t is not None]
        for b in self.blocks:
            tensors += [b.tmix_prev, b.wkv, b.cmix_prev]
        return sum(t.numel() * t.element_size() for t in tensors)


class CTCModel(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.cmvn = GlobalCMVN(config.n_mels)
        self.subsampling = ConvSubsampling(config.n_mels, config.subsample_channels, config.d_model)
        ranks = config.lora_ranks()
        self.blocks = nn.ModuleList(
            Block(config.d_model, config.head_size, i, config.n_layers, ranks, config.ffn_mult)
            for i in range(config.n_layers)
        )
        self.ln_out = nn.LayerNorm(config.d_model)
        self.dropout = nn.Dropout(config.dropout)
        self.head = nn.Linear(config.d_model, config.vocab_size)
        # Training option (trainer.activation_checkpointing), not part of the model: see _run.
        self.activation_checkpointing = False
        # (parameters, their versions, block packs, int8 front end): see _packed_blocks
        self._packed: Optional[tuple[list[Tensor], list[int], Optional[list[PackedBlock]], Optional[Int8Frontend]]] = None
        self._int8 = False  # prepare_for_inference(int8=True): the packed path with int8 weights
        self._compile: tuple[int, ...] = ()  # prepare_for_inference(compile=True): frames per call compiled
        self._frozen = False  # prepare_for_inference(freeze=True): parameters promised unchanged
        self._token_step: Optional[CompiledTokenStep] = None
        self._front_step: Optional[CompiledFrontend] = None  # the front end of those calls, compiled
        # load_state_dict(assign=True) swaps Parameter objects: drop the pack (in-place loads are
        # caught by the parameters' version counters, see _packed_blocks)
        self.register_load_state_dict_post_hook(CTCModel._drop_packed_hook)

    # ------------------------------------------------------------------ shared pieces
    def output_lengths(self, lengths: Tensor) -> Tensor:
        return self.subsampling.output_length(lengths)

    def _run(self, module: nn.Module, *args: Any, **kwargs: Any) -> Any:
        """``module(*args, **kwargs)``; with activation checkpointing on (training with autograd)
        through ``torch.utils.checkpoint``: only the inputs are kept for the backward, which runs the
        forward again first.

        Why: a block saves ~40 element-wise intermediates of [B, T, C] for its backward, and the conv
        front end its wide feature maps at 2x and 4x the frame rate; these, not the weights,
        are the training step's peak memory. Checkpointing trades one more forward per step for it
        (on an H100 at 21 x 30 s: 0.61x the speed for 0.36x the peak memory, BENCHMARKS.md). The
        trainer allows it only uncompiled: dynamo fails to trace it for dynamic shapes (torch 2.14)."""
        if self.activation_checkpointing and self.training and torch.is_grad_enabled():
            return torch.utils.checkpoint.checkpoint(module, *args, use_reentrant=False, **kwargs)
        return module(*args, **kwargs)

    def _blocks_and_head(
        self, x: Tensor, states: Optional[list[BlockState]], impl: str
    ) -> tuple[Tensor, list[BlockState]]:
        x = self.dropout(x)
        v_first = None
        new_states = []
        for i, block in enumerate(self.blocks):
            x, state, v_first = self._run(block, x, None if states is None else states[i], v_first, impl=impl)
            new_states.append(state)
        return self.head(self.dropout(self.ln_out(x))), new_states

    # ------------------------------------------------------------------ parallel path
    def forward(self, features: Tensor, lengths: Tensor, impl: str = "auto") -> tuple[Tensor, Tensor]:
        """features: raw log-mel [B, T, n_mels]; returns CTC logits [B, T', V] and their lengths.

        The model is causal, so frames past a sequence's length never change its valid outputs.
        With int8 inference on (:meth:`prepare_for_inference`) and autograd off, the blocks run
        the packed int8 step over the whole sequence (``impl`` is then ignored), so one pass and
        streaming give the same int8 results.
        """
        packs = None
        if self.int8_inference and not torch.is_grad_enabled() and features.shape[1] > 0:
            packs = self._packed_blocks()
        if packs is not None:  # the front end's products in int8 too
            x = self.subsampling(self.cmvn(features), int8=self._int8_frontend())
        else:
            x = self._run(self.subsampling, self.cmvn(features))
        if packs is not None and x.shape[1] > 0:
            logits, _ = self._packed_blocks_and_head(x, self.init_state(x.shape[0], x.device).blocks, packs)
        else:
            logits, _ = self._blocks_and_head(x, None, impl)
        return logits, self.output_lengths(lengths)

    # ------------------------------------------------------------------ recurrent path
    def init_state(self, batch_size: int = 1, device: Optional[torch.device] = None) -> EncoderState:
        """The state of ``batch_size`` new streams: all zeros, in one allocation per dtype (the
        per-block tensors are views of it; ``step`` never writes into a state it is given)."""
        dtype = self.ln_out.weight.dtype
        device = device or self.ln_out.weight.device
        cfg = self.config
        B, C, L, N = batch_size, cfg.d_model, cfg.n_layers, cfg.head_size
        wkv_dtype = torch.float64 if dtype == torch.float64 else torch.float32
        shifts = torch.zeros(L, 2, B, C, device=device, dtype=dtype)
        wkv = torch.zeros(L, B, C // N, N, N, device=device, dtype=wkv_dtype)
        return EncoderState(
            subsampling=(None, None),
            blocks=[BlockState(shifts[i, 0], wkv[i], shifts[i, 1]) for i in range(L)],
        )

    def step(
        self, features: Tensor, state: EncoderState, impl: str = "auto", fast: Optional[bool] = None
    ) -> tuple[Tensor, EncoderState]:
        """Feed new raw feature frames [B, t, n_mels] (t >= 0); return the logits of the encoder
        frames they complete [B, t', V] and the new state. The input state is not modified.

        ``fast``: ``None`` (default) takes the packed inference path when it applies (autograd
        off, ``impl="auto"``, float32/float64 ``nn.Linear`` weights, no active dropout); ``False``
        forces the general path (``Block.forward``); ``True`` insists on the packed path.
        Both give the same outputs to float rounding, except with int8 inference on
        (:meth:`prepare_for_inference`): then the packed path has int8 weights and ``fast=False``
        is the float reference. With ``prepare_for_inference(compile=True)``, packed-path calls
        of one stream that complete one encoder frame (4 feature frames, given the cached ones),
        or a number of frames in ``compile_frames``, run the compiled step
        (:mod:`asr.model.token_step`).
        """
        packs = None
        if fast is not False and impl == "auto" and not torch.is_grad_enabled() and not (
            self.training and self.config.dropout > 0
        ):
            packs = self._packed_blocks()
        if fast and packs is None:
            raise RuntimeError("the packed inference path does not apply here (autograd on, impl "
                               "given, active dropout, or weights that are not float nn.Linear)")
        front = self._compiled_frontend(packs) if packs is not None and self._compile else None
        if front is not None and front.applies(features, state.subsampling):
            x, caches = front(features, state.subsampling, self.cmvn.mean, self.cmvn.istd)
        else:
            int8_front = self._int8_frontend() if packs is not None else None
            x, caches = self.subsampling.stream(self.cmvn(features), state.subsampling, int8=int8_front)
        if x.shape[1] == 0:
            logits = x.new_zeros(x.shape[0], 0, self.config.vocab_size)
            blocks = state.blocks
        else:
            if packs is not None and x.shape[0] == 1 and x.shape[1] in self._compile \
                    and x.dtype == torch.float32 and x.device.type == "cpu":
                logits, blocks = self._compiled_token_step(packs)(x[0], state.blocks)
                logits = logits.unsqueeze(0)
            elif packs is not None:
                logits, blocks = self._packed_blocks_and_head(x, state.blocks, packs)
            else:
                logits, blocks = self._blocks_and_head(x, state.blocks, impl)
        return logits, EncoderState(
            subsampling=caches,
            blocks=blocks,
            frames_in=state.frames_in + features.shape[1],
            frames_out=state.frames_out + logits.shape[1],
        )

    # ------------------------------------------------------------------ packed inference path
    def _packed_blocks_and_head(
        self, x: Tensor, states: list[BlockState], packs: list[PackedBlock]
    ) -> tuple[Tensor, list[BlockState]]:
        B, T, C = x.shape
        x = x.reshape(B * T, C)
        v_first = None
        new_states = []
        for pack, state in zip(packs, states):
            x, state, v_first = packed_step(pack, x, state, v_first, B, T, compiled_wkv=self.compiled_step)
            new_states.append(state)
        ln = self.ln_out
        x = F.layer_norm(x, (C,), ln.weight, ln.bias, ln.eps)
        return torch.addmm(self.head.bias, x, self.head.weight.t()).view(B, T, -1), new_states

    @property
    def int8_inference(self) -> bool:
        """Whether the packed inference path runs with int8 weights (:meth:`prepare_for_inference`)."""
        return getattr(self, "_int8", False)

    @property
    def compiled_step(self) -> bool:
        """Whether calls of one stream take a compiled step (:meth:`prepare_for_inference`)."""
        return bool(getattr(self, "_compile", ()))

    def prepare_for_inference(
        self, int8: bool = False, compile: bool = False, compile_frames: tuple[int, ...] = (1,), freeze: bool = False
    ) -> bool:
        """Build the packed weights of the inference step now (``step`` also builds them lazily on
        first use). Returns whether the packed path applies to this model (it does not to
        quantized or half-precision linear layers; those run the general path).

        ``int8=True`` switches the packed path to int8 weights (CPU, float32 models only; it stays
        on until ``prepare_for_inference(int8=False)``): the large matrices of every block (r, k,
        v, output, FFN key and value, the LoRA factors) get int8 weights with one scale per output
        channel; activations are quantized dynamically with one scale per row (frame), products
        run in ``torch._int_mm`` (oneDNN, exact int32 sums) and are scaled back to float32.
        So do the subsampling's second convolution and its projection, with one scale per
        output position and per frame (:class:`asr.model.subsampling.Int8Frontend`). Norms,
        biases, the wkv state and all element-wise math stay float32, as do the first convolution
        and the CTC head. Outputs then differ from float32 by the quantization error
        (about 1 % of the logits' range). Per-row scales keep a stream independent of the others in
        a batch, but streaming equals one pass only to that quantization noise, not to float
        rounding: float sums that differ in the last bit with the cut can round to different int8
        values (tests: within 3 % of the logits, same greedy tokens). ``forward`` without autograd
        takes the same int8 path; ``step(..., fast=False)`` is the float32 reference. Memory: ~2 bytes per block weight (two int8 layouts) instead of the
        float32 pack's 4.

        The pack holds a rearranged copy of every block matrix (~+85 % of the model's weight
        memory: 42 MB more for the default 12.4 M-parameter model).
        It is rebuilt automatically when any parameter is modified in place (optimizer steps,
        ``load_state_dict``, ``copy_``: their version counters change), replaced
        (``load_state_dict(assign=True)``) or moved/cast (``.to()``). After replacing submodules
        by hand, call :meth:`drop_inference_cache`.

        ``compile=True`` (CPU, float32 models; float32 or int8 packs; it stays on until
        ``prepare_for_inference(compile=False)``): ``step`` calls that bring exactly one new encoder
        frame of one stream (40 ms of audio, what a live recognizer sends) run the blocks, the final
        LayerNorm and the head as one function compiled by ``torch.compile``'s inductor backend
        (:mod:`asr.model.token_step`): ~2x faster per frame on one CPU thread, same results to float
        rounding (int8: to int8 rounding, as streaming vs one pass). When such a call brings exactly
        4 feature frames per encoder frame and the stream's caches are in one of the two phases
        an even number of feature frames leaves, CMVN and the subsampling run compiled too
        (:mod:`asr.model.frontend_step`, the same results: 0.8x the time of the whole int8 step). Other calls keep the packed
        path; in it, calls of several streams run the wkv state update compiled
        (:func:`asr.model.token_step.wkv_token_compiled`: 1.17-1.25x for 64-128 streams through
        ``step_batch`` at 40 ms per call, 2 threads). It compiles here, now: ~10-80 s and a working C++ compiler (inductor caches it on disk,
        so later processes take a few seconds); compile with the thread count you will run with
        (``torch.set_num_threads``), the generated code keeps it. Memory: one more copy of the block
        weights (float32 packs; int8: one byte per weight).

        ``compile_frames``: the encoder frames per call that get a compiled step, each its own
        function and compile (default: one frame, 40 ms). A call of T frames reads every weight
        once for all of them, so larger calls cost less per 40 ms of audio: ``(1, 4)`` also serves
        160 ms per call, the segment of a 160 ms-latency stream.

        ``freeze=True``: a promise that the parameters will not be modified in place from now on, so
        ``step`` stops checking their version counters (until the next ``prepare_for_inference``
        call without it, or :meth:`train`). Why: between two frames the
        compiled step streams ~11 MB of weights through the caches, and the check then walks 273
        cold parameter objects: ~0.15 ms a frame, against ~0.02 ms hot (bundled model, dev box,
        session 11), ~12 % of the compiled int8 step. ``load_state_dict`` and ``.to()`` still
        rebuild the packs (hooks, not counters); an optimizer step or an edit by hand is then
        not seen: call :meth:`drop_inference_cache` after one. ``asr.load_model`` and ``asr-live``
        freeze the models they load for ``int8`` or ``compile``."""
        int8, compile = bool(int8), bool(compile)
        self._frozen = bool(freeze)
        frames = tuple(sorted({int(t) for t in compile_frames})) if compile else ()
        if compile and (not frames or frames[0] < 1):
            raise ValueError(f"compile_frames must be frame counts >= 1, got {compile_frames!r}")
        if int8 or compile:
            w = self.ln_out.weight
            if w.device.type != "cpu" or w.dtype != torch.float32:
                what = "int8 inference" if int8 else "the compiled step"
                raise ValueError(f"{what} needs a float32 model on the CPU (this one: {w.dtype} on {w.device})")
        if int8:
            try:  # a private PyTorch op: fail here, in one line, rather than mid-stream
                torch._int_mm(torch.ones(1, 8, dtype=torch.int8), torch.ones(8, 8, dtype=torch.int8))
            except (AttributeError, RuntimeError, NotImplementedError) as err:
                raise ValueError(f"int8 inference needs torch._int_mm on the CPU, which torch {torch.__version__} "
                                 f"lacks ({' '.join(str(err).split())[:120]})") from None
        if int8 != self.int8_inference:
            self._int8 = int8
            self._packed = None
        if frames != self._compile:  # drop the weight copies (the compiled code stays for a later compile=True)
            for name in ("_token_step", "_front_step"):
                if getattr(self, name, None) is not None:
                    getattr(self, name).release()
                    setattr(self, name, None)
        self._compile = frames
        packs = self._packed_blocks()
        if compile and packs is not None:
            self._compiled_token_step(packs)  # compile now, not on the first frame of a stream
            self._compiled_frontend(packs)
            compiled_wkv_update(packs[0].n_heads, packs[0].head_size)  # and the batched wkv update
        return packs is not None

    def _compiled_token_step(self, packs: list[PackedBlock]) -> CompiledTokenStep:
        """The compiled one-token step on these packs (created, or its weights rebuilt, as needed)."""
        if getattr(self, "_token_step", None) is None:
            self._token_step = CompiledTokenStep(self._compile)
        self._token_step.update(packs, self.ln_out, self.head)
        return self._token_step

    def _compiled_frontend(self, packs: list[PackedBlock]) -> Optional[CompiledFrontend]:
        """The compiled streaming front end on the current weights (created, or its weights
        collected again, as needed), or None where the front end is not of the compiled form."""
        front = getattr(self, "_front_step", None)
        if front is not None and front.current(packs):  # the per-frame case
            return front
        if not CompiledFrontend.supports(self.subsampling) or self.cmvn.mean.dtype != torch.float32:
            return None
        if front is None:
            front = self._front_step = CompiledFrontend(self._compile)
        front.update(packs, self.subsampling, self.config.n_mels, self._int8_frontend())
        return front

    def train(self, mode: bool = True) -> "CTCModel":
        """``nn.Module.train``; training mode also ends ``prepare_for_inference(freeze=True)``: an
        optimizer is about to change the weights."""
        if mode:
            self._frozen = False
        return super().train(mode)

    def drop_inference_cache(self) -> None:
        """Forget the packed weights (rebuilt on the next fast ``step``)."""
        self._packed = None

    @staticmethod
    def _drop_packed_hook(module: "CTCModel", incompatible_keys: Any) -> None:
        module._packed = None

    def _apply(self, fn, *args, **kwargs):  # .to(), .cuda(), .double(), ...: new parameter data
        self._packed = None
        return super()._apply(fn, *args, **kwargs)

    def __getstate__(self):  # copies (deepcopy, pickle) rebuild their own pack
        state = dict(super().__getstate__())
        state["_packed"] = None
        state["_token_step"] = None  # compiled code is per process; rebuilt on the next compiled step
        state["_front_step"] = None
        return state

    def _packed_blocks(self) -> Optional[list[PackedBlock]]:
        """The packs, rebuilt if any parameter's version counter moved since they were built.

        Checking the version counters costs ~20 us per step when the parameter objects are in the
        caches, ~150 us when not (bundled model: 273 parameters); rebuilding, a few ms. A frozen
        model (``prepare_for_inference(freeze=True)``) skips the check.
        """
        cached = self._packed
        if cached is not None:
            params, versions, packs, _ = cached
            if getattr(self, "_frozen", False) or [p._version for p in params] == versions:
                return packs
        params = list(self.parameters())
        packs, front = None, None
        linears = [m for b in self.blocks for m in (b.att.receptance, b.att.key, b.att.value, b.att.output,
                                                      b.ffn.key, b.ffn.value)] + [self.head]
        if all(type(m) is nn.Linear and m.weight.dtype in (torch.float32, torch.float64) for m in linears):
            int8 = self.int8_inference
            if int8 and (self.head.weight.device.type != "cpu" or self.head.weight.dtype != torch.float32):
                raise RuntimeError("int8 inference needs a float32 model on the CPU; call "
                                   "prepare_for_inference(int8=False) before moving or casting it")
            with torch.no_grad():
                packs = [block.pack(int8=int8) for block in self.blocks]
            if int8 and type(self.subsampling.proj) is nn.Linear:  # not a torch.ao-quantized one
                front = self.subsampling.pack_int8()
        self._packed = (params, [p._version for p in params], packs, front)
        return packs

    def _int8_frontend(self) -> Optional[Int8Frontend]:
        """The front end's int8 weights when the int8 packed path runs; call right after
        :meth:`_packed_blocks` (which builds them and checks they are current)."""
        return None if self._packed is None else self._packed[3]

    # ------------------------------------------------------------------ training helpers
    def param_groups(self, weight_decay: float, lr: float) -> list[dict[str, Any]]:
        """AdamW groups as RWKV-LM trains: decay only on 2-D ``.weight`` matrices (not LoRA factors,
        not rho, not norms or biases), and twice the learning rate for the decay bias w0."""
        decay, no_decay, fast = [], [], []
        for name, param in self.named_parameters():
            if not param.requires_grad:
                continue
            if name.endswith("att.w0"):
                fast.append(param)
            elif name.endswith(".weight") and param.ndim == 2:  # norms and biases are 1-D
                decay.append(param)
            else:
                no_decay.append(param)
        return [
            {"params": decay, "weight_decay": weight_decay, "lr": lr, "name": "decay"},
            {"params": no_decay, "weight_decay": 0.0, "lr": lr, "name": "no_decay"},
            {"params": fast, "weight_decay": 0.0, "lr": 2 * lr, "name": "w0", "lr_scale": 2.0},
        ]

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())
