"""How exact mode computes the per-task gradients: one vmapped backward, or k ordinary passes.

Which is faster depends on the model and on k (docs/performance.md, "Exact mode against its
floor"): vmap batches the k backward passes into one, but some operators have no batching rule
(CPU attention's backward, for one) and run slower batched than k times in a row; the k passes
also need a k-th of vmap's memory for the gradients of the activations. With ``vectorize=None``
the first steps of a run measure both and keep the faster.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterator
from typing import Any

import torch

__all__ = ["PROBE_SCHEDULE", "PerTaskBackward"]

# The strategy of each measured step (True: vmapped): a warm-up of each (first calls allocate
# buffers and warm caches), then two measured steps of each, interleaved.
PROBE_SCHEDULE = (True, False, True, False, False, True)
_WARM_UP = 2
# vmap is kept only when it is faster by more than this: it holds k copies of every activation
# gradient (a convolution's can outweigh its parameters many times), the k passes one.
VMAP_MARGIN = 0.95


class PerTaskBackward:
    """The choice between the vmapped backward and k passes, made once per run.

    Args:
        vectorize: ``True`` or ``False`` fixes the choice; ``None`` measures both on the first
            :data:`PROBE_SCHEDULE` eligible steps (single process, no accumulation window) and
            keeps the faster by its best time — vmap only when it is faster by more than 5 %
            (:data:`VMAP_MARGIN`), since the k passes hold less memory. On CUDA the measured
            steps synchronise the device (the only host synchronisations the choice costs, once
            per run).
    """

    def __init__(self, vectorize: bool | None) -> None:
        self.fixed = vectorize is not None
        self.choice: bool | None = vectorize
        self.vmap_ran = False  # a vmapped backward has succeeded in this run
        self._best = {True: math.inf, False: math.inf}  # the best measured time of each
        self._probes = 0

    @property
    def probing(self) -> bool:
        return self.choice is None

    def plan(
        self, eligible: bool, device: torch.device, completed: Callable[[], bool]
    ) -> tuple[bool, contextlib.AbstractContextManager]:
        """The strategy for this step (True: vmapped) and a context manager to run it in, which
        measures it when this is a measured step of the probe; ``completed()`` tells afterwards
        whether the step counts (a step skipped under a grad scaler does not)."""
        if self.choice is not None:
            return self.choice, contextlib.nullcontext()
        if not eligible:
            return True, contextlib.nullcontext()
        vectorized = PROBE_SCHEDULE[self._probes]
        return vectorized, self._measured(vectorized, device, completed)

    def fall_back(self) -> None:
        """vmap cannot run this graph: k passes from now on."""
        self.choice = False

    @contextlib.contextmanager
    def _measured(
        self, vectorized: bool, device: torch.device, completed: Callable[[], bool]
    ) -> Iterator[None]:
        _synchronize(device)
        start = time.perf_counter()
        yield  # a step that raises is not counted
        _synchronize(device)
        if self.choice is not None or not completed():  # vmap failed, or the step was skipped
            return
        if self._probes >= _WARM_UP:
            elapsed = time.perf_counter() - start
            self._best[vectorized] = min(self._best[vectorized], elapsed)
        self._probes += 1
        if self._probes == len(PROBE_SCHEDULE):
            self.choice = self._best[True] < VMAP_MARGIN * self._best[False]

    def state_dict(self) -> dict[str, Any]:
        """The choice, or how far the measurement has got (a run resumed during it goes on
        from there): plain values, the same structure at every point of a run."""
        return {
            "choice": self.choice,
            "probes": self._probes,
            "best": [self._best[True], self._best[False]],
        }

    def load_state_dict(self, state: dict[str, Any] | None) -> None:
        """Loads a :meth:`state_dict` (``None``: a state saved before the choice existed). A
        fixed ``vectorize`` stays as it is."""
        if self.fixed:
            return
        state = state or {"choice": None, "probes": 0, "best": [math.inf, math.inf]}
        self.choice = state["choice"]
        self._probes = int(state["probes"])
        self._best = dict(zip((True, False), map(float, state["best"]), strict=True))


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
