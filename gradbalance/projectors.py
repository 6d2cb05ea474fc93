"""Feature projectors for distillation (docs/projectors.md).

``IndefiniteSubspaceProjector`` is MoKD's subspace learning: two isometric embeddings
P_t ∈ St(n, n_t), P_s ∈ St(n, n_s) into a common space R^n and a diagonal metric D = diag(d) of
free sign. ``VkDProjector`` is the single orthogonal projection of VkD (Miles et al., CVPR 2024),
the special case n = n_t, P_t = I, D = I, kept as the baseline. Both share one call signature::

    proj(z_s, z_t)             -> (ẑ_s, ẑ_t), each (B, n) or (B, T, n)
    proj.similarity(z_s, z_t)  -> s = ⟨ẑ_t, ẑ_s⟩, shape (B,) or (B, T)
    proj.loss(z_s, z_t)        -> scalar smooth-L1 between ẑ_s and the embedded layer-normed teacher

The Stiefel matrices are exactly orthonormal: by default each is the Q factor of an unconstrained
matrix (:class:`gradbalance.frames.QRFrame`, O(n k²) for an n × k frame, computed once per optimizer
step); ``triv="cayley"`` / ``"expm"`` use ``geotorch.orthogonal`` instead.
"""

from __future__ import annotations

import abc
from contextlib import AbstractContextManager
from typing import Literal

import geotorch
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils import parametrize

from gradbalance.frames import QRFrame, orthonormal_frame

__all__ = ["IndefiniteSubspaceProjector", "VkDProjector"]

Trivialization = Literal["qr", "cayley", "expm"]
TokenMode = Literal["pool", "each"]

_TRIVIALIZATIONS = ("qr", "cayley", "expm")
_GEOTORCH_TRIVIALIZATIONS = ("cayley", "expm")
_TOKEN_MODES = ("pool", "each")
_FROZEN_PREFIX = "_frozen_"


def _check_positive_ints(**values: int) -> None:
    for name, value in values.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")


def _as_vectors(z: Tensor, channels: int, tokens: str, name: str) -> Tensor:
    """Features as channel-last vectors.

    (B, C) stays (B, C); tokens (B, N, C) and maps (B, C, H, W) become (B, C) by averaging over
    tokens / positions when ``tokens == "pool"``, else (B, N, C) and (B, H·W, C).
    """
    shape = tuple(z.shape)
    if z.dim() not in (2, 3, 4):
        raise ValueError(f"{name} must have shape (B, C), (B, N, C) or (B, C, H, W), got {shape}")
    channel_dim = 1 if z.dim() == 4 else -1
    if z.shape[channel_dim] != channels:
        raise ValueError(
            f"{name} has {z.shape[channel_dim]} channels (shape {shape}), expected {channels}"
        )
    if z.shape[0] == 0:
        raise ValueError(f"{name} is an empty batch (shape {shape})")
    if z.dim() == 4:
        z = z.flatten(2).transpose(1, 2)
    if tokens == "pool" and z.dim() == 3:
        z = z.mean(dim=1)
    return z


class _StiefelProjector(nn.Module, abc.ABC):
    """What both projectors share: Stiefel matrices, feature shapes, caching, freezing,
    similarity and loss. Subclasses register their matrices and define ``_embed``."""

    def __init__(
        self, teacher_dim: int, student_dim: int, dim: int, tokens: str, triv: str
    ) -> None:
        _check_choice("tokens", tokens, _TOKEN_MODES)
        _check_choice("triv", triv, _TRIVIALIZATIONS)
        super().__init__()
        self.teacher_dim = teacher_dim
        self.student_dim = student_dim
        self.dim = dim
        self.tokens = tokens
        self.triv = triv
        self._stiefel_names: tuple[str, ...] = ()

    def _add_stiefel(self, name: str, rows: int, cols: int, factory: dict) -> None:
        self.register_parameter(name, nn.Parameter(torch.empty(rows, cols, **factory)))
        if self.triv in _GEOTORCH_TRIVIALIZATIONS:
            geotorch.orthogonal(self, name, triv=self.triv)
        else:
            with torch.no_grad():  # Haar-random: qf of a Gaussian matrix
                getattr(self, name).copy_(orthonormal_frame(torch.randn(rows, cols, **factory)))
            parametrize.register_parametrization(self, name, QRFrame())
        # A non-persistent buffer follows .to() but stays out of the state_dict.
        self.register_buffer(_FROZEN_PREFIX + name, None, persistent=False)
        self._stiefel_names += (name,)

    def _stiefel(self, name: str) -> Tensor:
        frozen = getattr(self, _FROZEN_PREFIX + name)
        return getattr(self, name) if frozen is None else frozen

    @abc.abstractmethod
    def _embed(self, z_s: Tensor, z_t: Tensor) -> tuple[Tensor, Tensor]:
        """Map channel-last student (…, n_s) and teacher (…, n_t) vectors into R^n."""

    def _features(self, z_s: Tensor, z_t: Tensor) -> tuple[Tensor, Tensor]:
        z_s = _as_vectors(z_s, self.student_dim, self.tokens, "student features z_s")
        # The teacher is frozen, possibly run in lower precision: its features are data in the
        # student's dtype, never a path for gradients.
        z_t = z_t.detach().to(z_s.dtype)
        z_t = _as_vectors(z_t, self.teacher_dim, self.tokens, "teacher features z_t")
        if z_s.shape[0] != z_t.shape[0]:
            raise ValueError(
                f"batch sizes differ: student features {z_s.shape[0]}, teacher {z_t.shape[0]}"
            )
        if z_s.shape[:-1] != z_t.shape[:-1]:
            raise ValueError(
                f"with tokens='each' student and teacher need the same tokens per sample: "
                f"student {tuple(z_s.shape[1:-1])}, teacher {tuple(z_t.shape[1:-1])} "
                f"(use tokens='pool' to compare pooled features)"
            )
        return z_s, z_t

    def forward(self, z_s: Tensor, z_t: Tensor) -> tuple[Tensor, Tensor]:
        """(ẑ_s, ẑ_t) in R^n, shape (B, n), or (B, T, n) per token with ``tokens="each"``."""
        return self._embed(*self._features(z_s, z_t))

    def similarity(self, z_s: Tensor, z_t: Tensor) -> Tensor:
        """s = ⟨ẑ_t, ẑ_s⟩ per sample (B,), or per token (B, T) with ``tokens="each"``."""
        e_s, e_t = self(z_s, z_t)
        return (e_s * e_t).sum(dim=-1)

    def loss(self, z_s: Tensor, z_t: Tensor) -> Tensor:
        """mean smooth-L1(ẑ_s − embed(LN(z_t))), β = 1, averaged over samples, tokens and R^n.

        LN is a per-vector layer norm without affine (eps 1e-5) in the teacher's own
        coordinates, before the isometric embedding, so the target keeps the norm of LN(z_t)
        whatever the learned P_t (see docs/projectors.md for why).
        """
        z_s, z_t = self._features(z_s, z_t)
        e_s, target = self._embed(z_s, F.layer_norm(z_t, z_t.shape[-1:]))
        return F.smooth_l1_loss(e_s, target)

    def cached(self) -> AbstractContextManager[None]:
        """Context in which every Stiefel matrix is computed at most once.

        For several ``forward``/``similarity``/``loss`` calls in one training step (one forward
        already computes each matrix once). Wraps ``torch.nn.utils.parametrize.cached()``, which
        covers every parametrized module; do not step an optimizer inside it.
        """
        return parametrize.cached()

    def freeze(self) -> _StiefelProjector:
        """Compute the Stiefel matrices once and reuse them, detached, until ``unfreeze()``.

        For evaluation: forward then costs two matrix products. No gradient reaches the Stiefel
        parameters while frozen; the metric (if any) stays live. Call again after changing or
        loading the parameters. Returns ``self``.
        """
        with torch.no_grad():
            for name in self._stiefel_names:
                setattr(self, _FROZEN_PREFIX + name, getattr(self, name).detach().clone())
        return self

    def unfreeze(self) -> _StiefelProjector:
        """Go back to computing the Stiefel matrices from their parameters. Returns ``self``."""
        for name in self._stiefel_names:
            setattr(self, _FROZEN_PREFIX + name, None)
        return self

    @property
    def frozen(self) -> bool:
        """Whether ``freeze()`` is in effect."""
        return any(getattr(self, _FROZEN_PREFIX + name) is not None for name in self._stiefel_names)

    def extra_repr(self) -> str:
        return (
            f"teacher_dim={self.teacher_dim}, student_dim={self.student_dim}, dim={self.dim}, "
            f"tokens={self.tokens!r}, triv={self.triv!r}"
        )


class IndefiniteSubspaceProjector(_StiefelProjector):
    r"""MoKD's indefinite subspace projector (paper §3.2; docs/projectors.md).

    Embeds teacher z_t ∈ R^{n_t} and student z_s ∈ R^{n_s} into R^n, n ≥ max(n_t, n_s)::

        ẑ_t = P_t z_t,   ẑ_s = D P_s z_s,   s(z_t, z_s) = ⟨ẑ_t, ẑ_s⟩ = z_tᵀ P_tᵀ D P_s z_s

    with ``teacher_projection`` P_t (n × n_t) and ``student_projection`` P_s (n × n_s) having
    orthonormal columns (Stiefel manifolds, ``geotorch.orthogonal``) and ``metric`` d (n,), the
    diagonal of D, free in sign. d starts at ones: the projector starts from a plain
    (positive-definite) inner product between two random isometries, and gradient descent moves
    entries of d through zero where a negative direction fits better.

    Args:
        teacher_dim: n_t, channels of the teacher features.
        student_dim: n_s, channels of the student features.
        dim: n, the common dimension; default max(n_t, n_s); smaller values are refused.
        tokens: ``"pool"`` averages tokens (B, N, C) and maps (B, C, H, W) to (B, C) first;
            ``"each"`` projects every token / position and compares them one to one.
        triv: parametrisation of the Stiefel matrices: ``"qr"`` (default), the Q factor of an
            unconstrained matrix, O(n k²) per n × k frame and computed once per optimizer step
            (:class:`gradbalance.frames.QRFrame`); or geotorch's ``"cayley"`` / ``"expm"``
            trivializations of an n × n orthogonal matrix (docs/projectors.md compares them).
        device, dtype: of the parameters. Student features must match them (or run under
            autocast); teacher features are cast to the student's dtype.
    """

    def __init__(
        self,
        teacher_dim: int,
        student_dim: int,
        dim: int | None = None,
        *,
        tokens: TokenMode = "pool",
        triv: Trivialization = "qr",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        _check_positive_ints(teacher_dim=teacher_dim, student_dim=student_dim)
        smallest = max(teacher_dim, student_dim)
        dim = smallest if dim is None else dim
        _check_positive_ints(dim=dim)
        if dim < smallest:
            raise ValueError(
                f"dim={dim} is smaller than max(teacher_dim, student_dim)={smallest}: both "
                f"features must embed isometrically into R^dim"
            )
        super().__init__(teacher_dim, student_dim, dim, tokens, triv)
        factory = {"device": device, "dtype": dtype}
        self._add_stiefel("teacher_projection", dim, teacher_dim, factory)
        self._add_stiefel("student_projection", dim, student_dim, factory)
        self.metric = nn.Parameter(torch.ones(dim, **factory))

    def _embed(self, z_s: Tensor, z_t: Tensor) -> tuple[Tensor, Tensor]:
        p_s = self._stiefel("student_projection")
        p_t = self._stiefel("teacher_projection")
        return (z_s @ p_s.mT) * self.metric, z_t @ p_t.mT


class VkDProjector(_StiefelProjector):
    r"""VkD's orthogonal projector (Miles et al., CVPR 2024), the baseline of MoKD.

    One ``projection`` P ∈ St(n_t, n_s) (n_t × n_s, orthonormal columns; orthonormal rows if the
    student is the wider one) maps the student into the teacher's space, D = I::

        ẑ_s = P z_s,   ẑ_t = z_t,   s(z_t, z_s) = z_tᵀ P z_s

    and ``loss`` is the smooth-L1 between P z_s and the layer-normed teacher, as in VkD. It equals
    ``IndefiniteSubspaceProjector`` with n = n_t, P_t = I, P_s = P, d = 1. Same arguments and
    methods as ``IndefiniteSubspaceProjector`` (``dim`` is n_t).
    """

    def __init__(
        self,
        teacher_dim: int,
        student_dim: int,
        *,
        tokens: TokenMode = "pool",
        triv: Trivialization = "qr",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        _check_positive_ints(teacher_dim=teacher_dim, student_dim=student_dim)
        super().__init__(teacher_dim, student_dim, teacher_dim, tokens, triv)
        factory = {"device": device, "dtype": dtype}
        self._add_stiefel("projection", teacher_dim, student_dim, factory)

    def _embed(self, z_s: Tensor, z_t: Tensor) -> tuple[Tensor, Tensor]:
        return z_s @ self._stiefel("projection").mT, z_t
