"""The base optimizer of a :class:`~gradbalance.MultiObjectiveOptimizer`: built from the call as
it was made (torch's fused Adam(W) kernel where it runs), and stepped as it would step alone —
its own step hooks, a scheduler's bookkeeping, and a caller's ``found_inf`` / ``grad_scale``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch.optim import Optimizer
from torch.optim.optimizer import _default_to_fused_or_foreach

from ._guard import Guard

__all__ = [
    "MISSING",
    "base_step",
    "build_base",
    "default_guard",
    "fused_supported",
    "materialised",
    "with_scaling",
]

# Base optimizers that get torch's fused kernel by default (a 1.6 M parameter AdamW step on a
# 2-core CPU: 0.21x the time of torch's default single-tensor loop; see docs/performance.md).
_FUSED_BY_DEFAULT = (torch.optim.AdamW, torch.optim.Adam)


class _Missing:
    def __repr__(self) -> str:
        return "<missing>"


MISSING: Any = _Missing()


def with_scaling(
    found_inf: torch.Tensor | None, grad_scale: torch.Tensor | None
) -> Callable[[Optimizer, Callable[[], Any] | None], Any]:
    """:func:`base_step` with the caller's ``found_inf`` and ``grad_scale`` set on a base that
    takes them (a fused one; torch's others ignore them, and so does this), ``found_inf`` merged
    with the verdict a device guard set there for the same step."""

    def run(base: Optimizer, closure: Callable[[], Any] | None) -> Any:
        if not getattr(base, "_step_supports_amp_scaling", False):
            return base_step(base, closure)
        saved = {
            key: base.__dict__[key] for key in ("grad_scale", "found_inf") if key in base.__dict__
        }
        refused = saved.get("found_inf")
        merged = found_inf
        if refused is not None:
            merged = (
                refused if found_inf is None else torch.maximum(found_inf, refused.to(found_inf))
            )
        base.grad_scale, base.found_inf = grad_scale, merged
        try:
            return base_step(base, closure)
        finally:
            del base.grad_scale, base.found_inf
            base.__dict__.update(saved)

    return run


def base_step(base: Optimizer, closure: Callable[[], Any] | None = None) -> Any:
    """The base's step with its own step hooks (``base.register_step_pre_hook``) but not torch's
    global ones (``register_optimizer_step_pre_hook`` / ``_post_hook``), which ran for this
    wrapper's step: they run once per ``step()``, as for the base alone. Torch's wrapper of
    ``step``, less the global hooks.

    A learning-rate scheduler built on the base wrapped ``base.step`` to record that the base
    stepped (``_opt_called``, read by its first ``step()`` to warn when it comes first): it is
    recorded here as that wrapper records it, since the wrapper itself is not called."""
    if getattr(base.__dict__.get("step"), "_wrapped_by_lr_sched", False):
        base._opt_called = True  # type: ignore[attr-defined]
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


def default_guard(base: Optimizer) -> Guard:
    """ "device" where it costs nothing: CUDA parameters and a base that skips on the device."""
    tensors = [p for group in base.param_groups for p in group["params"]]
    on_cuda = bool(tensors) and all(p.device.type == "cuda" for p in tensors)
    return "device" if on_cuda and getattr(base, "_step_supports_amp_scaling", False) else "sync"


def build_base(
    params: Any,
    base: type[Optimizer],
    args: tuple,
    kwargs: dict[str, Any],
) -> tuple[Optimizer, bool]:
    """The base optimizer, built from the call as it was given, and whether this wrapper chose
    ``fused=True`` for it."""
    if isinstance(params, Optimizer):
        if args or kwargs:
            given = [f"{len(args)} positional"] if args else []
            raise ValueError(
                f"got an optimizer instance to wrap and arguments for a new one: "
                f"{', '.join(given + sorted(kwargs))}"
            )
        return params, False
    if isinstance(base, Optimizer):
        raise TypeError(
            "base must be an optimizer class; to wrap an existing optimizer pass it as the first "
            "argument: MultiObjectiveOptimizer(existing_optimizer, mode=...)"
        )
    if params is MISSING:
        return base(*args, **kwargs), False  # the base's own "missing 'params'" error
    if base not in _FUSED_BY_DEFAULT or {"fused", "foreach"} & kwargs.keys():
        return base(params, *args, **kwargs), False
    # The base checks its arguments before it reads params: so do we, on a probe, before params
    # are read to choose the kernel (a generator is then not consumed by a call that fails).
    base([torch.empty(0, requires_grad=True)], *args, **kwargs)
    params = materialised(params)
    fused = fused_supported(params, kwargs.get("differentiable", False))
    return base(params, *args, **({**kwargs, "fused": True} if fused else kwargs)), fused


def materialised(params: Any) -> Any:
    """The params argument with every iterator in it turned into a list, so that it can be read
    twice; what is not an iterable of tensors, pairs or groups is left as it is, for the base to
    refuse with its own error (a single tensor, None, a set of tensors in a group)."""
    if isinstance(params, torch.Tensor):
        return params
    try:
        items = list(params)
    except TypeError:
        return params
    return [
        {**item, "params": _as_list(item["params"])}
        if isinstance(item, dict) and "params" in item
        else item
        for item in items
    ]


def _as_list(params: Any) -> Any:
    if isinstance(params, torch.Tensor):
        return [params]
    if isinstance(params, set) or not isinstance(params, Iterable):
        return params  # the base's error
    return list(params)


def _tensors(params: Any) -> list[torch.Tensor] | None:
    """The tensors of a params argument — tensors, (name, tensor) pairs, or groups of either —
    or None where it is not one (the base refuses it)."""
    if not isinstance(params, list):
        return None
    members = []
    for item in params:
        if isinstance(item, dict):
            if not isinstance(item.get("params"), list):
                return None
            members.extend(item["params"])
        else:
            members.append(item)
    tensors = [m[1] if isinstance(m, tuple) and len(m) == 2 else m for m in members]
    return tensors if all(isinstance(t, torch.Tensor) for t in tensors) else None


def fused_supported(params: Any, differentiable: bool) -> bool:
    """Whether torch's fused Adam(W) kernel runs on all these parameters (device and dtype)."""
    tensors = _tensors(materialised(params))
    if not tensors:
        return False
    fused, _ = _default_to_fused_or_foreach(tensors, differentiable, use_fused=True)
    return fused
