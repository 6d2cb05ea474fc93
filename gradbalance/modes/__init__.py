"""The modes of the balancing, one file each behind :class:`~gradbalance.modes._base.BalancingMode`,
and :func:`make_mode`, the one place where a mode's name becomes a mode object.

* ``"exact"`` and ``"affine"``: :class:`~gradbalance.modes._exact.ExactMode`;
* ``"representation"``: :class:`~gradbalance.modes._representation.RepresentationMode`;
* ``"amortized"``: :class:`~gradbalance.modes._amortized.AmortizedMode`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

from ..weighting import affine_weights, min_norm_weights
from ._amortized import AmortizedMode
from ._base import BalancingMode, GramWeighting
from ._exact import ExactMode
from ._representation import RepresentationMode

if TYPE_CHECKING:
    from .._options import BalancingOptions

__all__ = [
    "MODES",
    "AmortizedMode",
    "BalancingMode",
    "ExactMode",
    "Mode",
    "RepresentationMode",
    "make_mode",
]

Mode = Literal["exact", "amortized", "affine", "representation"]
MODES = ("exact", "amortized", "affine", "representation")
WEIGHTED_MODES = ("exact", "representation")  # the modes that take weighting=


def make_mode(name: str, options: BalancingOptions) -> BalancingMode:
    """The mode called ``name``, with the options that concern it.

    Raises:
        ValueError: an unknown mode, or options it cannot take (``weighting=`` outside exact and
            representation modes, ``normalize=True`` in affine mode).
    """
    if name not in MODES:
        raise ValueError(f"mode must be one of {', '.join(map(repr, MODES))}, got {name!r}")
    if options.weighting is not None and name not in WEIGHTED_MODES:
        raise ValueError(
            f"weighting= is for the modes {' and '.join(WEIGHTED_MODES)}, which compute the "
            f"Gram matrix every step; {name} mode has its own π"
        )
    normalize = name == "amortized" if options.normalize is None else options.normalize
    if normalize and name == "affine":
        raise ValueError("normalize=True needs non-negative weights; affine mode has none")
    if name == "amortized":
        return AmortizedMode(options.famo, normalize, options.stats_every)
    if options.weighting is not None:
        weighting = GramWeighting(options.weighting, custom=True)
    else:
        weighting = GramWeighting(affine_weights if name == "affine" else min_norm_weights, False)
    if name == "representation":
        return RepresentationMode(name, weighting, normalize)
    return ExactMode(name, weighting, normalize)
