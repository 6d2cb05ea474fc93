"""The losses' autograd graph, walked: its leaves, the kinds of its nodes, and what a loss reaches.

One depth-first walk per balanced backward (:func:`walk`) finds the leaves outside the parameters
and the kinds of node the per-task backward must know about (a reentrant checkpoint, sparse
embeddings, the operators vmap batches poorly); :func:`reaches` stops at the first leaf or node it
looks for.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch

from ._messages import describe_unshared

# The node that gives a leaf its .grad, by its class name.
_LEAF = "AccumulateGrad"
# The nodes of nn.Embedding / nn.EmbeddingBag, which record whether their gradient is sparse.
_EMBEDDINGS = ("EmbeddingBackward0", "EmbeddingBagBackward0")
# The node of torch.utils.checkpoint(..., use_reentrant=True): its backward runs a nested
# ``torch.autograd.backward``, which only an ordinary backward pass can drive, and the layers
# inside it are not part of the graph that can be walked.
REENTRANT_CHECKPOINT = "CheckpointFunctionBackward"


def walk(outputs: torch.Tensor) -> tuple[list[torch.Tensor], frozenset[str]]:
    """The leaves that ``outputs.backward()`` would give a gradient, in a deterministic order, and
    the class names of the graph's autograd nodes, in one walk.

    The leaves are the tensors behind the ``AccumulateGrad`` nodes: parameters, and any other leaf
    that requires grad (a projector trained by a second optimizer, an input with
    ``requires_grad``). Leaves used only inside a reentrant checkpoint are not seen.

    Raises:
        ValueError: the graph holds an embedding with sparse gradients.
    """
    leaves, kinds = [], set()
    for node in _nodes(outputs):
        kind = type(node).__name__
        kinds.add(kind)
        if kind == _LEAF:
            leaves.append(node.variable)
        elif kind in _EMBEDDINGS and node._saved_sparse:
            raise ValueError(
                f"the losses pass through {kind} with sparse gradients; gradbalance balances "
                f"dense gradients only: build the module with sparse=False"
            )
    return leaves, frozenset(kinds)


def check_shared(
    losses: Sequence[torch.Tensor],
    representation: Sequence[torch.Tensor],
    names: Sequence[str] | None,
) -> None:
    """Refuses losses whose graph does not pass through the representation."""
    leaves = {id(t) for t in representation if t.grad_fn is None}
    nodes = frozenset(t.grad_fn for t in representation if t.grad_fn is not None)
    shared = [reaches(loss, leaves, nodes) for loss in losses]
    if not all(shared):
        raise ValueError(describe_unshared(shared, names))


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
