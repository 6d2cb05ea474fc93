"""The gradient engine against plain float64 autograd."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from gradbalance import buffers, engine
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

BALANCED = buffers.Role.BALANCED


def roles(balanced):
    return [BALANCED if flag else buffers.Role.PLAIN for flag in balanced]


def by_role(balanced, plain=None):
    plain = balanced if plain is None else plain
    return {BALANCED: balanced, buffers.Role.OUTSIDE: balanced, buffers.Role.PLAIN: plain}


def parameters_of_two_dtypes():
    generator = torch.Generator().manual_seed(5)
    shapes = [(4, 3), (3,), (2, 2, 2), (5,)]
    dtypes = [torch.float32, torch.float64, torch.float32, torch.float64]
    return [
        torch.randn(*shape, generator=generator, dtype=dtype).requires_grad_()
        for shape, dtype in zip(shapes, dtypes)
    ]


def random_blocks(params, k, seed):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(k, *p.shape, generator=generator, dtype=p.dtype) for p in params]


def test_flat_gradients_gram_and_grad_equal_the_per_parameter_reference():
    params = parameters_of_two_dtypes()
    blocks = random_blocks(params, 3, seed=6)
    blocks[2] = None  # no loss reaches params[2]
    flat = buffers.FlatGradients(params, [BALANCED] * 4, num_tasks=3)
    assert len(flat.groups) == 2  # float32 and float64
    flat.store(blocks, accumulate=False)
    jacobian = torch.cat([b.reshape(3, -1).double() for b in blocks if b is not None], dim=1)
    # float32 parameters: float32 products within pieces of 4096, float64 sums
    torch.testing.assert_close(flat.gram(), jacobian @ jacobian.T, rtol=1e-6, atol=1e-6)
    coefficients = torch.tensor([0.5, -1.0, 2.0], dtype=torch.float64)
    flat.write_grad(by_role(coefficients))
    for param, block in zip(params, blocks):
        if block is None:
            assert param.grad is None
        else:
            expected = torch.einsum("k,k...->...", coefficients.to(block.dtype), block)
            torch.testing.assert_close(param.grad, expected)


def test_flat_gradients_accumulate_micro_batches():
    params = parameters_of_two_dtypes()
    first, second = random_blocks(params, 2, seed=7), random_blocks(params, 2, seed=8)
    flat = buffers.FlatGradients(params, [BALANCED] * 4, num_tasks=2)
    flat.store(first, accumulate=False)
    flat.store(second, accumulate=True)
    total = torch.cat([(a + b).reshape(2, -1).double() for a, b in zip(first, second)], dim=1)
    torch.testing.assert_close(flat.gram(), total @ total.T, rtol=1e-6, atol=1e-6)


def test_unbalanced_parameters_stay_out_of_the_gram_and_get_their_own_coefficients():
    params = parameters_of_two_dtypes()
    blocks = random_blocks(params, 2, seed=9)
    balanced = [True, True, False, True]
    flat = buffers.FlatGradients(params, roles(balanced), num_tasks=2)
    flat.store(blocks, accumulate=False)
    kept = torch.cat([b.reshape(2, -1).double() for b, on in zip(blocks, balanced) if on], dim=1)
    torch.testing.assert_close(flat.gram(), kept @ kept.T, rtol=1e-6, atol=1e-6)
    weights, plain = (torch.tensor(c, dtype=torch.float64) for c in ([0.25, 0.75], [1.0, 1.0]))
    flat.write_grad(by_role(weights, plain))
    for param, block, on in zip(params, blocks, balanced):
        coefficients = (weights if on else plain).to(block.dtype)
        torch.testing.assert_close(param.grad, torch.einsum("k,k...->...", coefficients, block))


@pytest.mark.parametrize("zeroing", ["set_to_none", "zero_in_place", "none"])
def test_grad_accumulates_like_backward_and_kept_grads_never_change(zeroing):
    params = parameters_of_two_dtypes()
    flat = buffers.FlatGradients(params, [BALANCED] * 4, num_tasks=2)
    coefficients = torch.tensor([1.0, 0.5], dtype=torch.float64)
    expected = [torch.zeros_like(p) for p in params]
    for seed in (10, 11, 12):
        blocks = random_blocks(params, 2, seed)
        flat.store(blocks, accumulate=False)
        flat.write_grad(by_role(coefficients))
        step = [torch.einsum("k,k...->...", coefficients.to(b.dtype), b) for b in blocks]
        expected = [e + s for e, s in zip(expected, step)]
        for param, value in zip(params, expected):
            torch.testing.assert_close(param.grad, value)
        kept = [(p.grad, p.grad.clone()) for p in params]
        if zeroing == "set_to_none":
            for p in params:
                p.grad = None
            expected = [torch.zeros_like(p) for p in params]
        elif zeroing == "zero_in_place":
            for p in params:
                p.grad.zero_()
            expected = [torch.zeros_like(p) for p in params]
    if zeroing == "set_to_none":
        # After zero_grad(set_to_none=True) the next write goes into a new buffer.
        flat.write_grad(by_role(coefficients))
        for param, (grad, value) in zip(params, kept):
            assert param.grad is not grad
            torch.testing.assert_close(grad, value)


def test_gradients_from_elsewhere_get_the_combination_added():
    params = parameters_of_two_dtypes()
    foreign = [torch.ones_like(p) for p in params]
    for param, grad in zip(params, foreign):
        param.grad = grad
    blocks = random_blocks(params, 2, seed=12)
    flat = buffers.FlatGradients(params, [BALANCED] * 4, num_tasks=2)
    flat.store(blocks, accumulate=False)
    coefficients = torch.tensor([2.0, -1.0], dtype=torch.float64)
    flat.write_grad(by_role(coefficients))
    for param, grad, block in zip(params, foreign, blocks):
        assert param.grad is grad
        combined = torch.einsum("k,k...->...", coefficients.to(block.dtype), block)
        torch.testing.assert_close(param.grad, 1 + combined)


parameter_specs = st.lists(
    st.tuples(
        st.lists(st.integers(0, 5), min_size=0, max_size=3),  # shape
        st.sampled_from([torch.float32, torch.float64]),
        st.booleans(),  # balanced
        st.booleans(),  # reached
    ),
    min_size=1,
    max_size=6,
)


@settings(max_examples=40, deadline=None)
@given(specs=parameter_specs, k=st.integers(1, 4), seed=st.integers(0, 2**16))
def test_flat_gradients_match_per_parameter_math_for_any_layout(specs, k, seed):
    if not any(balanced and reached for _, _, balanced, reached in specs):
        specs = [(specs[0][0], specs[0][1], True, True), *specs[1:]]
    generator = torch.Generator().manual_seed(seed)
    params = [torch.zeros(shape, dtype=dtype, requires_grad=True) for shape, dtype, _, _ in specs]
    blocks = [
        torch.randn(k, *p.shape, generator=generator, dtype=p.dtype) if reached else None
        for p, (_, _, _, reached) in zip(params, specs)
    ]
    balanced = [spec[2] for spec in specs]
    flat = buffers.FlatGradients(params, roles(balanced), num_tasks=k)
    flat.store(blocks, accumulate=False)
    kept = [b.reshape(k, -1).double() for b, on in zip(blocks, balanced) if on and b is not None]
    jacobian = torch.cat(kept, dim=1)
    torch.testing.assert_close(flat.gram(), jacobian @ jacobian.T, rtol=1e-5, atol=1e-5)
    weights = torch.randn(k, generator=generator, dtype=torch.float64)
    plain = torch.randn(k, generator=generator, dtype=torch.float64)
    flat.write_grad(by_role(weights, plain))
    for param, block, on in zip(params, blocks, balanced):
        if block is None:
            assert param.grad is None
            continue
        coefficients = (weights if on else plain).to(block.dtype)
        expected = torch.einsum("k,k...->...", coefficients, block)
        torch.testing.assert_close(param.grad, expected, rtol=1e-5, atol=1e-5)


def test_gram_needs_a_reached_balanced_parameter():
    params = parameters_of_two_dtypes()
    blocks = [None, None, torch.randn(2, 2, 2, 2), None]  # only params[2] is reached
    flat = buffers.FlatGradients(params, roles([True, True, False, True]), num_tasks=2)
    flat.store(blocks, accumulate=False)
    with pytest.raises(ValueError, match="no loss reaches any balanced parameter"):
        flat.gram()


def test_the_buffer_is_written_again_only_when_no_grad_of_it_is_held():
    params = parameters_of_two_dtypes()
    flat = buffers.FlatGradients(params, [BALANCED] * 4, num_tasks=2)
    coefficients = by_role(torch.tensor([1.0, 0.5], dtype=torch.float64))
    flat.store(random_blocks(params, 2, seed=13), accumulate=False)
    flat.write_grad(coefficients)
    addresses = [p.grad.data_ptr() for p in params]
    for p in params:
        p.grad = None  # zero_grad(): nobody holds the old .grad
    flat.write_grad(coefficients)
    assert [p.grad.data_ptr() for p in params] == addresses
    held = params[0].grad
    for p in params:
        p.grad = None
    flat.write_grad(coefficients)
    assert params[0].grad.data_ptr() != held.data_ptr()
