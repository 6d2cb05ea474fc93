"""The gradient engine: per-task gradients, flat gradient buffers, the Gram matrix, the combination,
and ``.grad`` written the way torch's own backward writes it.

A *Jacobian block* is the stack of the k per-task gradients of one tensor, shape
``(k, *tensor.shape)``, or ``None`` when no loss reaches that tensor. :func:`task_gradients`
produces one block per tensor; :class:`FlatGradients` lays them out in one ``(k, n)`` buffer per
(device, dtype, role), computes their Gram matrix and writes the combination into ``.grad``, so
the heavy work is a few large operations, whatever the number of tensors.

``.grad`` follows torch's gradient layout contract, as ``Tensor.backward`` does: a fresh ``.grad``
has the strides of its tensor when that tensor is non-overlapping and dense (channels-last
weights, transposed leaves), else it is contiguous; it aliases nothing the caller holds — after
``zero_grad()`` every backward writes a new buffer, so a ``.grad`` kept from an earlier step never
changes; an existing ``.grad`` is accumulated into in place. The ``.grad`` tensors of one group are
disjoint views of one buffer (as DDP's ``gradient_as_bucket_view`` makes them).
"""

from __future__ import annotations

import enum
import math
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch

from . import kernels
from .distributed import as_grad_of, is_sharded, local

__all__ = [
    "FlatGradients",
    "Role",
    "accumulate_grads",
    "all_finite",
    "backward_gradients",
    "gram_matrix",
    "graph_leaves",
    "reaches",
    "require_dense",
    "run_post_accumulate_grad_hooks",
    "stack_tasks",
    "task_gradient_rows",
    "task_gradients",
    "weighted_gradient",
]

Blocks = list[torch.Tensor | None]

# The node that gives a leaf its .grad, by its class name.
_LEAF = "AccumulateGrad"
# The nodes of nn.Embedding / nn.EmbeddingBag, which record whether their gradient is sparse.
_EMBEDDINGS = ("EmbeddingBackward0", "EmbeddingBagBackward0")
# The autograd node of torch.utils.checkpoint(..., use_reentrant=True). Its backward runs a nested
# ``torch.autograd.backward``, which ``torch.autograd.grad`` (what the engine calls) cannot drive.
_REENTRANT_CHECKPOINT = "CheckpointFunctionBackward"


class Role(enum.Enum):
    """What a tensor's per-task gradients are for."""

    BALANCED = "balanced"  # in the Gram matrix; gets the π-weighted combination
    PLAIN = "plain"  # a ``"balance": False`` group: out of the Gram matrix; gets the plain sum
    OUTSIDE = "outside"  # a leaf outside the optimizer: out of the Gram matrix; π-weighted


def graph_leaves(outputs: torch.Tensor) -> list[torch.Tensor]:
    """The leaves that ``outputs.backward()`` would give a gradient, in a deterministic order.

    These are the tensors behind the ``AccumulateGrad`` nodes of the autograd graph: parameters,
    and any other leaf that requires grad (a projector trained by a second optimizer, an input
    with ``requires_grad``).

    Raises:
        ValueError: the graph holds a ``torch.utils.checkpoint`` segment with
            ``use_reentrant=True``, whose parameters no ``torch.autograd.grad`` can reach, or an
            embedding with sparse gradients.
    """
    leaves = []
    for node in _nodes(outputs):
        kind = type(node).__name__
        if kind == _LEAF:
            leaves.append(node.variable)
        elif kind == _REENTRANT_CHECKPOINT:
            raise ValueError(
                "the losses pass through torch.utils.checkpoint(..., use_reentrant=True), whose "
                "layers cannot get per-task gradients (torch.autograd.grad does not run it); "
                "use torch.utils.checkpoint(..., use_reentrant=False), which works unchanged"
            )
        elif kind in _EMBEDDINGS and node._saved_sparse:
            raise ValueError(
                f"the losses pass through {kind} with sparse gradients; gradbalance balances "
                f"dense gradients only: build the module with sparse=False"
            )
    return leaves


def reaches(output: torch.Tensor, leaves: set[int], nodes: frozenset = frozenset()) -> bool:
    """Whether the autograd graph of ``output`` reaches one of the leaves whose ``id`` is in
    ``leaves``, or one of the autograd ``nodes`` (the ``grad_fn`` of non-leaf tensors); the
    search stops at the first."""
    return any(
        node in nodes or (type(node).__name__ == _LEAF and id(node.variable) in leaves)
        for node in _nodes(output)
    )


def _nodes(output: torch.Tensor) -> Iterator:
    """The autograd nodes of ``output``'s graph, depth first, each once."""
    seen: set = set()
    stack = [output.grad_fn] if output.grad_fn is not None else []
    while stack:
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        yield node
        stack.extend(child for child, _ in reversed(node.next_functions) if child is not None)


def task_gradients(
    losses: torch.Tensor,
    row_scale: torch.Tensor,
    tensors: Sequence[torch.Tensor],
    *,
    vectorize: bool,
    retain_graph: bool = False,
) -> Blocks:
    """Per-task gradients ``ρ_i ∇L_i`` for every tensor, without touching ``.grad``.

    Args:
        losses: ``(k,)`` tensor of the k scalar losses (part of one autograd graph).
        row_scale: ``ρ``, ``(k,)``, in ``losses``' dtype: the gradient of loss i is computed as the
            backward of ``ρ_i L_i``. With ``ρ_i = 1 / (L_i − m_i)`` the rows are the log-loss
            gradients, of order one whatever the losses' scale, so that their float32 products
            neither underflow nor overflow.
        tensors: the tensors to differentiate with respect to (leaves of the graph).
        vectorize: one vmapped backward pass over the rows of ``diag(ρ)``
            (``is_grads_batched=True``) instead of k sequential passes. vmap cannot run every
            operator; the caller falls back to ``vectorize=False`` when it raises.
        retain_graph: keep the graph after the call, as in :meth:`torch.Tensor.backward`.

    Returns:
        One block ``(k, *t.shape)`` per tensor; ``None`` where no loss reaches it. A loss that
        does not reach a tensor that others reach contributes a zero row.
    """
    if vectorize:
        return list(
            torch.autograd.grad(
                losses,
                tensors,
                grad_outputs=torch.diag(row_scale),
                is_grads_batched=True,
                retain_graph=retain_graph,
                allow_unused=True,
            )
        )
    return stack_tasks(list(task_gradient_rows(losses, row_scale, tensors, retain_graph)), tensors)


def task_gradient_rows(
    losses: torch.Tensor,
    row_scale: torch.Tensor,
    tensors: Sequence[torch.Tensor],
    retain_graph: bool = False,
) -> Iterator[tuple[torch.Tensor | None, ...]]:
    """The per-task gradients one loss at a time: k ordinary backward passes, pass i yielding
    ``ρ_i ∇L_i`` for every tensor (``None`` where loss i does not reach it).

    A consumer that copies each pass into a buffer row before asking for the next holds one
    pass's gradients at a time, where :func:`task_gradients` holds all k.
    """
    for index, loss in enumerate(losses):
        keep = retain_graph or index < len(losses) - 1
        yield _gradient(loss, tensors, keep, grad_output=row_scale[index])


def weighted_gradient(
    losses: torch.Tensor,
    coefficients: torch.Tensor,
    tensors: Sequence[torch.Tensor],
    *,
    retain_graph: bool = False,
    by_backward: bool = False,
) -> list[torch.Tensor | None]:
    """The gradient of ``Σ_i c_i L_i`` with the coefficients held constant: one backward pass.

    Args:
        losses: ``(k,)`` losses. coefficients: ``(k,)``, any float dtype.
        by_backward: through :func:`backward_gradients` (sharded parameters) rather than
            ``torch.autograd.grad``.
    """
    total = (coefficients.detach().to(losses.dtype) * losses).sum()
    if by_backward:
        return backward_gradients([total], tensors, retain_graph=retain_graph)[0]
    return list(_gradient(total, tensors, retain_graph))


def backward_gradients(
    outputs: Sequence[torch.Tensor], tensors: Sequence[torch.Tensor], *, retain_graph: bool = False
) -> list[list[torch.Tensor | None]]:
    """The gradients of each output by an ordinary backward pass, read from ``.grad``.

    For sharded (FSDP) parameters, which ``torch.autograd.grad`` cannot reach: the backward's
    hooks reduce-scatter each gradient into the shard's ``.grad``. ``.grad`` of ``tensors`` is
    restored afterwards.

    Returns:
        For each output, one gradient per tensor (``None`` where it does not reach), in the
        tensors' own form (a DTensor for a sharded parameter).
    """
    saved = [tensor.grad for tensor in tensors]
    gradients = []
    try:
        for index, output in enumerate(outputs):
            for tensor in tensors:
                tensor.grad = None
            if output.requires_grad:
                output.backward(retain_graph=retain_graph or index < len(outputs) - 1)
            gradients.append([tensor.grad for tensor in tensors])
    finally:
        for tensor, grad in zip(tensors, saved, strict=True):
            tensor.grad = grad
    return gradients


def stack_tasks(
    gradients: Sequence[Sequence[torch.Tensor | None]], tensors: Sequence[torch.Tensor]
) -> Blocks:
    """Per-task gradients (one list per task) as blocks of this rank's local values."""
    return [
        _stack_rows([None if row is None else local(row) for row in rows], local(tensor))
        for rows, tensor in zip(zip(*gradients, strict=True), tensors, strict=True)
    ]


def require_dense(gradients: Sequence[torch.Tensor | None], describe: Callable[[int], str]) -> None:
    """Raises a ValueError naming the first tensor whose gradient is sparse.

    ``describe(i)`` names tensor i in the message. Sparse gradients (``nn.Embedding(sparse=True)``,
    ``nn.EmbeddingBag(sparse=True)``) have no flat layout to balance in.
    """
    for index, gradient in enumerate(gradients):
        if gradient is not None and gradient.layout != torch.strided:
            raise ValueError(
                f"{describe(index)} received a {gradient.layout} gradient; gradbalance balances "
                f"dense gradients only: build the module with sparse=False (nn.Embedding, "
                f"nn.EmbeddingBag)"
            )


def gram_matrix(blocks: Blocks) -> torch.Tensor:
    """``G = J Jᵀ`` of the per-task gradients in ``blocks``, ``(k, k)`` float64
    (:func:`gradbalance.kernels.gram` per block, summed in float64)."""
    present = [block for block in blocks if block is not None]
    if not present:
        raise ValueError("no loss reaches any parameter: every per-task gradient is empty")
    return _sum_on_one_device([kernels.gram(_as_real_rows(block)) for block in present])


def all_finite(tensors: Sequence[torch.Tensor | None]) -> torch.Tensor:
    """A boolean 0-d tensor, True when every element of every tensor is finite (no host sync)."""
    present = [t if not t.is_complex() else torch.view_as_real(t) for t in tensors if t is not None]
    if not present:
        return torch.tensor(True)
    norms = torch._foreach_norm(present)  # NaN or inf anywhere makes its norm non-finite
    if len({norm.device for norm in norms}) > 1:
        norms = [norm.to(norms[0].device) for norm in norms]
    return torch.stack(norms).isfinite().all()


def run_post_accumulate_grad_hooks(tensors: Sequence[torch.Tensor]) -> None:
    """Runs the hooks of :meth:`torch.Tensor.register_post_accumulate_grad_hook` on ``tensors``,
    as ``Tensor.backward`` does once their ``.grad`` is final; in registration order."""
    for tensor in tensors:
        # torch keeps a tensor's post-accumulate-grad hooks in this ordered dict (None: none).
        hooks = getattr(tensor, "_post_accumulate_grad_hooks", None)
        for hook in list(hooks.values()) if hooks else ():
            hook(tensor)


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
        real = _as_real(block)
        k = len(real)
        if tuple(real.stride()) == (self.size, *self.strides) or self.size == 0:
            return real.as_strided((k, self.size), (self.size, 1), real.storage_offset())
        ordered = real.new_empty(k, self.size)
        self.rows(ordered).copy_(real)
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
            strides = _contract_strides(shard)
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
                (slot.rows(target), _as_real(sources[i]))
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

    def release_task_buffers(self) -> None:
        """Frees the ``(k, n)`` buffers (made again by the next :meth:`store`)."""
        for group in self.groups:
            group.tasks = None

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
        return _sum_on_one_device(
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


def accumulate_grads(
    tensors: Sequence[torch.Tensor], gradients: Sequence[torch.Tensor | None]
) -> list[torch.Tensor]:
    """Adds ``gradients`` into ``.grad`` as ``Tensor.backward``'s ``AccumulateGrad`` does.

    A gradient becomes ``.grad`` as it is when it follows the layout contract and owns its
    memory alone; one that is expanded, strided otherwise, part of a larger buffer, or shares its
    memory with another of ``gradients`` (autograd hands ``W`` and ``ΔW`` of ``x @ (W + ΔW)``
    one tensor) is copied into a new tensor laid out by the contract. An existing ``.grad`` is
    added into.

    Returns:
        The tensors whose ``.grad`` was written.
    """
    storages = Counter(
        g.untyped_storage().data_ptr() for g in gradients if g is not None and not is_sharded(g)
    )
    written = []
    for tensor, gradient in zip(tensors, gradients, strict=True):
        if gradient is None:
            continue
        written.append(tensor)
        if tensor.grad is not None:
            tensor.grad.add_(gradient)
        elif is_sharded(gradient) or _owns_its_layout(gradient, tensor, storages):
            tensor.grad = gradient  # a sharded gradient is FSDP's own, made for the shard
        else:
            grad = torch.empty_strided(
                tensor.shape, _contract_strides(tensor), dtype=tensor.dtype, device=tensor.device
            )
            tensor.grad = grad.copy_(gradient)
    return written


def _owns_its_layout(gradient: torch.Tensor, tensor: torch.Tensor, storages: Counter) -> bool:
    """Whether ``gradient`` can become ``.grad`` as it is: it fills its memory exactly, with the
    contract's strides, and no other gradient of the same backward shares that memory. (What
    ``torch.autograd.grad`` returns is memory of the backward itself — often a transposed or
    reshaped view of a product — whose only other holders were the backward's own buffers.)"""
    return (
        storages[gradient.untyped_storage().data_ptr()] == 1
        and gradient.dtype == tensor.dtype
        and gradient.device == tensor.device
        and gradient.storage_offset() == 0
        and gradient.untyped_storage().nbytes() == gradient.numel() * gradient.element_size()
        and (gradient.numel() == 0 or tuple(gradient.stride()) == _contract_strides(tensor))
    )


def _storage_use_count(tensor: torch.Tensor) -> int:
    """How many tensors share ``tensor``'s memory (torch's own count, as its CUDA-graph trees
    read it to tell whether an output is still alive)."""
    return torch._C._storage_Use_Count(tensor.untyped_storage()._cdata)


def _contract_strides(tensor: torch.Tensor) -> tuple[int, ...]:
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


def _gradient(
    output: torch.Tensor,
    tensors: Sequence[torch.Tensor],
    retain_graph: bool,
    grad_output: torch.Tensor | None = None,
) -> tuple[torch.Tensor | None, ...]:
    if not output.requires_grad:
        return (None,) * len(tensors)
    return torch.autograd.grad(
        output, tensors, grad_outputs=grad_output, retain_graph=retain_graph, allow_unused=True
    )


def _as_real(tensor: torch.Tensor) -> torch.Tensor:
    tensor = local(tensor)
    return torch.view_as_real(tensor) if tensor.is_complex() else tensor


def _as_real_rows(block: torch.Tensor) -> torch.Tensor:
    return _as_real(block).reshape(len(block), -1)


def _sum_on_one_device(grams: Sequence[torch.Tensor]) -> torch.Tensor:
    """The sum of partial Gram matrices that may live on different devices, on the first's."""
    return torch.stack([gram.to(grams[0].device) for gram in grams]).sum(dim=0)


def _stack_rows(rows: Sequence[torch.Tensor | None], tensor: torch.Tensor) -> torch.Tensor | None:
    if all(row is None for row in rows):
        return None
    return torch.stack([torch.zeros_like(tensor) if row is None else row for row in rows])
