"""Amortized weighting (FAMO, Liu et al. 2023): π from logits learned on the loss decrease.

The math is docs/method.md's, "Amortized mode".

No per-task gradients: π = softmax(w), and w is updated after each step so that the task whose
log-loss decreased least gets more weight. The state — the logits w ∈ R^k (initialised to 0,
π = 1/k) and the moments of the small Adam(W) that steps them — is an immutable
:class:`FamoState`; :func:`famo_update` returns a new one. Being functional lets the optimizer
compute the next state, validate the step, and only then keep it, with no snapshot to restore.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any, Literal

import torch

__all__ = [
    "FAMO_EPSILON",
    "FamoHyperparameters",
    "FamoState",
    "famo_update",
    "log_loss_decrease",
    "logit_gradient",
]

# Added to L − m before every logarithm, as in FAMO, so a loss that reaches its bound stays finite.
FAMO_EPSILON = 1e-8

PiOptimizer = Literal["adamw", "adam"]


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


@dataclass(frozen=True)
class FamoHyperparameters:
    """The π optimizer: ``"adamw"`` (decoupled weight decay, the paper) or ``"adam"`` (L2 decay
    added to the gradient, FAMO's code); identical when ``weight_decay == 0``."""

    lr: float = 0.025
    weight_decay: float = 0.01
    optimizer: PiOptimizer = "adamw"
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8

    def __post_init__(self) -> None:
        if self.optimizer not in ("adamw", "adam"):
            raise ValueError(f"pi_optimizer must be 'adamw' or 'adam', got {self.optimizer!r}")
        if not self.lr >= 0 or not self.weight_decay >= 0:
            raise ValueError(
                f"pi_lr and pi_weight_decay must be ≥ 0, got {self.lr} and {self.weight_decay}"
            )


@dataclass(frozen=True)
class FamoState:
    """Logits w ``(k,)``, the last logit gradient, Adam moments ``(k,)`` and the step count."""

    logits: torch.Tensor
    grad: torch.Tensor
    exp_avg: torch.Tensor
    exp_avg_sq: torch.Tensor
    step: int | torch.Tensor = 0  # a float64 0-d tensor once selected on the device

    @classmethod
    def initial(cls, num_tasks: int, device: torch.device, dtype: torch.dtype) -> FamoState:
        zeros = torch.zeros(num_tasks, device=device, dtype=dtype)
        return cls(zeros, zeros, zeros, zeros)

    @property
    def weights(self) -> torch.Tensor:
        """π = softmax(w), ``(k,)``."""
        return torch.softmax(self.logits, dim=0)

    def to(self, device: torch.device, dtype: torch.dtype) -> FamoState:
        """The same state on ``device`` in ``dtype``."""
        if self.logits.device == device and self.logits.dtype == dtype:
            return self
        tensors = {name: getattr(self, name).to(device, dtype) for name in _TENSORS}
        return replace(self, **tensors)

    def where(self, ok: torch.Tensor, other: FamoState) -> FamoState:
        """This state where the 0-d bool ``ok`` holds, else ``other``, on the device (the step
        count becomes a float64 tensor: no host synchronisation)."""
        tensors = {
            name: torch.where(ok, getattr(self, name), getattr(other, name).to(getattr(self, name)))
            for name in _TENSORS
        }
        new, old = (_step_on(state.step, ok.device) for state in (self, other))
        return replace(self, **tensors, step=torch.where(ok, new, old))

    def state_dict(self) -> dict[str, Any]:
        """Plain Python numbers (float64 holds float32 and float16 values exactly)."""
        state = {name: getattr(self, name).tolist() for name in _TENSORS}
        return {**state, "step": int(self.step)}

    @staticmethod
    def empty_state_dict() -> dict[str, Any]:
        """The :meth:`state_dict` layout with no state yet (no k known)."""
        return {**{name: [] for name in _TENSORS}, "step": 0}

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> FamoState:
        """The state of :meth:`state_dict`, as float64 CPU tensors (:meth:`to` moves it)."""
        tensors = {name: torch.tensor(state[name], dtype=torch.float64) for name in _TENSORS}
        return cls(**tensors, step=int(state["step"]))


_TENSORS = ("logits", "grad", "exp_avg", "exp_avg_sq")


def _step_on(step: int | torch.Tensor, device: torch.device) -> torch.Tensor:
    """The step count as a float64 0-d tensor on ``device``, made there (no copy from the host)."""
    if isinstance(step, torch.Tensor):
        return step.to(device, torch.float64)
    return torch.full((), step, dtype=torch.float64, device=device)


def famo_update(
    state: FamoState,
    previous: torch.Tensor,
    current: torch.Tensor,
    min_losses: torch.Tensor,
    hyper: FamoHyperparameters,
) -> FamoState:
    """One π-optimizer step from the losses before (``previous``) and after (``current``) a step.

    Pure: returns the new state. The step is torch's Adam/AdamW on w with gradient
    ``J_softmax(w)ᵀ δ`` (:func:`logit_gradient`): bias-corrected moments, ``eps`` added to the
    corrected square root, weight decay decoupled (``"adamw"``) or added to the gradient
    (``"adam"``).
    """
    decrease = log_loss_decrease(previous, current, min_losses).to(state.logits.dtype)
    grad = logit_gradient(state.logits, decrease)
    logits = state.logits
    if hyper.optimizer == "adamw":
        logits = logits * (1 - hyper.lr * hyper.weight_decay)
        update_grad = grad
    else:
        update_grad = grad + hyper.weight_decay * state.logits
    beta1, beta2 = hyper.betas
    step = state.step + 1
    exp_avg = torch.lerp(state.exp_avg, update_grad, 1 - beta1)
    exp_avg_sq = beta2 * state.exp_avg_sq + (1 - beta2) * update_grad.square()
    bias = 1 - beta2**step
    root = math.sqrt(bias) if isinstance(bias, float) else bias.sqrt()  # a tensor on the device
    denominator = exp_avg_sq.sqrt() / root + hyper.eps
    logits = logits - (hyper.lr / (1 - beta1**step)) * (exp_avg / denominator)
    return FamoState(logits, grad, exp_avg, exp_avg_sq, step)
