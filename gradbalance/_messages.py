"""The messages of refused calls: each names the culprit (the loss, the weighting)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch


def loss_label(index: int, names: Sequence[str] | None) -> str:
    """``loss 1`` or, for named losses, ``loss 1 ('task')``."""
    return f"loss {index}" if names is None else f"loss {index} ({names[index]!r})"


def describe_invalid_losses(
    values: torch.Tensor, min_losses: torch.Tensor, names: Sequence[str] | None
) -> str | None:
    """A message naming the first loss that is non-finite or not above its bound, else None."""
    for index, (value, bound) in enumerate(zip(values.tolist(), min_losses.tolist(), strict=True)):
        label = loss_label(index, names)
        if not math.isfinite(value):
            return f"{label} is {value}; losses must be finite"
        if value <= bound:
            return (
                f"{label} = {value:.6g} is not above its min_loss {bound:.6g}; the balancing "
                f"uses log(L - m), so every loss must stay above its lower bound (set min_losses)"
            )
    return None


def describe_unreached(reaches: Sequence[bool], names: Sequence[str] | None) -> str:
    """A message naming the losses whose graph reaches none of the balanced parameters."""
    culprits = [loss_label(i, names) for i, reached in enumerate(reaches) if not reached]
    return (
        f"{', '.join(culprits)} reach(es) none of the balanced parameters: the gradient there "
        f"would be zero and stop the training silently (detached, computed under "
        f"torch.no_grad(), or from parameters this balancer was not given?)"
    )


def describe_unshared(reaches: Sequence[bool], names: Sequence[str] | None) -> str:
    """A message naming the losses that do not read the representation."""
    culprits = [loss_label(i, names) for i, reached in enumerate(reaches) if not reached]
    return (
        f"{', '.join(culprits)} do(es) not depend on the representation: its gradient there "
        f"would be zero and π would put all weight on it; pass tensors that every loss reads"
    )


def describe_nonfinite(culprits: Sequence[bool] | None, names: Sequence[str] | None) -> str:
    """A message naming the losses whose gradients are not finite, when known."""
    culprits = [] if culprits is None else [i for i, bad in enumerate(culprits) if bad]
    named = ", ".join(loss_label(i, names) for i in culprits) or "the weighted loss"
    return f"non-finite gradients of {named}; nothing was changed"


def describe_invalid_weights(weights: torch.Tensor, source: str) -> str:
    """A message saying why the π of a user's weighting was refused: non-finite weights, else
    (the only other refusal) weights that normalize=True cannot divide by."""
    numbers = weights.tolist()
    values = ", ".join(f"{value:.6g}" for value in numbers)
    if not all(math.isfinite(value) for value in numbers):
        reason = "non-finite weights"
    else:
        reason = (
            "weights that are negative or sum to ≤ 0, which normalize=True cannot divide by "
            "(Σ_j π_j / (L_j - m_j) must be positive)"
        )
    return f"weighting {source} returned {reason}: π = [{values}]; nothing was changed"
