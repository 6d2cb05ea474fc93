"""The lower bounds ``m`` of the losses (``min_losses=``): checked once, then made on the losses'
device."""

from __future__ import annotations

from collections.abc import Sequence

import torch

MinLosses = Sequence[float] | torch.Tensor | None


def count_bounds(min_losses: MinLosses) -> int | None:
    """The number of bounds ``min_losses`` gives, which fixes k (None when not given), after
    checking them: at least two, all finite.

    Raises:
        ValueError: fewer than two bounds, or a bound that is not finite.
    """
    if min_losses is None:
        return None
    bounds = torch.as_tensor(min_losses, dtype=torch.float64).reshape(-1)
    if bounds.numel() < 2:
        raise ValueError(
            f"min_losses needs one bound per loss and balancing needs at least 2 losses, "
            f"got {bounds.numel()} bound(s)"
        )
    if not bounds.isfinite().all():
        raise ValueError(f"min_losses must be finite, got {bounds.tolist()}")
    return bounds.numel()


class Bounds:
    """The lower bounds ``m`` as a float64 ``(k,)`` tensor on the losses' device (zeros when
    not given), made once per device."""

    def __init__(self, min_losses: MinLosses) -> None:
        self.given = min_losses
        self._cached: torch.Tensor | None = None

    def on(self, num_losses: int, device: torch.device) -> torch.Tensor:
        cached = self._cached
        if cached is None or len(cached) != num_losses or cached.device != device:
            cached = self._cached = self._make(num_losses, device)
        return cached

    def _make(self, num_losses: int, device: torch.device) -> torch.Tensor:
        if self.given is None:
            return torch.zeros(num_losses, dtype=torch.float64, device=device)
        bounds = torch.as_tensor(self.given, dtype=torch.float64).to(device).reshape(-1)
        if bounds.numel() != num_losses:
            raise ValueError(f"min_losses has {bounds.numel()} entries but {num_losses} losses")
        return bounds
