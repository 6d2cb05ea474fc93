"""The modes of the balancing, chosen by name: ``Balancer(mode=...)`` or
``MultiObjectiveOptimizer(mode=...)``. Each chooses the weights π of the log-loss gradients
``g_i = ∇L_i / (L_i − m_i)`` in its own way and writes ``d = Σ_i π_i g_i`` into ``.grad``
(docs/method.md has the maths):

* ``"exact"`` (the default; MoKD eq. 9, MGDA): per-task gradients of the parameters, from one
  vmapped backward or k passes; their Gram matrix ``G`` accumulated in float64;
  ``π = argmin_{π ∈ Δ} ‖Σ π_i g_i‖²`` on the simplex, solved exactly
  (:func:`gradbalance.weighting.min_norm_weights`), or by any ``weighting=``. ``d`` never
  conflicts with an objective: ``⟨d, g_i⟩ ≥ ‖d‖² ≥ 0``. Exact and affine modes take param groups
  with ``"balance": False`` (:meth:`gradbalance.Balancer.backward`).
* ``"representation"`` (Sener & Koltun 2018's MGDA upper bound): exact mode's π, from the Gram
  matrix of the log-loss gradients with respect to a shared representation passed as
  ``backward(..., representation=z)`` (the student's outputs or features both losses read), then
  one ordinary backward of the π-weighted sum: about the cost of ``loss.backward()``. ``d`` does
  not conflict with any objective *at z*; at the parameters it is a bound, not a guarantee.
* ``"amortized"`` (FAMO, Liu et al. 2023): no per-task gradients; π = softmax(w), the logits w
  stepped by a small Adam(W) (``pi_lr``, ``pi_weight_decay``, ``pi_optimizer``) from how much
  each log-loss decreased since the last balanced backward, or by ``update_weights`` after the
  optimizer's step with the losses re-measured on the same batch (FAMO's own scheme). One
  ordinary backward; ``normalize=True`` by default. A window of micro-batches has one π, the one
  it opened with. ``stats_every=N`` also computes the gradient statistics every N-th call.
* ``"affine"``: the paper's Theorem 3.1, π without π ≥ 0
  (:func:`gradbalance.weighting.affine_weights`), to reproduce the paper only: it stops training
  when the objectives agree. No ``weighting=``, no ``normalize=True``.

Exact and representation modes compute the statistics on every call; ``weighting=`` is theirs.
"""

from __future__ import annotations

from typing import Literal, get_args

__all__ = ["MODES", "Mode"]

Mode = Literal["exact", "amortized", "affine", "representation"]
MODES: tuple[Mode, ...] = get_args(Mode)
