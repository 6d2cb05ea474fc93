"""Balanced distillation inside timm's training tasks (``timm.task``, timm >= 1.0.31).

timm's distillation tasks — ``LogitDistillationTask``, ``FeatureDistillationTask`` and
``TokenDistillationTask`` — return ``{"loss", "output", "task_loss", "kd_loss"}`` (the token task
names its distillation loss ``"distill_loss"``), where ``"loss"`` is the fixed weighting
``task_loss_weight · task_loss + distill_loss_weight · kd_loss``. timm's ``train.py`` hands
``"loss"`` to its loss scaler (``timm.utils.NativeScaler``), which runs the backward and, on the
micro-batch that ends an accumulation window, unscales, clips and steps.

:class:`BalancedScaler` takes that scaler's place and the task's whole output instead of
``"loss"``: it balances the distillation and the task loss with a :class:`gradbalance.Balancer`,
then unscales, clips and steps as ``NativeScaler`` does. Given the output of a task without a
distillation loss (``ClassificationTask``: training the teacher) it is ``NativeScaler``. It keeps
π, GrC and GrD of the updates for train.py's log lines and summary.csv
(:meth:`BalancedScaler.log_text`, :meth:`BalancedScaler.epoch_metrics`).
:class:`ProjectedFeatureDistillationTask` is timm's feature task with a gradbalance projector in
place of its ``nn.Linear``.

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

from .. import Balancer
from ..projectors import IndefiniteSubspaceProjector, VkDProjector

__all__ = [
    "BalancedScaler",
    "ProjectedFeatureDistillationTask",
    "ProjectedFeatureModule",
    "task_losses",
]

# The distillation loss's key: Logit- and FeatureDistillationTask's, then TokenDistillationTask's.
DISTILL_KEYS = ("kd_loss", "distill_loss")


def _distill_key(result: Mapping[str, Tensor]) -> str | None:
    """The key of ``result``'s distillation loss; None for a task without one."""
    return next((key for key in DISTILL_KEYS if key in result), None)


def _check_output(result: Any) -> None:
    if not isinstance(result, Mapping):
        raise TypeError(
            f"expected the task's output, a dict with 'task_loss' and 'kd_loss', got "
            f"{type(result).__name__}: pass `result`, not `result['loss']`"
        )


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
    _check_output(result)
    distill = _distill_key(result)
    if distill is None or "task_loss" not in result:
        raise KeyError(
            f"a timm distillation task's output holds 'task_loss' and one of {DISTILL_KEYS}; "
            f"got the keys {sorted(result)}"
        )
    return {"distill": result[distill], "task": result["task_loss"]}


class _Meter:
    """Sums of per-update values on their device, so that an update reads nothing back to the
    host; :meth:`means` reads them all at once."""

    def __init__(self) -> None:
        self._sums: dict[str, Tensor] = {}
        self._counts: dict[str, int] = {}

    def add(self, values: Mapping[str, Tensor]) -> None:
        for name, value in values.items():
            self._sums[name] = self._sums.get(name, 0) + value.detach().double()
            self._counts[name] = self._counts.get(name, 0) + 1

    def means(self) -> dict[str, Tensor]:
        return {name: total / self._counts[name] for name, total in self._sums.items()}


def _read(values: Mapping[str, Tensor]) -> dict[str, float]:
    """``values`` on the host, with one read of the device."""
    if not values:
        return {}
    numbers = torch.stack([value.double() for value in values.values()]).tolist()
    return dict(zip(values, numbers, strict=True))


def _update_values(balancer: Balancer) -> dict[str, Tensor]:
    """π by loss name (``pi_distill``, ``pi_task``), GrC ``⟨g_distill, g_task⟩``, GrD
    ``‖g_distill‖ / ‖g_task‖`` and their cosine (``cos``) of the balanced update (where the mode
    computed the Gram matrix), and ``pi_vertex``: 1 where π is a vertex of the simplex (a π_i is
    0: for two losses the other is 1), else 0. For two losses π(distill) = 1 exactly when
    cos ≥ GrD, and π(task) = 1 when cos ≥ 1 / GrD."""
    values = {f"pi_{name}": pi for name, pi in balancer.named_weights.items()}
    stats = balancer.stats
    if "conflict" in stats:
        values |= {
            "grc": stats["conflict"],
            "grd": stats["dominance"],
            "cos": stats["cosine"][0, 1],
        }
    values["pi_vertex"] = (balancer.weights.min() == 0).double()
    return values


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

    A ``result`` without a distillation loss (``ClassificationTask``'s ``{"loss", "output"}``:
    train.py without ``--kd-model-name``) has nothing to balance: step 1 is then
    ``NativeScaler``'s ``grad_scaler.scale(result["loss"]).backward(create_graph=...)``, and the
    scaler is ``NativeScaler`` (train.py's path without a scaler when the grad scaler is
    disabled).

    Args:
        balancer: the balancing (default ``Balancer()``, exact mode). With a
            :class:`gradbalance.MultiObjectiveOptimizer` as the optimizer, pass its
            ``balancer``: the scaler then computes what ``opt.backward`` would. Under label
            smoothing ε give the task loss its floor,
            ``Balancer(min_losses=[0.0, cross_entropy_floor(num_classes, ε)])``.
        grad_scaler: a ``torch.amp.GradScaler`` for float16 autocast, as ``NativeScaler`` holds
            one; default a disabled one, with which the optimizer steps on ``.grad`` as it is
            (train.py without a loss scaler).

    :meth:`state_dict` holds the grad scaler's and the balancer's state; timm's
    ``CheckpointSaver`` saves it under :attr:`state_dict_key`, where ``resume_task_checkpoint``
    finds it. :meth:`log_text` and :meth:`epoch_metrics` report π, GrC and GrD.
    """

    state_dict_key = "balanced_scaler"

    def __init__(
        self, balancer: Balancer | None = None, grad_scaler: torch.amp.GradScaler | None = None
    ) -> None:
        self.balancer = Balancer() if balancer is None else balancer
        self.grad_scaler = (
            torch.amp.GradScaler("cpu", enabled=False) if grad_scaler is None else grad_scaler
        )
        self._last: dict[str, Tensor] = {}
        self._meter = _Meter()

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
        """The balanced backward of the task's output ``result`` (``NativeScaler``'s backward of
        ``result["loss"]`` where it holds no distillation loss); then, where ``need_update``,
        clipping and the optimizer's step (the class says how). Arguments as ``NativeScaler``'s.

        Raises:
            TypeError: ``result`` is not a mapping (``result["loss"]`` was passed).
            KeyError: ``result`` has neither a distillation loss nor ``"loss"``, or a
                distillation loss without ``"task_loss"``.
            ValueError: ``create_graph`` with a distillation loss (second-order optimizers are
                not supported), or ``clip_grad`` without ``parameters``; before anything changes.
        """
        _check_output(result)
        if clip_grad is not None and parameters is None:
            raise ValueError("clip_grad needs the parameters to clip: task.get_clip_parameters()")
        if _distill_key(result) is None:
            self._native_backward(result, create_graph)
        else:
            if create_graph:
                raise ValueError("create_graph=True (a second-order optimizer) is not supported")
            self._balanced_backward(result, optimizer, need_update)
        if need_update:
            self._update(optimizer, clip_grad, clip_mode, parameters)

    def _native_backward(self, result: Mapping[str, Tensor], create_graph: bool) -> None:
        """NativeScaler's backward of the task's one loss."""
        if "loss" not in result:
            raise KeyError(
                f"a timm task's output holds 'loss' (and 'task_loss' and one of {DISTILL_KEYS} "
                f"to balance); got the keys {sorted(result)}"
            )
        self.grad_scaler.scale(result["loss"]).backward(create_graph=create_graph)

    def _balanced_backward(
        self, result: Mapping[str, Tensor], optimizer: torch.optim.Optimizer, need_update: bool
    ) -> None:
        """The Balancer's backward; a call that balanced (not a held micro-batch, not a step
        refused by an overflow) adds its π, GrC and GrD to the metrics."""
        calls = self.balancer.backward_calls
        self.balancer.backward(
            task_losses(result),
            optimizer.param_groups,
            accumulate=not need_update,
            grad_scaler=self.grad_scaler,
        )
        if self.balancer.backward_calls > calls:
            self._last = _update_values(self.balancer)
            self._meter.add(self._last)

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

    # -- what train.py logs ----------------------------------------------------------------------

    def log_text(self) -> str:
        """For train.py's log line: ``"  π(distill): last (mean)  GrC: …  GrD: …  cos: …"`` —
        π of the distillation loss at the last balanced update (π(task) = 1 − π(distill)), its
        mean over the updates since the last :meth:`epoch_metrics`, and the last update's GrC,
        GrD and cosine; ``""`` before a balanced update (a task without a distillation loss).
        Reads the device once."""
        if not self._last:
            return ""
        last = _read({**self._last, "mean": self._meter.means()["pi_distill"]})
        text = f"  π(distill): {last['pi_distill']:.3f} ({last['mean']:.3f})"
        if "grc" in last:
            text += f"  GrC: {last['grc']:.3g}  GrD: {last['grd']:.3g}  cos: {last['cos']:.3f}"
        return text

    def epoch_metrics(self) -> dict[str, float]:
        """Means over the balanced updates since the last call — ``pi_distill``, ``pi_task``,
        ``grc``, ``grd``, ``cos`` (where computed) and ``pi_vertex``, the fraction of updates at
        which π was a vertex of the simplex (one loss's weight exactly 0) — then starts anew. For
        train.py's ``train_one_epoch`` return value, which ``update_summary`` writes to
        summary.csv as ``train_pi_distill``, …; empty where nothing was balanced. Under
        torch.distributed every rank holds the same values (the Balancer averages over ranks)."""
        means = _read(self._meter.means())
        self._meter = _Meter()
        return means

    # -- checkpoints -----------------------------------------------------------------------------

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
