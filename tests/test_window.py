"""The micro-batch window (gradbalance._window): its lifetime, without a balancer."""

import copy

import pytest
import torch

from gradbalance._bounds import Bounds
from gradbalance._guard import SyncGuard
from gradbalance._inputs import check_inputs
from gradbalance._parsing import Expected
from gradbalance._window import Window


def micro_batch(weight, accumulate, offset=0.0):
    losses = [(weight + offset).exp().sum(), weight.square().sum() + 1]
    expected = Expected(count=None, names=None, calls=0, from_min_losses=False, window=None)
    return check_inputs(
        losses,
        [weight],
        expected=expected,
        bounds=Bounds(None),
        accumulate=accumulate,
        grad_scaler=None,
        representation=None,
        refuse_plain_for=None,
    )


def gather(window, step):
    held = window.including(step, rho=step.rho)
    flat = window.buffers(step, 1)
    block = [torch.stack([step.losses.sum()]).detach().expand(1, 3).clone()]
    return held, window.gather(step, held, flat, block, SyncGuard())


def test_a_window_holds_micro_batches_until_the_last_and_then_nothing():
    weight = torch.randn(3, requires_grad=True)
    window = Window()
    first = micro_batch(weight, accumulate=True)
    held, verdict = gather(window, first)
    assert verdict is None and window.pending == 1
    assert torch.equal(window.held.rho, first.rho)  # the first micro-batch fixes ρ
    last = micro_batch(weight, accumulate=False, offset=1.0)
    held, verdict = gather(window, last)
    assert verdict is True and window.pending == 0 and window.held is None
    torch.testing.assert_close(held.mean, (first.values + last.values) / 2)
    assert held.rho is first.rho


def test_opened_is_pure_and_discard_drops_what_is_held():
    weight = torch.randn(3, requires_grad=True)
    window = Window()
    window.including(micro_batch(weight, accumulate=True), rho=torch.ones(2))
    assert window.pending == 0
    gather(window, micro_batch(weight, accumulate=True))
    window.discard()
    assert window.pending == 0


def test_an_attached_optimizer_refuses_to_step_while_micro_batches_are_held():
    weight = torch.nn.Parameter(torch.randn(3))
    optimizer = torch.optim.SGD([weight], lr=0.1)
    window = Window()
    window.attach(optimizer)
    gather(window, micro_batch(weight, accumulate=True))
    with pytest.raises(RuntimeError, match="1 micro-batch"):
        optimizer.step()
    optimizer.step(lambda: None)  # a closure may balance them: allowed
    optimizer.zero_grad()
    assert window.pending == 0
    optimizer.step()


def test_pickling_keeps_no_micro_batches_and_no_buffers():
    weight = torch.randn(3, requires_grad=True)
    window = Window()
    gather(window, micro_batch(weight, accumulate=True))
    clone = copy.deepcopy(window)
    assert clone.pending == 0 and clone.task_buffers == []
    assert window.pending == 1
