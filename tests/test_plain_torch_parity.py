"""Where a balanced backward used to differ from ``loss.backward()`` + ``torch.optim.AdamW``
(issue 17, part 2), each against plain torch or an independent float64 reference.

The reference direction of exact mode is computed here from scratch: the log-loss gradients
``g_i = ∇L_i / L_i`` by separate float64 autograd calls, and π of two losses by the closed form
``π_1 = clip((G22 − G12) / (G11 + G22 − 2 G12), 0, 1)`` (docs/method.md).
"""

import time
import warnings

import pytest
import torch
import torch.nn.functional as F
from helpers import TeacherStudentProblem, assert_unchanged, halves, micro_losses, snapshot
from torch.optim.optimizer import (
    register_optimizer_step_post_hook,
    register_optimizer_step_pre_hook,
)
from torch.utils.checkpoint import checkpoint

from gradbalance import Balancer, MultiObjectiveOptimizer


def log_loss_rows(losses, params):
    """``(k, n)`` float64: row i is ``∇L_i / L_i`` over ``params``, flattened."""
    rows = []
    for loss in losses:
        grads = torch.autograd.grad(loss, params, retain_graph=True, materialize_grads=True)
        rows.append(torch.cat([g.reshape(-1) for g in grads]) / loss.detach())
    return torch.stack(rows)


def min_norm_direction(losses, params):
    """Exact mode's ``d = π_1 g_1 + π_2 g_2`` for two losses, by the closed form."""
    rows = log_loss_rows(losses, params)
    gram = rows @ rows.T
    first = ((gram[1, 1] - gram[0, 1]) / (gram[0, 0] + gram[1, 1] - 2 * gram[0, 1])).clamp(0, 1)
    return first * rows[0] + (1 - first) * rows[1]


def famo_direction(losses, params, weights):
    """Amortized mode's ``Σ c_i ∇L_i``, ``c_i = (π_i / D_i) / Σ_j π_j / D_j``, ``D = L + 1e-8``."""
    shifted = torch.stack([loss.detach() for loss in losses]) + 1e-8
    coefficients = (weights / shifted) / (weights / shifted).sum()
    total = sum(c * loss for c, loss in zip(coefficients, losses))
    grads = torch.autograd.grad(total, params, retain_graph=True)
    return torch.cat([g.reshape(-1) for g in grads])


def flat_grad(params):
    return torch.cat([p.grad.reshape(-1) for p in params])


# -- 1. a tensor passed twice ---------------------------------------------------------------------


@pytest.mark.parametrize("vectorize", [True, False])
@pytest.mark.parametrize("mode", ["exact", "amortized"])
def test_a_parameter_passed_twice_gets_its_gradient_once(mode, vectorize):
    problem = TeacherStudentProblem(dtype=torch.float64)
    params = list(problem.model.parameters())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch warns about a duplicate parameter
        opt = MultiObjectiveOptimizer(params + params[:1], mode=mode, vectorize=vectorize)
    losses = problem.losses()
    if mode == "exact":
        expected = min_norm_direction(losses, params)
    else:
        expected = famo_direction(losses, params, torch.tensor([0.5, 0.5], dtype=torch.float64))
    opt.backward(losses)
    torch.testing.assert_close(flat_grad(params), expected, rtol=1e-10, atol=1e-12)


# -- 2. torch.utils.checkpoint(..., use_reentrant=True) -------------------------------------------


@pytest.mark.parametrize(
    ("mode", "vectorize"),
    [
        ("exact", None),
        ("exact", True),
        ("affine", False),
        ("amortized", None),
        ("representation", None),
    ],
)
def test_reentrant_checkpoint_gives_the_unchecked_gradient(mode, vectorize):
    problem = TeacherStudentProblem(dtype=torch.float64)
    first, rest = problem.model[0], problem.model[1:]
    params = list(problem.model.parameters())
    grads = []
    for model in (problem.model, lambda x: checkpoint(rest, first(x), use_reentrant=True)):
        opt = MultiObjectiveOptimizer(params, mode=mode, vectorize=vectorize)
        outputs = model(problem.inputs)
        losses = [
            F.mse_loss(outputs, problem.teacher_outputs),
            F.cross_entropy(outputs, problem.labels),
        ]
        kwargs = {"representation": outputs} if mode == "representation" else {}
        opt.backward(losses, **kwargs)
        grads.append(flat_grad(params).clone())
        opt.zero_grad()
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-10, atol=1e-12)


# -- 3. the global optimizer step hooks -----------------------------------------------------------


def test_global_step_hooks_run_once_per_step_as_for_adamw():
    problem = TeacherStudentProblem()
    calls = []
    pre = register_optimizer_step_pre_hook(
        lambda opt, args, kwargs: calls.append(("pre", type(opt).__name__))
    )
    post = register_optimizer_step_post_hook(
        lambda opt, args, kwargs: calls.append(("post", type(opt).__name__))
    )
    try:
        plain = torch.optim.AdamW(problem.model.parameters())
        sum(problem.losses()).backward()
        plain.step()
        expected = [("pre", "AdamW"), ("post", "AdamW")]
        assert calls == expected
        calls.clear()
        opt = MultiObjectiveOptimizer(problem.model.parameters())
        opt.backward(problem.losses())
        opt.step()
        assert calls == [("pre", "MultiObjectiveOptimizer"), ("post", "MultiObjectiveOptimizer")]
    finally:
        pre.remove()
        post.remove()


# -- 4. a user's exception during the first backward ----------------------------------------------


def test_an_error_of_user_code_in_the_backward_reaches_the_caller_on_every_step():
    problem = TeacherStudentProblem()
    opt = MultiObjectiveOptimizer(problem.model.parameters())  # vectorize=None, the default
    before = snapshot(opt, problem.model)

    def failing(model):
        outputs = model(problem.inputs)
        outputs.register_hook(lambda grad: (_ for _ in ()).throw(RuntimeError("user's own")))
        return [
            F.mse_loss(outputs, problem.teacher_outputs),
            F.cross_entropy(outputs, problem.labels),
        ]

    for _ in range(2):
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # no warning either: the error is the user's
            with pytest.raises(RuntimeError, match="user's own"):
                opt.backward(failing(problem.model))
        assert_unchanged(before, snapshot(opt, problem.model))
    # Nothing was learnt from the user's error: the same choice as an untouched optimizer.
    fresh = MultiObjectiveOptimizer(problem.model.parameters())
    opt.backward(problem.losses())
    fresh.backward(problem.losses())
    assert opt.balancer.vectorize == fresh.balancer.vectorize


# -- 5. windows of micro-batches outliving their step ---------------------------------------------


def test_the_zero_grad_of_an_attached_optimizer_drops_micro_batches_held_when_one_failed():
    problem = TeacherStudentProblem(dtype=torch.float64)
    params = list(problem.model.parameters())
    optimizer = torch.optim.SGD(params, lr=0.1)
    balancer = Balancer(mode="exact")
    balancer.attach(optimizer)
    first, second = halves(problem)
    # A step whose second micro-batch fails; the loop skips it the plain torch way.
    optimizer.zero_grad()
    balancer.backward(micro_losses(problem.model, first), params, accumulate=True)
    bad = [loss * float("nan") for loss in micro_losses(problem.model, second)]
    with pytest.raises(ValueError, match="nan"):
        balancer.backward(bad, params)
    optimizer.zero_grad()
    assert balancer.pending_micro_batches == 0
    # The next step: its two micro-batches only, as one batch of both would give.
    balancer.backward(micro_losses(problem.model, second), params, accumulate=True)
    balancer.backward(micro_losses(problem.model, first), params)
    expected = min_norm_direction(problem.losses(), params)
    torch.testing.assert_close(flat_grad(params), expected, rtol=1e-9, atol=1e-12)


def test_an_attached_optimizer_refuses_to_step_on_micro_batches_never_balanced():
    problem = TeacherStudentProblem()
    params = list(problem.model.parameters())
    optimizer = torch.optim.AdamW(params, lr=0.1)
    balancer = Balancer(mode="exact")
    balancer.attach(optimizer)
    for part in halves(problem):  # the GradScaler way: accumulate on every micro-batch
        balancer.backward(micro_losses(problem.model, part), params, accumulate=True)
    before = [p.detach().clone() for p in params]
    with pytest.raises(RuntimeError, match="never balanced"):
        optimizer.step()
    assert all(torch.equal(a, b) for a, b in zip(before, params))
    assert balancer.pending_micro_batches == 2  # still there: balance them, or discard them
    optimizer.zero_grad()
    assert balancer.pending_micro_batches == 0
    optimizer.step()  # nothing held: a step as any other


# -- 6. amortized mode: one π per window -----------------------------------------------------------


def test_amortized_micro_batches_of_a_window_share_one_pi():
    problem = TeacherStudentProblem(dtype=torch.float64)
    params = list(problem.model.parameters())
    opt = MultiObjectiveOptimizer(params, mode="amortized")
    opt.backward(problem.losses())  # the first step: π = (½, ½), nothing to learn from yet
    opt.zero_grad()
    first, second = halves(problem)
    held = torch.tensor([0.5, 0.5], dtype=torch.float64)  # π when the window opens
    expected = sum(
        famo_direction(micro_losses(problem.model, p), params, held) for p in (first, second)
    )
    opt.backward(micro_losses(problem.model, first), accumulate=True)
    opt.backward(micro_losses(problem.model, second))
    torch.testing.assert_close(flat_grad(params), expected / 2, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(opt.weights, held)


# -- 7. the default vectorize=None is reproducible ------------------------------------------------


class NoisyClock:
    """``time.perf_counter`` advancing by ``steps[n]`` seconds at its n-th call (default 1 s): how
    long things seem to take depends on the load of the machine."""

    def __init__(self, steps: dict[int, float]) -> None:
        self.steps, self.now, self.calls = steps, 0.0, 0

    def __call__(self) -> float:
        self.calls += 1
        self.now += self.steps.get(self.calls, 1.0)
        return self.now


def test_two_fresh_runs_with_the_default_settings_give_the_same_bits(monkeypatch):
    params = []
    # The calls that end timed intervals under one load, then under another.
    for slow in ({6: 10.0, 8: 10.0}, {4: 10.0, 10: 10.0}):
        monkeypatch.setattr(time, "perf_counter", NoisyClock(slow))
        problem = TeacherStudentProblem()
        opt = MultiObjectiveOptimizer(problem.model.parameters(), lr=0.01)
        for _ in range(10):
            opt.zero_grad()
            opt.backward(problem.losses())
            opt.step()
        params.append([p.detach().clone() for p in problem.model.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(*params))


# -- 8. anomaly mode ------------------------------------------------------------------------------


@pytest.mark.parametrize("vectorize", [True, None])
def test_anomaly_mode_gives_the_same_gradient(vectorize):
    problem = TeacherStudentProblem(dtype=torch.float64)
    params = list(problem.model.parameters())
    opt = MultiObjectiveOptimizer(params, vectorize=vectorize)
    with torch.autograd.detect_anomaly():
        losses = problem.losses()
        expected = min_norm_direction(losses, params)
        opt.backward(losses)
    torch.testing.assert_close(flat_grad(params), expected)
    assert opt.balancer.vectorize is not False  # anomaly mode is not a reason to give up vmap


# -- 9. backward under torch.no_grad() ------------------------------------------------------------


@pytest.mark.parametrize("mode", ["exact", "amortized", "representation"])
def test_backward_under_no_grad_behaves_like_loss_backward(mode):
    problem = TeacherStudentProblem(dtype=torch.float64)
    params = list(problem.model.parameters())
    results = []
    for no_grad in (False, True):
        opt = MultiObjectiveOptimizer(params, mode=mode)
        for _ in range(2):
            opt.zero_grad()
            outputs = problem.model(problem.inputs)
            losses = [
                F.mse_loss(outputs, problem.teacher_outputs),
                F.cross_entropy(outputs, problem.labels),
            ]
            kwargs = {"representation": outputs} if mode == "representation" else {}
            with torch.no_grad() if no_grad else torch.enable_grad():
                opt.backward(losses, **kwargs)
        results.append((flat_grad(params).clone(), opt.balancer.state_dict()))
    torch.testing.assert_close(results[1][0], results[0][0], rtol=0, atol=0)
    assert results[1][1] == results[0][1]
