"""The functional π update against torch.optim's Adam and AdamW stepping the same logits."""

import itertools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from gradbalance.modes._amortized import FamoHyperparameters, FamoState, famo_update, logit_gradient

loss_values = st.lists(st.floats(0.05, 5.0), min_size=3, max_size=3)


@settings(max_examples=30, deadline=None)
@given(
    sequence=st.lists(loss_values, min_size=2, max_size=6),
    optimizer=st.sampled_from(["adamw", "adam"]),
    lr=st.floats(1e-3, 0.5),
    weight_decay=st.floats(0.0, 0.5),
)
def test_famo_update_is_torch_adam_on_the_logits(sequence, optimizer, lr, weight_decay):
    hyper = FamoHyperparameters(lr=lr, weight_decay=weight_decay, optimizer=optimizer)
    state = FamoState.initial(3, torch.device("cpu"), torch.float64)
    logits = torch.zeros(3, dtype=torch.float64, requires_grad=True)
    reference_class = torch.optim.AdamW if optimizer == "adamw" else torch.optim.Adam
    reference = reference_class([logits], lr=lr, weight_decay=weight_decay)
    bounds = torch.zeros(3, dtype=torch.float64)
    for before, after in itertools.pairwise(sequence):
        before, after = torch.tensor(before).double(), torch.tensor(after).double()
        state = famo_update(state, before, after, bounds, hyper)
        decrease = (before + 1e-8).log() - (after + 1e-8).log()  # docs/method.md: ε = 1e-8
        logits.grad = logit_gradient(logits.detach(), decrease)
        reference.step()
        torch.testing.assert_close(state.logits, logits.detach(), rtol=1e-12, atol=1e-14)
    assert state.step == len(sequence) - 1


def test_famo_update_is_pure():
    hyper = FamoHyperparameters()
    state = FamoState.initial(2, torch.device("cpu"), torch.float32)
    previous, current = torch.tensor([1.0, 2.0]).double(), torch.tensor([0.9, 1.9]).double()
    new = famo_update(state, previous, current, torch.zeros(2).double(), hyper)
    assert torch.equal(state.logits, torch.zeros(2)) and state.step == 0
    assert new.logits.tolist() == pytest.approx([-0.025, 0.025], abs=1e-7)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"optimizer": "sgd"}, "pi_optimizer"),
        ({"lr": -1.0}, "pi_lr"),
        ({"lr": float("nan")}, "pi_lr"),
    ],
)
def test_bad_pi_optimizer_settings_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        FamoHyperparameters(**kwargs)
