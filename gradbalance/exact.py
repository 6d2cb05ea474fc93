"""The step of the exact and affine modes, from the per-task gradients' Gram matrix: pure functions.

The engine computes the per-task gradients as rows ``r_i = ρ_i ∇̄L_i`` — ``∇̄L_i`` the gradient of
loss i (the mean over the micro-batches of an accumulation window), ``ρ_i`` the scale it was
computed with (``S / D_i`` for the window's first micro-batch, ``S`` a grad scaler's scale,
``D_i = L_i − m_i``). With ``D̄_i`` the window's mean shifted loss, the log-loss gradients
(docs/method.md, "Objectives") are ``g_i = ∇̄L_i / D̄_i = f_i r_i`` with ``f_i = 1 / (ρ_i D̄_i)``:
one scale per row, so the Gram matrix of the g_i is the rows' Gram matrix ``R`` rescaled, and the
direction ``d = Σ π_i g_i`` is a combination of the rows. The rows are of order one whatever the
scale of the losses, so their float32 products neither underflow nor overflow.
"""

from __future__ import annotations

import torch

from .weighting import loss_coefficients

__all__ = ["log_loss_gram", "row_coefficients", "row_scale"]


def row_scale(shifted: torch.Tensor, scale: torch.Tensor | None) -> torch.Tensor:
    """``ρ_i = S / D_i``, ``(k,)`` float64: the scale to compute the per-task gradients with.

    ``D_i`` that is not positive and finite (a micro-batch inside a window may be at its bound;
    invalid losses are refused later) gets ``ρ_i = S``, so that the rows stay finite.
    """
    usable = shifted.isfinite() & (shifted > 0)
    rho = torch.where(usable, 1 / torch.where(usable, shifted, 1), 1).to(torch.float64)
    return rho if scale is None else rho * scale


def log_loss_gram(
    row_gram: torch.Tensor, rho: torch.Tensor, shifted_mean: torch.Tensor
) -> torch.Tensor:
    """``G_ij = f_i f_j R_ij`` with ``f_i = 1 / (ρ_i D̄_i)``: the Gram matrix of the log-loss
    gradients, ``(k, k)`` float64.

    Args:
        row_gram: ``R``, the rows' Gram matrix, ``(k, k)``. rho: ``ρ``, ``(k,)``.
        shifted_mean: ``D̄``, ``(k,)``, positive.
    """
    factors = 1 / (rho.to(torch.float64) * shifted_mean.to(torch.float64))
    return row_gram.to(torch.float64) * (factors[:, None] * factors[None, :])


def row_coefficients(
    weights: torch.Tensor,
    rho: torch.Tensor,
    shifted_mean: torch.Tensor,
    scale: torch.Tensor | None,
    *,
    normalize: bool,
) -> torch.Tensor:
    """Coefficients on the rows that give ``S · d``: ``S c_i / ρ_i``, ``(k,)`` float64.

    ``c = loss_coefficients(π, D̄, normalize)`` are the coefficients on the raw gradients
    (:func:`gradbalance.weighting.loss_coefficients`); ``∇̄L_i = r_i / ρ_i``. ``.grad`` holds the
    scaled direction ``S · d`` for the grad scaler to unscale.
    """
    coefficients = loss_coefficients(weights, shifted_mean, normalize=normalize) / rho
    return coefficients if scale is None else coefficients * scale
