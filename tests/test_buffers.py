"""The flat gradient buffers (gradbalance._buffers) against per-parameter float64 math."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from gradbalance import _buffers as buffers

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
