"""What the optimizer needs from torch.distributed: which group to average over, and averaging.

The balancing must equal one process on the global batch, so loss values and per-task gradients are
averaged over the ranks before π is computed; every rank then computes the same π.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

__all__ = ["average", "default_group"]


def default_group() -> dist.ProcessGroup | None:
    """The default process group when one is initialised with more than one rank, else None."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return dist.group.WORLD
    return None


def average(tensor: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
    """Average ``tensor`` over the ranks of ``group`` in place (one all-reduce); returns it.

    A sum and a division rather than ``ReduceOp.AVG``, which gloo does not support.
    """
    if group is not None:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=group)
        tensor.div_(dist.get_world_size(group))
    return tensor
