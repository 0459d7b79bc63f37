"""Export a :class:`~asr.model.CTCModel` to ONNX: the streaming step as a graph with its state as
inputs and outputs, in float32 and (optionally) int8, for :class:`asr.export.runtime.OnnxEncoder`.

One graph, :class:`StreamingStepGraph`, serves both streaming and whole utterances. It takes
``4 * frames`` new feature frames and returns the logits of ``frames`` encoder frames:

    inputs   features     [B, 4T, n_mels]  raw log-mel (CMVN is in the graph)
             valid        [B, 4T]          1.0 for real frames, 0.0 for the pre-roll (below)
             conv1_cache  [B, 1, 1, n_mels] the last CMVN'd feature frame seen
             conv2_cache  [B, C_sub, 1, F1] the last output of the first convolution
             shifts       [L, 2, B, D]     per block: time-mix and channel-mix token shifts
             wkv          [L, B, H, N, N]  per block: the wkv state (float32)
    outputs  logits       [B, T, V]        CTC logits (as ``CTCModel.step``), then the new state
             under the same names with ``_out`` appended.

Why the pre-roll: the model's causal subsampling emits encoder frame j once feature frame 4j has
arrived (``CTCModel.step`` outputs ``ceil(n / 4)`` frames for n features). A fixed-shape graph
that eats 4 features per frame emits at the same moments when a stream starts with three
*invalid* frames: the features ``[pad, pad, pad, f0]`` complete frame 0, and every later call
``f(4j-3) .. f(4j)`` completes frame j. ``valid`` zeroes the pad frames after CMVN and the first
convolution's outputs whose window ends on a pad frame, which is exactly the zero left padding of
the PyTorch model; its caches then hold one frame each. So the graph's outputs equal
``CTCModel.step``'s for any cut of the input (the runtime buffers < 4 pending frames), and a
whole utterance is the same graph run over it (``OnnxEncoder.forward``).

The graph is traced from the public model API (the modules' own ``forward``s, the blocks through
``Block.forward`` with the recurrent wkv form: ONNX has no triangular solve for the chunked form),
with the TorchScript-based exporter (``torch.onnx.export(dynamo=False)``). Why not the
torch.export-based one: under ``torch.export`` the wkv recurrence is the opaque custom op
``asr::wkv7`` (so that ``torch.compile`` does not trace into fla), which has no ONNX translation;
tracing runs the plain PyTorch loop. The number of frames per call is fixed at export (the wkv
time loop is unrolled); the batch size is a dynamic axis.

int8: :func:`quantize_int8` runs ONNX Runtime's dynamic quantization (int8 weights per output
channel, activations quantized per call by ``DynamicQuantizeLinear``) over the matrix products.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from asr.model import CTCModel
from asr.model.rwkv7 import BlockState

#: feature frames (10 ms) per encoder frame (40 ms)
FEATURES_PER_FRAME = 4
#: invalid frames a stream starts with (module docstring): 4j-3 .. 4j complete frame j
PRE_ROLL = FEATURES_PER_FRAME - 1
INPUT_NAMES = ["features", "valid", "conv1_cache", "conv2_cache", "shifts", "wkv"]
STATE_NAMES = INPUT_NAMES[2:]
OUTPUT_NAMES = ["logits"] + [f"{name}_out" for name in STATE_NAMES]
META_FILE = "onnx_model.json"
FORMAT = "rwkv-asr onnx v1"


def step_file(frames: int, int8: bool = False) -> str:
    """The file name of the graph of ``frames`` encoder frames per call in an export folder."""
    return f"encoder_step{frames}{'.int8' if int8 else ''}.onnx"


class StreamingStepGraph(nn.Module):
    """The streaming step of ``model`` over ``frames`` encoder frames, with the state flattened into
    tensors (module docstring): the module :func:`export_onnx` traces."""

    def __init__(self, model: CTCModel, frames: int = 1):
        super().__init__()
        if frames < 1:
            raise ValueError(f"frames per call must be >= 1, got {frames}")
        self.model = model
        self.frames = frames

    def forward(self, features: Tensor, valid: Tensor, conv1_cache: Tensor, conv2_cache: Tensor,
                shifts: Tensor, wkv: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        m = self.model
        sub = m.subsampling
        x = (m.cmvn(features) * valid.unsqueeze(-1)).unsqueeze(1)  # [B, 1, 4T, n_mels]
        x = torch.cat([conv1_cache, x], dim=2)  # [B, 1, 4T + 1, n_mels]: windows at 0, 2, ...
        y = F.relu(sub.conv1.conv(x)) * valid[:, None, 1::2, None]  # [B, C, 2T, F1]
        z = torch.cat([conv2_cache, y], dim=2)  # [B, C, 2T + 1, F1]
        z2 = F.relu(sub.conv2.conv(z))  # [B, C, T, F2]
        h = sub.proj(z2.transpose(1, 2).flatten(2))  # [B, T, D], (C, F) as ConvSubsampling
        v_first = None
        new_shifts, new_wkv = [], []
        for i, block in enumerate(m.blocks):
            state = BlockState(tmix_prev=shifts[i, 0], wkv=wkv[i], cmix_prev=shifts[i, 1])
            h, state, v_first = block(h, state, v_first, impl="recurrent")
            new_shifts.append(torch.stack([state.tmix_prev, state.cmix_prev]))
            new_wkv.append(state.wkv)
        logits = m.head(m.ln_out(h))
        return logits, x[:, :, -1:], y[:, :, -1:], torch.stack(new_shifts), torch.stack(new_wkv)


def state_shapes(model: CTCModel, batch: int) -> dict[str, list[int]]:
    """The shapes of the state inputs of the graph for ``batch`` streams."""
    cfg = model.config
    f1 = (cfg.n_mels - 3) // 2 + 1  # the first convolution: kernel 3, stride 2, no padding
    return {
        "conv1_cache": [batch, 1, 1, cfg.n_mels],
        "conv2_cache": [batch, cfg.subsample_channels, 1, f1],
        "shifts": [cfg.n_layers, 2, batch, cfg.d_model],
        "wkv": [cfg.n_layers, batch, cfg.d_model // cfg.head_size, cfg.head_size, cfg.head_size],
    }


def example_inputs(model: CTCModel, frames: int, batch: int = 1) -> tuple[Tensor, ...]:
    """Inputs of the step graph for a stream start (zero state, the pre-roll invalid)."""
    n = FEATURES_PER_FRAME * frames
    valid = torch.ones(batch, n)
    valid[:, :PRE_ROLL] = 0.0
    state = [torch.zeros(shape) for shape in state_shapes(model, batch).values()]
    return (torch.randn(batch, n, model.config.n_mels), valid, *state)


def export_step(model: CTCModel, path: Path, frames: int = 1, opset: int = 17) -> Path:
    """Trace the step of ``frames`` encoder frames per call into the ONNX file ``path``."""
    import warnings

    graph = StreamingStepGraph(model.eval(), frames)
    dynamic = {name: {0: "batch"} for name in ("features", "valid", "conv1_cache", "conv2_cache", "logits",
                                                 "conv1_cache_out", "conv2_cache_out")}
    dynamic.update({name: {2: "batch"} for name in ("shifts", "shifts_out")})
    dynamic.update({name: {1: "batch"} for name in ("wkv", "wkv_out")})
    with torch.no_grad(), warnings.catch_warnings():
        # the legacy exporter's deprecation notice and the tracer's notes on shapes read as
        # Python ints (frames per call and model sizes: fixed in the graph by design)
        warnings.simplefilter("ignore")
        torch.onnx.export(graph, example_inputs(model, frames), str(path), dynamo=False, opset_version=opset,
                          input_names=INPUT_NAMES, output_names=OUTPUT_NAMES, dynamic_axes=dynamic,
                          do_constant_folding=True)
    return path


#: matrix products with fewer weights stay float32 in the int8 graphs: the LoRA factors (C x 32
#: .. C x 64), 7 % of the bundled model's weights. Quantizing them too gave the same step time
#: (bundled model, one thread: 1.29x against 1.28x the compiled int8 step, one run), so they keep
#: float32 precision.
INT8_MIN_WEIGHTS = 65536


def quantize_int8(src: Path, dst: Path, min_weights: int = INT8_MIN_WEIGHTS) -> Path:
    """ONNX Runtime's dynamic int8 quantization of ``src`` written to ``dst``: the weights of the
    matrix products with at least ``min_weights`` weights in int8 (per output channel,
    symmetric), their inputs quantized per call (per tensor) by ``DynamicQuantizeLinear``."""
    import logging

    import numpy as np
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    graph = onnx.load(str(src), load_external_data=False).graph
    sizes = {init.name: int(np.prod(init.dims)) for init in graph.initializer}
    small = [node.name for node in graph.node if node.op_type in ("MatMul", "Gemm")
             and max((sizes.get(name, 0) for name in node.input), default=0) < min_weights]
    logging.disable(logging.WARNING)  # its advice to pre-process, which is for static quantization
    try:
        quantize_dynamic(str(src), str(dst), weight_type=QuantType.QInt8, per_channel=True,
                         op_types_to_quantize=["MatMul", "Gemm"], nodes_to_exclude=small)
    finally:
        logging.disable(logging.NOTSET)
    return dst


def export_onnx(model: CTCModel, out_dir: Path, frames: Sequence[int] = (1, 16), int8: bool = True,
                tokenizer_bytes: Optional[bytes] = None) -> dict:
    """Write the step graphs of ``frames`` encoder frames per call (float32 and, with ``int8``,
    int8), the tokenizer and a metadata file (``onnx_model.json``) into ``out_dir``.

    The smallest entry of ``frames`` serves streaming, the largest whole utterances
    (:class:`asr.export.runtime.OnnxEncoder`). Returns the metadata."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    frames = sorted({int(t) for t in frames})
    if not frames or frames[0] < 1:
        raise ValueError(f"frames per call must be counts >= 1, got {frames}")
    files: dict[str, dict[str, str]] = {}
    for t in frames:
        files[str(t)] = {"float32": export_step(model, out_dir / step_file(t), t).name}
        if int8:
            files[str(t)]["int8"] = quantize_int8(out_dir / step_file(t), out_dir / step_file(t, int8=True)).name
    meta = {"format": FORMAT, "config": model.config.to_dict(), "features_per_frame": FEATURES_PER_FRAME,
            "pre_roll": PRE_ROLL, "state_shapes": state_shapes(model, 1), "files": files,
            "torch": torch.__version__}
    if tokenizer_bytes is not None:
        (out_dir / "tokenizer.model").write_bytes(tokenizer_bytes)
        meta["tokenizer"] = "tokenizer.model"
    (out_dir / META_FILE).write_text(json.dumps(meta, indent=1) + "\n")
    return meta
