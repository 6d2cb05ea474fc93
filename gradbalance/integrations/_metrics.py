"""What the framework integrations log after each balanced step."""

from __future__ import annotations

import torch

from .. import Balancer


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
