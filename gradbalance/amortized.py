"""Amortized weighting (SPEC §3, FAMO by Liu et al. 2023): π from logits learned on loss decrease.

No per-task gradients: π = softmax(w), and w is updated after each step so that the task whose
log-loss decreased least gets more weight. State: the logits w ∈ R^k (initialised to 0, π = 1/k)
and the optimizer that steps them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch

__all__ = ["FamoLogits", "log_loss_decrease", "logit_gradient"]

# Added to L − m before every logarithm, as in FAMO, so a loss that reaches its bound stays finite.
FAMO_EPSILON = 1e-8

OptimizerFactory = Callable[[Iterable[torch.Tensor]], torch.optim.Optimizer]


def log_loss_decrease(
    previous: torch.Tensor, current: torch.Tensor, min_losses: torch.Tensor
) -> torch.Tensor:
    """``δ_i = log(L_prev,i − m_i + ε) − log(L_curr,i − m_i + ε)``, ``(k,)``."""
    return torch.log(previous - min_losses + FAMO_EPSILON) - torch.log(
        current - min_losses + FAMO_EPSILON
    )


def logit_gradient(logits: torch.Tensor, decrease: torch.Tensor) -> torch.Tensor:
    """The logits' gradient ``J_softmax(w)ᵀ δ``, ``(k,)``.

    ``(∇_w)_j = z_j (δ_j − Σ_i z_i δ_i)`` with ``z = softmax(w)``.
    """
    weights = torch.softmax(logits, dim=0)
    return weights * (decrease - (weights * decrease).sum())


class FamoLogits:
    """The logits w of the amortized weighting and the optimizer that updates them.

    Args:
        num_tasks: k.
        make_optimizer: builds the π optimizer from ``[w]`` (the paper: AdamW, lr 0.025,
            weight decay 0.01).
        device: of w.
        dtype: of w.
    """

    def __init__(
        self,
        num_tasks: int,
        make_optimizer: OptimizerFactory,
        *,
        device: torch.device,
        dtype: torch.dtype,
    ) -> None:
        self.logits = torch.zeros(num_tasks, device=device, dtype=dtype, requires_grad=True)
        self.optimizer = make_optimizer([self.logits])

    @property
    def weights(self) -> torch.Tensor:
        """π = softmax(w), ``(k,)``."""
        return torch.softmax(self.logits.detach(), dim=0)

    def update(
        self, previous: torch.Tensor, current: torch.Tensor, min_losses: torch.Tensor
    ) -> None:
        """One π-optimizer step from the losses before (``previous``) and after (``current``)."""
        decrease = log_loss_decrease(previous, current, min_losses).to(self.logits.dtype)
        self.logits.grad = logit_gradient(self.logits.detach(), decrease)
        self.optimizer.step()

    def state_dict(self) -> dict[str, Any]:
        return {"logits": self.logits.detach().clone(), "optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        logits = state["logits"]
        if logits.shape != self.logits.shape:
            raise ValueError(
                f"saved logits have shape {tuple(logits.shape)}, "
                f"expected {tuple(self.logits.shape)}"
            )
        with torch.no_grad():
            self.logits.copy_(logits)
        self.optimizer.load_state_dict(state["optimizer"])
