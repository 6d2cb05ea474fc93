"""Flat gradient buffers: the per-task gradients of a fixed list of tensors in one ``(k, n)``
buffer per (device, dtype, role), their Gram matrix, and their combination written into ``.grad``.

A *Jacobian block* is the stack of the k per-task gradients of one tensor, shape
``(k, *tensor.shape)``, or ``None`` when no loss reaches that tensor. :class:`FlatGradients` lays
the blocks out in its buffers, so that the heavy work is a few large operations whatever the number
of tensors.

``.grad`` follows torch's gradient layout contract, as ``Tensor.backward`` does: a fresh ``.grad``
has the strides of its tensor when that tensor is non-overlapping and dense (channels-last
weights, transposed leaves), else it is contiguous (:func:`contract_strides`); it aliases nothing
the caller holds — after ``zero_grad()`` every backward writes a new buffer, so a ``.grad`` kept
from an earlier step never changes; an existing ``.grad`` is accumulated into in place. The
``.grad`` tensors of one group are disjoint views of one buffer (as DDP's
``gradient_as_bucket_view`` makes them).
"""

from __future__ import annotations

import enum
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from . import _kernels as kernels
from ._distributed import Layout, as_grad_of, local

__all__ = ["Blocks", "FlatGradients", "Role", "as_real", "contract_strides", "sum_on_one_device"]

Blocks = list[torch.Tensor | None]


class Role(enum.Enum):
    """What a tensor's per-task gradients are for."""

    BALANCED = "balanced"  # in the Gram matrix; gets the π-weighted combination
    PLAIN = "plain"  # a ``"balance": False`` group: out of the Gram matrix; gets the plain sum
    OUTSIDE = "outside"  # a leaf outside the optimizer: out of the Gram matrix; π-weighted


@dataclass(frozen=True)
class _Slot:
    """Where one tensor lives in its group's buffers, in elements of the group's real dtype.

    A complex tensor is stored as its real view (last dimension 2, starting at an even offset),
    so that the Gram matrix of the buffer is ``Re(J Jᴴ)``, the real inner product of its
    gradients, and the combination with real coefficients is the complex one.
    """

    start: int
    shape: tuple[int, ...]  # of the real view
    strides: tuple[int, ...]  # of the real view, following the layout contract
    is_complex: bool

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    def view(self, buffer: torch.Tensor) -> torch.Tensor:
        """This tensor's gradient in the ``(n,)`` buffer, in the tensor's own shape and dtype."""
        real = buffer.as_strided(self.shape, self.strides, buffer.storage_offset() + self.start)
        return torch.view_as_complex(real) if self.is_complex else real

    def holds(self, grad: torch.Tensor | None, buffer: torch.Tensor) -> bool:
        """Whether ``grad`` (for a sharded tensor: its local shard) is this slot's view of
        ``buffer``; compared by address and layout, without making the view."""
        if grad is None:
            return False
        shard = local(grad)
        shape, strides = self.shape, self.strides
        if self.is_complex:
            shape, strides = shape[:-1], tuple(s // 2 for s in strides[:-1])
        address = buffer.data_ptr() + self.start * buffer.element_size()
        return (
            shard.data_ptr() == address
            and tuple(shard.shape) == shape
            and (shard.numel() == 0 or tuple(shard.stride()) == strides)
        )

    def rows(self, tasks: torch.Tensor) -> torch.Tensor:
        """This tensor's ``(k, *real shape)`` view of the ``(k, n)`` task buffer (or its
        ``(*real shape)`` view of one row ``(n,)``)."""
        leading = tasks.shape[:-1]
        return tasks.as_strided(
            (*leading, *self.shape),
            (*tasks.stride()[:-1], *self.strides),
            tasks.storage_offset() + self.start,
        )

    def columns(self, block: torch.Tensor) -> torch.Tensor:
        """``block`` ``(k, *shape)`` as ``(k, size)`` rows in this slot's memory order: a view
        when each row of ``block`` is laid out as the slot, else a copy."""
        real = as_real(block)
        k = len(real)
        if tuple(real.stride()) == (self.size, *self.strides) or self.size == 0:
            return real.as_strided((k, self.size), (self.size, 1), real.storage_offset())
        ordered = real.new_empty(k, self.size)
        # The slot's layout within its own (k, size) rows: offset 0, not the slot's start in n.
        ordered.as_strided((k, *self.shape), (self.size, *self.strides)).copy_(real)
        return ordered


@dataclass
class _Group:
    """Tensors of one (device, real dtype, role) and their flat buffers."""

    indices: list[int]
    role: Role
    slots: list[_Slot]
    size: int
    like: torch.Tensor  # a zero-size tensor of the buffers' device and dtype
    tasks: torch.Tensor | None = None  # (k, n), row i holds ρ_i ∇L_i; made on first store
    combined: torch.Tensor | None = None  # (n,): the last write; .grad are views of it
    references: int = 0  # the combined buffer's storage use count with no view of it alive

    def reusable(self) -> torch.Tensor | None:
        """The combined buffer, when no view of it is alive any more: after
        ``zero_grad(set_to_none=True)``, unless a ``.grad`` of it is still held somewhere."""
        if self.combined is None or _storage_use_count(self.combined) != self.references:
            return None
        return self.combined

    def fresh(self) -> torch.Tensor:
        self.combined = self.like.new_empty(self.size)
        self.references = _storage_use_count(self.combined)
        return self.combined


class FlatGradients:
    """Per-task gradients of a fixed list of tensors in flat buffers, and their combination.

    Tensors are grouped by (device, dtype, role); each group owns a ``(k, n)`` buffer of per-task
    gradients. Only :attr:`Role.BALANCED` groups enter the Gram matrix.

    Args:
        tensors: the tensors, in a fixed order (the order of the blocks given to :meth:`store`).
        roles: for each tensor, its :class:`Role`.
        num_tasks: k.
    """

    def __init__(
        self, tensors: Sequence[torch.Tensor], roles: Sequence[Role], num_tasks: int
    ) -> None:
        self.tensors = list(tensors)
        self.num_tasks = num_tasks
        self.reached = [False] * len(self.tensors)
        by_key: dict[tuple, list[int]] = {}
        for index, (tensor, role) in enumerate(zip(self.tensors, roles, strict=True)):
            shard = local(tensor)  # a complex tensor is stored as its real view
            by_key.setdefault((shard.device, shard.real.dtype, role), []).append(index)
        self.groups = [self._group(indices, *key) for key, indices in by_key.items()]

    def _group(
        self, indices: list[int], device: torch.device, dtype: torch.dtype, role: Role
    ) -> _Group:
        start, slots = 0, []
        for index in indices:
            shard = local(self.tensors[index])  # of a sharded tensor, this rank's shard
            strides = contract_strides(shard)
            if shard.is_complex():
                start += start % 2  # view_as_complex needs an even offset
                shape, strides = (*shard.shape, 2), (*(2 * s for s in strides), 1)
            else:
                shape = tuple(shard.shape)
            slots.append(_Slot(start, shape, tuple(strides), shard.is_complex()))
            start += slots[-1].size
        like = torch.empty(0, device=device, dtype=dtype)
        return _Group(indices, role, slots, start, like)

    def store(self, blocks: Blocks, *, accumulate: bool) -> None:
        """Copy the blocks into the task buffers (``accumulate``: add to what is there).

        An unreached tensor (``None`` block) contributes zeros.
        """
        self._store(blocks, None, accumulate=accumulate)

    def store_row(self, task: int, gradients: Sequence[torch.Tensor | None]) -> None:
        """Copy one task's gradients (one per tensor, ``None`` where unreached: zeros) into row
        ``task`` of the task buffers; rows are stored in order, row 0 first."""
        self._store(gradients, task, accumulate=False)

    def _store(self, sources: Sequence, task: int | None, *, accumulate: bool) -> None:
        """Copies (or adds) ``sources`` — blocks, or one task's gradients into row ``task`` —
        into the buffers, and records which tensors they reach."""
        if not accumulate and not task:
            self.reached = [False] * len(self.tensors)
        for group in self.groups:
            if group.tasks is None:
                group.tasks = group.like.new_zeros(self.num_tasks, group.size)
            target = group.tasks if task is None else group.tasks[task]
            pairs = [
                (slot.rows(target), as_real(sources[i]))
                for slot, i in zip(group.slots, group.indices, strict=True)
                if sources[i] is not None
            ]
            if not accumulate and len(pairs) < len(group.indices):
                target.zero_()
            if pairs:
                views, values = zip(*pairs, strict=True)
                if accumulate:
                    torch._foreach_add_(list(views), list(values))
                else:
                    torch._foreach_copy_(list(views), list(values))
        for index, source in enumerate(sources):
            self.reached[index] = self.reached[index] or source is not None

    def as_columns(self, blocks: Blocks) -> Blocks:
        """``blocks`` to be used without a ``(k, n)`` copy: records which tensors they reach and
        returns each as ``(k, size)`` rows in the buffers' column order (a view where the block
        is laid out as its slot, else one copy), for the ``columns=`` argument of :meth:`gram`,
        :meth:`write_grad` and :meth:`nonfinite_rows`."""
        self.reached = [block is not None for block in blocks]
        columns: Blocks = [None] * len(blocks)
        for group in self.groups:
            for slot, index in zip(group.slots, group.indices, strict=True):
                if blocks[index] is not None:
                    columns[index] = slot.columns(blocks[index])
        return columns

    def mean_over(self, count: int, layout: Layout) -> None:
        """Turns the sums over ``count`` micro-batches into means over micro-batches and ranks,
        and marks a tensor reached when some rank reached it (so every rank writes the same
        ``.grad``)."""
        for buffer in self.task_buffers:
            if count > 1:
                buffer.div_(count)
            layout.average_gradients(buffer)
        if layout.group is not None:
            reached = torch.tensor(self.reached, device=self.task_buffers[0].device)
            self.reached = layout.any_rank(reached).tolist()

    @property
    def task_buffers(self) -> list[torch.Tensor]:
        """The ``(k, n)`` buffers, one per group (for collectives and checks)."""
        return [group.tasks for group in self.groups if group.tasks is not None]

    def _pieces(self, group: _Group, columns: Blocks | None) -> list[tuple[int, torch.Tensor]]:
        """The group's per-task gradients as ``(first column, (k, m) rows)`` pieces: its whole
        task buffer, or each reached tensor's rows of ``columns`` (:meth:`as_columns`)."""
        if columns is None:
            return [(0, group.tasks)]
        return [
            (slot.start, columns[i])
            for slot, i in zip(group.slots, group.indices, strict=True)
            if columns[i] is not None
        ]

    def nonfinite_rows(self, columns: Blocks | None = None) -> list[bool]:
        """Which rows hold the non-finite gradients: those with an infinity, else those with a
        NaN. (A vmapped backward multiplies the other rows' zero cotangent by an infinite partial
        derivative of one loss: a NaN, never an infinity, in their rows.) For error messages."""
        device = self.groups[0].like.device
        pieces = [rows for group in self.groups for _, rows in self._pieces(group, columns)]
        infinite = torch.stack([b.isinf().any(dim=1).to(device) for b in pieces])
        nan = torch.stack([b.isnan().any(dim=1).to(device) for b in pieces])
        infinite, nan = infinite.any(dim=0).tolist(), nan.any(dim=0).tolist()
        return infinite if any(infinite) else nan

    def gram(self, columns: Blocks | None = None) -> torch.Tensor:
        """``(k, k)`` float64 Gram matrix of the balanced tensors' per-task gradients: of the
        task buffers, or of ``columns`` (:meth:`as_columns`)."""
        balanced = [group for group in self.groups if group.role is Role.BALANCED]
        if not any(self.reached[i] for group in balanced for i in group.indices):
            raise ValueError("no loss reaches any balanced parameter")
        return sum_on_one_device(
            [kernels.gram(rows) for group in balanced for _, rows in self._pieces(group, columns)]
        )

    def write_grad(
        self, coefficients: dict[Role, torch.Tensor], columns: Blocks | None = None
    ) -> list[torch.Tensor]:
        """Add ``Σ_i c_i row_i`` into the ``.grad`` of every reached tensor, ``c`` by role; the
        rows are the task buffers', or ``columns`` (:meth:`as_columns`).

        When every reached tensor's ``.grad`` is still a view of the group's buffer
        (``zero_grad(set_to_none=False)``, or no zeroing), the combination is added into it in
        place. Otherwise it goes into the buffer again if no view of it is alive, else into a new
        one (a ``.grad`` kept from an earlier step never changes); its views become the ``.grad``
        that are None and are added into those that exist.

        Returns:
            The tensors whose ``.grad`` was written.
        """
        written = []
        for group in self.groups:
            members = [
                (self.tensors[i], slot)
                for i, slot in zip(group.indices, group.slots, strict=True)
                if self.reached[i]
            ]
            if not members:
                continue
            written.extend(tensor for tensor, _ in members)
            weights = coefficients[group.role]
            last = group.combined
            in_place = last is not None and all(slot.holds(t.grad, last) for t, slot in members)
            out = last if in_place else group.reusable()
            if out is None:
                out = group.fresh()
            for start, rows in self._pieces(group, columns):  # unreached columns: not members
                piece = out[start : start + rows.shape[1]]
                kernels.combine(rows, weights, piece, accumulate=in_place)
            if in_place:
                continue
            for tensor, slot in members:
                grad = as_grad_of(tensor, slot.view(out))
                if tensor.grad is None:
                    tensor.grad = grad
                else:
                    tensor.grad.add_(grad)
        return written


def _storage_use_count(tensor: torch.Tensor) -> int:
    """How many tensors share ``tensor``'s memory (torch's own count, as its CUDA-graph trees
    read it to tell whether an output is still alive)."""
    return torch._C._storage_Use_Count(tensor.untyped_storage()._cdata)


def contract_strides(tensor: torch.Tensor) -> tuple[int, ...]:
    """The strides torch gives a fresh ``.grad`` of ``tensor``: its own when it is non-overlapping
    and dense (a permutation of a contiguous layout), else contiguous."""
    if tensor.is_contiguous():
        return tuple(tensor.stride())
    if tensor.numel() > 0:
        dims = sorted(
            (stride, size)
            for size, stride in zip(tensor.shape, tensor.stride(), strict=True)
            if size != 1
        )
        expected = 1
        for stride, size in dims:
            if stride != expected:
                break
            expected *= size
        else:
            return tuple(tensor.stride())
    strides, step = [], 1
    for size in reversed(tensor.shape):
        strides.append(step)
        step *= max(size, 1)
    return tuple(reversed(strides))


def as_real(tensor: torch.Tensor) -> torch.Tensor:
    tensor = local(tensor)
    return torch.view_as_real(tensor) if tensor.is_complex() else tensor


def sum_on_one_device(grams: Sequence[torch.Tensor]) -> torch.Tensor:
    """The sum of partial Gram matrices that may live on different devices, on the first's."""
    return torch.stack([gram.to(grams[0].device) for gram in grams]).sum(dim=0)
