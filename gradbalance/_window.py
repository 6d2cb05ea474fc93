"""The micro-batches of an accumulation window, and the flat buffers they are held in.

A window opens with the first ``backward(..., accumulate=True)`` and closes with the next
``backward(...)`` without it, which balances the mean of the micro-batches' gradients and losses;
it holds nothing before and after. Its whole lifetime is here:

* :meth:`Window.including` — the window with one more micro-batch (pure), whose first fixes the row
  scale ρ and, in amortized mode, π;
* :meth:`Window.gather` — checks a micro-batch and adds it to the buffers, or closes the window;
* :meth:`Window.discard` — drops the micro-batches held: ``zero_grad()`` of
  :class:`~gradbalance.MultiObjectiveOptimizer`, or of an optimizer the balancer is attached to
  (:meth:`Window.attach`), calls it, as ``zero_grad()`` drops the gradients that
  ``loss.backward()`` accumulated; so does loading a state dict;
* :meth:`Window.attach` — an optimizer that steps while micro-batches are held raises instead
  (they would be lost, and the step a no-op).

A micro-batch that raises leaves the window as it was, so that it can be retried; a loop that
skips it instead must drop the window with ``zero_grad()`` or ``discard_micro_batches()``.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, replace

import torch

from . import _engine as engine
from ._buffers import Blocks, FlatGradients
from ._guard import DeviceGuard, Ok, SyncGuard, both
from ._inputs import BackwardInputs

__all__ = ["Held", "Window", "checked_values"]


@dataclass(frozen=True)
class Held:
    """The micro-batches of a window: their loss sum and count, the row scale ρ of the per-task
    gradients and, in amortized mode, π (both fixed by the first micro-batch), and the verdict
    on them."""

    loss_sum: torch.Tensor  # (k,) float64, averaged over ranks
    count: int
    rho: torch.Tensor | None = None  # (k,) float64: exact mode's row scale of the window
    weights: torch.Tensor | None = None  # (k,) float64: amortized mode's π of the window
    ok: Ok = True  # the verdict on the micro-batches held (guard="device": on the device)

    def add(self, values: torch.Tensor) -> Held:
        return replace(self, loss_sum=self.loss_sum + values, count=self.count + 1)

    @property
    def mean(self) -> torch.Tensor:
        return self.loss_sum if self.count == 1 else self.loss_sum / self.count


class Window:
    """The micro-batches held, and the buffers of the per-task gradients (kept from step to step:
    rebuilt only when the tensors change)."""

    def __init__(self) -> None:
        self._held: Held | None = None
        self._flat: FlatGradients | None = None
        self._key: tuple = ()

    @property
    def pending(self) -> int:
        """Micro-batches gathered with ``accumulate=True`` and not balanced yet."""
        return 0 if self._held is None else self._held.count

    @property
    def held(self) -> Held | None:
        return self._held

    @property
    def task_buffers(self) -> list[torch.Tensor]:
        """The ``(k, n)`` buffers of the per-task gradients allocated now."""
        return [] if self._flat is None else self._flat.task_buffers

    def including(
        self,
        inputs: BackwardInputs,
        *,
        rho: torch.Tensor | None = None,
        weights: torch.Tensor | None = None,
    ) -> Held:
        """The window with this micro-batch (pure); a first micro-batch fixes what the mode
        keeps for the whole window: ``rho`` (exact mode), ``weights`` (amortized mode)."""
        if self._held is not None:
            return self._held.add(inputs.values)
        return Held(inputs.values, 1, rho, weights)

    def buffers(self, inputs: BackwardInputs, num_tasks: int) -> FlatGradients:
        """The flat buffers for these tensors, rebuilt only when the tensors change."""
        key = (
            num_tasks,
            *((id(t), role) for t, role in zip(inputs.tensors, inputs.roles, strict=True)),
        )
        if key != self._key:
            if self._held is not None:
                raise ValueError(
                    "the trainable parameters changed between accumulated micro-batches"
                )
            self._flat = FlatGradients(inputs.tensors, inputs.roles, num_tasks)
            self._key = key
        return self._flat

    def gather(
        self,
        inputs: BackwardInputs,
        held: Held,
        flat: FlatGradients,
        blocks: Blocks | None,
        guard: SyncGuard | DeviceGuard,
    ) -> Ok | None:
        """Adds this micro-batch's blocks to ``flat`` (``None``: they are in its buffers already,
        no micro-batch being held); ``held`` is the window with it. Returns None while
        micro-batches are held; when the window closes — ``flat`` then holds its means over
        micro-batches and ranks — the verdict on its micro-batches.

        A micro-batch that joins or opens a window is checked first, so that a bad one cannot
        spoil those held: its losses and gradients must be finite, and on the last micro-batch
        the mean losses must be above their bounds (guard="sync": one host synchronisation, and a
        ValueError; guard="device": the window's verdict turns false).
        """
        if inputs.accumulate or self._held is not None:
            finite = inputs.layout.all_ranks(
                engine.all_finite(flat.task_buffers if blocks is None else blocks)
            )  # every rank: one branch
            values, bounds = checked_values(inputs, held)
            ok = guard.check(values, bounds, finite, inputs.names, allow_nonfinite=inputs.scaled)
            held = replace(held, ok=both(held.ok, ok))
        if blocks is not None:
            flat.store(blocks, accumulate=self._held is not None)
        if inputs.accumulate:
            self._held = held
            return None
        self._held = None  # the micro-batches are consumed from here on
        flat.mean_over(held.count, inputs.layout)
        return held.ok

    def discard(self) -> None:
        """Drops the micro-batches held (nothing when none are)."""
        self._held = None

    def refuse_step(self) -> None:
        """Raises a RuntimeError while micro-batches are held: a step now would lose them."""
        if self._held is not None:
            raise RuntimeError(
                f"{self._held.count} micro-batch(es) were accumulated with backward(..., "
                f"accumulate=True) but never balanced: call backward(losses) without "
                f"accumulate=True on the last micro-batch before step(), or drop them with "
                f"zero_grad() or discard_micro_batches()"
            )

    def attach(self, optimizer: torch.optim.Optimizer) -> None:
        """Ties the window to the optimizer that steps on its ``.grad``: ``optimizer.step()``
        (without a closure, which may balance them) raises while micro-batches are held, and
        ``optimizer.zero_grad()`` drops them."""

        def refuse(_optimizer: torch.optim.Optimizer, args: tuple, kwargs: dict) -> None:
            closure = args[1] if len(args) > 1 else kwargs.get("closure")  # args[0]: optimizer
            if closure is None:
                self.refuse_step()

        optimizer.register_step_pre_hook(refuse)
        zero_grad = optimizer.zero_grad  # as torch's LR schedulers wrap an optimizer's step

        @functools.wraps(zero_grad)
        def zero_grad_dropping_micro_batches(*args, **kwargs):
            self.discard()
            return zero_grad(*args, **kwargs)

        optimizer.zero_grad = zero_grad_dropping_micro_batches

    def __getstate__(self) -> dict:
        # The buffers and held micro-batches are per-run scratch, as .grad is for an optimizer.
        return {"_held": None, "_flat": None, "_key": ()}


def checked_values(inputs: BackwardInputs, held: Held) -> tuple[torch.Tensor, torch.Tensor]:
    """The loss values a micro-batch is checked on, and their bounds: a micro-batch that is not
    the last must be finite; the last, the window's mean above the bounds."""
    if inputs.accumulate:
        return inputs.values, torch.full_like(inputs.values, -torch.inf)
    return held.mean, inputs.min_losses
