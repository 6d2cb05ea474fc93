"""The CIFAR-100 recipe: augmentation, seeded loaders, the schedule, and KD's SGD step."""

import copy

import pytest
import torch
import torch.nn.functional as F

from gradbalance import MultiObjectiveOptimizer
from gradbalance.experiments.cifar import CifarSplit
from gradbalance.experiments.cifar_models import make_cifar_model
from gradbalance.experiments.cifar_recipe import (
    CIFAR100_MEAN,
    CIFAR100_STD,
    CifarImages,
    CifarRecipe,
    cifar_loader,
    kd_loss,
    make_optimizer,
    make_scheduler,
    recipe_for,
)

MEAN = torch.tensor(CIFAR100_MEAN).view(3, 1, 1)
STD = torch.tensor(CIFAR100_STD).view(3, 1, 1)


def random_split(count=20, seed=0):
    generator = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (count, 3, 32, 32), dtype=torch.uint8, generator=generator)
    return CifarSplit(images, torch.randint(0, 100, (count,), generator=generator))


def standardised(image):
    return (image.double() / 255 - MEAN.double()) / STD.double()


def crops_and_flips(image):
    """Every image RandomCrop(32, padding=4) + RandomHorizontalFlip can give: 81 × 2."""
    padded = torch.zeros(3, 40, 40, dtype=image.dtype)
    padded[:, 4:36, 4:36] = image
    for top in range(9):
        for left in range(9):
            window = padded[:, top : top + 32, left : left + 32]
            yield (top, left, False), window
            yield (top, left, True), window.flip(-1)


def test_mdistillers_normalisation():
    assert CIFAR100_MEAN == (0.5071, 0.4867, 0.4408)
    assert CIFAR100_STD == (0.2675, 0.2565, 0.2761)


def test_an_augmented_image_is_a_crop_of_the_padded_image_possibly_flipped():
    split = random_split()
    dataset = CifarImages(split, augment=True, seed=3)
    seen = set()
    for _ in range(4):
        for index in range(len(split.labels)):
            image, label, returned = dataset[index]
            assert image.shape == (3, 32, 32) and image.dtype == torch.float32
            assert returned == index and label == split.labels[index]
            matches = [
                where
                for where, window in crops_and_flips(split.images[index])
                if torch.allclose(image.double(), standardised(window), atol=1e-6)
            ]
            assert matches, index
            seen.add(matches[0][2])
    assert seen == {False, True}


def test_the_values_lie_between_the_standardised_black_and_white():
    image, _, _ = CifarImages(random_split(), augment=True)[0]
    low, high = -MEAN / STD, (1 - MEAN) / STD
    assert bool(((image >= low - 1e-6) & (image <= high + 1e-6)).all())
    # A zero-padded border of at least one row or column is black: 0 → −mean / std.
    dataset = CifarImages(
        CifarSplit(
            torch.full((1, 3, 32, 32), 255, dtype=torch.uint8), torch.zeros(1, dtype=torch.int64)
        ),
        augment=True,
        seed=0,
    )
    images = torch.stack([dataset[0][0] for _ in range(30)])
    black = (images - low).abs() < 1e-6
    assert black.any() and (~black).any()


def test_without_augmentation_the_image_is_only_standardised():
    split = random_split()
    image, _, _ = CifarImages(split, augment=False)[7]
    torch.testing.assert_close(image.double(), standardised(split.images[7]), atol=1e-6, rtol=0)


def batches(loader, epochs=2):
    return [batch for _ in range(epochs) for batch in loader]


@pytest.mark.parametrize("workers", [0, 2])
def test_the_same_seed_gives_the_same_batches(workers):
    split = random_split()
    first = batches(cifar_loader(split, batch_size=6, train=True, seed=5, workers=workers))
    again = batches(cifar_loader(split, batch_size=6, train=True, seed=5, workers=workers))
    other = batches(cifar_loader(split, batch_size=6, train=True, seed=6, workers=workers))
    assert len(first) == 2 * 4  # 20 examples: 6, 6, 6, 2, the last partial batch kept
    for (x, y, i), (x2, y2, i2) in zip(first, again):
        assert torch.equal(x, x2) and torch.equal(y, y2) and torch.equal(i, i2)
        assert torch.equal(y, split.labels[i])
    assert not all(torch.equal(a[0], b[0]) for a, b in zip(first, other))
    # Each epoch is a fresh permutation and fresh crops.
    epoch_one, epoch_two = first[:4], first[4:]
    assert sorted(torch.cat([b[2] for b in epoch_one]).tolist()) == list(range(20))
    assert not all(torch.equal(a[2], b[2]) for a, b in zip(epoch_one, epoch_two))


def test_the_test_loader_is_in_order_and_unaugmented():
    split = random_split()
    images, labels, indices = next(iter(cifar_loader(split, batch_size=20, train=False)))
    assert indices.tolist() == list(range(20)) and torch.equal(labels, split.labels)
    torch.testing.assert_close(
        images.double(), torch.stack([standardised(im) for im in split.images]), atol=1e-6, rtol=0
    )


def test_the_recipe_is_mdistillers():
    recipe = CifarRecipe()
    assert (recipe.lr, recipe.momentum, recipe.weight_decay) == (0.05, 0.9, 5e-4)
    assert (recipe.batch_size, recipe.epochs, recipe.milestones) == (64, 240, (150, 180, 210))
    assert (recipe.temperature, recipe.ce_weight, recipe.kd_weight) == (4.0, 0.1, 0.9)
    assert recipe_for("ShuffleV2").lr == recipe_for("MobileNetV2").lr == 0.01
    assert recipe_for("resnet8x4") == recipe


@pytest.mark.parametrize("balance", [None, "exact"])
def test_the_lr_is_divided_by_ten_at_150_180_and_210(balance):
    recipe = CifarRecipe()
    optimizer = make_optimizer([torch.nn.Parameter(torch.zeros(3))], recipe, balance=balance)
    scheduler = make_scheduler(optimizer, recipe)
    lrs = []
    for _ in range(recipe.epochs):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()  # the epoch's steps (no gradient: nothing moves)
        scheduler.step()
    expected = {0: 0.05, 149: 0.05, 150: 0.005, 179: 0.005, 180: 5e-4, 210: 5e-5, 239: 5e-5}
    for epoch, lr in expected.items():
        assert lrs[epoch] == pytest.approx(lr, rel=1e-12), epoch


def test_the_balanced_optimizer_runs_the_same_sgd():
    parameter = torch.nn.Parameter(torch.zeros(3))
    optimizer = make_optimizer([parameter], CifarRecipe(), balance="amortized", stats_every=0)
    assert isinstance(optimizer, MultiObjectiveOptimizer)
    assert isinstance(optimizer.base, torch.optim.SGD)
    group = optimizer.param_groups[0]
    assert (group["lr"], group["momentum"], group["weight_decay"]) == (0.05, 0.9, 5e-4)
    assert optimizer.mode == "amortized"
    with pytest.raises(ValueError, match="need a balance mode"):
        make_optimizer([parameter], CifarRecipe(), weighting=None)


def log_softmax64(logits):
    shifted = logits - logits.max(dim=1, keepdim=True).values
    return shifted - shifted.exp().sum(dim=1, keepdim=True).log()


def reference_kd(student_logits, teacher_logits, labels, t=4.0):
    """0.1 · CE + 0.9 · T² · KL(p_t ‖ p_s), written out (float64)."""
    ce = -log_softmax64(student_logits)[torch.arange(len(labels)), labels].mean()
    log_p, log_q = log_softmax64(teacher_logits / t), log_softmax64(student_logits / t)
    kl = (log_p.exp() * (log_p - log_q)).sum(dim=1).mean()
    return 0.1 * ce + 0.9 * t**2 * kl


def test_two_sgd_steps_of_kd_match_a_float64_reference():
    """θ₁ = θ₀ − η v₁, v₁ = g₀ + λθ₀; θ₂ = θ₁ − η v₂, v₂ = μ v₁ + g₁ + λθ₁ (torch's SGD)."""
    torch.manual_seed(0)
    student = make_cifar_model("resnet8x4")
    reference = copy.deepcopy(student).double()
    initial_fc = reference.fc.weight.detach().clone()
    generator = torch.Generator().manual_seed(1)
    inputs = torch.randn(2, 4, 3, 32, 32, generator=generator)
    teacher_logits = 3 * torch.randn(2, 4, 100, generator=generator)
    labels = torch.randint(0, 100, (2, 4), generator=generator)
    recipe = CifarRecipe()

    optimizer = make_optimizer(student.parameters(), recipe)
    for step in range(2):
        optimizer.zero_grad()
        kd_loss(student(inputs[step]).logits, teacher_logits[step], labels[step], recipe).backward()
        optimizer.step()

    lr, momentum, decay = 0.05, 0.9, 5e-4
    params = list(reference.parameters())
    velocity = None
    for step in range(2):
        logits = reference(inputs[step].double()).logits
        loss = reference_kd(logits, teacher_logits[step].double(), labels[step])
        grads = torch.autograd.grad(loss, params)
        with torch.no_grad():
            update = [g + decay * p for g, p in zip(grads, params)]
            if velocity is not None:
                update = [momentum * v + u for v, u in zip(velocity, update)]
            velocity = update
            for parameter, v in zip(params, velocity):
                parameter -= lr * v
    moved = (student.fc.weight.detach().double() - initial_fc).abs().max()
    assert moved > 1e-3  # the steps did something the tolerance below could not hide
    for (name, ours), theirs in zip(student.named_parameters(), params):
        torch.testing.assert_close(ours.detach().double(), theirs, atol=2e-6, rtol=1e-4, msg=name)


def test_kd_loss_at_equal_logits_is_the_weighted_cross_entropy():
    logits = torch.randn(5, 100, generator=torch.Generator().manual_seed(2))
    labels = torch.arange(5)
    expected = 0.1 * F.cross_entropy(logits, labels)
    torch.testing.assert_close(kd_loss(logits, logits, labels, CifarRecipe()), expected)
