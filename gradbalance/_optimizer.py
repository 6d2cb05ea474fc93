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

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch.optim import Optimizer
from torch.optim.optimizer import _default_to_fused_or_foreach

from ._balancer import Balancer
from ._guard import Guard
from ._inputs import LossesLike
from ._options import OPTION_NAMES
from .modes import Mode

__all__ = ["MultiObjectiveOptimizer"]

# The balancing state rides in the first param group under this key: the one place of a state
# dict that torch.distributed.checkpoint keeps for keys it does not know (it rewrites "state" by
# parameter).
STATE_KEY = "gradbalance"
# Base optimizers that get torch's fused kernel by default (a 1.6 M parameter AdamW step on a
# 2-core CPU: 0.21x the time of torch's default single-tensor loop; see docs/performance.md).
_FUSED_BY_DEFAULT = (torch.optim.AdamW, torch.optim.Adam)


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
            for any torch optimizer; or an already constructed optimizer to wrap (then
            ``base_kwargs`` must be empty).
        base: the optimizer class that takes the step (default :class:`torch.optim.AdamW`; AdamW
            and Adam get ``fused=True`` where torch supports it, unless ``fused`` or ``foreach``
            is given).
        mode: the Balancer's (:mod:`gradbalance.modes`).
        guard: what a refused step does (the Balancer's): ``"sync"`` raises at once, at the cost
            of one host synchronisation per backward; ``"device"`` skips it on the device and
            raises later (:meth:`gradbalance.Balancer.raise_deferred`). Default (None):
            ``"device"`` where the parameters are on CUDA and the base takes ``found_inf``
            (torch's fused Adam, AdamW, SGD, Adagrad: the default base is fused), else ``"sync"``.
        **kwargs: the Balancer's options (:class:`gradbalance.BalancingOptions`, less
            ``guard``); the other keyword arguments are the base's (``lr``, ``weight_decay``,
            ``betas``, ``fused``, …).

    Example::

        opt = MultiObjectiveOptimizer(model.parameters(), lr=1e-3, weight_decay=0.05)
        for x, y in loader:
            opt.zero_grad()
            student_logits, features = model(x)
            opt.backward({"distill": distill_loss(student_logits, features),
                          "task": task_loss(student_logits, y)})
            opt.step()
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]] | Optimizer,
        base: type[Optimizer] = torch.optim.AdamW,
        *,
        mode: Mode = "exact",
        guard: Guard | None = None,
        **kwargs: Any,
    ) -> None:
        options = {name: kwargs.pop(name) for name in OPTION_NAMES if name in kwargs}
        self.base, self._implicitly_fused = _build_base(params, base, kwargs)
        guard = _default_guard(self.base) if guard is None else guard
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
        param_group = _materialised([param_group])[0]
        # fused=True was this wrapper's choice, not the user's: a group the fused kernel cannot
        # step (complex, another device) gets the base's own default instead.
        chosen = not {"fused", "foreach"} & param_group.keys()
        differentiable = self.defaults.get("differentiable", False)
        if (
            self._implicitly_fused
            and chosen
            and not _fused_supported([param_group], differentiable)
        ):
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

        Raises:
            RuntimeError: micro-batches were accumulated (``backward(..., accumulate=True)``) but
                not balanced by a final ``backward(...)``; nothing is stepped.
        """
        if closure is None:
            self.balancer.window.refuse_step()
        # Whether a refused step is skipped, and how, is the guard's (as GradScaler's, its step).
        return self.balancer._guard.take_step(self.base, closure, _base_step)

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


def _base_step(base: Optimizer, closure: Callable[[], Any] | None = None) -> Any:
    """The base's step with its own step hooks (``base.register_step_pre_hook``) but not torch's
    global ones (``register_optimizer_step_pre_hook`` / ``_post_hook``), which ran for this
    wrapper's step: they run once per ``step()``, as for the base alone. Torch's wrapper of
    ``step``, less the global hooks."""
    step = type(base).step
    if not getattr(step, "hooked", False):  # a step torch's Optimizer has not wrapped
        return base.step(closure)
    args, kwargs = (base, closure), {}
    for hook in list(base._optimizer_step_pre_hooks.values()):
        result = hook(base, args, kwargs)
        if result is not None:
            args, kwargs = result
    loss = step.__wrapped__(*args, **kwargs)
    for hook in list(base._optimizer_step_post_hooks.values()):
        hook(base, args, kwargs)
    return loss


def _default_guard(base: Optimizer) -> Guard:
    """ "device" where it costs nothing: CUDA parameters and a base that skips on the device."""
    tensors = [p for group in base.param_groups for p in group["params"]]
    on_cuda = bool(tensors) and all(p.device.type == "cuda" for p in tensors)
    return "device" if on_cuda and getattr(base, "_step_supports_amp_scaling", False) else "sync"


def _build_base(
    params: Iterable[torch.Tensor] | Iterable[dict[str, Any]] | Optimizer,
    base: type[Optimizer],
    base_kwargs: dict[str, Any],
) -> tuple[Optimizer, bool]:
    """The base optimizer, and whether this wrapper chose ``fused=True`` for it."""
    if isinstance(params, Optimizer):
        if base_kwargs:
            raise ValueError(
                f"got an optimizer instance to wrap and keyword arguments for a new one: "
                f"{sorted(base_kwargs)}"
            )
        return params, False
    if isinstance(base, Optimizer):
        raise TypeError(
            "base must be an optimizer class; to wrap an existing optimizer pass it as the first "
            "argument: MultiObjectiveOptimizer(existing_optimizer, mode=...)"
        )
    fused = False
    if base in _FUSED_BY_DEFAULT and not {"fused", "foreach"} & base_kwargs.keys():
        params = _materialised(params)
        fused = _fused_supported(params, base_kwargs.get("differentiable", False))
        if fused:
            base_kwargs = {**base_kwargs, "fused": True}
    return base(params, **base_kwargs), fused


def _materialised(params: Iterable) -> list:
    """The params argument with every generator turned into a list, so it can be read twice."""
    items = list(params)
    return [
        {**item, "params": _as_list(item["params"])} if isinstance(item, dict) else item
        for item in items
    ]


def _as_list(params: torch.Tensor | Iterable) -> list:
    return [params] if isinstance(params, torch.Tensor) else list(params)


def _tensors(params: list) -> list[torch.Tensor]:
    """The tensors of a params argument: tensors, (name, tensor) pairs, or groups of either."""
    members = [m for item in params for m in (item["params"] if isinstance(item, dict) else [item])]
    return [m[1] if isinstance(m, tuple) else m for m in members]


def _fused_supported(params: list, differentiable: bool) -> bool:
    """Whether torch's fused Adam(W) kernel runs on all these parameters (device and dtype)."""
    tensors = _tensors(_materialised(params))
    fused, _ = _default_to_fused_or_foreach(tensors, differentiable, use_fused=True)
    return bool(tensors) and fused
