"""weighting=: exact and representation modes with another rule for π, ours or torchjd's.

References are independent of the engine: the Jacobian of the log-losses by float64 autograd,
torchjd's own aggregators on that Jacobian, and closed forms for fixed weights.
"""

from __future__ import annotations

import copy
import math
import pickle

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_unchanged, snapshot
from hypothesis import given, settings
from hypothesis import strategies as st

from gradbalance import Balancer, MultiObjectiveOptimizer
from gradbalance.weighting import min_norm_weights

aggregation = pytest.importorskip("torchjd.aggregation")

# torchjd weighting → the aggregator that applies it to a Jacobian.
TORCHJD = {
    "UPGrad": (aggregation.UPGradWeighting, aggregation.UPGrad),
    "DualProj": (aggregation.DualProjWeighting, aggregation.DualProj),
    "PCGrad": (aggregation.PCGradWeighting, aggregation.PCGrad),
    "IMTLG": (aggregation.IMTLGWeighting, aggregation.IMTLG),
    "AlignedMTL": (aggregation.AlignedMTLWeighting, aggregation.AlignedMTL),
    "MGDA": (aggregation.MGDAWeighting, aggregation.MGDA),
}


class Problem:
    """k losses of a small float64 MLP; every loss reads the hidden layer (the representation)."""

    def __init__(self, k: int = 2, seed: int = 0) -> None:
        generator = torch.Generator().manual_seed(seed)
        self.inputs = torch.randn(32, 6, generator=generator, dtype=torch.float64)
        self.targets = torch.randn(k, 32, 3, generator=generator, dtype=torch.float64)
        torch.manual_seed(seed)
        self.model = torch.nn.Sequential(
            torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3)
        ).double()

    def losses(self) -> tuple[list[torch.Tensor], torch.Tensor]:
        hidden = self.model[1](self.model[0](self.inputs))
        out = self.model[2](hidden)
        return [F.mse_loss(out, target) for target in self.targets], hidden

    def log_loss_jacobian(self) -> torch.Tensor:
        """(k, n): row i is ∇ log L_i over all parameters, by plain autograd."""
        losses, _ = self.losses()
        params = list(self.model.parameters())
        rows = [torch.autograd.grad(loss.log(), params, retain_graph=True) for loss in losses]
        return torch.stack([torch.cat([g.reshape(-1) for g in row]) for row in rows])

    def grad(self) -> torch.Tensor:
        return torch.cat([p.grad.reshape(-1) for p in self.model.parameters()])


def balanced_grad(problem: Problem, weighting, mode: str = "exact", **kwargs) -> Balancer:
    balancer = Balancer(mode, weighting=weighting, vectorize=True, **kwargs)
    losses, hidden = problem.losses()
    representation = hidden if mode == "representation" else None
    balancer.backward(losses, problem.model.parameters(), representation=representation)
    return balancer


@pytest.mark.parametrize("name", TORCHJD)
@pytest.mark.parametrize("k", [2, 3])
def test_torchjd_weighting_gives_its_aggregator_direction(name, k):
    problem = Problem(k, seed=k)
    jacobian = problem.log_loss_jacobian()
    weighting_class, aggregator_class = TORCHJD[name]
    torch.manual_seed(0)  # PCGrad projects in a random order: the same one each time
    balancer = balanced_grad(problem, weighting_class())
    torch.manual_seed(0)
    expected_weights = weighting_class()(jacobian @ jacobian.T)
    torch.testing.assert_close(balancer.weights, expected_weights, rtol=1e-7, atol=1e-9)
    torch.manual_seed(0)
    expected_direction = aggregator_class()(jacobian)
    scale = expected_direction.norm()
    torch.testing.assert_close(
        problem.grad() / scale, expected_direction / scale, atol=1e-8, rtol=0
    )


def test_our_min_norm_weighting_passed_in_equals_the_default():
    default, custom = Problem(3), Problem(3)
    balanced_grad(default, None)
    balancer = balanced_grad(custom, min_norm_weights)
    torch.testing.assert_close(custom.grad(), default.grad(), rtol=0, atol=0)
    assert "min_norm_weights" in repr(balancer)


@pytest.mark.parametrize("seed", range(5))
def test_our_exact_min_norm_is_at_least_as_short_as_torchjd_mgda(seed):
    """torchjd's MGDA is Frank-Wolfe with a stopping tolerance; ours is the exact minimiser of
    ‖Σ π_i g_i‖² on the simplex, so never longer, and close to theirs."""
    ours, theirs = Problem(3, seed), Problem(3, seed)
    balanced_grad(ours, None)
    balanced_grad(theirs, aggregation.MGDAWeighting())
    assert ours.grad().norm() <= theirs.grad().norm() * (1 + 1e-12)
    assert (ours.grad() - theirs.grad()).norm() <= 0.1 * theirs.grad().norm()


@settings(max_examples=25, deadline=None)
@given(
    k=st.integers(2, 4),
    seed=st.integers(0, 2**16),
    raw=st.lists(st.floats(-3, 3, allow_nan=False), min_size=4, max_size=4),
)
def test_any_fixed_weights_give_the_weighted_log_loss_gradient(k, seed, raw):
    """d = Σ π_i ∇ log L_i for whatever π the weighting returns, on or off the simplex."""
    problem = Problem(k, seed)
    pi = torch.tensor(raw[:k], dtype=torch.float64)
    expected = pi @ problem.log_loss_jacobian()
    balancer = balanced_grad(problem, lambda gram: pi.clone())
    torch.testing.assert_close(balancer.weights, pi, rtol=0, atol=0)
    torch.testing.assert_close(problem.grad(), expected, rtol=1e-10, atol=1e-12)


def test_the_weighting_sees_the_log_loss_gram_matrix():
    problem = Problem(3, seed=1)
    jacobian = problem.log_loss_jacobian()
    seen = []

    def uniform(gram):
        seen.append(gram)
        return torch.full((len(gram),), 1 / 3, dtype=gram.dtype, device=gram.device)

    balanced_grad(problem, uniform)
    assert seen[0].dtype == torch.float64 and seen[0].shape == (3, 3)
    torch.testing.assert_close(seen[0], jacobian @ jacobian.T, rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("name", ["UPGrad", "PCGrad", "IMTLG"])
def test_representation_mode_takes_a_torchjd_weighting(name):
    problem = Problem(2, seed=2)
    losses, hidden = problem.losses()
    rows = [torch.autograd.grad(loss.log(), hidden, retain_graph=True)[0] for loss in losses]
    z_jacobian = torch.stack([row.reshape(-1) for row in rows])
    weighting_class, _ = TORCHJD[name]
    balancer = balanced_grad(problem, weighting_class(), mode="representation")
    expected = weighting_class()(z_jacobian @ z_jacobian.T)
    torch.testing.assert_close(balancer.weights, expected, rtol=1e-7, atol=1e-9)
    torch.testing.assert_close(problem.grad(), expected @ problem.log_loss_jacobian())


def test_optimizer_steps_with_a_torchjd_weighting_and_keeps_it_across_copies():
    problem = Problem(2)
    opt = MultiObjectiveOptimizer(
        problem.model.parameters(), weighting=aggregation.UPGradWeighting(), lr=1e-2
    )
    for _ in range(3):
        opt.zero_grad()
        opt.backward(problem.losses()[0])
        opt.step()
    for clone in (copy.deepcopy(opt), pickle.loads(pickle.dumps(opt))):
        assert isinstance(clone.balancer.options.weighting, aggregation.UPGradWeighting)
        torch.testing.assert_close(clone.weights, opt.weights)


# -- bad weightings: a clear error, and nothing changes ----------------------------------------


def _bad_weightings():
    return {
        "nan": (lambda gram: torch.tensor([math.nan, 1.0], dtype=gram.dtype), ValueError),
        "inf": (lambda gram: torch.tensor([math.inf, 0.0], dtype=gram.dtype), ValueError),
        "shape": (lambda gram: torch.ones(3, dtype=gram.dtype), ValueError),
        "matrix": (lambda gram: gram, ValueError),
        "integer": (lambda gram: torch.tensor([1, 1]), ValueError),
        "list": (lambda gram: [0.5, 0.5], TypeError),
    }


@pytest.mark.parametrize("case", list(_bad_weightings()))
@pytest.mark.parametrize("mode", ["exact", "representation"])
def test_a_bad_weighting_is_refused_before_anything_changes(case, mode):
    weighting, error = _bad_weightings()[case]
    problem = Problem(2)
    opt = MultiObjectiveOptimizer(
        problem.model.parameters(), mode=mode, weighting=weighting, vectorize=True, lr=1e-2
    )
    before = snapshot(opt, problem.model)
    losses, hidden = problem.losses()
    representation = hidden if mode == "representation" else None
    with pytest.raises(error, match=r"weighting _bad_weightings\.<locals>\.<lambda>"):
        opt.backward(losses, representation=representation)
    assert opt.weights is None and opt.balancer.backward_calls == 0
    assert_unchanged(before, snapshot(opt, problem.model))


def test_normalize_refuses_negative_weights():
    problem = Problem(2)
    balancer = Balancer(
        "exact", weighting=lambda gram: torch.tensor([1.5, -0.5], dtype=gram.dtype), normalize=True
    )
    with pytest.raises(ValueError, match="negative or sum to ≤ 0"):
        balancer.backward(problem.losses()[0], problem.model.parameters())
    assert all(p.grad is None for p in problem.model.parameters())


def test_negative_weights_are_followed_without_normalize():
    problem = Problem(2)
    pi = torch.tensor([1.5, -0.5], dtype=torch.float64)
    balanced_grad(problem, lambda gram: pi)
    torch.testing.assert_close(problem.grad(), pi @ problem.log_loss_jacobian())


@pytest.mark.parametrize("mode", ["amortized", "affine"])
def test_weighting_is_refused_in_modes_with_their_own_weights(mode):
    with pytest.raises(ValueError, match="weighting= is for the modes exact and representation"):
        Balancer(mode, weighting=min_norm_weights)


def test_weighting_must_be_callable():
    with pytest.raises(TypeError, match="weighting must be callable"):
        Balancer("exact", weighting=[0.5, 0.5])


def test_device_guard_skips_a_step_with_bad_weights_and_names_the_weighting_later():
    problem = Problem(2)
    calls = []

    def flaky(gram):
        calls.append(None)
        weights = torch.full((2,), 0.5, dtype=gram.dtype)
        return weights * math.nan if len(calls) == 2 else weights

    opt = MultiObjectiveOptimizer(
        problem.model.parameters(), weighting=flaky, guard="device", fused=True, lr=1e-2
    )
    opt.zero_grad()
    opt.backward(problem.losses()[0])
    opt.step()
    params = [p.detach().clone() for p in problem.model.parameters()]
    moments = [{k: v.clone() for k, v in opt.state[p].items()} for p in problem.model.parameters()]
    weights = opt.weights.clone()
    opt.zero_grad()
    opt.backward(problem.losses()[0])
    opt.step()
    for old, p in zip(params, problem.model.parameters(), strict=True):
        assert torch.equal(old, p)
    for old, p in zip(moments, problem.model.parameters(), strict=True):
        assert all(torch.equal(old[key], opt.state[p][key]) for key in old)
    assert torch.equal(opt.weights, weights)
    assert int(opt.balancer.refused_steps) == 1
    with pytest.raises(ValueError, match=r"weighting test_device_guard.*flaky returned non-finite"):
        opt.balancer.raise_deferred()
