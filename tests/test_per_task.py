"""The choice between the vmapped per-task backward and k ordinary passes (``vectorize=None``):
made from the graph's operators on the first balanced backward, never from timings.

Both strategies must give the same balanced gradient (against float64 references elsewhere, and
against each other here).
"""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import TeacherStudentProblem

from gradbalance import MultiObjectiveOptimizer
from gradbalance._graph import walk
from gradbalance._per_task import PerTaskGradients, is_vmap_failure, suits_vmap


def steps(problem, opt, count, model=None):
    for _ in range(count):
        opt.zero_grad()
        opt.backward(problem.losses(model))
        opt.step()


def kinds(output: torch.Tensor) -> frozenset[str]:
    return walk(output)[1]


def test_linear_layers_suit_vmap_convolutions_and_attention_do_not():
    x = torch.randn(2, 3, 8, 8)
    linear = torch.nn.Linear(8, 4)
    conv = torch.nn.Conv2d(3, 4, 3)
    attention = torch.nn.MultiheadAttention(8, 2, batch_first=True)
    assert suits_vmap(kinds(linear(x).sum()))
    assert not suits_vmap(kinds(conv(x).sum()))
    sequence = torch.randn(2, 5, 8)
    attended, _ = attention(sequence, sequence, sequence, need_weights=False)  # SDPA
    assert not suits_vmap(kinds(attended.sum()))


def test_only_vmaps_own_refusals_may_fall_back():
    assert is_vmap_failure(RuntimeError("Batching rule not implemented for aten::item."))
    assert is_vmap_failure(RuntimeError("vmap: inplace arithmetic(self, *extra_args) ..."))
    assert not is_vmap_failure(RuntimeError("CUDA out of memory"))
    assert not is_vmap_failure(ValueError("vmap"))  # not a RuntimeError: the user's


def test_the_choice_is_made_on_the_first_balanced_backward_and_kept_in_the_state_dict():
    problem = TeacherStudentProblem()
    opt = MultiObjectiveOptimizer(problem.model.parameters(), lr=0.01)
    assert opt.balancer.vectorize is None
    steps(problem, opt, 1)
    assert opt.balancer.vectorize is True  # an MLP
    assert opt.state_dict()["param_groups"][0]["gradbalance"]["vectorize"]["choice"] is True


def test_a_convolution_gets_the_k_passes():
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(3, 4, 3)
    opt = MultiObjectiveOptimizer(conv.parameters())
    out = conv(torch.randn(5, 3, 6, 6))
    opt.backward([out.pow(2).mean() + 1, (out - 1).abs().mean()])
    assert opt.balancer.vectorize is False


def test_a_refused_first_step_makes_no_choice():
    problem = TeacherStudentProblem()
    opt = MultiObjectiveOptimizer(problem.model.parameters())
    mse, ce = problem.losses()
    with pytest.raises(ValueError, match="nan"):
        opt.backward([mse * float("nan"), ce])
    assert opt.balancer.vectorize is None


def test_a_resumed_run_keeps_its_choice_and_a_fixed_choice_survives_loading():
    problem = TeacherStudentProblem()
    opt = MultiObjectiveOptimizer(problem.model.parameters(), lr=0.01)
    steps(problem, opt, 1)
    saved = copy.deepcopy(opt.state_dict())
    resumed = MultiObjectiveOptimizer(problem.model.parameters(), lr=0.01)
    resumed.load_state_dict(saved)
    assert resumed.balancer.vectorize is True
    fixed = MultiObjectiveOptimizer(problem.model.parameters(), lr=0.01, vectorize=False)
    fixed.load_state_dict(saved)
    assert fixed.balancer.vectorize is False


@pytest.mark.parametrize("saved", [{"choice": None, "probes": 3, "best": [1.0, 2.0]}])
def test_a_state_without_a_choice_loads_as_not_chosen_yet(saved):
    # A dict: saved while an earlier version was timing.
    per_task = PerTaskGradients(None)
    per_task.load_state_dict(saved)
    assert per_task.choice is None
    assert per_task.state_dict() == {"choice": None, "probes": 0, "best": [float("inf")] * 2}


@pytest.mark.parametrize("batch_layout", ["contiguous", "channels_last"])
def test_both_strategies_write_the_same_grad(batch_layout):
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(3, 4, 3).double()
    if batch_layout == "channels_last":
        conv = conv.to(memory_format=torch.channels_last)
    inputs = torch.randn(5, 3, 6, 6, dtype=torch.float64)
    grads = {}
    for vectorize in (True, False):
        conv.zero_grad()
        opt = MultiObjectiveOptimizer(conv.parameters(), vectorize=vectorize)
        out = conv(inputs)
        opt.backward([out.pow(2).mean() + 1, (out - 1).abs().mean()])
        grads[vectorize] = [p.grad.clone() for p in conv.parameters()]
        assert conv.weight.grad.stride() == conv.weight.stride()
    for vmapped, passes in zip(grads[True], grads[False], strict=True):
        torch.testing.assert_close(vmapped, passes, rtol=1e-12, atol=1e-14)


def test_one_batch_in_one_process_combines_the_vmapped_blocks_without_a_task_buffer():
    problem = TeacherStudentProblem()
    opt = MultiObjectiveOptimizer(problem.model.parameters(), vectorize=True)
    steps(problem, opt, 2)
    assert opt.balancer.window.task_buffers == []
    opt.backward(problem.losses(), accumulate=True)  # a window needs the buffer
    opt.backward(problem.losses())
    assert len(opt.balancer.window.task_buffers) == 1
