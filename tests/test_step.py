"""The checked step (gradbalance._inputs), without a balancer: what a call is turned into."""

import pytest
import torch
from torch.utils.checkpoint import checkpoint

from gradbalance._bounds import Bounds, count_bounds
from gradbalance._buffers import Role
from gradbalance._inputs import check_inputs, row_scale
from gradbalance._parsing import Expected, in_known_order, trainable

FRESH = Expected(count=None, names=None, calls=0, from_min_losses=False, window=None)


def step_of(losses, params, **kwargs):
    options = {
        "expected": FRESH,
        "bounds": Bounds(None),
        "accumulate": False,
        "grad_scaler": None,
        "representation": None,
        "refuse_plain_for": None,
    }
    return check_inputs(losses, params, **{**options, **kwargs})


def test_a_step_lists_the_parameters_once_then_the_leaves_outside_them():
    weight, outside = torch.randn(3, requires_grad=True), torch.randn(3, requires_grad=True)
    losses = [(weight * outside).sum().exp(), weight.square().sum()]
    step = step_of(losses, [weight, weight])
    assert step.tensors == [weight, outside]
    assert step.roles == [Role.BALANCED, Role.OUTSIDE]
    assert step.values.dtype == torch.float64 and step.min_losses.tolist() == [0.0, 0.0]


def test_rho_is_one_over_the_shifted_loss_and_stays_finite_at_the_bound():
    shifted = torch.tensor([2.0, 0.0, float("nan")], dtype=torch.float64)
    assert row_scale(shifted, None).tolist() == [0.5, 1.0, 1.0]
    scale = torch.tensor(4.0, dtype=torch.float64)
    assert row_scale(shifted, scale).tolist() == [2.0, 4.0, 4.0]
    weight = torch.randn(3, requires_grad=True)
    step = step_of([weight.sum().exp(), weight.exp().sum()], [weight])
    torch.testing.assert_close(step.rho, 1 / step.values)


def test_a_reentrant_checkpoint_makes_the_step_take_ordinary_backward_passes():
    layer = torch.nn.Linear(3, 3)
    x = torch.randn(2, 3, requires_grad=True)
    out = checkpoint(layer, x, use_reentrant=True)
    step = step_of([out.square().mean(), out.abs().mean()], layer.parameters())
    assert step.reentrant and step.by_backward


def test_named_losses_come_in_their_first_order_and_other_names_are_refused():
    a, b = torch.tensor(1.0), torch.tensor(2.0)
    known = Expected(count=2, names=("x", "y"), calls=1, from_min_losses=False, window=None)
    assert in_known_order(("y", "x"), [b, a], known) == (("x", "y"), [a, b])
    with pytest.raises(ValueError, match="named"):
        in_known_order(("x", "z"), [a, b], known)
    with pytest.raises(ValueError, match="accumulated"):
        in_known_order(None, [a, b, a], Expected(None, None, 0, False, window=2))


def test_an_unbalanced_group_is_refused_where_the_mode_has_no_per_task_gradients():
    weight = torch.randn(3, requires_grad=True)
    groups = [
        {"params": [weight]},
        {"params": [torch.randn(1, requires_grad=True)], "balance": False},
    ]
    assert trainable(groups)[1] == [True, False]
    with pytest.raises(ValueError, match="amortized mode computes no per-task"):
        step_of([weight.sum().exp(), weight.square().sum()], groups, refuse_plain_for="amortized")


def test_bounds_are_checked_and_made_once_per_device():
    with pytest.raises(ValueError, match="finite"):
        count_bounds([0.0, float("inf")])
    bounds = Bounds([-1.0, 0.0])
    first = bounds.on(2, torch.device("cpu"))
    assert first is bounds.on(2, torch.device("cpu"))
    with pytest.raises(ValueError, match="3 losses"):
        bounds.on(3, torch.device("cpu"))
