"""Batch augmentation on the device: random circular shifts and Gaussian noise.

The same augmentation is used by the teacher and by every method, and the teacher sees the
student's augmented batch (consistent views, as in Beyer et al. 2022, "A good teacher is patient and
consistent"), so the distillation targets follow the inputs the student is trained on.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["Augmentation", "default_augmentation", "teacher_augmentation"]


@dataclass(frozen=True)
class Augmentation:
    """Shift every spatial axis by a random integer in ``[-max_shift, max_shift]`` (circularly),
    per example, then add Gaussian noise of standard deviation ``noise``."""

    max_shift: int = 0
    noise: float = 0.0

    def __call__(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Augment a batch ``(B, C, *spatial)`` with random numbers from ``generator``."""
        for axis in range(2, x.ndim):
            x = self._shift(x, axis, generator)
        if self.noise > 0:
            x = x + self.noise * torch.randn(
                x.shape, generator=generator, device=x.device, dtype=x.dtype
            )
        return x

    def _shift(self, x: torch.Tensor, axis: int, generator: torch.Generator) -> torch.Tensor:
        if self.max_shift == 0:
            return x
        size = x.shape[axis]
        shifts = torch.randint(
            -self.max_shift, self.max_shift + 1, (x.shape[0],), generator=generator, device=x.device
        )
        positions = torch.arange(size, device=x.device)
        source = (positions[None, :] - shifts[:, None]) % size  # (B, size)
        view = [x.shape[0]] + [1] * (x.ndim - 1)
        view[axis] = size
        return x.gather(axis, source.view(view).expand(x.shape))


def default_augmentation(dataset: str) -> Augmentation | None:
    """The students' augmentation on ``dataset``: ±4 steps and noise 0.05 on MNIST-1D signals,
    ±1 pixel on the 8×8 digits, ±4 pixels on CIFAR-100; none on MNIST, whose student is
    unregularised as in Hinton et al. (2015) — so the teacher's outputs on the training set are
    computed once (:class:`gradbalance.experiments.methods.TeacherTargets`)."""
    return {
        "mnist1d": Augmentation(max_shift=4, noise=0.05),
        "digits": Augmentation(max_shift=1),
        "mnist": None,
        "cifar100": Augmentation(max_shift=4),
    }[dataset]


def teacher_augmentation(dataset: str) -> Augmentation | None:
    """The teacher's augmentation: the students' one, except on MNIST, where the teacher is
    trained on images jittered by up to 2 pixels in each direction, as Hinton et al.'s was."""
    return Augmentation(max_shift=2) if dataset == "mnist" else default_augmentation(dataset)
