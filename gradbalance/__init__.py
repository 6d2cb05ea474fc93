"""gradbalance: balance distillation and task losses at the gradient level (MoKD / DTO-KD)."""

from .optimizer import MultiObjectiveOptimizer

__all__ = ["MultiObjectiveOptimizer"]
__version__ = "0.1.0"
