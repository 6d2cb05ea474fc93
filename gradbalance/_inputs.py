"""The checked step: what one balanced backward call was given, checked before anything changes.

:func:`check_step` turns the user's losses and parameters into a :class:`Step` — the k losses in
the order their names first came in, their values averaged over the ranks, the bounds ``m``, the
grad scaler's scale, the tensors that get a gradient and their :class:`Role` — or raises a
ValueError naming the culprit. It walks the losses' autograd graph once, for the leaves outside
the parameters, the losses that reach no parameter, and the kinds of node the per-task backward
must know about (a reentrant checkpoint, sparse embeddings, the operators vmap batches poorly).

The row scale ``ρ = S / (L − m)`` (docs/method.md, "Numerics") is computed here and nowhere else.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch

from . import _distributed as distributed
from ._buffers import Role
from ._messages import describe_unreached, describe_unshared, loss_label

__all__ = [
    "REENTRANT_CHECKPOINT",
    "Bounds",
    "Expected",
    "LossesLike",
    "ParamsLike",
    "Step",
    "as_losses",
    "as_representation",
    "check_step",
    "graph_leaves",
    "reaches",
    "row_scale",
    "trainable",
    "walk",
]

LossesLike = Sequence[torch.Tensor] | torch.Tensor | Mapping[str, torch.Tensor]
ParamsLike = Iterable[torch.Tensor] | Iterable[dict[str, Any]]

# The node that gives a leaf its .grad, by its class name.
_LEAF = "AccumulateGrad"
# The nodes of nn.Embedding / nn.EmbeddingBag, which record whether their gradient is sparse.
_EMBEDDINGS = ("EmbeddingBackward0", "EmbeddingBagBackward0")
# The node of torch.utils.checkpoint(..., use_reentrant=True): its backward runs a nested
# ``torch.autograd.backward``, which only an ordinary backward pass can drive, and the layers
# inside it are not part of the graph that can be walked.
REENTRANT_CHECKPOINT = "CheckpointFunctionBackward"


def row_scale(shifted: torch.Tensor, scale: torch.Tensor | None) -> torch.Tensor:
    """``ρ_i = S / D_i``, ``(k,)`` float64: the scale to compute the per-task gradients with, so
    that the rows ``ρ_i ∇L_i`` are the (scaled) log-loss gradients, of order one.

    ``D_i`` that is not positive and finite (a micro-batch inside a window may be at its bound;
    invalid losses are refused later) gets ``ρ_i = S``, so that the rows stay finite.
    """
    usable = shifted.isfinite() & (shifted > 0)
    rho = torch.where(usable, 1 / torch.where(usable, shifted, 1), 1).to(torch.float64)
    return rho if scale is None else rho * scale


@dataclass(frozen=True)
class Step:
    """One backward call's checked inputs."""

    losses: torch.Tensor  # (k,), with graph, unscaled
    names: tuple[str, ...] | None
    values: torch.Tensor  # (k,) float64, averaged over the ranks
    min_losses: torch.Tensor  # (k,) float64
    scale: torch.Tensor | None  # the grad scaler's scale, 0-d float64
    accumulate: bool
    layout: distributed.Layout
    tensors: list[torch.Tensor]  # the trainable parameters, then the leaves outside them
    roles: list[Role]
    kinds: frozenset[str] = frozenset()  # the class names of the graph's autograd nodes

    @property
    def scaled(self) -> bool:
        return self.scale is not None

    @property
    def shifted(self) -> torch.Tensor:
        """``D = L − m``, ``(k,)`` float64."""
        return self.values - self.min_losses

    @functools.cached_property
    def rho(self) -> torch.Tensor:
        """``ρ = S / D``, ``(k,)`` float64 (:func:`row_scale`)."""
        return row_scale(self.shifted, self.scale)

    @property
    def reentrant(self) -> bool:
        """The graph holds a reentrant checkpoint."""
        return REENTRANT_CHECKPOINT in self.kinds

    @property
    def by_backward(self) -> bool:
        """Gradients must come from ordinary backward passes (read from ``.grad``), which
        ``torch.autograd.grad`` cannot replace: sharded parameters, reentrant checkpoints."""
        return self.layout.sharded or self.reentrant

    @property
    def single(self) -> bool:
        """A single batch in a single process: nothing to hold for later micro-batches or ranks."""
        return not self.accumulate and self.layout.group is None

    def balanced_only(self) -> Step:
        """This step with the balanced tensors only (the Gram matrix's)."""
        pairs = [
            (t, r) for t, r in zip(self.tensors, self.roles, strict=True) if r is Role.BALANCED
        ]
        return replace(self, tensors=[t for t, _ in pairs], roles=[r for _, r in pairs])

    def reached_only(self, gradients: list) -> tuple[Step, list]:
        """This step without the outside leaves that got no gradient (under FSDP, the unsharded
        parameters: FSDP takes their gradients itself), and the gradients without theirs."""
        keep = [
            i
            for i, (role, gradient) in enumerate(zip(self.roles, gradients, strict=True))
            if role is not Role.OUTSIDE or gradient is not None
        ]
        if len(keep) == len(gradients):
            return self, gradients
        step = replace(
            self, tensors=[self.tensors[i] for i in keep], roles=[self.roles[i] for i in keep]
        )
        return step, [gradients[i] for i in keep]

    def describe(self, index: int) -> str:
        tensor = self.tensors[index]
        where = (
            "a leaf outside the parameters" if self.roles[index] is Role.OUTSIDE else "a parameter"
        )
        return f"{where} of shape {tuple(tensor.shape)}"


@dataclass(frozen=True)
class Expected:
    """What earlier calls fixed about the losses: their number (``min_losses`` may fix it
    first), their names, and the number held by an open window."""

    count: int | None
    names: tuple[str, ...] | None
    calls: int  # balanced backward calls so far
    from_min_losses: bool  # ``count`` comes from min_losses= (no call yet)
    window: int | None  # the number of losses of the micro-batches held


class Bounds:
    """The lower bounds ``m`` as a float64 ``(k,)`` tensor on the losses' device (zeros when
    not given), made once per device."""

    def __init__(self, min_losses: Sequence[float] | torch.Tensor | None) -> None:
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

    @staticmethod
    def checked(min_losses: Sequence[float] | torch.Tensor | None) -> int | None:
        """The k that ``min_losses`` fixes (None when not given), after checking it."""
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


def check_step(
    losses: LossesLike,
    params: ParamsLike,
    *,
    expected: Expected,
    bounds: Bounds,
    accumulate: bool,
    grad_scaler: torch.amp.GradScaler | None,
    representation: list[torch.Tensor] | None,
    refuse_plain_for: str | None,
) -> Step:
    """The checked :class:`Step` of one backward call.

    Args:
        expected: what earlier calls fixed (:class:`Expected`).
        refuse_plain_for: the mode's name where ``"balance": False`` groups are refused (a mode
            without per-task gradients of the parameters), else None.

    Raises:
        ValueError: naming the loss or the parameter at fault; nothing has changed.
    """
    names, items = in_known_order(*as_losses(losses), expected)
    owned, balanced = trainable(params)
    roles = [Role.BALANCED if flag else Role.PLAIN for flag in balanced]
    if refuse_plain_for is not None and Role.PLAIN in roles:
        raise ValueError(
            f"'balance': False is for the exact and affine modes: {refuse_plain_for} mode "
            f"computes no per-task gradients of the parameters, so there is nothing to leave out"
        )
    if Role.BALANCED not in roles:
        raise ValueError("every param group has 'balance': False; nothing to balance")
    stacked = torch.stack(items)
    leaves, kinds = walk(stacked)
    owned_ids = {id(tensor) for tensor in owned}
    outside = [leaf for leaf in leaves if id(leaf) not in owned_ids]
    balanced_ids = {id(t) for t, role in zip(owned, roles, strict=True) if role is Role.BALANCED}
    layout = distributed.Layout.of(owned)
    # FSDP's graph reaches the sharded parameters through unsharded copies, and a reentrant
    # checkpoint hides the layers inside it: no structure to follow, requires_grad is all there
    # is to check.
    opaque = layout.sharded or REENTRANT_CHECKPOINT in kinds
    reached = [loss.requires_grad and (opaque or reaches(loss, balanced_ids)) for loss in items]
    if layout.group is not None:  # a loss reached on some rank is reached: one decision
        reached = layout.any_rank(torch.tensor(reached, device=stacked.device)).tolist()
    if not all(reached):
        raise ValueError(describe_unreached(reached, names))
    if representation is not None:
        _check_shared(items, representation, names)
    values = layout.average(stacked.detach().to(torch.float64, copy=True))
    scale = None
    if grad_scaler is not None and grad_scaler.is_enabled():
        # scale() of a tensor of ones: the scale on the device, without reading it back
        scale = grad_scaler.scale(torch.ones((), dtype=torch.float64, device=stacked.device))
    return Step(
        losses=stacked,
        names=names,
        values=values,
        min_losses=bounds.on(len(items), stacked.device),
        scale=scale,
        accumulate=accumulate,
        layout=layout,
        tensors=owned + outside,
        roles=roles + [Role.OUTSIDE] * len(outside),
        kinds=kinds,
    )


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


def _check_shared(
    losses: list[torch.Tensor], representation: list[torch.Tensor], names: tuple[str, ...] | None
) -> None:
    """Refuses losses whose graph does not pass through the representation."""
    leaves = {id(t) for t in representation if t.grad_fn is None}
    nodes = frozenset(t.grad_fn for t in representation if t.grad_fn is not None)
    shared = [reaches(loss, leaves, nodes) for loss in losses]
    if not all(shared):
        raise ValueError(describe_unshared(shared, names))


# -- the graph walk -------------------------------------------------------------------------------


def graph_leaves(outputs: torch.Tensor) -> list[torch.Tensor]:
    """The leaves that ``outputs.backward()`` would give a gradient, in a deterministic order.

    These are the tensors behind the ``AccumulateGrad`` nodes of the autograd graph: parameters,
    and any other leaf that requires grad (a projector trained by a second optimizer, an input
    with ``requires_grad``). Leaves used only inside a reentrant checkpoint are not seen.

    Raises:
        ValueError: the graph holds an embedding with sparse gradients.
    """
    return walk(outputs)[0]


def walk(outputs: torch.Tensor) -> tuple[list[torch.Tensor], frozenset[str]]:
    """The graph's leaves (:func:`graph_leaves`) and the class names of its autograd nodes, in
    one walk."""
    leaves, kinds = [], set()
    for node in _nodes(outputs):
        kind = type(node).__name__
        kinds.add(kind)
        if kind == _LEAF:
            leaves.append(node.variable)
        elif kind in _EMBEDDINGS and node._saved_sparse:
            raise ValueError(
                f"the losses pass through {kind} with sparse gradients; gradbalance balances "
                f"dense gradients only: build the module with sparse=False"
            )
    return leaves, frozenset(kinds)


def reaches(output: torch.Tensor, leaves: set[int], nodes: frozenset = frozenset()) -> bool:
    """Whether the autograd graph of ``output`` reaches one of the leaves whose ``id`` is in
    ``leaves``, or one of the autograd ``nodes`` (the ``grad_fn`` of non-leaf tensors); the
    search stops at the first."""
    return any(
        node in nodes or (type(node).__name__ == _LEAF and id(node.variable) in leaves)
        for node in _nodes(output)
    )


def _nodes(output: torch.Tensor) -> Iterator:
    """The autograd nodes of ``output``'s graph, depth first, each once."""
    seen: set = set()
    stack = [output.grad_fn] if output.grad_fn is not None else []
    while stack:
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        yield node
        stack.extend(child for child, _ in reversed(node.next_functions) if child is not None)
