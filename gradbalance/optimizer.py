"""``MultiObjectiveOptimizer``: a torch.optim optimizer balancing k losses at the gradient level.

The torch.optim side — the base optimizer, param groups, schedulers, state dicts, closures — over
the balancing of :class:`gradbalance.balancer.Balancer`::

    losses ─▶ per-task gradients (engine) ─▶ flat buffers, averaged over ranks (engine, distributed)
           ─▶ Gram (kernels) ─▶ π (weighting / amortized) ─▶ coefficients on ∇L_i (weighting)
           ─▶ combined gradient in .grad (engine, kernels) ─▶ base.step()
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch.optim import Optimizer
from torch.optim.optimizer import _default_to_fused_or_foreach

from ._inputs import LossesLike
from .amortized import FamoHyperparameters, PiOptimizer
from .balancer import Balancer, Mode

__all__ = ["MultiObjectiveOptimizer"]

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
    skips them). Checking costs one host synchronisation per :meth:`backward` (one more for each
    accumulated micro-batch, and under torch.distributed).

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
        famo_hyper = FamoHyperparameters(pi_lr, pi_weight_decay, pi_optimizer)
        self._balancer = Balancer(mode, normalize, min_losses, famo_hyper, stats_every)
        self.base = _build_base(params, base, base_kwargs)
        super().__init__(self.base.param_groups, self.base.defaults)
        self.param_groups = self.base.param_groups
        self.state = self.base.state

    @property
    def mode(self) -> Mode:
        return self._balancer.mode

    @property
    def normalize(self) -> bool:
        return self._balancer.normalize

    @property
    def stats_every(self) -> int:
        return self._balancer.stats_every

    # -- torch.optim.Optimizer interface ---------------------------------------------------------

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        # Optimizer.__init__ passes the base's own groups back in: they are registered already.
        if any(param_group is group for group in self.base.param_groups):
            return
        self.base.add_param_group(param_group)

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Zeroes ``.grad`` as the base does, and drops micro-batches not yet balanced."""
        self._balancer.window = None
        self.base.zero_grad(set_to_none=set_to_none)

    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """One step of the base optimizer on the balanced ``.grad``.

        ``closure``, if given, must recompute the losses and call :meth:`backward`; it is passed to
        the base optimizer's ``step`` (which evaluates it under ``torch.enable_grad()``).

        Raises:
            RuntimeError: micro-batches were accumulated (``backward(..., accumulate=True)``) but
                not balanced by a final ``backward(...)``; nothing is stepped.
        """
        window = self._balancer.window
        if window is not None and closure is None:
            raise RuntimeError(
                f"{window.count} micro-batch(es) were accumulated with "
                f"backward(..., accumulate=True) but never balanced: call backward(losses) "
                f"without accumulate=True on the last micro-batch before step()"
            )
        return self.base.step(closure)

    def state_dict(self) -> dict[str, Any]:
        state = self.base.state_dict()
        state[_STATE_KEY] = self._balancer.state_dict()
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Loads the base state and, when present, the balancing state (π logits and moments, the
        previous losses, k). A plain base-optimizer state dict leaves the balancing as is."""
        state_dict = dict(state_dict)
        balancing = state_dict.pop(_STATE_KEY, None)
        if balancing is not None:
            self._balancer.check_compatible(balancing)
        self.base.load_state_dict(state_dict)
        if balancing is not None:
            self._balancer.load_state_dict(balancing, self.param_groups[0]["params"][0])

    def __repr__(self) -> str:
        return f"{type(self).__name__}(mode={self.mode!r}, base={self.base!r})"

    # -- balancing -------------------------------------------------------------------------------

    @property
    def weights(self) -> torch.Tensor | None:
        """π of the last balanced :meth:`backward`, float64 ``(k,)`` (None before the first)."""
        return self._balancer.weights

    @property
    def stats(self) -> dict[str, torch.Tensor]:
        """Diagnostics of the last balanced :meth:`backward`
        (:func:`gradbalance.diagnostics.gradient_statistics`, and ``"weights"``)."""
        return self._balancer.stats

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
        params, balanced = self._trainable_params()
        self._balancer.backward(
            losses,
            params,
            balanced,
            accumulate=accumulate,
            retain_graph=retain_graph,
            grad_scaler=grad_scaler,
        )

    def update_weights(self, losses: LossesLike) -> None:
        """Amortized mode, FAMO's scheme: update π from the losses re-measured after :meth:`step`.

        Call it after ``step()`` with the losses of the same batch (a no-grad re-forward; with
        micro-batches, their mean); the logits move by how much each log-loss decreased since the
        last balanced :meth:`backward`, and the next :meth:`backward` does not update them again.
        """
        self._balancer.update_weights(losses, self._trainable_params()[0])

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
        return params, balanced


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
