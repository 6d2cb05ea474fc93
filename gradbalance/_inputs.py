"""Checks of what users hand to the balancer, with errors that name the culprit."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch

LossesLike = Sequence[torch.Tensor] | torch.Tensor | Mapping[str, torch.Tensor]
ParamsLike = Iterable[torch.Tensor] | Iterable[dict[str, Any]]


def as_losses(losses: LossesLike) -> tuple[tuple[str, ...] | None, list[torch.Tensor]]:
    """The names (None for unnamed losses) and the k scalar losses, checked.

    Raises:
        ValueError: fewer than two losses, a loss that is not a floating-point scalar tensor,
            losses on different devices, or no loss that requires grad.
    """
    names = None
    if isinstance(losses, Mapping):
        names = tuple(str(name) for name in losses)
        items = list(losses.values())
    elif isinstance(losses, torch.Tensor):
        if losses.ndim != 1:
            raise ValueError(
                f"losses must be a 1-D tensor of k scalar losses, got shape {tuple(losses.shape)}"
            )
        items = list(losses.unbind())
    else:
        items = list(losses)
    if len(items) < 2:
        raise ValueError(f"balancing needs at least 2 losses, got {len(items)}")
    for index, loss in enumerate(items):
        label = loss_label(index, names)
        if not isinstance(loss, torch.Tensor):
            raise ValueError(f"{label} is a {type(loss).__name__}, not a torch.Tensor")
        if loss.numel() != 1:
            raise ValueError(f"{label} is not a scalar: shape {tuple(loss.shape)}")
        if not loss.is_floating_point():
            raise ValueError(f"{label} has dtype {loss.dtype}; a floating dtype is needed")
    devices = {loss.device for loss in items}
    if len(devices) > 1:
        raise ValueError(f"the losses live on different devices: {sorted(map(str, devices))}")
    if not any(loss.requires_grad for loss in items):
        raise ValueError(
            "none of the losses requires grad: were they computed under torch.no_grad()?"
        )
    return names, [loss if loss.ndim == 0 else loss.reshape(()) for loss in items]


def loss_label(index: int, names: Sequence[str] | None) -> str:
    """``loss 1`` or, for named losses, ``loss 1 ('task')``."""
    return f"loss {index}" if names is None else f"loss {index} ({names[index]!r})"


def trainable(params: ParamsLike) -> tuple[list[torch.Tensor], list[bool]]:
    """The tensors that require grad and, for each, whether its group is balanced.

    ``params`` are tensors or param-group dicts (``"params"``, and ``"balance": False`` to keep a
    group out of the Gram matrix), as a torch optimizer takes them or holds them in
    ``param_groups``; ``(name, tensor)`` pairs (``named_parameters()``) are read as tensors.
    """
    tensors, balanced = [], []
    for item in params:
        group = item if isinstance(item, Mapping) else {"params": [item]}
        members = group["params"]
        members = [members] if isinstance(members, torch.Tensor) else members
        for member in members:
            tensor = member[1] if isinstance(member, tuple) else member
            if not isinstance(tensor, torch.Tensor):
                raise TypeError(f"parameters must be tensors, got a {type(tensor).__name__}")
            if tensor.requires_grad:
                tensors.append(tensor)
                balanced.append(bool(group.get("balance", True)))
    if not tensors:
        raise ValueError("none of the parameters requires grad")
    return tensors, balanced


def as_min_losses(
    min_losses: Sequence[float] | torch.Tensor | None, num_losses: int, device: torch.device
) -> torch.Tensor:
    """The lower bounds m as a float64 ``(k,)`` tensor; zeros when not given."""
    if min_losses is None:
        return torch.zeros(num_losses, dtype=torch.float64, device=device)
    bounds = torch.as_tensor(min_losses, dtype=torch.float64).to(device).reshape(-1)
    if bounds.numel() != num_losses:
        raise ValueError(f"min_losses has {bounds.numel()} entries but {num_losses} losses")
    return bounds


def checked_min_losses(min_losses: Sequence[float] | torch.Tensor | None) -> int | None:
    """The k that ``min_losses`` fixes (None when not given), after checking it."""
    if min_losses is None:
        return None
    bounds = torch.as_tensor(min_losses, dtype=torch.float64).reshape(-1)
    if bounds.numel() < 2:
        raise ValueError(
            f"min_losses needs one bound per loss and balancing needs at least 2 losses, got "
            f"{bounds.numel()} bound(s)"
        )
    if not bounds.isfinite().all():
        raise ValueError(f"min_losses must be finite, got {bounds.tolist()}")
    return bounds.numel()


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


def as_representation(
    representation: torch.Tensor | Sequence[torch.Tensor] | None, mode: str
) -> list[torch.Tensor] | None:
    """The representation tensors of representation mode, checked: given exactly in that mode,
    tensors that require grad."""
    if (representation is None) != (mode != "representation"):
        raise ValueError(
            "representation= is required in mode='representation' (the tensors the losses "
            "share, e.g. the student's outputs)"
            if representation is None
            else f"representation= is for mode='representation', this balancer runs in {mode!r}"
        )
    if representation is None:
        return None
    tensors = [representation] if isinstance(representation, torch.Tensor) else list(representation)
    if not tensors:
        raise ValueError("representation= needs at least one tensor")
    for index, tensor in enumerate(tensors):
        if not isinstance(tensor, torch.Tensor):
            raise ValueError(
                f"representation tensor {index} is a {type(tensor).__name__}, not a tensor"
            )
        if not tensor.requires_grad:
            raise ValueError(
                f"representation tensor {index} (shape {tuple(tensor.shape)}) does not require "
                f"grad: pass the activations with their graph, not detached ones"
            )
    return tensors


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


def weighting_output(weights: object, k: int, source: str) -> torch.Tensor:
    """The π a user's weighting returned, as a real ``(k,)`` tensor; raises ``TypeError`` or
    ``ValueError`` naming ``source`` otherwise. Reads only metadata (no host synchronisation)."""
    if not isinstance(weights, torch.Tensor):
        raise TypeError(f"weighting {source} must return a tensor, got {type(weights).__name__}")
    if weights.shape != (k,):
        raise ValueError(
            f"weighting {source} must return π of shape ({k},) for a ({k}, {k}) Gram matrix, "
            f"got {tuple(weights.shape)}"
        )
    if not weights.is_floating_point():
        raise ValueError(f"weighting {source} must return floating-point π, got {weights.dtype}")
    return weights


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
