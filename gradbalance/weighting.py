"""Task weightings: pure functions from a Gram matrix to the weights π.

Every function takes the k×k Gram matrix ``G[i, j] = ⟨g_i, g_j⟩`` of the per-task gradients
(any floating dtype, any device, k ≥ 2) and returns π of shape ``(k,)`` in float64 on the same
device. The direction the optimizer follows is ``d = Σ_i π_i g_i``; ``‖d‖² = πᵀ G π``.

Synchronisation: :func:`affine_weights` and :func:`min_norm_weights` for k = 2 use tensor
operations only (no ``.item()``, no data-dependent Python branch), so they never synchronise a
CUDA stream. :func:`min_norm_weights` for k ≥ 3 runs an active-set method on the host: G is
copied to the CPU (one synchronisation on CUDA) and π is copied back.

Scaling. π is invariant under ``G → cG`` (c > 0), so G is first divided by its largest diagonal
entry: every entry is then at most ~1 in magnitude, whatever the input's exponent (1e-300 or
1e308). Gradient norms may still differ by many orders of magnitude; the linear algebra therefore
works on the correlation matrix ``C = G / (s sᵀ)``, ``s_i = ‖g_i‖ = √G_ii``, and any
regularisation is relative to each task's own norm.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

__all__ = ["Weighting", "affine_weights", "loss_coefficients", "min_norm_weights"]

# A weighting, as ``weighting=`` takes it: the (k, k) float64 Gram matrix G of the log-loss
# gradients ↦ π, a floating (k,) tensor (min_norm_weights, affine_weights, a torchjd Weighting).
Weighting = Callable[[torch.Tensor], torch.Tensor]

# Ridge added to the correlation matrix, C + εI, i.e. G + ε·diag(G): each task is regularised
# relative to its own squared norm, so a task 1e8 times smaller than another is not swamped (a
# ridge relative to the mean diagonal was). It makes every face system positive definite. Its
# effect on the optimum is bounded: ‖d‖² exceeds the exact minimum by at most ε Σ_i π*_i² ‖g_i‖².
_RIDGE = 1e-12
# After scaling to unit maximum diagonal, a task with G_ii at or below this is a zero gradient.
# Far below any real gradient's relative size, yet keeps √G_ii ≥ 1e-140, so 1/s_i and the
# lifted norms below stay finite.
_ZERO_GRADIENT = 1e-280
# Two gradients are duplicates when ‖g_i − g_j‖² ≤ this · (‖g_i‖² + ‖g_j‖²): a few ulps of the
# cancellation G_ii + G_jj − 2 G_ij, relative to the pair's own size (not to the largest task).
_DUPLICATE = 1e-15
# k = 2: ‖g_1 − g_2‖² below this (relative to the largest ‖g_i‖²) means g_1 = g_2, π = (½, ½).
_TWO_TASK_DEGENERATE = 1e-12
# Scale-free optimality test of the active-set method, a cosine-like number (see _gaps). Stopping
# at −τ leaves ‖d‖² at most ~τ²/ε (relative) above the ridged optimum: 1e-10 for τ = 1e-11.
_OPTIMALITY = 1e-11
# A step of the active-set method may leave ‖d̃‖² up to this (relative) above the best value seen:
# its rounding. Rejecting such steps would stop, for instance, before a far, nearly orthogonal
# gradient enters with a tiny weight that moves d by ~1e-8 relative but ‖d‖² by ~1e-16.
_VALUE_ROUNDING = 16 * np.finfo(np.float64).eps


def min_norm_weights(gram: torch.Tensor) -> torch.Tensor:
    """The exact minimum-norm point of the convex hull of the gradients (MGDA; docs/method.md):
    ``π* = argmin_{π ∈ Δ} ½ πᵀ G π`` over the simplex ``Δ = {π ≥ 0, Σ π_i = 1}``.

    k = 2: the clipped closed form ``π_1 = clip((G22 − G12) / (G11 + G22 − 2 G12), 0, 1)`` on
    gram's device, with no host synchronisation (π = (½, ½) for identical or zero gradients).
    k ≥ 3: Wolfe's minimum-norm-point algorithm (an exact active-set method) in float64 on the host
    — on CUDA one synchronisation — on the correlation matrix with a ridge of 1e-12 relative to
    each task's norm; zero and duplicate gradients are handled first, and the point does not
    depend on the order of the tasks. The tolerances are the constants at the top of this module;
    k = 16 takes ~1 ms (``benchmarks/scripts/solver_time.py``). Non-finite G gives π = NaN.

    Args:
        gram: ``(k, k)`` symmetric positive semi-definite, ``k ≥ 2``.

    Returns:
        π, ``(k,)`` float64 on gram's device, on the simplex.
    """
    _check_shape(gram)
    if gram.shape[0] == 2:
        return _two_task_min_norm(_max_scaled(gram))
    host = gram.detach().to(device="cpu", dtype=torch.float64).numpy()
    return torch.from_numpy(_host_min_norm(host)).to(gram.device)


def affine_weights(gram: torch.Tensor) -> torch.Tensor:
    """The paper's unconstrained solution (MoKD Theorem 3.1): min-norm point of the affine hull.

    ``π = G⁻¹1 / (1ᵀ G⁻¹ 1)`` — the constraint π ≥ 0 is dropped, so weights can be negative.
    Kept only to reproduce the paper. It is wrong as an update rule: for ``g_1 = (1, 0)`` and
    ``g_2 = (2, 0)`` it gives π = (2, −1) and ``d = 2 g_1 − g_2 = 0``, so two objectives that agree
    perfectly stop training. In general ``‖d‖² = det(G) / ‖g_1 − g_2‖²`` (k = 2), which vanishes
    whenever the gradients are parallel. :func:`min_norm_weights` gives π = (1, 0) here.

    Computed with Jacobi scaling, ``π ∝ a ⊙ (C + εI)⁻¹ a`` with ``C = G / (s sᵀ)``,
    ``a_i = 1 / s_i`` and ``ε = 1e-12`` (that is, G regularised by ``ε diag G``, relative to each
    task's own norm), so that identical gradients give π = 1/k instead of NaN. Weights of
    duplicate gradients (as in :func:`min_norm_weights`) are averaged so that they are equal.
    Zero gradients (``G_ii ≤ 1e-280 max_j G_jj``) give π uniform over them. Any k ≥ 2, torch
    operations only: no host synchronisation.

    Args:
        gram: ``(k, k)`` symmetric positive semi-definite matrix, ``k ≥ 2``.

    Returns:
        π, ``(k,)`` float64, summing to 1 (entries may be negative).
    """
    _check_shape(gram)
    scaled = _max_scaled(gram)
    diagonal = scaled.diagonal()
    zero = diagonal <= _ZERO_GRADIENT
    # Zero tasks get norm 1 so that the (then discarded) affine branch stays finite.
    norms = torch.where(zero, torch.ones_like(diagonal), diagonal.clamp_min(0).sqrt())
    ridged = scaled / norms[:, None] / norms[None, :] + _RIDGE * torch.eye(
        len(norms), dtype=scaled.dtype, device=scaled.device
    )
    inverse_norms = norms.min() / norms  # a, rescaled into (0, 1]; π is invariant to that
    solution, _ = torch.linalg.solve_ex(ridged, inverse_norms)
    affine = _average_duplicates(scaled, inverse_norms * solution)
    on_zero = zero.to(scaled.dtype)
    return torch.where(zero.any(), on_zero / on_zero.sum().clamp_min(1), affine / affine.sum())


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


# -- shared helpers ------------------------------------------------------------------------------


def _check_shape(gram: torch.Tensor) -> None:
    if gram.ndim != 2 or gram.shape[0] != gram.shape[1]:
        raise ValueError(f"gram must be a square (k, k) matrix, got shape {tuple(gram.shape)}")
    if gram.shape[0] < 2:
        raise ValueError(f"the weightings need k ≥ 2 tasks, got k = {gram.shape[0]}")


def _max_scaled(gram: torch.Tensor) -> torch.Tensor:
    """G in float64 divided by its largest diagonal entry, then symmetrised.

    Dividing first keeps every entry at most ~1, so neither the symmetrisation nor any later sum
    overflows for entries near float64's maximum. All-zero G is divided by 1 and stays zero.
    """
    gram = gram.to(torch.float64)
    scale = gram.diagonal().max()
    scaled = gram / torch.where(scale > 0, scale, torch.ones_like(scale))
    return 0.5 * (scaled + scaled.T)


def _duplicates(scaled: torch.Tensor) -> torch.Tensor:
    """``(k, k)`` bool: ``‖g_i − g_j‖² ≤ 1e-15 (‖g_i‖² + ‖g_j‖²)`` (reflexive)."""
    diagonal = scaled.diagonal()
    total = diagonal[:, None] + diagonal[None, :]
    return total - 2 * scaled <= _DUPLICATE * total


def _average_duplicates(scaled: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Each weight replaced by the mean over its duplicates: equal weights, the same sum."""
    same = _duplicates(scaled).to(weights.dtype)
    return (same @ weights) / same.sum(dim=1)


# -- k = 2 ---------------------------------------------------------------------------------------


def _two_task_min_norm(scaled: torch.Tensor) -> torch.Tensor:
    g11, g22, g12 = scaled[0, 0], scaled[1, 1], scaled[0, 1]
    denominator = g11 + g22 - 2 * g12  # ‖g_1 − g_2‖², relative to max(‖g_1‖², ‖g_2‖²)
    degenerate = denominator <= _TWO_TASK_DEGENERATE
    safe = torch.where(degenerate, torch.ones_like(denominator), denominator)
    first = torch.where(degenerate, torch.full_like(g11, 0.5), ((g22 - g12) / safe).clamp(0, 1))
    return torch.stack([first, 1 - first])


# -- k ≥ 3, on the host --------------------------------------------------------------------------


def _host_min_norm(gram: np.ndarray) -> np.ndarray:
    """:func:`min_norm_weights` for a float64 ``(k, k)`` array, k ≥ 3."""
    k = len(gram)
    if not np.isfinite(gram).all():
        return np.full(k, np.nan)
    scale = gram.diagonal().max()
    scaled = gram / scale if scale > 0 else gram
    scaled = 0.5 * (scaled + scaled.T)
    zero = scaled.diagonal() <= _ZERO_GRADIENT
    if zero.any():  # d = 0 is reachable: the minimum, with any split among the zero tasks
        return zero / zero.sum()
    labels = _duplicate_labels(scaled)
    representatives = np.unique(labels)
    reduced = _wolfe(scaled[np.ix_(representatives, representatives)])
    copies = np.bincount(labels, minlength=k)[labels]
    weights = np.zeros(k)
    weights[representatives] = reduced
    return weights[labels] / copies


def _duplicate_labels(scaled: np.ndarray) -> np.ndarray:
    """``labels[i]``: the lowest index of a task that duplicates task i (i itself if none)."""
    diagonal = scaled.diagonal()
    total = diagonal[:, None] + diagonal[None, :]
    same = total - 2 * scaled <= _DUPLICATE * total
    labels = np.arange(len(scaled))
    for i in range(len(scaled)):
        if labels[i] == i:  # a representative claims its later, still unclaimed copies
            labels[same[i] & (labels == np.arange(len(scaled))) & (np.arange(len(scaled)) > i)] = i
    return labels


def _wolfe(scaled: np.ndarray) -> np.ndarray:
    """Wolfe's minimum-norm-point algorithm on the ridged, correlation-scaled problem.

    With ``y = π ⊙ s`` and ``C̃ = C + εI`` the problem is ``min yᵀ C̃ y`` subject to ``y ≥ 0``,
    ``Σ_i y_i / s_i = 1``: the min-norm point of the lifted gradients ``(g_i, √ε s_i e_i)``,
    which are affinely independent, so every face has a unique stationary point (_face_minimizer)
    and ‖d‖ > 0. Each major step adds the task that violates optimality most (lowest index on
    exact ties); the minor steps move towards the face's stationary point and drop tasks whose
    weight reaches 0, until the stationary point is inside the face. In exact arithmetic ‖d‖
    decreases strictly at every major step, so no support repeats and the method is finite.
    Against rounding (anti-cycling): a step that would repeat a support, or raise ‖d̃‖² beyond
    16 ulp, ends the method at the current point; so does the cap of ``50 r + 100`` steps.

    Args:
        scaled: ``(r, r)`` Gram matrix of distinct, nonzero gradients, unit maximum diagonal.

    Returns:
        π, ``(r,)``, on the simplex.
    """
    norms = np.sqrt(scaled.diagonal())
    ridged = _nearest_psd(scaled / np.outer(norms, norms)) + _RIDGE * np.eye(len(norms))
    weights = np.zeros(len(norms))
    weights[np.argmin(norms)] = 1.0  # the vertex nearest to 0
    value, gaps = _gaps(ridged, norms, weights)
    seen = {(weights > 0).tobytes()}
    for _ in range(50 * len(norms) + 100):
        gaps[weights > 0] = np.inf  # the support is stationary already
        entering = int(np.argmin(gaps))
        if gaps[entering] >= -_OPTIMALITY:
            break
        candidate = _minor_steps(ridged, norms, weights, entering)
        candidate_value, candidate_gaps = _gaps(ridged, norms, candidate)
        support = (candidate > 0).tobytes()
        # Exact arithmetic lowers ‖d̃‖ at every step, so no support repeats. A repeat, or a rise
        # beyond rounding, means rounding dominates: stop at the best point.
        if support in seen or not candidate_value <= value * (1 + _VALUE_ROUNDING):
            break
        seen.add(support)
        weights, value, gaps = candidate, min(value, candidate_value), candidate_gaps
    return weights / weights.sum()


def _nearest_psd(correlation: np.ndarray) -> np.ndarray:
    """C itself when it is PSD, else C with its negative eigenvalues set to 0.

    A Gram matrix accumulated in floating point (float32 pieces, say) can be slightly indefinite,
    and in correlation scaling its errors are relative to each task's own norm: they can exceed
    the ridge. The lifted gradients below need C + εI positive definite.
    """
    eigenvalues, eigenvectors = np.linalg.eigh(correlation)
    if eigenvalues[0] >= 0:
        return correlation
    projected = (eigenvectors * np.maximum(eigenvalues, 0)) @ eigenvectors.T
    return 0.5 * (projected + projected.T)


def _gaps(ridged: np.ndarray, norms: np.ndarray, weights: np.ndarray) -> tuple[float, np.ndarray]:
    """‖d̃‖² and the scale-free optimality test of every task in the lifted (ridged) problem.

    ``gap_j = (⟨g̃_j, d̃⟩ − ‖d̃‖²) / (‖g̃_j‖ ‖d̃‖)`` with ``⟨g̃_j, d̃⟩ = s_j (C̃ y)_j`` and
    ``‖g̃_j‖ = s_j √C̃_jj`` (= s_j √(1 + ε)); π is optimal iff every gap is ≥ 0 (0 on the
    support).
    """
    direction = ridged @ (weights * norms)  # C̃ y
    value = float((weights * norms) @ direction)  # ‖d̃‖² ≥ ε Σ y_i² > 0
    gaps = (direction - value / norms) / np.sqrt(ridged.diagonal() * value)
    return value, gaps


def _minor_steps(
    ridged: np.ndarray, norms: np.ndarray, weights: np.ndarray, entering: int
) -> np.ndarray:
    """From π (zero at ``entering``), the minor cycle of Wolfe's algorithm on S ∪ {entering}.

    Returns π on the final support S', the stationary point of S' with all weights positive.
    Each pass either ends or removes at least one task, so there are at most |S| + 1 passes.
    """
    weights = weights.copy()
    support = weights > 0
    support[entering] = True
    while True:
        target = _face_minimizer(ridged, norms, support)
        if (target[support] > 0).all():
            return target
        # Largest step towards the target that keeps π ≥ 0; the blocking tasks leave the face.
        current, goal = weights[support], target[support]
        blocked = goal <= 0
        ratios = np.where(current[blocked] > 0, current[blocked], 0.0) / np.maximum(
            current[blocked] - goal[blocked], np.finfo(float).tiny
        )
        step = ratios.min()
        moved = current + step * (goal - current)
        moved[np.flatnonzero(blocked)[np.argmin(ratios)]] = 0.0  # exactly, whatever rounding
        weights[support] = np.maximum(moved, 0.0)
        support = weights > 0


def _face_minimizer(ridged: np.ndarray, norms: np.ndarray, support: np.ndarray) -> np.ndarray:
    """The stationary point of the ridged problem on the affine hull of the face ``support``.

    ``G̃_SS π_S = λ 1, Σ π_S = 1`` in Jacobi scaling: ``x = C̃_SS⁻¹ a_S``, ``π_S ∝ a_S ⊙ x`` with
    ``a_i = 1 / s_i`` (rescaled into (0, 1]; π is invariant to that). ``aᵀx > 0`` as C̃ is
    positive definite.
    """
    inverse_norms = norms[support].min() / norms[support]
    raw = inverse_norms * np.linalg.solve(ridged[np.ix_(support, support)], inverse_norms)
    target = np.zeros(len(norms))
    target[support] = raw / raw.sum()
    return target
