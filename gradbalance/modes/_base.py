"""What every mode is, and the pieces modes share.

A mode turns the checked inputs of one backward (:class:`~gradbalance._inputs.BackwardInputs`) into
``.grad`` and tells the :class:`~gradbalance.Balancer` what π it used:
:meth:`BalancingMode.backward` returns an :class:`Outcome`, or None while micro-batches are held.
The balancer then keeps what the outcome says (π, the Gram matrix) where its verdict holds; the mode
keeps its own state itself (amortized mode's logits), under the same verdict.

Shared here: :func:`weighted_backward` (amortized and representation modes: one ordinary backward
of ``Σ_i c_i L_i``), :func:`log_loss_gram` (the Gram matrix of the log-loss gradients from the
rows' ``ρ_i ∇L_i``) and :class:`GramWeighting` (π from that Gram matrix, a user's weighting
checked).
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from .. import _engine as engine
from .._bounds import Bounds
from .._buffers import Role
from .._distributed import local
from .._guard import DeviceGuard, Ok, SyncGuard, both, losses_valid, poisoned
from .._inputs import BackwardInputs
from .._per_task import PerTaskGradients
from .._window import Held, Window, checked_values

if TYPE_CHECKING:
    from .._options import BalancingOptions


@dataclass(frozen=True, kw_only=True)
class Call:
    """One balanced backward, as a mode gets it."""

    inputs: BackwardInputs
    window: Window
    guard: SyncGuard | DeviceGuard
    per_task: PerTaskGradients
    retain_graph: bool
    calls: int  # balanced backward calls before this one
    representation: list[torch.Tensor] | None = None


@dataclass(frozen=True)
class Outcome:
    """What a balanced backward computed: π ``(k,)`` float64, the Gram matrix of the log-loss
    gradients ``(k, k)`` float64 (None where not computed), and the verdict on the step."""

    weights: torch.Tensor
    gram: torch.Tensor | None
    ok: Ok


class BalancingMode(abc.ABC):
    """A way to choose π and write ``Σ π_i g_i`` into ``.grad``; what it allows is its own
    (:meth:`from_options`).

    Attributes:
        names: the ``mode=`` names that select it.
        per_task: computes per-task gradients of the parameters, so that a ``"balance": False``
            group can stay out of its Gram matrix.
        wants_representation: ``backward(..., representation=)`` is required (else refused).
        name: the ``mode=`` it was made for. normalize: divide ``d`` by ``Σ_j π_j / D_j``
            (:func:`gradbalance.weighting.loss_coefficients`).
    """

    names: ClassVar[tuple[str, ...]]
    per_task: ClassVar[bool] = False
    wants_representation: ClassVar[bool] = False

    def __init__(self, name: str, normalize: bool) -> None:
        self.name = name
        self.normalize = normalize

    @classmethod
    @abc.abstractmethod
    def from_options(cls, name: str, options: BalancingOptions) -> BalancingMode:
        """The mode called ``name`` (one of :attr:`names`) with the options that concern it: the
        default of ``normalize``, and which options it takes.

        Raises:
            ValueError: an option this mode cannot take.
        """

    @abc.abstractmethod
    def backward(self, call: Call) -> Outcome | None:
        """Adds the balanced gradient into ``.grad`` (or holds the micro-batch). The balancer
        concludes the guard's verdict (:attr:`Outcome.ok`), once per balanced backward."""

    def update_weights(
        self,
        names: tuple[str, ...] | None,
        items: Sequence[torch.Tensor],
        bounds: Bounds,
        guard: SyncGuard | DeviceGuard,
    ) -> Ok:
        """FAMO's re-forward scheme; returns the verdict on the losses. Only amortized mode
        learns π from the losses: the others refuse it."""
        raise ValueError(f"update_weights is for mode='amortized', this one is {self.name!r}")

    def state_dict(self) -> dict[str, Any]:
        """The mode's own state (plain values) for the balancer's state dict."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:  # noqa: B027 (stateless by default)
        """Loads the entries of :meth:`state_dict` from the balancer's state dict."""

    def describe(self) -> str:
        """What ``repr`` adds after the mode's name."""
        return ""


class GramMode(BalancingMode):
    """A mode whose π comes from a Gram matrix of log-loss gradients (:class:`GramWeighting`)."""

    def __init__(self, name: str, weighting: GramWeighting, normalize: bool) -> None:
        super().__init__(name, normalize)
        self.weighting = weighting

    def describe(self) -> str:
        return f", weighting={self.weighting.source}" if self.weighting.custom else ""


def log_loss_gram(
    row_gram: torch.Tensor, rho: torch.Tensor, shifted_mean: torch.Tensor
) -> torch.Tensor:
    """``G_ij = f_i f_j R_ij`` with ``f_i = 1 / (ρ_i D̄_i)``: the Gram matrix of the log-loss
    gradients ``g_i = ∇̄L_i / D̄_i`` from the Gram matrix ``R`` of the rows ``r_i = ρ_i ∇̄L_i``,
    ``(k, k)`` float64 (docs/method.md, "Numerics").

    Args:
        row_gram: ``R``, ``(k, k)``. rho: ``ρ``, ``(k,)``. shifted_mean: ``D̄``, ``(k,)``, positive.
    """
    factors = 1 / (rho.to(torch.float64) * shifted_mean.to(torch.float64))
    return row_gram.to(torch.float64) * (factors[:, None] * factors[None, :])


def refuse_weighting(name: str, options: BalancingOptions) -> None:
    """Raises a ValueError when ``weighting=`` is given to a mode that has its own π."""
    if options.weighting is not None:
        raise ValueError(
            f"weighting= is for the modes exact and representation, which compute the Gram "
            f"matrix every step; {name} mode has its own π"
        )


class GramWeighting:
    """π from the Gram matrix: the mode's rule, or a user's ``weighting=``, whose output is
    checked (a real ``(k,)`` tensor; finite, and with ``normalize`` non-negative with a positive
    sum: else the step is refused).

    Args:
        rule: ``G (k, k) ↦ π (k,)``. custom: it is the user's.
    """

    @classmethod
    def chosen(
        cls, weighting: Callable[[torch.Tensor], torch.Tensor] | None, default: Callable
    ) -> GramWeighting:
        """The user's ``weighting`` when given, else the mode's ``default`` rule."""
        if weighting is None:
            return cls(default)
        return cls(weighting, custom=True)

    def __init__(
        self, rule: Callable[[torch.Tensor], torch.Tensor], *, custom: bool = False
    ) -> None:
        self.rule = rule
        self.custom = custom
        self.source = getattr(rule, "__qualname__", None) or type(rule).__name__

    def weights(
        self, gram: torch.Tensor, ok: Ok, guard: SyncGuard | DeviceGuard, normalize: bool
    ) -> tuple[torch.Tensor, Ok]:
        """π of the Gram matrix where the verdict holds, uniform where it does not (overflowed
        under a grad scaler: any finite π, the step is skipped); and the verdict on π."""
        uniform = torch.full((len(gram),), 1 / len(gram), dtype=torch.float64, device=gram.device)
        if ok is False:
            return uniform, True
        weights = self.rule(gram if ok is True else solvable(gram))
        valid: Ok = True
        if self.custom:
            weights = self._checked(weights, len(gram)).to(gram.device)
            valid = guard.check_weights(weights.to(torch.float64), self.source, normalize)
        weights = weights.to(torch.float64)
        return (weights if ok is True else torch.where(ok, weights, uniform)), valid

    def _checked(self, weights: object, k: int) -> torch.Tensor:
        """A user's π as a real ``(k,)`` tensor; raises ``TypeError`` or ``ValueError`` naming
        the weighting otherwise. Reads only metadata (no host synchronisation)."""
        if not isinstance(weights, torch.Tensor):
            raise TypeError(
                f"weighting {self.source} must return a tensor, got {type(weights).__name__}"
            )
        if weights.shape != (k,):
            raise ValueError(
                f"weighting {self.source} must return π of shape ({k},) for a ({k}, {k}) Gram "
                f"matrix, got {tuple(weights.shape)}"
            )
        if not weights.is_floating_point():
            raise ValueError(
                f"weighting {self.source} must return floating-point π, got {weights.dtype}"
            )
        return weights


def floats(tensor: torch.Tensor | None) -> list:
    """A tensor as plain float64 numbers for a state dict (``[]`` for None)."""
    return [] if tensor is None else tensor.detach().to("cpu", torch.float64).tolist()


def solvable(gram: torch.Tensor) -> torch.Tensor:
    """``gram``, or the identity when it is not finite (a step that is refused anyway), so that
    the solver can run without a host synchronisation."""
    identity = torch.eye(len(gram), dtype=gram.dtype, device=gram.device)
    return torch.where(gram.isfinite().all(), gram, identity)


def weighted_backward(call: Call, held: Held, coefficients: torch.Tensor) -> Ok | None:
    """Adds the gradient of ``Σ_i c_i L_i`` (``c = coefficients``, ``(k,)``) into ``.grad`` by
    one backward, through the window ``held`` belongs to. Returns the verdict on the step, or
    None while micro-batches are held."""
    inputs, window, guard = call.inputs, call.window, call.guard
    if inputs.scale is not None:
        coefficients = coefficients * inputs.scale
    if isinstance(guard, DeviceGuard):  # refused losses: a non-finite .grad
        values, bounds = checked_values(inputs, held)
        coefficients = poisoned(coefficients, losses_valid(values, bounds))
    grads = engine.weighted_gradient(
        inputs.losses,
        coefficients,
        inputs.tensors,
        retain_graph=call.retain_graph,
        by_backward=inputs.by_backward,
    )
    engine.require_dense(grads, inputs.describe)
    inputs, grads = inputs.reached_only(grads)
    if inputs.single and window.pending == 0:  # one batch, one process: straight into .grad
        ok = guard.check(
            inputs.values,
            inputs.min_losses,
            engine.all_finite(grads),
            inputs.names,
            allow_nonfinite=inputs.scaled,
        )
        written = engine.accumulate_grads(inputs.tensors, grads)
    else:
        flat = window.buffers(inputs, 1)
        blocks = [None if grad is None else local(grad)[None] for grad in grads]
        verdict = window.gather(inputs, held, flat, blocks, guard)
        if verdict is None:
            return None
        finite = inputs.layout.all_ranks(engine.all_finite(flat.task_buffers))
        ok = guard.check(
            held.mean, inputs.min_losses, finite, inputs.names, allow_nonfinite=inputs.scaled
        )
        ok = both(ok, verdict)
        one = torch.ones(1, dtype=torch.float64, device=inputs.values.device)
        written = flat.write_grad(dict.fromkeys(Role, one))
    engine.run_post_accumulate_grad_hooks(written)
    return ok
