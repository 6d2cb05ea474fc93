"""Balanced distillation inside timm's training tasks (``timm.task``, timm >= 1.0.31).

timm's distillation tasks — ``LogitDistillationTask``, ``FeatureDistillationTask`` and
``TokenDistillationTask`` — return ``{"loss", "output", "task_loss", "kd_loss"}`` (the token task
names its distillation loss ``"distill_loss"``), where ``"loss"`` is the fixed weighting
``task_loss_weight · task_loss + distill_loss_weight · kd_loss``. timm's ``train.py`` hands
``"loss"`` to its loss scaler (``timm.utils.NativeScaler``), which runs the backward and, on the
micro-batch that ends an accumulation window, unscales, clips and steps.

:class:`BalancedScaler` takes that scaler's place and the task's whole output instead of
``"loss"``: it balances the distillation and the task loss with a :class:`gradbalance.Balancer`,
then unscales, clips and steps as ``NativeScaler`` does. :class:`ProjectedFeatureDistillationTask`
is timm's feature task with a gradbalance projector in place of its ``nn.Linear``.

This module imports timm (``pip install gradbalance[timm]``); ``import gradbalance`` does not.
docs/integrations/timm.md says why a scaler rather than a task subclass, and what is kept.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch
from timm.task import FeatureDistillationTask
from timm.task.distillation import FeatureDistillationTrainableModule
from timm.utils import dispatch_clip_grad
from torch import Tensor, nn

from .._balancer import Balancer
from ..projectors import IndefiniteSubspaceProjector, VkDProjector

__all__ = [
    "BalancedScaler",
    "ProjectedFeatureDistillationTask",
    "ProjectedFeatureModule",
    "task_losses",
]

# The distillation loss's key: Logit- and FeatureDistillationTask's, then TokenDistillationTask's.
DISTILL_KEYS = ("kd_loss", "distill_loss")


def task_losses(result: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """The two losses of a timm distillation task's output, named for a Balancer:
    ``{"distill": kd_loss (or distill_loss), "task": task_loss}``.

    Distillation first, because the Balancer's statistics read the first two losses as
    (distillation, task). The fixed-weight ``"loss"`` is left out: it is what balancing replaces.

    Raises:
        TypeError: ``result`` is not a mapping (say, the task's ``"loss"`` where train.py's
            ``_backward(loss)`` was left as it was).
        KeyError: ``result`` lacks ``"task_loss"`` or a distillation loss (a
            ``ClassificationTask`` returns only ``"loss"``: there is nothing to balance).
    """
    if not isinstance(result, Mapping):
        raise TypeError(
            f"expected the task's output, a dict with 'task_loss' and 'kd_loss', got "
            f"{type(result).__name__}: pass `result`, not `result['loss']`"
        )
    distill = next((key for key in DISTILL_KEYS if key in result), None)
    if distill is None or "task_loss" not in result:
        raise KeyError(
            f"a timm distillation task's output holds 'task_loss' and one of {DISTILL_KEYS}; "
            f"got the keys {sorted(result)}"
        )
    return {"distill": result[distill], "task": result["task_loss"]}


class BalancedScaler:
    """timm's loss scaler with the balanced backward: it replaces ``timm.utils.NativeScaler`` in
    ``train.py``'s ``train_one_epoch`` and is called with the task's output, not its ``"loss"``.

    ``scaler(result, optimizer, clip_grad=..., clip_mode=..., parameters=..., need_update=...)``
    does what ``NativeScaler`` does, in its order, with a balanced backward:

    1. ``balancer.backward(task_losses(result), optimizer.param_groups,
       accumulate=not need_update, grad_scaler=grad_scaler)``: π from the gradients of the
       optimizer's parameters. A micro-batch that does not update is held by the Balancer, and
       the one that updates balances the mean of the window, so the losses must not be divided by
       the accumulation steps (train.py divides ``"loss"`` only, which the scaler does not read);
    2. where ``need_update``: ``grad_scaler.unscale_(optimizer)`` and
       ``timm.utils.dispatch_clip_grad(parameters, clip_grad, clip_mode)`` when ``clip_grad`` is
       set, then ``grad_scaler.step(optimizer)`` and ``grad_scaler.update()``.

    Args:
        balancer: the balancing (default ``Balancer()``, exact mode). With a
            :class:`gradbalance.MultiObjectiveOptimizer` as the optimizer, pass its
            ``balancer``: the scaler then computes what ``opt.backward`` would.
        grad_scaler: a ``torch.amp.GradScaler`` for float16 autocast, as ``NativeScaler`` holds
            one; default a disabled one, with which the optimizer steps on ``.grad`` as it is
            (train.py without a loss scaler).

    :meth:`state_dict` holds the grad scaler's and the balancer's state; timm's
    ``CheckpointSaver`` saves it under :attr:`state_dict_key`, where ``resume_task_checkpoint``
    finds it.
    """

    state_dict_key = "balanced_scaler"

    def __init__(
        self, balancer: Balancer | None = None, grad_scaler: torch.amp.GradScaler | None = None
    ) -> None:
        self.balancer = Balancer() if balancer is None else balancer
        self.grad_scaler = (
            torch.amp.GradScaler("cpu", enabled=False) if grad_scaler is None else grad_scaler
        )

    def __call__(
        self,
        result: Mapping[str, Tensor],
        optimizer: torch.optim.Optimizer,
        clip_grad: float | None = None,
        clip_mode: str = "norm",
        parameters: Iterable[Tensor] | None = None,
        create_graph: bool = False,
        need_update: bool = True,
    ) -> None:
        """The balanced backward of the task's output ``result``; then, where ``need_update``,
        clipping and the optimizer's step (the class says how). Arguments as ``NativeScaler``'s.

        Raises:
            ValueError: ``create_graph`` (second-order optimizers are not supported), or
                ``clip_grad`` without ``parameters``; before anything changes.
        """
        if create_graph:
            raise ValueError("create_graph=True (a second-order optimizer) is not supported")
        if clip_grad is not None and parameters is None:
            raise ValueError("clip_grad needs the parameters to clip: task.get_clip_parameters()")
        self.balancer.backward(
            task_losses(result),
            optimizer.param_groups,
            accumulate=not need_update,
            grad_scaler=self.grad_scaler,
        )
        if need_update:
            self._update(optimizer, clip_grad, clip_mode, parameters)

    def _update(
        self,
        optimizer: torch.optim.Optimizer,
        clip_grad: float | None,
        clip_mode: str,
        parameters: Iterable[Tensor] | None,
    ) -> None:
        """NativeScaler's update: unscale and clip if asked, step (which the grad scaler skips
        after an overflow), update the scale."""
        if clip_grad is not None:
            self.grad_scaler.unscale_(optimizer)
            dispatch_clip_grad(parameters, clip_grad, mode=clip_mode)
        self.grad_scaler.step(optimizer)
        self.grad_scaler.update()

    def state_dict(self) -> dict[str, Any]:
        """The grad scaler's and the balancer's state."""
        return {
            "grad_scaler": self.grad_scaler.state_dict(),
            "balancer": self.balancer.state_dict(),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restores what :meth:`state_dict` returned."""
        self.grad_scaler.load_state_dict(state["grad_scaler"])
        self.balancer.load_state_dict(state["balancer"])


class ProjectedFeatureModule(FeatureDistillationTrainableModule):
    """timm's feature-distillation trainable module (``student`` and ``projection``) whose
    projection is a gradbalance projector, applied inside ``forward``: every trainable operation
    stays in the module that ``prepare_distributed`` wraps in DDP, as timm's design asks."""

    def forward(self, input: Tensor, teacher_features: Tensor) -> tuple[Tensor, Tensor]:
        """(the student's logits, the projector's loss between the student's pooled pre-logits
        and ``teacher_features``)."""
        feature_map = self.student.forward_features(input)
        logits = self.student.forward_head(feature_map)
        features = self.student.forward_head(feature_map, pre_logits=True)
        return logits, self.projection.loss(features, teacher_features)


class ProjectedFeatureDistillationTask(FeatureDistillationTask):
    """timm's ``FeatureDistillationTask`` with a gradbalance projector in place of its
    ``nn.Linear``.

    ``kd_loss`` is the projector's loss ``projector.loss(z_s, z_t)`` on the pooled pre-logits —
    smooth-L1 between the projected student and the (projected) layer-normed teacher
    (docs/projectors.md) — instead of the MSE between the linearly projected student and the raw
    teacher. The rest is the task's own: the teacher and its input normalisation, the criterion,
    the fixed weights of ``"loss"`` (for timm's stock loop), ``prepare_distributed``, ``compile``,
    the EMA model, checkpoints (the projector's state is the task state ``"projection"``) and
    ``get_clip_parameters`` (which includes the projector).

    Args:
        student_model, teacher_model: as for ``FeatureDistillationTask``.
        projector: a :class:`gradbalance.VkDProjector` or
            :class:`gradbalance.IndefiniteSubspaceProjector` for the widths of the teacher's and
            the student's pre-logits (their ``num_features``); moved to the task's device and
            dtype.
        **kwargs: ``FeatureDistillationTask``'s other arguments (criterion, loss weights, device,
            dtype, …). Its feature widths only size the ``nn.Linear`` that the projector replaces.
    """

    def __init__(
        self,
        student_model: nn.Module,
        teacher_model: str | nn.Module,
        projector: VkDProjector | IndefiniteSubspaceProjector,
        **kwargs: Any,
    ) -> None:
        super().__init__(student_model, teacher_model, **kwargs)
        projector = projector.to(device=self.device, dtype=self.dtype)
        self.trainable_module = ProjectedFeatureModule(student_model, projector)

    def forward(self, input: Tensor, target: Tensor) -> dict[str, Tensor]:
        """FeatureDistillationTask's output, with the projector's loss as ``kd_loss``."""
        with torch.no_grad():
            input_kd = self.teacher.normalize_input(input, self.student_mean, self.student_std)
            teacher_features = self.teacher(input_kd.detach(), return_features=True)
        logits, kd_loss = self.trainable_module(input, teacher_features)
        task_loss = self.criterion(logits, target)
        loss = self.task_loss_weight * task_loss + self.distill_loss_weight * kd_loss
        return {"loss": loss, "output": logits, "task_loss": task_loss, "kd_loss": kd_loss}
