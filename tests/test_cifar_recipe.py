"""CIFAR-100 as the field trains it, through gradbalance distill's own code: the crop and flip,
the schedule, and one step of the KD and MoKD rows under SGD against float64 references."""

import copy

import pytest
import torch

from gradbalance.experiments.augment import CropFlip
from gradbalance.experiments.cifar_models import make_cifar_model
from gradbalance.experiments.cifar_recipe import CIFAR100_MEAN, CIFAR100_STD, CifarRecipe
from gradbalance.experiments.datasets import DATASETS
from gradbalance.experiments.methods import MethodSettings, TeacherTargets, build, parse_method
from gradbalance.experiments.models import Output
from gradbalance.experiments.training import TrainConfig, base_optimizer, lr_scheduler

MEAN = torch.tensor(CIFAR100_MEAN).view(3, 1, 1)
STD = torch.tensor(CIFAR100_STD).view(3, 1, 1)
SGD = MethodSettings(lr=0.05, weight_decay=5e-4, temperature=4.0, features=False, optimizer="sgd")


def crops_and_flips(image):
    """Every image RandomCrop(32, padding=4) + RandomHorizontalFlip can give of a uint8 image:
    81 windows of the zero-padded image, each as it is and mirrored."""
    padded = torch.zeros(3, 40, 40, dtype=image.dtype)
    padded[:, 4:36, 4:36] = image
    for top in range(9):
        for left in range(9):
            window = padded[:, top : top + 32, left : left + 32]
            yield (top, left, False), window
            yield (top, left, True), window.flip(-1)


def test_mdistillers_recipe_and_normalisation():
    recipe = CifarRecipe()
    assert CIFAR100_MEAN == (0.5071, 0.4867, 0.4408)
    assert CIFAR100_STD == (0.2675, 0.2565, 0.2761)
    assert (recipe.lr, recipe.momentum, recipe.weight_decay) == (0.05, 0.9, 5e-4)
    assert (recipe.batch_size, recipe.epochs, recipe.milestones) == (64, 240, (150, 180, 210))
    assert (recipe.temperature, recipe.ce_weight, recipe.kd_weight) == (4.0, 0.1, 0.9)
    defaults = DATASETS["cifar100"].defaults
    assert (defaults.optimizer, defaults.lr, defaults.weight_decay) == ("sgd", 0.05, 5e-4)
    assert (defaults.batch_size, defaults.epochs, defaults.temperature) == (64, 240, 4.0)


def test_the_augmentation_crops_the_black_padded_image_and_flips_it():
    generator = torch.Generator().manual_seed(0)
    raw = torch.randint(0, 256, (40, 3, 32, 32), dtype=torch.uint8, generator=generator)
    standardised = (raw.float() / 255 - MEAN) / STD
    augmentation = DATASETS["cifar100"].augmentation
    assert isinstance(augmentation, CropFlip)
    seen = set()
    for _ in range(5):
        out = augmentation(standardised, generator)
        for image, source in zip(out, raw):
            # Undo the standardisation: a black (0) padding pixel must come back as 0.
            pixels = ((image * STD + MEAN) * 255).round().clamp(0, 255).to(torch.uint8)
            matches = [key for key, crop in crops_and_flips(source) if torch.equal(crop, pixels)]
            assert matches, "not a crop of the padded image"
            seen.update(matches)
    assert len({top for top, _, _ in seen}) > 5 and {flip for _, _, flip in seen} == {True, False}
    again = augmentation(standardised, torch.Generator().manual_seed(0))
    first = augmentation(standardised, torch.Generator().manual_seed(0))
    assert torch.equal(first, again)


@pytest.mark.parametrize("name", ["kd", "mokd-exact"])
def test_the_lr_is_divided_by_ten_at_epochs_150_180_and_210(name):
    """The rows' optimizers under the dataset's schedule (stepped per step; 3 steps an epoch)."""
    defaults = DATASETS["cifar100"].defaults
    config = TrainConfig(240, 64, 0.05, 5e-4, "sgd", defaults.milestones)
    model = torch.nn.Linear(4, 100)
    model.feature_dim = 4
    if name == "kd":
        optimizer = base_optimizer(model.parameters(), "sgd", 0.05, 5e-4)
    else:
        _, update = build(parse_method(name), model, TeacherTargets(model, None), SGD)
        optimizer = update.optimizer
    scheduler = lr_scheduler(optimizer, config, steps_per_epoch=3)
    lrs = []
    for _ in range(240 * 3):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    expected = {0: 0.05, 149: 0.05, 150: 0.005, 179: 0.005, 180: 5e-4, 210: 5e-5, 239: 5e-5}
    for epoch, lr in expected.items():
        assert lrs[3 * epoch] == pytest.approx(lr, rel=1e-12), epoch
        assert lrs[3 * epoch + 2] == pytest.approx(lr, rel=1e-12), epoch


def log_softmax64(logits):
    shifted = logits - logits.max(dim=1, keepdim=True).values
    return shifted - shifted.exp().sum(dim=1, keepdim=True).log()


def reference_losses(student_logits, teacher_logits, labels, t=4.0):
    """[T² · KL(p_t ‖ p_s), CE], written out (float64)."""
    ce = -log_softmax64(student_logits)[torch.arange(len(labels)), labels].mean()
    log_p, log_q = log_softmax64(teacher_logits / t), log_softmax64(student_logits / t)
    kl = (log_p.exp() * (log_p - log_q)).sum(dim=1).mean()
    return t**2 * kl, ce


class FixedTeacher(torch.nn.Module):
    """A frozen teacher whose logits are given per batch (features unused: logits only)."""

    def __init__(self, logits):
        super().__init__()
        self.logits = logits
        self.feature_dim = 1

    def forward(self, inputs):
        return Output(torch.zeros(len(inputs), 1), self.logits[self.step])


def reference_direction(name, losses, params, features):
    """The row's gradient, in float64: KD's 0.9 · ∇L_kl + 0.1 · ∇L_ce; MoKD's min-norm π of the
    log-loss gradients u_i = ∇L_i / L_i (closed form for k = 2) — with respect to the parameters
    (exact mode) or to the student's features (representation mode) — and the direction
    Σ π_i ∇L_i / L_i normalised by Σ π_i / L_i."""
    grads = [torch.autograd.grad(loss, params, retain_graph=True) for loss in losses]
    if name == "kd":
        return [0.9 * a + 0.1 * b for a, b in zip(*grads)]
    at = grads
    if name == "mokd-representation":
        at = [torch.autograd.grad(loss, features, retain_graph=True) for loss in losses]
    u = [torch.cat([g.flatten() for g in grad]) / loss for grad, loss in zip(at, losses)]
    pi = ((u[1] - u[0]) @ u[1] / (u[0] - u[1]).square().sum()).clamp(0, 1)
    weights = (pi / losses[0], (1 - pi) / losses[1])
    scale = weights[0] + weights[1]
    return [(weights[0] * a + weights[1] * b) / scale for a, b in zip(*grads)]


@pytest.mark.parametrize("name", ["kd", "mokd-exact", "mokd-representation", "dot"])
def test_two_sgd_steps_of_the_row_match_a_float64_reference(name):
    """θ₁ = θ₀ − η v₁, v₁ = d₀ + λθ₀; θ₂ = θ₁ − η v₂, v₂ = μ v₁ + d₁ + λθ₁ (torch's SGD) with the
    row's direction d; DOT: v_ce ← (μ − Δ) v_ce + 0.1 ∇L_ce + λθ, v_kd ← (μ + Δ) v_kd + 0.9 ∇L_kl,
    θ ← θ − η (v_ce + v_kd), each buffer the incoming gradient on its first step."""
    torch.manual_seed(0)
    student = make_cifar_model("resnet8x4")
    reference = copy.deepcopy(student).double()
    initial_fc = reference.fc.weight.detach().clone()
    generator = torch.Generator().manual_seed(1)
    inputs = torch.randn(2, 4, 3, 32, 32, generator=generator)
    teacher = FixedTeacher(3 * torch.randn(2, 4, 100, generator=generator))
    labels = torch.randint(0, 100, (2, 4), generator=generator)

    objectives, update = build(parse_method(name), student, TeacherTargets(teacher, None), SGD)
    for step in range(2):
        teacher.step = step
        output = student(inputs[step])
        update(objectives(output, inputs[step], labels[step], torch.arange(4)), output)

    lr, momentum, decay, delta = 0.05, 0.9, 5e-4, 0.075
    params = list(reference.parameters())
    velocity, task_velocity = None, None
    for step in range(2):
        output = reference(inputs[step].double())
        losses = reference_losses(output.logits, teacher.logits[step].double(), labels[step])
        if name == "dot":
            kd, ce = (
                torch.autograd.grad(w * loss, params, retain_graph=True)
                for w, loss in zip((0.9, 0.1), losses)
            )
            with torch.no_grad():
                ce = [g + decay * p for g, p in zip(ce, params)]
                if velocity is not None:
                    ce = [(momentum - delta) * v + g for v, g in zip(task_velocity, ce)]
                    kd = [(momentum + delta) * v + g for v, g in zip(velocity, kd)]
                velocity, task_velocity = list(kd), ce
                for parameter, a, b in zip(params, velocity, task_velocity):
                    parameter -= lr * (a + b)
            continue
        direction = reference_direction(name, losses, params, output.features)
        with torch.no_grad():
            change = [d + decay * p for d, p in zip(direction, params)]
            if velocity is not None:
                change = [momentum * v + c for v, c in zip(velocity, change)]
            velocity = change
            for parameter, v in zip(params, velocity):
                parameter -= lr * v
    moved = (student.fc.weight.detach().double() - initial_fc).abs().max()
    assert moved > 1e-3  # the steps did something the tolerance below could not hide
    for (key, ours), theirs in zip(student.named_parameters(), params):
        torch.testing.assert_close(ours.detach().double(), theirs, atol=2e-6, rtol=1e-4, msg=key)
