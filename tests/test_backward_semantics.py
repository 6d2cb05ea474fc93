"""``backward(losses)`` behaves as ``Tensor.backward`` does for what it writes: the layout and
aliasing of ``.grad``, kept gradients, leaves outside the optimizer, post-accumulate-grad hooks,
checkpointing, detached and unreachable losses, sparse and complex parameters, the scale of the
losses, the messages of bad calls.

References are plain float64 autograd: ``backward`` of ``Σ_i c_i L_i`` with the coefficients the
optimizer reports, or the per-task gradients computed one by one.
"""

import pytest
import torch
import torch.nn.functional as F
from helpers import TeacherStudentProblem, assert_unchanged, snapshot

from gradbalance import Balancer, MultiObjectiveOptimizer
from gradbalance.weighting import loss_coefficients, min_norm_weights

MODES = ["exact", "amortized", "affine"]


def coefficients_of(opt_or_balancer, losses, mode):
    """The coefficients c with ``.grad = Σ c_i ∇L_i`` for the last backward of these losses."""
    values = torch.stack([loss.detach() for loss in losses]).double()
    shifted = values + (1e-8 if mode == "amortized" else 0.0)
    return loss_coefficients(opt_or_balancer.weights, shifted, normalize=mode == "amortized")


def reference_grads(losses, coefficients, tensors):
    total = sum(c * loss for c, loss in zip(coefficients.tolist(), losses))
    return torch.autograd.grad(total, tensors, retain_graph=True)


# -- layout, aliasing, kept gradients -------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
def test_a_gradient_shared_by_two_parameters_gives_two_separate_grads(mode):
    # x @ (W + ΔW): autograd hands W and ΔW the very same gradient tensor.
    torch.manual_seed(0)
    weight, delta = (torch.nn.Parameter(torch.randn(4, 3, dtype=torch.float64)) for _ in "ab")
    x = torch.randn(8, 4, dtype=torch.float64)
    opt = MultiObjectiveOptimizer([weight, delta], base=torch.optim.SGD, mode=mode, lr=0.1)
    out = x @ (weight + delta)
    opt.backward([out.square().mean(), (out - 1).abs().mean()])
    assert weight.grad is not delta.grad
    assert weight.grad.data_ptr() != delta.grad.data_ptr()
    torch.testing.assert_close(weight.grad, delta.grad)
    expected = weight.grad.clone()
    torch.nn.utils.clip_grad_norm_([weight, delta], max_norm=1e-3)
    norm = torch.cat([expected.reshape(-1)] * 2).norm()
    torch.testing.assert_close(weight.grad, expected * 1e-3 / (norm + 1e-6))
    torch.testing.assert_close(delta.grad, weight.grad)


@pytest.mark.parametrize("mode", MODES)
def test_grad_has_the_parameters_strides_and_no_expanded_memory(mode):
    torch.manual_seed(0)
    summed = torch.nn.Parameter(torch.randn(3, 5))  # reached through .sum(): an expanded grad
    conv = torch.nn.Conv2d(3, 4, 3).to(memory_format=torch.channels_last)
    transposed = torch.nn.Parameter(torch.randn(6, 4).t())  # a leaf with transposed strides
    params = [summed, *conv.parameters(), transposed]
    images = torch.randn(2, 3, 6, 6).to(memory_format=torch.channels_last)
    opt = MultiObjectiveOptimizer(params, base=torch.optim.SGD, mode=mode, lr=0.1)

    def losses():
        feature = conv(images).mean() + (torch.randn(5, 6) @ transposed.T).mean()
        return [summed.sum() ** 2 + feature.exp(), (feature - summed.mean()).square() + 1]

    plain = torch.optim.SGD(params, lr=0.1)
    sum(losses()).backward()
    expected_strides = [p.grad.stride() for p in params]
    plain.zero_grad()
    opt.backward(losses())
    for param, strides in zip(params, expected_strides):
        assert param.grad.stride() == strides == param.stride()
    assert all(0 not in param.grad.stride() for param in params)
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.backward(losses())  # a second backward accumulates into them


def test_a_grad_kept_from_an_earlier_step_never_changes():
    problem = TeacherStudentProblem()
    opt = MultiObjectiveOptimizer(problem.model.parameters(), mode="exact")
    opt.backward(problem.losses())
    kept = [(p.grad, p.grad.clone()) for p in problem.model.parameters()]
    opt.step()
    for _ in range(2):
        opt.zero_grad()  # set_to_none=True
        opt.backward(problem.losses())
        opt.step()
    for param, (grad, value) in zip(problem.model.parameters(), kept):
        assert param.grad is not grad
        assert torch.equal(grad, value)


@pytest.mark.parametrize("mode", MODES)
def test_zero_grad_in_place_then_backward_accumulates_into_the_same_tensors(mode):
    problem = TeacherStudentProblem(dtype=torch.float64)
    opt = MultiObjectiveOptimizer(problem.model.parameters(), mode=mode)
    opt.backward(problem.losses())
    tensors = [p.grad for p in problem.model.parameters()]
    opt.zero_grad(set_to_none=False)
    losses = problem.losses()
    opt.backward(losses, retain_graph=True)
    expected = reference_grads(
        losses, coefficients_of(opt, losses, mode), tensors=list(problem.model.parameters())
    )
    for param, grad, reference in zip(problem.model.parameters(), tensors, expected):
        assert param.grad is grad
        torch.testing.assert_close(grad, reference)


# -- leaves outside the optimizer, hooks -----------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
def test_leaves_outside_the_optimizer_get_the_balanced_combination(mode):
    problem = TeacherStudentProblem(dtype=torch.float64)
    head = torch.nn.Linear(4, 4).double()  # trained by a second optimizer
    inputs = problem.inputs.clone().requires_grad_()
    body = MultiObjectiveOptimizer(problem.model.parameters(), mode=mode)

    def losses():
        outputs = head(problem.model(inputs))
        return [
            F.mse_loss(outputs, problem.teacher_outputs),
            F.cross_entropy(outputs, problem.labels),
        ]

    current = losses()
    body.backward(current, retain_graph=True)
    outside = [*head.parameters(), inputs]
    expected = reference_grads(current, coefficients_of(body, current, mode), outside)
    for leaf, reference in zip(outside, expected):
        torch.testing.assert_close(leaf.grad, reference)
    # π itself is the body's: the head stays out of the Gram matrix
    if mode != "amortized":
        jacobian = torch.stack(
            [
                torch.cat(
                    [
                        g.reshape(-1)
                        for g in torch.autograd.grad(
                            loss, list(problem.model.parameters()), retain_graph=True
                        )
                    ]
                )
                / loss.detach()
                for loss in current
            ]
        )
        if mode == "exact":
            torch.testing.assert_close(body.weights, min_norm_weights(jacobian @ jacobian.T))


@pytest.mark.parametrize("mode", MODES)
def test_post_accumulate_grad_hooks_run_once_on_the_final_grad(mode):
    problem = TeacherStudentProblem(dtype=torch.float64)
    head = torch.nn.Linear(4, 4).double()
    seen = []
    for tensor in [*problem.model.parameters(), head.weight]:
        tensor.register_post_accumulate_grad_hook(lambda t: seen.append((id(t), t.grad.clone())))
    opt = MultiObjectiveOptimizer(problem.model.parameters(), mode=mode)
    opt.backward(problem.losses(torch.nn.Sequential(problem.model, head)))
    assert sorted(i for i, _ in seen) == sorted(
        id(t) for t in [*problem.model.parameters(), head.weight]
    )
    by_id = dict(seen)
    for tensor in [*problem.model.parameters(), head.weight]:
        assert torch.equal(by_id[id(tensor)], tensor.grad)


def test_hooks_do_not_run_when_the_backward_raises():
    problem = TeacherStudentProblem()
    calls = []
    for param in problem.model.parameters():
        param.register_post_accumulate_grad_hook(lambda t: calls.append(t))
    opt = MultiObjectiveOptimizer(problem.model.parameters())
    mse, ce = problem.losses()
    with pytest.raises(ValueError, match="nan"):
        opt.backward([mse, ce * float("nan")])
    assert calls == []


# -- checkpointing ---------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
def test_non_reentrant_checkpoint_gives_the_unchecked_gradient(mode):
    from torch.utils.checkpoint import checkpoint

    problem = TeacherStudentProblem(dtype=torch.float64)
    first, rest = problem.model[0], problem.model[1:]
    grads = []
    for model in (problem.model, lambda x: checkpoint(rest, first(x), use_reentrant=False)):
        opt = MultiObjectiveOptimizer(problem.model.parameters(), mode=mode)
        opt.backward(problem.losses(model))
        grads.append([p.grad.clone() for p in problem.model.parameters()])
        opt.zero_grad()
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)


# -- losses that cannot be balanced ---------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("how", ["no_grad", "detach"])
def test_a_detached_loss_is_refused_by_name(mode, how):
    problem = TeacherStudentProblem()
    opt = MultiObjectiveOptimizer(problem.model.parameters(), mode=mode)
    opt.backward(dict(zip(["distill", "task"], problem.losses())))
    before = snapshot(opt, problem.model)
    mse, _ = problem.losses()
    if how == "no_grad":
        with torch.no_grad():
            ce = problem.losses()[1]
    else:
        ce = problem.losses()[1].detach()
    with pytest.raises(ValueError, match=r"'task'.*reach"):
        opt.backward({"distill": mse, "task": ce})
    assert_unchanged(before, snapshot(opt, problem.model))


@pytest.mark.parametrize("mode", MODES)
def test_losses_that_reach_no_parameter_are_refused(mode):
    problem = TeacherStudentProblem()
    other = torch.nn.Linear(10, 4)
    opt = MultiObjectiveOptimizer(problem.model.parameters(), mode=mode)
    before = snapshot(opt, problem.model)
    losses = problem.losses(other)  # the optimizer's parameters are not in this graph
    with pytest.raises(ValueError, match="loss 0, loss 1 reach"):
        opt.backward(losses)
    assert_unchanged(before, snapshot(opt, problem.model))
    assert other.weight.grad is None


def test_a_loss_that_reaches_only_unbalanced_parameters_is_refused():
    problem = TeacherStudentProblem()
    opt = MultiObjectiveOptimizer(
        [
            {"params": problem.model[0].parameters()},
            {"params": problem.model[2].parameters(), "balance": False},
        ]
    )
    mse, ce = problem.losses()
    head_only = problem.model[2].weight.square().sum()
    with pytest.raises(ValueError, match="loss 2 reach"):
        opt.backward([mse, ce, head_only])


# -- sparse and complex ---------------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
def test_sparse_gradients_are_refused_with_the_fix(mode):
    embedding = torch.nn.Embedding(10, 3, sparse=True)
    opt = MultiObjectiveOptimizer(embedding.parameters(), base=torch.optim.SGD, mode=mode, lr=0.1)
    vectors = embedding(torch.tensor([1, 2, 3]))
    with pytest.raises(ValueError, match="sparse=False"):
        opt.backward([vectors.square().mean(), (vectors - 1).square().mean()])
    assert embedding.weight.grad is None


def complex_problem():
    torch.manual_seed(0)
    weight = torch.nn.Parameter(torch.randn(3, 4, dtype=torch.complex128))
    bias = torch.nn.Parameter(torch.randn(4, dtype=torch.float64))
    x = torch.randn(5, 3, dtype=torch.complex128)

    def losses():
        out = x @ weight
        return [
            (out.abs() - 1).square().mean() + bias.square().sum(),
            (out.real + bias).abs().mean(),
        ]

    return [weight, bias], losses


def test_complex_parameters_get_the_real_inner_product_in_exact_mode():
    params, losses = complex_problem()
    opt = MultiObjectiveOptimizer(params, base=torch.optim.SGD, lr=0.1)
    current = losses()
    rows = []
    for loss in current:
        grads = torch.autograd.grad(loss, params, retain_graph=True)
        real = [torch.view_as_real(g) if g.is_complex() else g for g in grads]
        rows.append(torch.cat([r.reshape(-1) for r in real]) / loss.detach())
    jacobian = torch.stack(rows)  # real coordinates: the Gram matrix is Re(J Jᴴ)
    opt.backward(current, retain_graph=True)
    torch.testing.assert_close(opt.weights, min_norm_weights(jacobian @ jacobian.T))
    expected = reference_grads(current, coefficients_of(opt, current, "exact"), params)
    for param, reference in zip(params, expected):
        assert param.grad.dtype == param.dtype
        torch.testing.assert_close(param.grad, reference)
    opt.step()


def test_complex_parameters_train_in_amortized_mode():
    params, losses = complex_problem()
    opt = MultiObjectiveOptimizer(params, mode="amortized", lr=0.05)
    current = losses()
    opt.backward(current, retain_graph=True)
    expected = reference_grads(current, coefficients_of(opt, current, "amortized"), params)
    for param, reference in zip(params, expected):
        torch.testing.assert_close(param.grad, reference)
    start = [loss.item() for loss in losses()]
    for _ in range(30):
        opt.step()
        opt.zero_grad()
        opt.backward(losses())
    assert sum(loss.item() for loss in losses()) < sum(start)


# -- the scale of the losses ----------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["exact", "affine"])
@pytest.mark.parametrize("factor", [1e-25, 1e20])
def test_pi_does_not_depend_on_the_scale_of_a_loss(mode, factor):
    # log-loss gradients are scale invariant: ∇(aL)/(aL) = ∇L/L.
    problem = TeacherStudentProblem()
    weights = []
    for scale in (1.0, factor):
        opt = MultiObjectiveOptimizer(problem.model.parameters(), mode=mode)
        mse, ce = problem.losses()
        opt.backward([mse * scale, ce])
        weights.append(opt.weights)
        opt.zero_grad()
    torch.testing.assert_close(weights[1], weights[0], rtol=1e-5, atol=1e-6)


# -- messages -------------------------------------------------------------------------------------


def test_min_losses_of_the_wrong_length_is_named():
    problem = TeacherStudentProblem()
    opt = MultiObjectiveOptimizer(problem.model.parameters(), min_losses=[0.0, 0.0, 0.0])
    with pytest.raises(ValueError, match="min_losses has 3 entries but got 2 losses"):
        opt.backward(problem.losses())
    with pytest.raises(ValueError, match="at least 2 losses"):
        MultiObjectiveOptimizer(problem.model.parameters(), min_losses=[0.0])


def test_an_inf_gradient_of_one_loss_blames_that_loss_only():
    problem = TeacherStudentProblem()
    opt = MultiObjectiveOptimizer(problem.model.parameters())
    mse, ce = problem.losses()
    weight = problem.model[0].weight
    # sqrt at 0: a value of 0 and an infinite derivative; in the vmapped backward the other row
    # gets 0 · inf = NaN there, which must not be blamed on loss 0
    spike = torch.sqrt((weight - weight.detach()).sum())
    with pytest.raises(ValueError, match=r"non-finite gradients of loss 1; nothing"):
        opt.backward([mse, ce + spike])


@pytest.mark.parametrize("mode", ["exact", "amortized"])
def test_another_number_of_losses_inside_the_first_window_is_named(mode):
    problem = TeacherStudentProblem()
    opt = MultiObjectiveOptimizer(problem.model.parameters(), mode=mode)
    opt.backward(problem.losses(), accumulate=True)
    mse, ce = problem.losses()
    with pytest.raises(ValueError, match="this micro-batch has 3 losses, the ones accumulated"):
        opt.backward([mse, ce, ce])
    opt.backward(problem.losses())  # the window is intact


# -- named losses ---------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
def test_named_losses_keep_their_names_and_their_first_order(mode):
    problem = TeacherStudentProblem(dtype=torch.float64)
    named = MultiObjectiveOptimizer(problem.model.parameters(), mode=mode)
    listed = MultiObjectiveOptimizer(problem.model.parameters(), mode=mode)
    for step in range(3):
        mse, ce = problem.losses()
        losses = {"distill": mse, "task": ce} if step % 2 == 0 else {"task": ce, "distill": mse}
        named.backward(losses)
        grads = [p.grad.clone() for p in problem.model.parameters()]
        named.zero_grad()
        listed.backward(problem.losses())
        for param, grad in zip(problem.model.parameters(), grads):
            torch.testing.assert_close(param.grad, grad, rtol=1e-12, atol=1e-14)
        listed.zero_grad()
    assert named.balancer.loss_names == ("distill", "task")
    assert list(named.named_weights) == ["distill", "task"]
    torch.testing.assert_close(torch.stack(list(named.named_weights.values())), named.weights)
    assert named.state_dict()["param_groups"][0]["gradbalance"]["loss_names"] == ["distill", "task"]
    mse, ce = problem.losses()
    with pytest.raises(ValueError, match="named"):
        named.backward({"distill": mse, "label": ce})
    with pytest.raises(ValueError, match="named"):
        named.backward([mse, ce])
    with pytest.raises(ValueError, match=r"loss 1 \('task'\) is nan"):
        named.backward({"distill": mse, "task": ce * float("nan")})


# -- the balancer on its own ----------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["exact", "amortized"])
def test_a_balancer_with_its_own_adamw_takes_the_optimizers_steps(mode):
    trajectories = []
    for kind in ("optimizer", "balancer"):
        problem = TeacherStudentProblem()
        if kind == "optimizer":
            opt = MultiObjectiveOptimizer(
                problem.model.parameters(), mode=mode, vectorize=True, lr=0.01
            )
            backward = opt.backward
        else:
            opt = torch.optim.AdamW(problem.model.parameters(), lr=0.01, fused=True)
            balancer = Balancer(mode, vectorize=True)
            params = list(problem.model.parameters())

            def backward(losses, balancer=balancer, params=params):
                balancer.backward(losses, params)

        for _ in range(4):
            opt.zero_grad()
            backward(problem.losses())
            opt.step()
        trajectories.append([p.detach().clone() for p in problem.model.parameters()])
    for a, b in zip(*trajectories):
        assert torch.equal(a, b)


def test_a_balancer_state_dict_round_trips_through_torch_save(tmp_path):
    problem = TeacherStudentProblem()
    balancer = Balancer("amortized", stats_every=1)
    for _ in range(3):
        problem.model.zero_grad()
        balancer.backward(
            {"distill": problem.losses()[0], "task": problem.losses()[1]},
            problem.model.parameters(),
        )
    torch.save(balancer.state_dict(), tmp_path / "balancer.pt")
    restored = Balancer("amortized", stats_every=1)
    restored.load_state_dict(torch.load(tmp_path / "balancer.pt", weights_only=True))
    assert restored.state_dict() == balancer.state_dict()
    assert restored.loss_names == ("distill", "task")
    assert torch.equal(restored.weights, balancer.weights)
    with pytest.raises(ValueError, match="mode"):
        Balancer("exact").load_state_dict(balancer.state_dict())


@pytest.mark.parametrize("mode", ["exact", "amortized"])
def test_the_statistics_cover_the_balanced_parameters_only(mode):
    problem = TeacherStudentProblem(dtype=torch.float64)
    head = torch.nn.Linear(4, 4).double()  # outside the optimizer
    opt = MultiObjectiveOptimizer(problem.model.parameters(), mode=mode, stats_every=1)
    losses = problem.losses(torch.nn.Sequential(problem.model, head))
    params = list(problem.model.parameters())
    rows = [
        torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, params, retain_graph=True)])
        / loss.detach()
        for loss in losses
    ]
    jacobian = torch.stack(rows)
    opt.backward(losses)
    torch.testing.assert_close(opt.stats["gram"], jacobian @ jacobian.T)


@pytest.mark.parametrize("mode", MODES)
def test_grad_scaler_unscales_a_shared_gradient_once_per_parameter(mode):
    torch.manual_seed(0)
    weight, delta = (torch.nn.Parameter(torch.randn(4, 3)) for _ in "ab")
    x = torch.randn(8, 4)
    results = []
    for scaler in (None, torch.amp.GradScaler("cpu", init_scale=2.0**10)):
        opt = MultiObjectiveOptimizer([weight, delta], base=torch.optim.SGD, mode=mode, lr=0.1)
        out = x @ (weight + delta)
        opt.backward([out.square().mean(), (out - 1).abs().mean()], grad_scaler=scaler)
        if scaler is not None:
            scaler.unscale_(opt)
        results.append([weight.grad.clone(), delta.grad.clone()])
        opt.zero_grad()
    for plain, unscaled in zip(*results):
        torch.testing.assert_close(unscaled, plain)
