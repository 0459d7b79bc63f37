"""Compilation for training: ``torch.compile`` of the encoder (``trainer.compile``) and the checks of
``trainer.cuda_graphs`` (the recorder itself is :mod:`asr.train.cuda_graphs`)."""
from __future__ import annotations

from typing import Optional, Union

import torch

from asr.train.errors import TrainConfigError


def compile_model(model: torch.nn.Module, scope: Union[bool, str] = "blocks", backend: str = "inductor") -> None:
    """torch.compile the encoder in place (trainer.compile), for fewer and fused GPU kernels.

    Why: at the bundled size an eager training step launches ~4,000 small kernels and the GPU waits
    on Python (tools/profile_train_step.py). Compiling in place (``Module.compile``) keeps parameter
    names and checkpoints as they are; ``dynamic=True`` keeps the bucketing sampler's changing shapes
    from recompiling. The wkv kernel is an opaque custom op under tracing (``asr::wkv7``), so no
    graph breaks (``fullgraph``: one would be a bug).

    ``scope``: ``"blocks"`` (or ``True``) compiles each block on its own (one graph per block, the
    identical ones served from inductor's cache). ``"model"`` traces the whole forward, front end to
    head, as one graph: no Python between blocks, but every block is compiled again. Inductor's
    coalescing analysis, which torch 2.11 runs on dynamic shapes and fails an assertion on with the
    whole model, is switched off; even so, on torch 2.11 (H100, BENCHMARKS.md) compiling the whole
    model for dynamic shapes did not finish within 5 minutes, with or without CUDA graphs on top.
    ``"cudagraphs"``: blocks as ``"blocks"``, and inductor replays each as a CUDA graph, recorded
    once per batch shape (``trainer.pad_frames_multiple`` and ``pad_batch_multiple`` keep the shapes
    few). On an H100 CUDA graphs made the step 2.9-3.4x faster for one fixed shape
    (tools/bench_train.py, BENCHMARKS.md); in training over the trainer's changing shapes (4x H200,
    BENCHMARKS.md) they trained correctly but gave 1.02x the eager step: each new shape records
    again, and the rest of the step stays eager. ``"fixed"``: the whole model, front end to head,
    compiled for each batch shape as it comes (``dynamic=False``) and replayed as CUDA graphs
    (``mode="reduce-overhead"``): with ``data.resident``'s few fixed shapes, the step of
    tools/bench_train.py's ``rwkv7_bundled_cudagraphs`` row on real data. ``backend``:
    torch.compile's (tests use ``"aot_eager"``, which traces without generating code).
    """
    from asr.ops.wkv7 import mark_constants_for_compile

    mark_constants_for_compile()
    options: Optional[dict] = None
    if backend == "inductor":
        options = {"triton.coalesce_tiling_analysis": False}
        if scope == "cudagraphs":
            options["triton.cudagraphs"] = True
    if scope == "model":
        model.compile(dynamic=True, fullgraph=True, backend=backend, options=options)
    elif scope == "fixed":
        # One graph per batch shape: data.resident makes a few; allow them all before dynamo gives up.
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
        mode = "reduce-overhead" if backend == "inductor" else None
        model.compile(mode=mode, dynamic=False, fullgraph=True, backend=backend)
    elif scope in (True, "blocks", "cudagraphs"):
        # Dynamo guards on each block's layer_id, so every block is its own graph (inductor's cache
        # makes the identical ones cheap): allow that many before it gives up.
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, len(model.blocks) + 8)
        for block in model.blocks:
            block.compile(dynamic=True, fullgraph=True, backend=backend, options=options)
    else:
        raise ValueError(f"trainer.compile must be false, true, 'blocks', 'model', 'cudagraphs' or 'fixed', not {scope!r}")



def check_activation_checkpointing(tc) -> None:
    """Refuse activation checkpointing with ``trainer.compile`` (``tc``: the ``trainer`` config)."""
    if tc.get("activation_checkpointing", False) and tc.get("compile", False):
        # Dynamo's checkpoint operator fails on dynamic shapes (torch 2.14), and the compiled
        # alternative (a zero activation-memory budget for the partitioner) saved no memory on an
        # H100 (BENCHMARKS.md): refuse at the start rather than quietly do neither.
        raise TrainConfigError("trainer.activation_checkpointing works with trainer.compile=false only")


def check_fixed_shapes(tc, dc) -> None:
    """Refuse ``trainer.compile=fixed`` without ``data.resident``, whose few batch shapes it needs
    (``tc``, ``dc``: the ``trainer`` and ``data`` configs)."""
    if tc.get("compile", False) == "fixed" and not dc.get("resident", False):
        raise TrainConfigError("trainer.compile=fixed compiles one graph per batch shape: use it with "
                               "data.resident=true, which makes a few fixed shapes")


def check_cuda_graphs(tc, device: torch.device, world_size: int) -> None:
    """Refuse, before any data is read, what trainer.cuda_graphs cannot do (asr.train.cuda_graphs)."""
    if not tc.get("cuda_graphs", False):
        return
    if device.type != "cuda":
        raise TrainConfigError("trainer.cuda_graphs needs a CUDA device (this run trains on the CPU)")
    if tc.get("compile", False) or tc.get("activation_checkpointing", False):
        raise TrainConfigError("trainer.cuda_graphs records the eager model: use it with trainer.compile=false "
                               "and trainer.activation_checkpointing=false")
    if world_size > 1:
        # On 2x H100, with the replayer wrapped in DDP, recording the first backward
        # failed (cudaErrorStreamCaptureImplicit: work on the legacy stream during the recording).
        raise TrainConfigError("trainer.cuda_graphs works on one GPU only for now (this run has "
                               f"{world_size} processes)")
