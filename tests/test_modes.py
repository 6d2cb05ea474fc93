"""Each mode on its own (gradbalance.modes), without a Balancer or an optimizer: a checked step in,
``.grad`` and an Outcome out, against float64 references."""

import pytest
import torch
from helpers import TeacherStudentProblem

from gradbalance._bounds import Bounds
from gradbalance._guard import SyncGuard
from gradbalance._inputs import check_inputs
from gradbalance._options import BalancingOptions
from gradbalance._parsing import Expected
from gradbalance._per_task import PerTaskGradients
from gradbalance._window import Window
from gradbalance.modes._amortized import AmortizedMode
from gradbalance.modes._base import Call
from gradbalance.modes._exact import ExactMode
from gradbalance.modes._registry import make_mode
from gradbalance.modes._representation import RepresentationMode

FRESH = Expected(count=None, names=None, calls=0, from_min_losses=False, window=None)


def run(mode, losses, params, window=None, accumulate=False, representation=None):
    step = check_inputs(
        losses,
        params,
        expected=FRESH,
        bounds=Bounds(None),
        accumulate=accumulate,
        grad_scaler=None,
        representation=representation,
        refuse_plain_for=None,
    )
    call = Call(
        inputs=step,
        window=window or Window(),
        guard=SyncGuard(),
        per_task=PerTaskGradients(None),
        retain_graph=False,
        calls=0,
        representation=representation,
    )
    return mode.backward(call)


def log_loss_rows(losses, params):
    rows = []
    for loss in losses:
        grads = torch.autograd.grad(loss, params, retain_graph=True)
        rows.append(torch.cat([g.reshape(-1) for g in grads]) / loss.detach())
    return torch.stack(rows)


def flat_grad(params):
    return torch.cat([p.grad.reshape(-1) for p in params])


@pytest.mark.parametrize("name", ["exact", "amortized", "affine", "representation"])
def test_make_mode_is_the_one_place_a_name_becomes_a_mode(name):
    kinds = {
        "exact": ExactMode,
        "affine": ExactMode,
        "amortized": AmortizedMode,
        "representation": RepresentationMode,
    }
    mode = make_mode(name, BalancingOptions())
    assert type(mode) is kinds[name] and mode.name == name
    assert mode.normalize is (name == "amortized")


@pytest.mark.parametrize(
    ("name", "options", "message"),
    [
        ("mgda", {}, "mode must be"),
        ("amortized", {"weighting": lambda gram: gram[0]}, "weighting="),
        ("affine", {"normalize": True}, "affine"),
    ],
)
def test_make_mode_refuses_options_a_mode_cannot_take(name, options, message):
    with pytest.raises(ValueError, match=message):
        make_mode(name, BalancingOptions(**options))


def test_exact_mode_writes_the_min_norm_direction_and_returns_its_pi_and_gram():
    problem = TeacherStudentProblem(dtype=torch.float64)
    params = list(problem.model.parameters())
    losses = problem.losses()
    rows = log_loss_rows(losses, params)
    outcome = run(make_mode("exact", BalancingOptions()), losses, params)
    gram = rows @ rows.T
    torch.testing.assert_close(outcome.gram, gram)
    first = ((gram[1, 1] - gram[0, 1]) / (gram[0, 0] + gram[1, 1] - 2 * gram[0, 1])).clamp(0, 1)
    torch.testing.assert_close(outcome.weights, torch.stack([first, 1 - first]))
    torch.testing.assert_close(flat_grad(params), outcome.weights @ rows)
    assert outcome.ok is True


def test_representation_mode_weights_one_backward_by_the_pi_at_the_representation():
    problem = TeacherStudentProblem(dtype=torch.float64)
    params = list(problem.model.parameters())
    outputs = problem.model(problem.inputs)
    losses = [
        torch.nn.functional.mse_loss(outputs, problem.teacher_outputs),
        torch.nn.functional.cross_entropy(outputs, problem.labels),
    ]
    at_z = log_loss_rows(losses, [outputs])
    full = log_loss_rows(losses, params)
    outcome = run(
        make_mode("representation", BalancingOptions()), losses, params, representation=[outputs]
    )
    torch.testing.assert_close(outcome.gram, at_z @ at_z.T)
    torch.testing.assert_close(flat_grad(params), outcome.weights @ full)


def test_amortized_mode_keeps_its_state_and_one_pi_per_window():
    problem = TeacherStudentProblem(dtype=torch.float64)
    params = list(problem.model.parameters())
    mode = make_mode("amortized", BalancingOptions())
    run(mode, problem.losses(), params)  # learns nothing yet: no earlier losses
    assert mode.state_dict()["famo"]["logits"] == [0.0, 0.0]
    window = Window()
    opened = run(mode, problem.losses(), params, window=window, accumulate=True)
    assert opened is None and window.pending == 1
    outcome = run(mode, problem.losses(), params, window=window)
    torch.testing.assert_close(outcome.weights, torch.full((2,), 0.5, dtype=torch.float64))
    assert mode.state_dict()["famo"]["step"] == 1  # learnt once, at the window's end


def test_update_weights_is_amortized_modes_own():
    with pytest.raises(ValueError, match="amortized"):
        make_mode("exact", BalancingOptions()).update_weights(None, [], Bounds(None), SyncGuard())
