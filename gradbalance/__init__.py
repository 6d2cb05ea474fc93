"""gradbalance: balance distillation and task losses at the gradient level (MoKD / DTO-KD)."""

from ._balancer import Balancer
from ._optimizer import MultiObjectiveOptimizer
from ._options import BalancingOptions
from .losses import KDLosses, classification_losses, cross_entropy_floor, kl_distillation
from .projectors import IndefiniteSubspaceProjector, VkDProjector

__all__ = [
    "Balancer",
    "BalancingOptions",
    "IndefiniteSubspaceProjector",
    "KDLosses",
    "MultiObjectiveOptimizer",
    "VkDProjector",
    "classification_losses",
    "cross_entropy_floor",
    "kl_distillation",
]
__version__ = "0.1.0"
