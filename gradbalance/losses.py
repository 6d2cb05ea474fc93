"""Distillation and task losses and their grouping into the optimizer's k objectives.

See docs/projectors.md, "Distillation losses and the k objectives".

Classification as in the paper's appendix A::

    L_distill = L_kl + L_feat      L_kl = T² · KL(softmax(teacher/T) ‖ softmax(student/T))
    L_task    = L_ce               L_feat = projector.loss(z_s, z_t)

``classification_losses`` computes the named terms as a ``KDLosses``; ``KDLosses.objectives()``
groups them for ``MultiObjectiveOptimizer.backward``: ``"paper"`` gives k = 2
([L_kl + L_feat, L_ce]), ``"separate"`` one objective per term (k = 3: [L_kl, L_feat, L_ce]).
``KDLosses.sum(weights)`` is the fixed-weight baseline.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from .projectors import IndefiniteSubspaceProjector, VkDProjector

__all__ = ["KDLosses", "classification_losses", "cross_entropy_floor", "kl_distillation"]

Grouping = Literal["paper", "separate"]


def kl_distillation(
    student_logits: Tensor, teacher_logits: Tensor, temperature: float = 1.0
) -> Tensor:
    """T² · KL(softmax(teacher/T) ‖ softmax(student/T)), averaged over samples.

    Logits have shape (…, K) (classes last); every leading index is a sample. The T² factor
    keeps the gradient scale independent of T (Hinton et al. 2015). The teacher is frozen: no
    gradient reaches ``teacher_logits``. Default T = 1 as in DeiT / VkD.
    """
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"student logits {tuple(student_logits.shape)} and teacher logits "
            f"{tuple(teacher_logits.shape)} must have the same shape (…, K)"
        )
    if student_logits.dim() == 0 or student_logits.numel() == 0:
        raise ValueError(f"logits must have shape (…, K), got {tuple(student_logits.shape)}")
    if not (math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be finite and > 0, got {temperature}")
    classes = student_logits.shape[-1]
    # The frozen teacher may run in lower precision; its logits are data for the student.
    teacher = teacher_logits.detach().to(student_logits.dtype).reshape(-1, classes)
    log_q = F.log_softmax(student_logits.reshape(-1, classes) / temperature, dim=-1)
    log_p = F.log_softmax(teacher / temperature, dim=-1)
    kl = F.kl_div(log_q, log_p, log_target=True, reduction="batchmean")
    return kl * temperature**2


def cross_entropy_floor(num_classes: int, label_smoothing: float = 0.0) -> float:
    """The smallest value cross-entropy with label smoothing ε over K classes can take.

    ``F.cross_entropy(..., label_smoothing=ε)`` is CE against q = (1 − ε)·onehot + ε/K, whose
    minimum over the logits is the entropy H(q) > 0 for ε > 0. Use it as the task loss's lower
    bound ``m`` (``min_losses``) of the optimizer, which balances log(L − m). It is also a lower
    bound for soft (mixup) targets: smoothing any target gives at least this entropy.
    """
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
        raise ValueError(f"num_classes must be an int >= 2, got {num_classes!r}")
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1], got {label_smoothing}")
    q_true = 1.0 - label_smoothing + label_smoothing / num_classes
    q_other = label_smoothing / num_classes
    return -_xlogx(q_true) - (num_classes - 1) * _xlogx(q_other)


def _xlogx(x: float) -> float:
    return x * math.log(x) if x > 0 else 0.0


def _total(values: Iterable[Tensor]) -> Tensor:
    return torch.stack(list(values)).sum()


@dataclass(frozen=True)
class KDLosses:
    """Named scalar loss terms of one step, split by kind.

    Attributes:
        distill: distillation terms, e.g. ``{"kl": L_kl, "feature": L_feat}``.
        task: task terms, e.g. ``{"ce": L_ce}``.

    Each kind needs at least one term; names are unique across both kinds.
    """

    distill: Mapping[str, Tensor]
    task: Mapping[str, Tensor]

    def __post_init__(self) -> None:
        for kind in ("distill", "task"):
            terms = getattr(self, kind)
            if not terms:
                raise ValueError(f"{kind} needs at least one loss term")
            for name, value in terms.items():
                if not isinstance(value, Tensor) or value.numel() != 1:
                    shape = tuple(value.shape) if isinstance(value, Tensor) else type(value)
                    raise ValueError(f"{kind} term {name!r} must be a scalar tensor, got {shape}")
            object.__setattr__(self, kind, {k: v.reshape(()) for k, v in terms.items()})
        shared = sorted(set(self.distill) & set(self.task))
        if shared:
            raise ValueError(f"term names used in both distill and task: {shared}")

    @property
    def terms(self) -> dict[str, Tensor]:
        """All terms, distillation first, in insertion order."""
        return {**self.distill, **self.task}

    def objectives(self, grouping: Grouping = "paper") -> list[Tensor]:
        """The k scalar objectives for ``MultiObjectiveOptimizer.backward``.

        ``"paper"``: [Σ distill, Σ task] (k = 2, the paper's choice, reported better);
        ``"separate"``: every term its own objective, distillation terms first.
        """
        if grouping == "paper":
            return [_total(self.distill.values()), _total(self.task.values())]
        if grouping == "separate":
            return list(self.terms.values())
        raise ValueError(f"grouping must be 'paper' or 'separate', got {grouping!r}")

    def sum(self, weights: Mapping[str, float] | None = None) -> Tensor:
        """Σ_name w_name · term, the fixed-weight baseline; a term not in ``weights`` has w = 1."""
        weights = dict(weights or {})
        unknown = sorted(set(weights) - set(self.terms))
        if unknown:
            raise ValueError(f"weights name unknown terms {unknown}; terms are {list(self.terms)}")
        bad = {name: w for name, w in weights.items() if not (math.isfinite(w) and w >= 0)}
        if bad:
            raise ValueError(f"weights must be finite and >= 0, got {bad}")
        return _total(weights.get(name, 1.0) * value for name, value in self.terms.items())


def classification_losses(
    logits: Tensor,
    targets: Tensor,
    teacher_logits: Tensor,
    *,
    distill_logits: Tensor | None = None,
    projector: IndefiniteSubspaceProjector | VkDProjector | None = None,
    student_features: Tensor | None = None,
    teacher_features: Tensor | None = None,
    temperature: float = 1.0,
    label_smoothing: float = 0.0,
) -> KDLosses:
    """The paper's classification terms: distill {"kl", "feature"}, task {"ce"}.

    Args:
        logits: (B, K) student class logits (the task head).
        targets: (B,) class indices or (B, K) class probabilities, as ``F.cross_entropy`` takes.
        teacher_logits: (B, K), frozen.
        distill_logits: (B, K) logits of a separate distillation head (DeiT's distillation
            token), used for the KL term instead of ``logits`` when given.
        projector, student_features, teacher_features: all three or none; the feature term is
            ``projector.loss(student_features, teacher_features)``. Without them there is no
            "feature" term (logit-only KD).
        temperature: T of the KL term.
        label_smoothing: of the cross-entropy; see ``cross_entropy_floor`` for its lower bound.
    """
    feature_inputs = {
        "projector": projector,
        "student_features": student_features,
        "teacher_features": teacher_features,
    }
    missing = [name for name, value in feature_inputs.items() if value is None]
    if 0 < len(missing) < len(feature_inputs):
        raise ValueError(f"the feature term needs {list(feature_inputs)}; missing {missing}")
    kl_logits = logits if distill_logits is None else distill_logits
    distill = {"kl": kl_distillation(kl_logits, teacher_logits, temperature)}
    if not missing:
        distill["feature"] = projector.loss(student_features, teacher_features)
    task = {"ce": F.cross_entropy(logits, targets, label_smoothing=label_smoothing)}
    return KDLosses(distill=distill, task=task)
