"""The gradient engine: per-task gradients by one vmapped backward or k ordinary passes, the
weighted gradient by one, their Gram matrix, and ``.grad`` written the way torch's own backward
writes it.

Per-task gradients come as Jacobian blocks (:mod:`gradbalance._buffers`, which lays them out
flat). Every backward pass that is not vmapped runs in :func:`backward_passes`.
"""

from __future__ import annotations

import contextlib
from collections import Counter
from collections.abc import Callable, Iterator, Sequence

import torch

from . import _kernels as kernels
from ._buffers import Blocks, as_real, contract_strides, sum_on_one_device
from ._distributed import is_sharded, local

__all__ = [
    "accumulate_grads",
    "all_finite",
    "backward_passes",
    "gram_matrix",
    "require_dense",
    "run_post_accumulate_grad_hooks",
    "stack_tasks",
    "task_gradients",
    "weighted_gradient",
]


def task_gradients(
    losses: torch.Tensor | Sequence[torch.Tensor],
    row_scale: torch.Tensor,
    tensors: Sequence[torch.Tensor],
    *,
    vectorize: bool,
    retain_graph: bool = False,
    by_backward: bool = False,
) -> Blocks:
    """Per-task gradients ``ρ_i ∇L_i`` for every tensor, as blocks ``(k, *t.shape)``.

    Args:
        losses: the k scalar losses (part of one autograd graph).
        row_scale: ``ρ``, ``(k,)``, in ``losses``' dtype: the gradient of loss i is computed as the
            backward of ``ρ_i L_i``. With ``ρ_i = 1 / (L_i − m_i)`` the rows are the log-loss
            gradients, of order one whatever the losses' scale, so that their float32 products
            neither underflow nor overflow.
        tensors: the tensors to differentiate with respect to (leaves of the graph).
        vectorize: one vmapped backward pass over the rows of ``diag(ρ)``
            (``is_grads_batched=True``) instead of k passes (:func:`backward_passes`). vmap cannot
            run every operator; :mod:`gradbalance._per_task` decides what to do when it raises.
        retain_graph: keep the graph after the call, as in :meth:`torch.Tensor.backward`.
        by_backward: the k passes are ordinary backward passes (:func:`backward_passes`).

    Returns:
        One block per tensor; ``None`` where no loss reaches it. A loss that does not reach a
        tensor that others reach contributes a zero row. ``.grad`` is left as it was.
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
    passes = backward_passes(
        losses, tensors, scales=row_scale, retain_graph=retain_graph, by_backward=by_backward
    )
    with contextlib.closing(passes):
        return stack_tasks(list(passes), tensors)


def backward_passes(
    outputs: torch.Tensor | Sequence[torch.Tensor],
    tensors: Sequence[torch.Tensor],
    *,
    scales: torch.Tensor | None = None,
    retain_graph: bool = False,
    by_backward: bool = False,
) -> Iterator[tuple[torch.Tensor | None, ...]]:
    """One ordinary backward pass per scalar output: pass i yields the gradient of
    ``s_i · output_i`` (``s = scales``, default 1) for every tensor, ``None`` where output i does
    not reach it. The graph is kept until the last pass (or after it, with ``retain_graph``).

    A consumer that copies each pass into a buffer row before asking for the next holds one
    pass's gradients at a time.

    Args:
        by_backward: run ``Tensor.backward`` and read ``.grad`` instead of
            ``torch.autograd.grad``: for sharded (FSDP) parameters, whose backward hooks
            reduce-scatter each gradient into the shard's ``.grad`` (yielded as DTensors), and for
            graphs with a reentrant checkpoint, whose nested backward ``torch.autograd.grad``
            cannot drive. ``.grad`` of ``tensors`` is restored when the passes end (close the
            iterator if you stop early).
    """
    count = len(outputs)
    saved = [tensor.grad for tensor in tensors] if by_backward else []
    try:
        for index, output in enumerate(outputs):
            keep = retain_graph or index < count - 1
            scale = None if scales is None else scales[index]
            if not output.requires_grad:
                yield (None,) * len(tensors)
            elif by_backward:
                for tensor in tensors:
                    tensor.grad = None
                output.backward(scale, retain_graph=keep)
                yield tuple(tensor.grad for tensor in tensors)
            else:
                yield torch.autograd.grad(
                    output, tensors, grad_outputs=scale, retain_graph=keep, allow_unused=True
                )
    finally:
        for tensor, grad in zip(tensors, saved, strict=False):  # nothing saved: nothing to do
            tensor.grad = grad


def weighted_gradient(
    losses: torch.Tensor,
    coefficients: torch.Tensor,
    tensors: Sequence[torch.Tensor],
    *,
    retain_graph: bool = False,
    by_backward: bool = False,
) -> list[torch.Tensor | None]:
    """The gradient of ``Σ_i c_i L_i`` with the coefficients held constant: one backward pass
    (:func:`backward_passes`, whose ``by_backward`` it takes).

    Args:
        losses: ``(k,)`` losses. coefficients: ``(k,)``, any float dtype.
    """
    total = (coefficients.detach().to(losses.dtype) * losses).sum()
    passes = backward_passes([total], tensors, retain_graph=retain_graph, by_backward=by_backward)
    with contextlib.closing(passes):
        return list(next(passes))


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
    (:func:`gradbalance._kernels.gram` per block, summed in float64)."""
    present = [block for block in blocks if block is not None]
    if not present:
        raise ValueError("no loss reaches any parameter: every per-task gradient is empty")
    return sum_on_one_device([kernels.gram(_as_real_rows(block)) for block in present])


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
                tensor.shape, contract_strides(tensor), dtype=tensor.dtype, device=tensor.device
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
        and (gradient.numel() == 0 or tuple(gradient.stride()) == contract_strides(tensor))
    )


def _as_real_rows(block: torch.Tensor) -> torch.Tensor:
    return as_real(block).reshape(len(block), -1)


def _stack_rows(rows: Sequence[torch.Tensor | None], tensor: torch.Tensor) -> torch.Tensor | None:
    if all(row is None for row in rows):
        return None
    return torch.stack([torch.zeros_like(tensor) if row is None else row for row in rows])
