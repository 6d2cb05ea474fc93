"""The options of the balancing, declared once for :class:`~gradbalance.Balancer` and
:class:`~gradbalance.MultiObjectiveOptimizer`, which take them as keyword arguments."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ._bounds import count_bounds
from ._guard import Guard, check_guard
from .modes._amortized import PiOptimizer, check_pi_optimizer
from .weighting import Weighting


@dataclass(frozen=True)
class BalancingOptions:
    """The keyword arguments of :class:`~gradbalance.Balancer` (and of
    :class:`~gradbalance.MultiObjectiveOptimizer`, whose ``guard`` defaults to ``None``: see
    there). The modes are :mod:`gradbalance.modes`.

    Args:
        min_losses: lower bounds ``m_i`` of the losses (default 0), so that losses that can be
            negative work; its length fixes k.
        normalize: divide ``d`` by ``Σ_j π_j / (L_j − m_j)``, which makes the update a convex
            combination of the raw gradients ``∇L_i`` (FAMO's scaling). Default: True in amortized
            mode, False otherwise (the paper's step ``θ ← θ − η d``). Not allowed in affine mode,
            whose π can be negative.
        pi_lr, pi_weight_decay, pi_optimizer: the optimizer of the logits in amortized mode
            (``"adamw"``, lr 0.025, weight decay 0.01: the paper; ``"adam"``: FAMO's code).
        stats_every: in amortized mode, also compute the per-task gradient statistics every
            ``stats_every``-th backward (costs the per-task backward on those calls; 0 = never).
            The other modes compute them on every call anyway.
        vectorize: how the per-task gradients are computed: ``True``, one vmapped backward
            (``torch.autograd.grad(..., is_grads_batched=True)``); ``False``, k ordinary backward
            passes, each copied into its row of the ``(k, n)`` buffer as it comes; ``None``
            (default), chosen on the first balanced backward from the operators of the graph,
            never from timings, so that two runs give the same bits (docs/method.md); k passes
            for good, with a warning, where vmap cannot batch an operator.
            :attr:`~gradbalance.Balancer.vectorize` tells the choice made; it is part of the
            state dict.
        guard: ``"sync"`` (default) raises on a refused step at once, at the cost of one host
            synchronisation per backward; ``"device"`` keeps the verdict on the device, skips a
            refused step there and raises later (:meth:`~gradbalance.Balancer.raise_deferred`;
            docs/method.md).
        weighting: exact and representation modes: another rule for π, any callable from the
            ``(k, k)`` float64 Gram matrix ``G_ij = ⟨g_i, g_j⟩`` of the log-loss gradients (on
            the parameters' device) to π, a floating ``(k,)`` tensor — for instance a
            ``torchjd.aggregation`` Weighting (``UPGradWeighting()``, ``PCGradWeighting()``,
            …) as it is. Default: the exact min-norm π on the simplex. π need not lie on the
            simplex (``d = Σ π_i g_i`` is followed as it is) but must be finite, and with
            ``normalize=True`` non-negative with a positive sum; otherwise the step is refused
            like an invalid loss. A weighting that reads G on the host synchronises a CUDA
            stream. Its own state, if any, is not part of the state dict.
    """

    min_losses: Sequence[float] | torch.Tensor | None = None
    normalize: bool | None = None
    pi_lr: float = 0.025
    pi_weight_decay: float = 0.01
    pi_optimizer: PiOptimizer = "adamw"
    stats_every: int = 0
    vectorize: bool | None = None
    guard: Guard = "sync"
    weighting: Weighting | None = None

    def __post_init__(self) -> None:
        if self.weighting is not None and not callable(self.weighting):
            raise TypeError(f"weighting must be callable, got {type(self.weighting).__name__}")
        if self.stats_every < 0:
            raise ValueError(f"stats_every must be ≥ 0, got {self.stats_every}")
        check_guard(self.guard)
        check_pi_optimizer(self.pi_lr, self.pi_weight_decay, self.pi_optimizer)
        count_bounds(self.min_losses)


OPTION_NAMES = tuple(field.name for field in dataclasses.fields(BalancingOptions))
