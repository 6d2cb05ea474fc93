"""Training on CIFAR-100 as the field does it: mdistiller's data pipeline, optimizer and schedule,
as data. The dataset registry (:mod:`gradbalance.experiments.datasets`) turns it into
``gradbalance distill``'s defaults for ``--dataset cifar100``; the crop and flip run on the device
(:class:`gradbalance.experiments.augment.CropFlip`), the optimizer and schedule are
:func:`gradbalance.experiments.training.base_optimizer` and ``lr_scheduler``.

Taken from mdistiller (github.com/megvii-research/mdistiller): ``mdistiller/dataset/cifar100.py``
(the augmentation and normalisation), ``mdistiller/engine/cfg.py`` and
``configs/cifar100/kd.yaml`` (the solver and KD's loss weights), ``mdistiller/distillers/KD.py``
(the loss). In one place:

* inputs: random crop 32 × 32 of the image zero-padded by 4 pixels on each side, horizontal flip
  with probability ½ (training only); then pixel / 255, standardised per channel with
  :data:`CIFAR100_MEAN` and :data:`CIFAR100_STD`;
* SGD, lr 0.05 (mdistiller's MobileNetV2 and ShuffleNet students, not here yet, take 0.01),
  momentum 0.9, weight decay 5e-4, batch 64, 240 epochs, the lr × 0.1 at epochs 150, 180 and 210;
* KD: ``0.1 · CE(z_s, y) + 0.9 · T² · KL(softmax(z_t / T) ‖ softmax(z_s / T))`` at T = 4.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["CIFAR100_MEAN", "CIFAR100_STD", "PADDING", "CifarRecipe"]

# mdistiller's transforms.Normalize (dataset/cifar100.py); the per-channel statistics of the
# training images, as CRD's code has them.
CIFAR100_MEAN = (0.5071, 0.4867, 0.4408)
CIFAR100_STD = (0.2675, 0.2565, 0.2761)
PADDING = 4


@dataclass(frozen=True)
class CifarRecipe:
    """mdistiller's CIFAR-100 solver (``configs/cifar100/kd.yaml``) and KD loss (``cfg.KD``).

    Attributes:
        lr, momentum, weight_decay: SGD's (weight decay coupled, L2, as ``torch.optim.SGD``).
        batch_size, epochs: per step, in all.
        milestones, gamma: the lr is multiplied by ``gamma`` at the start of each milestone epoch.
        temperature, ce_weight, kd_weight: KD's T and its loss weights (the ``kd`` row).
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
