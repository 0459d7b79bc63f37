"""The acoustic model: CMVN -> causal x4 subsampling -> RWKV-7 blocks -> LayerNorm -> CTC head.

A plain ``nn.Module`` (no caches), the reference for training and for the inference engine
(:class:`asr.infer.InferenceEncoder`, which runs the same block arithmetic with faster products).
Two ways to run it:

- ``forward(features, lengths)``: whole padded batches (training, batch transcription). The wkv
  recurrence runs chunk-parallel (fla on CUDA, our chunked form on CPU).
- ``init_state(batch)`` / ``step(features, state)``: any number of new feature frames at a time, the
  state carried explicitly (streaming). Its size is constant: per layer two C-vectors and one
  H x 64 x 64 wkv state, plus a few cached feature frames for the subsampling.

Both share every line except the wkv form, so streaming output equals offline output to float
tolerance for any split of the input (tests/test_model_parity.py).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any, Optional

import torch
import torch.utils.checkpoint
from torch import Tensor, nn

from asr.features import GlobalCMVN
from asr.model.rwkv7 import Block, BlockState, default_lora_ranks
from asr.model.subsampling import ConvSubsampling


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

    def advance(self, caches: tuple[Tensor, Tensor], blocks: list[BlockState], frames_in: int,
                frames_out: int) -> "EncoderState":
        """The state after a step that consumed ``frames_in`` feature frames and emitted ``frames_out``."""
        return EncoderState(caches, blocks, self.frames_in + frames_in, self.frames_out + frames_out)

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
        """
        x = self._run(self.subsampling, self.cmvn(features))
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

    def step(self, features: Tensor, state: EncoderState, impl: str = "auto") -> tuple[Tensor, EncoderState]:
        """Feed new raw feature frames [B, t, n_mels] (t >= 0); return the logits of the encoder
        frames they complete [B, t', V] and the new state. The input state is not modified."""
        x, caches = self.subsampling.stream(self.cmvn(features), state.subsampling)
        if x.shape[1] == 0:
            logits, blocks = x.new_zeros(x.shape[0], 0, self.config.vocab_size), state.blocks
        else:
            logits, blocks = self._blocks_and_head(x, state.blocks, impl)
        return logits, state.advance(caches, blocks, features.shape[1], logits.shape[1])

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
