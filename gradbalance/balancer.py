"""The balancing of k losses as a stateful object, in the spirit of ``torch.amp.GradScaler``.

:class:`Balancer` owns everything the balancing needs — the mode, its π state, the buffers, the
micro-batch window — and writes the balanced gradient into ``.grad`` for whatever optimizer then
steps. :class:`gradbalance.MultiObjectiveOptimizer` is a base optimizer plus a Balancer; codebases
that own their optimizer (Hugging Face Trainer, Lightning's automatic optimisation, DeepSpeed) use
a Balancer directly::

    balancer = Balancer(mode="exact")
    ...
    balancer.backward({"distill": loss_distill, "task": loss_task}, model.parameters())
    optimizer.step()

One driver serves every mode: it checks the input, gathers micro-batches, validates (one host
synchronisation), writes ``.grad`` and only then keeps the new state, so a call that raises
changes nothing. The modes themselves are small classes (:class:`GramMode`, :class:`FamoMode`):
what π is, and the state it needs. The math is docs/method.md's.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, Literal

import torch

from . import distributed, engine, exact
from ._inputs import (
    LossesLike,
    ParamsLike,
    as_losses,
    as_min_losses,
    as_representation,
    checked_min_losses,
    describe_unreached,
    describe_unshared,
    trainable,
    weighting_output,
)
from .amortized import FAMO_EPSILON, FamoHyperparameters, FamoState, PiOptimizer, famo_update
from .diagnostics import gradient_statistics
from .engine import Role
from .guard import DeviceGuard, Guard, Ok, SyncGuard, both, losses_valid, poisoned, select
from .strategy import PerTaskBackward
from .weighting import affine_weights, loss_coefficients, min_norm_weights

__all__ = ["Balancer", "FamoMode", "GramMode", "Mode"]

Mode = Literal["exact", "amortized", "affine", "representation"]
MODES = ("exact", "amortized", "affine", "representation")
WEIGHTED_MODES = ("exact", "representation")  # the modes that take weighting=
# A weighting: the (k, k) float64 Gram matrix of the log-loss gradients ↦ π, (k,).
Weighting = Callable[[torch.Tensor], torch.Tensor]
_STATE_VERSION = 2  # 2: adds "vectorize"
_READABLE_VERSIONS = (1, 2)


class GramMode:
    """Exact, affine and representation modes: π from the Gram matrix of the log-loss gradients
    — with respect to the parameters (``per_task``: one gradient per loss and parameter), or to a
    shared representation (representation mode: then one weighted backward).

    Args:
        name: the mode's name. weighting: ``G (k, k) ↦ π (k,)``, a function of the Gram matrix
            (:mod:`gradbalance.weighting`). custom: it is the user's, so what it returns is
            checked (:func:`weighting_output`, and the guard's ``check_weights``).
    """

    def __init__(self, name: str, weighting: Weighting, custom: bool = False) -> None:
        self.name = name
        self.weighting = weighting
        self.custom = custom
        self.source = _weighting_name(weighting)
        self.per_task = name != "representation"

    def weights(self, gram: torch.Tensor) -> torch.Tensor:
        weights = self.weighting(gram)
        if self.custom:
            weights = weighting_output(weights, len(gram), self.source).to(gram.device)
        return weights.to(torch.float64)

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Nothing to load: π depends on the current gradients only."""


class FamoMode:
    """Amortized mode (FAMO): π = softmax(w), the logits w stepped from the log-loss decrease.

    The logits and their moments (:class:`gradbalance.amortized.FamoState`) and the losses of the
    last balanced backward, whose decrease the next update measures.
    """

    name = "amortized"
    per_task = False

    def __init__(self, hyper: FamoHyperparameters) -> None:
        self.hyper = hyper
        self.famo: FamoState | None = None
        self.previous_losses: torch.Tensor | None = None

    def current(self, num_losses: int, like: torch.Tensor) -> FamoState:
        """The state on ``like``'s device (a fresh one before the first balanced backward)."""
        dtype = torch.promote_types(like.real.dtype, torch.float32)  # complex: its real dtype
        if self.famo is None:
            return FamoState.initial(num_losses, like.device, dtype)
        return self.famo.to(like.device, dtype)

    def advanced(
        self, famo: FamoState, current: torch.Tensor, min_losses: torch.Tensor
    ) -> FamoState:
        """The state after learning from the decrease since the last balanced backward (pure)."""
        if self.previous_losses is None:
            return famo
        previous = self.previous_losses.to(current.device)
        return famo_update(famo, previous, current, min_losses, self.hyper)

    def commit(self, famo: FamoState, losses: torch.Tensor | None, ok: Ok) -> None:
        """Keeps the new state where the verdict ``ok`` holds."""
        if ok is False:
            return
        if ok is not True and self.famo is not None:
            famo = famo.where(ok, self.famo)
        previous = self.previous_losses
        self.famo = famo
        self.previous_losses = losses if losses is None else select(ok, losses, previous)

    def state_dict(self) -> dict[str, Any]:
        famo = self.famo
        return {
            "famo": FamoState.empty_state_dict() if famo is None else famo.state_dict(),
            "previous_losses": _floats(self.previous_losses),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        famo = state["famo"]
        self.famo = FamoState.from_state_dict(famo) if famo["logits"] else None
        previous = state["previous_losses"]
        self.previous_losses = torch.tensor(previous, dtype=torch.float64) if previous else None


@dataclass(frozen=True)
class _Window:
    """Micro-batches gathered since the last balanced backward: their loss sum and count, and
    the row scale ρ of the per-task gradients (fixed by the first micro-batch)."""

    loss_sum: torch.Tensor  # (k,) float64, averaged over ranks
    count: int
    rho: torch.Tensor | None  # (k,) float64; None in amortized mode
    ok: Ok = True  # the verdict on the micro-batches held (guard="device": on the device)

    def add(self, values: torch.Tensor) -> _Window:
        return _Window(self.loss_sum + values, self.count + 1, self.rho, self.ok)

    @property
    def mean(self) -> torch.Tensor:
        return self.loss_sum if self.count == 1 else self.loss_sum / self.count


@dataclass(frozen=True)
class _Step:
    """One backward call's checked inputs."""

    losses: torch.Tensor  # (k,), with graph, unscaled
    names: tuple[str, ...] | None
    values: torch.Tensor  # (k,) float64, averaged over the ranks
    min_losses: torch.Tensor  # (k,) float64
    scale: torch.Tensor | None  # the grad scaler's scale, 0-d float64
    accumulate: bool
    layout: distributed.Layout
    tensors: list[torch.Tensor]  # the trainable parameters, then the leaves outside them
    roles: list[Role]

    @property
    def scaled(self) -> bool:
        return self.scale is not None

    def reached_only(self, gradients: list) -> tuple[_Step, list]:
        """This step without the outside leaves that got no gradient (under FSDP, the unsharded
        parameters: FSDP takes their gradients itself), and the gradients without theirs."""
        keep = [
            i
            for i, (role, gradient) in enumerate(zip(self.roles, gradients, strict=True))
            if role is not Role.OUTSIDE or gradient is not None
        ]
        if len(keep) == len(gradients):
            return self, gradients
        step = replace(
            self, tensors=[self.tensors[i] for i in keep], roles=[self.roles[i] for i in keep]
        )
        return step, [gradients[i] for i in keep]

    def describe(self, index: int) -> str:
        tensor = self.tensors[index]
        where = (
            "a leaf outside the parameters" if self.roles[index] is Role.OUTSIDE else "a parameter"
        )
        return f"{where} of shape {tuple(tensor.shape)}"


class Balancer:
    """Balances k losses at the gradient level and writes the result into ``.grad``.

    Each :meth:`backward` chooses weights π on the simplex for the log-losses
    ``log(L_i − m_i)``, whose gradients are ``g_i = ∇L_i / (L_i − m_i)``, and adds the direction
    ``d = Σ_i π_i g_i`` into ``.grad`` of the parameters, as ``loss.backward()`` adds the
    gradient of a loss. Any optimizer then steps on it.

    Modes:

    * ``"exact"`` (MoKD eq. 9, MGDA): per-task gradients from one vectorised backward, their Gram
      matrix accumulated in float64, ``π = argmin_{π ∈ Δ} ‖Σ π_i g_i‖²`` solved exactly
      (:func:`gradbalance.weighting.min_norm_weights`). ``d`` never conflicts with any
      objective: ``⟨d, g_i⟩ ≥ ‖d‖² ≥ 0``.
    * ``"amortized"`` (FAMO): one ordinary backward of the π-weighted sum; π = softmax(w), the
      logits w stepped by a small Adam(W) (``pi_lr``, ``pi_weight_decay``, ``pi_optimizer``)
      from how much each log-loss decreased between consecutive balanced backward calls; or call
      :meth:`update_weights` after the optimizer's step with the losses re-measured on the same
      batch (FAMO's own scheme).
    * ``"affine"``: the paper's Theorem 3.1 without π ≥ 0, for reproducing the paper only — it
      stops training when the objectives agree (:func:`gradbalance.weighting.affine_weights`).
    * ``"representation"`` (Sener & Koltun 2018's MGDA upper bound): exact mode's π, but from the
      Gram matrix of the log-loss gradients with respect to a shared representation passed as
      ``backward(..., representation=z)`` (the student's outputs or features both losses read),
      then one ordinary backward of the π-weighted sum: about the cost of ``loss.backward()``.
      Since ``∇_θ L_i = (∂z/∂θ)ᵀ ∇_z L_i``, ``d`` does not conflict with any objective *at z*;
      at the parameters it is a bound, not a guarantee (docs/method.md, "Representation
      mode"). With micro-batches each is balanced by the π of its own representation.

    ``.grad`` is written as ``Tensor.backward`` writes it: torch's layout contract (strides of the
    parameter, no aliasing; after ``zero_grad()`` a new buffer, so a ``.grad`` kept from an
    earlier step never changes), accumulated into an existing ``.grad``, post-accumulate-grad
    hooks run afterwards. Leaves of the losses' graph that are not among ``params`` (a head
    trained by another optimizer, an input with ``requires_grad``) get the gradient of the same
    balanced combination, as ``loss.backward()`` would give them one.

    Under ``torch.distributed`` (a process group with more than one rank) loss values and
    gradients are averaged over the ranks before π is computed: every rank computes the same π and
    the step equals one process on the global batch.

    Bad input raises :class:`ValueError` naming the loss, before anything changes (no ``.grad``,
    no π state): fewer than two losses, a loss that is not a scalar tensor, a loss that is
    detached or whose graph reaches none of the parameters, a different number or naming of
    losses than before, a loss that is NaN, infinite or not above its ``min_loss``, non-finite
    gradients (raised rather than skipped, so that a NaN never reaches the weights silently —
    except with a ``grad_scaler``, whose step skips them), sparse gradients. Checking costs one
    host synchronisation per :meth:`backward` (one more per accumulated micro-batch, and under
    torch.distributed).

    Args:
        mode: ``"exact"``, ``"amortized"`` or ``"affine"``.
        min_losses: lower bounds ``m_i`` of the losses (default 0), so that losses that can be
            negative work; its length fixes k.
        normalize: divide ``d`` by ``Σ_j π_j / (L_j − m_j)``, which makes the update a convex
            combination of the raw gradients ``∇L_i`` (FAMO's scaling). Default: True in amortized
            mode, False otherwise (the paper's step ``θ ← θ − η d``). Not allowed in affine mode,
            whose π can be negative.
        pi_lr, pi_weight_decay, pi_optimizer: the optimizer of the logits in amortized mode
            (``"adamw"``, lr 0.025, weight decay 0.01: the paper; ``"adam"``: FAMO's code).
        stats_every: in amortized mode, also compute the per-task gradient statistics every
            ``stats_every``-th backward (costs the per-task backward on those calls; 0 = never).
            Exact and affine modes compute them on every call anyway.
        vectorize: how exact and affine modes compute the per-task gradients: ``True``, one
            vmapped backward (``torch.autograd.grad(..., is_grads_batched=True)``); ``False``, k
            ordinary backward passes, each copied into its row of the ``(k, n)`` buffer as it
            comes; ``None`` (default), both measured on the first six steps and the faster kept
            (:mod:`gradbalance.strategy`; k passes for good, with a warning, the first time vmap
            cannot batch an operator). :attr:`vectorize` tells the choice made; it is part of
            the state dict.
        guard: ``"sync"`` (default) raises on a refused step at once; ``"device"`` keeps the
            verdict on the device (:mod:`gradbalance.guard`).
        weighting: exact and representation modes: another rule for π, any callable from the
            ``(k, k)`` float64 Gram matrix ``G_ij = ⟨g_i, g_j⟩`` of the log-loss gradients (on
            the parameters' device) to π, a floating ``(k,)`` tensor — for instance a
            ``torchjd.aggregation`` Weighting (``UPGradWeighting()``, ``PCGradWeighting()``,
            …) as it is. Default: the exact min-norm π on the simplex. π need not lie on the
            simplex (``d = Σ π_i g_i`` is followed as it is) but must be finite, and with
            ``normalize=True`` non-negative with a positive sum; otherwise the step is refused
            like an invalid loss. A weighting that reads G on the host synchronises a CUDA
            stream. Its own state, if any, is not part of :meth:`state_dict`.
    """

    def __init__(
        self,
        mode: Mode = "exact",
        *,
        min_losses: Sequence[float] | torch.Tensor | None = None,
        normalize: bool | None = None,
        pi_lr: float = 0.025,
        pi_weight_decay: float = 0.01,
        pi_optimizer: PiOptimizer = "adamw",
        stats_every: int = 0,
        vectorize: bool | None = None,
        guard: Guard = "sync",
        weighting: Weighting | None = None,
    ) -> None:
        if mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(map(repr, MODES))}, got {mode!r}")
        if weighting is not None and mode not in WEIGHTED_MODES:
            raise ValueError(
                f"weighting= is for the modes {' and '.join(WEIGHTED_MODES)}, which compute the "
                f"Gram matrix every step; {mode} mode has its own π"
            )
        if weighting is not None and not callable(weighting):
            raise TypeError(f"weighting must be callable, got {type(weighting).__name__}")
        normalize = mode == "amortized" if normalize is None else normalize
        if normalize and mode == "affine":
            raise ValueError("normalize=True needs non-negative weights; affine mode has none")
        if stats_every < 0:
            raise ValueError(f"stats_every must be ≥ 0, got {stats_every}")
        if guard not in ("sync", "device"):
            raise ValueError(f"guard must be 'sync' or 'device', got {guard!r}")
        self._guard: SyncGuard | DeviceGuard = SyncGuard() if guard == "sync" else DeviceGuard()
        hyper = FamoHyperparameters(pi_lr, pi_weight_decay, pi_optimizer)
        self.normalize = normalize
        self.stats_every = stats_every
        self._mode: GramMode | FamoMode = (
            FamoMode(hyper) if mode == "amortized" else _gram_mode(mode, weighting)
        )
        self._min_losses_arg = min_losses
        self.num_losses: int | None = checked_min_losses(min_losses)
        self.loss_names: tuple[str, ...] | None = None
        self.backward_calls = 0
        self.weights: torch.Tensor | None = None
        self.stats: dict[str, torch.Tensor] = {}
        self._gram: torch.Tensor | None = None
        self._per_task = PerTaskBackward(vectorize)
        self._flat: engine.FlatGradients | None = None
        self._flat_key: tuple = ()
        self._window: _Window | None = None
        self._bounds_cache: torch.Tensor | None = None

    @property
    def mode(self) -> Mode:
        return self._mode.name  # type: ignore[return-value]

    @property
    def vectorize(self) -> bool | None:
        """Whether the per-task gradients come from one vmapped backward (None: still being
        measured, with ``vectorize=None``)."""
        return self._per_task.choice

    @property
    def named_weights(self) -> dict[str, torch.Tensor]:
        """π of the last balanced backward by loss name (``"0"``, ``"1"``, … for unnamed
        losses); empty before the first."""
        if self.weights is None:
            return {}
        names = self.loss_names or tuple(str(i) for i in range(len(self.weights)))
        return dict(zip(names, self.weights.unbind(), strict=True))

    @property
    def guard(self) -> Guard:
        return self._guard.name

    @property
    def found_inf(self) -> torch.Tensor | None:
        """guard="device": 1.0 (float32, on the device) when the last balanced backward was
        refused and its step must be skipped — what a fused optimizer's ``found_inf`` takes, as
        ``GradScaler`` hands it over; else 0.0. None with guard="sync", which raises instead."""
        return self._guard.found_inf

    @property
    def refused_steps(self) -> torch.Tensor | None:
        """guard="device": the balanced backward calls refused since the last
        :meth:`raise_deferred` (0-d int64 on the device; None before the first)."""
        return self._guard.refused_steps

    def raise_deferred(self) -> None:
        """guard="device": raises the ValueError of the last refused step, if a step was refused
        since the last call (one host synchronisation). :meth:`state_dict` calls it, since it
        synchronises anyway. guard="sync" raises at once and defers nothing."""
        self._guard.raise_deferred()

    @property
    def pending_micro_batches(self) -> int:
        """Micro-batches gathered with ``accumulate=True`` and not balanced yet."""
        return 0 if self._window is None else self._window.count

    def discard_micro_batches(self) -> None:
        """Drops the micro-batches gathered but not balanced (``zero_grad`` calls it)."""
        self._window = None

    # -- the balanced backward -------------------------------------------------------------------

    def backward(
        self,
        losses: LossesLike,
        params: ParamsLike,
        *,
        accumulate: bool = False,
        retain_graph: bool = False,
        grad_scaler: torch.amp.GradScaler | None = None,
        representation: torch.Tensor | Sequence[torch.Tensor] | None = None,
    ) -> None:
        """Computes π for ``losses`` and adds the balanced gradient into ``.grad`` of ``params``.

        Args:
            losses: k ≥ 2 scalar losses — a list, a tuple, a 1-D tensor, or a mapping of names to
                losses (``{"distill": ..., "task": ...}``, its order kept) — in the same order and
                with the same names every call; the first two are read as (distillation, task)
                by the statistics.
            params: the parameters π is computed for: tensors, ``(name, tensor)`` pairs or
                param-group dicts (an optimizer's ``param_groups``); a group with
                ``"balance": False`` stays out of the Gram matrix and gets the plain sum of the
                objectives (π_i = 1; exact and affine modes).
            accumulate: this is a micro-batch, not the last one: keep its gradients (per task in
                exact mode, π-weighted in amortized mode) and loss values, and leave ``.grad``
                alone. The next call without ``accumulate`` balances the *mean* of the
                micro-batches' gradients and losses — the same as one batch made of all of them,
                when each loss is a mean over equally sized micro-batches (do not divide the
                losses by the number of micro-batches). In amortized mode π is fixed within the
                window and updated once, on the last micro-batch.
            retain_graph: keep the autograd graph, as in :meth:`torch.Tensor.backward`.
            grad_scaler: a :class:`torch.amp.GradScaler`: the gradients are computed scaled by
                it (``.grad`` holds the scaled gradient, for ``scaler.unscale_`` /
                ``scaler.step``) while π and the statistics use the unscaled values. Non-finite
                gradients then do not raise: they reach ``.grad`` so that ``scaler.step`` skips
                the step, and the balancing state stays as it was.
            representation: representation mode only, and required there: the tensor(s) of the
                forward pass that the losses share — for distillation the student's outputs or
                features that both losses read, ``(batch, …)`` activations with their graph —
                with respect to which the Gram matrix is computed.

        Parameters that a loss does not reach count as zero for that loss; parameters that no loss
        reaches keep ``.grad`` as it was. Afterwards :attr:`weights` holds π (float64, ``(k,)``)
        and :attr:`stats` the gradient diagnostics.
        """
        shared = as_representation(representation, self.mode)
        step = self._checked_step(losses, params, accumulate, grad_scaler, shared)
        if shared is not None:
            self._representation_backward(step, shared, retain_graph)
        elif self._mode.per_task:
            eligible = self._window is None and _single(step) and not step.layout.sharded
            calls, probing = self.backward_calls, self._per_task.probing
            vectorized, measured = self._per_task.plan(
                eligible, step.losses.device, completed=lambda: self.backward_calls > calls
            )
            with measured:
                self._gram_backward(step, retain_graph, vectorized)
            if (
                probing
                and self._per_task.choice
                and self._window is None
                and self._flat is not None
            ):
                self._flat.release_task_buffers()  # the k passes lost the measurement
        else:
            self._amortized_backward(step, retain_graph)

    def update_weights(self, losses: LossesLike) -> None:
        """Amortized mode, FAMO's scheme: update π from the losses re-measured after the step.

        Call it after the optimizer's step with the losses of the same batch (a no-grad
        re-forward; with micro-batches, their mean); the logits move by how much each log-loss
        decreased since the last balanced :meth:`backward`, and the next :meth:`backward` does
        not update them again.
        """
        if not isinstance(self._mode, FamoMode):
            raise ValueError(f"update_weights is for mode='amortized', this one is {self.mode!r}")
        if self._mode.previous_losses is None:
            raise ValueError("update_weights needs a backward() since the last update")
        names, items = self._in_known_order(*_as_values(losses))
        famo = self._mode.famo
        min_losses = self._bounds(len(items), famo.logits.device)
        values = torch.stack([item.detach().reshape(()).to(torch.float64) for item in items])
        values = distributed.Layout(distributed.default_group(), False).average(
            values.to(min_losses.device)
        )
        ok = self._guard.check(values, min_losses, values.isfinite().all(), names)
        self._guard.conclude(ok)
        self._mode.commit(self._mode.advanced(famo, values, min_losses), None, ok)

    # -- input -----------------------------------------------------------------------------------

    def _checked_step(
        self,
        losses: LossesLike,
        params: ParamsLike,
        accumulate: bool,
        grad_scaler: torch.amp.GradScaler | None,
        representation: list[torch.Tensor] | None = None,
    ) -> _Step:
        names, items = self._in_known_order(*as_losses(losses))
        owned, balanced = trainable(params)
        roles = [Role.BALANCED if flag else Role.PLAIN for flag in balanced]
        if not self._mode.per_task and Role.PLAIN in roles:
            raise ValueError(
                f"'balance': False is for the exact and affine modes: {self.mode} mode computes "
                f"no per-task gradients of the parameters, so there is nothing to leave out"
            )
        if Role.BALANCED not in roles:
            raise ValueError("every param group has 'balance': False; nothing to balance")
        stacked = torch.stack(items)
        owned_ids = {id(tensor) for tensor in owned}
        outside = [leaf for leaf in engine.graph_leaves(stacked) if id(leaf) not in owned_ids]
        balanced_ids = {
            id(t) for t, role in zip(owned, roles, strict=True) if role is Role.BALANCED
        }
        layout = distributed.Layout.of(owned)
        # FSDP's graph reaches the sharded parameters through unsharded copies: no structure to
        # follow, requires_grad is all there is to check.
        reaches = [
            loss.requires_grad and (layout.sharded or engine.reaches(loss, balanced_ids))
            for loss in items
        ]
        if layout.group is not None:  # a loss reached on some rank is reached: one decision
            reaches = layout.any_rank(torch.tensor(reaches, device=stacked.device)).tolist()
        if not all(reaches):
            raise ValueError(describe_unreached(reaches, names))
        if representation is not None:
            _check_shared(items, representation, names)
        values = layout.average(stacked.detach().to(torch.float64, copy=True))
        scale = None
        if grad_scaler is not None and grad_scaler.is_enabled():
            # scale() of a tensor of ones: the scale on the device, without reading it back
            scale = grad_scaler.scale(torch.ones((), dtype=torch.float64, device=stacked.device))
        return _Step(
            losses=stacked,
            names=names,
            values=values,
            min_losses=self._bounds(len(items), stacked.device),
            scale=scale,
            accumulate=accumulate,
            layout=layout,
            tensors=owned + outside,
            roles=roles + [Role.OUTSIDE] * len(outside),
        )

    def _in_known_order(
        self, names: tuple[str, ...] | None, items: list[torch.Tensor]
    ) -> tuple[tuple[str, ...] | None, list[torch.Tensor]]:
        """The losses, checked against earlier calls, in the order their names first came in."""
        self._check_count(len(items), names)
        if names is not None and self.loss_names is not None and names != self.loss_names:
            items = [items[names.index(name)] for name in self.loss_names]
            names = self.loss_names
        return names, items

    def _check_count(self, count: int, names: tuple[str, ...] | None) -> None:
        """Refuses a number or naming of losses that does not match the window, ``min_losses``
        or earlier calls."""
        window = self._window
        if window is not None and count != len(window.loss_sum):
            raise ValueError(
                f"this micro-batch has {count} losses, the ones accumulated before it "
                f"{len(window.loss_sum)}"
            )
        if self.num_losses is not None and count != self.num_losses:
            if self.backward_calls == 0 and self._min_losses_arg is not None:
                raise ValueError(f"min_losses has {self.num_losses} entries but got {count} losses")
            raise ValueError(f"expected {self.num_losses} losses as in earlier steps, got {count}")
        known = self.loss_names
        if known is not None and (names is None or set(names) != set(known)):
            raise ValueError(
                f"the losses were named {list(known)} in earlier steps, got "
                f"{'unnamed losses' if names is None else list(names)}"
            )
        if known is None and names is not None and self.backward_calls > 0:
            raise ValueError(f"the losses were unnamed in earlier steps, got names {list(names)}")

    def _bounds(self, num_losses: int, device: torch.device) -> torch.Tensor:
        cached = self._bounds_cache
        if cached is None or len(cached) != num_losses or cached.device != device:
            cached = self._bounds_cache = as_min_losses(self._min_losses_arg, num_losses, device)
        return cached

    # -- exact and affine modes ------------------------------------------------------------------

    def _gram_backward(self, step: _Step, retain_graph: bool, vectorized: bool) -> None:
        window = self._opened(step)
        rho = window.rho.to(step.losses.dtype)  # the scale the rows are computed with
        step, flat, blocks = self._per_task_gradients(step, rho, retain_graph, vectorized)
        columns = None  # the rows are in the task buffers, unless:
        if blocks is not None and self._window is None and _single(step):
            columns = flat.as_columns(blocks)  # one batch, one process: no (k, n) copy
            held: Ok | None = True
        else:
            held = self._gather(step, window, flat, blocks)
        del blocks  # in the buffers or in columns: the rest would only hold memory
        if held is None:
            return
        shifted = window.mean - step.min_losses
        rho64 = rho.to(torch.float64)
        gram = exact.log_loss_gram(step.layout.global_gram(flat.gram(columns)), rho64, shifted)
        ok = self._guard.check(
            window.mean,
            step.min_losses,
            gram.isfinite().all(),
            step.names,
            culprits=lambda: flat.nonfinite_rows(columns),
            allow_nonfinite=step.scaled,
        )
        weights, valid = self._weights(gram, ok)
        ok = both(both(ok, held), valid)
        self._guard.conclude(ok)
        coefficients = exact.row_coefficients(
            weights, rho64, shifted, step.scale, normalize=self.normalize
        )
        coefficients = poisoned(coefficients, ok)
        plain = exact.row_coefficients(
            torch.ones_like(weights), rho64, shifted, step.scale, normalize=self.normalize
        )
        written = flat.write_grad(
            {Role.BALANCED: coefficients, Role.OUTSIDE: coefficients, Role.PLAIN: plain}, columns
        )
        engine.run_post_accumulate_grad_hooks(written)
        self._commit(step, weights, gram, ok)

    def _weights(self, gram: torch.Tensor, ok: Ok) -> tuple[torch.Tensor, Ok]:
        """π of the Gram matrix where the verdict holds, uniform where it does not (overflowed
        under a grad scaler: any finite π, the step is skipped); and the verdict on π — a user's
        weighting must return finite weights (non-negative, with a positive sum, to normalize).
        """
        uniform = torch.full((len(gram),), 1 / len(gram), dtype=torch.float64, device=gram.device)
        if ok is False:
            return uniform, True
        weights = self._mode.weights(gram if ok is True else _solvable(gram))
        valid = (
            self._guard.check_weights(weights, self._mode.source, self.normalize)
            if self._mode.custom
            else True
        )
        return (weights if ok is True else torch.where(ok, weights, uniform)), valid

    def _opened(self, step: _Step) -> _Window:
        """The window with this micro-batch; opening one fixes the rows' scale ρ."""
        if self._window is not None:
            return self._window.add(step.values)
        rho = (
            exact.row_scale(step.values - step.min_losses, step.scale)
            if self._mode.per_task
            else None
        )
        return _Window(step.values, 1, rho)

    def _per_task_gradients(
        self, step: _Step, rho: torch.Tensor, retain_graph: bool, vectorized: bool
    ) -> tuple[_Step, engine.FlatGradients, engine.Blocks | None]:
        """The per-task gradients ``ρ_i ∇L_i``, their buffers, and their blocks — or ``None``
        where the k passes went straight into the buffers' rows (no micro-batch held, so that
        nothing is spoilt if this one is refused)."""
        k = len(step.losses)
        if not step.layout.sharded and not vectorized and self._window is None:
            flat = self._flat_gradients(step, k)
            rows = engine.task_gradient_rows(step.losses, rho, step.tensors, retain_graph)
            for task, gradients in enumerate(rows):  # one pass's gradients alive at a time
                engine.require_dense(gradients, step.describe)
                flat.store_row(task, gradients)
            return step, flat, None
        blocks = self._task_gradients(step, rho, retain_graph, vectorized)
        step, blocks = step.reached_only(blocks)
        return step, self._flat_gradients(step, k), blocks

    def _task_gradients(
        self, step: _Step, rho: torch.Tensor, retain_graph: bool, vectorized: bool = True
    ) -> engine.Blocks:
        """Per-task gradients ``ρ_i ∇L_i`` as blocks: k backward passes for sharded parameters,
        else one vmapped backward (``vectorized``), or k passes."""
        if step.layout.sharded:
            scaled = [loss * scale for loss, scale in zip(step.losses, rho, strict=True)]
            passes = engine.backward_gradients(scaled, step.tensors, retain_graph=retain_graph)
            blocks = engine.stack_tasks(passes, step.tensors)
        else:
            blocks = self._autograd_task_gradients(
                step.losses, rho, step.tensors, retain_graph, vectorized
            )
        engine.require_dense(blocks, step.describe)
        return blocks

    def _autograd_task_gradients(
        self,
        losses: torch.Tensor,
        rho: torch.Tensor,
        tensors: list[torch.Tensor],
        retain_graph: bool,
        vectorized: bool,
    ) -> engine.Blocks:
        """Per-task gradients by ``torch.autograd.grad``: one vmapped backward (``vectorized``,
        unless vmap has failed in this run), or k passes. Where vmap cannot batch an operator
        (and ``vectorize`` was not ``True``), k passes for good, with a warning."""
        per_task = self._per_task
        if not vectorized or per_task.choice is False:
            return engine.task_gradients(
                losses, rho, tensors, vectorize=False, retain_graph=retain_graph
            )
        may_fall_back = not per_task.fixed and not per_task.vmap_ran
        try:
            # A first try that may fall back keeps the graph, so that the k passes can still run.
            blocks = engine.task_gradients(
                losses, rho, tensors, vectorize=True, retain_graph=retain_graph or may_fall_back
            )
        except RuntimeError as error:
            if not may_fall_back:
                raise
            warnings.warn(
                f"the vectorised per-task backward failed ({error}); using "
                f"{len(losses)} sequential backward passes from now on",
                stacklevel=6,
            )
            per_task.fall_back()
            return engine.task_gradients(
                losses, rho, tensors, vectorize=False, retain_graph=retain_graph
            )
        per_task.vmap_ran = True
        return blocks

    # -- amortized mode --------------------------------------------------------------------------

    def _amortized_backward(self, step: _Step, retain_graph: bool) -> None:
        mode = self._mode
        window = self._opened(step)
        famo = mode.current(len(step.losses), step.tensors[0])
        if not step.accumulate:
            famo = mode.advanced(famo, window.mean, step.min_losses)
        weights = famo.weights.to(torch.float64)
        coefficients = loss_coefficients(
            weights, step.values - step.min_losses + FAMO_EPSILON, normalize=self.normalize
        )
        gram = self._amortized_statistics(step)
        ok = self._weighted_backward(step, window, coefficients, retain_graph)
        if ok is not None:
            mode.commit(famo, window.mean, ok)
            self._commit(step, weights, gram, ok)

    # -- representation mode ---------------------------------------------------------------------

    def _representation_backward(
        self, step: _Step, representation: list[torch.Tensor], retain_graph: bool
    ) -> None:
        """π from the Gram matrix of the log-loss gradients with respect to the representation
        (Sener & Koltun's MGDA upper bound), then one backward of the π-weighted sum."""
        window = self._opened(step)
        shifted = step.values - step.min_losses
        rho = exact.row_scale(shifted, step.scale)
        blocks = self._autograd_task_gradients(
            step.losses,
            rho.to(step.losses.dtype),
            representation,
            retain_graph=True,
            vectorized=True,
        )
        engine.require_dense(blocks, lambda i: f"representation tensor {i}")
        rows = step.layout.batch_gram(engine.gram_matrix(blocks))
        gram = exact.log_loss_gram(rows, rho, shifted)
        # No host synchronisation: a non-finite G comes with non-finite gradients, refused below.
        weights, valid = self._weights(_solvable(gram), True)
        coefficients = poisoned(
            loss_coefficients(weights, shifted, normalize=self.normalize), valid
        )
        ok = self._weighted_backward(step, window, coefficients, retain_graph)
        if ok is not None:
            self._commit(step, weights, gram, both(ok, valid))

    # -- one weighted backward (amortized and representation modes) ------------------------------

    def _weighted_backward(
        self, step: _Step, window: _Window, coefficients: torch.Tensor, retain_graph: bool
    ) -> Ok | None:
        """Adds the gradient of ``Σ_i c_i L_i`` into ``.grad`` (through the micro-batch window)
        by one backward. Returns the verdict on the step, or None while micro-batches are held.
        """
        if step.scale is not None:
            coefficients = coefficients * step.scale
        if isinstance(self._guard, DeviceGuard):  # refused losses: a non-finite .grad
            values, bounds = _checked_values(step, window)
            coefficients = poisoned(coefficients, losses_valid(values, bounds))
        grads = engine.weighted_gradient(
            step.losses,
            coefficients,
            step.tensors,
            retain_graph=retain_graph,
            by_backward=step.layout.sharded,
        )
        engine.require_dense(grads, step.describe)
        step, grads = step.reached_only(grads)
        if step.accumulate or self._window is not None or step.layout.group is not None:
            flat = self._flat_gradients(step, 1)
            blocks = [None if grad is None else distributed.local(grad)[None] for grad in grads]
            held = self._gather(step, window, flat, blocks)
            if held is None:
                return None
            finite = step.layout.all_ranks(engine.all_finite(flat.task_buffers))
            ok = self._guard.check(
                window.mean,
                step.min_losses,
                finite,
                step.names,
                allow_nonfinite=step.scaled,
            )
            ok = both(ok, held)
            one = torch.ones(1, dtype=torch.float64, device=step.values.device)
            written = flat.write_grad(dict.fromkeys(Role, one))
        else:  # one batch, one process: straight into .grad
            ok = self._guard.check(
                step.values,
                step.min_losses,
                engine.all_finite(grads),
                step.names,
                allow_nonfinite=step.scaled,
            )
            written = engine.accumulate_grads(step.tensors, grads)
        engine.run_post_accumulate_grad_hooks(written)
        self._guard.conclude(ok)
        return ok

    def _amortized_statistics(self, step: _Step) -> torch.Tensor | None:
        """The Gram matrix of the log-loss gradients on every ``stats_every``-th call, else None.

        Observational: the update is always the one weighted backward, so statistics cannot change
        the trajectory. Under torch.distributed they are each rank's own.
        """
        if not self.stats_every or self.backward_calls % self.stats_every:
            return None
        shifted = step.values - step.min_losses
        rho = exact.row_scale(shifted, step.scale).to(step.losses.dtype)
        balanced = [
            t for t, role in zip(step.tensors, step.roles, strict=True) if role is Role.BALANCED
        ]
        balanced_step = replace(step, tensors=balanced, roles=[Role.BALANCED] * len(balanced))
        blocks = self._task_gradients(balanced_step, rho, retain_graph=True)
        return exact.log_loss_gram(engine.gram_matrix(blocks), rho.to(torch.float64), shifted)

    # -- shared pieces ---------------------------------------------------------------------------

    def _flat_gradients(self, step: _Step, num_tasks: int) -> engine.FlatGradients:
        """The flat buffers for these tensors, rebuilt only when the tensors change."""
        key = (
            num_tasks,
            *((id(t), role) for t, role in zip(step.tensors, step.roles, strict=True)),
        )
        if key != self._flat_key:
            if self._window is not None:
                raise ValueError(
                    "the trainable parameters changed between accumulated micro-batches"
                )
            self._flat = engine.FlatGradients(step.tensors, step.roles, num_tasks)
            self._flat_key = key
        return self._flat

    def _gather(
        self,
        step: _Step,
        window: _Window,
        flat: engine.FlatGradients,
        blocks: engine.Blocks | None,
    ) -> Ok | None:
        """Adds this micro-batch's blocks to ``flat`` (``None``: they are in its buffers
        already, no micro-batch being held); ``window`` is the accumulation window with it.
        Returns None while micro-batches are held; when the window is complete — ``flat`` then
        holds its means over micro-batches and ranks — the verdict on its micro-batches.

        A micro-batch that joins or opens a window is checked first, so that a bad one cannot
        spoil those held: its losses and gradients must be finite, and on the last micro-batch
        the mean losses must be above their bounds (guard="sync": one host synchronisation,
        and a ValueError; guard="device": the window's verdict turns false).
        """
        if step.accumulate or self._window is not None:
            held = flat.task_buffers if blocks is None else blocks
            finite = step.layout.all_ranks(engine.all_finite(held))  # every rank: one branch
            values, bounds = _checked_values(step, window)
            ok = self._guard.check(values, bounds, finite, step.names, allow_nonfinite=step.scaled)
            window = replace(window, ok=both(window.ok, ok))
        if blocks is not None:
            flat.store(blocks, accumulate=self._window is not None)
        if step.accumulate:
            self._window = window
            return None
        self._window = None  # the micro-batches are consumed from here on
        _average(flat, window.count, step.layout)
        return window.ok

    def _commit(
        self, step: _Step, weights: torch.Tensor, gram: torch.Tensor | None, ok: Ok
    ) -> None:
        """Keeps what a backward computed, where the verdict holds (on the device: the last
        state is kept where it does not; the call is counted either way)."""
        if ok is False:
            return
        self.num_losses = len(weights)
        self.loss_names = step.names
        self.backward_calls += 1
        self.weights = select(ok, weights, self.weights)
        self._gram = gram if gram is None else select(ok, gram, self._gram)
        self.stats = _statistics(self.weights, self._gram)

    # -- state dict and pickling -----------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """The balancing state as plain Python values (float64 numbers hold it exactly): the
        mode, k and the loss names, π and the Gram matrix of the last balanced backward, and the
        mode's own state (amortized mode: the logits, their moments, the previous losses).

        Its structure does not depend on the progress of the run, so that
        ``torch.distributed.checkpoint`` can load a saved one into a fresh one.

        Raises:
            ValueError: guard="device" refused a step since the last :meth:`raise_deferred`.
        """
        self.raise_deferred()
        return {
            "version": _STATE_VERSION,
            "mode": self.mode,
            "num_losses": self.num_losses,
            "loss_names": list(self.loss_names or ()),
            "backward_calls": self.backward_calls,
            "weights": _floats(self.weights),
            "gram": _floats(self._gram),
            "vectorize": self._per_task.state_dict(),
            **self._mode.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Loads a :meth:`state_dict`, after checking that it fits (else nothing changes)."""
        self.check_state_dict(state)
        self._mode.load_state_dict(state)
        self.num_losses = (
            state["num_losses"] if state["num_losses"] is not None else self.num_losses
        )
        self.loss_names = tuple(state["loss_names"]) or None
        self.backward_calls = int(state["backward_calls"])
        self.weights = _tensor(state["weights"])
        self._gram = _tensor(state["gram"])
        self._per_task.load_state_dict(state.get("vectorize"))  # absent from version 1
        self.stats = {} if self.weights is None else _statistics(self.weights, self._gram)
        self._window = None

    def check_state_dict(self, state: dict[str, Any]) -> None:
        """Raises a ValueError when ``state`` was saved by a different mode or for another k."""
        if not isinstance(state, dict) or state.get("version") not in _READABLE_VERSIONS:
            raise ValueError(
                "not a gradbalance balancing state (version "
                f"{_STATE_VERSION}): {type(state).__name__}"
            )
        if state["mode"] != self.mode:
            raise ValueError(
                f"the state dict was saved in mode {state['mode']!r}, this balancer runs in "
                f"mode {self.mode!r}"
            )
        saved_k = state["num_losses"]
        if None not in (saved_k, self.num_losses) and saved_k != self.num_losses:
            raise ValueError(
                f"the state dict balances {saved_k} losses, this balancer {self.num_losses}"
            )

    def __getstate__(self) -> dict[str, Any]:
        # The buffers and held micro-batches are per-run scratch, as .grad is for an optimizer.
        transient = {"_flat": None, "_flat_key": (), "_window": None}
        return {**self.__dict__, **transient}

    def __repr__(self) -> str:
        custom = isinstance(self._mode, GramMode) and self._mode.custom
        weighting = f", weighting={self._mode.source}" if custom else ""
        return (
            f"{type(self).__name__}(mode={self.mode!r}{weighting}, normalize={self.normalize}, "
            f"num_losses={self.num_losses})"
        )


def _as_values(losses: LossesLike) -> tuple[tuple[str, ...] | None, list[torch.Tensor]]:
    """Loss values (no graph needed) with their names, for :meth:`Balancer.update_weights`."""
    if isinstance(losses, Mapping):  # named as as_losses names them
        return tuple(str(name) for name in losses), [torch.as_tensor(v) for v in losses.values()]
    if isinstance(losses, torch.Tensor):
        return None, list(losses.reshape(-1).unbind())
    return None, [torch.as_tensor(v) for v in losses]


def _check_shared(
    losses: list[torch.Tensor], representation: list[torch.Tensor], names: tuple[str, ...] | None
) -> None:
    """Refuses losses whose graph does not pass through the representation."""
    leaves = {id(t) for t in representation if t.grad_fn is None}
    nodes = frozenset(t.grad_fn for t in representation if t.grad_fn is not None)
    shared = [engine.reaches(loss, leaves, nodes) for loss in losses]
    if not all(shared):
        raise ValueError(describe_unshared(shared, names))


def _checked_values(step: _Step, window: _Window) -> tuple[torch.Tensor, torch.Tensor]:
    """The loss values a micro-batch is checked on, and their bounds: a micro-batch that is not
    the last must be finite; the last, the window's mean above the bounds."""
    if step.accumulate:
        return step.values, torch.full_like(step.values, -torch.inf)
    return window.mean, step.min_losses


def _gram_mode(mode: str, weighting: Weighting | None) -> GramMode:
    if weighting is not None:
        return GramMode(mode, weighting, custom=True)
    return GramMode(mode, affine_weights if mode == "affine" else min_norm_weights)


def _weighting_name(weighting: Weighting) -> str:
    """How messages name a weighting: a function's qualified name, else its class's name."""
    return getattr(weighting, "__qualname__", None) or type(weighting).__name__


def _solvable(gram: torch.Tensor) -> torch.Tensor:
    """``gram``, or the identity when it is not finite (a step that is refused anyway), so that
    the solver can run without a host synchronisation."""
    identity = torch.eye(len(gram), dtype=gram.dtype, device=gram.device)
    return torch.where(gram.isfinite().all(), gram, identity)


def _single(step: _Step) -> bool:
    """A single batch in a single process: nothing to hold for later micro-batches or ranks."""
    return not step.accumulate and step.layout.group is None


def _statistics(weights: torch.Tensor, gram: torch.Tensor | None) -> dict[str, torch.Tensor]:
    return {"weights": weights, **({} if gram is None else gradient_statistics(gram))}


def _floats(tensor: torch.Tensor | None) -> list:
    return [] if tensor is None else tensor.detach().to("cpu", torch.float64).tolist()


def _tensor(values: list) -> torch.Tensor | None:
    return torch.tensor(values, dtype=torch.float64) if values else None


def _average(flat: engine.FlatGradients, count: int, layout: distributed.Layout) -> None:
    """Turns the sums over ``count`` micro-batches into means over micro-batches and ranks, and
    marks a tensor reached when some rank reached it (so every rank writes the same .grad)."""
    for buffer in flat.task_buffers:
        if count > 1:
            buffer.div_(count)
        layout.average_gradients(buffer)
    if layout.group is not None:
        reached = torch.tensor(flat.reached, device=flat.task_buffers[0].device)
        flat.reached = layout.any_rank(reached).tolist()
