"""The step functions that the benchmarks time: one model, one batch, several ways to step.

Every workload builds its own copy of the same MLP (same seed) and returns a no-argument callable
that performs one full training step (forward, backward, optimizer step) on a fixed batch.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from gradbalance import MultiObjectiveOptimizer

Step = Callable[[], None]


class Batch:
    """A fixed batch for a two-objective problem: MSE to a target (distill) and CE (task)."""

    def __init__(self, features: int = 512, classes: int = 10, size: int = 256) -> None:
        generator = torch.Generator().manual_seed(0)
        self.inputs = torch.randn(size, features, generator=generator)
        self.targets = torch.randn(size, classes, generator=generator)
        self.labels = torch.randint(0, classes, (size,), generator=generator)

    def losses(self, model: torch.nn.Module) -> list[torch.Tensor]:
        outputs = model(self.inputs)
        return [F.mse_loss(outputs, self.targets), F.cross_entropy(outputs, self.labels)]


def mlp(
    width: int = 1024, depth: int = 2, features: int = 512, classes: int = 10
) -> torch.nn.Module:
    """``depth`` hidden layers of ``width`` units; width 1024, depth 2 is 1.6 M parameters."""
    torch.manual_seed(0)
    layers: list[torch.nn.Module] = []
    size = features
    for _ in range(depth):
        layers += [torch.nn.Linear(size, width), torch.nn.ReLU()]
        size = width
    layers.append(torch.nn.Linear(size, classes))
    return torch.nn.Sequential(*layers)


def plain_adamw(batch: Batch, **model_kwargs) -> Step:
    """The baseline: AdamW on the summed loss (fused, as gradbalance's default base)."""
    model = mlp(**model_kwargs)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)

    def step() -> None:
        optimizer.zero_grad()
        sum(batch.losses(model)).backward()
        optimizer.step()

    return step


def gradbalance_step(batch: Batch, mode: str, **model_kwargs) -> Step:
    model = mlp(**model_kwargs)
    optimizer = MultiObjectiveOptimizer(model.parameters(), mode=mode, lr=1e-4, fused=True)

    def step() -> None:
        optimizer.zero_grad()
        optimizer.backward(batch.losses(model))
        optimizer.step()

    return step


def torchjd_mgda(batch: Batch, **model_kwargs) -> Step:
    """torchjd's MGDA on the same log-losses: Jacobian by autojac, aggregation, fused AdamW."""
    from torchjd.aggregation import MGDA
    from torchjd.autojac import backward, jac_to_grad

    model = mlp(**model_kwargs)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    aggregator = MGDA()

    def step() -> None:
        optimizer.zero_grad()
        backward([loss.log() for loss in batch.losses(model)])
        jac_to_grad(model.parameters(), aggregator)
        optimizer.step()

    return step


def workloads(batch: Batch, **model_kwargs) -> dict[str, Step]:
    return {
        "adamw (summed loss)": plain_adamw(batch, **model_kwargs),
        "gradbalance amortized": gradbalance_step(batch, "amortized", **model_kwargs),
        "gradbalance exact": gradbalance_step(batch, "exact", **model_kwargs),
        "torchjd MGDA": torchjd_mgda(batch, **model_kwargs),
    }
