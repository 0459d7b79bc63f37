"""``torch._int_mm``: int8 x int8 -> int32 matrix product (oneDNN on the CPU), a private PyTorch op.

The one place the project calls it; tests/test_ops_private.py::test_int_mm names it, so a torch
release that drops or changes it fails there, not deep inside the int8 engine.
"""
from __future__ import annotations

import torch
from torch import Tensor


def int_mm(a: Tensor, b: Tensor) -> Tensor:
    """a [M, K] int8 @ b [K, N] int8 -> [M, N] int32, exact sums (``torch._int_mm``)."""
    return torch._int_mm(a, b)


def check_int_mm() -> None:
    """Raise ValueError (one line) where this torch has no CPU ``_int_mm``."""
    try:
        int_mm(torch.ones(1, 8, dtype=torch.int8), torch.ones(8, 8, dtype=torch.int8))
    except (AttributeError, RuntimeError, NotImplementedError) as err:
        raise ValueError(f"int8 inference needs torch._int_mm on the CPU, which torch {torch.__version__} "
                         f"lacks ({' '.join(str(err).split())[:120]})") from None
