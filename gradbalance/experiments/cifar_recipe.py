"""Training on CIFAR-100 as the field does it: mdistiller's data pipeline, optimizer and schedule.

Taken from mdistiller (github.com/megvii-research/mdistiller): ``mdistiller/dataset/cifar100.py``
(the augmentation and normalisation), ``mdistiller/engine/cfg.py`` and
``configs/cifar100/kd.yaml`` (the solver and KD's loss weights), ``mdistiller/distillers/KD.py``
(the loss). In one place:

* inputs: random crop 32 × 32 of the image zero-padded by 4 pixels on each side, horizontal flip
  with probability ½ (training only); then pixel / 255, standardised per channel with
  :data:`CIFAR100_MEAN` and :data:`CIFAR100_STD`;
* SGD, lr 0.05 (0.01 for MobileNetV2 and ShuffleNet students), momentum 0.9, weight decay 5e-4,
  batch 64, 240 epochs, the lr × 0.1 at epochs 150, 180 and 210;
* KD: ``0.1 · CE(z_s, y) + 0.9 · T² · KL(softmax(z_t / T) ‖ softmax(z_s / T))`` at T = 4.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, get_worker_info

from gradbalance import MultiObjectiveOptimizer
from gradbalance.experiments.cifar import CifarSplit
from gradbalance.losses import kl_distillation

__all__ = [
    "CIFAR100_MEAN",
    "CIFAR100_STD",
    "SMALL_STUDENTS",
    "CifarImages",
    "CifarRecipe",
    "cifar_loader",
    "kd_loss",
    "make_optimizer",
    "make_scheduler",
    "recipe_for",
]

# mdistiller's transforms.Normalize (dataset/cifar100.py); the per-channel statistics of the
# training images, as CRD's code has them.
CIFAR100_MEAN = (0.5071, 0.4867, 0.4408)
CIFAR100_STD = (0.2675, 0.2565, 0.2761)
PADDING = 4
# mdistiller's students trained at lr 0.01 (configs/cifar100/*/…_mv2.yaml, …_shuv{1,2}.yaml).
SMALL_STUDENTS = ("MobileNetV2", "ShuffleV1", "ShuffleV2")


@dataclass(frozen=True)
class CifarRecipe:
    """mdistiller's CIFAR-100 solver (``configs/cifar100/kd.yaml``) and KD loss (``cfg.KD``).

    Attributes:
        lr, momentum, weight_decay: SGD's (weight decay coupled, L2, as ``torch.optim.SGD``).
        batch_size, epochs: per step, in all.
        milestones, gamma: the lr is multiplied by ``gamma`` at the start of each milestone epoch.
        temperature, ce_weight, kd_weight: KD's T and its loss weights (:func:`kd_loss`).
    """

    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 5e-4
    batch_size: int = 64
    epochs: int = 240
    milestones: tuple[int, ...] = (150, 180, 210)
    gamma: float = 0.1
    temperature: float = 4.0
    ce_weight: float = 0.1
    kd_weight: float = 0.9


def recipe_for(student: str) -> CifarRecipe:
    """The recipe for a student of that (mdistiller) name: lr 0.01 for :data:`SMALL_STUDENTS`."""
    return CifarRecipe(lr=0.01) if student in SMALL_STUDENTS else CifarRecipe()


def kd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor,
    recipe: CifarRecipe,
) -> torch.Tensor:
    """mdistiller's KD: ``ce_weight · CE + kd_weight · T² · KL`` (batch means; logits (B, K))."""
    ce = F.cross_entropy(student_logits, labels)
    kd = kl_distillation(student_logits, teacher_logits, recipe.temperature)
    return recipe.ce_weight * ce + recipe.kd_weight * kd


def make_optimizer(
    params: Iterable[Any], recipe: CifarRecipe, balance: str | None = None, **options: Any
) -> torch.optim.Optimizer:
    """The recipe's SGD; with ``balance`` (a mode: ``"exact"``, ``"amortized"``,
    ``"representation"``, …) the same SGD inside :class:`~gradbalance.MultiObjectiveOptimizer`,
    which takes ``options`` (``weighting=``, ``normalize=``, …)."""
    sgd = dict(lr=recipe.lr, momentum=recipe.momentum, weight_decay=recipe.weight_decay)
    if balance is None:
        if options:
            raise ValueError(f"options {sorted(options)} need a balance mode")
        return torch.optim.SGD(params, **sgd)
    return MultiObjectiveOptimizer(params, base=torch.optim.SGD, mode=balance, **sgd, **options)


def make_scheduler(
    optimizer: torch.optim.Optimizer, recipe: CifarRecipe
) -> torch.optim.lr_scheduler.MultiStepLR:
    """The step schedule, stepped once per epoch (after the epoch's last step)."""
    return torch.optim.lr_scheduler.MultiStepLR(
        optimizer, milestones=list(recipe.milestones), gamma=recipe.gamma
    )


class CifarImages(Dataset):
    """Items ``(image, label, index)``: the ``index``-th image, augmented if ``augment``, as a
    standardised float32 ``(3, 32, 32)``, its int64 label, and ``index`` (to look up per-example
    data such as a teacher's cached outputs).

    The random numbers come from the dataset's own generator, seeded with ``seed``; in a
    ``DataLoader`` worker :func:`cifar_loader`'s ``worker_init_fn`` re-seeds each worker's copy
    from the loader's generator, so that a seed gives the same batches run after run.
    """

    def __init__(self, split: CifarSplit, augment: bool, seed: int = 0) -> None:
        self.images = split.images
        self.labels = split.labels
        self.augment = augment
        self.generator = torch.Generator().manual_seed(seed)
        self.mean = torch.tensor(CIFAR100_MEAN).view(3, 1, 1)
        self.std = torch.tensor(CIFAR100_STD).view(3, 1, 1)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        image = self.images[index]
        if self.augment:
            image = self._crop_and_flip(image)
        image = (image.float() / 255 - self.mean) / self.std
        return image, self.labels[index], index

    def _crop_and_flip(self, image: torch.Tensor) -> torch.Tensor:
        """A 32 × 32 window at a uniform offset in [0, 8]² of the zero-padded 40 × 40 image,
        mirrored left-right with probability ½ (torchvision's RandomCrop(32, padding=4) and
        RandomHorizontalFlip on the uint8 image, as mdistiller applies them)."""
        height, width = image.shape[1:]
        padded = F.pad(image, (PADDING,) * 4)
        top, left, flip = torch.randint(0, 2 * PADDING + 1, (3,), generator=self.generator)
        image = padded[:, top : top + height, left : left + width]
        return image.flip(-1) if flip % 2 else image


def _seed_worker(worker_id: int) -> None:
    """Each worker's copy of the dataset draws from ``info.seed``: the loader's base seed (drawn
    from its generator each epoch) plus the worker's id."""
    info = get_worker_info()
    info.dataset.generator.manual_seed(info.seed)


def cifar_loader(
    split: CifarSplit,
    batch_size: int,
    train: bool,
    seed: int = 0,
    workers: int = 0,
    pin_memory: bool | None = None,
) -> DataLoader:
    """Batches ``(images (B, 3, 32, 32) float32, labels (B,), indices (B,))`` of ``split``.

    ``train``: augmented, reshuffled every epoch (a ``torch.Generator`` seeded with ``seed``
    drives the order, and the workers' augmentation through :func:`_seed_worker`), the last
    partial batch kept (as mdistiller's loader); else in order and not augmented.
    ``pin_memory`` defaults to whether CUDA is available (page-locked batches copy to the GPU
    asynchronously); ``workers`` processes prepare batches while the GPU trains (kept alive across
    epochs).
    """
    return DataLoader(
        CifarImages(split, augment=train, seed=seed),
        batch_size=batch_size,
        shuffle=train,
        num_workers=workers,
        pin_memory=torch.cuda.is_available() if pin_memory is None else pin_memory,
        worker_init_fn=_seed_worker if workers else None,
        generator=torch.Generator().manual_seed(seed),
        persistent_workers=workers > 0,
    )
