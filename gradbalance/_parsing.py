"""What a balanced backward was given, read and checked: the losses (a list, a 1-D tensor or a
mapping of names), the parameters (tensors, pairs or param groups), the representation.

Each function raises a ValueError naming the culprit; nothing has changed by then.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ._messages import loss_label

LossesLike = Sequence[torch.Tensor] | torch.Tensor | Mapping[str, torch.Tensor]
ParamsLike = Iterable[torch.Tensor] | Iterable[dict[str, Any]]


@dataclass(frozen=True)
class Expected:
    """What earlier calls fixed about the losses: their number (``min_losses`` may fix it
    first), their names, and the number held by an open window."""

    count: int | None
    names: tuple[str, ...] | None
    calls: int  # balanced backward calls so far
    from_min_losses: bool  # ``count`` comes from min_losses= (no call yet)
    window: int | None  # the number of losses of the micro-batches held


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


def as_values(losses: LossesLike) -> tuple[tuple[str, ...] | None, list[torch.Tensor]]:
    """Loss values (no graph needed) with their names, named as :func:`as_losses` names them."""
    if isinstance(losses, Mapping):
        return tuple(str(name) for name in losses), [torch.as_tensor(v) for v in losses.values()]
    if isinstance(losses, torch.Tensor):
        return None, list(losses.reshape(-1).unbind())
    return None, [torch.as_tensor(v) for v in losses]


def in_known_order(
    names: tuple[str, ...] | None, items: list[torch.Tensor], expected: Expected
) -> tuple[tuple[str, ...] | None, list[torch.Tensor]]:
    """The losses, checked against earlier calls, in the order their names first came in.

    Raises:
        ValueError: a number or naming of losses that does not match the window, ``min_losses``
            or earlier calls.
    """
    count = len(items)
    if expected.window is not None and count != expected.window:
        raise ValueError(
            f"this micro-batch has {count} losses, the ones accumulated before it {expected.window}"
        )
    if expected.count is not None and count != expected.count:
        if expected.from_min_losses:
            raise ValueError(f"min_losses has {expected.count} entries but got {count} losses")
        raise ValueError(f"expected {expected.count} losses as in earlier steps, got {count}")
    known = expected.names
    if known is not None and (names is None or set(names) != set(known)):
        raise ValueError(
            f"the losses were named {list(known)} in earlier steps, got "
            f"{'unnamed losses' if names is None else list(names)}"
        )
    if known is None and names is not None and expected.calls > 0:
        raise ValueError(f"the losses were unnamed in earlier steps, got names {list(names)}")
    if names is not None and known is not None and names != known:
        return known, [items[names.index(name)] for name in known]
    return names, items


def trainable(params: ParamsLike) -> tuple[list[torch.Tensor], list[bool]]:
    """The tensors that require grad, each once, and for each whether its group is balanced.

    ``params`` are tensors or param-group dicts (``"params"``, and ``"balance": False`` to keep a
    group out of the Gram matrix), as a torch optimizer takes them or holds them in
    ``param_groups``; ``(name, tensor)`` pairs (``named_parameters()``) are read as tensors. A
    tensor given twice is kept where it first came: ``loss.backward()`` writes its gradient once.
    """
    tensors, balanced, seen = [], [], set()
    for item in params:
        group = item if isinstance(item, Mapping) else {"params": [item]}
        members = group["params"]
        members = [members] if isinstance(members, torch.Tensor) else members
        for member in members:
            tensor = member[1] if isinstance(member, tuple) else member
            if not isinstance(tensor, torch.Tensor):
                raise TypeError(f"parameters must be tensors, got a {type(tensor).__name__}")
            if tensor.requires_grad and id(tensor) not in seen:
                seen.add(id(tensor))
                tensors.append(tensor)
                balanced.append(bool(group.get("balance", True)))
    if not tensors:
        raise ValueError("none of the parameters requires grad")
    return tensors, balanced


def as_representation(
    representation: torch.Tensor | Sequence[torch.Tensor] | None, wanted: bool, mode: str
) -> list[torch.Tensor] | None:
    """The representation tensors, checked: given exactly where the mode ``wanted`` them,
    tensors that require grad."""
    if (representation is None) == wanted:
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
