"""The checked inputs of one balanced backward call, checked before anything changes.

:func:`check_inputs` turns the user's losses and parameters into :class:`BackwardInputs` — the k
losses in the order their names first came in, their values averaged over the ranks, the bounds
``m``, the grad scaler's scale, the tensors that get a gradient and their :class:`Role` — or
raises a ValueError naming the culprit (:mod:`._parsing` reads what was given, :mod:`._graph`
walks the losses' graph once).

The row scale ``ρ = S / (L − m)`` (docs/method.md, "Numerics") is computed here and nowhere else.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, replace

import torch

from . import _distributed as distributed
from ._bounds import Bounds
from ._buffers import Role
from ._graph import REENTRANT_CHECKPOINT, check_shared, reaches, walk
from ._messages import describe_unreached
from ._parsing import Expected, LossesLike, ParamsLike, as_losses, in_known_order, trainable


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
class BackwardInputs:
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

    def balanced_only(self) -> BackwardInputs:
        """This step with the balanced tensors only (the Gram matrix's)."""
        pairs = [
            (t, r) for t, r in zip(self.tensors, self.roles, strict=True) if r is Role.BALANCED
        ]
        return replace(self, tensors=[t for t, _ in pairs], roles=[r for _, r in pairs])

    def reached_only(self, gradients: list) -> tuple[BackwardInputs, list]:
        """This step without the outside leaves that got no gradient (under FSDP, the unsharded
        parameters: FSDP takes their gradients itself), and the gradients without theirs."""
        keep = [
            i
            for i, (role, gradient) in enumerate(zip(self.roles, gradients, strict=True))
            if role is not Role.OUTSIDE or gradient is not None
        ]
        if len(keep) == len(gradients):
            return self, gradients
        inputs = replace(
            self, tensors=[self.tensors[i] for i in keep], roles=[self.roles[i] for i in keep]
        )
        return inputs, [gradients[i] for i in keep]

    def describe(self, index: int) -> str:
        tensor = self.tensors[index]
        where = (
            "a leaf outside the parameters" if self.roles[index] is Role.OUTSIDE else "a parameter"
        )
        return f"{where} of shape {tuple(tensor.shape)}"


def check_inputs(
    losses: LossesLike,
    params: ParamsLike,
    *,
    expected: Expected,
    bounds: Bounds,
    accumulate: bool,
    grad_scaler: torch.amp.GradScaler | None,
    representation: list[torch.Tensor] | None,
    refuse_plain_for: str | None,
) -> BackwardInputs:
    """The checked :class:`BackwardInputs` of one backward call.

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
        check_shared(items, representation, names)
    values = layout.average(stacked.detach().to(torch.float64, copy=True))
    scale = None
    if grad_scaler is not None and grad_scaler.is_enabled():
        # scale() of a tensor of ones: the scale on the device, without reading it back
        scale = grad_scaler.scale(torch.ones((), dtype=torch.float64, device=stacked.device))
    return BackwardInputs(
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
