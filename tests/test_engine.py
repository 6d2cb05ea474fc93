"""The gradient engine against plain float64 autograd."""

import pytest
import torch

from gradbalance import _engine as engine
from gradbalance.weighting import min_norm_weights


def small_network(dtype=torch.float64):
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3)).to(
        dtype
    )


def two_losses(network, dtype=torch.float64):
    generator = torch.Generator().manual_seed(1)
    inputs = torch.randn(16, 6, generator=generator, dtype=dtype)
    labels = torch.randint(0, 3, (16,), generator=generator)
    outputs = network(inputs)
    return torch.stack(
        [outputs.square().mean(), torch.nn.functional.cross_entropy(outputs, labels)]
    )


def reference_blocks(losses, params):
    rows = [torch.autograd.grad(loss, params, retain_graph=True) for loss in losses]
    return [torch.stack(per_param) for per_param in zip(*rows)]


@pytest.mark.parametrize("vectorize", [True, False])
def test_task_gradients_equal_separate_autograd_calls(vectorize):
    network = small_network()
    params = list(network.parameters())
    losses = two_losses(network)
    expected = reference_blocks(losses, params)
    scale = torch.tensor([0.5, -3.0], dtype=torch.float64)
    blocks = engine.task_gradients(losses, scale, params, vectorize=vectorize, retain_graph=True)
    for block, reference in zip(blocks, expected, strict=True):
        torch.testing.assert_close(block, scale.view(2, *[1] * (block.ndim - 1)) * reference)
    assert all(p.grad is None for p in params), "task_gradients must not touch .grad"


@pytest.mark.parametrize("vectorize", [True, False])
def test_unreached_parameters_are_none_and_partly_reached_ones_get_zero_rows(vectorize):
    shared, only_first, unused = (torch.randn(3, requires_grad=True) for _ in range(3))
    losses = torch.stack([(shared * only_first).sum(), shared.square().sum()])
    ones = torch.ones(2)
    blocks = engine.task_gradients(losses, ones, [shared, only_first, unused], vectorize=vectorize)
    assert blocks[2] is None
    torch.testing.assert_close(blocks[1][1], torch.zeros(3))
    torch.testing.assert_close(blocks[1][0], shared.detach())
    torch.testing.assert_close(blocks[0][1], 2 * shared.detach())


def test_a_loss_without_graph_counts_as_zero():
    weight = torch.randn(4, requires_grad=True)
    losses = [weight.square().sum(), torch.tensor(2.0)]
    blocks = engine.task_gradients(losses, torch.ones(2), [weight], vectorize=False)
    torch.testing.assert_close(blocks[0][1], torch.zeros(4))


def test_gram_matrix_of_blocks_equals_the_float64_product():
    generator = torch.Generator().manual_seed(2)
    blocks = [
        torch.randn(3, *shape, generator=generator) for shape in [(5, 7), (11,), (0,), (2, 3, 4)]
    ]
    blocks.insert(1, None)
    flat = torch.cat([b.reshape(3, -1).double() for b in blocks if b is not None], dim=1)
    gram = engine.gram_matrix(blocks)
    assert gram.dtype == torch.float64
    torch.testing.assert_close(gram, flat @ flat.T, rtol=1e-6, atol=1e-6)


def test_gram_matrix_keeps_pi_accurate_for_nearly_parallel_float32_gradients():
    # docs/method.md, Numerics: cos ≈ 0.999 over 1e6 float32 elements; π as in float64.
    generator = torch.Generator().manual_seed(3)
    base = torch.randn(1_000_000, generator=generator, dtype=torch.float64)
    other = 0.999 * base + 0.0447 * torch.randn(1_000_000, generator=generator, dtype=torch.float64)
    exact = torch.stack([base, 1.3 * other])
    gram64 = exact @ exact.T
    gram = engine.gram_matrix([exact.float()])
    reference = min_norm_weights(gram64)
    assert (min_norm_weights(gram) - reference).abs().max() < 1e-5
    torch.testing.assert_close(gram, gram64, rtol=1e-6, atol=0)


def test_gram_matrix_upcasts_half_precision():
    blocks = [torch.full((2, 70_000), 0.5, dtype=torch.bfloat16)]
    torch.testing.assert_close(
        engine.gram_matrix(blocks), torch.full((2, 2), 17_500.0, dtype=torch.float64)
    )


def test_gram_matrix_without_any_gradient_is_an_error():
    with pytest.raises(ValueError, match="no loss reaches"):
        engine.gram_matrix([None, None])


def test_weighted_gradient_equals_backward_of_the_weighted_sum():
    network = small_network()
    params = list(network.parameters())
    losses = two_losses(network)
    coefficients = torch.tensor([0.3, 0.7], dtype=torch.float64)
    grads = engine.weighted_gradient(losses, coefficients, params, retain_graph=True)
    expected = torch.autograd.grad(0.3 * losses[0] + 0.7 * losses[1], params)
    for grad, reference in zip(grads, expected, strict=True):
        torch.testing.assert_close(grad, reference)


def test_all_finite_flags_nan_and_inf():
    assert engine.all_finite([torch.ones(3), None, torch.zeros(2)])
    assert not engine.all_finite([torch.ones(3), torch.tensor([float("nan")])])
    assert not engine.all_finite([torch.tensor([float("-inf"), 1.0])])


# -- FlatGradients ------------------------------------------------------------------------------
