"""Gradient diagnostics from the Gram matrix: the paper's conflict (GrC) and dominance (GrD).

Pure functions of ``G[i, j] = ⟨g_i, g_j⟩``; tensor operations only (no host synchronisation).
"""

from __future__ import annotations

import torch

__all__ = ["gradient_statistics"]


def gradient_statistics(gram: torch.Tensor) -> dict[str, torch.Tensor]:
    """Norms, cosines, conflict and dominance of k per-task gradients.

    * ``gram``: ``G``, ``(k, k)``.
    * ``norms``: ``‖g_i‖ = sqrt(G_ii)``, ``(k,)``.
    * ``cosine``: ``G_ij / (‖g_i‖ ‖g_j‖)``, ``(k, k)``; 0 where a gradient is zero.
    * ``conflict``: GrC ``= ⟨g_1, g_2⟩`` (scalar); the objectives conflict when it is < 0.
    * ``dominance``: GrD ``= ‖g_1‖ / ‖g_2‖`` (scalar); ``inf`` when only ``g_2`` is zero, 1 when
      both are.

    The first two tasks are the paper's (distillation, task) pair; for k > 2 read the matrices.
    """
    norms = gram.diagonal().clamp_min(0).sqrt()
    outer = norms[:, None] * norms[None, :]
    cosine = torch.where(outer > 0, gram / torch.where(outer > 0, outer, 1), 0)
    both_zero = (norms[0] == 0) & (norms[1] == 0)
    dominance = torch.where(both_zero, torch.ones_like(norms[0]), norms[0] / norms[1])
    return {
        "gram": gram,
        "norms": norms,
        "cosine": cosine,
        "conflict": gram[0, 1],
        "dominance": dominance,
    }
