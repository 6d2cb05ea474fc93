"""How the per-task gradients are computed: one vmapped backward, or k ordinary passes.

Which is faster depends on the model and on k (docs/performance.md, "Exact mode against its
floor"): vmap batches the k backward passes into one, but some operators batch poorly — CPU
attention's backward has no batching rule and loops, a batched convolution's backward is no faster
than k of them and holds k copies of its activation gradients — and the k passes need a k-th of
vmap's memory for the gradients of the activations.

The two ways round differently in the last bits, so the choice must not depend on the machine's
load: with ``vectorize=None`` it is made on the first balanced backward from the *operators* of the
graph (:func:`suits_vmap`: k passes when it holds a convolution or an attention node, else vmap),
and two runs with the same seed give the same bits. Whatever the choice, a step whose graph holds a
reentrant checkpoint, or that runs under ``torch.autograd.detect_anomaly()`` (whose checks read
values that vmap cannot batch), takes k ordinary passes; a vmapped backward that fails because vmap
cannot batch an operator falls back to k passes for good (``vectorize=None``, with a warning). Any
other error is the user's and reaches the caller.
"""

from __future__ import annotations

import math
import os
import re
import sys
import warnings
from collections.abc import Sequence
from typing import Any

import torch

from . import _engine as engine
from ._inputs import BackwardInputs

# Nodes whose vmapped backward is slower than k passes, or k-fold in memory (the measured table
# of docs/performance.md): convolutions, and attention (no batching rule on the CPU).
_POORLY_BATCHED = re.compile(r"Convolution|ScaledDotProduct|Attention")
# What vmap's own "cannot batch this" errors say (an inductor-compiled backward, which reads the
# data pointer of a batched tensor, says the last).
_VMAP_FAILURE = re.compile(
    r"batching rule|vmap|functorch|batched tensor|doesn't have storage", re.IGNORECASE
)
# This package's directory: a warning points at the first frame outside it.
_PACKAGE = os.path.dirname(__file__) + os.sep


def suits_vmap(kinds: frozenset[str]) -> bool:
    """Whether a graph whose autograd nodes are of these ``kinds`` (class names) gets its per-task
    gradients from one vmapped backward rather than k passes."""
    return not any(_POORLY_BATCHED.search(kind) for kind in kinds)


def is_vmap_failure(error: BaseException) -> bool:
    """Whether ``error`` is vmap's refusal to batch an operator, not an error of the user's code."""
    return isinstance(error, RuntimeError) and bool(_VMAP_FAILURE.search(str(error)))


class PerTaskGradients:
    """The per-task gradients ``ρ_i ∇L_i``, and the one place that decides how they are computed:
    one vmapped backward or k passes (:meth:`vectorized`), the choice made once per run.

    Args:
        vectorize: ``True`` or ``False`` fixes the choice; ``None`` makes it on the first
            balanced backward (:meth:`settle`) by :func:`suits_vmap`.
    """

    def __init__(self, vectorize: bool | None) -> None:
        self.fixed = vectorize is not None
        self.choice: bool | None = vectorize
        self._vmap_ran = False  # a vmapped backward has succeeded in this run

    def vectorized(self, inputs: BackwardInputs, *, at_representation: bool = False) -> bool:
        """Whether the per-task gradients of this call come from one vmapped backward (pure): of
        the parameters, or (``at_representation``) of the representation's activations."""
        if self.choice is False or torch.is_anomaly_enabled():
            return False
        if at_representation:  # the graph's node kinds are the whole model's, not the head's
            return True
        if inputs.by_backward:
            return False
        return suits_vmap(inputs.kinds) if self.choice is None else True

    def settle(self, inputs: BackwardInputs) -> None:
        """Keeps the choice of a call that went through (``vectorize=None``, first call)."""
        if self.choice is None and not inputs.by_backward and not torch.is_anomaly_enabled():
            self.choice = suits_vmap(inputs.kinds)

    def blocks(
        self,
        inputs: BackwardInputs,
        tensors: Sequence[torch.Tensor],
        rho: torch.Tensor,
        *,
        retain_graph: bool,
        at_representation: bool = False,
    ) -> engine.Blocks:
        """Per-task gradients ``ρ_i ∇L_i`` of the losses for ``tensors``
        (:func:`gradbalance._engine.task_gradients`), vmapped or by k passes as
        :meth:`vectorized` says; a vmapped backward that vmap cannot run falls back to the k
        passes (``vectorize=None``, before any vmapped backward succeeded in this run: the first
        try then keeps the graph for them)."""
        losses = inputs.losses
        if not self.vectorized(inputs, at_representation=at_representation):
            return engine.task_gradients(
                losses,
                rho,
                tensors,
                vectorize=False,
                retain_graph=retain_graph,
                by_backward=inputs.by_backward and not at_representation,
            )
        may_fall_back = not self.fixed and not self._vmap_ran
        try:
            blocks = engine.task_gradients(
                losses, rho, tensors, vectorize=True, retain_graph=retain_graph or may_fall_back
            )
        except RuntimeError as error:
            if not (may_fall_back and is_vmap_failure(error)):
                raise
            warnings.warn(
                f"the vectorised per-task backward failed ({error}); using "
                f"{len(losses)} sequential backward passes from now on",
                stacklevel=_first_frame_outside_the_package(),
            )
            self.choice = False
            return engine.task_gradients(
                losses, rho, tensors, vectorize=False, retain_graph=retain_graph
            )
        self._vmap_ran = True
        return blocks

    def state_dict(self) -> dict[str, Any]:
        """The choice (None: not made yet). ``"probes"`` and ``"best"`` are constant fields of the
        state's layout (version 2), which every saved state holds."""
        return {"choice": self.choice, "probes": 0, "best": [math.inf, math.inf]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Loads a :meth:`state_dict`; a fixed ``vectorize`` stays as it is."""
        if not self.fixed:
            self.choice = state["choice"]


def _first_frame_outside_the_package() -> int:
    """The ``stacklevel`` at which a warning issued by the caller points at the first frame
    outside gradbalance (the user's line), whatever the depth of the calls in between."""
    level, frame = 1, sys._getframe(1)  # level 1: the caller, which issues the warning
    while frame is not None and frame.f_code.co_filename.startswith(_PACKAGE):
        level, frame = level + 1, frame.f_back
    return level
