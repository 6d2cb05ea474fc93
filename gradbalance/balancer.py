"""One balanced backward — losses → per-task gradients → π → ``.grad`` — and the state it keeps.

:class:`Balancer` is the algorithm behind :class:`gradbalance.MultiObjectiveOptimizer`, which adds
the torch.optim side (param groups, the base optimizer, state dicts). Every call validates first
and changes state last, so a call that raises changes nothing.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import torch

from . import distributed, engine
from ._inputs import (
    LossesLike,
    as_min_losses,
    describe_invalid_gram,
    describe_invalid_losses,
    stack_losses,
)
from .amortized import FAMO_EPSILON, FamoHyperparameters, FamoState, famo_update
from .diagnostics import gradient_statistics
from .weighting import affine_weights, loss_coefficients, min_norm_weights

__all__ = ["Balancer", "Mode"]

Mode = Literal["exact", "amortized", "affine"]
_GRAM_WEIGHTINGS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "exact": min_norm_weights,
    "affine": affine_weights,
}


@dataclass(frozen=True)
class _Window:
    """Micro-batches accumulated since the last balanced backward: their loss sum and count."""

    loss_sum: torch.Tensor  # (k,) float64, averaged over ranks
    count: int

    def add(self, values: torch.Tensor) -> _Window:
        return _Window(self.loss_sum + values, self.count + 1)

    @property
    def mean(self) -> torch.Tensor:
        return self.loss_sum if self.count == 1 else self.loss_sum / self.count


@dataclass(frozen=True)
class _Step:
    """One backward call's inputs: the (possibly scaled) losses and their unscaled values."""

    losses: torch.Tensor  # (k,), with graph; multiplied by the grad scaler's scale if any
    values: torch.Tensor  # (k,) float64, unscaled, averaged over the ranks
    min_losses: torch.Tensor  # (k,) float64
    scale: torch.Tensor | None  # the grad scaler's scale, 0-d
    accumulate: bool
    layout: distributed.Layout

    @property
    def scaled(self) -> bool:
        return self.scale is not None


class Balancer:
    """The balancing of k losses: π, the balanced gradient in ``.grad``, the state between calls.

    Args:
        mode: ``"exact"``, ``"amortized"`` or ``"affine"`` (see
            :class:`gradbalance.MultiObjectiveOptimizer`).
        normalize: whether the direction is divided by ``Σ_j π_j / (L_j − m_j)``.
        min_losses: the bounds m (None: zeros); its length fixes k.
        famo_hyper: the π optimizer of amortized mode.
        stats_every: amortized mode's statistics period (0: never).
    """

    def __init__(
        self,
        mode: Mode,
        normalize: bool,
        min_losses: Any,
        famo_hyper: FamoHyperparameters,
        stats_every: int,
    ) -> None:
        self.mode = mode
        self.normalize = normalize
        self.famo_hyper = famo_hyper
        self.stats_every = stats_every
        self.min_losses_arg = min_losses
        self.num_losses: int | None = None
        if min_losses is not None:
            count = torch.as_tensor(min_losses).numel()
            as_min_losses(min_losses, count, torch.device("cpu"))  # validates now
            self.num_losses = count
        self.min_losses: torch.Tensor | None = None
        self.famo: FamoState | None = None
        self.previous_losses: torch.Tensor | None = None
        self.backward_calls = 0
        self.vectorize: bool | None = None  # None: not tried yet
        self.flat: engine.FlatGradients | None = None
        self.flat_key: tuple = ()
        self.window: _Window | None = None
        self.weights: torch.Tensor | None = None
        self.stats: dict[str, torch.Tensor] = {}

    def backward(
        self,
        losses: LossesLike,
        params: list[torch.Tensor],
        balanced: list[bool],
        *,
        accumulate: bool,
        retain_graph: bool,
        grad_scaler: torch.amp.GradScaler | None,
    ) -> None:
        """See :meth:`gradbalance.MultiObjectiveOptimizer.backward`; ``balanced`` says, per
        parameter, whether it enters the Gram matrix."""
        losses = stack_losses(losses)
        if not losses.requires_grad:
            raise ValueError(
                "none of the losses requires grad: were they computed under torch.no_grad()?"
            )
        if self.mode == "amortized" and not all(balanced):
            raise ValueError(
                "'balance': False is for the exact and affine modes: amortized mode computes no "
                "per-task gradients, so there is nothing to leave out"
            )
        if not any(balanced):
            raise ValueError("every param group has 'balance': False; nothing to balance")
        min_losses, famo = self._balancing_state_for(len(losses), params[0])
        layout = distributed.Layout.of(params)
        values = layout.average(losses.detach().to(torch.float64, copy=True))
        scale = None
        if grad_scaler is not None and grad_scaler.is_enabled():
            scale = grad_scaler.scale(torch.ones((), dtype=torch.float64, device=losses.device))
            losses = grad_scaler.scale(losses)
        step = _Step(losses, values, min_losses, scale, accumulate, layout)
        if self.mode == "amortized":
            self._amortized_backward(step, params, famo, retain_graph)
        else:
            self._exact_backward(step, params, balanced, retain_graph)

    def update_weights(self, losses: LossesLike, params: list[torch.Tensor]) -> None:
        """See :meth:`gradbalance.MultiObjectiveOptimizer.update_weights`."""
        if self.mode != "amortized":
            raise ValueError(
                f"update_weights is for mode='amortized', this optimizer is {self.mode!r}"
            )
        if self.previous_losses is None:
            raise ValueError("update_weights needs a backward() since the last update")
        values = stack_losses(losses).detach().to(torch.float64)
        if len(values) != self.num_losses:
            raise ValueError(f"expected {self.num_losses} losses, got {len(values)}")
        values = distributed.Layout.of(params).average(values.to(params[0].device))
        self._raise_if_invalid(values, self.min_losses, torch.tensor(True), None)
        self.famo = famo_update(
            self.famo, self.previous_losses, values, self.min_losses, self.famo_hyper
        )
        self.previous_losses = None

    # -- exact and affine modes ------------------------------------------------------------------

    def _exact_backward(
        self, step: _Step, params: list[torch.Tensor], balanced: list[bool], retain_graph: bool
    ) -> None:
        blocks = self._task_gradients(step, params, retain_graph)
        flat = self._flat_gradients(params, balanced, len(step.losses))
        window = self._gather(step, _extend(self.window, step.values), flat, blocks)
        if window is None:
            return
        shifted = window.mean - step.min_losses
        gram = step.layout.global_gram(flat.gram()) / (shifted[:, None] * shifted[None, :])
        if step.scale is not None:
            gram = gram / step.scale.square()
        finite = self._raise_if_invalid(
            window.mean, step.min_losses, gram.isfinite().all(), gram, step.scaled
        )
        weights = _GRAM_WEIGHTINGS[self.mode](gram)
        flat.write_grad(
            loss_coefficients(weights, shifted, normalize=self.normalize),
            loss_coefficients(torch.ones_like(weights), shifted, normalize=self.normalize),
        )
        if finite:
            self._commit(step, weights, gram)

    def _task_gradients(
        self, step: _Step, params: list[torch.Tensor], retain_graph: bool
    ) -> engine.Blocks:
        """Per-task gradient blocks: one vmapped backward, else k backward passes (sharded
        parameters, or operators vmap cannot batch)."""
        losses = step.losses
        if step.layout.sharded:
            passes = engine.backward_gradients(list(losses), params, retain_graph=retain_graph)
            return engine.stack_tasks(passes, params)
        if self.vectorize is not False:
            try:
                blocks = engine.task_gradients(
                    losses,
                    params,
                    vectorize=True,
                    # The first try keeps the graph so that the fallback can still run on it.
                    retain_graph=retain_graph or self.vectorize is None,
                )
            except RuntimeError as error:
                if self.vectorize:
                    raise
                warnings.warn(
                    f"the vectorised per-task backward failed ({error}); using "
                    f"{len(losses)} sequential backward passes from now on",
                    stacklevel=4,
                )
                self.vectorize = False
            else:
                self.vectorize = True
                return blocks
        return engine.task_gradients(losses, params, vectorize=False, retain_graph=retain_graph)

    def _flat_gradients(
        self, params: list[torch.Tensor], balanced: list[bool], num_losses: int
    ) -> engine.FlatGradients:
        """The flat buffers for these parameters, rebuilt only when the parameters change."""
        key = (num_losses, *((id(p), b) for p, b in zip(params, balanced, strict=True)))
        if key != self.flat_key:
            if self.window is not None:
                raise ValueError(
                    "the trainable parameters changed between accumulated micro-batches"
                )
            self.flat = engine.FlatGradients(params, balanced, num_losses)
            self.flat_key = key
        return self.flat

    # -- amortized mode --------------------------------------------------------------------------

    def _amortized_backward(
        self, step: _Step, params: list[torch.Tensor], famo: FamoState, retain_graph: bool
    ) -> None:
        window = _extend(self.window, step.values)
        if not step.accumulate and self.previous_losses is not None:
            famo = famo_update(
                famo, self.previous_losses, window.mean, step.min_losses, self.famo_hyper
            )
        weights = famo.weights.to(torch.float64)
        coefficients = loss_coefficients(
            weights, step.values - step.min_losses + FAMO_EPSILON, normalize=self.normalize
        )
        gram = self._amortized_statistics(step, params)
        grads = engine.weighted_gradient(
            step.losses,
            coefficients,
            params,
            retain_graph=retain_graph,
            by_backward=step.layout.sharded,
        )
        if step.accumulate or self.window is not None or step.layout.group is not None:
            finite = self._amortized_through_buffer(step, window, params, grads, gram)
        else:  # one batch, one process: straight into .grad
            finite = self._raise_if_invalid(
                step.values, step.min_losses, engine.all_finite(grads), gram, step.scaled
            )
            engine.accumulate_grad(params, grads)
        if finite and not step.accumulate:
            self.famo = famo
            self.previous_losses = window.mean
            self._commit(step, weights, gram)

    def _amortized_through_buffer(
        self,
        step: _Step,
        window: _Window,
        params: list[torch.Tensor],
        grads: list[torch.Tensor | None],
        gram: torch.Tensor | None,
    ) -> bool:
        """Micro-batches and ranks: the weighted gradients are summed in flat ``(1, n)`` buffers
        and averaged over micro-batches and ranks before they reach ``.grad``. Returns whether
        the gradients are finite (always True for a held micro-batch)."""
        flat = self._flat_gradients(params, [True] * len(params), 1)
        blocks = [None if grad is None else distributed.local(grad)[None] for grad in grads]
        if self._gather(step, window, flat, blocks) is None:
            return True
        finite = step.layout.all_ranks(engine.all_finite(flat.task_buffers))
        finite = self._raise_if_invalid(window.mean, step.min_losses, finite, gram, step.scaled)
        one = torch.ones(1, dtype=torch.float64, device=flat.task_buffers[0].device)
        flat.write_grad(one, one)
        return finite

    def _amortized_statistics(self, step: _Step, params: list[torch.Tensor]) -> torch.Tensor | None:
        """The Gram matrix of the log-loss gradients on every ``stats_every``-th call, else None.

        Observational: the update is always the one weighted backward, so statistics cannot change
        the trajectory. Under torch.distributed they are each rank's own.
        """
        if not self.stats_every or self.backward_calls % self.stats_every:
            return None
        blocks = self._task_gradients(step, params, retain_graph=True)
        shifted = step.values - step.min_losses
        gram = engine.gram_matrix(blocks) / (shifted[:, None] * shifted[None, :])
        return gram if step.scale is None else gram / step.scale.square()

    # -- shared pieces ---------------------------------------------------------------------------

    def _balancing_state_for(
        self, num_losses: int, like: torch.Tensor
    ) -> tuple[torch.Tensor, FamoState | None]:
        """The bounds m and the FAMO state for k losses, created on first use (and kept only
        once a backward succeeds)."""
        if self.num_losses is not None and num_losses != self.num_losses:
            raise ValueError(
                f"expected {self.num_losses} losses as in earlier steps, got {num_losses}"
            )
        if self.min_losses is None:
            return self.initial_state(num_losses, like)
        return self.min_losses, self.famo

    def initial_state(
        self, num_losses: int, like: torch.Tensor
    ) -> tuple[torch.Tensor, FamoState | None]:
        """Bounds m and a fresh FAMO state for k losses, on ``like``'s device."""
        min_losses = as_min_losses(self.min_losses_arg, num_losses, like.device)
        famo = None
        if self.mode == "amortized":
            dtype = torch.promote_types(like.dtype, torch.float32)
            famo = FamoState.initial(num_losses, like.device, dtype)
        return min_losses, famo

    def _gather(
        self, step: _Step, window: _Window, flat: engine.FlatGradients, blocks: engine.Blocks
    ) -> _Window | None:
        """Adds this micro-batch's blocks to ``flat``; ``window`` is the accumulation window with
        it. Returns the window once it is complete — ``flat`` then holds its means over
        micro-batches and ranks — or None while micro-batches are held.

        A micro-batch that joins or opens a window is checked first (one host synchronisation),
        so that a bad one cannot spoil those held: its losses and gradients must be finite, and
        on the last micro-batch the mean losses must be above their bounds.
        """
        if step.accumulate or self.window is not None:
            finite = step.layout.all_ranks(engine.all_finite(blocks))  # every rank: one branch
            if step.accumulate:
                values, bounds = step.values, torch.full_like(step.values, -torch.inf)
            else:
                values, bounds = window.mean, step.min_losses
            self._raise_if_invalid(values, bounds, finite, None, step.scaled)
        flat.store(blocks, accumulate=self.window is not None)
        if step.accumulate:
            self.window = window
            return None
        self.window = None  # the micro-batches are consumed from here on
        _average(flat, window.count, step.layout)
        return window

    def _raise_if_invalid(
        self,
        values: torch.Tensor,
        bounds: torch.Tensor,
        gradients_finite: torch.Tensor,
        gram: torch.Tensor | None,
        allow_nonfinite: bool = False,
    ) -> bool:
        """Whether the gradients are finite; raises on invalid losses, and on non-finite gradients
        unless ``allow_nonfinite``. One host synchronisation; messages are built only on failure.
        """
        losses_valid = (values.isfinite() & (values > bounds)).all()
        checks = torch.stack([losses_valid, gradients_finite.to(losses_valid.device)]).tolist()
        if all(checks):
            return True
        message = describe_invalid_losses(values, bounds)
        if message is not None:
            raise ValueError(message)
        if allow_nonfinite:
            return False
        raise ValueError(
            describe_invalid_gram(gram)
            if gram is not None
            else "non-finite gradients; nothing was changed"
        )

    def _commit(self, step: _Step, weights: torch.Tensor, gram: torch.Tensor | None) -> None:
        """Keeps what a successful backward computed."""
        self.min_losses = step.min_losses
        self.num_losses = len(weights)
        self.backward_calls += 1
        self.weights = weights
        self.stats = {"weights": weights}
        if gram is not None:
            self.stats.update(gradient_statistics(gram))

    # -- state dict ------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        return {
            "mode": self.mode,
            "num_losses": self.num_losses,
            "famo": None if self.famo is None else self.famo.state_dict(),
            "previous_losses": self.previous_losses,
            "backward_calls": self.backward_calls,
        }

    def check_compatible(self, state: dict[str, Any]) -> None:
        if state["mode"] != self.mode:
            raise ValueError(
                f"the state dict was saved in mode {state['mode']!r}, this optimizer runs in "
                f"mode {self.mode!r}"
            )
        saved_k = state["num_losses"]
        if None not in (saved_k, self.num_losses) and saved_k != self.num_losses:
            raise ValueError(
                f"the state dict balances {saved_k} losses, this optimizer {self.num_losses}"
            )

    def load_state_dict(self, state: dict[str, Any], like: torch.Tensor) -> None:
        """Loads a :meth:`state_dict` (checked by :meth:`check_compatible`) onto ``like``'s
        device."""
        self.num_losses = state["num_losses"]
        self.min_losses = self.famo = None
        if self.num_losses is not None:
            self.min_losses, self.famo = self.initial_state(self.num_losses, like)
        if state["famo"] is not None:
            self.famo = self.famo.load(state["famo"])
        previous = state["previous_losses"]
        self.previous_losses = None if previous is None else previous.to(like.device).clone()
        self.backward_calls = state["backward_calls"]


def _extend(window: _Window | None, values: torch.Tensor) -> _Window:
    return _Window(values, 1) if window is None else window.add(values)


def _average(flat: engine.FlatGradients, count: int, layout: distributed.Layout) -> None:
    """Turns the sums over ``count`` micro-batches into means over micro-batches and ranks, and
    marks a parameter reached when some rank reached it (so every rank writes the same .grad)."""
    for buffer in flat.task_buffers:
        if count > 1:
            buffer.div_(count)
        layout.average_gradients(buffer)
    if layout.group is not None:
        reached = torch.tensor(flat.reached, device=flat.task_buffers[0].device)
        flat.reached = layout.any_rank(reached).tolist()
