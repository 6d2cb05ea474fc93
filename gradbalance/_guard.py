"""What a balanced backward does with a step it must refuse: raise at once, or skip it on device.

Every backward checks that the losses are finite and above their bounds and that the gradients are
finite. Reading that verdict on the host costs a synchronisation, which on CUDA stalls the
pipeline and rules out CUDA graphs. Two guards, one interface:

* :class:`SyncGuard` (``guard="sync"``) reads the verdict at once (one synchronisation) and
  raises a ValueError naming the loss, before anything changes.
* :class:`DeviceGuard` (``guard="device"``) keeps the verdict on the device as a 0-d bool. The
  balancing state is kept only where it is true (``torch.where``), the coefficients of a refused
  step are NaN so that its ``.grad`` is non-finite, and :attr:`DeviceGuard.found_inf` tells a
  fused optimizer to skip the step on the device, as ``GradScaler`` does. The error is raised
  later, by :meth:`DeviceGuard.raise_deferred`, at a point that synchronises anyway.

A verdict is an :data:`Ok`: a Python bool (known on the host) or a 0-d bool tensor (on the device).
:func:`make_guard` is the one place where a guard's name becomes a guard; each guard also decides
how the optimizer's step is taken (:meth:`SyncGuard.take_step`, :meth:`DeviceGuard.take_step`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Literal

import torch

from ._messages import describe_invalid_losses, describe_invalid_weights, describe_nonfinite

Guard = Literal["sync", "device"]
Ok = bool | torch.Tensor
# How the optimizer's own step runs, given its closure or None (the wrapper's base step).
RunStep = Callable[[torch.optim.Optimizer, Callable[[], Any] | None], Any]


def losses_valid(values: torch.Tensor, bounds: torch.Tensor) -> torch.Tensor:
    """0-d bool: every loss finite and above its bound."""
    return (values.isfinite() & (values > bounds)).all()


def weights_valid(weights: torch.Tensor, normalize: bool) -> torch.Tensor:
    """0-d bool: every weight finite; with ``normalize`` also non-negative, with a positive sum
    (the normalisation divides by ``Σ_j π_j / D_j``)."""
    valid = weights.isfinite().all()
    if normalize:
        valid = valid & (weights >= 0).all() & (weights.sum() > 0)
    return valid


class SyncGuard:
    """Reads each verdict on the host (one synchronisation) and raises on a refused step."""

    name = "sync"
    found_inf = None
    refused_steps = None  # a refused step raises: nothing to count

    def check(
        self,
        values: torch.Tensor,
        bounds: torch.Tensor,
        gradients_finite: torch.Tensor,
        names: Sequence[str] | None,
        *,
        culprits: Callable[[], list[bool]] | None = None,
        allow_nonfinite: bool = False,
    ) -> bool:
        """Whether the gradients are finite; raises on invalid losses, and on non-finite
        gradients unless ``allow_nonfinite``. Messages are built only on failure
        (``culprits()``: which losses' rows hold the non-finite gradients)."""
        valid = losses_valid(values, bounds)
        checks = torch.stack([valid, gradients_finite.to(valid.device)]).tolist()
        if all(checks):
            return True
        message = describe_invalid_losses(values, bounds, names)
        if message is not None:
            raise ValueError(message)
        if allow_nonfinite:
            return False
        raise ValueError(describe_nonfinite(None if culprits is None else culprits(), names))

    def check_weights(self, weights: torch.Tensor, source: str, normalize: bool) -> bool:
        """True; raises when a user's weighting (``source``) returned invalid π
        (:func:`weights_valid`)."""
        if not bool(weights_valid(weights, normalize)):
            raise ValueError(describe_invalid_weights(weights, source))
        return True

    def conclude(self, ok: Ok) -> None:
        """Nothing to record: a refused step has raised."""

    def take_step(
        self, base: torch.optim.Optimizer, closure: Callable[[], Any] | None, run: RunStep
    ) -> Any:
        """``base``'s step as it would run alone, closure included: a refused backward has
        raised already."""
        return run(base, closure)

    def raise_deferred(self) -> None:
        """Nothing is ever deferred."""


class DeviceGuard:
    """Keeps each verdict on the device; counts the refused steps and remembers the last one's
    losses, to raise its error in :meth:`raise_deferred`."""

    name = "device"

    def __init__(self) -> None:
        self.found_inf: torch.Tensor | None = None  # 1.0: the last balanced step must not be taken
        self._refused: torch.Tensor | None = None  # refused steps since the last raise_deferred
        self._last: tuple | None = None  # the values and bounds of the last refused check
        self._names: Sequence[str] | None = None
        self._error: torch.Tensor | None = None  # a check of the step under way refused it
        self._weights: torch.Tensor | None = None  # π of the last refused weighting check
        self._source = ""  # the weighting it came from
        self._by_weighting: torch.Tensor | None = None  # the last refusal was the weighting's

    def check(
        self,
        values: torch.Tensor,
        bounds: torch.Tensor,
        gradients_finite: torch.Tensor,
        names: Sequence[str] | None,
        *,
        culprits: Callable[[], list[bool]] | None = None,
        allow_nonfinite: bool = False,
    ) -> torch.Tensor:
        """0-d bool on the device: the losses are valid and the gradients finite. No host
        synchronisation. A refusal that :class:`SyncGuard` would raise for is remembered for
        :meth:`conclude` (non-finite gradients are not, under ``allow_nonfinite``: a grad
        scaler's step skips them)."""
        valid = losses_valid(values, bounds)
        ok = valid & gradients_finite.to(valid.device)
        refused = ~valid if allow_nonfinite else ~ok
        self._names = names
        self._last = tuple(
            select(refused, new, old)
            for new, old in zip((values, bounds), self._last or (None, None), strict=True)
        )
        self._refuse(refused, by_weighting=torch.zeros_like(refused))
        return ok

    def check_weights(self, weights: torch.Tensor, source: str, normalize: bool) -> torch.Tensor:
        """0-d bool on the device: a user's weighting (``source``) returned valid π
        (:func:`weights_valid`); a refusal is remembered for :meth:`conclude` and its message."""
        ok = weights_valid(weights, normalize)
        refused = ~ok
        self._source = source
        self._weights = select(refused, weights, self._weights)
        self._refuse(refused, by_weighting=refused)
        return ok

    def _refuse(self, refused: torch.Tensor, by_weighting: torch.Tensor) -> None:
        """Marks the step under way refused where ``refused``, and whether by the weighting."""
        self._error = refused if self._error is None else self._error | refused
        self._by_weighting = select(refused, by_weighting, self._by_weighting)

    def conclude(self, ok: Ok) -> None:
        """Ends a balanced step (a window of micro-batches is one) whose verdict is ``ok``: sets
        :attr:`found_inf` and counts the step if one of its checks refused it."""
        ok = torch.as_tensor(ok) if isinstance(ok, bool) else ok
        self.found_inf = (~ok).to(torch.float32)
        if self._error is not None:
            count = self._error.to(torch.int64)
            self._refused = count if self._refused is None else self._refused + count
            self._error = None

    def take_step(
        self, base: torch.optim.Optimizer, closure: Callable[[], Any] | None, run: RunStep
    ) -> Any:
        """``base``'s step, skipped where the last balanced backward was refused, as
        ``GradScaler`` skips one: on the device by a fused base's ``found_inf``, else by reading
        the verdict (one host synchronisation). The closure runs first: its backward gives the
        verdict."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        found_inf = self.found_inf
        if found_inf is None:
            run(base, None)
        elif getattr(base, "_step_supports_amp_scaling", False):
            base.grad_scale, base.found_inf = None, found_inf
            try:
                run(base, None)
            finally:
                del base.grad_scale, base.found_inf
        elif not found_inf.item():
            run(base, None)
        return loss

    @property
    def refused_steps(self) -> torch.Tensor | None:
        """How many balanced steps were refused since the last :meth:`raise_deferred` (0-d int64
        on the device; None before the first step)."""
        return self._refused

    def raise_deferred(self) -> None:
        """Raises the ValueError of the last refused step, if a step was refused since the last
        call (one host synchronisation); counting starts again."""
        if self._refused is None:
            return
        count = int(self._refused)
        self._refused = torch.zeros_like(self._refused)
        if count == 0:
            return
        message = self._message()
        raise ValueError(
            f"{count} balanced backward call(s) were refused on the device and their steps "
            f"skipped (guard='device'); the last: {message}"
        )

    def _message(self) -> str:
        """What the last refused step was refused for (reads the device: one synchronisation)."""
        if self._by_weighting is not None and bool(self._by_weighting):
            return describe_invalid_weights(self._weights, self._source)
        (values, bounds), self._last = self._last, None
        return describe_invalid_losses(values, bounds, self._names) or describe_nonfinite(
            None, self._names
        )


_GUARDS = {"sync": SyncGuard, "device": DeviceGuard}


def check_guard(name: str) -> None:
    """Raises a ValueError unless ``name`` is a guard's (``"sync"`` or ``"device"``)."""
    if name not in _GUARDS:
        raise ValueError(f"guard must be {' or '.join(map(repr, _GUARDS))}, got {name!r}")


def make_guard(name: str) -> SyncGuard | DeviceGuard:
    """The guard called ``name``, a fresh one (a DeviceGuard holds one balancer's verdicts)."""
    check_guard(name)
    return _GUARDS[name]()


def both(first: Ok, second: Ok) -> Ok:
    """The verdict of two checks together."""
    if first is False or second is False:
        return False
    if first is True:
        return second
    return first if second is True else first & second


def select(ok: Ok, new: torch.Tensor, old: torch.Tensor | None) -> torch.Tensor | None:
    """``new`` where the verdict holds, else ``old`` (``new`` when there is no ``old``)."""
    if ok is True or old is None:
        return new
    if ok is False:
        return old
    return torch.where(ok, new, old.to(new))


def poisoned(coefficients: torch.Tensor, ok: Ok) -> torch.Tensor:
    """``coefficients``, made NaN where the device's verdict is false: the refused step's
    ``.grad`` becomes non-finite, so that any found-inf check (a grad scaler's) skips it."""
    if isinstance(ok, bool):
        return coefficients
    return torch.where(ok, coefficients, torch.full_like(coefficients, torch.nan))
