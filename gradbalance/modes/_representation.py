"""Representation mode: exact mode's π from the Gram matrix of the log-loss gradients with respect
to a shared representation, then one ordinary backward of the π-weighted sum."""

from __future__ import annotations

import torch

from .. import _engine as engine
from .._guard import both, poisoned
from ..weighting import loss_coefficients
from ._base import Call, GramMode, Outcome, log_loss_gram, solvable, weighted_backward

__all__ = ["RepresentationMode"]


class RepresentationMode(GramMode):
    """``"representation"`` (Sener & Koltun 2018's MGDA upper bound): exact mode's π, but from
    the Gram matrix of the log-loss gradients with respect to a shared representation passed as
    ``backward(..., representation=z)`` (the student's outputs or features both losses read),
    then one ordinary backward of the π-weighted sum: about the cost of ``loss.backward()``.

    Since ``∇_θ L_i = (∂z/∂θ)ᵀ ∇_z L_i``, ``d`` does not conflict with any objective *at z*; at
    the parameters it is a bound, not a guarantee (docs/method.md, "Representation mode"). With
    micro-batches each is balanced by the π of its own representation. Under torch.distributed
    the Gram matrix is that of the global batch's activations
    (:meth:`gradbalance._distributed.Layout.batch_gram`).

    """

    wants_representation = True

    def backward(self, call: Call) -> Outcome | None:
        inputs = call.inputs
        held = call.window.opened(inputs)
        blocks = call.strategy.blocks(
            inputs.losses,
            inputs.rho.to(inputs.losses.dtype),
            call.representation,
            retain_graph=True,
            vectorized=not torch.is_anomaly_enabled(),
        )
        engine.require_dense(blocks, lambda i: f"representation tensor {i}")
        rows = inputs.layout.batch_gram(engine.gram_matrix(blocks))
        gram = log_loss_gram(rows, inputs.rho, inputs.shifted)
        # No host synchronisation: a non-finite G comes with non-finite gradients, refused below.
        weights, valid = self.weighting.weights(solvable(gram), True, call.guard, self.normalize)
        coefficients = poisoned(
            loss_coefficients(weights, inputs.shifted, normalize=self.normalize), valid
        )
        ok = weighted_backward(call, held, coefficients)
        return None if ok is None else Outcome(weights, gram, both(ok, valid))
