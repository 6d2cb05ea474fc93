"""Orthonormal frames at their cost floor: the QR parametrisation of the Stiefel manifold.

``QRFrame`` is a ``torch.nn.utils.parametrize`` parametrisation that maps an unconstrained n × k
matrix A (n ≥ k) to the Q factor of its QR decomposition with a positive diagonal in R::

    A = Q R,   Qᵀ Q = I_k,   diag(R) > 0          (Q = qf(A): Householder QR, O(n k²))

A k × n matrix with k < n is handled through its transpose (orthonormal rows). Q is exactly
orthonormal to rounding whatever A is, so no base update (dynamic trivialisation) is needed for
orthonormality; qf(A) is invariant to positive column scalings of A, so A's norm only sets the
effective step size (docs/projectors.md). Compared with geotorch's ``orthogonal(triv="cayley")``,
which pads an n × k frame to n × n and solves an n × n system, a tall frame costs O(n k²) instead
of O(n³), and no n × n base is stored.

The frame is computed once per value of A: it is cached until A changes (its version counter, as
an optimizer's in-place update or ``load_state_dict`` bumps it), so ``loss()`` and
``similarity()`` in one step, and every micro-batch of an accumulation window, share one QR. The
cached frame's backward keeps nothing that a backward pass frees, so each micro-batch's
``backward()`` goes through it (and accumulates into A.grad) as through a fresh one.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from torch.autograd.function import FunctionCtx, once_differentiable

__all__ = ["QRFrame", "orthonormal_frame"]


def _copy_lower_to_upper(matrix: Tensor) -> Tensor:
    """The symmetric matrix whose lower triangle (with the diagonal) is ``matrix``'s."""
    lower = matrix.tril(-1)
    return lower + lower.mT + torch.diag_embed(matrix.diagonal(dim1=-2, dim2=-1))


def _positive_qr(tall: Tensor) -> tuple[Tensor, Tensor]:
    """Reduced QR of an n × k matrix (n ≥ k) with diag(R) ≥ 0: the unique, smooth branch."""
    q, r = torch.linalg.qr(tall)
    # Householder QR leaves the signs of diag(R) to the data; fixing them makes qf continuous.
    signs = torch.where(r.diagonal(dim1=-2, dim2=-1) < 0, -1.0, 1.0).to(r.dtype)
    return q * signs.unsqueeze(-2), r * signs.unsqueeze(-1)


class _QRFactor(torch.autograd.Function):
    """qf(A) for a tall A. Q and R are kept as plain attributes of the node, not as saved tensors:
    a backward pass cannot free them, so a cached Q serves any number of backward passes."""

    @staticmethod
    def forward(ctx: FunctionCtx, tall: Tensor) -> Tensor:
        q, r = _positive_qr(tall)
        ctx.q, ctx.r = q.detach(), r.detach()
        return q

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_q: Tensor) -> Tensor:
        # d qf(A)ᵀ: Ā = (Q̄ + Q·copyltu(−Q̄ᵀQ)) R⁻ᵀ (the R̄ = 0 case of Walter & Lehmann's rule;
        # tested against torch.linalg.qr's autograd in float64).
        q, r = ctx.q, ctx.r
        grad = grad_q + q @ _copy_lower_to_upper(-(grad_q.mT @ q))
        return torch.linalg.solve_triangular(r.mT, grad, upper=False, left=False)


def orthonormal_frame(raw: Tensor) -> Tensor:
    """qf(raw): orthonormal columns for a tall or square matrix, orthonormal rows for a wide one.

    Args:
        raw: (n, k), any full-rank real matrix.
    Returns:
        (n, k), exactly orthonormal columns (n ≥ k) or rows (n < k).
    """
    if raw.shape[-2] >= raw.shape[-1]:
        return _QRFactor.apply(raw)
    return _QRFactor.apply(raw.mT).mT


def _cacheable(raw: Tensor) -> bool:
    """Whether ``raw`` is a plain leaf whose version counter tells when it changed (not a tensor
    inside a functorch transform or a compiled graph, where a cache would leak across calls)."""
    if torch.compiler.is_compiling() or not raw.is_leaf:
        return False
    return not torch._C._functorch.is_functorch_wrapped_tensor(raw)


class QRFrame(nn.Module):
    """Parametrisation ``A ↦ qf(A)`` of the Stiefel manifold, computed once per value of A.

    Register it with ``torch.nn.utils.parametrize.register_parametrization(module, name,
    QRFrame())`` on a tensor holding an orthonormal frame: ``right_inverse`` is the identity on
    frames, so the frame itself becomes the unconstrained parameter A (state-dict key
    ``parametrizations.<name>.original``) and loading a frame restores it exactly.
    """

    def __init__(self) -> None:
        super().__init__()
        self._key: tuple | None = None
        self._frame: Tensor | None = None

    def forward(self, raw: Tensor) -> Tensor:
        if not _cacheable(raw):
            return orthonormal_frame(raw)
        needs_graph = torch.is_grad_enabled() and raw.requires_grad
        # The tensor itself (a frame's graph ends at it), its data and every in-place change.
        key = (id(raw), raw._version, raw.data_ptr(), raw.dtype, torch.is_inference_mode_enabled())
        if self._key != key or (needs_graph and self._frame.grad_fn is None):
            self._frame, self._key = orthonormal_frame(raw), key
        return self._frame

    def right_inverse(self, frame: Tensor) -> Tensor:
        return frame

    @property
    def cached_frame(self) -> Tensor | None:
        """The frame last computed, kept until A changes (None before the first access)."""
        return self._frame

    def __getstate__(self) -> dict[str, Any]:
        # The cached frame carries an autograd graph, which deepcopy and pickle refuse.
        return {**self.__dict__, "_key": None, "_frame": None}
