"""Distillation losses against explicit float64 formulas and closed forms; objective grouping."""

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from gradbalance import (
    IndefiniteSubspaceProjector,
    KDLosses,
    classification_losses,
    cross_entropy_floor,
    kl_distillation,
)

F64 = torch.float64


def kl_reference(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """T² · mean_b Σ_k p_k (log p_k − log q_k), p = softmax(teacher/T), q = softmax(student/T)."""
    p = torch.softmax(teacher.to(F64) / temperature, dim=-1)
    log_q = torch.log_softmax(student.to(F64) / temperature, dim=-1)
    per_sample = (p * (torch.log(p) - log_q)).sum(-1)
    return temperature**2 * per_sample.mean()


def entropy(q: torch.Tensor) -> torch.Tensor:
    return -(q * torch.log(q)).sum(-1)


logit_batches = st.tuples(st.integers(1, 5), st.integers(2, 7), st.integers(0, 2**31 - 1))


# ---------------------------------------------------------------- KL


@settings(max_examples=50, deadline=None)
@given(shape=logit_batches, temperature=st.floats(0.25, 8.0), scale=st.floats(0.1, 10.0))
def test_kl_equals_the_explicit_formula_and_is_non_negative(shape, temperature, scale):
    batch, classes, seed = shape
    generator = torch.Generator().manual_seed(seed)
    student = scale * torch.randn(batch, classes, generator=generator, dtype=F64)
    teacher = scale * torch.randn(batch, classes, generator=generator, dtype=F64)
    value = kl_distillation(student, teacher, temperature)
    torch.testing.assert_close(value, kl_reference(student, teacher, temperature))
    assert value >= 0
    assert kl_distillation(teacher, teacher, temperature).abs() < 1e-12


def test_t_squared_scaling_matches_the_high_temperature_limit():
    """For T → ∞, T²·KL → (1/2K) Σ_k (t_k − t̄ − s_k + s̄)² (Hinton et al. 2015, §2.1)."""
    torch.manual_seed(0)
    student, teacher = torch.randn(3, 10, dtype=F64), torch.randn(3, 10, dtype=F64)
    gap = teacher - student
    limit = ((gap - gap.mean(-1, keepdim=True)) ** 2).sum(-1).mean() / (2 * 10)
    torch.testing.assert_close(kl_distillation(student, teacher, 1e3), limit, rtol=2e-3, atol=0)


def test_leading_dimensions_are_samples():
    torch.manual_seed(0)
    student, teacher = torch.randn(2, 3, 5), torch.randn(2, 3, 5)
    flat = kl_distillation(student.reshape(6, 5), teacher.reshape(6, 5), 2.0)
    torch.testing.assert_close(kl_distillation(student, teacher, 2.0), flat)


def test_kl_sends_no_gradient_to_the_teacher_and_accepts_half_precision_teachers():
    torch.manual_seed(0)
    student = torch.randn(4, 6, requires_grad=True)
    teacher = torch.randn(4, 6).half().requires_grad_()
    kl_distillation(student, teacher, 2.0).backward()
    assert teacher.grad is None
    assert student.grad.abs().sum() > 0


@pytest.mark.parametrize(
    ("student_shape", "teacher_shape", "temperature", "message"),
    [
        ((4, 6), (4, 5), 1.0, r"student logits \(4, 6\) and teacher logits \(4, 5\)"),
        ((), (), 1.0, r"logits must have shape \(…, K\)"),
        ((0, 6), (0, 6), 1.0, r"logits must have shape \(…, K\)"),
        ((4, 6), (4, 6), 0.0, "temperature must be finite and > 0, got 0.0"),
        ((4, 6), (4, 6), -1.0, "temperature"),
        ((4, 6), (4, 6), math.inf, "temperature"),
        ((4, 6), (4, 6), math.nan, "temperature"),
    ],
)
def test_kl_bad_inputs_raise(student_shape, teacher_shape, temperature, message):
    with pytest.raises(ValueError, match=message):
        kl_distillation(torch.randn(student_shape), torch.randn(teacher_shape), temperature)


# ---------------------------------------------------------------- cross-entropy floor


@pytest.mark.parametrize(("classes", "smoothing"), [(2, 0.0), (10, 0.1), (1000, 0.1), (5, 1.0)])
def test_cross_entropy_floor_is_reached_at_the_smoothed_target(classes, smoothing):
    target = torch.tensor([1])
    q = torch.full((1, classes), smoothing / classes, dtype=F64)
    q[0, 1] += 1 - smoothing
    at_minimum = F.cross_entropy(torch.log(q), target, label_smoothing=smoothing)
    assert cross_entropy_floor(classes, smoothing) == pytest.approx(at_minimum.item(), rel=1e-12)


def test_cross_entropy_floor_closed_forms():
    assert cross_entropy_floor(10) == 0.0
    assert cross_entropy_floor(7, 1.0) == pytest.approx(math.log(7))
    # DeiT's ε = 0.1 on ImageNet-1k: the task loss can never go below ≈ 0.92
    expected = -0.9001 * math.log(0.9001) - 999 * 1e-4 * math.log(1e-4)
    assert cross_entropy_floor(1000, 0.1) == pytest.approx(expected)


@settings(max_examples=50, deadline=None)
@given(
    shape=logit_batches,
    smoothing=st.floats(0.0, 1.0),
    soft=st.booleans(),
    scale=st.floats(0.1, 20.0),
)
def test_cross_entropy_never_goes_below_its_floor(shape, smoothing, soft, scale):
    batch, classes, seed = shape
    generator = torch.Generator().manual_seed(seed)
    logits = scale * torch.randn(batch, classes, generator=generator, dtype=F64)
    if soft:
        targets = torch.softmax(scale * torch.randn(batch, classes, generator=generator), -1)
        targets = targets.to(F64)
    else:
        targets = torch.randint(classes, (batch,), generator=generator)
    loss = F.cross_entropy(logits, targets, label_smoothing=smoothing).item()
    assert loss >= cross_entropy_floor(classes, smoothing) - 1e-12


@pytest.mark.parametrize(
    ("classes", "smoothing", "message"),
    [
        (1, 0.0, "num_classes must be an int >= 2"),
        (2.0, 0.0, "num_classes"),
        (10, -0.1, r"label_smoothing must be in \[0, 1\]"),
        (10, 1.5, "label_smoothing"),
    ],
)
def test_cross_entropy_floor_bad_inputs_raise(classes, smoothing, message):
    with pytest.raises(ValueError, match=message):
        cross_entropy_floor(classes, smoothing)


# ---------------------------------------------------------------- grouping


def scalars(*values: float) -> list[torch.Tensor]:
    return [torch.tensor(v, dtype=F64, requires_grad=True) for v in values]


def test_paper_grouping_sums_each_kind_and_separate_keeps_every_term():
    kl, feature, ce = scalars(0.5, 2.0, 1.25)
    losses = KDLosses(distill={"kl": kl, "feature": feature}, task={"ce": ce})
    assert [v.item() for v in losses.objectives()] == [2.5, 1.25]
    assert [v.item() for v in losses.objectives("paper")] == [2.5, 1.25]
    assert [v.item() for v in losses.objectives("separate")] == [0.5, 2.0, 1.25]
    assert list(losses.terms) == ["kl", "feature", "ce"]
    assert all(v.shape == () for v in losses.objectives("separate"))

    losses.objectives()[0].backward()
    assert kl.grad.item() == feature.grad.item() == 1.0
    assert ce.grad is None


def test_paper_grouping_of_the_detection_terms():
    """Appendix A, eq. 2: [patch + neck + head, cls + bbox + giou]; Remark A.1's k = 6 split."""
    patch, neck, head, cls, bbox, giou = scalars(1.0, 2.0, 4.0, 8.0, 16.0, 32.0)
    losses = KDLosses(
        distill={"patch": patch, "neck": neck, "head": head},
        task={"cls": cls, "bbox": bbox, "giou": giou},
    )
    assert [v.item() for v in losses.objectives()] == [7.0, 56.0]
    assert [v.item() for v in losses.objectives("separate")] == [1, 2, 4, 8, 16, 32]


def test_sum_is_the_weighted_fixed_baseline():
    kl, feature, ce = scalars(0.5, 2.0, 1.25)
    losses = KDLosses(distill={"kl": kl, "feature": feature}, task={"ce": ce})
    assert losses.sum().item() == 3.75
    assert losses.sum({"kl": 0.5, "ce": 0.0}).item() == 0.25 + 2.0
    losses.sum({"feature": 3.0}).backward()
    assert (kl.grad.item(), feature.grad.item(), ce.grad.item()) == (1.0, 3.0, 1.0)


@pytest.mark.parametrize(
    ("distill", "task", "message"),
    [
        ({}, {"ce": 1.0}, "distill needs at least one loss term"),
        ({"kl": 1.0}, {}, "task needs at least one loss term"),
        ({"kl": [1.0, 2.0]}, {"ce": 1.0}, r"distill term 'kl' must be a scalar tensor, got \(2,\)"),
        ({"kl": 1.0}, {"ce": None}, "task term 'ce' must be a scalar tensor"),
        ({"x": 1.0}, {"x": 2.0}, r"term names used in both distill and task: \['x'\]"),
    ],
)
def test_invalid_terms_raise(distill, task, message):
    def as_tensor(value):
        return torch.tensor(value) if isinstance(value, float | list) else value

    with pytest.raises(ValueError, match=message):
        KDLosses(
            distill={k: as_tensor(v) for k, v in distill.items()},
            task={k: as_tensor(v) for k, v in task.items()},
        )


def test_bad_grouping_and_weights_raise():
    losses = KDLosses(distill={"kl": torch.tensor(1.0)}, task={"ce": torch.tensor(2.0)})
    with pytest.raises(ValueError, match="grouping must be 'paper' or 'separate', got 'pairs'"):
        losses.objectives("pairs")
    with pytest.raises(ValueError, match=r"unknown terms \['feat'\]; terms are \['kl', 'ce'\]"):
        losses.sum({"feat": 1.0})
    with pytest.raises(ValueError, match=r"finite and >= 0, got \{'kl': -1.0\}"):
        losses.sum({"kl": -1.0})
    with pytest.raises(ValueError, match="finite and >= 0"):
        losses.sum({"ce": math.nan})


# ---------------------------------------------------------------- the classification terms


def test_classification_terms_equal_their_definitions():
    torch.manual_seed(0)
    logits, distill_logits = torch.randn(6, 4, dtype=F64), torch.randn(6, 4, dtype=F64)
    teacher_logits, targets = torch.randn(6, 4, dtype=F64), torch.randint(4, (6,))
    z_s, z_t = torch.randn(6, 3, dtype=F64), torch.randn(6, 5, dtype=F64)
    proj = IndefiniteSubspaceProjector(5, 3, dtype=F64)

    losses = classification_losses(
        logits,
        targets,
        teacher_logits,
        distill_logits=distill_logits,
        projector=proj,
        student_features=z_s,
        teacher_features=z_t,
        temperature=2.0,
        label_smoothing=0.2,
    )
    assert list(losses.distill) == ["kl", "feature"] and list(losses.task) == ["ce"]
    kl = kl_reference(distill_logits, teacher_logits, 2.0)
    torch.testing.assert_close(losses.distill["kl"], kl)
    torch.testing.assert_close(losses.distill["feature"], proj.loss(z_s, z_t))
    smoothed = torch.full((6, 4), 0.2 / 4, dtype=F64)
    smoothed[torch.arange(6), targets] += 0.8
    ce = -(smoothed * torch.log_softmax(logits, -1)).sum(-1).mean()
    torch.testing.assert_close(losses.task["ce"], ce)
    assert len(losses.objectives("paper")) == 2
    assert len(losses.objectives("separate")) == 3


def test_logit_only_distillation_uses_the_task_logits_for_kl():
    torch.manual_seed(0)
    logits, teacher_logits = torch.randn(5, 3, dtype=F64), torch.randn(5, 3, dtype=F64)
    losses = classification_losses(logits, torch.randint(3, (5,)), teacher_logits)
    assert list(losses.terms) == ["kl", "ce"]
    torch.testing.assert_close(losses.distill["kl"], kl_reference(logits, teacher_logits, 1.0))


def test_feature_term_needs_all_its_inputs():
    logits = torch.randn(2, 3)
    with pytest.raises(ValueError, match=r"missing \['teacher_features'\]"):
        classification_losses(
            logits,
            torch.tensor([0, 1]),
            logits,
            projector=IndefiniteSubspaceProjector(4, 4),
            student_features=torch.randn(2, 4),
        )
