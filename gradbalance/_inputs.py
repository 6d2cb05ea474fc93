"""Checks of what users hand to the optimizer, with errors that name the culprit."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

LossesLike = Sequence[torch.Tensor] | torch.Tensor


def stack_losses(losses: LossesLike) -> torch.Tensor:
    """The k scalar losses as one ``(k,)`` tensor that keeps their autograd graphs.

    Raises:
        ValueError: fewer than two losses, a loss that is not a tensor or not a scalar, or losses
            on different devices.
    """
    if isinstance(losses, torch.Tensor):
        if losses.ndim != 1:
            raise ValueError(
                f"losses must be a 1-D tensor of k scalar losses, got shape {tuple(losses.shape)}"
            )
        items: Sequence[torch.Tensor] = list(losses.unbind())
    else:
        items = list(losses)
    if len(items) < 2:
        raise ValueError(f"balancing needs at least 2 losses, got {len(items)}")
    for index, loss in enumerate(items):
        if not isinstance(loss, torch.Tensor):
            raise ValueError(f"loss {index} is a {type(loss).__name__}, not a torch.Tensor")
        if loss.numel() != 1:
            raise ValueError(f"loss {index} is not a scalar: shape {tuple(loss.shape)}")
        if not loss.is_floating_point():
            raise ValueError(f"loss {index} has dtype {loss.dtype}; a floating dtype is needed")
    devices = {loss.device for loss in items}
    if len(devices) > 1:
        raise ValueError(f"the losses live on different devices: {sorted(map(str, devices))}")
    return torch.stack([loss.reshape(()) for loss in items])


def as_min_losses(
    min_losses: Sequence[float] | torch.Tensor | None, num_losses: int, device: torch.device
) -> torch.Tensor:
    """The lower bounds m as a float64 ``(k,)`` tensor; zeros when not given."""
    if min_losses is None:
        return torch.zeros(num_losses, dtype=torch.float64, device=device)
    bounds = torch.as_tensor(min_losses, dtype=torch.float64).to(device).reshape(-1)
    if bounds.numel() != num_losses:
        raise ValueError(
            f"min_losses has {bounds.numel()} entries but there are {num_losses} losses"
        )
    if not bounds.isfinite().all():
        raise ValueError(f"min_losses must be finite, got {bounds.tolist()}")
    return bounds


def describe_invalid_losses(values: torch.Tensor, min_losses: torch.Tensor) -> str | None:
    """A message naming the first loss that is non-finite or not above its bound, else None."""
    for index, (value, bound) in enumerate(zip(values.tolist(), min_losses.tolist(), strict=True)):
        if not math.isfinite(value):
            return f"loss {index} is {value}; losses must be finite"
        if value <= bound:
            return (
                f"loss {index} = {value:.6g} is not above its min_loss {bound:.6g}; the balancing "
                f"uses log(L - m), so every loss must stay above its lower bound (set min_losses)"
            )
    return None


def describe_invalid_gram(gram: torch.Tensor) -> str:
    """A message naming the losses whose gradients are not finite."""
    diagonal = gram.diagonal().tolist()
    bad = [i for i, value in enumerate(diagonal) if not math.isfinite(value)]
    named = ", ".join(f"loss {i} (squared norm {diagonal[i]})" for i in bad) or "their products"
    return f"non-finite gradients: {named}; nothing was changed"
