"""The step functions that the benchmarks time: one model, one batch, several ways to step.

Every workload builds its own copy of the same MLP (same seed) and returns a no-argument callable
that performs one full training step (forward, backward, optimizer step) on a fixed batch of k
objectives. ``mlp_shape(n)`` gives the MLP of about ``n`` parameters used for the scaling tables;
``gram_calls`` the kernel-level operations timed against one read of the gradients. The
``*_step(batch, model)`` functions build the same steps for any model (``floor.py`` uses them).
"""

from __future__ import annotations

import bisect
from collections.abc import Callable

import torch
import torch.nn.functional as F

from gradbalance import MultiObjectiveOptimizer
from gradbalance import _kernels as kernels

Step = Callable[[], None]

FEATURES = 512
CLASSES = 10

ADAMW = "adamw (summed loss)"
AMORTIZED = "gradbalance amortized"
EXACT = "gradbalance exact"
EXACT_HIDDEN = "gradbalance exact, hidden layers only"
TORCHJD = "torchjd MGDA"


class Batch:
    """A fixed batch for k objectives: MSE to a target (distill), CE (task), then k − 2 more MSEs.

    The extra MSE losses pull the outputs towards other fixed random targets, drawn after the
    first two objectives' data so that k = 2 is exactly the original two-loss batch. ``features``
    is the shape of one input (an int for a vector); the data is drawn on the CPU, then moved to
    ``device``, so every device sees the same batch.
    """

    def __init__(
        self,
        num_losses: int = 2,
        features: int | tuple[int, ...] = FEATURES,
        classes: int = CLASSES,
        size: int = 256,
        device: torch.device | str = "cpu",
    ) -> None:
        if num_losses < 2:
            raise ValueError(f"a multi-objective batch needs at least 2 losses, got {num_losses}")
        shape = (features,) if isinstance(features, int) else tuple(features)
        generator = torch.Generator().manual_seed(0)
        self.inputs = torch.randn(size, *shape, generator=generator).to(device)
        first_target = torch.randn(size, classes, generator=generator)
        self.labels = torch.randint(0, classes, (size,), generator=generator).to(device)
        self.targets = [first_target.to(device)] + [
            torch.randn(size, classes, generator=generator).to(device)
            for _ in range(num_losses - 2)
        ]

    def losses(self, model: torch.nn.Module) -> list[torch.Tensor]:
        return self.losses_of(model(self.inputs))

    def losses_of(self, outputs: torch.Tensor) -> list[torch.Tensor]:
        """The k losses of the model's ``outputs`` on this batch."""
        distill, *extra = (F.mse_loss(outputs, target) for target in self.targets)
        return [distill, F.cross_entropy(outputs, self.labels), *extra]


def parameter_count(
    width: int, depth: int, features: int = FEATURES, classes: int = CLASSES
) -> int:
    """Weights and biases of ``mlp(width, depth, features, classes)``."""
    hidden = (features + 1) * width + (depth - 1) * (width + 1) * width
    return hidden + (width + 1) * classes


def mlp_shape(n: float, depth: int = 2) -> dict[str, int]:
    """``mlp`` keyword arguments for about ``n`` parameters: the width that comes closest.

    The depth stays fixed (2, as in the 1.6 M step table) so that only n changes from one size to
    the next: the number of parameter tensors, which sets the per-tensor launches, is the same.
    """
    widths = range(1, int(n) + 1)
    above = bisect.bisect_left(widths, n, key=lambda width: parameter_count(width, depth))
    candidates = widths[max(above - 1, 0) : above + 1]
    width = min(candidates, key=lambda width: abs(parameter_count(width, depth) - n))
    return {"width": width, "depth": depth}


def mlp(
    width: int = 1024, depth: int = 2, features: int = FEATURES, classes: int = CLASSES
) -> torch.nn.Sequential:
    """``depth`` hidden layers of ``width`` units; width 1024, depth 2 is 1.6 M parameters."""
    torch.manual_seed(0)
    layers: list[torch.nn.Module] = []
    size = features
    for _ in range(depth):
        layers += [torch.nn.Linear(size, width), torch.nn.ReLU()]
        size = width
    layers.append(torch.nn.Linear(size, classes))
    return torch.nn.Sequential(*layers)


def plain_adamw(batch: Batch, **model_kwargs: int) -> Step:
    """The baseline: AdamW on the summed loss (fused, as gradbalance's default base)."""
    return adamw_step(batch, mlp(**model_kwargs))


def adamw_step(batch: Batch, model: torch.nn.Module) -> Step:
    """AdamW (fused) on the summed loss of ``batch`` for any ``model``."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)

    def step() -> None:
        optimizer.zero_grad()
        sum(batch.losses(model)).backward()
        optimizer.step()

    return step


def gradbalance_step(
    batch: Batch, model: torch.nn.Module, optimizer: MultiObjectiveOptimizer
) -> Step:
    """A gradbalance step for any ``model``: zero_grad, ``optimizer.backward(losses)``, step."""

    def step() -> None:
        optimizer.zero_grad()
        optimizer.backward(batch.losses(model))
        optimizer.step()

    return step


def gradbalance_amortized(batch: Batch, **model_kwargs: int) -> Step:
    model = mlp(**model_kwargs)
    optimizer = MultiObjectiveOptimizer(model.parameters(), mode="amortized", lr=1e-4, fused=True)
    return gradbalance_step(batch, model, optimizer)


def gradbalance_exact(batch: Batch, **model_kwargs: int) -> Step:
    model = mlp(**model_kwargs)
    optimizer = MultiObjectiveOptimizer(model.parameters(), mode="exact", lr=1e-4, fused=True)
    return gradbalance_step(batch, model, optimizer)


def gradbalance_exact_hidden(batch: Batch, **model_kwargs: int) -> Step:
    """Exact mode with the output layer left out of the Gram matrix (``"balance": False``)."""
    model = mlp(**model_kwargs)
    groups = [
        {"params": model[:-1].parameters()},
        {"params": model[-1].parameters(), "balance": False},
    ]
    optimizer = MultiObjectiveOptimizer(groups, mode="exact", lr=1e-4, fused=True)
    return gradbalance_step(batch, model, optimizer)


def torchjd_mgda(batch: Batch, **model_kwargs: int) -> Step:
    """torchjd's MGDA on the same log-losses: Jacobian by autojac, aggregation, fused AdamW."""
    return torchjd_step(batch, mlp(**model_kwargs))


def torchjd_step(batch: Batch, model: torch.nn.Module) -> Step:
    """torchjd's MGDA step on the log-losses of ``batch`` for any ``model``."""
    from torchjd.aggregation import MGDA
    from torchjd.autojac import backward, jac_to_grad

    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    aggregator = MGDA()

    def step() -> None:
        optimizer.zero_grad()
        backward([loss.log() for loss in batch.losses(model)])
        jac_to_grad(model.parameters(), aggregator)
        optimizer.step()

    return step


WORKLOADS: dict[str, Callable[..., Step]] = {
    ADAMW: plain_adamw,
    AMORTIZED: gradbalance_amortized,
    EXACT: gradbalance_exact,
    EXACT_HIDDEN: gradbalance_exact_hidden,
    TORCHJD: torchjd_mgda,
}


def workloads(batch: Batch, names: list[str] | None = None, **model_kwargs: int) -> dict[str, Step]:
    """The step of each named workload (default: all), each on its own copy of the model."""
    return {name: WORKLOADS[name](batch, **model_kwargs) for name in names or WORKLOADS}


def gram_calls(k: int, n: int) -> dict[str, Callable[[], object]]:
    """One read of a float32 ``(k, n)`` buffer, its Gram matrix, and Gram + combine.

    Reading the k·n gradients once (``sum``) is the memory-traffic floor of any Gram computation.
    The combination goes into a preallocated buffer, as in the optimizer (whose views are .grad).
    """
    flat = torch.randn(k, n)
    coefficients = torch.full((k,), 1 / k, dtype=torch.float64)
    out = torch.empty(n)

    def gram_and_combine() -> None:
        kernels.gram(flat)
        kernels.combine(flat, coefficients, out, accumulate=False)

    return {
        "read once": flat.sum,
        "gram": lambda: kernels.gram(flat),
        "gram + combine": gram_and_combine,
    }
