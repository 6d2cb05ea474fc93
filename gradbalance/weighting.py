"""Task weightings: pure functions from a Gram matrix to the weights π.

Every function takes the k×k Gram matrix ``G[i, j] = ⟨g_i, g_j⟩`` of the per-task gradients
(any floating dtype, any device) and returns π of shape ``(k,)`` in float64 on the same device.
Only tensor operations are used — no ``.item()``, no data-dependent Python branches — so the
functions never synchronise a CUDA stream and can be captured in a CUDA graph.

The direction the optimizer follows is ``d = Σ_i π_i g_i``; ``‖d‖² = πᵀ G π``.
"""

from __future__ import annotations

import itertools
from functools import cache

import torch

__all__ = ["affine_weights", "loss_coefficients", "min_norm_weights"]

# Relative size (w.r.t. the mean diagonal of G) below which a quantity is treated as zero. G is
# scaled to unit mean diagonal first, so these are plain numbers of order float64's precision.
_RELATIVE_TOLERANCE = 1e-12
# Slack allowed when deciding that a face's stationary point lies inside the simplex.
_FEASIBILITY_TOLERANCE = 1e-9
# Larger k makes the 2^k - 1 faces too many to enumerate.
MAX_TASKS = 16


def min_norm_weights(gram: torch.Tensor) -> torch.Tensor:
    """The exact minimum-norm point of the convex hull of the gradients (SPEC §2, MGDA).

    Solves ``π* = argmin_{π ∈ Δ} ½ πᵀ G π`` over the simplex ``Δ = {π ≥ 0, Σ π_i = 1}``.

    * k = 2: the clipped closed form
      ``π_1 = clip((G22 − G12) / (G11 + G22 − 2 G12), 0, 1)``, ``π_2 = 1 − π_1``; when
      ``g_1 = g_2`` (denominator 0) π = (½, ½).
    * k > 2: exact, by enumerating the faces of the simplex: on each face the stationary point of
      the equality-constrained problem is solved in closed form, and the feasible one with the
      smallest ``πᵀGπ`` wins. This is vectorised over faces and needs no host synchronisation.

    A zero gradient gives π concentrated on it and ``d = 0``: the true min-norm answer (the point
    is Pareto-stationary). All-zero gradients give the uniform π.

    Args:
        gram: ``(k, k)`` symmetric positive semi-definite matrix, ``2 ≤ k ≤ 16``.

    Returns:
        π, ``(k,)`` float64, on the simplex.
    """
    scaled = _unit_scaled(gram)
    k = scaled.shape[0]
    if k == 2:
        return _two_task_min_norm(scaled)
    return _enumerated_min_norm(scaled)


def affine_weights(gram: torch.Tensor) -> torch.Tensor:
    """The paper's unconstrained solution (MoKD Theorem 3.1): min-norm point of the affine hull.

    ``π = G⁻¹1 / (1ᵀ G⁻¹ 1)`` — the constraint π ≥ 0 is dropped, so weights can be negative.
    Kept only to reproduce the paper. It is wrong as an update rule: for ``g_1 = (1, 0)`` and
    ``g_2 = (2, 0)`` it gives π = (2, −1) and ``d = 2 g_1 − g_2 = 0``, so two objectives that agree
    perfectly stop training. In general ``‖d‖² = det(G) / ‖g_1 − g_2‖²`` (k = 2), which vanishes
    whenever the gradients are parallel. :func:`min_norm_weights` gives π = (1, 0) here.

    The bordered KKT system ``[[G, 1], [1ᵀ, 0]] [π; −λ] = [0; 1]`` is solved, with G regularised
    by a ``1e-12`` relative ridge so that identical gradients give π = 1/k instead of NaN.

    Args:
        gram: ``(k, k)`` symmetric positive semi-definite matrix, ``k ≥ 2``.

    Returns:
        π, ``(k,)`` float64, summing to 1 (entries may be negative).
    """
    scaled = _unit_scaled(gram)
    support = torch.ones(1, scaled.shape[0], dtype=torch.bool, device=scaled.device)
    return _face_stationary_points(scaled, support)[0]


def loss_coefficients(
    weights: torch.Tensor, shifted_losses: torch.Tensor, *, normalize: bool
) -> torch.Tensor:
    """Coefficients c on the raw gradients ∇L_i that realise ``d = Σ_i π_i ∇log(L_i − m_i)``.

    ``c_i = π_i / D_i`` with ``D_i = L_i − m_i``, so ``Σ_i c_i ∇L_i = Σ_i π_i g_i = d`` (the paper's
    step). With ``normalize=True`` (FAMO's scaling) ``c_i = (π_i / D_i) / Σ_j (π_j / D_j)``: the
    coefficients sum to 1 and the update is a convex combination of the raw gradients.

    Args:
        weights: π, ``(k,)``. shifted_losses: D, ``(k,)``, positive.

    Returns:
        ``(k,)`` float64.
    """
    coefficients = weights.to(torch.float64) / shifted_losses.to(torch.float64)
    if normalize:
        coefficients = coefficients / coefficients.sum()
    return coefficients


def _unit_scaled(gram: torch.Tensor) -> torch.Tensor:
    """G in float64, symmetrised and divided by its mean diagonal (π is scale invariant)."""
    if gram.ndim != 2 or gram.shape[0] != gram.shape[1]:
        raise ValueError(f"gram must be a square (k, k) matrix, got shape {tuple(gram.shape)}")
    k = gram.shape[0]
    if not 2 <= k <= MAX_TASKS:
        raise ValueError(f"the weightings need 2 ≤ k ≤ {MAX_TASKS} tasks, got k = {k}")
    gram = gram.to(torch.float64)
    gram = 0.5 * (gram + gram.T)
    scale = gram.diagonal().mean()
    # All-zero G: any π is optimal; dividing by 1 keeps it zero and the solvers return 1/k.
    return gram / torch.where(scale > 0, scale, torch.ones_like(scale))


def _two_task_min_norm(gram: torch.Tensor) -> torch.Tensor:
    g11, g22, g12 = gram[0, 0], gram[1, 1], gram[0, 1]
    denominator = g11 + g22 - 2 * g12  # ‖g_1 − g_2‖²
    degenerate = denominator <= _RELATIVE_TOLERANCE
    safe = torch.where(degenerate, torch.ones_like(denominator), denominator)
    first = torch.where(degenerate, torch.full_like(g11, 0.5), ((g22 - g12) / safe).clamp(0, 1))
    return torch.stack([first, 1 - first])


def _enumerated_min_norm(gram: torch.Tensor) -> torch.Tensor:
    k = gram.shape[0]
    supports = _all_supports(k).to(gram.device)
    candidates = _face_stationary_points(gram, supports)  # (faces, k)
    # The ridge breaks ties between faces of equal norm towards the most spread-out π (all-zero
    # gradients: the uniform π), so the choice never depends on the order of the tasks.
    objective = torch.einsum("fi,ij,fj->f", candidates, _ridged(gram), candidates)
    feasible = (candidates >= -_FEASIBILITY_TOLERANCE).all(dim=1)
    objective = torch.where(feasible, objective, torch.full_like(objective, torch.inf))
    best = candidates[objective.argmin()].clamp_min(0)
    return best / best.sum()


@cache
def _all_supports(k: int) -> torch.Tensor:
    """Boolean masks of the 2^k − 1 non-empty faces of the k-simplex, ``(faces, k)``."""
    masks = list(itertools.product((False, True), repeat=k))[1:]
    return torch.tensor(masks, dtype=torch.bool)


def _ridged(gram: torch.Tensor) -> torch.Tensor:
    """G + εI: positive definite, so every bordered face system below is non-singular."""
    return gram + _RELATIVE_TOLERANCE * torch.eye(
        gram.shape[0], dtype=gram.dtype, device=gram.device
    )


def _face_stationary_points(gram: torch.Tensor, supports: torch.Tensor) -> torch.Tensor:
    """Stationary points of ``½ πᵀGπ`` on the affine hull of each face.

    For a face S, solves ``G_SS π_S = λ 1, Σ π_S = 1, π_{S^c} = 0``. Off-face rows and columns are
    replaced by the identity (with a zero right-hand side) so that all faces solve as one batch of
    (k+1)×(k+1) bordered systems.

    Args:
        gram: ``(k, k)`` float64, unit mean diagonal.
        supports: ``(faces, k)`` boolean masks.

    Returns:
        ``(faces, k)`` float64; each row sums to 1 and is zero off its face.
    """
    faces, k = supports.shape
    on_face = (supports[:, :, None] & supports[:, None, :]).to(gram.dtype)
    off_face = torch.diag_embed((~supports).to(gram.dtype))
    system = torch.zeros(faces, k + 1, k + 1, dtype=gram.dtype, device=gram.device)
    system[:, :k, :k] = on_face * _ridged(gram) + off_face
    system[:, :k, k] = supports.to(gram.dtype)
    system[:, k, :k] = supports.to(gram.dtype)
    rhs = torch.zeros(faces, k + 1, dtype=gram.dtype, device=gram.device)
    rhs[:, k] = 1
    solution, _ = torch.linalg.solve_ex(system, rhs)
    return solution[:, :k]
