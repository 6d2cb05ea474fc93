"""Representation mode (the MGDA upper bound): π from the log-loss gradients with respect to a
shared representation, then one backward of the π-weighted sum.

References are float64 autograd: the per-task gradients with respect to the representation, the
exact min-norm π of their Gram matrix, and the gradient of ``Σ π_i log L_i``.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_unchanged, snapshot

from gradbalance import MultiObjectiveOptimizer
from gradbalance.weighting import min_norm_weights


class Split:
    """A body (the shared representation z) and a head; k losses on the head's output."""

    def __init__(self, num_losses: int = 2, seed: int = 0) -> None:
        generator = torch.Generator().manual_seed(seed)
        self.x = torch.randn(32, 10, generator=generator, dtype=torch.float64)
        self.targets = [torch.randn(32, 4, generator=generator, dtype=torch.float64)]
        self.targets += [
            torch.randn(32, 4, generator=generator, dtype=torch.float64)
            for _ in range(num_losses - 2)
        ]
        self.labels = torch.randint(0, 4, (32,), generator=generator)
        torch.manual_seed(seed)
        self.body = torch.nn.Sequential(torch.nn.Linear(10, 16), torch.nn.Tanh()).double()
        self.head = torch.nn.Linear(16, 4).double()
        self.params = [*self.body.parameters(), *self.head.parameters()]

    def forward(self, x: torch.Tensor | None = None) -> tuple[torch.Tensor, list[torch.Tensor]]:
        z = self.body(self.x if x is None else x)
        out = self.head(z)
        rows = slice(None) if x is None else slice(0, len(x))
        first, *others = (F.mse_loss(out, t[rows]) for t in self.targets)
        return z, [first, F.cross_entropy(out, self.labels[rows]), *others]


def reference(problem: Split, x=None):
    """π and the direction ``Σ π_i ∇ log L_i`` by plain autograd."""
    z, losses = problem.forward(x)
    rows = [torch.autograd.grad(loss.log(), z, retain_graph=True)[0].flatten() for loss in losses]
    jacobian = torch.stack(rows)
    weights = min_norm_weights(jacobian @ jacobian.T)
    total = sum(w * loss.log() for w, loss in zip(weights, losses))
    return weights, torch.autograd.grad(total, problem.params)


@pytest.mark.parametrize("num_losses", [2, 3])
@pytest.mark.parametrize("vectorize", [True, False])
def test_pi_and_grad_equal_the_float64_reference(num_losses, vectorize):
    problem = Split(num_losses)
    opt = MultiObjectiveOptimizer(problem.params, mode="representation", vectorize=vectorize)
    z, losses = problem.forward()
    opt.backward(losses, representation=z)
    weights, direction = reference(problem)
    torch.testing.assert_close(opt.weights, weights, rtol=1e-10, atol=1e-12)
    for param, expected in zip(problem.params, direction, strict=True):
        torch.testing.assert_close(param.grad, expected, rtol=1e-10, atol=1e-12)
    assert set(opt.stats) >= {"weights", "cosine", "conflict"}


def test_with_the_parameters_as_representation_it_is_exact_mode():
    problem = Split(3)
    representation = MultiObjectiveOptimizer(problem.params, mode="representation")
    representation.backward(problem.forward()[1], representation=problem.params)
    grads = [p.grad.clone() for p in problem.params]
    for param in problem.params:
        param.grad = None
    exact = MultiObjectiveOptimizer(problem.params, mode="exact")
    exact.backward(problem.forward()[1])
    torch.testing.assert_close(representation.weights, exact.weights, rtol=1e-9, atol=1e-12)
    for param, grad in zip(problem.params, grads, strict=True):
        torch.testing.assert_close(grad, param.grad, rtol=1e-9, atol=1e-12)


def test_micro_batches_get_the_mean_of_their_own_balanced_directions():
    problem = Split()
    halves = problem.x[:16], problem.x[16:]
    expected = [torch.zeros_like(p) for p in problem.params]
    for half in halves:
        for total, part in zip(expected, reference(problem, half)[1], strict=True):
            total += part / 2
    opt = MultiObjectiveOptimizer(problem.params, mode="representation")
    for index, half in enumerate(halves):
        z, losses = problem.forward(half)
        opt.backward(losses, representation=z, accumulate=index == 0)
        if index == 0:
            assert all(p.grad is None for p in problem.params)
    for param, grad in zip(problem.params, expected, strict=True):
        torch.testing.assert_close(param.grad, grad, rtol=1e-10, atol=1e-12)


def test_a_grad_scaler_scales_grad_and_leaves_pi_alone():
    problem = Split()
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    opt = MultiObjectiveOptimizer(problem.params, mode="representation")
    z, losses = problem.forward()
    opt.backward(losses, representation=z, grad_scaler=scaler)
    weights, direction = reference(problem)
    torch.testing.assert_close(opt.weights, weights, rtol=1e-10, atol=1e-12)
    for param, expected in zip(problem.params, direction, strict=True):
        torch.testing.assert_close(param.grad, 1024 * expected, rtol=1e-10, atol=1e-9)


def misuse(problem: Split):
    z, losses = problem.forward()
    return {
        "missing": {"losses": losses},
        "detached": {"losses": losses, "representation": z.detach()},
        "not a tensor": {"losses": losses, "representation": [z, 3]},
        "empty": {"losses": losses, "representation": []},
        "not read by a loss": {
            "losses": [losses[0], problem.head.weight.square().sum()],
            "representation": z,
        },
    }


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("missing", "required in mode='representation'"),
        ("detached", "does not require grad"),
        ("not a tensor", "representation tensor 1 is a int"),
        ("empty", "at least one tensor"),
        ("not read by a loss", "loss 1 do(es) not depend on the representation"),
    ],
)
def test_bad_representation_is_refused_and_changes_nothing(case, message):
    problem = Split()
    opt = MultiObjectiveOptimizer(problem.params, mode="representation", lr=0.1)
    z, losses = problem.forward()
    opt.backward(losses, representation=z)
    opt.step()
    before = snapshot(opt, torch.nn.ModuleList([problem.body, problem.head]))
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        opt.backward(**misuse(problem)[case])
    assert_unchanged(before, snapshot(opt, torch.nn.ModuleList([problem.body, problem.head])))


def test_representation_is_refused_in_the_other_modes():
    problem = Split()
    opt = MultiObjectiveOptimizer(problem.params, mode="exact")
    z, losses = problem.forward()
    with pytest.raises(ValueError, match="representation= is for mode='representation'"):
        opt.backward(losses, representation=z)
