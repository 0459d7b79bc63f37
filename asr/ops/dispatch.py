"""Autograd back on inside a custom op's kernel, through ``torch._C``'s dispatch-key guards.

An op's kernel runs below the autograd dispatch key (its exclude set holds the autograd keys), so a
backward that recomputes a forward there records no graph without this. Private API:
``torch._C._ForceDispatchKeyGuard`` and the dispatch TLS sets; tests/test_ops_private.py::
test_autograd_inside_op names this module.
"""
from __future__ import annotations

import torch

_AUTOGRAD_KEYS = tuple(
    getattr(torch._C.DispatchKey, name)
    for name in ("AutogradOther", "AutogradNestedTensor", "AutogradCPU", "AutogradCUDA", "ADInplaceOrView")
    if hasattr(torch._C.DispatchKey, name)
)


def autograd_inside_op() -> "torch._C._ForceDispatchKeyGuard":
    """A context manager: the autograd keys removed from the thread's exclude set."""
    exclude = torch._C._dispatch_tls_local_exclude_set()
    for key in _AUTOGRAD_KEYS:
        exclude = exclude.remove(key)
    return torch._C._ForceDispatchKeyGuard(torch._C._dispatch_tls_local_include_set(), exclude)
