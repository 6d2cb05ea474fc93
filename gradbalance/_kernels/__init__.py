"""The fused operations of the gradient engine, and the one place that picks their backend.

``gram(flat)`` and ``combine(flat, coefficients, out, accumulate=...)`` have the same meaning on
every backend (see :mod:`gradbalance._kernels.torch_backend`); CUDA tensors go to the Triton
kernels when Triton is installed (imported on first use) and k ≤ 16, everything else to plain
torch.
"""

from __future__ import annotations

import functools
from types import ModuleType

import torch

from . import torch_backend

__all__ = ["backend_for", "combine", "gram"]


@functools.cache
def _triton_backend() -> ModuleType | None:
    try:
        from . import triton_backend
    except ImportError:
        return None
    return triton_backend


def backend_for(flat: torch.Tensor) -> ModuleType:
    """The module that implements the fused operations for the ``(k, n)`` buffer ``flat``."""
    if flat.device.type == "cuda":
        triton_backend = _triton_backend()
        if triton_backend is not None and len(flat) <= triton_backend.MAX_ROWS:
            return triton_backend
    return torch_backend


def gram(flat: torch.Tensor) -> torch.Tensor:
    """``(k, k)`` float64 Gram matrix of the rows of ``flat`` ``(k, n)``."""
    return backend_for(flat).gram(flat)


def combine(
    flat: torch.Tensor, coefficients: torch.Tensor, out: torch.Tensor, *, accumulate: bool
) -> torch.Tensor:
    """``out ← (out +) Σ_i c_i flat[i]``, written in place into ``out`` ``(n,)``."""
    return backend_for(flat).combine(flat, coefficients, out, accumulate=accumulate)
