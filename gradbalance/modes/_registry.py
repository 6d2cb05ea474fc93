"""Where a mode's name becomes a mode object: the mode classes, each with the names it answers to
and what it allows (:meth:`~gradbalance.modes._base.BalancingMode.from_options`)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from . import MODES
from ._amortized import AmortizedMode
from ._base import BalancingMode
from ._exact import ExactMode
from ._representation import RepresentationMode

if TYPE_CHECKING:
    from .._options import BalancingOptions

_CLASSES: tuple[type[BalancingMode], ...] = (ExactMode, AmortizedMode, RepresentationMode)


def make_mode(name: str, options: BalancingOptions) -> BalancingMode:
    """The mode called ``name``, with the options that concern it.

    Raises:
        ValueError: an unknown mode, or options it cannot take (``weighting=`` outside exact and
            representation modes, ``normalize=True`` in affine mode).
    """
    for mode in _CLASSES:
        if name in mode.names:
            return mode.from_options(name, options)
    raise ValueError(f"mode must be one of {', '.join(map(repr, MODES))}, got {name!r}")
