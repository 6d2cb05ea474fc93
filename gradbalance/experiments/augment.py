"""Batch augmentation on the device: random circular shifts and Gaussian noise.

Which augmentation each dataset's students and teacher get is in its spec
(:data:`gradbalance.experiments.datasets.DATASETS`).

The same augmentation is used by the teacher and by every method, and the teacher sees the
student's augmented batch (consistent views, as in Beyer et al. 2022, "A good teacher is patient and
consistent"), so the distillation targets follow the inputs the student is trained on.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["Augmentation"]


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
