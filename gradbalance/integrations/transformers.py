"""Balanced distillation in the Hugging Face ``Trainer``: :class:`BalancedTrainer`.

``BalancedTrainer`` is a ``transformers.Trainer`` whose loss is k named losses instead of one::

    def compute_losses(model, inputs, teacher):
        logits = model(input_ids=inputs["input_ids"]).logits
        with torch.no_grad():
            teacher_logits = teacher(input_ids=inputs["input_ids"]).logits
        return {"distill": kl_distillation(logits, teacher_logits),
                "task": F.cross_entropy(logits, inputs["labels"])}

    trainer = BalancedTrainer(model=student, args=args, train_dataset=data,
                              teacher=teacher, compute_losses=compute_losses)
    trainer.train()

Trainer keeps its loop — AdamW, the learning-rate schedule, ``gradient_accumulation_steps``,
``max_grad_norm``, fp16/bf16, DDP through accelerate, checkpoints — and ``training_step`` hands
the named losses to :attr:`BalancedTrainer.balancer` where the stock one calls
``accelerator.backward(loss)``.

This module imports transformers (``pip install gradbalance[transformers]``); ``import
gradbalance`` does not. docs/integrations/huggingface.md says what happens inside.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor, nn
from transformers import Trainer, TrainerCallback

from .. import Balancer
from ._metrics import balancing_metrics, named_losses

__all__ = ["BALANCER_NAME", "BalancedTrainer", "ComputeLosses"]

# The balancing state's file in a checkpoint folder, beside optimizer.pt and scheduler.pt.
BALANCER_NAME = "balancer.pt"

# compute_losses(model, inputs, teacher) -> {name: scalar loss}
ComputeLosses = Callable[[nn.Module, Mapping[str, Any], "nn.Module | None"], Mapping[str, Tensor]]


class BalancedTrainer(Trainer):
    """A ``Trainer`` that balances named losses at the gradient level each optimizer step.

    The losses come from :meth:`compute_losses` — the ``compute_losses`` function given, or an
    override — as a dict of k ≥ 2 scalar losses, ``{"distill": ..., "task": ...}``
    (distillation first: the statistics read the first two as (distillation, task)), with the
    same names every step, each a mean over its micro-batch. ``training_step`` balances them:

    * **accumulation** (``gradient_accumulation_steps``): the micro-batches before the last of a
      step are held by the balancer (``accumulate=True``); the last (accelerate's
      ``sync_gradients``) balances the *mean* of the window's gradients and losses — do not
      divide the losses; micro-batches count equally (``num_items_in_batch`` is not used). The
      micro-batches a step left unfinished (a ``training_step`` that raised) are dropped where
      the next step begins, as ``model.zero_grad()`` drops ``.grad``;
    * **fp16**: accelerate's ``GradScaler`` is passed as ``grad_scaler=``, so ``.grad`` holds
      the scaled balanced gradient that Trainer unscales, clips and steps on; bf16 needs
      nothing;
    * **clipping** (``max_grad_norm``) acts on the balanced ``.grad``;
    * **DDP** (``torchrun``/``accelerate launch``): the balancer averages losses and per-task
      gradients over the ranks itself; DDP's reducer never fires (docs/integrations/ddp.md);
    * **checkpoints**: the balancing state is saved as ``balancer.pt`` in each checkpoint folder
      beside ``optimizer.pt`` and restored by ``resume_from_checkpoint``;
    * **logs**: each training log gets ``pi_<name>``, ``grc`` and ``grd`` (means over the
      optimizer steps since the last log) and ``loss_<name>`` (means over the micro-batches and
      ranks), so ``report_to`` sends them on; Trainer's ``loss`` is the plain sum of the losses.

    π is computed for the optimizer's parameters, by its param groups. DeepSpeed, which runs its
    own backward, is refused. Evaluation keeps Trainer's ``compute_loss`` (the model's own loss).

    Args:
        *args, **kwargs: ``Trainer``'s.
        balancer: the balancing (default ``Balancer()``: exact mode, losses bounded below by
            0); pass one for another mode or loss bounds (``min_losses``).
        teacher: a frozen module moved to the training device, put in eval mode and handed to
            ``compute_losses`` (None: ``compute_losses`` gets None).
        compute_losses: ``compute_losses(model, inputs, teacher)`` → the named losses; or
            override :meth:`compute_losses`.
    """

    def __init__(
        self,
        *args: Any,
        balancer: Balancer | None = None,
        teacher: nn.Module | None = None,
        compute_losses: ComputeLosses | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        if self.is_deepspeed_enabled:
            raise ValueError(
                "DeepSpeed runs its own backward, which BalancedTrainer cannot replace"
            )
        self.balancer = Balancer() if balancer is None else balancer
        self.teacher = teacher
        if teacher is not None:
            self.teacher = teacher.to(self.args.device).eval().requires_grad_(False)
        self._compute_losses = compute_losses
        self._since_log = _SinceLastLog()
        self.add_callback(_DropUnfinishedWindow(self))

    def compute_losses(self, model: nn.Module, inputs: Mapping[str, Any]) -> Mapping[str, Tensor]:
        """The named losses of a micro-batch: ``compute_losses(model, inputs, self.teacher)``.

        Raises:
            NotImplementedError: no ``compute_losses`` was given and this method is not
                overridden.
        """
        if self._compute_losses is None:
            raise NotImplementedError(
                "BalancedTrainer needs its losses: pass compute_losses=(model, inputs, teacher) "
                "-> {name: loss}, or override compute_losses(self, model, inputs)"
            )
        return self._compute_losses(model, inputs, self.teacher)

    def training_step(
        self,
        model: nn.Module,
        inputs: dict[str, Any],
        num_items_in_batch: Tensor | int | None = None,
    ) -> Tensor:
        """The balanced backward of the micro-batch's named losses. Returns what Trainer logs as
        ``loss``: the detached sum of the losses, divided by the micro-batches of the step."""
        model.train()
        if callable(getattr(self.optimizer, "train", None)):  # schedule-free optimizers
            self.optimizer.train()
        inputs = self._prepare_inputs(inputs)
        with self.compute_loss_context_manager():
            losses = named_losses(self.compute_losses(model, inputs), "compute_losses")
        closes = self.accelerator.sync_gradients  # Trainer sets it: True on a step's last
        self.balancer.backward(
            losses,
            self.optimizer.param_groups,
            accumulate=not closes,
            grad_scaler=self.accelerator.scaler,  # None unless fp16
        )
        self._since_log.add_micro_batch(losses)
        if closes:
            self._since_log.add_step(balancing_metrics(self.balancer))
        total = sum(loss.detach() for loss in losses.values())
        # the micro-batches of this step (fewer at an epoch's end); transformers < 4.48 lacks it
        window = getattr(
            self, "current_gradient_accumulation_steps", self.args.gradient_accumulation_steps
        )
        return total / window

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        """Trainer's log, with the balancing's means since the last log added to a training
        log (one that holds ``loss``)."""
        if "loss" in logs and self._since_log.steps:
            logs.update(self._since_log.means(self.accelerator))
        super().log(logs, *args, **kwargs)

    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        super()._save_optimizer_and_scheduler(output_dir)
        if self.args.should_save:  # the state is the same on every rank
            torch.save(self.balancer.state_dict(), os.path.join(output_dir, BALANCER_NAME))

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        super()._load_optimizer_and_scheduler(checkpoint)
        if checkpoint is None:
            return
        path = os.path.join(checkpoint, BALANCER_NAME)
        if os.path.isfile(path):
            self.balancer.load_state_dict(torch.load(path, weights_only=True))
        else:
            warnings.warn(
                f"{checkpoint} holds no {BALANCER_NAME} (not saved by a BalancedTrainer): the "
                f"balancer starts afresh",
                stacklevel=2,
            )


class _SinceLastLog:
    """Sums since the last training log, kept on the device (read once, at the log): the losses
    per micro-batch, the balancing metrics per optimizer step."""

    def __init__(self) -> None:
        self._reset()

    def _reset(self) -> None:
        self._losses: dict[str, Tensor] = {}
        self._metrics: dict[str, Tensor] = {}
        self.micro_batches = self.steps = 0

    def add_micro_batch(self, losses: Mapping[str, Tensor]) -> None:
        for name, loss in losses.items():
            key = f"loss_{name}"
            self._losses[key] = self._losses.get(key, 0) + loss.detach().float()
        self.micro_batches += 1

    def add_step(self, metrics: Mapping[str, Tensor]) -> None:
        for name, value in metrics.items():
            self._metrics[name] = self._metrics.get(name, 0) + value
        self.steps += 1

    def means(self, accelerator: Any) -> dict[str, float]:
        """The means, the losses' also over the ranks (one collective: Trainer calls ``log``
        on every rank for a training log), and a fresh start."""
        names = [*self._losses, *self._metrics]
        sums = torch.stack([*self._losses.values(), *self._metrics.values()])
        counts = [self.micro_batches] * len(self._losses) + [self.steps] * len(self._metrics)
        means = accelerator.reduce(sums, reduction="mean") / sums.new_tensor(counts)
        self._reset()
        return dict(zip(names, means.tolist(), strict=True))


class _DropUnfinishedWindow(TrainerCallback):
    """Drops the micro-batches the balancer holds where an optimizer step begins: a step that
    raised left them, and Trainer's ``model.zero_grad()`` cannot see them."""

    def __init__(self, trainer: BalancedTrainer) -> None:
        self.trainer = trainer

    def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.trainer.balancer.discard_micro_batches()
