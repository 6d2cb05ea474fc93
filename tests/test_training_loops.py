"""The optimizer inside real training loops (one process): gradient accumulation, GradScaler,
clipping, torch.compile, parameter subsets."""

import warnings

import pytest
import torch
from helpers import TeacherStudentProblem, assert_unchanged, snapshot

from gradbalance import MultiObjectiveOptimizer

GRADIENT_MODES = ["exact", "affine"]


def halves(problem):
    """Two micro-batches that together are the problem's batch."""
    first, second = (TeacherStudentProblem(dtype=torch.float64) for _ in range(2))
    size = len(problem.inputs) // 2
    for half, part in zip((first, second), (slice(None, size), slice(size, None))):
        half.inputs = problem.inputs[part]
        half.teacher_outputs = problem.teacher_outputs[part]
        half.labels = problem.labels[part]
    return first, second


def grads(model):
    return [p.grad.clone() for p in model.parameters()]


# -- gradient accumulation ----------------------------------------------------------------------


@pytest.mark.parametrize("mode", GRADIENT_MODES)
def test_two_micro_batches_equal_one_batch_of_twice_the_size(mode):
    problem = TeacherStudentProblem(dtype=torch.float64)
    whole = MultiObjectiveOptimizer(problem.model.parameters(), mode=mode)
    whole.backward(problem.losses())
    expected, expected_weights = grads(problem.model), whole.weights
    problem.model.zero_grad()

    opt = MultiObjectiveOptimizer(problem.model.parameters(), mode=mode)
    first, second = halves(problem)
    opt.backward(first.losses(problem.model), accumulate=True)
    assert all(p.grad is None for p in problem.model.parameters()), ".grad waits for the last"
    opt.backward(second.losses(problem.model))
    torch.testing.assert_close(opt.weights, expected_weights, rtol=1e-10, atol=1e-12)
    for grad, reference in zip(grads(problem.model), expected):
        torch.testing.assert_close(grad, reference, rtol=1e-10, atol=1e-12)


def test_amortized_micro_batches_average_their_weighted_gradients_under_one_pi():
    problem = TeacherStudentProblem(dtype=torch.float64)
    opt = MultiObjectiveOptimizer(problem.model.parameters(), mode="amortized")
    first, second = halves(problem)
    expected = []
    for half in (first, second):
        losses = half.losses(problem.model)
        shifted = torch.stack(losses).detach() + 1e-8
        coefficients = (0.5 / shifted) / (0.5 / shifted).sum()  # π = (½, ½) before any update
        weighted = sum(c * loss for c, loss in zip(coefficients, losses))
        expected.append(torch.autograd.grad(weighted, list(problem.model.parameters())))
    opt.backward(first.losses(problem.model), accumulate=True)
    opt.backward(second.losses(problem.model))
    for grad, a, b in zip(grads(problem.model), *expected):
        torch.testing.assert_close(grad, (a + b) / 2)


def test_amortized_logits_learn_from_the_mean_loss_of_each_window():
    # docs/method.md's amortized test vector, each batch split in two micro-batches (same mean).
    anchor = torch.zeros(1, requires_grad=True)
    opt = MultiObjectiveOptimizer([anchor], mode="amortized")
    spec = [[1.0, 2.0], [0.9, 1.9], [0.85, 1.7], [0.8, 1.65]]
    logits = []
    for values in spec:
        for offset in (0.05, -0.05):
            scaled = [
                (v + offset) * torch.exp(anchor.sum() - anchor.sum().detach()) for v in values
            ]
            opt.backward(scaled, accumulate=offset > 0)
        logits.append(opt.balancer.state_dict()["famo"]["logits"][0])
    assert logits[1:] == pytest.approx([-0.025, -0.023686, -0.028707], abs=2e-6)


@pytest.mark.parametrize("mode", ["exact", "amortized"])
def test_step_refuses_micro_batches_that_were_never_balanced(mode):
    problem = TeacherStudentProblem()
    opt = MultiObjectiveOptimizer(problem.model.parameters(), mode=mode)
    opt.backward(problem.losses(), accumulate=True)
    before = snapshot(opt, problem.model)
    with pytest.raises(RuntimeError, match="never balanced"):
        opt.step()
    assert_unchanged(before, snapshot(opt, problem.model))
    opt.zero_grad()  # drops them
    opt.step()


@pytest.mark.parametrize("mode", ["exact", "amortized"])
def test_a_bad_micro_batch_raises_and_keeps_the_held_ones(mode):
    problem = TeacherStudentProblem(dtype=torch.float64)
    first, second = halves(problem)
    reference = MultiObjectiveOptimizer(problem.model.parameters(), mode=mode)
    reference.backward(first.losses(problem.model), accumulate=True)
    reference.backward(second.losses(problem.model))
    expected = grads(problem.model)
    problem.model.zero_grad()

    opt = MultiObjectiveOptimizer(problem.model.parameters(), mode=mode)
    opt.backward(first.losses(problem.model), accumulate=True)
    bad = [loss * float("nan") for loss in second.losses(problem.model)]
    with pytest.raises(ValueError, match="loss 0 is nan"):
        opt.backward(bad, accumulate=True)
    opt.backward(second.losses(problem.model))
    for grad, reference_grad in zip(grads(problem.model), expected):
        torch.testing.assert_close(grad, reference_grad)


# -- mixed precision: GradScaler ----------------------------------------------------------------


def scaled_training(mode, scaler, steps=4):
    problem = TeacherStudentProblem()
    opt = MultiObjectiveOptimizer(problem.model.parameters(), mode=mode, lr=1e-2)
    for _ in range(steps):
        opt.zero_grad()
        opt.backward(problem.losses(), grad_scaler=scaler)
        if scaler is None:
            opt.step()
        else:
            scaler.step(opt)
            scaler.update()
    return problem.model, opt


@pytest.mark.parametrize("mode", ["exact", "amortized"])
def test_grad_scaler_gives_the_unscaled_trajectory(mode):
    # Scaling by a power of two is exact in floating point, so the trajectories agree closely.
    model, opt = scaled_training(mode, None)
    scaled_model, scaled_opt = scaled_training(
        mode, torch.amp.GradScaler("cpu", init_scale=2.0**14)
    )
    for a, b in zip(model.parameters(), scaled_model.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(opt.weights, scaled_opt.weights)
    torch.testing.assert_close(opt.stats["weights"], scaled_opt.stats["weights"])


@pytest.mark.parametrize("mode", ["exact", "amortized"])
def test_an_overflowing_step_is_skipped_and_leaves_the_balancing_state_alone(mode):
    problem = TeacherStudentProblem()
    opt = MultiObjectiveOptimizer(problem.model.parameters(), mode=mode, lr=1e-2)
    for _ in range(2):  # some π state to protect
        opt.zero_grad()
        opt.backward(problem.losses())
        opt.step()
    params = [p.detach().clone() for p in problem.model.parameters()]
    balancing = repr(opt.state_dict()["param_groups"][0]["gradbalance"])
    weights = opt.weights.clone()
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**127)
    opt.zero_grad()
    # The log-loss gradient of L^32 is 32 ∇L / L; times 2^127 it overflows float32.
    steep = [loss**32 for loss in problem.losses()]
    opt.backward(steep, grad_scaler=scaler)
    assert not all(torch.isfinite(p.grad).all() for p in problem.model.parameters())
    scaler.step(opt)
    scaler.update()
    assert scaler.get_scale() == 2.0**126
    assert all(torch.equal(a, b) for a, b in zip(params, problem.model.parameters()))
    assert repr(opt.state_dict()["param_groups"][0]["gradbalance"]) == balancing
    assert torch.equal(opt.weights, weights)


def test_grad_scaler_with_accumulated_micro_batches_gives_the_unscaled_step():
    problem = TeacherStudentProblem(dtype=torch.float64)
    first, second = halves(problem)
    results = []
    for scaler in (None, torch.amp.GradScaler("cpu", init_scale=2.0**10)):
        opt = MultiObjectiveOptimizer(problem.model.parameters())
        opt.backward(first.losses(problem.model), accumulate=True, grad_scaler=scaler)
        opt.backward(second.losses(problem.model), grad_scaler=scaler)
        scale = 1.0 if scaler is None else scaler.get_scale()
        results.append(([g / scale for g in grads(problem.model)], opt.weights))
        problem.model.zero_grad()
    (plain, plain_weights), (scaled, scaled_weights) = results
    torch.testing.assert_close(scaled_weights, plain_weights)
    for a, b in zip(plain, scaled):
        torch.testing.assert_close(a, b)


def test_grad_scaler_does_not_excuse_bad_losses():
    problem = TeacherStudentProblem()
    opt = MultiObjectiveOptimizer(problem.model.parameters())
    mse, ce = problem.losses()
    with pytest.raises(ValueError, match="loss 1 is nan"):
        opt.backward([mse, ce * float("nan")], grad_scaler=torch.amp.GradScaler("cpu"))


# -- clipping, torch.compile, parameter subsets -------------------------------------------------


@pytest.mark.parametrize("mode", ["exact", "amortized"])
def test_clip_grad_norm_between_backward_and_step_clips_what_the_base_steps_with(mode):
    problem = TeacherStudentProblem(dtype=torch.float64)
    shadow = TeacherStudentProblem(dtype=torch.float64)
    opt = MultiObjectiveOptimizer(
        problem.model.parameters(), base=torch.optim.SGD, mode=mode, lr=0.5
    )
    opt.backward(problem.losses())
    balanced = grads(problem.model)
    norm = torch.nn.utils.clip_grad_norm_(problem.model.parameters(), max_norm=1e-3)
    assert norm == pytest.approx(torch.cat([g.reshape(-1) for g in balanced]).norm().item())
    opt.step()
    scale = 1e-3 / (norm.item() + 1e-6)  # clip_grad_norm_'s own formula
    with torch.no_grad():
        for param, grad in zip(shadow.model.parameters(), balanced):
            param -= 0.5 * scale * grad
    for a, b in zip(problem.model.parameters(), shadow.model.parameters()):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_a_compiled_model_gets_the_eager_balanced_gradient(backend):
    problem = TeacherStudentProblem()
    eager = MultiObjectiveOptimizer(problem.model.parameters())
    eager.backward(problem.losses())
    expected = grads(problem.model)
    problem.model.zero_grad()
    compiled = torch.compile(problem.model, backend=backend)
    opt = MultiObjectiveOptimizer(problem.model.parameters())
    with warnings.catch_warnings():
        # inductor's backward cannot be vmapped: the optimizer falls back to k passes, warning once
        warnings.filterwarnings("ignore", "the vectorised per-task backward failed")
        opt.backward(problem.losses(compiled))
    for grad, reference in zip(grads(problem.model), expected):
        torch.testing.assert_close(grad, reference, rtol=1e-5, atol=1e-7)


def test_unbalanced_group_gets_the_plain_sum_and_stays_out_of_pi():
    problem = TeacherStudentProblem(dtype=torch.float64)
    body, head = problem.model[0], problem.model[2]
    opt = MultiObjectiveOptimizer(
        [{"params": body.parameters()}, {"params": head.parameters(), "balance": False}]
    )
    losses = problem.losses()
    values = torch.stack(losses).detach()
    body_rows, head_rows = [], []
    for loss, value in zip(losses, values):
        g = torch.autograd.grad(loss, list(problem.model.parameters()), retain_graph=True)
        body_rows.append(torch.cat([x.reshape(-1) for x in g[:2]]) / value)
        head_rows.append([x / value for x in g[2:]])
    body_jacobian = torch.stack(body_rows)
    from gradbalance.weighting import min_norm_weights

    weights = min_norm_weights(body_jacobian @ body_jacobian.T)
    opt.backward(losses)
    torch.testing.assert_close(opt.weights, weights)
    body_grad = torch.cat([p.grad.reshape(-1) for p in body.parameters()])
    torch.testing.assert_close(body_grad, weights @ body_jacobian)
    for param, first, second in zip(head.parameters(), *head_rows):
        torch.testing.assert_close(param.grad, first + second)


def test_balance_false_is_refused_where_it_means_nothing():
    problem = TeacherStudentProblem()
    groups = [{"params": problem.model[0].parameters()}]
    head = {"params": problem.model[2].parameters(), "balance": False}
    opt = MultiObjectiveOptimizer([*groups, head], mode="amortized")
    with pytest.raises(ValueError, match="amortized"):
        opt.backward(problem.losses())
    nothing = MultiObjectiveOptimizer([{"params": problem.model.parameters(), "balance": False}])
    with pytest.raises(ValueError, match="nothing to balance"):
        nothing.backward(problem.losses())


def test_amortized_accumulation_with_parameters_of_two_dtypes():
    # Two flat buffers (float32 and float64): each micro-batch's weighted gradient lands in both.
    single, double = torch.nn.Linear(3, 2), torch.nn.Linear(2, 1).double()
    inputs = torch.randn(8, 3)

    def losses():
        hidden = single(inputs).double()
        return [double(hidden).square().mean() + 1, hidden.square().mean() + 1]

    params = [*single.parameters(), *double.parameters()]
    reference = MultiObjectiveOptimizer(params, mode="amortized")
    reference.backward(losses())
    expected = [p.grad.clone() for p in params]
    reference.zero_grad()
    opt = MultiObjectiveOptimizer(params, mode="amortized")
    opt.backward(losses(), accumulate=True)
    opt.backward(losses())
    for param, grad in zip(params, expected):
        torch.testing.assert_close(param.grad, grad)
