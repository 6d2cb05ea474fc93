"""The methods compared by ``gradbalance distill``: which losses each optimises, and how.

Every method trains the same student with the same loop
(:func:`gradbalance.experiments.training.train`); a :class:`Method` only chooses

* the objectives: cross-entropy alone (``student``); Hinton et al.'s k = 2 pair
  ``[L_kl, L_ce]`` (logits only, ``L_kl = T² · KL``); the paper's k = 2 grouping
  ``[L_kl + L_feat, L_ce]`` with a feature projector (:mod:`gradbalance.losses`); or the k = 3
  ``[L_kl, L_feat, L_ce]``;
* the update: a fixed weighted sum (of the losses or of their logarithms) stepped by AdamW;
  :class:`gradbalance.MultiObjectiveOptimizer` around the same AdamW (in representation mode with
  the student's features, :func:`shared_representation`, as the representation), with MoKD's
  exact π or another weighting of the Gram matrix — torchjd's UPGrad, PCGrad, IMTL-G,
  Aligned-MTL, DualProj, PCD — on the same log-loss gradients, so that only the rule for π
  differs; or DOT's two-momentum SGD (:mod:`gradbalance.experiments.dot`).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from gradbalance import IndefiniteSubspaceProjector, MultiObjectiveOptimizer, VkDProjector
from gradbalance.experiments.cifar_recipe import CifarRecipe
from gradbalance.experiments.dot import DistillationOrientedTrainer, DotUpdate
from gradbalance.experiments.models import FeatureClassifier, Output
from gradbalance.experiments.training import SGD_MOMENTUM, base_optimizer, predict
from gradbalance.losses import Grouping, classification_losses
from gradbalance.modes import Mode

__all__ = [
    "CIFAR_METHODS",
    "DEFAULT_METHODS",
    "METHODS",
    "MNIST_HINTON_METHODS",
    "MNIST_LONG_METHODS",
    "MNIST_METHODS",
    "TORCHJD_WEIGHTINGS",
    "Balanced",
    "DistillObjectives",
    "FixedSum",
    "Method",
    "MethodSettings",
    "TaskFirst",
    "TaskObjective",
    "TeacherTargets",
    "build",
    "parse_method",
    "shared_representation",
]

ProjectorKind = Literal["subspace", "vkd"]
Balance = Mode
Trainer = Literal["adamw", "dot"]


@dataclass(frozen=True)
class Method:
    """One way to train the student.

    Attributes:
        name: as on the command line and in ``results.json``.
        teacher: whether the student learns from the teacher (False: the labels alone).
        projector: feature projector of the distillation objective (``L_kl + L_feat``);
            ``None``: the logits only (``L_kl``, Hinton et al. 2015).
        features: whether the projector's term is used: ``None`` follows the run's
            ``--features`` setting, ``True`` always (the rows that exist to test a projector).
        grouping: ``"paper"``, ``[L_kl + L_feat, L_ce]``, or ``"separate"``,
            ``[L_kl, L_feat, L_ce]`` (:meth:`gradbalance.losses.KDLosses.objectives`).
        distill_weight, task_weight: w and v in the fixed sum ``w · L_distill + v · L_task``.
        log_losses: sum the logarithms instead, ``w · log L_distill + log L_task``: the gradient
            ``w ∇L_distill / L_distill + ∇L_task / L_task`` is MoKD's un-normalised direction
            with π fixed, an ablation of the balancing.
        balance: mode of :class:`~gradbalance.MultiObjectiveOptimizer`; ``None`` for the fixed sum.
        weighting: a key of :data:`TORCHJD_WEIGHTINGS`: the optimizer's ``weighting=`` (exact
            mode); ``None``: MoKD's exact min-norm π.
        trainer: ``"adamw"``, or ``"dot"``: DOT's SGD with two momenta on the losses weighted
            by :data:`DOT_WEIGHTS` (``balance`` is then ``None``).
        lr: the method's own learning rate (DOT's SGD); ``None``: the run's (AdamW's).
    """

    name: str
    teacher: bool = True
    projector: ProjectorKind | None = None
    features: bool | None = None
    grouping: Grouping = "paper"
    distill_weight: float = 1.0
    task_weight: float = 1.0
    log_losses: bool = False
    balance: Balance | None = None
    weighting: str | None = None
    trainer: Trainer = "adamw"
    lr: float | None = None


# Method name → torchjd.aggregation Weighting class (torchjd is an optional extra).
TORCHJD_WEIGHTINGS = {
    "upgrad": "UPGradWeighting",
    "pcgrad": "PCGradWeighting",
    "imtl-g": "IMTLGWeighting",
    "aligned-mtl": "AlignedMTLWeighting",
    "dualproj": "DualProjWeighting",
    "pcd": "PCDWeighting",
}
# PCD reads the Gramian's first objective as the primary one; ours come [distill, task].
PRIMARY_LAST = ("pcd",)
# DOT (experiments/dot.py): mdistiller's KD weights, 0.9 · L_kl + 0.1 · L_ce (Hinton's ratio), and
# the SGD learning rate chosen on MNIST's 10,000 validation images (docs/mnist.md, "DOT"):
# gradbalance distill --dataset mnist --validation 10000 --methods dot-lr0.01 dot-lr0.03 \
#     dot-lr0.1 dot-lr0.3 --seeds 1 --out runs/mnist-dot-lr
DOT_WEIGHTS = (0.9, 0.1)
DOT_LR = 0.03
# mdistiller's KD (configs/cifar100/kd.yaml): 0.9 · T²·KL + 0.1 · CE, weights that scale an SGD
# step; "kd-w<W>" keeps their sum, W/(1+W) · L_kl + 1/(1+W) · L_ce (kd is W = 9).
KD_WEIGHTS = (CifarRecipe.kd_weight, CifarRecipe.ce_weight)
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
        Method("vkd", projector="vkd", features=True),
        Method("mokd-vkd", projector="vkd", features=True, balance="exact"),
        Method("mokd-exact", projector="subspace", balance="exact"),
        Method("mokd-subspace", projector="subspace", features=True, balance="exact"),
        Method(
            "mokd-subspace-k3",
            projector="subspace",
            features=True,
            grouping="separate",
            balance="exact",
        ),
        Method("mokd-amortized", projector="subspace", balance="amortized"),
        Method("mokd-affine", projector="subspace", balance="affine"),
        Method("mokd-representation", projector="subspace", balance="representation"),
        *(
            Method(name, projector="subspace", balance="exact", weighting=name)
            for name in TORCHJD_WEIGHTINGS
        ),
        Method("kd", distill_weight=KD_WEIGHTS[0], task_weight=KD_WEIGHTS[1]),
        Method("dot", trainer="dot"),
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
    "pcd",
    "dot",
    "mokd-subspace",
    "mokd-subspace-k3",
    "mokd-vkd",
)
# The study at convergence (--preset long): the fixed-weight grid, the balancers, the rivals.
MNIST_LONG_METHODS = (
    "student",
    "hinton-kd-w1",
    "hinton-kd-w3",
    "hinton-kd",
    "mokd-exact",
    "mokd-representation",
    "mokd-amortized",
    "imtl-g",
    "upgrad",
    "pcd",
    "dot",
)
# CIFAR-100 (docs/cifar100.md): the student, mdistiller's KD and a grid of its weights (kd is
# kd-w9), DOT, MoKD's modes, the best torchjd rival on MNIST, and the two feature rows.
CIFAR_METHODS = (
    "student",
    "kd",
    "kd-w1",
    "kd-w3",
    "dot",
    "mokd-exact",
    "mokd-representation",
    "mokd-amortized",
    "imtl-g",
    "vkd",
    "mokd-subspace",
)
# Hinton et al.'s table (--preset hinton): "fixed-weight" and "dot" are the preset's selections,
# the weight and DOT's lr chosen on held-out data (gradbalance.experiments.datasets).
MNIST_HINTON_METHODS = (
    "student",
    "fixed-weight",
    "mokd-exact",
    "mokd-representation",
    "imtl-g",
    "dot",
)
_NUMBER = r"(?P<value>\d+(\.\d+)?)"
# name pattern → (the field it sets, what the message calls it)
# name pattern → (what the message calls the value, the fields it sets from the value)
_SWEEPS = {
    re.compile(rf"(?P<base>kd-fixed|hinton-kd)-w{_NUMBER}"): (
        "distill weight",
        lambda w: {"distill_weight": w},
    ),
    re.compile(rf"(?P<base>kd)-w{_NUMBER}"): (
        "weight ratio",
        lambda w: {"distill_weight": w / (1 + w), "task_weight": 1 / (1 + w)},
    ),
    re.compile(rf"(?P<base>dot)-lr{_NUMBER}"): ("learning rate", lambda lr: {"lr": lr}),
}


def parse_method(name: str) -> Method:
    """A method of :data:`METHODS`, or ``kd-fixed-w<W>`` / ``hinton-kd-w<W>``: that method with
    distill weight W; ``kd-w<W>``: ``kd`` with the weights W/(1+W) and 1/(1+W); or
    ``dot-lr<LR>``: DOT with learning rate LR.

    Raises:
        ValueError: an unknown name, or a sweep value that is not positive.
    """
    if name in METHODS:
        return METHODS[name]
    for pattern, (meaning, fields) in _SWEEPS.items():
        match = pattern.fullmatch(name)
        if match is None:
            continue
        value = float(match["value"])
        if value <= 0:
            raise ValueError(f"{name}: the {meaning} must be > 0")
        return dataclasses.replace(METHODS[match["base"]], name=name, **fields(value))
    choices = ", ".join(METHODS)
    raise ValueError(
        f"unknown method {name!r}; choose from {choices}, kd-fixed-w<weight>, "
        "hinton-kd-w<weight>, kd-w<ratio> or dot-lr<lr>"
    )


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
        optimizer: the students' optimizer, ``torch.optim.AdamW`` or ``torch.optim.SGD``
            (momentum :data:`~gradbalance.experiments.training.SGD_MOMENTUM`), plain or inside
            :class:`~gradbalance.MultiObjectiveOptimizer`.
    """

    lr: float
    weight_decay: float
    temperature: float = 1.0
    stats_every: int = 0
    normalize: bool | None = None
    features: bool = True
    optimizer: Literal["adamw", "sgd"] = "adamw"


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
    """``[L_kl + L_feat, L_ce]`` (``grouping="paper"``; ``[L_kl, L_ce]`` without a projector) or
    ``[L_kl, L_feat, L_ce]`` (``"separate"``) against the frozen teacher's output on the same
    inputs."""

    def __init__(
        self,
        targets: TeacherTargets,
        projector: nn.Module | None,
        temperature: float,
        grouping: Grouping = "paper",
    ) -> None:
        self.targets = targets
        self.projector = projector
        self.temperature = temperature
        self.grouping = grouping

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
        return losses.objectives(self.grouping)


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
        shared = self.optimizer.balancer.wants_representation
        representation = shared_representation(output) if shared else None
        self.optimizer.backward(losses, representation=representation)
        self.optimizer.step()
        return self.optimizer.stats


def build(
    method: Method,
    student: FeatureClassifier,
    targets: TeacherTargets,
    settings: MethodSettings,
) -> tuple[TaskObjective | DistillObjectives, FixedSum | Balanced | DotUpdate]:
    """The objectives and the update of ``method`` for ``student``.

    The projector (if any) is created here, after the student, on the student's device, and is
    trained together with it by the same optimizer.
    """
    if not method.teacher:
        return TaskObjective(), FixedSum(_base(student.parameters(), settings), [1.0])
    params = list(student.parameters())
    projector = None
    uses_features = settings.features if method.features is None else method.features
    if method.projector is not None and uses_features:
        projector = _make_projector(
            method.projector, targets.teacher.feature_dim, student.feature_dim
        ).to(params[0].device)
        params += projector.parameters()
    objectives = DistillObjectives(targets, projector, settings.temperature, method.grouping)
    return objectives, _update(method, params, settings)


def _update(
    method: Method, params: list[nn.Parameter], settings: MethodSettings
) -> FixedSum | Balanced | DotUpdate:
    if method.trainer == "dot":
        optimizer = DistillationOrientedTrainer(
            params, lr=_dot_lr(method, settings), weight_decay=settings.weight_decay
        )
        return DotUpdate(optimizer, DOT_WEIGHTS)
    if method.balance is None:
        weights = [method.distill_weight, method.task_weight]
        return FixedSum(_base(params, settings), weights, log=method.log_losses)
    sgd = settings.optimizer == "sgd"
    optimizer = MultiObjectiveOptimizer(
        params,
        base=torch.optim.SGD if sgd else torch.optim.AdamW,
        mode=method.balance,
        # Under SGD the direction's scale is the step's: Σ π_j ∇L_j / L_j grows as the losses
        # fall, so it is divided by Σ π_j / L_j (a convex combination of the ∇L_j) unless the
        # run says otherwise; AdamW ignores the scale.
        normalize=True if sgd and settings.normalize is None else settings.normalize,
        stats_every=settings.stats_every,  # read by the modes that need it (amortized)
        vectorize=True,  # fixed, not timed: reruns reproduce results.json bit for bit
        weighting=None if method.weighting is None else torchjd_weighting(method.weighting),
        lr=settings.lr,
        weight_decay=settings.weight_decay,
        **({"momentum": SGD_MOMENTUM} if sgd else {}),
    )
    return Balanced(optimizer)


def _dot_lr(method: Method, settings: MethodSettings) -> float:
    """DOT's SGD learning rate: the method's own, else the run's when the run trains with SGD
    (mdistiller's DOT configs keep the recipe's lr), else :data:`DOT_LR`."""
    if method.lr is not None:
        return method.lr
    return settings.lr if settings.optimizer == "sgd" else DOT_LR


def _base(params: Iterable[nn.Parameter], settings: MethodSettings) -> torch.optim.Optimizer:
    return base_optimizer(params, settings.optimizer, settings.lr, settings.weight_decay)


def torchjd_weighting(name: str) -> nn.Module:
    """A fresh ``torchjd.aggregation`` Weighting for a key of :data:`TORCHJD_WEIGHTINGS` (those of
    :data:`PRIMARY_LAST` see the objectives in reverse order, the task first)."""
    import torchjd.aggregation  # the torchjd extra

    weighting = getattr(torchjd.aggregation, TORCHJD_WEIGHTINGS[name])()
    return TaskFirst(weighting) if name in PRIMARY_LAST else weighting


class TaskFirst(nn.Module):
    """A weighting of the reversed objectives, ``π = R w(R G R)`` with R the order reversal: for
    weightings that read the first objective as the primary one (torchjd's PCD), while our
    objectives come ``[distill, task]``. A stateful weighting keeps its state in its own
    ``state_dict()`` (PCD: the moving average of squared gradient norms), which the optimizer's
    ``state_dict()`` does not hold."""

    def __init__(self, weighting: nn.Module) -> None:
        super().__init__()
        self.weighting = weighting

    def forward(self, gram: torch.Tensor) -> torch.Tensor:
        return self.weighting(gram.flip(0, 1)).flip(0)


def _make_projector(kind: ProjectorKind, teacher_dim: int, student_dim: int) -> nn.Module:
    if kind == "vkd":
        return VkDProjector(teacher_dim, student_dim)
    return IndefiniteSubspaceProjector(teacher_dim, student_dim)
