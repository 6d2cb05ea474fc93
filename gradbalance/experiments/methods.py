"""The methods compared by ``gradbalance distill``: which losses each optimises, and how.

Every method trains the same student with the same loop
(:func:`gradbalance.experiments.training.train`); a :class:`Method` only chooses

* the objectives: cross-entropy alone (``student``); Hinton et al.'s k = 2 pair
  ``[L_kl, L_ce]`` (logits only, ``L_kl = T² · KL``); or the paper's k = 2 grouping
  ``[L_kl + L_feat, L_ce]`` with a feature projector (:mod:`gradbalance.losses`);
* the update: a fixed weighted sum (of the losses or of their logarithms) stepped by AdamW, or
  :class:`gradbalance.MultiObjectiveOptimizer` around the same AdamW (in representation mode with
  the student's features, :func:`shared_representation`, as the representation), with MoKD's
  exact π or another weighting of the Gram matrix — torchjd's UPGrad, PCGrad, IMTL-G,
  Aligned-MTL, DualProj — on the same log-loss gradients, so that only the rule for π differs.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from gradbalance import IndefiniteSubspaceProjector, MultiObjectiveOptimizer, VkDProjector
from gradbalance.experiments.models import FeatureClassifier, Output
from gradbalance.experiments.training import predict
from gradbalance.losses import classification_losses

__all__ = [
    "DEFAULT_METHODS",
    "METHODS",
    "MNIST_METHODS",
    "TORCHJD_WEIGHTINGS",
    "Balanced",
    "DistillObjectives",
    "FixedSum",
    "Method",
    "MethodSettings",
    "TaskObjective",
    "TeacherTargets",
    "build",
    "parse_method",
    "shared_representation",
]

ProjectorKind = Literal["subspace", "vkd"]
Balance = Literal["exact", "amortized", "affine", "representation"]


@dataclass(frozen=True)
class Method:
    """One way to train the student.

    Attributes:
        name: as on the command line and in ``results.json``.
        teacher: whether the student learns from the teacher (False: the labels alone).
        projector: feature projector of the distillation objective (``L_kl + L_feat``);
            ``None``: the logits only (``L_kl``, Hinton et al. 2015).
        distill_weight: w in the fixed sum ``w · L_distill + L_task``.
        log_losses: sum the logarithms instead, ``w · log L_distill + log L_task``: the gradient
            ``w ∇L_distill / L_distill + ∇L_task / L_task`` is MoKD's un-normalised direction
            with π fixed, an ablation of the balancing.
        balance: mode of :class:`~gradbalance.MultiObjectiveOptimizer`; ``None`` for the fixed sum.
        weighting: a key of :data:`TORCHJD_WEIGHTINGS`: the optimizer's ``weighting=`` (exact
            mode); ``None``: MoKD's exact min-norm π.
    """

    name: str
    teacher: bool = True
    projector: ProjectorKind | None = None
    distill_weight: float = 1.0
    log_losses: bool = False
    balance: Balance | None = None
    weighting: str | None = None


# Method name → torchjd.aggregation Weighting class (torchjd is an optional extra).
TORCHJD_WEIGHTINGS = {
    "upgrad": "UPGradWeighting",
    "pcgrad": "PCGradWeighting",
    "imtl-g": "IMTLGWeighting",
    "aligned-mtl": "AlignedMTLWeighting",
    "dualproj": "DualProjWeighting",
}
# Hinton et al.'s fixed weighting: a lower weight on the hard targets, 0.9 · T²·KL + 0.1 · CE —
# under Adam(W) only the ratio of the weights matters, so 9 · L_kl + L_ce.
HINTON_WEIGHT = 9.0


METHODS: dict[str, Method] = {
    method.name: method
    for method in (
        Method("student", teacher=False),
        Method("hinton-kd", distill_weight=HINTON_WEIGHT),
        Method("kd-fixed", projector="subspace"),
        Method("kd-log", projector="subspace", log_losses=True),
        Method("vkd", projector="vkd"),
        Method("mokd-exact", projector="subspace", balance="exact"),
        Method("mokd-amortized", projector="subspace", balance="amortized"),
        Method("mokd-affine", projector="subspace", balance="affine"),
        Method("mokd-representation", projector="subspace", balance="representation"),
        *(
            Method(name, projector="subspace", balance="exact", weighting=name)
            for name in TORCHJD_WEIGHTINGS
        ),
    )
}
DEFAULT_METHODS = ("student", "kd-fixed", "vkd", "mokd-exact", "mokd-amortized")
# Hinton et al. (2015) §3 and its fixed-weight sweep, then the balancers on the same losses.
MNIST_METHODS = (
    "student",
    "hinton-kd",
    "hinton-kd-w1",
    "hinton-kd-w81",
    "vkd",
    "mokd-exact",
    "mokd-amortized",
    "mokd-representation",
    "upgrad",
    "pcgrad",
    "imtl-g",
)
_SWEEP = re.compile(r"(?P<base>kd-fixed|hinton-kd)-w(?P<weight>\d+(\.\d+)?)")


def parse_method(name: str) -> Method:
    """A method of :data:`METHODS`, or ``kd-fixed-w<W>`` / ``hinton-kd-w<W>``: that method with
    distill weight W.

    Raises:
        ValueError: an unknown name, or a sweep weight that is not positive.
    """
    if name in METHODS:
        return METHODS[name]
    match = _SWEEP.fullmatch(name)
    if match is None:
        choices = ", ".join(METHODS)
        raise ValueError(
            f"unknown method {name!r}; choose from {choices}, kd-fixed-w<weight> or "
            "hinton-kd-w<weight>"
        )
    weight = float(match["weight"])
    if weight <= 0:
        raise ValueError(f"{name}: the distill weight must be > 0")
    return dataclasses.replace(METHODS[match["base"]], name=name, distill_weight=weight)


@dataclass(frozen=True)
class MethodSettings:
    """Hyper-parameters shared by all methods.

    Attributes:
        lr, weight_decay: of the student's AdamW (wrapped or not).
        temperature: T of the KL term.
        stats_every: amortized mode's ``stats_every`` (per-task gradient statistics every N-th
            step, for the plots; 0 = never).
        normalize: the optimizer's ``normalize`` (None: its default for the mode).
        features: whether the methods with the paper's subspace projector add its feature term
            (False: they distil the logits only, ``[L_kl, L_ce]``, as Hinton et al.); VkD always
            has its own.
    """

    lr: float
    weight_decay: float
    temperature: float = 1.0
    stats_every: int = 0
    normalize: bool | None = None
    features: bool = True


class TaskObjective:
    """k = 1: cross-entropy with the labels."""

    def __call__(
        self, output: Output, inputs: torch.Tensor, labels: torch.Tensor, index: torch.Tensor
    ) -> list[torch.Tensor]:
        return [F.cross_entropy(output.logits, labels)]


class TeacherTargets:
    """The frozen teacher's output on a training batch.

    With ``train_inputs`` (batches that are not augmented) the teacher runs once on the whole
    training set and a batch's targets are looked up by its ``index``; without, it runs on each
    (augmented) batch.
    """

    def __init__(self, teacher: FeatureClassifier, train_inputs: torch.Tensor | None) -> None:
        self.teacher = teacher
        self.table = None if train_inputs is None else predict(teacher, train_inputs)

    def __call__(self, inputs: torch.Tensor, index: torch.Tensor) -> Output:
        if self.table is not None:
            return Output(self.table.features[index], self.table.logits[index])
        with torch.no_grad():
            return self.teacher(inputs)


class DistillObjectives:
    """k = 2: ``[L_kl + L_feat, L_ce]`` (``[L_kl, L_ce]`` without a projector) against the frozen
    teacher's output on the same inputs."""

    def __init__(
        self, targets: TeacherTargets, projector: nn.Module | None, temperature: float
    ) -> None:
        self.targets = targets
        self.projector = projector
        self.temperature = temperature

    def __call__(
        self, output: Output, inputs: torch.Tensor, labels: torch.Tensor, index: torch.Tensor
    ) -> list[torch.Tensor]:
        target = self.targets(inputs, index)
        features = {}
        if self.projector is not None:
            features = dict(
                projector=self.projector,
                student_features=output.features,
                teacher_features=target.features,
            )
        losses = classification_losses(
            output.logits, labels, target.logits, temperature=self.temperature, **features
        )
        return losses.objectives("paper")


def shared_representation(output: Output) -> torch.Tensor:
    """What both objectives read: the student's features — the distillation objective through
    the projector and the logits, the task objective through the logits, which the head computes
    from them; representation mode's ``representation``. (Adding the logits would count the
    head's path twice: the features' gradient already includes it.)"""
    return output.features


class FixedSum:
    """Backward of ``Σ_i w_i L_i`` (or ``Σ_i w_i log L_i``) and a step of a plain optimizer."""

    def __init__(
        self, optimizer: torch.optim.Optimizer, weights: list[float], log: bool = False
    ) -> None:
        self.optimizer = optimizer
        self.weights = weights
        self.log = log

    def __call__(self, losses: list[torch.Tensor], output: Output) -> dict[str, torch.Tensor]:
        self.optimizer.zero_grad()
        terms = [loss.log() for loss in losses] if self.log else losses
        sum(weight * term for weight, term in zip(self.weights, terms, strict=True)).backward()
        self.optimizer.step()
        return {}


class Balanced:
    """:meth:`MultiObjectiveOptimizer.backward` on the losses and a step; returns its stats.

    In representation mode the backward gets the student's :func:`shared_representation`.
    """

    def __init__(self, optimizer: MultiObjectiveOptimizer) -> None:
        self.optimizer = optimizer

    def __call__(self, losses: list[torch.Tensor], output: Output) -> dict[str, torch.Tensor]:
        self.optimizer.zero_grad()
        shared = self.optimizer.mode == "representation"
        representation = shared_representation(output) if shared else None
        self.optimizer.backward(losses, representation=representation)
        self.optimizer.step()
        return self.optimizer.stats


def build(
    method: Method,
    student: FeatureClassifier,
    targets: TeacherTargets,
    settings: MethodSettings,
) -> tuple[TaskObjective | DistillObjectives, FixedSum | Balanced]:
    """The objectives and the update of ``method`` for ``student``.

    The projector (if any) is created here, after the student, on the student's device, and is
    trained together with it by the same optimizer.
    """
    adamw = {"lr": settings.lr, "weight_decay": settings.weight_decay}
    if not method.teacher:
        return TaskObjective(), FixedSum(torch.optim.AdamW(student.parameters(), **adamw), [1.0])
    params = list(student.parameters())
    projector = None
    if method.projector == "vkd" or (method.projector is not None and settings.features):
        projector = _make_projector(
            method.projector, targets.teacher.feature_dim, student.feature_dim
        ).to(params[0].device)
        params += projector.parameters()
    objectives = DistillObjectives(targets, projector, settings.temperature)
    if method.balance is None:
        weights = [method.distill_weight, 1.0]
        update = FixedSum(torch.optim.AdamW(params, **adamw), weights, log=method.log_losses)
        return objectives, update
    stats_every = settings.stats_every if method.balance == "amortized" else 0
    optimizer = MultiObjectiveOptimizer(
        params,
        mode=method.balance,
        normalize=settings.normalize,
        stats_every=stats_every,
        vectorize=True,  # fixed, not timed: reruns reproduce results.json bit for bit
        weighting=None if method.weighting is None else torchjd_weighting(method.weighting),
        **adamw,
    )
    return objectives, Balanced(optimizer)


def torchjd_weighting(name: str) -> nn.Module:
    """A fresh ``torchjd.aggregation`` Weighting for a key of :data:`TORCHJD_WEIGHTINGS`."""
    import torchjd.aggregation  # the torchjd extra

    return getattr(torchjd.aggregation, TORCHJD_WEIGHTINGS[name])()


def _make_projector(kind: ProjectorKind, teacher_dim: int, student_dim: int) -> nn.Module:
    if kind == "vkd":
        return VkDProjector(teacher_dim, student_dim)
    return IndefiniteSubspaceProjector(teacher_dim, student_dim)
