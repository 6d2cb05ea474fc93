"""MultiObjectiveOptimizer: the math against float64 references, and torch.optim conformance."""

import copy
import itertools

import pytest
import torch
from helpers import TeacherStudentProblem, assert_unchanged, snapshot

from gradbalance import MultiObjectiveOptimizer
from gradbalance.weighting import min_norm_weights

MODES = ["exact", "amortized", "affine"]


def flat_log_loss_gradients(losses, params, min_losses):
    """g_i = ∇ log(L_i − m_i), flattened, by separate float64 autograd calls (the reference)."""
    rows = []
    for loss, bound in zip(losses, min_losses):
        grads = torch.autograd.grad(
            torch.log(loss - bound), params, retain_graph=True, materialize_grads=True
        )
        rows.append(torch.cat([g.reshape(-1) for g in grads]))
    return torch.stack(rows)


def flat_grad(model):
    return torch.cat([p.grad.reshape(-1) for p in model.parameters()])


@pytest.mark.parametrize("vectorize", [True, False])
@pytest.mark.parametrize("normalize", [False, True])
def test_exact_mode_writes_the_min_norm_direction_of_the_log_loss_gradients(vectorize, normalize):
    problem = TeacherStudentProblem(dtype=torch.float64)
    params = list(problem.model.parameters())
    min_losses = [0.0, -0.5]
    opt = MultiObjectiveOptimizer(
        params, mode="exact", min_losses=min_losses, normalize=normalize, vectorize=vectorize
    )
    losses = problem.losses()
    jacobian = flat_log_loss_gradients(losses, params, min_losses)
    g11, g22, g12 = (
        jacobian[0] @ jacobian[0],
        jacobian[1] @ jacobian[1],
        jacobian[0] @ jacobian[1],
    )
    first = ((g22 - g12) / (g11 + g22 - 2 * g12)).clamp(0, 1)
    weights = torch.stack([first, 1 - first])
    direction = weights @ jacobian
    if normalize:
        shifted = torch.stack(losses).detach() - torch.tensor(min_losses, dtype=torch.float64)
        direction = direction / (weights / shifted).sum()
    opt.backward(losses)
    torch.testing.assert_close(opt.weights, weights.detach())
    torch.testing.assert_close(flat_grad(problem.model), direction, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(opt.stats["gram"], jacobian @ jacobian.T, rtol=1e-9, atol=1e-12)
    assert opt.stats["conflict"].item() == pytest.approx(g12.item())
    assert opt.stats["dominance"].item() == pytest.approx((g11 / g22).sqrt().item())


def test_exact_mode_with_three_losses_satisfies_kkt_on_the_reference_gram():
    problem = TeacherStudentProblem(dtype=torch.float64)
    params = list(problem.model.parameters())
    opt = MultiObjectiveOptimizer(params, mode="exact")
    mse, ce = problem.losses()
    losses = [mse, ce, problem.model[2].weight.square().sum()]
    jacobian = flat_log_loss_gradients(losses, params, [0, 0, 0])
    opt.backward(losses)
    gram = jacobian @ jacobian.T
    torch.testing.assert_close(opt.weights, min_norm_weights(gram))
    product, objective = gram @ opt.weights, opt.weights @ gram @ opt.weights
    assert torch.all(product >= objective * (1 - 1e-8))
    torch.testing.assert_close(flat_grad(problem.model), opt.weights @ jacobian)


def test_amortized_mode_backward_is_the_famo_weighted_sum():
    problem = TeacherStudentProblem(dtype=torch.float64)
    params = list(problem.model.parameters())
    opt = MultiObjectiveOptimizer(params, mode="amortized")
    losses = problem.losses()
    shifted = torch.stack(losses).detach() + 1e-8
    coefficients = (0.5 / shifted) / (0.5 / shifted).sum()
    expected = torch.autograd.grad(
        sum(c * loss for c, loss in zip(coefficients, losses)), params, retain_graph=True
    )
    opt.backward(losses)
    torch.testing.assert_close(
        flat_grad(problem.model), torch.cat([g.reshape(-1) for g in expected])
    )
    assert set(opt.stats) == {"weights"}


def test_amortized_mode_computes_statistics_only_when_asked():
    problem = TeacherStudentProblem(dtype=torch.float64)
    opt = MultiObjectiveOptimizer(problem.model.parameters(), mode="amortized", stats_every=2)
    seen = []
    for _ in range(4):
        opt.zero_grad()
        opt.backward(problem.losses())
        opt.step()
        seen.append("conflict" in opt.stats)
    assert seen == [True, False, True, False]


# The amortized-mode test vector of docs/method.md: two tasks, w = 0, losses before → after.
SPEC_LOSSES = [[1.0, 2.0], [0.9, 1.9], [0.85, 1.7], [0.8, 1.65]]


def famo_state(opt):
    """The logits, their last gradient and moments, as the state dict holds them."""
    return opt.balancer.state_dict()["famo"]


def constant_losses(values, anchor):
    """Scalar losses with exactly these values and a (unit-scale) graph to ``anchor``."""
    return [value * torch.exp(anchor.sum() - anchor.sum().detach()) for value in values]


@pytest.mark.parametrize(
    ("pi_optimizer", "w0_after"),
    [
        ("adamw", [-0.025, -0.023686, -0.028707]),
        ("adam", [-0.025, -0.023463, -0.028116]),
    ],
)
@pytest.mark.parametrize("scheme", ["next-batch", "re-forward"])
def test_amortized_logits_follow_the_spec_test_vector(pi_optimizer, w0_after, scheme):
    anchor = torch.zeros(1, requires_grad=True)
    opt = MultiObjectiveOptimizer([anchor], mode="amortized", pi_optimizer=pi_optimizer)
    logits = []
    if scheme == "next-batch":
        for values in SPEC_LOSSES:
            opt.backward(constant_losses(values, anchor))
            logits.append(famo_state(opt)["logits"])
        logits = logits[1:]
    else:
        for before, after in itertools.pairwise(SPEC_LOSSES):
            opt.backward(constant_losses(before, anchor))
            opt.update_weights(torch.tensor(after))
            logits.append(famo_state(opt)["logits"])
    assert [w[0] for w in logits] == pytest.approx(w0_after, abs=2e-6)
    assert [w[1] for w in logits] == pytest.approx([-v for v in w0_after], abs=2e-6)


def test_amortized_first_logit_gradient_matches_the_spec():
    anchor = torch.zeros(1, requires_grad=True)
    opt = MultiObjectiveOptimizer([anchor], mode="amortized")
    opt.backward(constant_losses([1.0, 2.0], anchor))
    opt.update_weights([torch.tensor(0.9), torch.tensor(1.9)])
    assert famo_state(opt)["grad"] == pytest.approx([0.013517, -0.013517], abs=1e-6)


@pytest.mark.parametrize("mode", ["exact", "amortized"])
def test_short_training_reduces_both_losses(mode):
    problem = TeacherStudentProblem()
    opt = MultiObjectiveOptimizer(problem.model.parameters(), mode=mode, lr=3e-3)
    start = [loss.item() for loss in problem.losses()]
    for _ in range(300):
        opt.zero_grad()
        opt.backward(problem.losses())
        opt.step()
    end = [loss.item() for loss in problem.losses()]
    assert end[0] < 0.5 * start[0]
    assert end[1] < 0.5 * start[1]
    assert torch.isfinite(opt.weights).all()


def test_affine_mode_stops_training_on_the_spec_counterexample_and_exact_does_not():
    # g_1 ∥ g_2: L_1 = x, L_2 = x², at x = 1: ∇log L_1 = 1, ∇log L_2 = 2.
    directions = {}
    for mode in ("affine", "exact"):
        x = torch.ones(1, requires_grad=True)
        opt = MultiObjectiveOptimizer([x], base=torch.optim.SGD, mode=mode, lr=0.1)
        opt.backward([x.sum(), x.square().sum()])
        directions[mode] = x.grad.item()
    assert directions["affine"] == pytest.approx(0.0, abs=1e-9)
    assert directions["exact"] == pytest.approx(1.0)


# -- torch.optim conformance --------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
def test_is_a_torch_optimizer_sharing_the_base_param_groups(mode):
    problem = TeacherStudentProblem()
    opt = MultiObjectiveOptimizer(problem.model.parameters(), mode=mode, lr=0.01, weight_decay=0.1)
    assert isinstance(opt, torch.optim.Optimizer)
    assert isinstance(opt.base, torch.optim.AdamW)
    assert opt.param_groups is opt.base.param_groups
    assert opt.param_groups[0]["lr"] == 0.01 and opt.param_groups[0]["weight_decay"] == 0.1
    assert "AdamW" in repr(opt)


def test_matches_the_base_optimizer_when_the_losses_agree():
    # With identical losses π = (½, ½) and d = ∇L / L; normalize=True turns it into ∇L exactly.
    reference = TeacherStudentProblem()
    balanced = TeacherStudentProblem()
    adamw = torch.optim.AdamW(reference.model.parameters(), lr=1e-2)
    opt = MultiObjectiveOptimizer(balanced.model.parameters(), lr=1e-2, normalize=True)
    for _ in range(5):
        adamw.zero_grad()
        reference.losses()[1].backward()
        adamw.step()
        opt.zero_grad()
        task = balanced.losses()[1]
        opt.backward([task, task])
        opt.step()
    for a, b in zip(reference.model.parameters(), balanced.model.parameters()):
        torch.testing.assert_close(a, b)


def test_param_groups_and_lr_scheduler_drive_the_base():
    problem = TeacherStudentProblem()
    first, second = problem.model[0], problem.model[2]
    opt = MultiObjectiveOptimizer(
        [{"params": first.parameters()}, {"params": second.parameters(), "lr": 0.5}], lr=0.1
    )
    scheduler = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    for _ in range(2):
        opt.zero_grad()
        opt.backward(problem.losses())
        opt.step()
        scheduler.step()
    assert [g["lr"] for g in opt.base.param_groups] == pytest.approx([0.025, 0.125])


def test_add_param_group_reaches_the_base():
    problem = TeacherStudentProblem()
    extra = torch.zeros(3, requires_grad=True)
    opt = MultiObjectiveOptimizer(problem.model.parameters(), lr=0.1)
    opt.add_param_group({"params": [extra], "lr": 0.2})
    assert len(opt.base.param_groups) == 2 and opt.base.param_groups[1]["params"][0] is extra


def test_wraps_an_existing_optimizer_instance():
    problem = TeacherStudentProblem()
    sgd = torch.optim.SGD(problem.model.parameters(), lr=0.1, momentum=0.9)
    opt = MultiObjectiveOptimizer(sgd, mode="amortized")
    assert opt.base is sgd and opt.param_groups is sgd.param_groups
    opt.backward(problem.losses())
    opt.step()
    assert sgd.state  # momentum buffers were created by the wrapped instance


def test_wrapping_refuses_ambiguous_arguments():
    problem = TeacherStudentProblem()
    sgd = torch.optim.SGD(problem.model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="instance"):
        MultiObjectiveOptimizer(sgd, lr=0.2)
    with pytest.raises(TypeError, match="optimizer class"):
        MultiObjectiveOptimizer(problem.model.parameters(), base=sgd)


@pytest.mark.parametrize("set_to_none", [True, False])
def test_zero_grad(set_to_none):
    problem = TeacherStudentProblem()
    opt = MultiObjectiveOptimizer(problem.model.parameters())
    opt.backward(problem.losses())
    opt.zero_grad(set_to_none=set_to_none)
    for p in problem.model.parameters():
        assert p.grad is None if set_to_none else torch.count_nonzero(p.grad) == 0


def test_backward_accumulates_like_tensor_backward():
    problem = TeacherStudentProblem(dtype=torch.float64)
    opt = MultiObjectiveOptimizer(problem.model.parameters())
    opt.backward(problem.losses())
    once = flat_grad(problem.model).clone()
    opt.backward(problem.losses())
    torch.testing.assert_close(flat_grad(problem.model), 2 * once)


def test_unreached_parameters_keep_no_grad():
    problem = TeacherStudentProblem()
    unused = torch.nn.Parameter(torch.zeros(2))
    frozen = torch.nn.Parameter(torch.zeros(2), requires_grad=False)
    opt = MultiObjectiveOptimizer([*problem.model.parameters(), unused, frozen])
    opt.backward(problem.losses())
    opt.step()
    assert unused.grad is None and frozen.grad is None


@pytest.mark.parametrize("mode", MODES)
def test_step_with_closure(mode):
    problem = TeacherStudentProblem()
    opt = MultiObjectiveOptimizer(problem.model.parameters(), mode=mode, lr=1e-2)

    def closure():
        opt.zero_grad()
        losses = problem.losses()
        opt.backward(losses)
        return sum(losses)

    before = [p.detach().clone() for p in problem.model.parameters()]
    returned = opt.step(closure)
    assert torch.is_tensor(returned) and returned.ndim == 0
    assert any(not torch.equal(a, b) for a, b in zip(before, problem.model.parameters()))


def train(problem, opt, steps):
    for _ in range(steps):
        opt.zero_grad()
        opt.backward(problem.losses())
        opt.step()


@pytest.mark.parametrize("mode", MODES)
def test_state_dict_resume_continues_the_identical_trajectory(mode):
    problem = TeacherStudentProblem()
    opt = MultiObjectiveOptimizer(problem.model.parameters(), mode=mode, vectorize=True, lr=1e-2)
    train(problem, opt, 5)
    saved_model = {k: v.clone() for k, v in problem.model.state_dict().items()}
    saved_opt = copy.deepcopy(opt.state_dict())  # as torch.save would freeze it
    assert saved_opt["param_groups"][0]["gradbalance"]["mode"] == mode
    train(problem, opt, 5)

    resumed = TeacherStudentProblem(seed=1)  # other initial weights, same data after loading
    resumed.inputs, resumed.teacher_outputs, resumed.labels = (
        problem.inputs,
        problem.teacher_outputs,
        problem.labels,
    )
    resumed.model.load_state_dict(saved_model)
    fresh = MultiObjectiveOptimizer(resumed.model.parameters(), mode=mode, vectorize=True, lr=1e-2)
    fresh.load_state_dict(saved_opt)
    train(resumed, fresh, 5)
    for a, b in zip(problem.model.parameters(), resumed.model.parameters()):
        assert torch.equal(a, b)
    assert torch.equal(opt.weights, fresh.weights)


def test_state_dict_refuses_a_different_mode_and_changes_nothing():
    problem = TeacherStudentProblem()
    exact = MultiObjectiveOptimizer(problem.model.parameters(), mode="exact")
    train(problem, exact, 1)
    amortized = MultiObjectiveOptimizer(problem.model.parameters(), mode="amortized")
    before = snapshot(amortized, problem.model)
    with pytest.raises(ValueError, match="mode"):
        amortized.load_state_dict(exact.state_dict())
    assert_unchanged(before, snapshot(amortized, problem.model))


def test_plain_base_state_dict_loads():
    problem = TeacherStudentProblem()
    adamw = torch.optim.AdamW(problem.model.parameters())
    problem.losses()[1].backward()
    adamw.step()
    opt = MultiObjectiveOptimizer(problem.model.parameters())
    opt.load_state_dict(adamw.state_dict())
    assert opt.state_dict()["state"][0]["step"] == 1


# -- bad input: a clear ValueError and nothing changes -------------------------------------------


def nan_gradient_loss(model):
    """A loss with a finite value (1.0) and a NaN gradient: d sqrt(u)/du at u = 0 times 0."""
    return 1.0 + torch.sqrt(sum(p.sum() for p in model.parameters()) * 0.0)


BAD_INPUTS = {
    "negative loss": (lambda losses, model: [losses[0], -losses[1]], "loss 1 .* not above"),
    "zero loss": (lambda losses, model: [losses[0] * 0, losses[1]], "loss 0 .* not above"),
    "nan loss": (lambda losses, model: [losses[0], losses[1] * float("nan")], "loss 1 is nan"),
    "inf loss": (lambda losses, model: [losses[0] * float("inf"), losses[1]], "loss 0 is inf"),
    "non-scalar loss": (
        lambda losses, model: [losses[0].expand(3), losses[1]],
        "loss 0 is not a scalar",
    ),
    "one loss": (lambda losses, model: [losses[0]], "at least 2"),
    "no loss": (lambda losses, model: [], "at least 2"),
    "not a tensor": (lambda losses, model: [losses[0], 1.0], "loss 1 is a float"),
    "three losses after two": (lambda losses, model: [*losses, losses[0]], "expected 2 losses"),
    "matrix of losses": (lambda losses, model: torch.stack(losses)[None], "1-D tensor"),
    "nan gradient": (lambda losses, model: [losses[0], nan_gradient_loss(model)], "non-finite"),
    "no graph": (lambda losses, model: [loss.detach() for loss in losses], "requires grad"),
}


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_raises_and_changes_nothing(mode, case):
    make_bad, message = BAD_INPUTS[case]
    problem = TeacherStudentProblem()
    opt = MultiObjectiveOptimizer(problem.model.parameters(), mode=mode, lr=1e-2)
    train(problem, opt, 2)  # some moments, logits and a previous loss to protect
    opt.backward(problem.losses())  # and some .grad
    before = snapshot(opt, problem.model)
    weights = opt.weights.clone()
    with pytest.raises(ValueError, match=message):
        opt.backward(make_bad(problem.losses(), problem.model))
    assert_unchanged(before, snapshot(opt, problem.model))
    assert torch.equal(opt.weights, weights)


def test_bad_losses_in_update_weights_change_nothing():
    problem = TeacherStudentProblem()
    opt = MultiObjectiveOptimizer(problem.model.parameters(), mode="amortized")
    opt.backward(problem.losses())
    before = snapshot(opt, problem.model)
    with pytest.raises(ValueError, match="loss 0 is nan"):
        opt.update_weights([torch.tensor(float("nan")), torch.tensor(1.0)])
    with pytest.raises(ValueError, match="expected 2 losses"):
        opt.update_weights([torch.tensor(1.0)] * 3)
    assert_unchanged(before, snapshot(opt, problem.model))


def test_update_weights_is_for_amortized_mode_after_a_backward():
    problem = TeacherStudentProblem()
    with pytest.raises(ValueError, match="amortized"):
        MultiObjectiveOptimizer(problem.model.parameters()).update_weights(problem.losses())
    opt = MultiObjectiveOptimizer(problem.model.parameters(), mode="amortized")
    with pytest.raises(ValueError, match="backward"):
        opt.update_weights(problem.losses())


def test_min_losses_allow_negative_losses_and_must_match_k():
    problem = TeacherStudentProblem()
    opt = MultiObjectiveOptimizer(problem.model.parameters(), min_losses=[-10.0, 0.0])
    mse, ce = problem.losses()
    opt.backward([mse - 5.0, ce])
    assert torch.isfinite(opt.weights).all()
    with pytest.raises(ValueError, match="expected 2 losses"):
        opt.backward([mse, ce, ce])
    with pytest.raises(ValueError, match="min_losses must be finite"):
        MultiObjectiveOptimizer(problem.model.parameters(), min_losses=[0.0, float("nan")])


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"mode": "mgda"}, "mode must be"),
        ({"mode": "affine", "normalize": True}, "affine"),
        ({"stats_every": -1}, "stats_every"),
    ],
)
def test_bad_options_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        MultiObjectiveOptimizer(TeacherStudentProblem().model.parameters(), **kwargs)


class StepSizeGuard(torch.autograd.Function):
    """Identity whose backward reads a gradient value on the host, which vmap cannot batch."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * 0.5 if grad.abs().max().item() > 1e6 else grad


def test_falls_back_to_sequential_backward_when_vmap_cannot_run():
    problem = TeacherStudentProblem(dtype=torch.float64)
    params = list(problem.model.parameters())

    def losses():
        outputs = StepSizeGuard.apply(problem.model(problem.inputs))
        return [
            torch.nn.functional.mse_loss(outputs, problem.teacher_outputs),
            torch.nn.functional.cross_entropy(outputs, problem.labels),
        ]

    opt = MultiObjectiveOptimizer(params)
    with pytest.warns(UserWarning, match="sequential"):
        opt.backward(losses())
    assert opt.balancer.vectorize is False
    expected = flat_log_loss_gradients(losses(), params, [0, 0])
    direction = min_norm_weights(expected @ expected.T) @ expected
    torch.testing.assert_close(flat_grad(problem.model), direction)


def test_adamw_base_defaults_to_the_fused_kernel_unless_told_otherwise():
    problem = TeacherStudentProblem()
    layer_groups = [{"params": problem.model[0].parameters()}, {"params": problem.model[2].weight}]
    opt = MultiObjectiveOptimizer(layer_groups, lr=0.1)
    assert opt.param_groups[0]["fused"] is True
    assert [len(g["params"]) for g in opt.param_groups] == [2, 1]
    assert MultiObjectiveOptimizer(problem.model.parameters(), foreach=True).param_groups[0][
        "fused"
    ] in (None, False)
    assert not MultiObjectiveOptimizer(problem.model.parameters(), fused=False).param_groups[0][
        "fused"
    ]
    sgd = MultiObjectiveOptimizer(problem.model.parameters(), base=torch.optim.SGD, lr=0.1)
    assert not sgd.param_groups[0].get("fused")


@pytest.mark.parametrize("mode", MODES)
def test_bf16_autocast_forward_gives_nearly_the_float32_weights(mode):
    problem = TeacherStudentProblem()
    reference = MultiObjectiveOptimizer(problem.model.parameters(), mode=mode)
    reference.backward(problem.losses())
    opt = MultiObjectiveOptimizer(problem.model.parameters(), mode=mode)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        losses = problem.losses()
    opt.backward(losses)
    assert torch.allclose(opt.weights, reference.weights, atol=0.05)
    assert all(torch.isfinite(p.grad).all() for p in problem.model.parameters())


@pytest.mark.parametrize("mode", MODES)
def test_bfloat16_parameters_train(mode):
    problem = TeacherStudentProblem(dtype=torch.bfloat16)
    opt = MultiObjectiveOptimizer(problem.model.parameters(), mode=mode, lr=3e-3)
    start = [loss.item() for loss in problem.losses()]
    train(problem, opt, 50)
    end = [loss.item() for loss in problem.losses()]
    assert all(p.grad.dtype == torch.bfloat16 for p in problem.model.parameters())
    assert end[1] < start[1]


def test_amortized_statistics_do_not_change_the_trajectory():
    trajectories = []
    for stats_every in (0, 1):
        problem = TeacherStudentProblem()
        opt = MultiObjectiveOptimizer(
            problem.model.parameters(), mode="amortized", stats_every=stats_every, lr=1e-2
        )
        train(problem, opt, 5)
        trajectories.append([p.detach().clone() for p in problem.model.parameters()])
    for without, with_stats in zip(*trajectories):
        assert torch.equal(without, with_stats)
