"""``MultiObjectiveOptimizer``: a torch.optim optimizer balancing k losses at the gradient level.

It wires the pieces together and adds nothing of its own to the math::

    losses ─▶ per-task gradients (engine) ─▶ flat buffers, averaged over ranks (engine, distributed)
           ─▶ Gram (kernels) ─▶ π (weighting / amortized) ─▶ coefficients on ∇L_i (weighting)
           ─▶ combined gradient in .grad (engine, kernels) ─▶ base.step()

Every call validates first and changes state last, so a call that raises changes nothing.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch.optim import Optimizer
from torch.optim.optimizer import _default_to_fused_or_foreach

from . import distributed, engine
from ._inputs import (
    LossesLike,
    as_min_losses,
    describe_invalid_gram,
    describe_invalid_losses,
    stack_losses,
)
from .amortized import FAMO_EPSILON, FamoHyperparameters, FamoState, PiOptimizer, famo_update
from .diagnostics import gradient_statistics
from .weighting import affine_weights, loss_coefficients, min_norm_weights

__all__ = ["MultiObjectiveOptimizer"]

Mode = Literal["exact", "amortized", "affine"]
_GRAM_WEIGHTINGS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "exact": min_norm_weights,
    "affine": affine_weights,
}
_STATE_KEY = "gradbalance"
# Base optimizers that get torch's fused kernel by default (a 1.6 M parameter AdamW step on a
# 2-core CPU: 0.21x the time of torch's default single-tensor loop; see docs/performance.md).
_FUSED_BY_DEFAULT = (torch.optim.AdamW, torch.optim.Adam)


@dataclass(frozen=True)
class _Window:
    """Micro-batches accumulated since the last balanced backward: their loss sum and count."""

    loss_sum: torch.Tensor  # (k,) float64, averaged over ranks
    count: int

    def add(self, values: torch.Tensor) -> _Window:
        return _Window(self.loss_sum + values, self.count + 1)

    @property
    def mean(self) -> torch.Tensor:
        return self.loss_sum / self.count


class MultiObjectiveOptimizer(Optimizer):
    r"""Balances k losses every step and hands the balanced gradient to a base optimizer.

    The objectives are the log-losses ``log(L_i − m_i)``; their gradients are
    ``g_i = ∇L_i / (L_i − m_i)``. Each :meth:`backward` chooses weights π on the simplex and
    writes the direction ``d = Σ_i π_i g_i`` into ``.grad``; :meth:`step` runs the base optimizer.

    Modes:

    * ``"exact"`` (MoKD eq. 9, MGDA): per-task gradients from one vectorised backward, laid out in
      one flat ``(k, n)`` buffer, their Gram matrix accumulated in float64, and
      ``π = argmin_{π ∈ Δ} ‖Σ π_i g_i‖²`` solved exactly
      (:func:`gradbalance.weighting.min_norm_weights`). ``d`` never conflicts with any objective:
      ``⟨d, g_i⟩ ≥ ‖d‖² ≥ 0``.
    * ``"amortized"`` (FAMO): one ordinary backward of the π-weighted sum; π = softmax(w), the
      logits w stepped by a small Adam(W) (``pi_lr``, ``pi_weight_decay``, ``pi_optimizer``) from
      how much each log-loss decreased. By default the decrease is measured between consecutive
      balanced :meth:`backward` calls (no extra pass); call :meth:`update_weights` after
      :meth:`step` with the losses re-measured on the same batch to use FAMO's own scheme instead.
    * ``"affine"``: the paper's Theorem 3.1 without π ≥ 0, for reproducing the paper only — it
      stops training when the objectives agree (see :func:`gradbalance.weighting.affine_weights`).

    It is a :class:`torch.optim.Optimizer`: ``param_groups`` and ``state`` are the base optimizer's,
    so learning-rate schedulers, ``add_param_group`` and ``zero_grad`` work as usual, and
    ``state_dict()`` holds the base state plus the balancing state under ``"gradbalance"``. A
    param group with ``"balance": False`` (exact and affine modes) is left out of the Gram matrix:
    π comes from the other groups (e.g. the shared backbone) and its parameters get the plain sum
    of the objectives (π_i = 1).

    Under ``torch.distributed`` (a process group initialised with more than one rank) the loss
    values and gradients are averaged over the ranks before π is computed, so every rank computes
    the same π and the step equals one process on the global batch (see docs/integrations.md).

    Bad input raises :class:`ValueError` naming the loss and its value, before anything changes:
    no ``.grad``, parameter, moment or π is touched. Invalid input is a non-scalar or non-tensor
    loss, fewer than two losses, a different number of losses than before, a loss that is NaN,
    infinite or not above its ``min_loss``, and non-finite gradients (raised rather than skipped, so
    that a NaN never reaches the weights silently — except with a ``grad_scaler``, whose step
    skips them). Checking costs one host synchronisation per :meth:`backward`.

    Args:
        params: an iterable of tensors or of param-group dicts, as for any torch optimizer; or an
            already constructed optimizer to wrap (then ``base_kwargs`` must be empty).
        base: the optimizer class that takes the step (default :class:`torch.optim.AdamW`).
        mode: ``"exact"``, ``"amortized"`` or ``"affine"``.
        min_losses: lower bounds ``m_i`` of the losses (default 0), so that losses that can be
            negative work; its length fixes k.
        normalize: divide ``d`` by ``Σ_j π_j / (L_j − m_j)``, which makes the update a convex
            combination of the raw gradients ``∇L_i`` (FAMO's scaling). Default: True in amortized
            mode (SPEC §3), False otherwise (the paper's step ``θ ← θ − η d``). Not allowed in
            affine mode, whose π can be negative.
        pi_lr: learning rate of the optimizer of the logits in amortized mode (the paper's 0.025).
        pi_weight_decay: its weight decay (the paper's 0.01).
        pi_optimizer: ``"adamw"`` (the paper) or ``"adam"`` (L2 weight decay, FAMO's code).
        stats_every: in amortized mode, also compute the per-task gradient statistics every
            ``stats_every``-th backward (costs the per-task backward on those calls; 0 = never).
            Exact and affine modes compute them on every call anyway.
        **base_kwargs: passed to ``base`` (``lr``, ``weight_decay``, ``betas``, ``fused``, …).

    Example::

        opt = MultiObjectiveOptimizer(model.parameters(), lr=1e-3, weight_decay=0.05)
        for x, y in loader:
            opt.zero_grad()
            student_logits, features = model(x)
            opt.backward([distill_loss(student_logits, features), task_loss(student_logits, y)])
            opt.step()
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]] | Optimizer,
        base: type[Optimizer] = torch.optim.AdamW,
        *,
        mode: Mode = "exact",
        min_losses: Sequence[float] | torch.Tensor | None = None,
        normalize: bool | None = None,
        pi_lr: float = 0.025,
        pi_weight_decay: float = 0.01,
        pi_optimizer: PiOptimizer = "adamw",
        stats_every: int = 0,
        **base_kwargs: Any,
    ) -> None:
        if mode not in ("exact", "amortized", "affine"):
            raise ValueError(f"mode must be 'exact', 'amortized' or 'affine', got {mode!r}")
        normalize = mode == "amortized" if normalize is None else normalize
        if normalize and mode == "affine":
            raise ValueError("normalize=True needs non-negative weights; affine mode has none")
        if stats_every < 0:
            raise ValueError(f"stats_every must be ≥ 0, got {stats_every}")
        self._famo_hyper = FamoHyperparameters(pi_lr, pi_weight_decay, pi_optimizer)
        self.base = _build_base(params, base, base_kwargs)
        self.mode: Mode = mode
        self.normalize = normalize
        self.stats_every = stats_every
        self._min_losses_arg = min_losses
        self._num_losses: int | None = None
        self._min_losses: torch.Tensor | None = None
        self._famo: FamoState | None = None
        self._previous_losses: torch.Tensor | None = None
        self._backward_calls = 0
        self._vectorize: bool | None = None  # None: not tried yet
        self._flat: engine.FlatGradients | None = None
        self._flat_key: tuple = ()
        self._window: _Window | None = None
        self.weights: torch.Tensor | None = None
        self.stats: dict[str, torch.Tensor] = {}
        super().__init__(self.base.param_groups, self.base.defaults)
        self.param_groups = self.base.param_groups
        self.state = self.base.state
        if min_losses is not None:
            as_min_losses(min_losses, torch.as_tensor(min_losses).numel(), torch.device("cpu"))
            self._num_losses = torch.as_tensor(min_losses).numel()

    # -- torch.optim.Optimizer interface ---------------------------------------------------------

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        # Optimizer.__init__ passes the base's own groups back in: they are registered already.
        if any(param_group is group for group in self.base.param_groups):
            return
        self.base.add_param_group(param_group)

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Zeroes ``.grad`` as the base does, and drops micro-batches not yet balanced."""
        self._window = None
        self.base.zero_grad(set_to_none=set_to_none)

    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """One step of the base optimizer on the balanced ``.grad``.

        ``closure``, if given, must recompute the losses and call :meth:`backward`; it is passed to
        the base optimizer's ``step`` (which evaluates it under ``torch.enable_grad()``).

        Raises:
            RuntimeError: micro-batches were accumulated (``backward(..., accumulate=True)``) but
                not balanced by a final ``backward(...)``; nothing is stepped.
        """
        if self._window is not None and closure is None:
            raise RuntimeError(
                f"{self._window.count} micro-batch(es) were accumulated with "
                f"backward(..., accumulate=True) but never balanced: call backward(losses) "
                f"without accumulate=True on the last micro-batch before step()"
            )
        return self.base.step(closure)

    def state_dict(self) -> dict[str, Any]:
        state = self.base.state_dict()
        state[_STATE_KEY] = {
            "mode": self.mode,
            "num_losses": self._num_losses,
            "famo": None if self._famo is None else self._famo.state_dict(),
            "previous_losses": self._previous_losses,
            "backward_calls": self._backward_calls,
        }
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Loads the base state and, when present, the balancing state (π logits and moments, the
        previous losses, k). A plain base-optimizer state dict leaves the balancing as is."""
        state_dict = dict(state_dict)
        balancing = state_dict.pop(_STATE_KEY, None)
        if balancing is not None:
            self._check_compatible(balancing)
        self.base.load_state_dict(state_dict)
        if balancing is None:
            return
        self._num_losses = balancing["num_losses"]
        self._min_losses = self._famo = None
        if self._num_losses is not None:
            self._min_losses, self._famo = self._initial_balancing_state(self._num_losses)
        if balancing["famo"] is not None:
            self._famo = self._famo.load(balancing["famo"])
        previous = balancing["previous_losses"]
        self._previous_losses = None if previous is None else previous.to(self._device).clone()
        self._backward_calls = balancing["backward_calls"]

    def _check_compatible(self, balancing: dict[str, Any]) -> None:
        if balancing["mode"] != self.mode:
            raise ValueError(
                f"the state dict was saved in mode {balancing['mode']!r}, this optimizer runs in "
                f"mode {self.mode!r}"
            )
        saved_k = balancing["num_losses"]
        if None not in (saved_k, self._num_losses) and saved_k != self._num_losses:
            raise ValueError(
                f"the state dict balances {saved_k} losses, this optimizer {self._num_losses}"
            )

    def __repr__(self) -> str:
        return f"{type(self).__name__}(mode={self.mode!r}, base={self.base!r})"

    # -- balancing -------------------------------------------------------------------------------

    def backward(
        self,
        losses: LossesLike,
        *,
        accumulate: bool = False,
        retain_graph: bool = False,
        grad_scaler: torch.amp.GradScaler | None = None,
    ) -> None:
        """Computes π for ``losses`` and accumulates the balanced gradient into ``.grad``.

        Args:
            losses: k ≥ 2 scalar losses (a list, a tuple or a 1-D tensor), in the same order every
                call; the first two are read as (distillation, task) by the statistics.
            accumulate: this is a micro-batch, not the last one: keep its gradients (per task in
                exact mode, π-weighted in amortized mode) and loss values, and leave ``.grad``
                alone. The next call without ``accumulate`` balances the *mean* of the
                micro-batches' gradients and losses — the same as one batch made of all of them,
                when each loss is a mean over equally sized micro-batches (do not divide the losses
                by the number of micro-batches). In amortized mode π is fixed within the window and
                updated once, on the last micro-batch.
            retain_graph: keep the autograd graph, as in :meth:`torch.Tensor.backward`.
            grad_scaler: a :class:`torch.amp.GradScaler`: the losses are scaled by it for the
                backward (``.grad`` holds the scaled gradient, for ``scaler.unscale_`` /
                ``scaler.step``) while π and the statistics use the unscaled values. Non-finite
                gradients then do not raise: they reach ``.grad`` so that ``scaler.step`` skips
                the step, and the balancing state (π, logits, previous losses) stays as it was.

        Parameters that a loss does not reach count as zero for that loss; parameters that no loss
        reaches keep ``.grad`` as it was. Afterwards :attr:`weights` holds π (float64, ``(k,)``)
        and :attr:`stats` the gradient diagnostics (see
        :func:`gradbalance.diagnostics.gradient_statistics`).
        """
        losses = stack_losses(losses)
        if not losses.requires_grad:
            raise ValueError(
                "none of the losses requires grad: were they computed under torch.no_grad()?"
            )
        params, balanced = self._trainable_params()
        min_losses, famo = self._balancing_state_for(len(losses))
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

    def update_weights(self, losses: LossesLike) -> None:
        """Amortized mode, FAMO's scheme: update π from the losses re-measured after :meth:`step`.

        Call it after ``step()`` with the losses of the same batch (a no-grad re-forward; with
        micro-batches, their mean); the logits move by how much each log-loss decreased since the
        last balanced :meth:`backward`, and the next :meth:`backward` does not update them again.
        """
        if self.mode != "amortized":
            raise ValueError(
                f"update_weights is for mode='amortized', this optimizer is {self.mode!r}"
            )
        if self._previous_losses is None:
            raise ValueError("update_weights needs a backward() since the last update")
        values = stack_losses(losses).detach().to(torch.float64)
        if len(values) != self._num_losses:
            raise ValueError(f"expected {self._num_losses} losses, got {len(values)}")
        params, _ = self._trainable_params()
        values = distributed.Layout.of(params).average(values.to(self._device))
        self._raise_if_invalid(values, self._min_losses, torch.tensor(True), None)
        self._famo = famo_update(
            self._famo, self._previous_losses, values, self._min_losses, self._famo_hyper
        )
        self._previous_losses = None

    # -- exact and affine modes ------------------------------------------------------------------

    def _exact_backward(
        self, step: _Step, params: list[torch.Tensor], balanced: list[bool], retain_graph: bool
    ) -> None:
        blocks = self._task_gradients(step, params, retain_graph)
        flat = self._flat_gradients(params, balanced, len(step.losses))
        window = self._extended_window(step, lambda: engine.all_finite(blocks))
        flat.store(blocks, accumulate=self._window is not None)
        if step.accumulate:
            self._window = window
            return
        self._window = None  # the micro-batches are consumed from here on
        _average(flat, window.count, step.layout)
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
        if self._vectorize is not False:
            try:
                blocks = engine.task_gradients(
                    losses,
                    params,
                    vectorize=True,
                    # The first try keeps the graph so that the fallback can still run on it.
                    retain_graph=retain_graph or self._vectorize is None,
                )
            except RuntimeError as error:
                if self._vectorize:
                    raise
                warnings.warn(
                    f"the vectorised per-task backward failed ({error}); using "
                    f"{len(losses)} sequential backward passes from now on",
                    stacklevel=4,
                )
                self._vectorize = False
            else:
                self._vectorize = True
                return blocks
        return engine.task_gradients(losses, params, vectorize=False, retain_graph=retain_graph)

    def _flat_gradients(
        self, params: list[torch.Tensor], balanced: list[bool], num_losses: int
    ) -> engine.FlatGradients:
        """The flat buffers for these parameters, rebuilt only when the parameters change."""
        key = (num_losses, *((id(p), b) for p, b in zip(params, balanced, strict=True)))
        if key != self._flat_key:
            if self._window is not None:
                raise ValueError(
                    "the trainable parameters changed between accumulated micro-batches"
                )
            self._flat = engine.FlatGradients(params, balanced, num_losses)
            self._flat_key = key
        return self._flat

    # -- amortized mode --------------------------------------------------------------------------

    def _amortized_backward(
        self, step: _Step, params: list[torch.Tensor], famo: FamoState, retain_graph: bool
    ) -> None:
        window = _extend(self._window, step.values)
        if not step.accumulate and self._previous_losses is not None:
            famo = famo_update(
                famo, self._previous_losses, window.mean, step.min_losses, self._famo_hyper
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
        if step.accumulate or self._window is not None or step.layout.group is not None:
            finite = self._amortized_through_buffer(step, params, grads, gram)
        else:  # one batch, one process: straight into .grad
            finite = self._raise_if_invalid(
                step.values, step.min_losses, engine.all_finite(grads), gram, step.scaled
            )
            engine.accumulate_grad(params, grads)
        if finite and not step.accumulate:
            self._famo = famo
            self._previous_losses = window.mean
            self._commit(step, weights, gram)

    def _amortized_through_buffer(
        self,
        step: _Step,
        params: list[torch.Tensor],
        grads: list[torch.Tensor | None],
        gram: torch.Tensor | None,
    ) -> bool:
        """Micro-batches and ranks: the weighted gradients are summed in a flat ``(1, n)`` buffer
        and averaged over micro-batches and ranks before they reach ``.grad``. Returns whether
        the gradients are finite (always True for a held micro-batch)."""
        flat = self._flat_gradients(params, [True] * len(params), 1)
        blocks = [None if grad is None else distributed.local(grad)[None] for grad in grads]
        window = self._extended_window(step, lambda: engine.all_finite(blocks))
        flat.store(blocks, accumulate=self._window is not None)
        if step.accumulate:
            self._window = window
            return True
        self._window = None
        _average(flat, window.count, step.layout)
        (buffer,) = flat.task_buffers
        finite = step.layout.all_ranks(buffer.isfinite().all())
        finite = self._raise_if_invalid(window.mean, step.min_losses, finite, gram, step.scaled)
        one = torch.ones(1, dtype=torch.float64, device=buffer.device)
        flat.write_grad(one, one)
        return finite

    def _amortized_statistics(self, step: _Step, params: list[torch.Tensor]) -> torch.Tensor | None:
        """The Gram matrix of the log-loss gradients on every ``stats_every``-th call, else None.

        Observational: the update is always the one weighted backward, so statistics cannot change
        the trajectory. Under torch.distributed they are each rank's own.
        """
        if not self.stats_every or self._backward_calls % self.stats_every:
            return None
        blocks = self._task_gradients(step, params, retain_graph=True)
        shifted = step.values - step.min_losses
        gram = engine.gram_matrix(blocks) / (shifted[:, None] * shifted[None, :])
        return gram if step.scale is None else gram / step.scale.square()

    # -- shared pieces ---------------------------------------------------------------------------

    @property
    def _device(self) -> torch.device:
        return self.param_groups[0]["params"][0].device

    def _trainable_params(self) -> tuple[list[torch.Tensor], list[bool]]:
        """The parameters that require grad, and whether each one's group is balanced."""
        params, balanced = [], []
        for group in self.param_groups:
            for param in group["params"]:
                if param.requires_grad:
                    params.append(param)
                    balanced.append(bool(group.get("balance", True)))
        if not params:
            raise ValueError("none of the optimizer's parameters requires grad")
        if self.mode == "amortized" and not all(balanced):
            raise ValueError(
                "'balance': False is for the exact and affine modes: amortized mode computes no "
                "per-task gradients, so there is nothing to leave out"
            )
        if not any(balanced):
            raise ValueError("every param group has 'balance': False; nothing to balance")
        return params, balanced

    def _balancing_state_for(self, num_losses: int) -> tuple[torch.Tensor, FamoState | None]:
        """The bounds m and the FAMO state for k losses, created on first use (and kept only
        once a backward succeeds)."""
        if self._num_losses is not None and num_losses != self._num_losses:
            raise ValueError(
                f"expected {self._num_losses} losses as in earlier steps, got {num_losses}"
            )
        if self._min_losses is None:
            return self._initial_balancing_state(num_losses)
        return self._min_losses, self._famo

    def _initial_balancing_state(self, num_losses: int) -> tuple[torch.Tensor, FamoState | None]:
        min_losses = as_min_losses(self._min_losses_arg, num_losses, self._device)
        famo = None
        if self.mode == "amortized":
            param_dtype = self.param_groups[0]["params"][0].dtype
            dtype = torch.promote_types(param_dtype, torch.float32)
            famo = FamoState.initial(num_losses, self._device, dtype)
        return min_losses, famo

    def _extended_window(
        self, step: _Step, gradients_finite: Callable[[], torch.Tensor]
    ) -> _Window:
        """The accumulation window with this micro-batch added.

        When the micro-batch joins or opens a window it is checked first (one host
        synchronisation), so that a bad one cannot spoil those held: its losses and gradients
        must be finite, and on the last micro-batch the mean losses must be above their bounds.
        """
        window = _extend(self._window, step.values)
        if step.accumulate or self._window is not None:
            finite = step.layout.all_ranks(gradients_finite())  # every rank takes one branch
            if step.accumulate:
                values, bounds = step.values, torch.full_like(step.values, -torch.inf)
            else:
                values, bounds = window.mean, step.min_losses
            self._raise_if_invalid(values, bounds, finite, None, step.scaled)
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
        self._min_losses = step.min_losses
        self._num_losses = len(weights)
        self._backward_calls += 1
        self.weights = weights
        self.stats = {"weights": weights}
        if gram is not None:
            self.stats.update(gradient_statistics(gram))


def _extend(window: _Window | None, values: torch.Tensor) -> _Window:
    return (window or _Window(torch.zeros_like(values), 0)).add(values)


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


def _build_base(
    params: Iterable[torch.Tensor] | Iterable[dict[str, Any]] | Optimizer,
    base: type[Optimizer],
    base_kwargs: dict[str, Any],
) -> Optimizer:
    if isinstance(params, Optimizer):
        if base_kwargs:
            raise ValueError(
                f"got an optimizer instance to wrap and keyword arguments for a new one: "
                f"{sorted(base_kwargs)}"
            )
        return params
    if isinstance(base, Optimizer):
        raise TypeError(
            "base must be an optimizer class; to wrap an existing optimizer pass it as the first "
            "argument: MultiObjectiveOptimizer(existing_optimizer, mode=...)"
        )
    if base in _FUSED_BY_DEFAULT and not {"fused", "foreach"} & base_kwargs.keys():
        params = _materialised(params)
        if _fused_supported(params, base_kwargs.get("differentiable", False)):
            base_kwargs = {**base_kwargs, "fused": True}
    return base(params, **base_kwargs)


def _materialised(params: Iterable) -> list:
    """The params argument with every generator turned into a list, so it can be read twice."""
    items = list(params)
    return [
        {**item, "params": _as_list(item["params"])} if isinstance(item, dict) else item
        for item in items
    ]


def _as_list(params: torch.Tensor | Iterable[torch.Tensor]) -> list[torch.Tensor]:
    return [params] if isinstance(params, torch.Tensor) else list(params)


def _fused_supported(params: list, differentiable: bool) -> bool:
    """Whether torch's fused Adam(W) kernel runs on all these parameters (device and dtype)."""
    tensors = [p for item in params for p in (item["params"] if isinstance(item, dict) else [item])]
    fused, _ = _default_to_fused_or_foreach(tensors, differentiable, use_fused=True)
    return bool(tensors) and fused
