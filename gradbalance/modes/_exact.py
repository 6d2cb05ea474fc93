"""Exact and affine modes: π from the Gram matrix of the per-task log-loss gradients of the
parameters.

The per-task gradients are computed as rows ``r_i = ρ_i ∇̄L_i`` — ``∇̄L_i`` the gradient of loss i
(the mean over the micro-batches of an accumulation window), ``ρ_i`` the scale it was computed with
(``S / D_i`` for the window's first micro-batch, ``S`` a grad scaler's scale, ``D_i = L_i − m_i``:
:attr:`gradbalance._inputs.BackwardInputs.rho`). With ``D̄_i`` the window's mean shifted loss, the
log-loss gradients (docs/method.md, "Objectives") are ``g_i = ∇̄L_i / D̄_i = f_i r_i`` with ``f_i =
1 / (ρ_i D̄_i)``: one scale per row, so the Gram matrix of the g_i is the rows' Gram matrix rescaled
(:func:`~gradbalance.modes._base.log_loss_gram`), and the direction ``d = Σ π_i g_i`` is a
combination of the rows (:func:`row_coefficients`). The rows are of order one whatever the scale of
the losses, so their float32 products neither underflow nor overflow.
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING

import torch

from .. import _engine as engine
from .._buffers import Blocks, FlatGradients, Role
from .._guard import Ok, both, poisoned
from .._inputs import BackwardInputs
from ..weighting import affine_weights, loss_coefficients, min_norm_weights
from ._base import Call, GramMode, GramWeighting, Outcome, log_loss_gram, refuse_weighting

if TYPE_CHECKING:
    from .._options import BalancingOptions


class ExactMode(GramMode):
    """``"exact"`` (MoKD eq. 9, MGDA): per-task gradients from one vmapped backward or k passes
    (:mod:`gradbalance._per_task`), their Gram matrix accumulated in float64,
    ``π = argmin_{π ∈ Δ} ‖Σ π_i g_i‖²`` solved exactly
    (:func:`gradbalance.weighting.min_norm_weights`): ``d`` never conflicts with any objective,
    ``⟨d, g_i⟩ ≥ ‖d‖² ≥ 0``. ``"affine"``: the paper's Theorem 3.1 without π ≥ 0
    (:func:`gradbalance.weighting.affine_weights`), for reproducing the paper only — it stops
    training when the objectives agree.

    Its ``"balance": False`` groups (:meth:`gradbalance.Balancer.backward`) get the plain sum of
    the rows' coefficients. With micro-batches the rows of each are summed in a ``(k, n)``
    buffer and π is computed once, from their mean, on the last.

    Its statistics are computed on every call: ``stats_every`` has nothing to add here.

    Args:
        name: ``"exact"`` or ``"affine"``. weighting: π from the Gram matrix. normalize: see
            :class:`~gradbalance.modes._base.BalancingMode`.
    """

    names = ("exact", "affine")
    per_task = True

    @classmethod
    def from_options(cls, name: str, options: BalancingOptions) -> ExactMode:
        """Exact mode takes ``weighting=``; affine mode has its own π, which can be negative:
        ``normalize=True`` cannot divide by it. Neither normalises by default (the paper's step
        ``θ ← θ − η d``)."""
        normalize = bool(options.normalize)
        if name == "exact":
            return cls(name, GramWeighting.chosen(options.weighting, min_norm_weights), normalize)
        refuse_weighting(name, options)
        if normalize:
            raise ValueError("normalize=True needs non-negative weights; affine mode has none")
        return cls(name, GramWeighting(affine_weights), normalize)

    def backward(self, call: Call) -> Outcome | None:
        inputs, window, guard = call.inputs, call.window, call.guard
        held = window.including(inputs, rho=inputs.rho)
        rho = held.rho.to(inputs.losses.dtype)  # the scale the rows are computed with
        inputs, flat, blocks = self._rows(call, rho)
        columns = None  # the rows are in the task buffers, unless:
        verdict: Ok | None = True
        if blocks is not None and window.pending == 0 and inputs.single:
            columns = flat.as_columns(blocks)  # one batch, one process: no (k, n) copy
        else:
            verdict = window.gather(inputs, held, flat, blocks, guard)
        del blocks  # in the buffers or in columns: the rest would only hold memory
        if verdict is None:
            return None
        shifted = held.mean - inputs.min_losses
        rho64 = rho.to(torch.float64)
        gram = log_loss_gram(inputs.layout.global_gram(flat.gram(columns)), rho64, shifted)
        ok = guard.check(
            held.mean,
            inputs.min_losses,
            gram.isfinite().all(),
            inputs.names,
            culprits=lambda: flat.nonfinite_rows(columns),
            allow_nonfinite=inputs.scaled,
        )
        weights, valid = self.weighting.weights(gram, ok, guard, self.normalize)
        ok = both(both(ok, verdict), valid)
        balanced = poisoned(
            row_coefficients(weights, rho64, shifted, inputs.scale, normalize=self.normalize), ok
        )
        plain = row_coefficients(
            torch.ones_like(weights), rho64, shifted, inputs.scale, normalize=self.normalize
        )
        written = flat.write_grad(
            {Role.BALANCED: balanced, Role.OUTSIDE: balanced, Role.PLAIN: plain}, columns
        )
        engine.run_post_accumulate_grad_hooks(written)
        return Outcome(weights, gram, ok)

    def _rows(
        self, call: Call, rho: torch.Tensor
    ) -> tuple[BackwardInputs, FlatGradients, Blocks | None]:
        """The per-task gradients ``ρ_i ∇L_i``, their buffers, and their blocks — or ``None``
        where the k passes went straight into the buffers' rows (no micro-batch held, so that
        nothing is spoilt if this one is refused)."""
        inputs, window = call.inputs, call.window
        k = len(inputs.losses)
        streamed = not inputs.layout.sharded and window.pending == 0
        if streamed and not call.per_task.vectorized(inputs):
            flat = window.buffers(inputs, k)
            passes = engine.backward_passes(
                inputs.losses,
                inputs.tensors,
                scales=rho,
                retain_graph=call.retain_graph,
                by_backward=inputs.by_backward,
            )
            with contextlib.closing(passes):
                for task, gradients in enumerate(passes):  # one pass's gradients at a time
                    engine.require_dense(gradients, inputs.describe)
                    flat.store_row(task, gradients)
            return inputs, flat, None
        blocks = call.per_task.blocks(inputs, inputs.tensors, rho, retain_graph=call.retain_graph)
        engine.require_dense(blocks, inputs.describe)
        inputs, blocks = inputs.reached_only(blocks)
        return inputs, window.buffers(inputs, k), blocks


def row_coefficients(
    weights: torch.Tensor,
    rho: torch.Tensor,
    shifted_mean: torch.Tensor,
    scale: torch.Tensor | None,
    *,
    normalize: bool,
) -> torch.Tensor:
    """Coefficients on the rows that give ``S · d``: ``S c_i / ρ_i``, ``(k,)`` float64.

    ``c = loss_coefficients(π, D̄, normalize)`` are the coefficients on the raw gradients
    (:func:`gradbalance.weighting.loss_coefficients`); ``∇̄L_i = r_i / ρ_i``. ``.grad`` holds the
    scaled direction ``S · d`` for the grad scaler to unscale.
    """
    coefficients = loss_coefficients(weights, shifted_mean, normalize=normalize) / rho
    return coefficients if scale is None else coefficients * scale
