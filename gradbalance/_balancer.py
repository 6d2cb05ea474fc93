"""The balancing of k losses as a stateful object, in the spirit of ``torch.amp.GradScaler``.

:class:`Balancer` is the public face of a small pipeline: :func:`gradbalance._inputs.check_inputs`
checks what a call was given, the mode (:mod:`gradbalance.modes`) writes ``.grad``, and the
balancer concludes the guard's verdict once per balanced backward and keeps what the mode
computed (π, the Gram matrix) where the verdict holds. Micro-batches wait in a
:class:`gradbalance._window.Window`. :class:`gradbalance.MultiObjectiveOptimizer` is a
base optimizer plus a Balancer; codebases that own their optimizer (Hugging Face Trainer,
Lightning's automatic optimisation, DeepSpeed) use a Balancer directly::

    balancer = Balancer(mode="exact")
    balancer.attach(optimizer)  # optional: optimizer.zero_grad() always drops held micro-batches
    ...
    balancer.backward({"distill": loss_distill, "task": loss_task}, model.parameters())
    optimizer.step()
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from ._bounds import Bounds, count_bounds
from ._guard import Guard, Ok, make_guard, select
from ._inputs import BackwardInputs, check_inputs
from ._options import BalancingOptions
from ._parsing import (
    Expected,
    LossesLike,
    ParamsLike,
    as_representation,
    as_values,
    in_known_order,
)
from ._per_task import PerTaskGradients
from ._window import Window
from .diagnostics import gradient_statistics
from .modes import Mode
from .modes._base import Call, Outcome, floats
from .modes._registry import make_mode

__all__ = ["Balancer"]

_STATE_VERSION = 2


class Balancer:
    """Balances k losses at the gradient level and writes the result into ``.grad``.

    Each :meth:`backward` chooses weights π for the log-losses ``log(L_i − m_i)``, whose
    gradients are ``g_i = ∇L_i / (L_i − m_i)``, and adds the direction ``d = Σ_i π_i g_i`` into
    ``.grad`` of the parameters, as ``loss.backward()`` adds the gradient of a loss; any optimizer
    then steps on it. How π is chosen is the mode's (:mod:`gradbalance.modes`); docs/method.md
    has the maths.

    ``.grad`` is written as ``Tensor.backward`` writes it: torch's layout contract, accumulated
    into an existing ``.grad``, post-accumulate-grad hooks run afterwards; leaves of the losses'
    graph outside ``params`` get the gradient of the same balanced combination. Under
    ``torch.distributed`` loss values and gradients are averaged over the ranks before π is
    computed, so that the step equals one process on the global batch.

    Bad input raises :class:`ValueError` naming the loss, before anything changes (no ``.grad``,
    no π state): fewer than two losses, a loss that is not a scalar tensor, a loss that is
    detached or whose graph reaches none of the parameters, a different number or naming of
    losses than before, a loss that is NaN, infinite or not above its ``min_loss``, non-finite
    gradients (except with a ``grad_scaler``, whose step skips them), sparse gradients. Checking
    costs one host synchronisation per :meth:`backward` (one more per accumulated micro-batch,
    and under torch.distributed), none with ``guard="device"``.

    Args:
        mode: one of :data:`gradbalance.modes.MODES` (default ``"exact"``).
        **options: the options, :class:`gradbalance.BalancingOptions`.
    """

    def __init__(self, mode: Mode = "exact", **options: Any) -> None:
        self._options = BalancingOptions(**options)
        self._mode = make_mode(mode, self._options)
        self._guard = make_guard(self._options.guard)
        self._bounds = Bounds(self._options.min_losses)
        self._per_task = PerTaskGradients(self._options.vectorize)
        self._window = Window()
        self.num_losses: int | None = count_bounds(self._options.min_losses)
        self.loss_names: tuple[str, ...] | None = None
        self.backward_calls = 0
        self.weights: torch.Tensor | None = None
        self.stats: dict[str, torch.Tensor] = {}
        self._gram: torch.Tensor | None = None

    # -- what it is and what it holds ------------------------------------------------------------

    @property
    def mode(self) -> Mode:
        return self._mode.name  # type: ignore[return-value]

    @property
    def options(self) -> BalancingOptions:
        """The options it was made with (:class:`gradbalance.BalancingOptions`)."""
        return self._options

    @property
    def normalize(self) -> bool:
        return self._mode.normalize

    @property
    def stats_every(self) -> int:
        return self._options.stats_every

    @property
    def vectorize(self) -> bool | None:
        """Whether the per-task gradients come from one vmapped backward (None: not chosen yet,
        with ``vectorize=None``)."""
        return self._per_task.choice

    @property
    def named_weights(self) -> dict[str, torch.Tensor]:
        """π of the last balanced backward by loss name ("0", "1", … unnamed); {} before it."""
        if self.weights is None:
            return {}
        names = self.loss_names or tuple(str(i) for i in range(len(self.weights)))
        return dict(zip(names, self.weights.unbind(), strict=True))

    @property
    def wants_representation(self) -> bool:
        """Whether :meth:`backward` needs ``representation=`` (representation mode)."""
        return self._mode.wants_representation

    @property
    def guard(self) -> Guard:
        return self._guard.name

    @property
    def found_inf(self) -> torch.Tensor | None:
        """guard="device": 1.0 (float32, on the device) when the last balanced backward was
        refused and its step must be skipped (a fused optimizer's ``found_inf``), else 0.0.
        None with guard="sync", which raises instead."""
        return self._guard.found_inf

    @property
    def refused_steps(self) -> torch.Tensor | None:
        """guard="device": the balanced backward calls refused since the last
        :meth:`raise_deferred` (0-d int64 on the device; None before the first)."""
        return self._guard.refused_steps

    def raise_deferred(self) -> None:
        """guard="device": raises the ValueError of the last refused step since the last call
        (one host synchronisation; :meth:`state_dict` calls it). guard="sync" defers nothing."""
        self._guard.raise_deferred()

    # -- the micro-batch window ------------------------------------------------------------------

    @property
    def window(self) -> Window:
        """The micro-batches held and their buffers."""
        return self._window

    @property
    def pending_micro_batches(self) -> int:
        """Micro-batches gathered with ``accumulate=True`` and not balanced yet."""
        return self._window.pending

    def discard_micro_batches(self) -> None:
        """Drops the micro-batches gathered with ``accumulate=True`` and not balanced yet, as
        ``zero_grad()`` drops ``.grad``: for a loop that abandons a window (an epoch that ends
        early, a failure in the forward). The window's whole lifetime: docs/method.md, "The
        micro-batch window"."""
        self._window.discard()

    def attach(self, optimizer: torch.optim.Optimizer) -> None:
        """Ties this balancer's micro-batches to ``optimizer``: its ``zero_grad()`` always drops
        them, and its ``step()`` raises while they are held (as any torch optimizer's step of the
        parameters does). Not kept by pickling: attach again after loading."""
        self._window.attach(optimizer)

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
                objectives (π_i = 1; exact and affine modes). A tensor given twice counts once.
            accumulate: this is a micro-batch, not the last one: keep its gradients (per task in
                exact mode, π-weighted in amortized mode) and loss values, and leave ``.grad``
                alone. The next call without ``accumulate`` balances the *mean* of the
                micro-batches' gradients and losses — one batch made of all of them, for losses
                that are means over equally sized micro-batches (do not divide them by the number
                of micro-batches). The window's lifetime: :meth:`discard_micro_batches`.
            retain_graph: keep the autograd graph, as in :meth:`torch.Tensor.backward`.
            grad_scaler: a :class:`torch.amp.GradScaler`: ``.grad`` holds the scaled gradient
                (for ``scaler.unscale_`` / ``scaler.step``), π and the statistics the unscaled
                values; non-finite gradients reach ``.grad`` for ``scaler.step`` to skip, and the
                balancing state stays as it was.
            representation: representation mode only, and required there: the ``(batch, …)``
                activation(s) that the losses share (the student's features), with their graph;
                the Gram matrix is computed with respect to them.

        Parameters that a loss does not reach count as zero for that loss; parameters that no loss
        reaches keep ``.grad`` as it was. It works under ``torch.no_grad()``, as
        ``loss.backward()`` does (the graph was built outside). Afterwards :attr:`weights` holds π
        (float64, ``(k,)``) and :attr:`stats` the gradient diagnostics.
        """
        try:
            self._window.resume()
            self._backward(losses, params, accumulate, retain_graph, grad_scaler, representation)
        except BaseException:
            self._window.interrupted()
            raise

    def _backward(
        self,
        losses: LossesLike,
        params: ParamsLike,
        accumulate: bool,
        retain_graph: bool,
        grad_scaler: torch.amp.GradScaler | None,
        representation: torch.Tensor | Sequence[torch.Tensor] | None,
    ) -> None:
        mode = self._mode
        with torch.enable_grad():  # the graph exists: what runs here must see it, as a backward
            shared = as_representation(representation, mode.wants_representation, mode.name)
            inputs = check_inputs(
                losses,
                params,
                expected=self._expected(),
                bounds=self._bounds,
                accumulate=accumulate,
                grad_scaler=grad_scaler,
                representation=shared,
                refuse_plain_for=None if mode.per_task else mode.name,
            )
            call = Call(
                inputs=inputs,
                window=self._window,
                guard=self._guard,
                per_task=self._per_task,
                retain_graph=retain_graph,
                calls=self.backward_calls,
                representation=shared,
            )
            outcome = mode.backward(call)
        self._per_task.settle(inputs)
        if outcome is not None:  # a balanced backward: the guard's verdict on it, once
            self._guard.conclude(outcome.ok)
            self._commit(inputs, outcome)

    def update_weights(self, losses: LossesLike) -> None:
        """Amortized mode, FAMO's scheme: update π from the losses re-measured after the step.

        Call it after the optimizer's step with the losses of the same batch (a no-grad
        re-forward; with micro-batches, their mean); the logits move by how much each log-loss
        decreased since the last balanced :meth:`backward`, and the next :meth:`backward` does
        not update them again.
        """
        names, items = in_known_order(*as_values(losses), self._expected())
        self._guard.conclude(self._mode.update_weights(names, items, self._bounds, self._guard))

    def _expected(self) -> Expected:
        held = self._window.held
        return Expected(
            count=self.num_losses,
            names=self.loss_names,
            calls=self.backward_calls,
            from_min_losses=self.backward_calls == 0 and self._options.min_losses is not None,
            window=None if held is None else len(held.loss_sum),
        )

    def _commit(self, inputs: BackwardInputs, outcome: Outcome) -> None:
        """Keeps what a backward computed, where the verdict holds (on the device: the last
        state is kept where it does not; the call is counted either way)."""
        ok: Ok = outcome.ok
        if ok is False:
            return
        self.num_losses = len(outcome.weights)
        self.loss_names = inputs.names
        self.backward_calls += 1
        self.weights = select(ok, outcome.weights, self.weights)
        gram = outcome.gram
        self._gram = gram if gram is None else select(ok, gram, self._gram)
        self.stats = _statistics(self.weights, self._gram)

    # -- state dict and pickling -----------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """The balancing state as plain Python values (float64 numbers hold it exactly): the
        mode, k and the loss names, π and the Gram matrix of the last balanced backward, the
        choice of :attr:`vectorize`, and the mode's own state (amortized mode: the logits, their
        moments, the previous losses).

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
            "weights": floats(self.weights),
            "gram": floats(self._gram),
            "vectorize": self._per_task.state_dict(),
            **self._mode.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Loads a :meth:`state_dict`, after checking that it fits (else nothing changes); drops
        the micro-batches held."""
        self.check_state_dict(state)
        self._mode.load_state_dict(state)
        if state["num_losses"] is not None:
            self.num_losses = state["num_losses"]
        self.loss_names = tuple(state["loss_names"]) or None
        self.backward_calls = int(state["backward_calls"])
        self.weights = _tensor(state["weights"])
        self._gram = _tensor(state["gram"])
        self._per_task.load_state_dict(state["vectorize"])
        self.stats = {} if self.weights is None else _statistics(self.weights, self._gram)
        self._window.discard()

    def check_state_dict(self, state: dict[str, Any]) -> None:
        """Raises a ValueError when ``state`` was saved by a different mode or for another k."""
        _check_state(state, self.mode, self.num_losses)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(mode={self.mode!r}{self._mode.describe()}, "
            f"normalize={self.normalize}, num_losses={self.num_losses})"
        )


def _check_state(state: dict[str, Any], mode: str, num_losses: int | None) -> None:
    """Raises a ValueError unless ``state`` is a state dict of this layout, saved in ``mode``
    for ``num_losses`` losses (or before k was known)."""
    if not isinstance(state, dict) or state.get("version") != _STATE_VERSION:
        raise ValueError(
            f"not a gradbalance balancing state (version {_STATE_VERSION}): {type(state).__name__}"
        )
    if state["mode"] != mode:
        raise ValueError(
            f"the state dict was saved in mode {state['mode']!r}, this balancer runs in "
            f"mode {mode!r}"
        )
    saved_k = state["num_losses"]
    if None not in (saved_k, num_losses) and saved_k != num_losses:
        raise ValueError(f"the state dict balances {saved_k} losses, this balancer {num_losses}")


def _statistics(weights: torch.Tensor, gram: torch.Tensor | None) -> dict[str, torch.Tensor]:
    return {"weights": weights, **({} if gram is None else gradient_statistics(gram))}


def _tensor(values: list) -> torch.Tensor | None:
    return torch.tensor(values, dtype=torch.float64) if values else None
