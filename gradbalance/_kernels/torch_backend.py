"""The CPU (and fallback) backend of the fused operations, in plain torch.

Both functions work on one flat ``(k, n)`` buffer of per-task gradients, the layout the engine
keeps per (device, dtype).
"""

from __future__ import annotations

import torch

__all__ = ["GRAM_BLOCK_SIZE", "combine", "gram"]

# Elements per partial product in the Gram matrix. Each piece's product is accumulated in float32
# (fast GEMM); the pieces are summed in float64. A single float32 dot product over 1e7 elements
# loses about 4e-3 of π when cos(g_1, g_2) ≈ 0.999; pieces of 4096 keep it at 2e-6 to 4e-6
# (measured at cos ≈ 0.998; tests/test_engine.py asserts < 1e-5).
GRAM_BLOCK_SIZE = 4096


def gram(flat: torch.Tensor, block_size: int = GRAM_BLOCK_SIZE) -> torch.Tensor:
    """``G = J Jᵀ`` of the rows of ``flat`` ``(k, n)``: ``(k, k)`` float64.

    The columns are cut into pieces of ``block_size``; each piece's k×k product is computed in
    float32 (float16 and bfloat16 are upcast; float64 stays float64) and the pieces are summed in
    float64 in a fixed order, so the result is deterministic.
    """
    k, n = flat.shape
    if flat.dtype in (torch.float16, torch.bfloat16):
        flat = flat.float()
    whole = n - n % block_size
    partials = []
    if whole:
        pieces = flat[:, :whole].reshape(k, whole // block_size, block_size).transpose(0, 1)
        partials.append(torch.bmm(pieces, pieces.transpose(1, 2)).to(torch.float64).sum(dim=0))
    if whole < n or not whole:  # the remainder; also the whole of an empty buffer
        rest = flat[:, whole:]
        partials.append((rest @ rest.T).to(torch.float64))
    return partials[0] if len(partials) == 1 else partials[0] + partials[1]


def combine(
    flat: torch.Tensor, coefficients: torch.Tensor, out: torch.Tensor, *, accumulate: bool
) -> torch.Tensor:
    """``out ← Σ_i c_i flat[i]`` (or ``out + Σ_i c_i flat[i]`` when ``accumulate``), ``(n,)``.

    ``coefficients`` ``(k,)`` may be float64; they are cast to ``flat``'s dtype first. ``out`` has
    ``flat``'s dtype and is written in place; it is returned.
    """
    weights = coefficients.to(device=flat.device, dtype=flat.dtype)
    if accumulate:
        return out.addmv_(flat.T, weights)
    return torch.mv(flat.T, weights, out=out)
