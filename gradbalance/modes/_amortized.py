"""Amortized mode (FAMO, Liu et al. 2023): π from logits learned on the loss decrease.

The math is docs/method.md's, "Amortized mode". :class:`AmortizedMode` is the mode; below it, the
functional π update it runs.

No per-task gradients: π = softmax(w), and w is updated after each step so that the task whose
log-loss decreased least gets more weight. The state — the logits w ∈ R^k (initialised to 0,
π = 1/k) and the moments of the small Adam(W) that steps them — is an immutable
:class:`FamoState`; :func:`famo_update` returns a new one. Being functional lets the optimizer
compute the next state, validate the step, and only then keep it, with no snapshot to restore.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, Literal

import torch

from .. import _distributed as distributed
from .. import _engine as engine
from .._bounds import Bounds
from .._guard import DeviceGuard, Ok, SyncGuard, select
from ..weighting import loss_coefficients
from ._base import (
    BalancingMode,
    Call,
    Outcome,
    floats,
    log_loss_gram,
    refuse_weighting,
    weighted_backward,
)

if TYPE_CHECKING:
    from .._options import BalancingOptions

# Added to L − m before every logarithm, as in FAMO, so a loss that reaches its bound stays finite.
FAMO_EPSILON = 1e-8

PiOptimizer = Literal["adamw", "adam"]


def log_loss_decrease(
    previous: torch.Tensor, current: torch.Tensor, min_losses: torch.Tensor
) -> torch.Tensor:
    """``δ_i = log(L_prev,i − m_i + ε) − log(L_curr,i − m_i + ε)``, ``(k,)``."""
    return torch.log(previous - min_losses + FAMO_EPSILON) - torch.log(
        current - min_losses + FAMO_EPSILON
    )


def logit_gradient(logits: torch.Tensor, decrease: torch.Tensor) -> torch.Tensor:
    """The logits' gradient ``J_softmax(w)ᵀ δ``, ``(k,)``.

    ``(∇_w)_j = z_j (δ_j − Σ_i z_i δ_i)`` with ``z = softmax(w)``.
    """
    weights = torch.softmax(logits, dim=0)
    return weights * (decrease - (weights * decrease).sum())


@dataclass(frozen=True)
class FamoHyperparameters:
    """The π optimizer: ``"adamw"`` (decoupled weight decay, the paper) or ``"adam"`` (L2 decay
    added to the gradient, FAMO's code); identical when ``weight_decay == 0``."""

    lr: float = 0.025
    weight_decay: float = 0.01
    optimizer: PiOptimizer = "adamw"
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8

    def __post_init__(self) -> None:
        check_pi_optimizer(self.lr, self.weight_decay, self.optimizer)


def check_pi_optimizer(lr: float, weight_decay: float, optimizer: str) -> None:
    """Raises a ValueError for settings of the π optimizer it cannot run."""
    if optimizer not in ("adamw", "adam"):
        raise ValueError(f"pi_optimizer must be 'adamw' or 'adam', got {optimizer!r}")
    if not lr >= 0 or not weight_decay >= 0:
        raise ValueError(f"pi_lr and pi_weight_decay must be ≥ 0, got {lr} and {weight_decay}")


@dataclass(frozen=True)
class FamoState:
    """Logits w ``(k,)``, the last logit gradient, Adam moments ``(k,)`` and the step count."""

    logits: torch.Tensor
    grad: torch.Tensor
    exp_avg: torch.Tensor
    exp_avg_sq: torch.Tensor
    step: int | torch.Tensor = 0  # a float64 0-d tensor once selected on the device

    @classmethod
    def initial(cls, num_tasks: int, device: torch.device, dtype: torch.dtype) -> FamoState:
        zeros = torch.zeros(num_tasks, device=device, dtype=dtype)
        return cls(zeros, zeros, zeros, zeros)

    @property
    def weights(self) -> torch.Tensor:
        """π = softmax(w), ``(k,)``."""
        return torch.softmax(self.logits, dim=0)

    def to(self, device: torch.device, dtype: torch.dtype) -> FamoState:
        """The same state on ``device`` in ``dtype``."""
        if self.logits.device == device and self.logits.dtype == dtype:
            return self
        tensors = {name: getattr(self, name).to(device, dtype) for name in _TENSORS}
        return replace(self, **tensors)

    def where(self, ok: torch.Tensor, other: FamoState) -> FamoState:
        """This state where the 0-d bool ``ok`` holds, else ``other``, on the device (the step
        count becomes a float64 tensor: no host synchronisation)."""
        tensors = {
            name: torch.where(ok, getattr(self, name), getattr(other, name).to(getattr(self, name)))
            for name in _TENSORS
        }
        new, old = (_step_on(state.step, ok.device) for state in (self, other))
        return replace(self, **tensors, step=torch.where(ok, new, old))

    def state_dict(self) -> dict[str, Any]:
        """Plain Python numbers (float64 holds float32 and float16 values exactly)."""
        state = {name: getattr(self, name).tolist() for name in _TENSORS}
        return {**state, "step": int(self.step)}

    @staticmethod
    def empty_state_dict() -> dict[str, Any]:
        """The :meth:`state_dict` layout with no state yet (no k known)."""
        return {**{name: [] for name in _TENSORS}, "step": 0}

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> FamoState:
        """The state of :meth:`state_dict`, as float64 CPU tensors (:meth:`to` moves it)."""
        tensors = {name: torch.tensor(state[name], dtype=torch.float64) for name in _TENSORS}
        return cls(**tensors, step=int(state["step"]))


_TENSORS = ("logits", "grad", "exp_avg", "exp_avg_sq")


def _step_on(step: int | torch.Tensor, device: torch.device) -> torch.Tensor:
    """The step count as a float64 0-d tensor on ``device``, made there (no copy from the host)."""
    if isinstance(step, torch.Tensor):
        return step.to(device, torch.float64)
    return torch.full((), step, dtype=torch.float64, device=device)


def famo_update(
    state: FamoState,
    previous: torch.Tensor,
    current: torch.Tensor,
    min_losses: torch.Tensor,
    hyper: FamoHyperparameters,
) -> FamoState:
    """One π-optimizer step from the losses before (``previous``) and after (``current``) a step.

    Pure: returns the new state. The step is torch's Adam/AdamW on w with gradient
    ``J_softmax(w)ᵀ δ`` (:func:`logit_gradient`): bias-corrected moments, ``eps`` added to the
    corrected square root, weight decay decoupled (``"adamw"``) or added to the gradient
    (``"adam"``).
    """
    decrease = log_loss_decrease(previous, current, min_losses).to(state.logits.dtype)
    grad = logit_gradient(state.logits, decrease)
    logits = state.logits
    if hyper.optimizer == "adamw":
        logits = logits * (1 - hyper.lr * hyper.weight_decay)
        update_grad = grad
    else:
        update_grad = grad + hyper.weight_decay * state.logits
    beta1, beta2 = hyper.betas
    step = state.step + 1
    exp_avg = torch.lerp(state.exp_avg, update_grad, 1 - beta1)
    exp_avg_sq = beta2 * state.exp_avg_sq + (1 - beta2) * update_grad.square()
    bias = 1 - beta2**step
    root = math.sqrt(bias) if isinstance(bias, float) else bias.sqrt()  # a tensor on the device
    denominator = exp_avg_sq.sqrt() / root + hyper.eps
    logits = logits - (hyper.lr / (1 - beta1**step)) * (exp_avg / denominator)
    return FamoState(logits, grad, exp_avg, exp_avg_sq, step)


class AmortizedMode(BalancingMode):
    """``"amortized"`` (FAMO): one ordinary backward of the π-weighted sum; π = softmax(w), the
    logits w stepped by a small Adam(W) (:class:`FamoHyperparameters`) from how much each
    log-loss decreased between consecutive balanced backward calls; or by :meth:`update_weights`
    after the optimizer's step, with the losses re-measured on the same batch (FAMO's own scheme).

    One batch: π is updated from the decrease to its losses, then weights them. A window of
    micro-batches has one π, the one it opened with; on its last micro-batch the logits learn from
    the decrease to the window's mean losses, for the next window. (So a window weights its
    gradients with the π of one step earlier than one batch of all its micro-batches would.)

    Its state: the logits and their moments (:class:`FamoState`), and the losses of the last
    balanced backward, whose decrease the next update measures.

    Args:
        hyper: the π optimizer. normalize: see :class:`~gradbalance.modes._base.BalancingMode`.
        stats_every: also compute the per-task gradient statistics every ``stats_every``-th
            backward (0: never). Observational: they cannot change the trajectory; under
            torch.distributed they are each rank's own.
    """

    names = ("amortized",)

    def __init__(self, hyper: FamoHyperparameters, normalize: bool, stats_every: int) -> None:
        super().__init__("amortized", normalize)
        self.hyper = hyper
        self.stats_every = stats_every
        self.famo: FamoState | None = None
        self.previous_losses: torch.Tensor | None = None

    @classmethod
    def from_options(cls, name: str, options: BalancingOptions) -> AmortizedMode:
        """Has its own π (no ``weighting=``); normalises by default (FAMO's scaling); the only
        mode that reads ``stats_every`` and the π optimizer's settings."""
        refuse_weighting(name, options)
        hyper = FamoHyperparameters(options.pi_lr, options.pi_weight_decay, options.pi_optimizer)
        normalize = True if options.normalize is None else options.normalize
        return cls(hyper, normalize, options.stats_every)

    def backward(self, call: Call) -> Outcome | None:
        inputs, window = call.inputs, call.window
        famo = self._current(len(inputs.losses), inputs.tensors[0])
        single = window.pending == 0 and not inputs.accumulate
        if single:
            famo = self._advanced(famo, inputs.values, inputs.min_losses)
        opening = window.held is None
        weights = famo.weights.to(torch.float64) if opening else window.held.weights
        held = window.including(inputs, weights=weights)
        coefficients = loss_coefficients(
            weights, inputs.shifted + FAMO_EPSILON, normalize=self.normalize
        )
        gram = self._statistics(call)
        ok = weighted_backward(call, held, coefficients)
        if ok is None:
            return None
        if not single:
            famo = self._advanced(famo, held.mean, inputs.min_losses)
        self._commit(famo, held.mean, ok)
        return Outcome(weights, gram, ok)

    def update_weights(
        self,
        names: tuple[str, ...] | None,
        items: Sequence[torch.Tensor],
        bounds: Bounds,
        guard: SyncGuard | DeviceGuard,
    ) -> Ok:
        """Steps the logits by the decrease from the losses of the last balanced backward to
        ``items``, the same batch's losses re-measured after the optimizer's step."""
        if self.previous_losses is None:
            raise ValueError("update_weights needs a backward() since the last update")
        famo = self.famo
        min_losses = bounds.on(len(items), famo.logits.device)
        values = torch.stack([item.detach().reshape(()).to(torch.float64) for item in items])
        values = distributed.Layout(distributed.default_group(), False).average(
            values.to(min_losses.device)
        )
        ok = guard.check(values, min_losses, values.isfinite().all(), names)
        self._commit(self._advanced(famo, values, min_losses), None, ok)
        return ok

    def _statistics(self, call: Call) -> torch.Tensor | None:
        """The Gram matrix of the log-loss gradients on every ``stats_every``-th call, else None."""
        if not self.stats_every or call.calls % self.stats_every:
            return None
        inputs = call.inputs
        balanced = inputs.balanced_only()
        rho = inputs.rho.to(inputs.losses.dtype)
        blocks = call.per_task.blocks(inputs, balanced.tensors, rho, retain_graph=True)
        engine.require_dense(blocks, balanced.describe)
        return log_loss_gram(engine.gram_matrix(blocks), rho, inputs.shifted)

    def _current(self, num_losses: int, like: torch.Tensor) -> FamoState:
        """The state on ``like``'s device (a fresh one before the first balanced backward)."""
        dtype = torch.promote_types(like.real.dtype, torch.float32)  # complex: its real dtype
        if self.famo is None:
            return FamoState.initial(num_losses, like.device, dtype)
        return self.famo.to(like.device, dtype)

    def _advanced(
        self, famo: FamoState, current: torch.Tensor, min_losses: torch.Tensor
    ) -> FamoState:
        """The state after learning from the decrease since the last balanced backward (pure)."""
        if self.previous_losses is None:
            return famo
        previous = self.previous_losses.to(current.device)
        return famo_update(famo, previous, current, min_losses, self.hyper)

    def _commit(self, famo: FamoState, losses: torch.Tensor | None, ok: Ok) -> None:
        """Keeps the new state where the verdict ``ok`` holds."""
        if ok is False:
            return
        if ok is not True and self.famo is not None:
            famo = famo.where(ok, self.famo)
        previous = self.previous_losses
        self.famo = famo
        self.previous_losses = losses if losses is None else select(ok, losses, previous)

    def state_dict(self) -> dict[str, Any]:
        famo = self.famo
        return {
            "famo": FamoState.empty_state_dict() if famo is None else famo.state_dict(),
            "previous_losses": floats(self.previous_losses),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        famo = state["famo"]
        self.famo = FamoState.from_state_dict(famo) if famo["logits"] else None
        previous = state["previous_losses"]
        self.previous_losses = torch.tensor(previous, dtype=torch.float64) if previous else None
