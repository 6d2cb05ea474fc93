"""``MultiObjectiveOptimizer``: a torch.optim optimizer balancing k losses at the gradient level.

It wires the pieces together and adds nothing of its own to the math::

    losses ─▶ per-task gradients (engine) ─▶ Gram (engine) ─▶ π (weighting / amortized)
           ─▶ coefficients on ∇L_i (weighting) ─▶ combined gradient in .grad ─▶ base.step()
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable, Iterable, Sequence
from contextlib import contextmanager
from functools import partial
from typing import Any, Literal

import torch
from torch.optim import Optimizer
from torch.optim.optimizer import _default_to_fused_or_foreach

from . import engine
from ._inputs import (
    LossesLike,
    as_min_losses,
    describe_invalid_gram,
    describe_invalid_losses,
    stack_losses,
)
from .amortized import FAMO_EPSILON, FamoLogits, OptimizerFactory
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


class MultiObjectiveOptimizer(Optimizer):
    r"""Balances k losses every step and hands the balanced gradient to a base optimizer.

    The objectives are the log-losses ``log(L_i − m_i)``; their gradients are
    ``g_i = ∇L_i / (L_i − m_i)``. Each :meth:`backward` chooses weights π on the simplex and
    writes the direction ``d = Σ_i π_i g_i`` into ``.grad``; :meth:`step` runs the base optimizer.

    Modes:

    * ``"exact"`` (MoKD eq. 9, MGDA): per-task gradients from one vectorised backward, their Gram
      matrix accumulated in float64, and ``π = argmin_{π ∈ Δ} ‖Σ π_i g_i‖²`` solved exactly
      (:func:`gradbalance.weighting.min_norm_weights`). ``d`` never conflicts with any objective:
      ``⟨d, g_i⟩ ≥ ‖d‖² ≥ 0``.
    * ``"amortized"`` (FAMO): one ordinary backward of the π-weighted sum; π = softmax(w), the
      logits w stepped by a small optimizer (AdamW, ``pi_lr``, ``pi_weight_decay``) from how much
      each log-loss decreased. By default the decrease is measured between consecutive
      :meth:`backward` calls (no extra pass); call :meth:`update_weights` after :meth:`step` with
      the losses re-measured on the same batch to use FAMO's own scheme instead.
    * ``"affine"``: the paper's Theorem 3.1 without π ≥ 0, for reproducing the paper only — it
      stops training when the objectives agree (see :func:`gradbalance.weighting.affine_weights`).

    It is a :class:`torch.optim.Optimizer`: ``param_groups`` and ``state`` are the base optimizer's,
    so learning-rate schedulers, ``add_param_group`` and ``zero_grad`` work as usual, and
    ``state_dict()`` holds the base state plus the balancing state under ``"gradbalance"``.

    Bad input raises :class:`ValueError` naming the loss and its value, before anything changes:
    no ``.grad``, parameter, moment or π is touched. Invalid input is a non-scalar or non-tensor
    loss, fewer than two losses, a different number of losses than before, a loss that is NaN,
    infinite or not above its ``min_loss``, and non-finite gradients (raised rather than skipped, so
    that a NaN never reaches the weights silently). Checking costs one host synchronisation per
    :meth:`backward`.

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
        pi_lr: learning rate of the AdamW that updates the logits in amortized mode (the
            paper's 0.025).
        pi_weight_decay: its weight decay (the paper's 0.01).
        pi_optimizer: a callable ``params -> Optimizer`` that replaces that AdamW, e.g.
            ``functools.partial(torch.optim.Adam, lr=0.025, weight_decay=0.01)`` for FAMO's code.
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
        pi_optimizer: OptimizerFactory | None = None,
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
        self.base = _build_base(params, base, base_kwargs)
        self.mode: Mode = mode
        self.normalize = normalize
        self.stats_every = stats_every
        self._make_pi_optimizer = pi_optimizer or partial(
            torch.optim.AdamW, lr=pi_lr, weight_decay=pi_weight_decay
        )
        self._min_losses_arg = min_losses
        self._num_losses: int | None = None
        self._min_losses: torch.Tensor | None = None
        self._famo: FamoLogits | None = None
        self._previous_losses: torch.Tensor | None = None
        self._backward_calls = 0
        self._vectorize: bool | None = None  # None: not tried yet
        self.weights: torch.Tensor | None = None
        self.stats: dict[str, torch.Tensor] = {}
        super().__init__(self.base.param_groups, self.base.defaults)
        self.param_groups = self.base.param_groups
        self.state = self.base.state
        if min_losses is not None:
            self._set_num_losses(torch.as_tensor(min_losses).numel())

    # -- torch.optim.Optimizer interface ---------------------------------------------------------

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        # Optimizer.__init__ passes the base's own groups back in: they are registered already.
        if any(param_group is group for group in self.base.param_groups):
            return
        self.base.add_param_group(param_group)

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.base.zero_grad(set_to_none=set_to_none)

    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """One step of the base optimizer on the balanced ``.grad``.

        ``closure``, if given, must recompute the losses and call :meth:`backward`; it is passed to
        the base optimizer's ``step`` (which evaluates it under ``torch.enable_grad()``).
        """
        return self.base.step(closure)

    def state_dict(self) -> dict[str, Any]:
        state = self.base.state_dict()
        state[_STATE_KEY] = self._balancing_state()
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Loads the base state and, when present, the balancing state (π logits, its optimizer,
        the previous losses, k). A plain base-optimizer state dict leaves the balancing as is."""
        state_dict = dict(state_dict)
        balancing = state_dict.pop(_STATE_KEY, None)
        if balancing is not None:
            self._check_compatible(balancing)
        self.base.load_state_dict(state_dict)
        if balancing is not None:
            self._load_balancing_state(copy.deepcopy(balancing))

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

    def backward(self, losses: LossesLike, *, retain_graph: bool = False) -> None:
        """Computes π for ``losses`` and accumulates the balanced gradient into ``.grad``.

        Args:
            losses: k ≥ 2 scalar losses (a list, a tuple or a 1-D tensor), in the same order every
                call; the first two are read as (distillation, task) by the statistics.
            retain_graph: keep the autograd graph, as in :meth:`torch.Tensor.backward`.

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
        params = self._trainable_params()
        with self._all_or_nothing():
            self._set_num_losses(len(losses))
            values = losses.detach().to(torch.float64)
            if self.mode == "amortized":
                self._observe_losses(values)
            grads, weights, gram = self._balanced_gradient(losses, values, params, retain_graph)
            self._backward_calls += 1
        engine.accumulate_grad(params, grads)
        self.weights = weights
        self.stats = {"weights": weights}
        if gram is not None:
            self.stats.update(gradient_statistics(gram))

    def update_weights(self, losses: LossesLike) -> None:
        """Amortized mode, FAMO's scheme: update π from the losses re-measured after :meth:`step`.

        Call it after ``step()`` with the losses of the same batch (a no-grad re-forward); the
        logits move by how much each log-loss decreased since the last :meth:`backward`, and the
        next :meth:`backward` does not update them again.
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
        self._raise_if_invalid(values, torch.tensor(True), None)
        self._famo.update(self._previous_losses, values, self._min_losses)
        self._previous_losses = None

    # -- pieces ----------------------------------------------------------------------------------

    @property
    def _device(self) -> torch.device:
        return self.param_groups[0]["params"][0].device

    def _trainable_params(self) -> list[torch.Tensor]:
        params = [p for group in self.param_groups for p in group["params"] if p.requires_grad]
        if not params:
            raise ValueError("none of the optimizer's parameters requires grad")
        return params

    def _set_num_losses(self, num_losses: int) -> None:
        if self._num_losses is not None:
            if num_losses != self._num_losses:
                raise ValueError(
                    f"expected {self._num_losses} losses as in earlier steps, got {num_losses}"
                )
            return
        self._min_losses = as_min_losses(self._min_losses_arg, num_losses, self._device)
        if self.mode == "amortized":
            param_dtype = self.param_groups[0]["params"][0].dtype
            self._famo = FamoLogits(
                num_losses,
                self._make_pi_optimizer,
                device=self._device,
                dtype=torch.promote_types(param_dtype, torch.float32),
            )
        self._num_losses = num_losses

    def _observe_losses(self, values: torch.Tensor) -> None:
        if self._previous_losses is not None:
            self._famo.update(self._previous_losses, values, self._min_losses)
        self._previous_losses = values

    def _balanced_gradient(
        self,
        losses: torch.Tensor,
        values: torch.Tensor,
        params: list[torch.Tensor],
        retain_graph: bool,
    ) -> tuple[list[torch.Tensor | None], torch.Tensor, torch.Tensor | None]:
        """The combined gradient per parameter, π, and the Gram matrix (None if not computed).

        Raises ValueError (after one host synchronisation) on invalid losses or gradients.
        """
        blocks, gram = self._task_gradients_if_needed(losses, values, params, retain_graph)
        weights = self._weights(gram)
        eps = FAMO_EPSILON if self.mode == "amortized" else 0.0
        coefficients = loss_coefficients(
            weights, values - self._min_losses + eps, normalize=self.normalize
        )
        if self.mode == "amortized":
            # Its statistics are observational: the update is always the one weighted backward,
            # so stats_every cannot change the trajectory (combine differs in float rounding).
            grads = engine.weighted_gradient(
                losses, coefficients, params, retain_graph=retain_graph
            )
            finite = engine.all_finite(grads)
        else:
            grads = engine.combine(blocks, coefficients)
            finite = gram.isfinite().all()
        self._raise_if_invalid(values, finite, gram)
        return grads, weights, gram

    def _task_gradients_if_needed(
        self,
        losses: torch.Tensor,
        values: torch.Tensor,
        params: list[torch.Tensor],
        retain_graph: bool,
    ) -> tuple[engine.Blocks | None, torch.Tensor | None]:
        """Per-task gradient blocks and the Gram matrix of the log-loss gradients, when needed."""
        wants_stats = self.stats_every and self._backward_calls % self.stats_every == 0
        if self.mode == "amortized" and not wants_stats:
            return None, None
        # Amortized statistics steps backpropagate once more for the update: keep the graph.
        keep_graph = retain_graph or self.mode == "amortized"
        blocks = self._task_gradients(losses, params, keep_graph)
        shifted = values - self._min_losses
        gram = engine.gram_matrix(blocks) / (shifted[:, None] * shifted[None, :])
        return blocks, gram

    def _task_gradients(
        self, losses: torch.Tensor, params: list[torch.Tensor], retain_graph: bool
    ) -> engine.Blocks:
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
                    stacklevel=3,
                )
                self._vectorize = False
            else:
                self._vectorize = True
                return blocks
        return engine.task_gradients(losses, params, vectorize=False, retain_graph=retain_graph)

    def _weights(self, gram: torch.Tensor | None) -> torch.Tensor:
        if self.mode == "amortized":
            return self._famo.weights.to(torch.float64)
        return _GRAM_WEIGHTINGS[self.mode](gram)

    def _raise_if_invalid(
        self, values: torch.Tensor, gradients_finite: torch.Tensor, gram: torch.Tensor | None
    ) -> None:
        """One host synchronisation; the detailed message is built only on failure."""
        losses_valid = (values.isfinite() & (values > self._min_losses)).all()
        if bool(losses_valid & gradients_finite):
            return
        message = describe_invalid_losses(values, self._min_losses)
        if message is None:
            message = (
                describe_invalid_gram(gram)
                if gram is not None
                else "non-finite gradients; nothing was changed"
            )
        raise ValueError(message)

    @contextmanager
    def _all_or_nothing(self):
        """Restores the balancing state if the body raises, so bad input changes nothing."""
        saved = self._balancing_state()
        try:
            yield
        except BaseException:
            self._load_balancing_state(saved)
            raise

    def _balancing_state(self) -> dict[str, Any]:
        return copy.deepcopy(
            {
                "mode": self.mode,
                "num_losses": self._num_losses,
                "famo": None if self._famo is None else self._famo.state_dict(),
                "previous_losses": self._previous_losses,
                "backward_calls": self._backward_calls,
            }
        )

    def _load_balancing_state(self, state: dict[str, Any]) -> None:
        if state["num_losses"] is None:
            self._num_losses = self._min_losses = self._famo = None
        else:
            self._num_losses = None
            self._set_num_losses(state["num_losses"])
        if state["famo"] is not None:
            self._famo.load_state_dict(state["famo"])
        previous = state["previous_losses"]
        self._previous_losses = None if previous is None else previous.to(self._device)
        self._backward_calls = state["backward_calls"]


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
