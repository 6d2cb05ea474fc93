"""What the optimizer needs from torch.distributed: how gradients are laid out over the ranks, and
the few collectives that make every rank compute the π of the global batch.

Two layouts:

* *replicated* (DistributedDataParallel, or a plain module under an initialised process group):
  each rank holds the whole parameter and its gradient from its own micro-batch. The optimizer
  gets the per-task gradients with ``torch.autograd.grad`` (DDP's reducer does not fire) and
  averages its flat buffers itself: one all-reduce per buffer.
* *sharded* (FSDP2's ``fully_shard``: the parameters are DTensor shards): the gradients come from
  ordinary backward passes, whose reduce-scatter leaves each rank the average gradient of its
  shard; each rank's k×k Gram matrix of its shards is a partial sum, and one all-reduce of k×k
  numbers gives the global one.

Loss values are averaged in both, so every rank sees the same values and takes the same branch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist

__all__ = ["Layout", "default_group", "is_sharded", "local"]

try:
    from torch.distributed.tensor import DTensor
except ImportError:  # torch built without distributed support

    class DTensor:  # type: ignore[no-redef]
        """Stands in for the DTensor class, so that isinstance checks are simply False."""


def default_group() -> dist.ProcessGroup | None:
    """The default process group when one is initialised with more than one rank, else None."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return dist.group.WORLD
    return None


def is_sharded(tensor: torch.Tensor) -> bool:
    return isinstance(tensor, DTensor)


def local(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a DTensor; any other tensor as it is."""
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def as_grad_of(param: torch.Tensor, local_grad: torch.Tensor) -> torch.Tensor:
    """``local_grad`` in the form ``param.grad`` must take: a DTensor laid out like a sharded
    ``param``, else the tensor itself."""
    if not isinstance(param, DTensor):
        return local_grad
    return DTensor.from_local(
        local_grad,
        param.device_mesh,
        param.placements,
        run_check=False,
        shape=param.shape,
        stride=param.stride(),
    )


@dataclass(frozen=True)
class Layout:
    """The process group (None: one process) and whether the parameters are sharded."""

    group: dist.ProcessGroup | None
    sharded: bool

    @classmethod
    def of(cls, params: Sequence[torch.Tensor]) -> Layout:
        group = default_group()
        sharded = [p for p in params if is_sharded(p)]
        world = 1 if group is None else dist.get_world_size(group)
        for param in sharded:
            if param.device_mesh.ndim != 1 or param.device_mesh.size() != world:
                raise ValueError(
                    f"sharded parameters must live on a 1-D device mesh over all {world} ranks "
                    f"(fully_shard's default), got a mesh of shape {param.device_mesh.shape}"
                )
        return cls(group, bool(sharded))

    def average(self, tensor: torch.Tensor) -> torch.Tensor:
        """Average ``tensor`` over the ranks in place (one all-reduce); returns it.

        A sum and a division: ``ReduceOp.AVG`` is not available on every backend and version.
        """
        if self.group is not None:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=self.group)
            tensor.div_(dist.get_world_size(self.group))
        return tensor

    def all_ranks(self, flag: torch.Tensor) -> torch.Tensor:
        """A 0-d boolean that is True when ``flag`` is True on every rank."""
        if self.group is None:
            return flag
        return self.average(flag.to(torch.float64)) == 1

    def any_rank(self, flags: torch.Tensor) -> torch.Tensor:
        """Elementwise: True where ``flags`` is True on some rank."""
        if self.group is None:
            return flags
        return self.average(flags.to(torch.float64)) > 0

    def average_gradients(self, buffer: torch.Tensor) -> None:
        """Replicated layout: the rank-average of a gradient buffer. Sharded: it is already the
        average (the backward's reduce-scatter made it)."""
        if not self.sharded:
            self.average(buffer)

    def batch_gram(self, gram: torch.Tensor) -> torch.Tensor:
        """The Gram matrix of gradients with respect to activations of the global batch, from
        each rank's of its own: ``Σ_r G_r / W²`` (rank r's activations enter the global mean loss
        with weight 1/W). One process: ``gram`` itself."""
        if self.group is not None:
            dist.all_reduce(gram, op=dist.ReduceOp.SUM, group=self.group)
            gram.div_(dist.get_world_size(self.group) ** 2)
        return gram

    def global_gram(self, gram: torch.Tensor) -> torch.Tensor:
        """Sharded layout: the sum over ranks of their partial Gram matrices. Replicated: each
        rank's Gram already is the global one."""
        if self.sharded and self.group is not None:
            dist.all_reduce(gram, op=dist.ReduceOp.SUM, group=self.group)
        return gram
