"""guard="device": a refused step is skipped on the device and its error raised later.

On CPU the same code runs as on CUDA; what a CUDA device would synchronise on (``.item()``,
``.tolist()``, a tensor's truth value, a copy to the host) is made to raise while the balanced
backward and the step run, which is how these tests see that neither synchronises.
"""

from __future__ import annotations

import contextlib
import math

import pytest
import torch
import torch.nn.functional as F
from helpers import TeacherStudentProblem

from gradbalance import Balancer, MultiObjectiveOptimizer

MODES = ["exact", "amortized", "representation"]


class Synchronised(AssertionError):
    pass


@contextlib.contextmanager
def no_host_reads():
    """Makes every tensor read that would synchronise a CUDA device raise."""
    names = ["item", "tolist", "__bool__", "__int__", "__float__", "numpy", "cpu"]
    saved = {name: getattr(torch.Tensor, name) for name in names}

    def refuse(name):
        def read(self, *args, **kwargs):
            raise Synchronised(f"Tensor.{name} in the step path")

        return read

    for name in names:
        setattr(torch.Tensor, name, refuse(name))
    try:
        yield
    finally:
        for name, method in saved.items():
            setattr(torch.Tensor, name, method)


class Problem(TeacherStudentProblem):
    """The helper problem, with its hidden layer as the representation."""

    def forward(self, scale=(1.0, 1.0)):
        hidden = self.model[1](self.model[0](self.inputs))
        out = self.model[2](hidden)
        losses = [F.mse_loss(out, self.teacher_outputs), F.cross_entropy(out, self.labels)]
        return [loss * s for loss, s in zip(losses, scale, strict=True)], hidden


def backward(opt, problem, scale=(1.0, 1.0), **kwargs):
    losses, hidden = problem.forward(scale)
    if opt.mode == "representation":
        kwargs["representation"] = hidden
    opt.backward(losses, **kwargs)


def optimizer(problem, mode, guard="device", **kwargs):
    return MultiObjectiveOptimizer(
        problem.model.parameters(), mode=mode, guard=guard, vectorize=True, lr=0.01, **kwargs
    )


def frozen(problem, opt):
    """Everything a refused step must leave alone."""
    return {
        "params": [p.detach().clone() for p in problem.model.parameters()],
        "moments": [
            {k: v.clone() for k, v in opt.state[p].items()} for p in problem.model.parameters()
        ],
        "weights": opt.weights.clone(),
        "balancer": {k: v for k, v in opt.balancer.state_dict().items() if k != "backward_calls"},
    }


def assert_same(before, after):
    for a, b in zip(before["params"], after["params"], strict=True):
        assert torch.equal(a, b)
    for a, b in zip(before["moments"], after["moments"], strict=True):
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert torch.equal(before["weights"], after["weights"])
    assert before["balancer"] == after["balancer"]


@pytest.mark.parametrize("mode", MODES)
def test_valid_steps_follow_the_synchronising_guard(mode):
    runs = {}
    for guard in ("sync", "device"):
        problem = Problem()
        opt = optimizer(problem, mode, guard)
        for _ in range(4):
            opt.zero_grad()
            backward(opt, problem)
            opt.step()
        runs[guard] = problem, opt
    (sync_problem, sync_opt), (device_problem, device_opt) = runs["sync"], runs["device"]
    for a, b in zip(sync_problem.model.parameters(), device_problem.model.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(sync_opt.weights, device_opt.weights)
    assert int(device_opt.balancer.refused_steps) == 0
    device_opt.balancer.raise_deferred()  # nothing to raise


@pytest.mark.parametrize("mode", MODES)
def test_backward_and_step_read_nothing_back_to_the_host(mode):
    problem = Problem()
    opt = optimizer(problem, mode)
    backward(opt, problem)  # the first call caches the bounds and builds the buffers
    opt.step()
    for _ in range(2):
        opt.zero_grad()
        losses, hidden = problem.forward()
        kwargs = {"representation": hidden} if mode == "representation" else {}
        with no_host_reads():
            opt.backward(losses, **kwargs)
            opt.step()


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("nan loss", "loss 0 is nan"),
        ("loss at its bound", "loss 1 = 0 is not above its min_loss"),
        ("infinite gradient", "non-finite gradients"),
    ],
)
def test_a_refused_step_changes_nothing_and_raises_later(mode, case, message):
    problem = Problem()
    opt = optimizer(problem, mode)
    for _ in range(2):
        opt.zero_grad()
        backward(opt, problem)
        opt.step()
    before = frozen(problem, opt)
    opt.zero_grad()
    if case == "nan loss":
        backward(opt, problem, scale=(math.nan, 1.0))
    elif case == "loss at its bound":
        backward(opt, problem, scale=(1.0, 0.0))
    else:
        problem.inputs[0, 0] = math.inf
        backward(opt, problem)
    opt.step()  # no error here: skipped on the device
    assert not all(p.grad.isfinite().all() for p in problem.model.parameters())
    assert int(opt.balancer.refused_steps) == 1
    with pytest.raises(ValueError, match="refused on the device") as error:
        opt.state_dict()  # synchronises anyway: raises what was deferred
    assert message in str(error.value)
    assert_same(before, frozen(problem, opt))
    opt.balancer.raise_deferred()  # raised once only


def test_a_bad_micro_batch_refuses_its_window():
    problem = Problem()
    opt = optimizer(problem, "exact")
    backward(opt, problem)
    opt.step()
    before = frozen(problem, opt)
    opt.zero_grad()
    backward(opt, problem, scale=(math.nan, 1.0), accumulate=True)
    backward(opt, problem)
    opt.step()
    with pytest.raises(ValueError, match=r"1 balanced backward call.*loss 0 is nan"):
        opt.balancer.raise_deferred()  # one refused step: the window
    assert_same(before, frozen(problem, opt))


@pytest.mark.parametrize("mode", MODES)
def test_an_overflow_under_a_grad_scaler_is_skipped_not_refused(mode):
    problem = Problem()
    opt = optimizer(problem, mode)
    backward(opt, problem)
    opt.step()
    before = frozen(problem, opt)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**127)
    opt.zero_grad()
    losses, hidden = problem.forward()
    kwargs = {"representation": hidden} if mode == "representation" else {}
    opt.backward([loss**32 for loss in losses], grad_scaler=scaler, **kwargs)
    scaler.step(opt)
    scaler.update()
    assert scaler.get_scale() == 2.0**126
    assert_same(before, frozen(problem, opt))
    assert int(opt.balancer.refused_steps) == 0


def test_a_base_without_found_inf_reads_the_verdict_and_skips():
    problem = Problem()
    opt = optimizer(problem, "exact", foreach=True)  # AdamW's foreach step takes no found_inf
    backward(opt, problem)
    opt.step()
    before = frozen(problem, opt)
    opt.zero_grad()
    backward(opt, problem, scale=(math.nan, 1.0))
    opt.step()
    with pytest.raises(ValueError, match="loss 0 is nan"):
        opt.balancer.raise_deferred()
    assert_same(before, frozen(problem, opt))


def test_a_closure_is_evaluated_before_the_step_it_decides():
    problem = Problem()
    opt = optimizer(problem, "exact")

    def closure():
        opt.zero_grad()
        losses, _ = problem.forward()
        opt.backward(losses)
        return sum(losses)

    before = [p.detach().clone() for p in problem.model.parameters()]
    loss = opt.step(closure)
    assert loss.ndim == 0
    assert any(not torch.equal(a, b) for a, b in zip(before, problem.model.parameters()))


def test_the_default_guard_synchronises_on_cpu():
    problem = Problem()
    assert MultiObjectiveOptimizer(problem.model.parameters()).balancer.guard == "sync"
    assert Balancer().guard == "sync"
    with pytest.raises(ValueError, match="guard must be 'sync' or 'device'"):
        Balancer(guard="lazy")
