"""PyTorch's generic optimizer checks, on ``MultiObjectiveOptimizer`` as on ``torch.optim.AdamW``.

torch describes each of its optimizers by an ``OptimizerInfo`` (``torch.testing._internal.
common_optimizers``, shipped with torch): the constructor arguments to try, the ones that must
fail and with which error, the schedulers to combine with, the implementations it supports. torch's
own test suite (``test/test_optim.py``, not shipped) runs a set of generic checks over every
``OptimizerInfo``. Here the ``OptimizerInfo`` of ``MultiObjectiveOptimizer`` is AdamW's, with the
class swapped, and each check that runs on a CPU is written again below, after torch's, and run on
both: whatever AdamW passes, the optimizer passes. Used as a plain optimizer (``loss.backward()``
and ``step()``), it must be AdamW.

The checks of torch's suite left out, and why:

- on CUDA only, or several GPUs, or tens of GB: ``forloop_goes_right_direction_multigpu``,
  ``mixed_device_dtype``, ``set_default_dtype_works_with_foreach``, ``foreach_large_tensor``,
  ``peak_memory_foreach``, ``fused_large_tensor``, ``cpu_load_state_dict`` (skips the CPU),
  ``state_dict_with_cuda_params``, ``fused_cpu_matches_cuda``;
- ``defaults_changed_to_foreach`` (CUDA): not applicable by design — the default base takes
  torch's fused kernel where it runs (docs/performance.md), not the foreach one, and the check
  patches the module that defines the class for a ``_multi_tensor_<name>`` function;
- not applicable to AdamW either: ``rosenbrock_sparse`` (no sparse gradients),
  ``second_order_optims_return_consistent_types`` (no closure required).

``fused_does_not_step_if_foundinf`` is CUDA-only in torch's suite; torch's CPU fused kernel takes
``found_inf`` too, so it runs here on the CPU.
"""

from __future__ import annotations

import io
from copy import deepcopy

import pytest
import torch
from torch.nn import Parameter
from torch.optim import SGD
from torch.optim.lr_scheduler import ReduceLROnPlateau
from torch.optim.optimizer import (
    register_optimizer_step_post_hook,
    register_optimizer_step_pre_hook,
)

from gradbalance import MultiObjectiveOptimizer

# Importing torch's test utilities freezes torch.backends' flags for the whole process
# (torch.backends.disable_global_flags()); the other test modules may set them: thawed again.
_BACKENDS = torch.backends.flags_frozen.__globals__  # torch.backends' own namespace
_ALLOWED = _BACKENDS["__allow_nonbracketed_mutation_flag"]
import torch.testing._internal.common_optimizers as common_optimizers  # noqa: E402
import torch.testing._internal.common_utils as common_utils  # noqa: E402

_BACKENDS["__allow_nonbracketed_mutation_flag"] = _ALLOWED

OptimizerInfo = common_optimizers.OptimizerInfo
OptimizerErrorEnum = common_optimizers.OptimizerErrorEnum
TensorTracker = common_optimizers.TensorTracker
all_inputs = common_optimizers._get_optim_inputs_including_global_cliquey_kwargs

DEVICE = "cpu"
ADAMW = next(info for info in common_optimizers.optim_db if info.optim_cls is torch.optim.AdamW)
# AdamW's description, the class swapped.
BALANCED = OptimizerInfo(
    MultiObjectiveOptimizer,
    optim_inputs_func=ADAMW.optim_inputs_func,
    scheduler_inputs=ADAMW.scheduler_inputs,
    supported_impls=ADAMW.supported_impls,
    not_og_supported_flags=ADAMW.not_og_supported_flags,
    supports_sparse=ADAMW.supports_sparse,
    has_capturable_arg=ADAMW.has_capturable_arg,
    only_supports_sparse_grads=ADAMW.only_supports_sparse_grads,
    metadata_for_sparse=ADAMW.metadata_for_sparse,
    supports_complex=ADAMW.supports_complex,
    step_requires_closure=ADAMW.step_requires_closure,
    supports_param_groups=ADAMW.supports_param_groups,
    supports_multiple_devices=ADAMW.supports_multiple_devices,
    decorators=ADAMW.decorators,
    optim_error_inputs_func=ADAMW.optim_error_inputs_func,
    supports_fused_on=ADAMW.supports_fused_on,
)
INFOS = pytest.mark.parametrize("info", [ADAMW, BALANCED], ids=lambda info: info.name)
# AdamW's tolerance override of test_fused_matches_forloop (its OptimizerInfo's decorators).
REDUCED_PRECISION = {torch.bfloat16: 5e-3, torch.float16: 5e-3}


@pytest.fixture
def check() -> common_utils.TestCase:
    """torch's TestCase, for its assertEqual (the comparison torch's suite makes)."""
    return common_utils.TestCase()


def linear_loss(weight, bias, inputs):
    return (weight.mv(inputs) + bias).pow(2).sum()


def linear_closure(optimizer, weight, bias, inputs):
    """torch's closure of the direction tests: zero the gradients, backward of linear_loss."""

    def closure():
        optimizer.zero_grad()
        loss = linear_loss(weight, bias, inputs)
        loss.backward()
        return loss

    return closure


def rosenbrock(tensor):
    x, y = tensor
    return (1 - x) ** 2 + 100 * (y - x**2) ** 2


def step_schedulers(schedulers, loss):
    for scheduler in schedulers:
        if isinstance(scheduler, ReduceLROnPlateau):
            scheduler.step(loss)
        else:
            scheduler.step()


# -- construction ---------------------------------------------------------------------------------


@INFOS
def test_optim_infos_do_not_specify_global_cliquey_kwargs(info):
    for optim_input in info.optim_inputs_func(device=DEVICE):
        assert not {"foreach", "fused", "differentiable"} & optim_input.kwargs.keys()


@INFOS
def test_errors(info, check):
    for error_input in info.optim_error_inputs_func(device=DEVICE, dtype=torch.float32):
        optim_input = error_input.optimizer_error_input
        params, kwargs = optim_input.params, optim_input.kwargs
        expects = (
            check.assertWarnsRegex
            if issubclass(error_input.error_type, Warning)
            else check.assertRaisesRegex
        )
        if error_input.error_on == OptimizerErrorEnum.CONSTRUCTION_ERROR:
            with expects(error_input.error_type, error_input.error_regex):
                info.optim_cls(params, **kwargs)
        else:
            optimizer = info.optim_cls(params, **kwargs)
            with expects(error_input.error_type, error_input.error_regex):
                optimizer.step()


@INFOS
def test_optimizer_can_be_printed(info):
    params = [Parameter(torch.randn(2, 3)) for _ in range(2)]
    for optim_input in all_inputs(DEVICE, torch.float32, info):
        repr(info.optim_cls(params, **optim_input.kwargs))


# -- the update goes the right way ----------------------------------------------------------------


@INFOS
@pytest.mark.parametrize("contiguous", [True, False])
@pytest.mark.parametrize("with_lrsched", [True, False])
def test_forloop_goes_right_direction(info, contiguous, with_lrsched):
    for constructors in info.scheduler_inputs if with_lrsched else [None]:
        for optim_input in info.optim_inputs_func(device=DEVICE):
            optim_input.kwargs["foreach"] = False  # the for-loop implementation
            if contiguous:
                weight, bias = Parameter(torch.randn(10, 5)), Parameter(torch.randn(10))
            else:
                weight = Parameter(torch.randn(10, 5, 2)[..., 0])
                bias = Parameter(torch.randn(10, 2)[..., 0])
            inputs = torch.randn(5)
            optimizer = info.optim_cls([weight, bias], **optim_input.kwargs)
            schedulers = [make(optimizer) for make in constructors or []]

            closure = linear_closure(optimizer, weight, bias, inputs)

            initial = closure().item()
            for _ in range(20):
                loss = closure()
                optimizer.step()
                step_schedulers(schedulers, loss)
            if optim_input.kwargs.get("maximize", False):
                assert closure().item() > initial
            else:
                assert closure().item() < initial


@INFOS
def test_param_group_with_lrscheduler_goes_right_direction(info):
    for constructors in info.scheduler_inputs:
        weight, bias = Parameter(torch.randn(10, 5)), Parameter(torch.randn(10))
        inputs = torch.randn(5)
        optimizer = info.optim_cls([{"params": [weight]}, {"params": [bias], "lr": 0.01}])
        schedulers = [make(optimizer) for make in constructors]

        closure = linear_closure(optimizer, weight, bias, inputs)

        initial = closure().item()
        for _ in range(20):
            loss = optimizer.step(closure)
            step_schedulers(schedulers, loss)
        assert closure().item() < initial


@INFOS
def test_tensor_lr(info, check):
    for optim_input in all_inputs(DEVICE, torch.float32, info, skip=("differentiable",)):
        weight, bias = Parameter(torch.randn(10, 5)), Parameter(torch.randn(10))
        weight_c = weight.detach().clone().requires_grad_(True)
        bias_c = bias.detach().clone().requires_grad_(True)
        inputs = torch.randn(5)
        kwargs = {**optim_input.kwargs, "lr": 1e-3}
        float_lr = info.optim_cls([weight, bias], **kwargs)
        try:
            tensor_lr = info.optim_cls([weight_c, bias_c], **{**kwargs, "lr": torch.tensor(1e-3)})
        except ValueError as error:
            check.assertRegex(str(error), ".*lr as a Tensor is not supported.*")
            continue
        for _ in range(5):
            for optimizer, w, b in ((float_lr, weight, bias), (tensor_lr, weight_c, bias_c)):
                optimizer.zero_grad()
                linear_loss(w, b, inputs).backward()
                optimizer.step()
            check.assertEqual(weight, weight_c)
            check.assertEqual(bias, bias_c)


@INFOS
def test_param_groups_weight_decay(info):
    for optim_input in all_inputs(DEVICE, torch.float32, info, skip=("differentiable",)):
        weight, bias = Parameter(torch.randn(10, 5)), Parameter(torch.randn(10))
        inputs = torch.randn(5)
        optimizer = info.optim_cls(
            [
                {"params": [weight], **optim_input.kwargs},
                {"params": [bias], **{**optim_input.kwargs, "weight_decay": 0.0}},
            ]
        )
        initial = linear_loss(weight, bias, inputs).item()
        for _ in range(20):
            optimizer.zero_grad()
            loss = linear_loss(weight, bias, inputs)
            loss.backward()
            optimizer.step()
        if optim_input.kwargs.get("maximize", False):
            assert loss.item() > initial
        else:
            assert loss.item() < initial


@INFOS
def test_param_groups_lr(info, check):
    for optim_input in all_inputs(DEVICE, torch.float32, info, skip=("differentiable",)):
        if optim_input.kwargs.get("lr", 0) == 0:
            optim_input.kwargs["lr"] = 1e-3
        weight, bias = Parameter(torch.randn(10, 5)), Parameter(torch.randn(10))
        irrelevant = Parameter(torch.randn(2))
        irrelevant_before = irrelevant.clone()
        inputs = torch.randn(5)
        optimizer = info.optim_cls(
            [{"params": [weight, bias], **optim_input.kwargs}, {"params": [irrelevant]}],
            lr=1e-28,
        )
        initial = linear_loss(weight, bias, inputs).item()
        for _ in range(20):
            optimizer.zero_grad()
            loss = linear_loss(weight, bias, inputs)
            loss.backward()
            irrelevant.grad = torch.rand_like(irrelevant)
            optimizer.step()
        if optim_input.kwargs.get("maximize", False):
            assert loss.item() > initial
        else:
            assert loss.item() < initial
        check.assertEqual(irrelevant, irrelevant_before)


@INFOS
def test_step_is_noop_when_params_have_no_grad(info, check):
    params = [torch.randn(2, 3, requires_grad=False) for _ in range(2)]
    before = [p.detach().clone() for p in params]
    for optim_input in all_inputs(DEVICE, torch.float32, info):
        info.optim_cls(params, **optim_input.kwargs).step(lambda: torch.tensor([1.0]))
    check.assertEqual(params, before)


@INFOS
def test_step_is_noop_for_zero_grads(info, check):
    param = torch.randn(5, 1, requires_grad=True)
    before = param.detach().clone()
    for optim_input in all_inputs(DEVICE, torch.float32, info):
        kwargs = optim_input.kwargs
        if kwargs.get("weight_decay", 0) != 0:
            continue  # decays without a gradient
        kwargs["lr"] = torch.tensor(1e-5) if isinstance(kwargs.get("lr"), torch.Tensor) else 1e-5
        params = [param.clone()] if kwargs.get("differentiable", False) else [param]
        optimizer = info.optim_cls(params, **kwargs)
        params[0].grad = torch.zeros_like(params[0])
        optimizer.step(lambda: torch.tensor([1.0]))
        check.assertEqual(before, params[0])


@INFOS
def test_non_empty_state(info):
    model = torch.nn.Linear(5, 5)
    for optim_input in info.optim_inputs_func(device=DEVICE):
        optimizer = info.optim_cls(model.parameters(), **optim_input.kwargs)
        optimizer.zero_grad()
        model(torch.rand(2, 5)).sum().backward()
        optimizer.step()
        assert all(len(state) > 0 for state in optimizer.state.values())


# -- complex parameters ---------------------------------------------------------------------------


@INFOS
def test_complex(info, check):
    for optim_input in all_inputs(DEVICE, torch.complex64, info, skip=("differentiable", "fused")):
        complex_params = [
            torch.randn(10, 5, dtype=torch.complex64, requires_grad=True),
            torch.randn(10, dtype=torch.complex64, requires_grad=True),
            torch.randn(10, 5, requires_grad=True),  # real, mixed with the complex ones
        ]
        real_params = [
            (torch.view_as_real(p) if p.is_complex() else p).detach().clone().requires_grad_()
            for p in complex_params
        ]
        complex_optimizer = info.optim_cls(complex_params, **optim_input.kwargs)
        real_optimizer = info.optim_cls(real_params, **optim_input.kwargs)
        real_steps, complex_steps = [], []
        for _ in range(3):
            grads = [torch.randn_like(p) for p in real_params]
            for p, grad in zip(real_params, grads):
                p.grad = grad
                real_steps.append(p.detach().clone())
            for p, grad in zip(complex_params, grads):
                p.grad = torch.view_as_complex(grad) if p.is_complex() else grad
                complex_steps.append(
                    torch.view_as_real_copy(p.detach()) if p.is_complex() else p.detach().clone()
                )
            real_optimizer.step()
            complex_optimizer.step()
        as_real = [torch.view_as_real(p) if p.is_complex() else p for p in complex_params]
        check.assertEqual(real_params, as_real)
        check.assertEqual(complex_steps, real_steps)


@INFOS
def test_complex_2d(info, check):
    for optim_input in all_inputs(DEVICE, torch.complex64, info, skip=("differentiable", "fused")):
        a1 = torch.randn(2, dtype=torch.complex64, requires_grad=True)
        a1_real = a1.real.detach().clone().requires_grad_()
        a1_imag = a1.imag.detach().clone().requires_grad_()
        optim1 = info.optim_cls([a1], **optim_input.kwargs)
        optim2 = info.optim_cls([a1_real, a1_imag], **optim_input.kwargs)
        trackers = {name: TensorTracker() for name in ("real", "imag", "greal", "gimag", "loss")}
        for _ in range(3):
            optim1.zero_grad()
            loss = rosenbrock(a1).abs()
            loss.backward()
            trackers["real"].add(a1.real)
            trackers["imag"].add(a1.imag)
            trackers["greal"].add(a1.grad.real)
            trackers["gimag"].add(a1.grad.imag)
            trackers["loss"].add(loss)

            optim2.zero_grad()
            trackers["real"].pop_check_set(a1_real, check)
            trackers["imag"].pop_check_set(a1_imag, check)
            loss2 = rosenbrock(torch.complex(a1_real, a1_imag)).abs()
            trackers["loss"].pop_check_set(loss2, check)
            loss2.backward()
            trackers["greal"].pop_check_set(a1_real.grad, check)
            trackers["gimag"].pop_check_set(a1_imag.grad, check)

            optim1.step()
            optim2.step()
            check.assertEqual(a1.real, a1_real)
            check.assertEqual(a1.imag, a1_imag)
        assert all(tracker.all_popped() for tracker in trackers.values())


# -- the foreach and fused implementations match the for-loop -------------------------------------


def compare_between(check, inputs, models, optimizers, assert_eq_kwargs):
    tracker = TensorTracker(assert_eq_kwargs)
    for i in range(7):
        states, updated = [], []
        for model, optimizer in zip(models, optimizers):
            optimizer.zero_grad()
            if i == 3:
                model[2].requires_grad_(False)  # a frozen layer for two steps
            if i == 5:
                model[2].requires_grad_(True)
            if i != 2:  # a step on no gradient
                model(inputs).sum().backward()
            optimizer.step()
            states.append(optimizer.state)
            updated.append(model.parameters())
        for first, second in zip(*updated):
            tracker.add(first)
            tracker.pop_check_set(second, check)
            for key in states[0][first]:
                tracker.add(states[0][first][key])
                tracker.pop_check_set(states[1][second][key], check)
    assert tracker.all_popped()


def derived_optimizers(check, info, dtype, flag, assert_eq_kwargs=None):
    for optim_input in info.optim_inputs_func(device=DEVICE, dtype=dtype):
        models, optimizers = [], []
        kwargs = deepcopy(optim_input.kwargs)
        if kwargs.get("capturable", False):
            continue  # not on the CPU
        for value in (False, True):
            kwargs[flag] = value
            torch.manual_seed(1)
            model = torch.nn.Sequential(
                torch.nn.Linear(2, 3), torch.nn.Sigmoid(), torch.nn.Linear(3, 1), torch.nn.Sigmoid()
            ).to(dtype)
            empty = torch.empty((), dtype=dtype, requires_grad=True)  # a zero-size last param
            empty.grad = torch.rand_like(empty)
            optimizers.append(info.optim_cls([*model.parameters(), empty], **kwargs))
            models.append(model)
        inputs = torch.tensor([0.1, 0.2, 0.3, 0.4, 0.5, 0.6], dtype=dtype).reshape(3, 2)
        compare_between(check, inputs, models, optimizers, assert_eq_kwargs or {})


@INFOS
def test_foreach_matches_forloop(info, check):
    derived_optimizers(check, info, torch.float64, "foreach")


@INFOS
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
def test_fused_matches_forloop(info, dtype, check):
    assert DEVICE in info.supports_fused_on
    if dtype in REDUCED_PRECISION:
        check.precision = check.rel_tol = REDUCED_PRECISION[dtype]
    derived_optimizers(check, info, dtype, "fused")


@INFOS
def test_fused_error_on_params_on_meta(info):
    with torch.device("meta"):
        model = torch.nn.Sequential(
            torch.nn.Linear(2, 3), torch.nn.Sigmoid(), torch.nn.Linear(3, 1), torch.nn.Sigmoid()
        )
    optimizer = info.optim_cls(model.parameters(), fused=True)
    with torch.device("meta"):
        for p in model.parameters():
            p.grad = torch.rand_like(p)
    with pytest.raises(RuntimeError, match="`fused=True` requires all the params to be floating"):
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    model.to_empty(device=DEVICE)
    for p in model.parameters():
        p.grad = torch.rand_like(p)
    optimizer.step()


@INFOS
def test_fused_does_not_step_if_foundinf(info, check):
    for optim_input in info.optim_inputs_func(device=DEVICE):
        for no_grad_scale in (False, True):
            params = [torch.ones(1) for _ in range(5)]
            before = [p.detach().clone() for p in params]
            for p in params:
                p.grad = torch.ones_like(p)
            optimizer = info.optim_cls(params, fused=True, **optim_input.kwargs)
            optimizer.grad_scale = None if no_grad_scale else torch.ones(1)
            optimizer.found_inf = torch.ones(())
            optimizer.step()
            for p in params:
                if "step" in optimizer.state[p]:
                    check.assertEqual(torch.zeros(()), optimizer.state[p]["step"])
            check.assertEqual(params, before)


# -- state dicts ----------------------------------------------------------------------------------


def named(params, is_named):
    return [(f"name{i}", p) for i, p in enumerate(params)] if is_named else params


def without_param_names(state_dict):
    state_dict = deepcopy(state_dict)
    for group in state_dict["param_groups"]:
        group.pop("param_names", None)
    return state_dict


@INFOS
@pytest.mark.parametrize("is_named0", [True, False])
@pytest.mark.parametrize("is_named1", [True, False])
def test_state_dict_deterministic(info, is_named0, is_named1, check):
    weight, bias = Parameter(torch.randn(2, 3)), Parameter(torch.randn(2))
    inputs = torch.randn(3, requires_grad=True)

    def forward_backward(optimizer, w, b):
        optimizer.zero_grad()
        loss = linear_loss(w, b, inputs)
        loss.backward()
        return loss

    for optim_input in all_inputs(DEVICE, torch.float32, info, skip=("differentiable",)):
        optimizer = info.optim_cls(named([weight, bias], is_named0), **optim_input.kwargs)
        for _ in range(10):
            forward_backward(optimizer, weight, bias)
            optimizer.step()
        with torch.no_grad():
            weight_c, bias_c = Parameter(weight.clone()), Parameter(bias.clone())
        optimizer_c = info.optim_cls(named([weight_c, bias_c], is_named1), **optim_input.kwargs)
        optimizer_c.load_state_dict(deepcopy(optimizer.state_dict()))
        for _ in range(10):
            forward_backward(optimizer, weight, bias)
            forward_backward(optimizer_c, weight_c, bias_c)
            optimizer.step()
            optimizer_c.step()
            check.assertEqual(weight, weight_c)
            check.assertEqual(bias, bias_c)
        check.assertEqual(
            without_param_names(optimizer.state_dict()),
            without_param_names(optimizer_c.state_dict()),
        )
        optimizer_c.param_groups.extend(optimizer_c.param_groups)  # a repeated group
        check.assertEqual(
            without_param_names(optimizer.state_dict())["param_groups"][-1],
            without_param_names(optimizer_c.state_dict())["param_groups"][-1],
        )


def conv_model():
    torch.manual_seed(1)
    return torch.nn.Sequential(torch.nn.Conv2d(4, 2, 1, stride=2), torch.nn.BatchNorm2d(2))


def conv_step(optimizer, model, inputs):
    optimizer.zero_grad()
    model(inputs).sum().backward()
    optimizer.step()


@INFOS
def test_can_load_older_state_dict(info):
    for optim_input in all_inputs(DEVICE, torch.float32, info, skip=("differentiable",)):
        model, inputs = conv_model(), torch.rand(1, 4, 16, 16)
        optimizer = info.optim_cls(model.parameters(), **optim_input.kwargs)
        for _ in range(3):
            conv_step(optimizer, model, inputs)
        old = deepcopy(optimizer.state_dict())
        for group in old["param_groups"]:
            for flag in info.not_og_supported_flags:
                group.pop(flag, None)
        optimizer.load_state_dict(old)
        conv_step(optimizer, model, inputs)


@INFOS
@pytest.mark.parametrize("is_named0", [True, False])
@pytest.mark.parametrize("is_named1", [True, False])
def test_can_load_from_to_named_state_dict(info, is_named0, is_named1, check):
    for optim_input in all_inputs(DEVICE, torch.float32, info, skip=("differentiable",)):
        model, inputs = conv_model(), torch.rand(1, 4, 16, 16)
        params = model.named_parameters() if is_named0 else model.parameters()
        optimizer = info.optim_cls(params, **optim_input.kwargs)
        for _ in range(3):
            conv_step(optimizer, model, inputs)
        state_dict = deepcopy(optimizer.state_dict())
        params = model.named_parameters() if is_named1 else model.parameters()
        optimizer2 = info.optim_cls(params, **optim_input.kwargs)
        optimizer2.load_state_dict(state_dict)
        conv_step(optimizer2, model, inputs)
        if is_named0 or is_named1:
            check.assertEqual(
                optimizer2.state_dict()["param_groups"][0]["param_names"],
                ["0.weight", "0.bias", "1.weight", "1.bias"],
            )


@INFOS
@pytest.mark.parametrize("is_named", [True, False])
def test_save_load_equality_with_weights_only(info, is_named, check):
    weight, bias = Parameter(torch.randn(2, 3)), Parameter(torch.randn(2))
    inputs = torch.randn(3, requires_grad=True)
    for optim_input in all_inputs(DEVICE, torch.float32, info, skip=("differentiable",)):
        optimizer = info.optim_cls(named([weight, bias], is_named), **optim_input.kwargs)

        closure = linear_closure(optimizer, weight, bias, inputs)
        for _ in range(3):
            optimizer.step(closure)
        state_dict = optimizer.state_dict()
        buffer = io.BytesIO()
        torch.save(state_dict, buffer)
        for weights_only in (False, True):
            buffer.seek(0)
            check.assertEqual(torch.load(buffer, weights_only=weights_only), state_dict)


@INFOS
def test_load_nontensor_step(info):
    params = [Parameter(torch.randn(2, 3)) for _ in range(2)]
    for p in params:
        p.grad = torch.rand_like(p)
    for optim_input in all_inputs(DEVICE, torch.float32, info, skip=("differentiable",)):
        optimizer = info.optim_cls(params, **optim_input.kwargs)
        for _ in range(3):
            optimizer.step()
        state_dict = deepcopy(optimizer.state_dict())
        for state in state_dict["state"].values():
            if torch.is_tensor(state.get("step")):
                state["step"] = state["step"].item()
        optimizer.load_state_dict(state_dict)
        optimizer.step()


@INFOS
def test_deepcopy_copies_all_public_attrs(info):
    params = [Parameter(torch.randn(2, 3)) for _ in range(2)]
    for p in params:
        p.grad = torch.rand_like(p)

    def public(obj):
        return {key for key in obj.__dict__ if not key.startswith("_")}

    for optim_input in all_inputs(DEVICE, torch.float32, info, skip=("differentiable",)):
        optimizer = info.optim_cls(params, **optim_input.kwargs)
        for _ in range(3):
            optimizer.step()
        assert public(optimizer) == public(deepcopy(optimizer))


# -- hooks ----------------------------------------------------------------------------------------


def state_dict_pre_hook(optimizer):
    optimizer.state["test"] = 1


def state_dict_post_hook(optimizer, state_dict):
    state_dict["ran_state_dict_pre_hook"] = "test" in state_dict["state"]
    state_dict["state"].pop("test", None)
    return state_dict


def load_state_dict_pre_hook1(optimizer, state_dict):
    state_dict["param_groups"][0]["lr"] = 0.002


def load_state_dict_pre_hook2(optimizer, state_dict):
    replaced = deepcopy(state_dict)  # a hook that hands back another state dict
    replaced["param_groups"][0]["lr"] = 0.003
    return replaced


def load_state_dict_post_hook(optimizer):
    optimizer.state["ran_load_state_dict_pre_hook2"] = optimizer.param_groups[0]["lr"] == 0.003
    optimizer.state["ran_load_state_dict_post_hook"] = True


def each_optimizer(info):
    for optim_input in all_inputs(DEVICE, torch.float32, info):
        yield info.optim_cls([torch.rand(2, 3, requires_grad=True)], **optim_input.kwargs)


@INFOS
def test_state_dict_hooks(info):
    for optimizer in each_optimizer(info):
        optimizer.register_state_dict_pre_hook(state_dict_pre_hook)
        assert optimizer.state_dict()["state"]["test"] == 1
    for optimizer in each_optimizer(info):
        optimizer.register_state_dict_post_hook(state_dict_post_hook)
        assert not optimizer.state_dict()["ran_state_dict_pre_hook"]
    for optimizer in each_optimizer(info):
        optimizer.register_state_dict_pre_hook(state_dict_pre_hook)
        optimizer.register_state_dict_post_hook(state_dict_post_hook)
        state_dict = optimizer.state_dict()
        assert "test" not in state_dict["state"] and state_dict["ran_state_dict_pre_hook"]


@INFOS
def test_load_state_dict_hooks(info):
    for optimizer in each_optimizer(info):
        state_dict = optimizer.state_dict()
        optimizer.register_load_state_dict_pre_hook(load_state_dict_pre_hook1)
        optimizer.load_state_dict(state_dict)
        assert optimizer.param_groups[0]["lr"] == 0.002
        optimizer.register_load_state_dict_pre_hook(load_state_dict_pre_hook2, prepend=True)
        optimizer.load_state_dict(state_dict)
        assert optimizer.param_groups[0]["lr"] == 0.002  # the prepended hook ran first
    for optimizer in each_optimizer(info):
        optimizer.register_load_state_dict_post_hook(load_state_dict_post_hook)
        optimizer.load_state_dict(optimizer.state_dict())
        assert not optimizer.state["ran_load_state_dict_pre_hook2"]
        assert optimizer.state["ran_load_state_dict_post_hook"]
    for optimizer in each_optimizer(info):
        optimizer.register_load_state_dict_pre_hook(load_state_dict_pre_hook2)
        optimizer.register_load_state_dict_post_hook(load_state_dict_post_hook)
        optimizer.load_state_dict(optimizer.state_dict())
        assert optimizer.state["ran_load_state_dict_pre_hook2"]
        assert optimizer.state["ran_load_state_dict_post_hook"]


@INFOS
@pytest.mark.parametrize("kind", ["pre", "post"])
def test_step_hook(info, kind):
    calls = []
    params = [torch.tensor([1.0, 1.0])]
    for optim_input in all_inputs(DEVICE, torch.float32, info):
        optimizer = info.optim_cls(params, **optim_input.kwargs)
        calls.clear()
        register = getattr(optimizer, f"register_step_{kind}_hook")
        handle = register(lambda opt, args, kwargs: calls.append(opt))
        optimizer.step()
        optimizer.step()
        handle.remove()
        optimizer.step()
        assert calls == [optimizer, optimizer]


@INFOS
def test_step_all_hooks(info):
    data = []
    params = [torch.tensor([1.0, 1.0])]
    for optim_input in all_inputs(DEVICE, torch.float32, info):
        optimizer = info.optim_cls(params, **optim_input.kwargs)
        sgd = SGD(params)
        data.clear()
        handles = [
            register_optimizer_step_pre_hook(lambda *_: data.append(0)),
            register_optimizer_step_post_hook(lambda *_: data.append(5)),
        ]
        for opt in (optimizer, sgd):
            handles.append(opt.register_step_pre_hook(lambda *_: data.append(1)))
            handles.append(opt.register_step_post_hook(lambda *_: data.append(2)))
        optimizer.step()
        assert data == [0, 1, 2, 5]
        sgd.step()
        optimizer.step()
        assert data == [0, 1, 2, 5] * 3
        for handle in handles:
            handle.remove()
        optimizer.step()
        sgd.step()
        assert data == [0, 1, 2, 5] * 3


def test_importing_torchs_test_utilities_left_torch_backends_flags_settable():
    assert not torch.backends.flags_frozen()


def test_the_balanced_info_is_adamws_with_the_class_swapped():
    assert BALANCED.name == "MultiObjectiveOptimizer"
    for key, value in vars(ADAMW).items():
        if key != "optim_cls":
            assert getattr(BALANCED, key) == value, key
