"""What the framework integrations share: the named losses a user returns, and what they log
after each balanced step."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from .. import Balancer


def named_losses(losses: Any, returned_by: str) -> dict[str, torch.Tensor]:
    """``losses`` as a dict of names to tensors; ``returned_by`` names what returned them
    (``"a BalancedModule's training_step"``, ``"compute_losses"``) in the error.

    Raises:
        TypeError: ``losses`` is not a mapping, or one of its values is not a tensor.
    """
    if not isinstance(losses, Mapping):
        raise TypeError(
            f"{returned_by} returns its losses by name, a dict such as "
            f"{{'distill': ..., 'task': ...}}; got {type(losses).__name__}"
        )
    for name, loss in losses.items():
        if not isinstance(loss, torch.Tensor):
            raise TypeError(
                f"{returned_by}'s loss {name!r} must be a tensor, got {type(loss).__name__}"
            )
    return dict(losses)


def balancing_metrics(balancer: Balancer) -> dict[str, torch.Tensor]:
    """The last balanced step's ``pi_<name>`` for each loss, and, where its mode computed the
    Gram matrix ``G_ij = ⟨g_i, g_j⟩`` of the log-loss gradients (exact, affine and
    representation modes; amortized mode every ``stats_every`` steps), the paper's conflict
    ``grc`` ``= G_12`` and dominance ``grd`` ``= sqrt(G_11 / G_22)``; 0-d float32 tensors on
    the balancer's device (logging them reads nothing back to the host)."""
    metrics = {f"pi_{name}": weight for name, weight in balancer.named_weights.items()}
    if "conflict" in balancer.stats:
        metrics["grc"] = balancer.stats["conflict"]
        metrics["grd"] = balancer.stats["dominance"]
    return {name: value.to(torch.float32) for name, value in metrics.items()}
