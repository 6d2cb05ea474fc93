"""Mathematical properties of the weightings, on random and hand-made Gram matrices."""

from fractions import Fraction

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from gradbalance.diagnostics import gradient_statistics
from gradbalance.weighting import affine_weights, loss_coefficients, min_norm_weights

finite = st.floats(-10, 10, allow_nan=False, allow_infinity=False, width=64)


@st.composite
def jacobians(draw, min_tasks=2, max_tasks=6):
    """k gradients in R^n; rows are sometimes zeroed or duplicated to hit the degenerate cases."""
    k = draw(st.integers(min_tasks, max_tasks))
    n = draw(st.integers(1, 8))
    matrix = draw(arrays(np.float64, (k, n), elements=finite))
    for row in draw(st.lists(st.integers(0, k - 1), max_size=2)):
        matrix[row] = 0.0
    if draw(st.booleans()):
        matrix[k - 1] = matrix[0]
    return torch.from_numpy(matrix)


def reference_two_task(gram: np.ndarray) -> np.ndarray:
    """The k = 2 closed form of docs/method.md, written independently of the library."""
    g11, g22, g12 = gram[0, 0], gram[1, 1], gram[0, 1]
    denominator = g11 + g22 - 2 * g12
    first = 0.5 if denominator <= 1e-12 * max(g11 + g22, 1e-300) else (g22 - g12) / denominator
    first = min(max(first, 0.0), 1.0)
    return np.array([first, 1 - first])


def assert_min_norm_kkt(gram: torch.Tensor, weights: torch.Tensor, tol: float = 1e-7) -> None:
    """KKT of min ½πᵀGπ on the simplex: Gπ = λ on the support, Gπ ≥ λ off it (λ = πᵀGπ)."""
    scale = max(gram.diagonal().abs().max().item(), 1e-300)
    product = (gram @ weights) / scale
    multiplier = (weights @ gram @ weights) / scale
    assert torch.all(product >= multiplier - tol), (product, multiplier)
    support = weights > 1e-9
    assert torch.allclose(product[support], multiplier.expand(int(support.sum())), atol=tol)


@given(jacobians())
@settings(max_examples=300, deadline=None)
def test_min_norm_weights_lie_on_the_simplex_and_satisfy_kkt(jacobian):
    gram = jacobian @ jacobian.T
    weights = min_norm_weights(gram)
    assert weights.dtype == torch.float64
    assert torch.all(weights >= 0)
    assert weights.sum().item() == pytest.approx(1.0, abs=1e-12)
    assert_min_norm_kkt(gram, weights)


@given(jacobians())
@settings(max_examples=300, deadline=None)
def test_min_norm_direction_conflicts_with_no_objective(jacobian):
    gram = jacobian @ jacobian.T
    direction = min_norm_weights(gram) @ jacobian
    scale = max(gram.diagonal().max().item(), 1e-300)
    assert torch.all(jacobian @ direction >= -1e-7 * scale)


@given(jacobians(max_tasks=2))
@settings(max_examples=300, deadline=None)
def test_two_tasks_match_the_clipped_closed_form(jacobian):
    gram = jacobian @ jacobian.T
    expected = reference_two_task(gram.numpy())
    # Where ‖g_1 − g_2‖ vanishes every π gives the same d; compare directions there.
    direction = min_norm_weights(gram) @ jacobian
    np.testing.assert_allclose(direction.numpy(), expected @ jacobian.numpy(), atol=1e-6)


@given(jacobians(min_tasks=3), st.randoms())
@settings(max_examples=200, deadline=None)
def test_permuting_the_tasks_permutes_nothing_but_the_weights(jacobian, rng):
    order = list(range(len(jacobian)))
    rng.shuffle(order)
    permuted = jacobian[order]
    direction = min_norm_weights(jacobian @ jacobian.T) @ jacobian
    permuted_direction = min_norm_weights(permuted @ permuted.T) @ permuted
    scale = max(jacobian.abs().max().item(), 1.0)
    torch.testing.assert_close(direction, permuted_direction, atol=1e-6 * scale, rtol=0)


@pytest.mark.parametrize("k", [3, 4, 7])
def test_generic_gram_has_a_unique_permutation_equivariant_solution(k):
    generator = torch.Generator().manual_seed(k)
    jacobian = torch.randn(k, 3 * k, generator=generator, dtype=torch.float64)
    order = torch.randperm(k, generator=generator)
    weights = min_norm_weights(jacobian @ jacobian.T)
    permuted = min_norm_weights(jacobian[order] @ jacobian[order].T)
    torch.testing.assert_close(permuted, weights[order])


def test_min_norm_matches_a_dense_grid_search_for_three_tasks():
    generator = torch.Generator().manual_seed(3)
    jacobian = torch.randn(3, 2, generator=generator, dtype=torch.float64) + torch.tensor([2.0, 0])
    gram = jacobian @ jacobian.T
    steps = torch.linspace(0, 1, 401, dtype=torch.float64)
    a, b = torch.meshgrid(steps, steps, indexing="ij")
    inside = a + b <= 1
    grid = torch.stack([a[inside], b[inside], 1 - a[inside] - b[inside]], dim=1)
    best = torch.einsum("fi,ij,fj->f", grid, gram, grid).min()
    weights = min_norm_weights(gram)
    assert weights @ gram @ weights <= best + 1e-12
    assert weights @ gram @ weights >= best - 1e-3 * best


def test_spec_counterexample_parallel_gradients_keep_training():
    g1, g2 = torch.tensor([1.0, 0.0]).double(), torch.tensor([2.0, 0.0]).double()
    gram = torch.stack([g1, g2]) @ torch.stack([g1, g2]).T
    torch.testing.assert_close(
        min_norm_weights(gram), torch.tensor([1.0, 0.0], dtype=torch.float64)
    )
    # The paper's unconstrained solution stops training: π = (2, −1), d = 0.
    affine = affine_weights(gram)
    torch.testing.assert_close(affine, torch.tensor([2.0, -1.0], dtype=torch.float64))
    torch.testing.assert_close(affine[0] * g1 + affine[1] * g2, torch.zeros(2, dtype=torch.float64))


def test_torchjd_mgda_golden_value():
    jacobian = torch.tensor([[-4.0, 1.0, 1.0], [6.0, 1.0, 1.0]], dtype=torch.float64)
    weights = min_norm_weights(jacobian @ jacobian.T)
    torch.testing.assert_close(weights, torch.tensor([0.6, 0.4], dtype=torch.float64))
    torch.testing.assert_close(
        weights @ jacobian, torch.tensor([0.0, 1.0, 1.0], dtype=torch.float64)
    )


@pytest.mark.parametrize("k", [2, 3, 5])
def test_identical_gradients_get_uniform_weights(k):
    jacobian = torch.tensor([[3.0, -1.0, 2.0]]).repeat(k, 1)
    gram = jacobian @ jacobian.T
    for weighting in (min_norm_weights, affine_weights):
        weights = weighting(gram)
        assert torch.isfinite(weights).all()
        torch.testing.assert_close(weights, torch.full((k,), 1 / k, dtype=torch.float64))


@pytest.mark.parametrize("k", [2, 4])
def test_one_zero_gradient_gives_the_zero_direction(k):
    jacobian = torch.randn(k, 5, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    jacobian[1] = 0
    weights = min_norm_weights(jacobian @ jacobian.T)
    torch.testing.assert_close(weights @ jacobian, torch.zeros(5, dtype=torch.float64))
    assert weights[1] == pytest.approx(1.0)


@pytest.mark.parametrize("k", [2, 3, 6])
def test_all_zero_gradients_are_finite_and_uniform(k):
    for weighting in (min_norm_weights, affine_weights):
        weights = weighting(torch.zeros(k, k))
        torch.testing.assert_close(weights, torch.full((k,), 1 / k, dtype=torch.float64))


@given(jacobians(max_tasks=5))
@settings(max_examples=200, deadline=None)
def test_affine_weights_sum_to_one_and_equalise_the_contributions(jacobian):
    gram = jacobian @ jacobian.T
    weights = affine_weights(gram)
    assert torch.isfinite(weights).all()
    assert weights.sum().item() == pytest.approx(1.0, abs=1e-6)


def test_affine_equals_min_norm_inside_the_segment():
    jacobian = torch.tensor([[1.0, 0.2], [-0.3, 1.0]], dtype=torch.float64)
    gram = jacobian @ jacobian.T
    torch.testing.assert_close(affine_weights(gram), min_norm_weights(gram))
    direction = affine_weights(gram) @ jacobian
    # Equal contribution: ⟨d, g_1⟩ = ⟨d, g_2⟩ = det(G) / ‖g_1 − g_2‖².
    expected = torch.linalg.det(gram) / (jacobian[0] - jacobian[1]).square().sum()
    torch.testing.assert_close(jacobian @ direction, expected.expand(2))


def test_weightings_are_scale_invariant():
    jacobian = torch.randn(4, 9, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    gram = jacobian @ jacobian.T
    for weighting in (min_norm_weights, affine_weights):
        torch.testing.assert_close(weighting(gram * 1e-30), weighting(gram))
        torch.testing.assert_close(weighting(gram * 1e30), weighting(gram))


@pytest.mark.parametrize("shape", [(3,), (2, 3), (1, 1), (2, 2, 2)])
def test_bad_gram_shapes_are_refused(shape):
    for weighting in (min_norm_weights, affine_weights):
        with pytest.raises(ValueError, match=r"gram|tasks"):
            weighting(torch.eye(*shape) if len(shape) == 2 else torch.ones(shape))


def test_loss_coefficients_realise_the_log_loss_direction():
    weights = torch.tensor([0.25, 0.75], dtype=torch.float64)
    shifted = torch.tensor([0.5, 4.0], dtype=torch.float64)
    plain = loss_coefficients(weights, shifted, normalize=False)
    torch.testing.assert_close(plain, torch.tensor([0.5, 0.1875], dtype=torch.float64))
    normalized = loss_coefficients(weights, shifted, normalize=True)
    torch.testing.assert_close(normalized, plain / plain.sum())
    assert normalized.sum().item() == pytest.approx(1.0)


def test_statistics_of_a_known_pair():
    jacobian = torch.tensor([[3.0, 4.0], [-1.0, 0.0]], dtype=torch.float64)
    stats = gradient_statistics(jacobian @ jacobian.T)
    torch.testing.assert_close(stats["norms"], torch.tensor([5.0, 1.0], dtype=torch.float64))
    assert stats["conflict"].item() == pytest.approx(-3.0)
    assert stats["dominance"].item() == pytest.approx(5.0)
    assert stats["cosine"][0, 1].item() == pytest.approx(-0.6)


def test_statistics_with_zero_gradients_stay_defined():
    gram = torch.tensor([[4.0, 0.0], [0.0, 0.0]], dtype=torch.float64)
    stats = gradient_statistics(gram)
    assert stats["dominance"].item() == float("inf")
    assert stats["cosine"][0, 1].item() == 0.0
    both = gradient_statistics(torch.zeros(2, 2))
    assert both["dominance"].item() == 1.0
    assert not torch.isnan(both["cosine"]).any()


# -- exact reference: rational arithmetic ---------------------------------------------------------


def _solve_exactly(matrix: list[list[Fraction]], rhs: list[Fraction]) -> list[Fraction] | None:
    """Gauss–Jordan elimination in rationals; None when the matrix is singular."""
    n = len(matrix)
    rows = [[*row, value] for row, value in zip(matrix, rhs)]
    for col in range(n):
        pivot = next((r for r in range(col, n) if rows[r][col] != 0), None)
        if pivot is None:
            return None
        rows[col], rows[pivot] = rows[pivot], rows[col]
        for r in range(n):
            if r != col and rows[r][col] != 0:
                factor = rows[r][col] / rows[col][col]
                rows[r] = [x - factor * y for x, y in zip(rows[r], rows[col])]
    return [rows[r][n] / rows[r][r] for r in range(n)]


def exact_min_norm(gram: np.ndarray) -> tuple[Fraction, Fraction]:
    """``(f*, r*)``: the exact ``min_{π ∈ Δ} πᵀGπ`` of the float64 entries taken as rationals.

    Enumerates the faces S whose bordered system ``[[G_SS, 1], [1ᵀ, 0]] [π_S; μ] = [0; 1]`` is
    nonsingular and keeps the stationary points with π ≥ 0: for PSD G the minimum is among them.
    ``r* = Σ_i π*_i² G_ii`` is the least over the minimisers found; the solver's ridge
    ``ε diag(G)`` can raise ‖d‖² by at most ``ε r*``.
    """
    k = len(gram)
    entries = [[Fraction(float(value)) for value in row] for row in gram]
    best: tuple[Fraction, Fraction] | None = None
    for mask in range(1, 2**k):
        face = [i for i in range(k) if mask >> i & 1]
        system = [[entries[i][j] for j in face] + [Fraction(1)] for i in face]
        system.append([Fraction(1)] * len(face) + [Fraction(0)])
        solution = _solve_exactly(system, [Fraction(0)] * len(face) + [Fraction(1)])
        if solution is None or any(weight < 0 for weight in solution[:-1]):
            continue
        value = sum(
            wi * entries[i][j] * wj
            for i, wi in zip(face, solution)
            for j, wj in zip(face, solution)
        )
        spread = sum(w * w * entries[i][i] for i, w in zip(face, solution))
        if best is None or (value, spread) < best:
            best = (value, spread)
    assert best is not None
    return best


def exact_objective(gram: np.ndarray, weights: torch.Tensor) -> Fraction:
    """``πᵀGπ`` of the float64 π and G, in exact rational arithmetic."""
    entries = [[Fraction(float(value)) for value in row] for row in gram]
    pi = [Fraction(float(w)) for w in weights]
    return sum(pi[i] * entries[i][j] * pi[j] for i in range(len(pi)) for j in range(len(pi)))


def assert_matches_the_exact_optimum(gram: np.ndarray, weights: torch.Tensor) -> None:
    """``f* ≤ f ≤ f* (1 + 1e-9) + 1e-12 r*`` (the second term: the ridge's own bound)."""
    optimum, spread = exact_min_norm(gram)
    value = exact_objective(gram, weights)
    assert value <= optimum * (1 + Fraction(1, 10**9)) + spread / 10**12, (
        float(optimum),
        float(value),
        float(spread),
    )


def assert_scale_free_kkt(gram: torch.Tensor, weights: torch.Tensor, tol: float = 1e-7) -> None:
    """KKT measured per task: ``(⟨g_j, d⟩ − ‖d‖²) / (‖g_j‖ m) ≥ −tol``, ≈ 0 on the support.

    ``m = Σ_i π_i ‖g_i‖ ≥ ‖d‖`` is the size of the combination, so a task 1e8 times smaller
    than the others is held to its own scale (the max-diagonal check above is blind to it).
    Zero gradients are exempt: ⟨g_j, d⟩ = 0 and d = 0 when one is present.
    """
    assert torch.all(weights >= 0) and weights.sum().item() == pytest.approx(1.0, abs=1e-12)
    norms = gram.diagonal().clamp_min(0).sqrt()
    size = (weights * norms).sum()
    if size == 0:
        return
    nonzero = norms > 0
    gaps = (gram @ weights - weights @ gram @ weights)[nonzero] / (norms[nonzero] * size)
    assert torch.all(gaps >= -tol), gaps
    support = (weights > 1e-9)[nonzero]
    assert torch.all(gaps[support] <= tol), gaps


@st.composite
def dyadic_jacobians(draw, min_tasks=3, max_tasks=6):
    """Integer rows times 2^e, e in [−27, 27] (norms 1e-8 … 1e8): G = JJᵀ is exact in float64.

    So G is exactly PSD and the rational reference is the exact optimum. Rows are sometimes zeroed
    or duplicated, as in ``jacobians``.
    """
    k = draw(st.integers(min_tasks, max_tasks))
    n = draw(st.integers(1, 8))
    matrix = draw(arrays(np.float64, (k, n), elements=st.integers(-16, 16).map(float)))
    exponents = draw(arrays(np.float64, (k, 1), elements=st.integers(-27, 27).map(float)))
    matrix = matrix * 2.0**exponents
    for row in draw(st.lists(st.integers(0, k - 1), max_size=2)):
        matrix[row] = 0.0
    if draw(st.booleans()):
        matrix[k - 1] = matrix[0]
    return torch.from_numpy(matrix)


@given(dyadic_jacobians())
@settings(max_examples=150, deadline=None)
def test_min_norm_matches_the_exact_rational_optimum(jacobian):
    gram = jacobian @ jacobian.T
    weights = min_norm_weights(gram)
    assert_matches_the_exact_optimum(gram.numpy(), weights)
    # G is exactly PSD here, so nothing on the simplex beats f*: f ≥ (Σπ)² f* exactly.
    optimum, _ = exact_min_norm(gram.numpy())
    total = sum(Fraction(float(w)) for w in weights)
    assert exact_objective(gram.numpy(), weights) >= total * total * optimum
    assert_scale_free_kkt(gram, weights)


@pytest.mark.parametrize("seed", range(40))
def test_min_norm_matches_the_exact_optimum_with_norms_from_1e_8_to_1e8(seed):
    generator = torch.Generator().manual_seed(seed)
    k = 3 + seed % 4
    n = 1 + seed % 7
    jacobian = torch.randn(k, n, generator=generator, dtype=torch.float64)
    jacobian *= 10.0 ** (16 * torch.rand(k, 1, generator=generator, dtype=torch.float64) - 8)
    gram = jacobian @ jacobian.T
    weights = min_norm_weights(gram)
    assert_matches_the_exact_optimum(gram.numpy(), weights)
    assert_scale_free_kkt(gram, weights)


@pytest.mark.parametrize(("k", "seed"), [(3, 1), (4, 0)])
@pytest.mark.parametrize("ratio", [1e6, 1e8])
def test_a_gradient_1e8_times_larger_does_not_distort_the_others(k, seed, ratio):
    # The old ridge (1e-12 of the mean diagonal) swamped the small tasks here: ‖d‖² came out
    # 14 % (ratio 1e6) and 527 % (1e8) above the optimum for k = 3, 14 % and 438 % for k = 4.
    jacobian = torch.randn(k, 5, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    jacobian[0] *= ratio
    gram = jacobian @ jacobian.T
    weights = min_norm_weights(gram)
    optimum, _ = exact_min_norm(gram.numpy())
    excess = (exact_objective(gram.numpy(), weights) - optimum) / optimum
    assert abs(float(excess)) <= 1e-12
    assert_scale_free_kkt(gram, weights)


@pytest.mark.parametrize("k", [2, 3, 5])
@pytest.mark.parametrize("target", [1e308, 1e-300])
def test_entries_near_the_ends_of_float64_give_the_unscaled_weights(k, target):
    jacobian = torch.randn(k, 7, generator=torch.Generator().manual_seed(k), dtype=torch.float64)
    gram = jacobian @ jacobian.T
    # Largest diagonal entry 1e308: the sum of the diagonal overflows.
    extreme = gram / gram.diagonal().max() * target
    assert torch.isfinite(extreme).all()
    for weighting in (min_norm_weights, affine_weights):
        weights = weighting(extreme)
        assert torch.isfinite(weights).all()
        torch.testing.assert_close(weights, weighting(gram), rtol=0, atol=1e-12)


@pytest.mark.parametrize("k", [16, 17, 32])
@pytest.mark.parametrize("n", [3, 64])
def test_many_tasks_give_simplex_weights_that_satisfy_kkt(k, n):
    generator = torch.Generator().manual_seed(k * n)
    jacobian = torch.randn(k, n, generator=generator, dtype=torch.float64)
    jacobian *= 10.0 ** (6 * torch.rand(k, 1, generator=generator, dtype=torch.float64) - 3)
    gram = jacobian @ jacobian.T
    weights = min_norm_weights(gram)
    assert weights.dtype == torch.float64 and weights.shape == (k,)
    assert torch.isfinite(weights).all()
    assert_scale_free_kkt(gram, weights)
    assert_min_norm_kkt(gram, weights)


@given(
    arrays(
        np.float64,
        st.tuples(st.integers(3, 40), st.integers(1, 4)),
        elements=st.integers(-3, 3).map(float),
    ),
    st.randoms(),
)
@settings(max_examples=100, deadline=None)
def test_degenerate_many_task_problems_end_at_an_order_independent_optimum(matrix, rng):
    # Small integer rows: many zero, duplicate, parallel and affinely dependent gradients, and
    # k ≫ n: the cases where an active-set method can stall or cycle.
    jacobian = torch.from_numpy(matrix)
    gram = jacobian @ jacobian.T
    weights = min_norm_weights(gram)
    assert_scale_free_kkt(gram, weights)
    order = list(range(len(jacobian)))
    rng.shuffle(order)
    permuted = jacobian[order]
    permuted_direction = min_norm_weights(permuted @ permuted.T) @ permuted
    torch.testing.assert_close(weights @ jacobian, permuted_direction, atol=1e-8, rtol=0)


@pytest.mark.parametrize("k", [4, 6])
def test_duplicates_among_distinct_gradients_share_their_weight_equally(k):
    jacobian = torch.randn(k, 3, generator=torch.Generator().manual_seed(k), dtype=torch.float64)
    jacobian[k - 1] = jacobian[1]
    gram = jacobian @ jacobian.T
    for weighting in (min_norm_weights, affine_weights):
        weights = weighting(gram)
        assert weights[1].item() == weights[k - 1].item()
    assert_scale_free_kkt(gram, min_norm_weights(gram))


def test_affine_weights_accept_17_tasks():
    jacobian = torch.randn(17, 40, generator=torch.Generator().manual_seed(17), dtype=torch.float64)
    gram = jacobian @ jacobian.T
    weights = affine_weights(gram)
    expected = torch.linalg.solve(gram, torch.ones(17, dtype=torch.float64))
    torch.testing.assert_close(weights, expected / expected.sum())
    # Equal contribution: ⟨g_i, d⟩ is the same for every task.
    contributions = gram @ weights
    torch.testing.assert_close(contributions, contributions.mean().expand(17))


@pytest.mark.parametrize("k", [2, 3, 5])
def test_zero_gradients_share_the_affine_weight(k):
    jacobian = torch.randn(k, 4, generator=torch.Generator().manual_seed(k), dtype=torch.float64)
    jacobian[0] = 0
    jacobian[-1] = 0
    expected = torch.zeros(k, dtype=torch.float64)
    expected[0] = expected[-1] = 0.5
    torch.testing.assert_close(affine_weights(jacobian @ jacobian.T), expected)
    torch.testing.assert_close(min_norm_weights(jacobian @ jacobian.T), expected)


def test_a_slightly_indefinite_gram_still_gives_the_psd_answer():
    # g_2 = 2 g_1: a float32-accumulated Gram can put cos(g_1, g_2) just above 1, making G
    # indefinite (here λ_min = −1.6e-7), beyond the ridge.
    gram = torch.tensor([[1, 2, -0.3], [2, 4, -0.6], [-0.3, -0.6, 1]], dtype=torch.float64)
    expected = min_norm_weights(gram)
    gram[0, 1] = gram[1, 0] = 2 * (1 + 1e-7)
    weights = min_norm_weights(gram)
    torch.testing.assert_close(weights, expected, rtol=0, atol=1e-6)
    torch.testing.assert_close(expected, torch.tensor([0.5, 0, 0.5], dtype=torch.float64))


def test_subnormal_gram_entries_stay_finite():
    # Found by hypothesis: G_22 = 1e-316 is subnormal, so its few bits make the correlations
    # inconsistent (C indefinite) and ‖d‖² came out negative, √ of it NaN.
    jacobian = torch.tensor([[-2.0675e-136], [1.0063e-158], [1.0063e-158]], dtype=torch.float64)
    weights = min_norm_weights(jacobian @ jacobian.T)
    assert torch.isfinite(weights).all()
    torch.testing.assert_close(weights, torch.tensor([0, 0.5, 0.5], dtype=torch.float64))
