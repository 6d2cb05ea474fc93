"""The gradient engine: per-task gradients, flat gradient buffers, the Gram matrix, the combination.

A *Jacobian block* is the stack of the k per-task gradients of one parameter, shape
``(k, *param.shape)``, or ``None`` when no loss reaches that parameter. :func:`task_gradients`
produces one block per parameter; :class:`FlatGradients` lays them out in one ``(k, n)`` buffer per
(device, dtype), computes their Gram matrix and writes the combination into ``.grad`` tensors that
are views of one ``(n,)`` buffer, so the heavy work is a few large operations, whatever the number
of parameters.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from . import kernels
from .distributed import as_grad_of, local

__all__ = [
    "FlatGradients",
    "accumulate_grad",
    "all_finite",
    "backward_gradients",
    "gram_matrix",
    "task_gradients",
    "weighted_gradient",
]

Blocks = list[torch.Tensor | None]


def task_gradients(
    losses: torch.Tensor,
    params: Sequence[torch.Tensor],
    *,
    vectorize: bool,
    retain_graph: bool = False,
) -> Blocks:
    """Per-task gradients ``∇_θ L_i`` for every parameter, without touching ``.grad``.

    Args:
        losses: ``(k,)`` tensor of the k scalar losses (part of one autograd graph).
        params: the parameters θ.
        vectorize: one vmapped backward pass over the k rows of the identity
            (``is_grads_batched=True``) instead of k sequential passes. vmap cannot run every
            operator; the caller falls back to ``vectorize=False`` when it raises.
        retain_graph: keep the graph after the call, as in :meth:`torch.Tensor.backward`.

    Returns:
        One block ``(k, *p.shape)`` per parameter; ``None`` where no loss reaches it. A loss that
        does not reach a parameter that others reach contributes a zero row.
    """
    if vectorize:
        identity = torch.eye(len(losses), dtype=losses.dtype, device=losses.device)
        return list(
            torch.autograd.grad(
                losses,
                params,
                grad_outputs=identity,
                is_grads_batched=True,
                retain_graph=retain_graph,
                allow_unused=True,
            )
        )
    per_task = [
        _gradient(loss, params, retain_graph or i < len(losses) - 1)
        for i, loss in enumerate(losses)
    ]
    return stack_tasks(per_task, params)


def weighted_gradient(
    losses: torch.Tensor,
    coefficients: torch.Tensor,
    params: Sequence[torch.Tensor],
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
        return backward_gradients([total], params, retain_graph=retain_graph)[0]
    return _gradient(total, params, retain_graph)


def backward_gradients(
    outputs: Sequence[torch.Tensor], params: Sequence[torch.Tensor], *, retain_graph: bool = False
) -> list[list[torch.Tensor | None]]:
    """The gradients of each output by an ordinary backward pass, read from ``.grad``.

    For sharded (FSDP) parameters, which ``torch.autograd.grad`` cannot reach: the backward's
    hooks reduce-scatter each gradient into the shard's ``.grad``. ``.grad`` is restored
    afterwards; other leaves of the graph (outside ``params``) accumulate as in any backward.

    Returns:
        For each output, one gradient per parameter (``None`` where it does not reach), in the
        parameters' own form (a DTensor for a sharded parameter).
    """
    saved = [param.grad for param in params]
    gradients = []
    try:
        for index, output in enumerate(outputs):
            for param in params:
                param.grad = None
            if output.requires_grad:
                output.backward(retain_graph=retain_graph or index < len(outputs) - 1)
            gradients.append([param.grad for param in params])
    finally:
        for param, grad in zip(params, saved, strict=True):
            param.grad = grad
    return gradients


def stack_tasks(
    gradients: Sequence[Sequence[torch.Tensor | None]], params: Sequence[torch.Tensor]
) -> Blocks:
    """Per-task gradients (one list per task) as blocks of this rank's local values."""
    return [
        _stack_rows([None if row is None else local(row) for row in rows], local(param))
        for rows, param in zip(zip(*gradients, strict=True), params, strict=True)
    ]


def gram_matrix(blocks: Blocks) -> torch.Tensor:
    """``G = J Jᵀ`` of the per-task gradients in ``blocks``, ``(k, k)`` float64
    (:func:`gradbalance.kernels.gram` per block, summed in float64)."""
    present = [block for block in blocks if block is not None]
    if not present:
        raise ValueError("no loss reaches any parameter: every per-task gradient is empty")
    return _sum_on_one_device([kernels.gram(block.reshape(len(block), -1)) for block in present])


def all_finite(tensors: Sequence[torch.Tensor | None]) -> torch.Tensor:
    """A boolean 0-d tensor, True when every element of every tensor is finite (no host sync)."""
    present = [t for t in tensors if t is not None]
    if not present:
        return torch.tensor(True)
    norms = torch._foreach_norm(present)  # NaN or inf anywhere makes its norm non-finite
    if len({norm.device for norm in norms}) > 1:
        norms = [norm.to(norms[0].device) for norm in norms]
    return torch.stack(norms).isfinite().all()


def accumulate_grad(params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor | None]) -> None:
    """Add ``grads`` into ``.grad`` as :meth:`torch.Tensor.backward` would; ``None`` is skipped."""
    for param, grad in zip(params, grads, strict=True):
        if grad is None:
            continue
        if param.grad is None:
            param.grad = grad if grad.dtype == param.dtype else grad.to(param.dtype)
        else:
            param.grad.add_(grad)


@dataclass
class _Group:
    """Parameters of one (device, dtype, balanced) and their flat buffers."""

    indices: list[int]
    balanced: bool
    tasks: torch.Tensor  # (k, n): row i holds ∇L_i of every parameter of the group
    combined: torch.Tensor  # (n,): Σ_i c_i tasks[i]; the parameters' .grad are views of it
    bounds: list[tuple[int, int]] = field(default_factory=list)  # each parameter's columns
    task_views: list[torch.Tensor] = field(default_factory=list)  # (k, *p.shape) each
    grad_views: list[torch.Tensor] = field(default_factory=list)  # p.shape each

    def views(self, flat: torch.Tensor, shapes: Sequence[torch.Size]) -> list[torch.Tensor]:
        """The parameter-shaped views of an ``(n,)`` buffer laid out like ``combined``."""
        return [
            flat[start:end].view(shape)
            for (start, end), shape in zip(self.bounds, shapes, strict=True)
        ]


class FlatGradients:
    """Per-task gradients of a fixed list of parameters in flat buffers, and their combination.

    Parameters are grouped by (device, dtype, balanced); each group owns a ``(k, n)`` buffer of
    per-task gradients and an ``(n,)`` buffer for the combined gradient, whose views become the
    parameters' ``.grad``. Only balanced groups enter the Gram matrix.

    Args:
        params: the parameters, in a fixed order (the order of the blocks given to :meth:`store`).
        balanced: for each parameter, whether its gradients enter the Gram matrix.
        num_tasks: k.
    """

    def __init__(
        self, params: Sequence[torch.Tensor], balanced: Sequence[bool], num_tasks: int
    ) -> None:
        self.params = list(params)
        self.num_tasks = num_tasks
        self.reached = [False] * len(self.params)
        by_key: dict[tuple, list[int]] = {}
        for index, (param, is_balanced) in enumerate(zip(self.params, balanced, strict=True)):
            shard = local(param)
            by_key.setdefault((shard.device, shard.dtype, is_balanced), []).append(index)
        self.groups = [
            self._group(indices, is_balanced) for (_, _, is_balanced), indices in by_key.items()
        ]

    def _group(self, indices: list[int], balanced: bool) -> _Group:
        params = [local(self.params[i]) for i in indices]  # of a sharded one, this rank's shard
        sizes = [p.numel() for p in params]
        like = params[0]
        group = _Group(
            indices,
            balanced,
            tasks=torch.zeros(self.num_tasks, sum(sizes), device=like.device, dtype=like.dtype),
            combined=torch.zeros(sum(sizes), device=like.device, dtype=like.dtype),
        )
        start = 0
        for param, size in zip(params, sizes, strict=True):
            group.bounds.append((start, start + size))
            group.task_views.append(
                group.tasks[:, start : start + size].view(self.num_tasks, *param.shape)
            )
            start += size
        group.grad_views = group.views(group.combined, [p.shape for p in params])
        return group

    def store(self, blocks: Blocks, *, accumulate: bool) -> None:
        """Copy the blocks into the task buffers (``accumulate``: add to what is there).

        An unreached parameter (``None`` block) contributes zeros.
        """
        if not accumulate:
            self.reached = [False] * len(self.params)
        for group in self.groups:
            pairs = [
                (view, blocks[i])
                for view, i in zip(group.task_views, group.indices, strict=True)
                if blocks[i] is not None
            ]
            if not accumulate and len(pairs) < len(group.indices):
                group.tasks.zero_()
            if pairs:
                views, sources = zip(*pairs, strict=True)
                if accumulate:
                    torch._foreach_add_(list(views), list(sources))
                else:
                    torch._foreach_copy_(list(views), list(sources))
        for index, block in enumerate(blocks):
            self.reached[index] = self.reached[index] or block is not None

    @property
    def task_buffers(self) -> list[torch.Tensor]:
        """The ``(k, n)`` buffers, one per group (for collectives)."""
        return [group.tasks for group in self.groups]

    def gram(self) -> torch.Tensor:
        """``(k, k)`` float64 Gram matrix of the balanced parameters' per-task gradients."""
        balanced = [group for group in self.groups if group.balanced]
        if not any(self.reached[i] for group in balanced for i in group.indices):
            raise ValueError("no loss reaches any balanced parameter")
        return _sum_on_one_device([kernels.gram(group.tasks) for group in balanced])

    def write_grad(self, balanced: torch.Tensor, plain: torch.Tensor) -> None:
        """Add ``Σ_i c_i ∇L_i`` into the ``.grad`` of every reached parameter.

        ``c`` is ``balanced`` ``(k,)`` for balanced parameters and ``plain`` for the others. When
        every reached parameter of a group has no ``.grad`` (after ``zero_grad()``) or still has
        this buffer's view (``zero_grad(set_to_none=False)``, or no zeroing), the combination is
        written straight into the views; ``.grad`` tensors from elsewhere get it added.
        """
        for group in self.groups:
            coefficients = balanced if group.balanced else plain
            reached = [j for j, i in enumerate(group.indices) if self.reached[i]]
            params = [self.params[group.indices[j]] for j in reached]
            holds_view = [
                _holds(self.params[i].grad, view)
                for i, view in zip(group.indices, group.grad_views, strict=True)
            ]
            if not any(holds_view) and all(p.grad is None for p in params):
                kernels.combine(group.tasks, coefficients, group.combined, accumulate=False)
                for param, j in zip(params, reached, strict=True):
                    param.grad = as_grad_of(param, group.grad_views[j])
            elif all(holds_view[j] for j in reached):
                # Unreached parameters' columns are zero: adding them changes nothing.
                kernels.combine(group.tasks, coefficients, group.combined, accumulate=True)
            else:
                fresh = torch.empty_like(group.combined)
                kernels.combine(group.tasks, coefficients, fresh, accumulate=False)
                views = group.views(fresh, [view.shape for view in group.grad_views])
                grads = [as_grad_of(p, views[j]) for p, j in zip(params, reached, strict=True)]
                accumulate_grad(params, grads)


def _gradient(
    output: torch.Tensor, params: Sequence[torch.Tensor], retain_graph: bool
) -> tuple[torch.Tensor | None, ...]:
    if not output.requires_grad:
        return (None,) * len(params)
    return torch.autograd.grad(output, params, retain_graph=retain_graph, allow_unused=True)


def _sum_on_one_device(grams: Sequence[torch.Tensor]) -> torch.Tensor:
    """The sum of partial Gram matrices that may live on different devices, on the first's."""
    return torch.stack([gram.to(grams[0].device) for gram in grams]).sum(dim=0)


def _holds(grad: torch.Tensor | None, view: torch.Tensor) -> bool:
    """Whether ``grad`` is ``view`` (for a sharded parameter: wraps it)."""
    if grad is None:
        return False
    shard = local(grad)
    return shard is view or (shard.data_ptr() == view.data_ptr() and shard.shape == view.shape)


def _stack_rows(rows: Sequence[torch.Tensor | None], param: torch.Tensor) -> torch.Tensor | None:
    if all(row is None for row in rows):
        return None
    return torch.stack([torch.zeros_like(param) if row is None else row for row in rows])
