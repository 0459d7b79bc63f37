"""fla's chunked DPLR backward called on a stand-in for its autograd context.

Why: the ``asr::wkv7`` op cannot keep fla's autograd context between its forward and backward, and
recomputing the forward under autograd ran fla's forward twice per backward. fla's backward needs
only the inputs and the settings the forward resolved to, so it is called directly with them.

This leans on fla internals (``ChunkDPLRDeltaRuleFunction.backward`` and the context fields it
reads) as of :data:`FLA_VERSION`; another installed version is refused with a one-line error.
tests/test_ops_private.py::test_fla_backward names this module (it runs on a GPU with fla).
"""
from __future__ import annotations

from types import SimpleNamespace
from typing import Optional

from torch import Tensor

#: the fla release the context fields below were written for (``pip install fla-core==0.6.0``)
FLA_VERSION = "0.6.0"


def check_fla_version() -> None:
    """Raise RuntimeError (one line) unless the installed fla is :data:`FLA_VERSION`."""
    from importlib.metadata import PackageNotFoundError, version

    found = None
    for dist in ("fla-core", "flash-linear-attention"):
        try:
            found = version(dist)
            break
        except PackageNotFoundError:
            continue
    if found != FLA_VERSION:
        raise RuntimeError(f"asr.ops.fla_backward was written for fla {FLA_VERSION}, found {found}: "
                           f"install fla-core=={FLA_VERSION} or re-check the shim against the new fla")


def fla_chunk_backward(
    vectors: list[Tensor], initial: Optional[Tensor], grad_y: Tensor, grad_state: Tensor, chunk_size: int
) -> tuple[Tensor, ...]:
    """fla's backward of ``chunk_rwkv7(r, w, k, v, a, b, scale=1, safe_gate=True)`` at ``chunk_size``.

    ``vectors``: (r, w, k, v, a, b) as fla's forward took them ([B, T, H, N], bf16/fp16,
    contiguous); ``initial``: fla's [B, H, K, V] float32 state or None; ``grad_y`` in the kernel
    dtype, ``grad_state`` [B, H, K, V] float32. Returns (dr, dw, dk, dv, da, db, d_initial or None)."""
    check_fla_version()
    from fla.ops.generalized_delta_rule.dplr.chunk import ChunkDPLRDeltaRuleFunction

    q, gk, k, v, a, b = vectors
    context = SimpleNamespace(
        saved_tensors=(q, k, v, a, b, gk, initial),
        chunk_size=chunk_size,
        safe_gate=True,  # what fla's forward resolves lower_bound=-exp(-0.5) at 64-token chunks to
        scale=1.0,
        cu_seqlens=None,
        chunk_indices=None,
        cp_context=None,
        disable_recompute=False,
        _fwd_used_autocast=False,
        _dtype=q.dtype,
    )
    grads = ChunkDPLRDeltaRuleFunction.backward(context, grad_y.contiguous(), grad_state.contiguous())
    dq, dk, dv, da, db, dgk, dh0 = grads[0], grads[1], grads[2], grads[3], grads[4], grads[5], grads[7]
    return dq, dgk, dk, dv, da, db, dh0

