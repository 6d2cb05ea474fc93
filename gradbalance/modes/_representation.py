"""Representation mode: exact mode's π from the Gram matrix of the log-loss gradients with respect
to a shared representation, then one ordinary backward of the π-weighted sum."""

from __future__ import annotations

from typing import TYPE_CHECKING

from .. import _engine as engine
from .._guard import both, poisoned
from ..weighting import loss_coefficients, min_norm_weights
from ._base import (
    Call,
    GramMode,
    GramWeighting,
    Outcome,
    log_loss_gram,
    solvable,
    weighted_backward,
)

if TYPE_CHECKING:
    from .._options import BalancingOptions


class RepresentationMode(GramMode):
    """``"representation"`` (Sener & Koltun 2018's MGDA upper bound): exact mode's π, but from
    the Gram matrix of the log-loss gradients with respect to a shared representation passed as
    ``backward(..., representation=z)`` (the student's outputs or features both losses read),
    then one ordinary backward of the π-weighted sum: about the cost of ``loss.backward()``.

    Since ``∇_θ L_i = (∂z/∂θ)ᵀ ∇_z L_i``, ``d`` does not conflict with any objective *at z*; at
    the parameters it is a bound, not a guarantee (docs/method.md, "Representation mode"). With
    micro-batches each is balanced by the π of its own representation. Under torch.distributed
    the Gram matrix is that of the global batch's activations
    (:meth:`gradbalance._distributed.Layout.batch_gram`). Its statistics are computed on every
    call: ``stats_every`` has nothing to add here.
    """

    names = ("representation",)
    wants_representation = True

    @classmethod
    def from_options(cls, name: str, options: BalancingOptions) -> RepresentationMode:
        """Takes ``weighting=``, as exact mode; does not normalise by default."""
        weighting = GramWeighting.chosen(options.weighting, min_norm_weights)
        return cls(name, weighting, bool(options.normalize))

    def backward(self, call: Call) -> Outcome | None:
        inputs = call.inputs
        held = call.window.including(inputs)
        blocks = call.per_task.blocks(
            inputs,
            call.representation,
            inputs.rho.to(inputs.losses.dtype),
            retain_graph=True,
            at_representation=True,
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
