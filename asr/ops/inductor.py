"""Ahead-of-time compilation of a traced function with inductor, without dynamo.

Private PyTorch APIs used, all here: ``torch._inductor.compile``, ``torch._subclasses.fake_tensor``
and ``make_fx`` (tracing on fake tensors with a shape environment, so inductor's FX graph cache on
disk serves later processes). tests/test_ops_private.py::test_compile_graph names this module.

Why not ``torch.compile``: dynamo re-checks every Python int and input tensor it read on every
call (its guards, ~0.2-0.5 ms a token), and it guards on torch's thread count, so code that changes
it recompiled until the recompile limit. Here the caller guarantees the input shapes instead.
"""
from __future__ import annotations

import contextlib
import logging
from typing import Callable, Iterator

import torch
from torch import Tensor

Compiled = Callable[..., tuple[Tensor, ...]]


def compile_graph(fn: Compiled, examples: list[Tensor], symbolic: bool = False) -> Compiled:
    """``fn`` traced for inputs of exactly the examples' shapes, strides and dtypes, compiled by
    inductor (with its C++ wrapper unless ``symbolic``). ``symbolic``: sizes stay symbolic, so one
    compile serves any size of the traced dimensions. The examples must be distinct tensors: the
    trace takes one tensor given twice for one input and reads it for both."""
    from torch._inductor import compile as inductor_compile
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.proxy_tensor import make_fx
    from torch.fx.experimental.symbolic_shapes import ShapeEnv

    with _quiet_cpp_build(), torch.no_grad():
        if symbolic:
            gm = make_fx(fn, tracing_mode="symbolic")(*examples)
            return inductor_compile(gm, [n.meta["val"] for n in gm.graph.nodes if n.op == "placeholder"])
        fake_mode = FakeTensorMode(shape_env=ShapeEnv())
        fakes = [fake_mode.from_tensor(t, static_shapes=True) for t in examples]  # strides kept, memory unread
        gm = make_fx(fn)(*fakes)
        return inductor_compile(gm, fakes, options={"cpp_wrapper": True})


@contextlib.contextmanager
def _quiet_cpp_build() -> Iterator[None]:
    """Quiet two noise warnings of a compile: "No CUDA runtime is found" from
    torch.utils.cpp_extension on CPU-only machines, and inductor's disk cache failing to pickle a
    symbolic graph's key (the graph is then compiled without that cache)."""
    loggers = [logging.getLogger(name) for name in ("torch.utils.cpp_extension", "torch._inductor.codecache")]
    levels = [log.level for log in loggers]
    for log in loggers:
        log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for log, level in zip(loggers, levels):
            log.setLevel(level)
