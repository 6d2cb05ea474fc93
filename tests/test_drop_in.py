"""The optimizer where a training loop touches an optimizer: schedulers across a resume,
torch.distributed.checkpoint, deepcopy and pickle, state-dict hooks, param groups after a load.

Each test compares with the uninterrupted run or with plain ``torch.optim.AdamW``. The bit-for-bit
comparisons fix ``vectorize``: by default the per-task backward is chosen by timing
(:mod:`gradbalance._per_task`), which two runs need not agree on.
"""

import copy
import io
import pickle

import pytest
import torch
from helpers import TeacherStudentProblem

from gradbalance import MultiObjectiveOptimizer

MODES = ["exact", "amortized"]

SCHEDULERS = {
    "StepLR": lambda opt: torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5),
    "MultiStepLR": lambda opt: torch.optim.lr_scheduler.MultiStepLR(opt, [2, 5], gamma=0.3),
    "ExponentialLR": lambda opt: torch.optim.lr_scheduler.ExponentialLR(opt, gamma=0.8),
    "CosineAnnealingLR": lambda opt: torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=8),
    "CosineAnnealingWarmRestarts": lambda opt: torch.optim.lr_scheduler.CosineAnnealingWarmRestarts(
        opt, T_0=3
    ),
    "LinearLR": lambda opt: torch.optim.lr_scheduler.LinearLR(opt, 0.1, total_iters=5),
    "PolynomialLR": lambda opt: torch.optim.lr_scheduler.PolynomialLR(opt, total_iters=8),
    "OneCycleLR": lambda opt: torch.optim.lr_scheduler.OneCycleLR(opt, 0.05, total_steps=10),
    "CyclicLR": lambda opt: torch.optim.lr_scheduler.CyclicLR(opt, 1e-3, 0.05, step_size_up=2),
    "SequentialLR": lambda opt: torch.optim.lr_scheduler.SequentialLR(
        opt,
        [
            torch.optim.lr_scheduler.LinearLR(opt, 0.1, total_iters=3),
            torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=6),
        ],
        milestones=[3],
    ),
    "ReduceLROnPlateau": lambda opt: torch.optim.lr_scheduler.ReduceLROnPlateau(
        opt, factor=0.5, patience=0, threshold=10.0
    ),
}


def step_scheduler(scheduler, loss):
    if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
        scheduler.step(loss)
    else:
        scheduler.step()


def run(problem, opt, scheduler, steps, plain=False):
    """``steps`` training steps; returns the learning rates the base stepped with."""
    rates = []
    for _ in range(steps):
        opt.zero_grad()
        losses = problem.losses()
        if plain:
            sum(losses).backward()
        else:
            opt.backward(losses)
        rates.append([group["lr"] for group in opt.param_groups])
        opt.step()
        step_scheduler(scheduler, sum(losses).item())
    return rates


def saved(obj):
    """A state dict as it comes back from disk (torch.save, then torch.load(weights_only=True))."""
    buffer = io.BytesIO()
    torch.save(obj.state_dict(), buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


def fresh_problem(problem, state):
    """The same data, other initial weights, then the saved weights loaded."""
    resumed = TeacherStudentProblem(seed=1)
    resumed.inputs, resumed.teacher_outputs, resumed.labels = (
        problem.inputs,
        problem.teacher_outputs,
        problem.labels,
    )
    resumed.model.load_state_dict(state)
    return resumed


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", list(SCHEDULERS))
def test_resume_with_a_scheduler_continues_the_uninterrupted_run_bit_for_bit(name, mode):
    problem = TeacherStudentProblem()
    opt = MultiObjectiveOptimizer(problem.model.parameters(), mode=mode, vectorize=True, lr=0.02)
    scheduler = SCHEDULERS[name](opt)
    run(problem, opt, scheduler, 4)
    model_state = {k: v.clone() for k, v in problem.model.state_dict().items()}
    opt_state, scheduler_state = saved(opt), saved(scheduler)
    uninterrupted = run(problem, opt, scheduler, 6)

    resumed = fresh_problem(problem, model_state)
    resumed_opt = MultiObjectiveOptimizer(
        resumed.model.parameters(), mode=mode, vectorize=True, lr=0.02
    )
    resumed_scheduler = SCHEDULERS[name](resumed_opt)
    resumed_scheduler.load_state_dict(scheduler_state)
    resumed_opt.load_state_dict(opt_state)
    assert resumed_opt.param_groups is resumed_opt.base.param_groups
    assert resumed_opt.state is resumed_opt.base.state
    assert len(resumed_opt.state) == len(list(problem.model.parameters()))
    assert run(resumed, resumed_opt, resumed_scheduler, 6) == uninterrupted
    for a, b in zip(problem.model.parameters(), resumed.model.parameters()):
        assert torch.equal(a, b)
    assert torch.equal(opt.weights, resumed_opt.weights)


@pytest.mark.parametrize("name", ["StepLR", "OneCycleLR", "ReduceLROnPlateau"])
def test_learning_rates_follow_plain_adamw_across_a_resume(name):
    rates = {}
    for kind in ("plain", "gradbalance"):
        problem = TeacherStudentProblem()
        params = problem.model.parameters()
        if kind == "plain":
            opt = torch.optim.AdamW(params, lr=0.02)
        else:
            opt = MultiObjectiveOptimizer(params, lr=0.02)
        scheduler = SCHEDULERS[name](opt)
        first = run(problem, opt, scheduler, 3, plain=kind == "plain")
        opt.load_state_dict(saved(opt))
        rates[kind] = first + run(problem, opt, scheduler, 5, plain=kind == "plain")
    assert rates["gradbalance"] == rates["plain"]


def test_add_param_group_after_a_load_trains_the_new_group():
    problem = TeacherStudentProblem()
    opt = MultiObjectiveOptimizer(problem.model[0].parameters(), lr=0.05)
    run(problem, opt, torch.optim.lr_scheduler.StepLR(opt, 1), 2)
    opt.load_state_dict(saved(opt))
    opt.add_param_group({"params": problem.model[2].parameters(), "lr": 0.05})
    assert opt.param_groups is opt.base.param_groups and len(opt.base.param_groups) == 2
    before = [p.detach().clone() for p in problem.model[2].parameters()]
    opt.zero_grad()
    opt.backward(problem.losses())
    opt.step()
    assert all(not torch.equal(a, b) for a, b in zip(before, problem.model[2].parameters()))


@pytest.mark.parametrize("mode", MODES)
def test_weights_and_stats_are_there_right_after_a_load(mode):
    problem = TeacherStudentProblem()
    opt = MultiObjectiveOptimizer(problem.model.parameters(), mode=mode, stats_every=1)
    run(problem, opt, torch.optim.lr_scheduler.StepLR(opt, 1), 3)
    loaded = MultiObjectiveOptimizer(problem.model.parameters(), mode=mode, stats_every=1)
    loaded.load_state_dict(saved(opt))
    assert torch.equal(loaded.weights, opt.weights)
    assert set(loaded.stats) == set(opt.stats)
    for key, value in opt.stats.items():
        torch.testing.assert_close(loaded.stats[key], value, rtol=0, atol=0)


def test_a_plain_adamw_state_dict_loads_and_keeps_the_balancing():
    problem = TeacherStudentProblem()
    adamw = torch.optim.AdamW(problem.model.parameters())
    sum(problem.losses()).backward()
    adamw.step()
    opt = MultiObjectiveOptimizer(problem.model.parameters(), mode="amortized")
    run(problem, opt, torch.optim.lr_scheduler.StepLR(opt, 1), 2)
    balancing = opt.balancer.state_dict()
    opt.load_state_dict(adamw.state_dict())
    assert opt.state_dict()["state"][0]["step"] == 1
    assert opt.balancer.state_dict() == balancing
    assert opt.param_groups[0]["gradbalance"] == balancing


# -- torch.distributed.checkpoint ---------------------------------------------------------------


def dcp_round_trip(model, opt, fresh_model, fresh_opt, how, tmp_path):
    from torch.distributed.checkpoint import load, save
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_optimizer_state_dict,
        set_optimizer_state_dict,
    )

    options = StateDictOptions(flatten_optimizer_state_dict=how == "flattened")
    state = get_optimizer_state_dict(model, opt, options=options)
    if how == "files":
        save({"optim": state}, checkpoint_id=str(tmp_path))
        state = get_optimizer_state_dict(fresh_model, fresh_opt, options=options)
        load({"optim": state}, checkpoint_id=str(tmp_path))
    else:  # torch's load_state_dict keeps the tensors it is given: copy them as a save would
        state = copy.deepcopy(state)
    set_optimizer_state_dict(fresh_model, fresh_opt, state, options=options)


@pytest.mark.filterwarnings("ignore::UserWarning")  # DCP warns that no process group exists
@pytest.mark.parametrize("how", ["in_memory", "flattened", "files"])
@pytest.mark.parametrize("mode", MODES)
def test_distributed_checkpoint_round_trip_resumes_the_run(mode, how, tmp_path):
    problem = TeacherStudentProblem()
    opt = MultiObjectiveOptimizer(problem.model.parameters(), mode=mode, vectorize=True, lr=0.02)
    run(problem, opt, torch.optim.lr_scheduler.StepLR(opt, 2), 3)
    model_state = {k: v.clone() for k, v in problem.model.state_dict().items()}
    resumed = fresh_problem(problem, model_state)
    resumed_opt = MultiObjectiveOptimizer(
        resumed.model.parameters(), mode=mode, vectorize=True, lr=0.02
    )
    dcp_round_trip(problem.model, opt, resumed.model, resumed_opt, how, tmp_path)
    # DCP initialises an optimizer whose state looks empty with an lr=0 step: not this one.
    assert opt.state_dict()["state"][0]["step"] == 3
    assert resumed_opt.state_dict()["state"][0]["step"] == 3
    assert resumed_opt.balancer.state_dict() == opt.balancer.state_dict()
    run(problem, opt, torch.optim.lr_scheduler.StepLR(opt, 2), 4)
    run(resumed, resumed_opt, torch.optim.lr_scheduler.StepLR(resumed_opt, 2), 4)
    for a, b in zip(problem.model.parameters(), resumed.model.parameters()):
        assert torch.equal(a, b)


# -- deepcopy, pickle, hooks ----------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
def test_deepcopy_of_model_and_optimizer_trains_identically(mode):
    problem = TeacherStudentProblem()
    opt = MultiObjectiveOptimizer(problem.model.parameters(), mode=mode, vectorize=True, lr=0.02)
    run(problem, opt, torch.optim.lr_scheduler.StepLR(opt, 1), 3)
    copied = copy.deepcopy({"model": problem.model, "opt": opt})
    twin = fresh_problem(problem, problem.model.state_dict())
    twin.model, twin_opt = copied["model"], copied["opt"]
    assert twin_opt.param_groups[0]["params"][0] is next(twin.model.parameters())
    assert twin_opt.balancer is not opt.balancer
    assert twin_opt.balancer.state_dict() == opt.balancer.state_dict()
    run(problem, opt, torch.optim.lr_scheduler.StepLR(opt, 1), 3)
    run(twin, twin_opt, torch.optim.lr_scheduler.StepLR(twin_opt, 1), 3)
    for a, b in zip(problem.model.parameters(), twin.model.parameters()):
        assert torch.equal(a, b)


def test_pickle_keeps_the_balancing():
    problem = TeacherStudentProblem()
    opt = MultiObjectiveOptimizer(problem.model.parameters(), mode="amortized", stats_every=1)
    run(problem, opt, torch.optim.lr_scheduler.StepLR(opt, 1), 2)
    restored = pickle.loads(pickle.dumps(opt))
    assert restored.mode == "amortized" and restored.stats_every == 1
    assert restored.balancer.state_dict() == opt.balancer.state_dict()
    assert restored.param_groups is restored.base.param_groups
    # torch gives an unpickled optimizer empty hook registries; so does this one
    restored.register_step_post_hook(lambda *args: None)
    restored.zero_grad()
    model = restored.param_groups[0]["params"]
    assert len(model) == len(list(problem.model.parameters()))


def test_state_dict_and_load_state_dict_hooks_run():
    problem = TeacherStudentProblem()
    opt = MultiObjectiveOptimizer(problem.model.parameters())
    run(problem, opt, torch.optim.lr_scheduler.StepLR(opt, 1), 1)
    calls = []
    opt.register_state_dict_pre_hook(lambda o: calls.append(("save-pre", o is opt)))

    def tag(o, state):
        calls.append(("save-post", "gradbalance" in state["param_groups"][0]))
        state["tag"] = 1
        return state

    opt.register_state_dict_post_hook(tag)
    opt.register_load_state_dict_pre_hook(lambda o, state: calls.append(("load-pre", state["tag"])))
    opt.register_load_state_dict_post_hook(lambda o: calls.append(("load-post", len(o.state))))
    state = opt.state_dict()
    assert state["tag"] == 1
    opt.load_state_dict(state)
    assert calls == [("save-pre", True), ("save-post", True), ("load-pre", 1), ("load-post", 4)]


def test_a_state_dict_of_another_mode_is_refused_before_anything_changes():
    problem = TeacherStudentProblem()
    exact = MultiObjectiveOptimizer(problem.model.parameters(), mode="exact", lr=0.5)
    run(problem, exact, torch.optim.lr_scheduler.StepLR(exact, 1), 1)
    amortized = MultiObjectiveOptimizer(problem.model.parameters(), mode="amortized")
    before = repr(amortized.state_dict())
    with pytest.raises(ValueError, match="mode"):
        amortized.load_state_dict(exact.state_dict())
    assert repr(amortized.state_dict()) == before
    assert amortized.param_groups[0]["lr"] == 1e-3


# -- param groups ---------------------------------------------------------------------------------


def test_named_parameters_get_the_same_defaults_as_parameters():
    problem = TeacherStudentProblem()
    named = MultiObjectiveOptimizer(problem.model.named_parameters(), lr=0.1)
    plain = MultiObjectiveOptimizer(problem.model.parameters(), lr=0.1)
    assert named.param_groups[0]["fused"] is plain.param_groups[0]["fused"] is True
    assert named.param_groups[0]["param_names"] == [n for n, _ in problem.model.named_parameters()]
    named.backward(problem.losses())
    named.step()


def test_add_param_group_with_a_complex_parameter_works_as_with_plain_adamw():
    torch.manual_seed(0)
    real = torch.nn.Parameter(torch.randn(3))
    values = torch.randn(4, dtype=torch.complex64)
    results = []
    for kind in ("plain", "gradbalance"):
        weight = torch.nn.Parameter(values.clone())
        if kind == "plain":
            opt = torch.optim.AdamW([real], lr=0.1)
        else:
            opt = MultiObjectiveOptimizer([real], lr=0.1)
            assert opt.param_groups[0]["fused"] is True
        opt.add_param_group({"params": [weight]})
        weight.grad = torch.full_like(weight, 1 + 2j)
        opt.step()
        results.append(weight.detach().clone())
    torch.testing.assert_close(results[0], results[1])
