"""The choice between the vmapped per-task backward and k ordinary passes (``vectorize=None``).

The clock is replaced by one that makes a chosen strategy slower, so that the choice is known.
Both strategies must give the same balanced gradient (against float64 references elsewhere, and
against each other here).
"""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import TeacherStudentProblem

from gradbalance import MultiObjectiveOptimizer, strategy
from gradbalance.strategy import PROBE_SCHEDULE


class FakeClock:
    """``time.perf_counter`` whose steps with the slow strategy take 10 s, the others 1 s."""

    def __init__(self, balancer, slow: bool) -> None:
        self.now = 0.0
        self.calls = 0
        self.balancer, self.slow = balancer, slow

    def __call__(self) -> float:
        self.calls += 1
        if self.calls % 2 == 0:  # the end of a measured step
            probe = self.balancer._per_task._probes
            self.now += 10.0 if PROBE_SCHEDULE[probe] == self.slow else 1.0
        return self.now


def steps(problem, opt, count):
    for _ in range(count):
        opt.zero_grad()
        opt.backward(problem.losses())
        opt.step()


@pytest.mark.parametrize("slow", [True, False])
def test_the_faster_strategy_is_kept_after_the_probe(monkeypatch, slow):
    problem = TeacherStudentProblem()
    opt = MultiObjectiveOptimizer(problem.model.parameters(), lr=0.01)
    monkeypatch.setattr(strategy.time, "perf_counter", FakeClock(opt.balancer, slow))
    steps(problem, opt, len(PROBE_SCHEDULE) - 1)
    assert opt.balancer.vectorize is None  # still measuring
    steps(problem, opt, 1)
    assert opt.balancer.vectorize is (not slow)
    assert opt.state_dict()["param_groups"][0]["gradbalance"]["vectorize"]["choice"] is (not slow)


def test_a_run_resumed_during_the_probe_goes_on_from_where_it_was(monkeypatch):
    problem = TeacherStudentProblem()
    opt = MultiObjectiveOptimizer(problem.model.parameters(), lr=0.01)
    monkeypatch.setattr(strategy.time, "perf_counter", FakeClock(opt.balancer, slow=True))
    steps(problem, opt, 3)
    saved = copy.deepcopy(opt.state_dict())
    resumed = MultiObjectiveOptimizer(problem.model.parameters(), lr=0.01)
    resumed.load_state_dict(saved)
    assert resumed.balancer._per_task._probes == 3
    monkeypatch.setattr(strategy.time, "perf_counter", FakeClock(resumed.balancer, slow=True))
    steps(problem, resumed, len(PROBE_SCHEDULE) - 3)
    assert resumed.balancer.vectorize is False


def test_a_fixed_choice_is_not_measured_and_survives_loading_a_probed_state():
    problem = TeacherStudentProblem()
    probed = MultiObjectiveOptimizer(problem.model.parameters(), lr=0.01)
    steps(problem, probed, len(PROBE_SCHEDULE))
    fixed = MultiObjectiveOptimizer(problem.model.parameters(), lr=0.01, vectorize=False)
    fixed.load_state_dict(probed.state_dict())
    assert fixed.balancer.vectorize is False


def test_a_state_without_the_choice_loads_as_not_measured_yet():
    problem = TeacherStudentProblem()
    opt = MultiObjectiveOptimizer(problem.model.parameters(), lr=0.01, vectorize=None)
    steps(problem, opt, 1)
    state = opt.balancer.state_dict()
    state["version"] = 1  # saved before the choice existed
    del state["vectorize"]
    opt.balancer.load_state_dict(state)
    assert opt.balancer.vectorize is None and opt.balancer._per_task._probes == 0


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
    assert opt.balancer._flat.task_buffers == []
    opt.backward(problem.losses(), accumulate=True)  # a window needs the buffer
    opt.backward(problem.losses())
    assert len(opt.balancer._flat.task_buffers) == 1


def test_when_vmap_wins_the_probe_the_rows_of_the_k_passes_are_freed(monkeypatch):
    problem = TeacherStudentProblem()
    opt = MultiObjectiveOptimizer(problem.model.parameters(), lr=0.01)
    monkeypatch.setattr(strategy.time, "perf_counter", FakeClock(opt.balancer, slow=False))
    steps(problem, opt, len(PROBE_SCHEDULE))
    assert opt.balancer.vectorize is True
    assert opt.balancer._flat.task_buffers == []
