"""Swapping ``torch.optim.AdamW`` for ``MultiObjectiveOptimizer`` (issue 23): positional
arguments, bad ``params``, the scheduler's warning, and windows of micro-batches without
``attach``. Each compares with AdamW, or with the same loop on ``loss.backward()``.

torch's own generic optimizer checks, run on both, are in ``test_torch_optimizer_suite.py``.
"""

import dataclasses
import gc
import importlib
import inspect
import warnings

import pytest
import torch
from helpers import TeacherStudentProblem, halves, micro_losses
from test_drop_in import SCHEDULERS

from gradbalance import Balancer, BalancingOptions, MultiObjectiveOptimizer

# torch's registry of global step pre-hooks (register_optimizer_step_pre_hook)
GLOBAL_PRE_HOOKS = importlib.import_module("torch.optim.optimizer")._global_optimizer_pre_hooks

# -- 1. positional arguments ----------------------------------------------------------------------


def hyper_parameters(optimizer):
    """The param groups' settings, less what only this class adds (the balancing state) or
    chooses (the fused kernel)."""
    return [
        {k: v for k, v in group.items() if k not in ("params", "gradbalance", "fused")}
        for group in optimizer.param_groups
    ]


POSITIONAL = [
    (1e-2,),
    (1e-2, (0.8, 0.99)),
    (1e-2, (0.8, 0.99), 1e-6),
    (1e-2, (0.8, 0.99), 1e-6, 0.1),
    (1e-2, (0.8, 0.99), 1e-6, 0.1, True),
]


@pytest.mark.parametrize("args", POSITIONAL, ids=lambda args: f"{len(args)}-positional")
def test_positional_arguments_mean_what_they_mean_for_adamw(args):
    trajectories = []
    for cls in (torch.optim.AdamW, MultiObjectiveOptimizer):
        problem = TeacherStudentProblem()
        opt = cls(problem.model.parameters(), *args, foreach=False)
        trajectories.append((hyper_parameters(opt), problem))
        for _ in range(3):  # plain steps: the base's update, bit for bit
            opt.zero_grad()
            sum(problem.losses()).backward()
            opt.step()
    (adamw_settings, adamw), (settings, balanced) = trajectories
    assert settings == adamw_settings
    for a, b in zip(adamw.model.parameters(), balanced.model.parameters()):
        assert torch.equal(a, b)


def test_adamws_keyword_only_arguments_are_adamws():
    kwargs = dict(maximize=True, foreach=True, capturable=False, differentiable=False)
    problem = TeacherStudentProblem()
    adamw = torch.optim.AdamW(problem.model.parameters(), 1e-2, **kwargs)
    opt = MultiObjectiveOptimizer(problem.model.parameters(), 1e-2, **kwargs)
    assert hyper_parameters(opt) == hyper_parameters(adamw)
    fused = MultiObjectiveOptimizer(problem.model.parameters(), 1e-2, fused=False)
    assert fused.param_groups[0]["fused"] is False


def test_the_signature_is_adamws_then_this_classs_own_keyword_only_arguments():
    adamw = list(inspect.signature(torch.optim.AdamW).parameters.values())
    ours = list(inspect.signature(MultiObjectiveOptimizer).parameters.values())
    assert [(p.name, p.kind, p.default) for p in ours[: len(adamw)]] == [
        (p.name, p.kind, p.default) for p in adamw
    ]
    own = {p.name: p for p in ours[len(adamw) :]}
    assert list(own)[:3] == ["base", "mode", "guard"]
    assert own["base"].default is torch.optim.AdamW and own["mode"].default == "exact"
    assert own["guard"].default is None  # chosen from the base and the parameters' device
    options = {f.name: f.default for f in dataclasses.fields(BalancingOptions)}
    del options["guard"]
    assert {name: own[name].default for name in options} == options
    assert all(p.kind is inspect.Parameter.KEYWORD_ONLY for p in list(own.values())[:-1])
    assert list(own.values())[-1].kind is inspect.Parameter.VAR_KEYWORD
    assert "**kwargs" not in str(inspect.signature(MultiObjectiveOptimizer))


def test_keyword_calls_as_config_tools_make_them():
    # Hydra's instantiate and jsonargparse call the class with keywords only, params included.
    problem = TeacherStudentProblem()
    config = {"lr": 0.02, "betas": (0.8, 0.9), "weight_decay": 0.0, "mode": "amortized"}
    opt = MultiObjectiveOptimizer(params=problem.model.parameters(), **config)
    assert opt.mode == "amortized"
    assert (opt.param_groups[0]["lr"], opt.param_groups[0]["betas"]) == (0.02, (0.8, 0.9))


def same_error(make_reference, make):
    with pytest.raises(Exception) as reference:
        make_reference()
    with pytest.raises(Exception) as error:
        make()
    assert (type(error.value), str(error.value)) == (type(reference.value), str(reference.value))


def test_wrong_arity_and_unknown_keywords_are_adamws_errors():
    problem = TeacherStudentProblem()
    params = list(problem.model.parameters())
    for args, kwargs in [
        ((1e-3, (0.9, 0.99), 1e-8, 0.01, False, "extra"), {}),
        ((1e-3,), {"lr": 1e-2}),
        ((), {"momentum": 0.9}),
        ((torch.optim.SGD,), {}),  # the old positional base: now AdamW's lr, refused as there
    ]:
        same_error(
            lambda args=args, kwargs=kwargs: torch.optim.AdamW(params, *args, **kwargs),
            lambda args=args, kwargs=kwargs: MultiObjectiveOptimizer(params, *args, **kwargs),
        )
    same_error(torch.optim.AdamW, MultiObjectiveOptimizer)  # no params


def test_another_base_gets_its_own_positional_arguments_and_defaults():
    problem = TeacherStudentProblem()
    params = list(problem.model.parameters())
    cases = [
        (torch.optim.SGD, (0.1, 0.9), {}),
        (torch.optim.SGD, (), {"momentum": 0.5}),
        (torch.optim.SGD, (), {}),  # SGD's own defaults, not AdamW's
        (torch.optim.RMSprop, (0.01, 0.9, 1e-6, 0.0, 0.5, True), {"maximize": False}),
        (torch.optim.Adam, (1e-2, (0.8, 0.9)), {}),  # Adam's weight decay 0, not AdamW's
    ]
    for base, args, kwargs in cases:
        reference = base(params, *args, **kwargs)
        opt = MultiObjectiveOptimizer(params, *args, base=base, **kwargs)
        assert type(opt.base) is base
        assert hyper_parameters(opt) == hyper_parameters(reference)
    with pytest.raises(TypeError, match="betas"):
        MultiObjectiveOptimizer(params, base=torch.optim.SGD, betas=(0.9, 0.99))


def test_wrapping_an_instance_refuses_arguments_for_a_new_one():
    problem = TeacherStudentProblem()
    sgd = torch.optim.SGD(problem.model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="1 positional"):
        MultiObjectiveOptimizer(sgd, 0.2)
    assert MultiObjectiveOptimizer(sgd, mode="amortized").base is sgd


# -- 2. bad params and hyper-parameters: AdamW's own errors ---------------------------------------


def bad_arguments():
    weight, other = torch.nn.Parameter(torch.randn(3, 2)), torch.nn.Parameter(torch.randn(2))
    return {
        "a tensor": ((torch.randn(3, 2),), {}),
        "a tensor that requires grad": ((torch.randn(3, 2, requires_grad=True),), {}),
        "one Parameter": ((weight,), {}),
        "None": ((None,), {}),
        "None and a bad lr": ((None,), {"lr": torch.tensor([1e-3, 1e-3])}),
        "an int": ((3,), {}),
        "no parameters": (([],), {}),
        "a non-leaf": (([weight * 2],), {}),
        "a set in a group": (([{"params": {weight}}],), {}),
        "a group without params": (([{"lr": 0.1}],), {}),
        "twice in two groups": (([{"params": weight}, {"params": weight}],), {}),
        "names on some": (([("weight", weight), other],), {}),
        "a negative lr": (([weight], -1.0), {}),
        "a negative eps": (([weight], 1e-3, (0.9, 0.99), -1.0), {}),
        "beta 1": (([weight],), {"betas": (1.0, 0.9)}),
        "beta 2": (([weight],), {"betas": (0.9, -0.1)}),
        "mixed betas": (([weight],), {"betas": (0.9, torch.tensor(0.99))}),
        "a negative weight decay": (([weight],), {"weight_decay": -1}),
        "a tensor lr with foreach": (([weight],), {"lr": torch.tensor(1e-3), "foreach": True}),
        "fused and differentiable": (([weight],), {"fused": True, "differentiable": True}),
        "a bad lr and a tensor": ((weight,), {"lr": -1.0}),
    }


@pytest.mark.parametrize("case", list(bad_arguments()))
def test_bad_arguments_raise_adamws_own_error(case):
    args, kwargs = bad_arguments()[case]
    same_error(
        lambda: torch.optim.AdamW(*args, **kwargs),
        lambda: MultiObjectiveOptimizer(*args, **kwargs),
    )


def test_bad_param_groups_added_later_raise_adamws_own_error():
    weight, other = torch.nn.Parameter(torch.randn(3, 2)), torch.nn.Parameter(torch.randn(2))
    for group in [
        [other],
        {"lr": 0.1},
        {"params": {other}},
        {"params": [weight]},  # already in the first group
        {"params": [("other", other)]},  # names, where the first group has none
    ]:
        same_error(
            lambda group=group: torch.optim.AdamW([weight]).add_param_group(group),
            lambda group=group: MultiObjectiveOptimizer([weight]).add_param_group(group),
        )


def test_a_single_tensor_is_refused_not_split_into_its_rows():
    with pytest.raises(TypeError, match="should be an iterable of Tensors or dicts"):
        MultiObjectiveOptimizer(torch.randn(3, 2))


def test_a_call_that_fails_on_a_hyper_parameter_leaves_a_generator_unread():
    for cls in (torch.optim.AdamW, MultiObjectiveOptimizer):
        model = torch.nn.Linear(3, 2)
        params = model.parameters()
        with pytest.raises(ValueError, match="Invalid learning rate"):
            cls(params, lr=-1.0)
        opt = cls(params, lr=1e-3)  # the same generator, retried: nothing was taken from it
        assert len(opt.param_groups[0]["params"]) == 2


def test_duplicate_parameters_warn_once_as_for_adamw():
    weight = torch.nn.Parameter(torch.randn(2))
    for cls in (torch.optim.AdamW, MultiObjectiveOptimizer):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            cls([weight, weight])
        assert [str(w.message) for w in caught if "duplicate" in str(w.message)] != []
        assert len([w for w in caught if "duplicate" in str(w.message)]) == 1


# -- 3. the learning-rate scheduler's warning -----------------------------------------------------


def built(kind):
    """An optimizer as a user builds it, the optimizer a scheduler goes on, and its model."""
    problem = TeacherStudentProblem()
    params = problem.model.parameters()
    if kind == "AdamW":
        opt = torch.optim.AdamW(params, lr=0.02)
        return opt, opt, problem
    if kind == "MultiObjectiveOptimizer":
        opt = MultiObjectiveOptimizer(params, lr=0.02)
        return opt, opt, problem
    adamw = torch.optim.AdamW(params, lr=0.02)
    if kind == "scheduler on the wrapper of an AdamW":
        opt = MultiObjectiveOptimizer(adamw)
        return opt, opt, problem
    return None, adamw, problem  # "an AdamW wrapped after its scheduler": wrapped in scheduled()


KINDS = [
    "AdamW",
    "MultiObjectiveOptimizer",
    "scheduler on the wrapper of an AdamW",
    "an AdamW wrapped after its scheduler",
]


def scheduled(kind, name, optimizer_steps_first):
    """The warnings of the first scheduler.step(), taken before or after an optimizer step."""
    opt, scheduled_on, problem = built(kind)
    scheduler = SCHEDULERS[name](scheduled_on)
    if opt is None:
        opt = MultiObjectiveOptimizer(scheduled_on)
    if optimizer_steps_first:
        opt.zero_grad()
        if isinstance(opt, MultiObjectiveOptimizer):
            opt.backward(problem.losses())
        else:
            sum(problem.losses()).backward()
        opt.step()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
            scheduler.step(1.0)
        else:
            scheduler.step()
    return [(w.category, str(w.message)) for w in caught]


@pytest.mark.parametrize("optimizer_steps_first", [False, True], ids=["before", "after"])
@pytest.mark.parametrize("name", list(SCHEDULERS))
def test_the_scheduler_warns_as_for_adamw(name, optimizer_steps_first):
    expected = scheduled("AdamW", name, optimizer_steps_first)
    if name not in ("CosineAnnealingWarmRestarts", "ReduceLROnPlateau"):
        assert bool(expected) is not optimizer_steps_first  # torch's own check, for AdamW
    for kind in KINDS[1:]:
        assert scheduled(kind, name, optimizer_steps_first) == expected, kind


# -- 4. windows of micro-batches without attach ---------------------------------------------------


def grads(params):
    return [None if p.grad is None else p.grad.clone() for p in params]


class Unattached:
    """A Balancer beside an optimizer it is not attached to, or a MultiObjectiveOptimizer; the
    model zeroed through ``model.zero_grad()`` as Hugging Face's Trainer does."""

    def __init__(self, kind, problem, lr=0.1):
        self.params = list(problem.model.parameters())
        if kind == "Balancer":
            self.optimizer, self.balancer = torch.optim.AdamW(self.params, lr=lr), Balancer()
        else:
            self.optimizer = MultiObjectiveOptimizer(self.params, lr=lr)
            self.balancer = self.optimizer.balancer

    def backward(self, losses, accumulate=False):
        self.balancer.backward(losses, self.params, accumulate=accumulate)


UNATTACHED = ["Balancer", "MultiObjectiveOptimizer"]


@pytest.mark.parametrize("kind", UNATTACHED)
def test_a_step_on_micro_batches_never_balanced_raises_instead_of_doing_nothing(kind):
    # The GradScaler habit: accumulate=True on every micro-batch, then the user's step.
    problem = TeacherStudentProblem(dtype=torch.float64)
    plain = torch.optim.AdamW(problem.model.parameters(), lr=0.1)
    before = [p.detach().clone() for p in problem.model.parameters()]
    for part in halves(problem):
        sum(micro_losses(problem.model, part)).backward()
    plain.step()  # plain torch steps on the micro-batches' sum
    assert not all(torch.equal(a, p) for a, p in zip(before, problem.model.parameters()))

    problem = TeacherStudentProblem(dtype=torch.float64)
    loop = Unattached(kind, problem)
    for part in halves(problem):
        loop.backward(micro_losses(problem.model, part), accumulate=True)
    before = [p.detach().clone() for p in loop.params]
    with pytest.raises(RuntimeError, match=r"2 micro-batch.*never balanced.*accumulate=False"):
        loop.optimizer.step()
    assert all(torch.equal(a, p) for a, p in zip(before, loop.params))
    assert loop.balancer.pending_micro_batches == 2  # balance them, or drop them
    loop.optimizer.step(lambda: None)  # a closure may balance them: not refused
    loop.backward(micro_losses(problem.model, halves(problem)[0]))  # the window closes
    loop.optimizer.step()  # nothing held: steps as any other


def test_a_step_outside_torchs_step_hooks_is_caught_by_the_next_micro_batch():
    problem = TeacherStudentProblem(dtype=torch.float64)
    params = list(problem.model.parameters())
    balancer = Balancer()
    for p in params:
        p.grad = torch.zeros_like(p)  # a loop that zeroes with set_to_none=False
    first, second = halves(problem)
    balancer.backward(micro_losses(problem.model, first), params, accumulate=True)
    with torch.no_grad():  # a hand-written SGD step, which no optimizer hook sees
        for p in params:
            p.sub_(0.1 * (p.grad + 0.01 * p))
    with pytest.raises(RuntimeError, match=r"parameters changed in place.*accumulate=False"):
        balancer.backward(micro_losses(problem.model, second), params)
    assert balancer.pending_micro_batches == 1
    problem.model.zero_grad(set_to_none=False)  # the loop gives the window up
    balancer.backward(micro_losses(problem.model, second), params)
    assert balancer.pending_micro_batches == 0


def window_after_a_failure(kind, zero, set_to_none=True):
    """A micro-batch held, the next raises, ``zero`` is called, then a whole new window: the
    ``.grad`` it ends with, and what a fresh window of the same micro-batches gives."""
    problem = TeacherStudentProblem(dtype=torch.float64)
    first, second = halves(problem)
    loop = Unattached(kind, problem)
    if not set_to_none:
        for p in loop.params:
            p.grad = torch.zeros_like(p)
    loop.backward(micro_losses(problem.model, first), accumulate=True)
    bad = [loss * float("nan") for loss in micro_losses(problem.model, second)]
    with pytest.raises(ValueError, match="nan"):
        loop.backward(bad, accumulate=True)
    zero(loop, problem, set_to_none)
    loop.backward(micro_losses(problem.model, second), accumulate=True)
    loop.backward(micro_losses(problem.model, first))
    result = grads(loop.params)

    fresh = TeacherStudentProblem(dtype=torch.float64)
    fresh.model.load_state_dict(problem.model.state_dict())
    reference = Unattached(kind, fresh)
    if not set_to_none:
        for p in reference.params:
            p.grad = torch.zeros_like(p)
    reference.backward(micro_losses(fresh.model, second), accumulate=True)
    reference.backward(micro_losses(fresh.model, first))
    return result, grads(reference.params)


def zero_the_model(loop, problem, set_to_none):
    problem.model.zero_grad(set_to_none=set_to_none)


def zero_the_optimizer(loop, problem, set_to_none):
    loop.optimizer.zero_grad(set_to_none=set_to_none)


@pytest.mark.parametrize("set_to_none", [True, False])
@pytest.mark.parametrize("zero", [zero_the_model, zero_the_optimizer])
@pytest.mark.parametrize("kind", UNATTACHED)
def test_zero_grad_after_a_micro_batch_raised_drops_the_window_as_for_loss_backward(
    kind, zero, set_to_none
):
    # Plain torch: the zero_grad() drops what the first micro-batch accumulated.
    problem = TeacherStudentProblem(dtype=torch.float64)
    first, second = halves(problem)
    optimizer = torch.optim.AdamW(problem.model.parameters())
    sum(micro_losses(problem.model, first)).backward()
    zero(type("Plain", (), {"optimizer": optimizer}), problem, set_to_none)
    sum(micro_losses(problem.model, second)).backward()
    sum(micro_losses(problem.model, first)).backward()
    plain = grads(problem.model.parameters())
    reference_model = TeacherStudentProblem(dtype=torch.float64).model
    (
        sum(micro_losses(reference_model, second)) + sum(micro_losses(reference_model, first))
    ).backward()
    for a, b in zip(plain, grads(reference_model.parameters())):
        torch.testing.assert_close(a, b)

    # The balanced window: the same.
    result, expected = window_after_a_failure(kind, zero, set_to_none)
    for a, b in zip(result, expected):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("kind", UNATTACHED)
def test_a_retry_after_a_micro_batch_raised_keeps_the_window_and_leaves_no_sentinel(kind):
    problem = TeacherStudentProblem(dtype=torch.float64)
    first, second = halves(problem)
    reference = Unattached(kind, problem)
    reference.backward(micro_losses(problem.model, first), accumulate=True)
    reference.backward(micro_losses(problem.model, second))
    expected = grads(reference.params)
    problem.model.zero_grad()

    loop = Unattached(kind, problem)
    loop.backward(micro_losses(problem.model, first), accumulate=True)
    with pytest.raises(ValueError, match="nan"):
        loop.backward([loss * float("nan") for loss in micro_losses(problem.model, second)])
    assert sum(p.grad is not None for p in loop.params) == 1  # the sentinel: zeros
    smallest = min(loop.params, key=torch.Tensor.numel)
    assert smallest.grad is not None and not smallest.grad.any()
    with pytest.raises(RuntimeError, match="never balanced"):
        loop.optimizer.step()  # still refused: the window is held
    loop.backward(micro_losses(problem.model, second))  # the retry
    for a, b in zip(grads(loop.params), expected):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("kind", UNATTACHED)
def test_discarding_after_a_micro_batch_raised_takes_the_sentinel_out(kind):
    problem = TeacherStudentProblem(dtype=torch.float64)
    first, second = halves(problem)
    loop = Unattached(kind, problem)
    loop.backward(micro_losses(problem.model, first), accumulate=True)
    with pytest.raises(ValueError, match="nan"):
        loop.backward([loss * float("nan") for loss in micro_losses(problem.model, second)])
    loop.balancer.discard_micro_batches()
    assert all(p.grad is None for p in loop.params)


def test_the_step_refusal_goes_with_the_window():
    problem = TeacherStudentProblem()
    params = list(problem.model.parameters())
    balancer = Balancer()
    hooks = dict(GLOBAL_PRE_HOOKS)
    balancer.backward(problem.losses(), params, accumulate=True)
    assert len(GLOBAL_PRE_HOOKS) == len(hooks) + 1
    other = torch.optim.SGD([torch.zeros(2, requires_grad=True)], lr=0.1)
    other.step()  # an optimizer of other parameters steps as it likes
    balancer.backward(problem.losses(), params)
    assert dict(GLOBAL_PRE_HOOKS) == hooks
    balancer.backward(problem.losses(), params, accumulate=True)
    del balancer  # a window that is garbage refuses nothing
    torch.optim.AdamW(params).step()


def test_a_window_collected_while_holding_micro_batches_leaves_no_step_hook():
    problem = TeacherStudentProblem()
    hooks = dict(GLOBAL_PRE_HOOKS)
    balancer = Balancer()
    balancer.backward(problem.losses(), list(problem.model.parameters()), accumulate=True)
    assert len(GLOBAL_PRE_HOOKS) == len(hooks) + 1
    del balancer
    gc.collect()
    assert dict(GLOBAL_PRE_HOOKS) == hooks


# -- the fused optimizers' found_inf protocol (torch's fused_does_not_step_if_foundinf) ----------


@pytest.mark.parametrize("guard", ["sync", "device"])
def test_found_inf_set_on_the_optimizer_skips_the_step_as_for_a_fused_adamw(guard):
    problem = TeacherStudentProblem()
    opt = MultiObjectiveOptimizer(problem.model.parameters(), guard=guard, fused=True)
    for found in (1.0, 0.0):
        opt.zero_grad()
        opt.backward(problem.losses())
        before = [p.detach().clone() for p in problem.model.parameters()]
        opt.grad_scale, opt.found_inf = None, torch.tensor(found)
        opt.step()
        del opt.grad_scale, opt.found_inf
        unchanged = all(torch.equal(a, p) for a, p in zip(before, problem.model.parameters()))
        assert unchanged is (found == 1.0)
