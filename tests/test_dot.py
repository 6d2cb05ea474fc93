"""DOT (Zhao et al., ICCV 2023), the experiment baseline in gradbalance.experiments.dot."""

from __future__ import annotations

import copy
import io
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from gradbalance.experiments.dot import (
    MNIST_LR_GRID,
    DistillationOrientedTrainer,
    DotUpdate,
    select_lr,
)
from gradbalance.experiments.models import Output

TASK, DISTILL = "task_momentum_buffer", "distill_momentum_buffer"


def dot_step(optimizer, params, distill_grads, task_grads):
    """One DOT step driven by hand: distillation gradient, step_kd, task gradient, step."""
    for param, grad in zip(params, distill_grads):
        param.grad = None if grad is None else grad.clone()
    optimizer.step_kd()
    for param, grad in zip(params, task_grads):
        param.grad = None if grad is None else grad.clone()
    optimizer.step()


def f64(values):
    return torch.tensor(values, dtype=torch.float64)


def test_two_steps_by_hand():
    # θ0 = (1, −2), η = 0.1, β = 0.9, Δ = 0.075, λ = 0.01.
    # Step 1 (buffers start at the gradients): v_ce = g_ce + λθ0 = (2.01, 0.23), v_kd = g_kd =
    # (0.5, −1); θ1 = θ0 − 0.1 (v_ce + v_kd) = (0.749, −1.923).
    # Step 2: v_ce = 0.825 (2.01, 0.23) + (1, −1) + 0.01 θ1 = (2.66574, −0.82948);
    # v_kd = 0.975 (0.5, −1) + (−0.5, 0.5) = (−0.0125, −0.475);
    # θ2 = θ1 − 0.1 (v_ce + v_kd) = (0.483676, −1.792552).
    param = nn.Parameter(f64([1.0, -2.0]))
    optimizer = DistillationOrientedTrainer(
        [param], lr=0.1, momentum=0.9, delta=0.075, weight_decay=0.01
    )
    dot_step(optimizer, [param], [f64([0.5, -1.0])], [f64([2.0, 0.25])])
    state = optimizer.state[param]
    torch.testing.assert_close(state[TASK], f64([2.01, 0.23]), rtol=0, atol=1e-15)
    torch.testing.assert_close(state[DISTILL], f64([0.5, -1.0]), rtol=0, atol=1e-15)
    torch.testing.assert_close(param.detach(), f64([0.749, -1.923]), rtol=0, atol=1e-15)
    dot_step(optimizer, [param], [f64([-0.5, 0.5])], [f64([1.0, -1.0])])
    torch.testing.assert_close(state[TASK], f64([2.66574, -0.82948]), rtol=0, atol=1e-14)
    torch.testing.assert_close(state[DISTILL], f64([-0.0125, -0.475]), rtol=0, atol=1e-14)
    torch.testing.assert_close(param.detach(), f64([0.483676, -1.792552]), rtol=0, atol=1e-14)


def test_steps_match_the_equations():
    """Three elements, three steps, against the equations evaluated element by element in
    Python floats."""
    lr, beta, delta, decay = 0.05, 0.85, 0.1, 0.003
    theta = [0.3, -1.2, 2.5]
    distill_grads = [[0.4, -0.7, 1.1], [-0.2, 0.9, 0.05], [1.3, -0.4, -0.6]]
    task_grads = [[-1.0, 0.25, 0.6], [0.8, -0.3, 0.2], [-0.45, 1.5, -0.9]]
    param = nn.Parameter(f64(theta))
    optimizer = DistillationOrientedTrainer(
        [param], lr=lr, momentum=beta, delta=delta, weight_decay=decay
    )
    v_ce = v_kd = None
    for g_kd, g_ce in zip(distill_grads, task_grads):
        d_ce = [g + decay * t for g, t in zip(g_ce, theta)]
        v_ce = d_ce if v_ce is None else [(beta - delta) * v + d for v, d in zip(v_ce, d_ce)]
        v_kd = g_kd if v_kd is None else [(beta + delta) * v + g for v, g in zip(v_kd, g_kd)]
        theta = [t - lr * a - lr * b for t, a, b in zip(theta, v_ce, v_kd)]
        dot_step(optimizer, [param], [f64(g_kd)], [f64(g_ce)])
        torch.testing.assert_close(optimizer.state[param][TASK], f64(v_ce), rtol=1e-13, atol=0)
        torch.testing.assert_close(optimizer.state[param][DISTILL], f64(v_kd), rtol=1e-13, atol=0)
        torch.testing.assert_close(param.detach(), f64(theta), rtol=1e-13, atol=0)


def test_a_parameter_one_loss_reaches_uses_beta_and_its_weight_decay():
    """mdistiller's rule for a parameter with one of the two gradients: that gradient's buffer
    with momentum (β − Δ + β + Δ) / 2 = β, and the weight decay added to that gradient."""
    lr, beta, delta, decay = 0.1, 0.9, 0.075, 0.01
    distill_only = nn.Parameter(f64([1.0, 2.0]))
    task_only = nn.Parameter(f64([-1.0, 0.5]))
    params = [distill_only, task_only]
    optimizer = DistillationOrientedTrainer(
        params, lr=lr, momentum=beta, delta=delta, weight_decay=decay
    )
    g1, g2 = f64([0.3, -0.6]), f64([-0.2, 0.4])
    expected = {}
    for which, param in (("distill", distill_only), ("task", task_only)):
        theta0 = param.detach().clone()
        v1 = g1 + decay * theta0
        theta1 = theta0 - lr * v1
        v2 = beta * v1 + g2 + decay * theta1
        expected[which] = (v2, theta1 - lr * v2)
    dot_step(optimizer, params, [g1, None], [None, g1])
    dot_step(optimizer, params, [g2, None], [None, g2])
    assert set(optimizer.state[distill_only]) == {DISTILL}
    assert set(optimizer.state[task_only]) == {TASK}
    for which, param, key in (("distill", distill_only, DISTILL), ("task", task_only, TASK)):
        buffer, theta = expected[which]
        torch.testing.assert_close(optimizer.state[param][key], buffer, rtol=1e-13, atol=0)
        torch.testing.assert_close(param.detach(), theta, rtol=1e-13, atol=0)


def test_delta_zero_is_sgd_with_momentum_on_the_summed_gradient():
    generator = torch.Generator().manual_seed(0)
    shapes = [(4, 3), (3,), (2, 2, 2)]
    initial = [torch.randn(shape, generator=generator, dtype=torch.float64) for shape in shapes]
    dot_params = [nn.Parameter(t.clone()) for t in initial]
    sgd_params = [nn.Parameter(t.clone()) for t in initial]
    dot = DistillationOrientedTrainer(
        dot_params, lr=0.07, momentum=0.9, delta=0.0, weight_decay=1e-3
    )
    sgd = torch.optim.SGD(sgd_params, lr=0.07, momentum=0.9, weight_decay=1e-3)
    for _ in range(8):
        distill = [torch.randn(s, generator=generator, dtype=torch.float64) for s in shapes]
        task = [torch.randn(s, generator=generator, dtype=torch.float64) for s in shapes]
        dot_step(dot, dot_params, distill, task)
        for param, g_kd, g_ce in zip(sgd_params, distill, task):
            param.grad = g_kd + g_ce
        sgd.step()
        for a, b in zip(dot_params, sgd_params):
            torch.testing.assert_close(a.detach(), b.detach(), rtol=1e-12, atol=1e-14)
    # and Δ > 0 does not: the same gradients, two steps, Δ = 0.075 against Δ = 0
    ones = [torch.ones(s, dtype=torch.float64) for s in shapes]
    halves = [-o / 2 for o in ones]
    ends = []
    for delta in (0.075, 0.0):
        params = [nn.Parameter(t.clone()) for t in initial]
        optimizer = DistillationOrientedTrainer(params, lr=0.07, momentum=0.9, delta=delta)
        for _ in range(2):
            dot_step(optimizer, params, ones, halves)
        ends.append(params[0].detach())
    assert not torch.allclose(ends[0], ends[1])


def make_problem(seed=0):
    torch.manual_seed(seed)
    model = nn.Linear(5, 3).double()
    inputs = torch.randn(6, 5, dtype=torch.float64)
    labels = torch.tensor([0, 1, 2, 2, 1, 0])
    soft = torch.softmax(torch.randn(6, 3, dtype=torch.float64), dim=1)
    return model, inputs, labels, soft


def losses_of(model, inputs, labels, soft):
    logits = model(inputs)
    distill = F.kl_div(F.log_softmax(logits, dim=1), soft, reduction="batchmean")
    return [distill, F.cross_entropy(logits, labels)], Output(inputs, logits)


def test_dot_update_matches_the_optimizer_driven_by_hand():
    model, inputs, labels, soft = make_problem()
    by_hand = copy.deepcopy(model)
    weights = (0.9, 0.1)
    update = DotUpdate(
        DistillationOrientedTrainer(model.parameters(), lr=0.5, weight_decay=1e-3), weights
    )
    optimizer = DistillationOrientedTrainer(by_hand.parameters(), lr=0.5, weight_decay=1e-3)
    params = list(by_hand.parameters())
    for step in range(4):
        batch = slice(step % 2, step % 2 + 4)
        losses, output = losses_of(model, inputs[batch], labels[batch], soft[batch])
        assert update(losses, output) == {}
        (distill, task), _ = losses_of(by_hand, inputs[batch], labels[batch], soft[batch])
        distill_grads = torch.autograd.grad(weights[0] * distill, params, retain_graph=True)
        task_grads = torch.autograd.grad(weights[1] * task, params)
        dot_step(optimizer, params, distill_grads, task_grads)
        for a, b in zip(model.parameters(), by_hand.parameters()):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-15)
    start = make_problem()[0]
    assert not torch.allclose(model.weight, start.weight)  # it did move


def test_dot_update_refuses_other_than_two_losses():
    model, inputs, labels, soft = make_problem()
    update = DotUpdate(DistillationOrientedTrainer(model.parameters(), lr=0.1))
    losses, output = losses_of(model, inputs, labels, soft)
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ValueError, match="L_distill, L_task"):
        update([*losses, losses[0]], output)
    for a, b in zip(model.parameters(), before):
        assert torch.equal(a, b)


def test_state_dict_round_trip_continues_as_uninterrupted():
    model, inputs, labels, soft = make_problem(seed=1)
    resumed = copy.deepcopy(model)

    def train(module, optimizer, steps):
        update = DotUpdate(optimizer)
        for _ in range(steps):
            update(*losses_of(module, inputs, labels, soft))

    uninterrupted = DistillationOrientedTrainer(model.parameters(), lr=0.3)
    train(model, uninterrupted, 6)
    first = DistillationOrientedTrainer(resumed.parameters(), lr=0.3)
    train(resumed, first, 3)
    saved = io.BytesIO()
    torch.save({"model": resumed.state_dict(), "optimizer": first.state_dict()}, saved)
    saved.seek(0)
    checkpoint = torch.load(saved)
    fresh_model = make_problem(seed=2)[0]  # different weights until loaded
    fresh_model.load_state_dict(checkpoint["model"])
    fresh = DistillationOrientedTrainer(fresh_model.parameters(), lr=123.0, delta=0.0)
    fresh.load_state_dict(checkpoint["optimizer"])
    assert fresh.param_groups[0]["lr"] == 0.3 and fresh.param_groups[0]["delta"] == 0.075
    assert all(set(fresh.state[p]) == {TASK, DISTILL} for p in fresh_model.parameters())
    train(fresh_model, fresh, 3)
    for a, b in zip(model.parameters(), fresh_model.parameters()):
        assert torch.equal(a, b)


@pytest.mark.parametrize(
    ("kwargs", "named"),
    [
        ({"lr": -0.1}, "lr"),
        ({"lr": math.nan}, "lr"),
        ({"delta": -0.01}, "delta"),
        ({"weight_decay": -1e-4}, "weight_decay"),
        ({"momentum": 0.95}, "momentum ± delta"),  # β + Δ = 1.025
        ({"momentum": 0.05}, "momentum ± delta"),  # β − Δ = −0.025
        ({"momentum": 0.925}, "momentum ± delta"),  # β + Δ = 1: not below 1
        ({"momentum": -0.1, "delta": 0.0}, "momentum"),
    ],
)
def test_bad_hyperparameters_are_refused(kwargs, named):
    settings = {"lr": 0.1, **kwargs}
    with pytest.raises(ValueError, match=named):
        DistillationOrientedTrainer([nn.Parameter(torch.zeros(2))], **settings)
    # a group added later with the same value is refused and nothing is added
    optimizer = DistillationOrientedTrainer([nn.Parameter(torch.zeros(2))], lr=0.1)
    with pytest.raises(ValueError, match=named):
        optimizer.add_param_group({"params": [nn.Parameter(torch.zeros(2))], **kwargs})
    assert len(optimizer.param_groups) == 1


def test_momentum_minus_delta_zero_is_allowed():
    DistillationOrientedTrainer([nn.Parameter(torch.zeros(2))], lr=0.1, momentum=0.075)


def test_a_group_set_out_of_range_stops_the_step_before_any_change():
    param = nn.Parameter(f64([1.0, -1.0]))
    optimizer = DistillationOrientedTrainer([param], lr=0.1)
    dot_step(optimizer, [param], [f64([1.0, 1.0])], [f64([0.5, 0.5])])
    before = param.detach().clone()
    buffers = {k: v.clone() for k, v in optimizer.state[param].items()}
    param.grad = f64([0.2, 0.2])
    optimizer.step_kd()
    param.grad = f64([0.3, 0.3])
    optimizer.param_groups[0]["delta"] = 0.2  # β + Δ = 1.1
    with pytest.raises(ValueError, match="delta"):
        optimizer.step()
    assert torch.equal(param.detach(), before)
    assert all(torch.equal(optimizer.state[param][k], v) for k, v in buffers.items())
    # the distillation gradient taken by step_kd is kept for the step once the group is fixed
    optimizer.param_groups[0]["delta"] = 0.075
    optimizer.step()
    expected_kd = 0.975 * buffers[DISTILL] + f64([0.2, 0.2])
    torch.testing.assert_close(optimizer.state[param][DISTILL], expected_kd)


def test_step_kd_twice_without_step_is_refused():
    param = nn.Parameter(torch.ones(2))
    optimizer = DistillationOrientedTrainer([param], lr=0.1)
    param.grad = torch.ones(2)
    optimizer.step_kd()
    assert param.grad is None
    param.grad = torch.ones(2)
    with pytest.raises(RuntimeError, match="step_kd"):
        optimizer.step_kd()


def test_step_uses_the_scheduled_learning_rate():
    param = nn.Parameter(f64([1.0]))
    optimizer = DistillationOrientedTrainer([param], lr=0.2, weight_decay=0.0)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=2)
    dot_step(optimizer, [param], [f64([1.0])], [f64([1.0])])
    scheduler.step()  # lr = 0.1
    dot_step(optimizer, [param], [f64([1.0])], [f64([1.0])])
    # θ = 1 − 0.2 (1 + 1) − 0.1 ((0.825 + 1) + (0.975 + 1))
    torch.testing.assert_close(param.detach(), f64([1 - 0.4 - 0.1 * 3.8]))


def test_select_lr_picks_the_fewest_validation_errors():
    calls = []

    def score(lr):
        calls.append(lr)
        return {0.01: 40, 0.03: 25, 0.1: 31}[lr]

    choice = select_lr(score, [0.1, 0.01, 0.03])
    assert choice.lr == 0.03
    assert calls == [0.01, 0.03, 0.1]
    assert choice.validation_errors == {0.01: 40.0, 0.03: 25.0, 0.1: 31.0}


def test_select_lr_ties_go_to_the_smaller_lr_and_nan_never_wins():
    assert select_lr(lambda lr: 7, [0.3, 0.1, 0.03]).lr == 0.03
    assert select_lr(lambda lr: {0.01: 9, 0.03: 5, 0.1: 5}[lr], [0.01, 0.03, 0.1]).lr == 0.03
    assert select_lr(lambda lr: math.nan if lr < 0.05 else 80.0, MNIST_LR_GRID).lr == 0.1
    with pytest.raises(ValueError, match="NaN"):
        select_lr(lambda lr: math.nan, MNIST_LR_GRID)


@pytest.mark.parametrize("grid", [[], [0.01, 0.0], [-0.1], [0.01, 0.01], [math.inf]])
def test_select_lr_refuses_a_bad_grid_before_training(grid):
    calls = []
    with pytest.raises(ValueError, match="grid"):
        select_lr(lambda lr: calls.append(lr) or 0, grid)
    assert calls == []


def test_buffers_do_not_alias_the_gradients():
    """Without weight decay the first buffers are copies of the gradients, not the tensors in
    ``.grad``: zeroing the gradients in place leaves them as they are."""
    param = nn.Parameter(f64([1.0, 2.0]))
    optimizer = DistillationOrientedTrainer([param], lr=0.1, weight_decay=0.0)
    dot_step(optimizer, [param], [f64([0.5, 0.5])], [f64([0.25, 0.25])])
    optimizer.zero_grad(set_to_none=False)
    assert torch.equal(optimizer.state[param][TASK], f64([0.25, 0.25]))
    assert torch.equal(optimizer.state[param][DISTILL], f64([0.5, 0.5]))
