"""Balanced distillation in Lightning's automatic optimisation: :class:`BalancedModule`.

A ``LightningModule`` becomes balanced by deriving from :class:`BalancedModule` instead, and
returning its losses by name from ``training_step``::

    class Distillation(BalancedModule):          # was: L.LightningModule
        def training_step(self, batch):
            x, y = batch
            logits = self.student(x)
            return {"distill": kl_distillation(logits, self.teacher(x)),
                    "task": F.cross_entropy(logits, y)}

Lightning keeps its loop — ``configure_optimizers``, zeroing, ``accumulate_grad_batches``,
``gradient_clip_val``, the precision plugin, the strategy, checkpoints — and the module's
``backward`` hook hands the named losses to :attr:`BalancedModule.balancer` in place of
``loss.backward()``: π for the losses, the balanced direction ``d = Σ_i π_i ∇L_i / (L_i − m_i)``
in ``.grad`` of the optimizer's parameters, which Lightning then clips and steps on.

This module imports Lightning (``pip install gradbalance[lightning]``); ``import gradbalance``
does not. docs/integrations/lightning.md says what happens around the hook.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable
from typing import Any

from lightning.pytorch import LightningModule, Trainer
from torch import Tensor

from .. import Balancer
from ._metrics import balancing_metrics, named_losses

__all__ = ["BalancedModule"]

# Where the balancing state lives in Lightning's checkpoint dict.
CHECKPOINT_KEY = "gradbalance"


class BalancedModule(LightningModule):
    """A ``LightningModule`` whose ``training_step`` returns named losses, balanced each step.

    Derive from it in place of ``LightningModule``. ``training_step`` returns a dict of k ≥ 2
    scalar losses, ``{"distill": ..., "task": ...}`` (distillation first: the statistics read the
    first two as (distillation, task)), with the same names every step, each a mean over the
    batch; or ``None`` to skip the batch, as in Lightning. Lightning sees their (detached) sum
    as ``"loss"`` — what ``on_train_batch_end`` gets in ``outputs["loss"]`` — and the ``backward``
    hook balances the losses themselves:

    * **accumulation** (``accumulate_grad_batches``): the batches that Lightning does not step
      on are held by the balancer (``accumulate=True``), and the batch it steps on balances the
      *mean* of the window's gradients and losses — do not divide the losses. A window is
      opened where Lightning zeroes ``.grad`` (its first batch), which drops what a window left
      unfinished (a fit that raised) as ``zero_grad`` drops ``.grad``;
    * **precision**: under ``"16-mixed"`` the precision plugin's ``GradScaler`` is passed as
      ``grad_scaler=``, so ``.grad`` holds the scaled balanced gradient that Lightning unscales,
      clips and steps on (skipping the step on an overflow); ``"bf16-mixed"`` and the
      ``"-true"`` precisions need nothing;
    * **clipping** (``gradient_clip_val``) and ``on_before_optimizer_step`` see the balanced
      ``.grad``;
    * **DDP**: the balancer averages losses and per-task gradients over the ranks itself, so every
      rank takes the step of one process on the global batch (docs/integrations/ddp.md);
    * **checkpoints**: ``on_save_checkpoint`` puts :meth:`Balancer.state_dict` into Lightning's
      checkpoint under ``"gradbalance"``, ``on_load_checkpoint`` restores it, so a resumed fit
      continues the uninterrupted one. Call ``super()`` where you override these two hooks;
    * **logging**: on each step, ``self.log`` gets π by loss name (``"pi_distill"``,
      ``"pi_task"``) and, where the mode computed the Gram matrix, the paper's conflict
      ``"grc"`` ``= ⟨g_1, g_2⟩`` and dominance ``"grd"`` ``= ‖g_1‖ / ‖g_2‖``.

    π is computed for the parameters of the (single) optimizer that ``configure_optimizers``
    returns, by its param groups (a group with ``"balance": False`` gets the plain sum).
    Manual optimisation and strategies that run their own backward (DeepSpeed) are refused:
    use :class:`gradbalance.MultiObjectiveOptimizer` in a manual ``training_step`` there.

    Args:
        balancer: the balancing (default ``Balancer()``: exact mode, losses bounded below by
            0); pass one for another mode or loss bounds (``min_losses``). Kept as
            :attr:`balancer`.
        *args, **kwargs: ``LightningModule``'s.
    """

    def __init__(self, *args: Any, balancer: Balancer | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.balancer = Balancer() if balancer is None else balancer
        self._named_losses: dict[str, Tensor] | None = None
        self._in_training_step = False

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        step = cls.__dict__.get("training_step")
        if step is not None:
            cls.training_step = _taking_named_losses(step)

    # -- what Lightning calls --------------------------------------------------------------------

    def backward(self, loss: Tensor, *args: Any, **kwargs: Any) -> None:
        """The balanced backward of the losses that ``training_step`` returned; ``loss`` (their
        sum, divided and scaled by Lightning) is not used."""
        losses, self._named_losses = self._named_losses, None  # their graph is freed after this
        if losses is None:
            raise RuntimeError(
                "backward was called without named losses from training_step: BalancedModule "
                "balances the dict that training_step returns, in automatic optimisation"
            )
        trainer = self.trainer
        opens, closes = window_position(trainer)
        if opens:
            self.balancer.discard_micro_batches()
        self.balancer.backward(
            losses,
            trainer.optimizers[0].param_groups,
            accumulate=not closes,
            grad_scaler=getattr(trainer.precision_plugin, "scaler", None),
        )
        if closes:
            self.log_dict(balancing_metrics(self.balancer))

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Puts the balancing state into Lightning's checkpoint, under ``"gradbalance"``."""
        checkpoint[CHECKPOINT_KEY] = self.balancer.state_dict()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Restores the balancing state from Lightning's checkpoint; one saved without it (by a
        plain ``LightningModule``, to fine-tune with balancing) leaves the balancer as it is,
        with a warning."""
        if CHECKPOINT_KEY in checkpoint:
            self.balancer.load_state_dict(checkpoint[CHECKPOINT_KEY])
        else:
            warnings.warn(
                f"the checkpoint holds no balancing state (no {CHECKPOINT_KEY!r} entry: it was "
                f"not saved by a BalancedModule); the balancer starts afresh",
                stacklevel=2,
            )

    # -- the named losses ------------------------------------------------------------------------

    def _take_named_losses(self, output: Any) -> dict[str, Tensor] | None:
        """Keeps the named losses for :meth:`backward`; Lightning gets their detached sum."""
        if output is None:
            return None
        if not self.automatic_optimization:
            raise RuntimeError(
                "BalancedModule balances in Lightning's automatic optimisation; with "
                "automatic_optimization = False use gradbalance.MultiObjectiveOptimizer"
            )
        if self.trainer.strategy.handles_gradient_accumulation:
            raise RuntimeError(
                f"the {type(self.trainer.strategy).__name__} strategy runs its own backward, "
                f"which BalancedModule cannot replace"
            )
        self._named_losses = named_losses(output, "a BalancedModule's training_step")
        return {"loss": sum(loss.detach() for loss in self._named_losses.values())}


def _taking_named_losses(step: Callable[..., Any]) -> Callable[..., Any]:
    """``training_step`` as Lightning sees it: the user's, whose named losses are kept for the
    backward hook. A ``training_step`` that calls ``super().training_step`` gets the parent's
    output as it is; only the outermost call hands the losses over."""

    @functools.wraps(step)  # Lightning reads the signature (does it take batch_idx?)
    def training_step(self: BalancedModule, *args: Any, **kwargs: Any) -> Any:
        if self._in_training_step:
            return step(self, *args, **kwargs)
        self._in_training_step = True
        try:
            output = step(self, *args, **kwargs)
        finally:
            self._in_training_step = False
        return self._take_named_losses(output)

    return training_step


def window_position(trainer: Trainer) -> tuple[bool, bool]:
    """(opens, closes) for the batch in progress: whether it opens an accumulation window — the
    batch before whose backward Lightning zeroes ``.grad`` — and whether it closes one — the
    batch that Lightning steps on.

    The fit loop's own tests (``_AutomaticOptimization._make_zero_grad_fn`` and
    ``run``): ``batch_idx % accumulate_grad_batches == 0`` and ``not _should_accumulate()``,
    which steps on the last batch of an epoch too. They are read from the loop rather than from
    the ``optimizer_step`` hook, which a module may override without calling ``super()`` and
    which, under ``"16-mixed"``, runs the closure outside ``optimizer.step``.
    """
    loop = trainer.fit_loop
    opens = loop.epoch_loop.batch_idx % trainer.accumulate_grad_batches == 0
    return opens, not loop._should_accumulate()
