"""Mathematical properties of the weightings, on random and hand-made Gram matrices."""

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
    """SPEC §2 closed form, written independently of the library."""
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


@pytest.mark.parametrize("shape", [(3,), (2, 3), (1, 1), (17, 17)])
def test_bad_gram_shapes_are_refused(shape):
    with pytest.raises(ValueError, match=r"gram|tasks"):
        min_norm_weights(torch.eye(*shape) if len(shape) == 2 else torch.ones(shape))


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
