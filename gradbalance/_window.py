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
* while micro-batches are held, the ``step()`` of any torch optimizer of the window's parameters
  raises (a global step pre-hook, removed when the window closes): they would be lost, and the
  step a no-op; :meth:`Window.attach` only adds the dropping ``zero_grad()``;
* :meth:`Window.resume` — before each micro-batch: a window whose parameters changed in place
  since its last micro-batch (an optimizer stepped outside torch's step hooks) refuses it with a
  RuntimeError; one whose ``.grad`` were zeroed after a micro-batch raised is dropped
  (:meth:`Window.interrupted`).

A micro-batch that raises leaves the window as it was, so that it can be retried. A loop that
skips it instead drops the window with any ``zero_grad()`` — the model's or an optimizer's — as it
drops a plain loop's accumulated ``.grad``: the window then watches the ``.grad`` of its parameters
(where all are None it puts zeros into the smallest one's, as a plain loop's ``.grad`` holds the
running sum by then), and takes the sentinel back out if the next micro-batch comes first.
"""

from __future__ import annotations

import functools
import weakref
from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch
from torch.optim.optimizer import register_optimizer_step_pre_hook

from . import _engine as engine
from ._buffers import Blocks, FlatGradients, Role
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
        self._seen: _Seen | None = None  # the window's parameters at its last micro-batch
        # The removal of the global step pre-hook, while micro-batches are held (also run when
        # a window holding some is collected).
        self._refusal: weakref.finalize | None = None
        self._watch: _GradWatch | None = None  # after a micro-batch raised: their .grad

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
            self._hold(held, inputs)
            return None
        self._hold(None)  # the micro-batches are consumed from here on
        flat.mean_over(held.count, inputs.layout)
        return held.ok

    def discard(self) -> None:
        """Drops the micro-batches held (nothing when none are)."""
        self._hold(None)

    def resume(self) -> None:
        """Before a micro-batch is checked: whether the window held goes on.

        After a micro-batch raised, a ``zero_grad()`` of the window's parameters (the model's or
        any optimizer's) gave the window up: it is dropped, as the gradients that
        ``loss.backward()`` accumulated are, and this micro-batch starts afresh; else (a retry)
        the sentinel ``.grad`` goes and the window goes on.

        Raises:
            RuntimeError: the window's parameters changed in place since its last micro-batch:
                an optimizer stepped while micro-batches were held (a step outside torch's step
                hooks, which refuse it), so they would be balanced into the next step. The
                window is left as it was.
        """
        if self._held is None:
            return
        watch, self._watch = self._watch, None
        if watch is not None and not watch.untouched():
            self.discard()
            return
        if watch is not None:
            watch.withdraw()
        if self._seen is not None and self._seen.changed():
            raise RuntimeError(
                f"the parameters changed in place while {self._held.count} micro-batch(es) "
                f"were held (an optimizer stepped before they were balanced?): the last "
                f"micro-batch of a step must be backward(losses) with accumulate=False; drop the "
                f"held ones with discard_micro_batches() or zero_grad()"
            )

    def interrupted(self) -> None:
        """A backward call raised: while micro-batches are held (the call left them as they
        were), watch the ``.grad`` of the window's parameters, so that the next :meth:`resume`
        sees a ``zero_grad()`` that gives the window up."""
        if self._held is not None and self._watch is None and self._seen is not None:
            self._watch = _GradWatch.install(self._seen.params)

    def _hold(self, held: Held | None, inputs: BackwardInputs | None = None) -> None:
        """The micro-batches held from now on (None: none), with what goes with them: the
        global refusal of a step of their parameters, and what was seen of the parameters."""
        if held is None:
            if self._watch is not None:
                self._watch.withdraw()
            self._held, self._seen, self._watch = None, None, None
            if self._refusal is not None:
                self._refusal()  # removes the hook now (once: not again when collected)
                self._refusal = None
            return
        self._held = held
        assert inputs is not None
        params = [
            t
            for t, role in zip(inputs.tensors, inputs.roles, strict=True)
            if role is not Role.OUTSIDE
        ]
        self._seen = _Seen.of(params)
        if self._refusal is None:
            handle = register_optimizer_step_pre_hook(
                _StepRefusal(weakref.ref(self), {id(p) for p in params})
            )
            self._refusal = weakref.finalize(self, handle.remove)

    def refuse_step(self) -> None:
        """Raises a RuntimeError while micro-batches are held: a step now would lose them."""
        if self._held is not None:
            raise RuntimeError(
                f"{self._held.count} micro-batch(es) were accumulated with backward(..., "
                f"accumulate=True) but never balanced: call backward(losses) with "
                f"accumulate=False on the last micro-batch before step(), or drop them with "
                f"zero_grad() or discard_micro_batches()"
            )

    def attach(self, optimizer: torch.optim.Optimizer) -> None:
        """Ties the window to the optimizer that steps on its ``.grad``: ``optimizer.step()``
        (without a closure, which may balance them) raises while micro-batches are held — as the
        step of any torch optimizer of the window's parameters does anyway — and
        ``optimizer.zero_grad()`` drops them, also where no micro-batch raised."""

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
        return {
            "_held": None,
            "_flat": None,
            "_key": (),
            "_seen": None,
            "_refusal": None,
            "_watch": None,
        }


@dataclass(frozen=True)
class _Seen:
    """The window's parameters (not the leaves outside them) and their version counters, which
    every in-place change — an optimizer's step — advances."""

    params: tuple[torch.Tensor, ...]
    versions: tuple[int, ...]

    @classmethod
    def of(cls, params: Sequence[torch.Tensor]) -> _Seen:
        return cls(tuple(params), tuple(p._version for p in params))

    def changed(self) -> bool:
        return any(p._version != v for p, v in zip(self.params, self.versions, strict=True))


class _StepRefusal:
    """A global step pre-hook: the ``step()`` (without a closure, which may balance them) of an
    optimizer holding any of the window's parameters raises while it holds micro-batches. It holds
    the window weakly: a window that is garbage refuses nothing."""

    def __init__(self, window: weakref.ref[Window], ids: set[int]) -> None:
        self.window, self.ids = window, ids

    def __call__(self, optimizer: torch.optim.Optimizer, args: tuple, kwargs: dict) -> None:
        window = self.window()
        closure = args[1] if len(args) > 1 else kwargs.get("closure")  # args[0]: optimizer
        if window is None or closure is not None:
            return
        groups = getattr(optimizer, "param_groups", ())
        if any(id(p) in self.ids for group in groups for p in group["params"]):
            window.refuse_step()


class _GradWatch:
    """The ``.grad`` of the window's parameters after a micro-batch raised: anything that sets,
    drops or zeroes one of them (``zero_grad()``) shows. Where all are None, zeros in the smallest
    parameter's ``.grad`` (the sentinel) make a ``zero_grad()`` show."""

    def __init__(self, params: Sequence[torch.Tensor], sentinel: torch.Tensor | None) -> None:
        self.params = tuple(params)
        self.grads = tuple(_GradRef(p.grad) for p in self.params)
        self.sentinel = sentinel  # the parameter whose .grad holds the sentinel
        self.put = None if sentinel is None else _GradRef(sentinel.grad)

    @classmethod
    def install(cls, params: Sequence[torch.Tensor]) -> _GradWatch:
        sentinel = None
        if params and all(p.grad is None for p in params):
            smallest = min(params, key=torch.Tensor.numel)
            with torch.no_grad():
                smallest.grad = torch.zeros_like(smallest, memory_format=torch.preserve_format)
            sentinel = smallest
        return cls(params, sentinel)

    def untouched(self) -> bool:
        return all(ref.holds(p.grad) for p, ref in zip(self.params, self.grads, strict=True))

    def withdraw(self) -> None:
        """Takes the sentinel back out of ``.grad``, where it is still there as it was put."""
        if (
            self.sentinel is not None
            and self.put is not None
            and self.put.holds(self.sentinel.grad)
        ):
            self.sentinel.grad = None
        self.sentinel = self.put = None


class _GradRef:
    """One ``.grad`` as it was: the tensor (weakly) and its version, or None."""

    def __init__(self, grad: torch.Tensor | None) -> None:
        self.ref = None if grad is None else weakref.ref(grad)
        self.version = None if grad is None else grad._version

    def holds(self, grad: torch.Tensor | None) -> bool:
        if self.ref is None:
            return grad is None
        return grad is not None and grad is self.ref() and grad._version == self.version


def checked_values(inputs: BackwardInputs, held: Held) -> tuple[torch.Tensor, torch.Tensor]:
    """The loss values a micro-batch is checked on, and their bounds: a micro-batch that is not
    the last must be finite; the last, the window's mean above the bounds."""
    if inputs.accumulate:
        return inputs.values, torch.full_like(inputs.values, -torch.inf)
    return held.mean, inputs.min_losses
