"""``MultiObjectiveOptimizer``: a base optimizer plus a :class:`~gradbalance.Balancer`, as one
``torch.optim.Optimizer``.

It is a drop-in for the base optimizer by delegation: ``param_groups``, ``state`` and ``defaults``
*are* the base's at all times (also after ``load_state_dict``, which replaces them), so learning-
rate schedulers, ``add_param_group``, ``torch.distributed.checkpoint`` and torch's own
``state_dict`` / ``load_state_dict`` with their hooks work on it as on the base. One step::

    backward(losses) ─▶ Balancer: the inputs checked (_inputs) ─▶ the mode (modes/) writes .grad
                     ─▶ the guard concludes the verdict (_guard) ─▶ π, G and the statistics kept
    step()           ─▶ the guard takes the base's step, or skips a refused one on the device
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import torch
from torch.optim import Optimizer
from torch.optim.optimizer import ParamsT

from ._balancer import Balancer
from ._base_optimizer import (
    MISSING,
    base_step,
    build_base,
    default_guard,
    fused_supported,
    materialised,
    with_scaling,
)
from ._guard import Guard
from ._inputs import LossesLike
from ._options import OPTION_NAMES
from .modes import Mode
from .modes._amortized import PiOptimizer
from .weighting import Weighting

__all__ = ["MultiObjectiveOptimizer"]

# The balancing state rides in the first param group under this key: the one place of a state
# dict that torch.distributed.checkpoint keeps for keys it does not know (it rewrites "state" by
# parameter).
STATE_KEY = "gradbalance"
# The keyword arguments that are this class's own; all the others are the base's.
_OWN_ARGUMENTS = ("base", "mode", *OPTION_NAMES)  # OPTION_NAMES has "guard"

_Init = TypeVar("_Init", bound=Callable[..., None])


def _forwarding_the_call(signature: _Init) -> _Init:
    """``__init__`` with ``signature``'s parameters (for ``inspect.signature`` and static tools),
    taking the call as it was made: this class's own keyword arguments go to
    ``MultiObjectiveOptimizer._construct``, and all the others — positional ones in their places —
    to the base, which binds and checks them itself. So AdamW raises its own errors with its own
    defaults, and another base gets its own arguments, not AdamW's."""

    @functools.wraps(signature)
    def __init__(self: MultiObjectiveOptimizer, *args: Any, **kwargs: Any) -> None:
        own = {name: kwargs.pop(name) for name in _OWN_ARGUMENTS if name in kwargs}
        if args:
            params, args = args[0], args[1:]
        else:  # params by keyword, or missing: the base's own error then
            params = kwargs.pop("params", MISSING)
        self._construct(params, args, kwargs, **own)

    return __init__  # type: ignore[return-value]


class MultiObjectiveOptimizer(Optimizer):
    r"""Balances k losses every step and hands the balanced gradient to a base optimizer.

    :meth:`backward` is :meth:`gradbalance.Balancer.backward` on this optimizer's param groups: it
    chooses weights π for the log-losses (by the mode, :mod:`gradbalance.modes`, or by
    ``weighting=``) and adds the balanced direction into ``.grad``, as ``loss.backward()`` adds a
    gradient; :meth:`step` runs the base optimizer. The modes, the checks and how ``.grad`` is
    written are the :class:`~gradbalance.Balancer`'s.

    It behaves as the base optimizer does everywhere a training loop touches one:
    ``param_groups``, ``state`` and ``defaults`` are the base's (schedulers, ``add_param_group``,
    ``zero_grad``); ``state_dict()`` is torch's, over the base's groups and state, with the
    balancing state (:meth:`gradbalance.Balancer.state_dict`) in ``param_groups[0]["gradbalance"]``,
    where ``torch.distributed.checkpoint``'s ``get_optimizer_state_dict`` /
    ``set_optimizer_state_dict`` keep it; its state-dict hooks run; ``copy.deepcopy`` and
    ``pickle`` keep the balancing; ``step(closure)`` works; a ``GradScaler`` steps it.

    Param groups with ``"balance": False``: see :meth:`gradbalance.Balancer.backward`.

    Args:
        params: an iterable of tensors, of ``(name, tensor)`` pairs or of param-group dicts, as
            for any torch optimizer; or an already constructed optimizer to wrap (then nothing
            else may be given for a base).
        lr: AdamW's (default 1e-3), as all the arguments up to ``fused``: positional or by
            keyword as for :class:`torch.optim.AdamW`, with its defaults; a bad value (or bad
            ``params``) raises AdamW's own error.
        betas: AdamW's (default ``(0.9, 0.999)``).
        eps: AdamW's (default 1e-8).
        weight_decay: AdamW's (default 1e-2).
        amsgrad: AdamW's (default False).
        maximize: AdamW's (default False).
        foreach: AdamW's (default None).
        capturable: AdamW's (default False).
        differentiable: AdamW's (default False).
        fused: AdamW's. Unless ``fused`` or ``foreach`` is given, the step takes torch's fused
            kernel where it supports the parameters (the default base, and Adam).
        base: the optimizer class that takes the step (default :class:`torch.optim.AdamW`).
            With another base every argument after ``params`` that is not this class's own
            (``base``, ``mode``, ``guard`` and the balancing options below) goes to that base
            exactly as given — positional ones in their places, keyword ones by name — and its
            own defaults apply: ``MultiObjectiveOptimizer(params, 0.1, 0.9, base=torch.optim.SGD)``
            is ``SGD(params, 0.1, 0.9)`` (lr, momentum), not AdamW's betas. ``torch.optim.Adam``
            also gets the fused kernel by default.
        mode: the Balancer's (:mod:`gradbalance.modes`).
        guard: what a refused step does (the Balancer's): ``"sync"`` raises at once, at the cost
            of one host synchronisation per backward; ``"device"`` skips it on the device and
            raises later (:meth:`gradbalance.Balancer.raise_deferred`). Default (None):
            ``"device"`` where the parameters are on CUDA and the base takes ``found_inf``
            (torch's fused Adam, AdamW, SGD, Adagrad: the default base is fused), else ``"sync"``.
        min_losses: the Balancer's options, as are ``normalize``, ``pi_lr``,
            ``pi_weight_decay``, ``pi_optimizer``, ``stats_every``, ``vectorize`` and
            ``weighting`` (:class:`gradbalance.BalancingOptions`, with its defaults).
        normalize: see ``min_losses``.
        pi_lr: see ``min_losses``.
        pi_weight_decay: see ``min_losses``.
        pi_optimizer: see ``min_losses``.
        stats_every: see ``min_losses``.
        vectorize: see ``min_losses``.
        weighting: see ``min_losses``.
        **base_kwargs: further keyword arguments of another ``base`` (``momentum=0.9`` for SGD).

    ``base``, ``mode``, ``guard`` and the balancing options are keyword-only, so that every
    positional argument means what it means for AdamW. The signature is AdamW's followed by this
    class's own, as ``inspect.signature`` shows it to IDEs, LightningCLI (jsonargparse) and
    Hydra's ``instantiate``; the call itself is forwarded to the base as it was made.

    Example::

        opt = MultiObjectiveOptimizer(model.parameters(), 1e-3, weight_decay=0.05)
        for x, y in loader:
            opt.zero_grad()
            student_logits, features = model(x)
            opt.backward({"distill": distill_loss(student_logits, features),
                          "task": task_loss(student_logits, y)})
            opt.step()
    """

    @_forwarding_the_call
    def __init__(
        self,
        params: ParamsT | Optimizer,
        lr: float | torch.Tensor = 1e-3,
        betas: tuple[float | torch.Tensor, float | torch.Tensor] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        amsgrad: bool = False,
        *,
        maximize: bool = False,
        foreach: bool | None = None,
        capturable: bool = False,
        differentiable: bool = False,
        fused: bool | None = None,
        base: type[Optimizer] = torch.optim.AdamW,
        mode: Mode = "exact",
        guard: Guard | None = None,
        min_losses: Sequence[float] | torch.Tensor | None = None,
        normalize: bool | None = None,
        pi_lr: float = 0.025,
        pi_weight_decay: float = 0.01,
        pi_optimizer: PiOptimizer = "adamw",
        stats_every: int = 0,
        vectorize: bool | None = None,
        weighting: Weighting | None = None,
        **base_kwargs: Any,
    ) -> None:
        # The signature that callers and tools see; the call as it was made is built by
        # _construct (see _forwarding_the_call), so that AdamW binds its own arguments and
        # another base gets its own.
        raise AssertionError("replaced by _forwarding_the_call")  # pragma: no cover

    def _construct(
        self,
        params: Any,
        base_args: tuple,
        base_kwargs: dict[str, Any],
        *,
        base: type[Optimizer] = torch.optim.AdamW,
        mode: Mode = "exact",
        guard: Guard | None = None,
        **options: Any,
    ) -> None:
        self.base, self._implicitly_fused = build_base(params, base, base_args, base_kwargs)
        guard = default_guard(self.base) if guard is None else guard
        self.balancer = Balancer(mode, guard=guard, **options)
        self.param_groups[0][STATE_KEY] = self.balancer.state_dict()
        # torch.optim.Optimizer's own bookkeeping (hook registries, the profiled step), as its
        # __setstate__ rebuilds it; Optimizer.__init__ would also reset param_groups and state,
        # which are the base's.
        Optimizer.__setstate__(self, {})

    # -- the base's param_groups, state and defaults ---------------------------------------------

    @property
    def param_groups(self) -> list[dict[str, Any]]:  # type: ignore[override]
        return self.base.param_groups

    @param_groups.setter
    def param_groups(self, groups: list[dict[str, Any]]) -> None:
        self.base.param_groups = groups

    @property
    def state(self) -> dict[torch.Tensor, Any]:  # type: ignore[override]
        return self.base.state

    @state.setter
    def state(self, state: dict[torch.Tensor, Any]) -> None:
        self.base.state = state

    @property
    def defaults(self) -> dict[str, Any]:  # type: ignore[override]
        return self.base.defaults

    @defaults.setter
    def defaults(self, defaults: dict[str, Any]) -> None:
        self.base.defaults = defaults

    # -- balancing -------------------------------------------------------------------------------

    @property
    def mode(self) -> Mode:
        return self.balancer.mode

    @property
    def normalize(self) -> bool:
        return self.balancer.normalize

    @property
    def stats_every(self) -> int:
        return self.balancer.stats_every

    @property
    def weights(self) -> torch.Tensor | None:
        """π of the last balanced :meth:`backward`, float64 ``(k,)`` (None before the first)."""
        return self.balancer.weights

    @property
    def named_weights(self) -> dict[str, torch.Tensor]:
        """:attr:`weights` by loss name (:attr:`gradbalance.Balancer.named_weights`)."""
        return self.balancer.named_weights

    @property
    def stats(self) -> dict[str, torch.Tensor]:
        """Diagnostics of the last balanced :meth:`backward`
        (:func:`gradbalance.diagnostics.gradient_statistics`, and ``"weights"``)."""
        return self.balancer.stats

    def backward(
        self,
        losses: LossesLike,
        *,
        accumulate: bool = False,
        retain_graph: bool = False,
        grad_scaler: torch.amp.GradScaler | None = None,
        representation: torch.Tensor | Sequence[torch.Tensor] | None = None,
    ) -> None:
        """:meth:`gradbalance.Balancer.backward` of ``losses`` on this optimizer's param groups:
        instead of ``loss.backward()``."""
        self.balancer.backward(
            losses,
            self.param_groups,
            accumulate=accumulate,
            retain_graph=retain_graph,
            grad_scaler=grad_scaler,
            representation=representation,
        )

    def update_weights(self, losses: LossesLike) -> None:
        """:meth:`gradbalance.Balancer.update_weights`: amortized mode, FAMO's re-forward scheme
        (call it after :meth:`step` with the losses re-measured on the same batch)."""
        self.balancer.update_weights(losses)

    # -- torch.optim.Optimizer interface ---------------------------------------------------------

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        if not isinstance(param_group, dict):
            return self.base.add_param_group(param_group)  # the base's own error
        param_group = materialised([param_group])[0]
        # fused=True was this wrapper's choice, not the user's: a group the fused kernel cannot
        # step (complex, another device) gets the base's own default instead.
        chosen = not {"fused", "foreach"} & param_group.keys()
        differentiable = self.defaults.get("differentiable", False)
        if self._implicitly_fused and chosen and not fused_supported([param_group], differentiable):
            param_group = {**param_group, "fused": None}
        self.base.add_param_group(param_group)

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Zeroes ``.grad`` as the base does, and drops micro-batches not yet balanced."""
        self.balancer.discard_micro_batches()
        self.base.zero_grad(set_to_none=set_to_none)

    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """One step of the base optimizer on the balanced ``.grad``.

        ``closure``, if given, must recompute the losses and call :meth:`backward`; it is passed to
        the base optimizer's ``step`` (which evaluates it under ``torch.enable_grad()``).

        ``grad_scale`` and ``found_inf`` set on this optimizer before the call (the protocol of
        torch's fused optimizers, by which a step is unscaled and skipped on the device) are
        handed to the base for the step, where the base takes them.

        Raises:
            RuntimeError: micro-batches were accumulated (``backward(..., accumulate=True)``) but
                not balanced by a final ``backward(...)``; nothing is stepped.
        """
        if closure is None:
            self.balancer.window.refuse_step()
        # Whether a refused step is skipped, and how, is the guard's (as GradScaler's, its step);
        # a caller's found_inf and grad_scale (the fused-optimizer protocol) go to the base.
        found_inf, grad_scale = self.__dict__.get("found_inf"), self.__dict__.get("grad_scale")
        run = base_step
        if found_inf is not None or grad_scale is not None:
            run = with_scaling(found_inf, grad_scale)
        return self.balancer._guard.take_step(self.base, closure, run)

    def state_dict(self) -> dict[str, Any]:
        """torch's ``Optimizer.state_dict`` of the base's groups and state (hooks included), with
        the balancing state in ``param_groups[0]["gradbalance"]``."""
        self.param_groups[0][STATE_KEY] = self.balancer.state_dict()
        return super().state_dict()

    def __setstate__(self, state: dict[str, Any]) -> None:
        if "balancer" in state:  # unpickling (pickle, copy.deepcopy)
            self.__dict__.update(state)
            Optimizer.__setstate__(self, {})
            return
        # torch's Optimizer.load_state_dict hands over the loaded state and param groups here,
        # after checking them against the current groups and before its post-hooks.
        first = state["param_groups"][0]
        balancing = first.get(STATE_KEY)
        if balancing is not None:
            self.balancer.check_state_dict(balancing)
        self.base.__setstate__(state)
        if balancing is None:  # a plain base-optimizer state dict: the balancing stays as it is
            first[STATE_KEY] = self.balancer.state_dict()
        else:
            self.balancer.load_state_dict(balancing)

    def __getstate__(self) -> dict[str, Any]:
        return {
            "base": self.base,
            "balancer": self.balancer,
            "_implicitly_fused": self._implicitly_fused,
        }

    def __repr__(self) -> str:
        return f"{type(self).__name__}(mode={self.mode!r}, base={self.base!r})"
