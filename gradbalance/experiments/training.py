"""The one training loop shared by the teacher and every distillation method.

Methods differ only in their :class:`Objectives` (which losses, grouped into which k objectives)
and their :class:`Update` (how the k losses become a parameter step). The loop shuffles and
augments with its own generator, so every method sees the same batches for the same seed.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Literal, Protocol

import torch
from torch import nn

from gradbalance.experiments.augment import Augmentation
from gradbalance.experiments.cifar_recipe import CifarRecipe
from gradbalance.experiments.data import Splits
from gradbalance.experiments.models import FeatureClassifier, Output

__all__ = [
    "SGD_MOMENTUM",
    "EpochCallback",
    "History",
    "Objectives",
    "TrainConfig",
    "Update",
    "base_optimizer",
    "errors",
    "lr_scheduler",
    "predict",
    "step_statistics",
    "train",
]

_EVAL_BATCH = 1024
_AUGMENT_SEED_OFFSET = 2**32  # keeps the augmentation streams apart from the order streams


class Objectives(Protocol):
    """The k losses of one batch: ``(student output, inputs, labels, index) → [L_1 .. L_k]``;
    ``index`` holds the batch's positions in the training set."""

    def __call__(
        self, output: Output, inputs: torch.Tensor, labels: torch.Tensor, index: torch.Tensor
    ) -> list[torch.Tensor]: ...


class Update(Protocol):
    """One optimisation step from the k losses and the student output they were computed from
    (for an update that reads it, e.g. representation mode); returns the step's statistics (may
    be empty)."""

    optimizer: torch.optim.Optimizer

    def __call__(self, losses: list[torch.Tensor], output: Output) -> dict[str, torch.Tensor]: ...


EpochCallback = Callable[[int, float], None]


@dataclass(frozen=True)
class TrainConfig:
    """Schedule of one training run: ``optimizer``'s lr decayed over the ``epochs``, cosine over
    all steps, or with ``milestones`` (fractions of the epochs) × ``gamma`` at the first step of
    each milestone epoch ``round(f · epochs)`` (mdistiller's CIFAR schedule: 0.625, 0.75, 0.875
    of 240 epochs are its epochs 150, 180 and 210)."""

    epochs: int
    batch_size: int = 128
    lr: float = 3e-3
    weight_decay: float = 0.05
    optimizer: Literal["adamw", "sgd"] = "adamw"
    milestones: tuple[float, ...] | None = None
    gamma: float = 0.1


SGD_MOMENTUM = CifarRecipe.momentum  # mdistiller's SOLVER.MOMENTUM


def base_optimizer(
    params: Iterable[nn.Parameter], kind: str, lr: float, weight_decay: float
) -> torch.optim.Optimizer:
    """``torch.optim.AdamW`` or ``torch.optim.SGD`` (momentum :data:`SGD_MOMENTUM`, L2 weight
    decay) with ``lr`` and ``weight_decay``."""
    if kind == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=SGD_MOMENTUM, weight_decay=weight_decay)
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)


def lr_scheduler(
    optimizer: torch.optim.Optimizer, config: TrainConfig, steps_per_epoch: int
) -> torch.optim.lr_scheduler.LRScheduler:
    """:class:`TrainConfig`'s decay as a scheduler stepped once per optimizer step."""
    if config.milestones is None:
        return torch.optim.lr_scheduler.CosineAnnealingLR(
            optimizer, T_max=config.epochs * steps_per_epoch
        )
    epochs = [round(fraction * config.epochs) for fraction in config.milestones]
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda step: config.gamma ** sum(step // steps_per_epoch >= epoch for epoch in epochs),
    )


@dataclass
class History:
    """Test accuracy and errors after every epoch, the test errors after the last, per-step
    statistics, and the run's wall time.

    ``steps`` maps a statistic of :func:`step_statistics` to ``{"step": [...], "value": [...]}``:
    the optimizer steps (from 0) at which it was available, and its values there.
    """

    test_accuracy: list[float] = field(default_factory=list)
    test_errors: int = 0
    steps: dict[str, dict[str, list[float]]] = field(default_factory=dict)
    seconds: float = 0.0
    epoch_errors: list[int] = field(default_factory=list)

    @property
    def final_accuracy(self) -> float:
        """Test accuracy after the last epoch (not the best epoch: no selection on test data)."""
        return self.test_accuracy[-1]


def train(
    model: FeatureClassifier,
    objectives: Objectives,
    update: Update,
    splits: Splits,
    config: TrainConfig,
    seed: int,
    augmentation: Augmentation | None = None,
    on_epoch: EpochCallback | None = None,
) -> History:
    """Train ``model`` for ``config.epochs`` epochs and evaluate it on the test split after each.

    Args:
        model: the network being trained (its parameters, and any auxiliary module's, are in
            ``update.optimizer``).
        objectives: the losses of a batch.
        update: turns the losses into a step; statistics it returns are recorded per step.
        splits: the data, on the model's device.
        config: the schedule.
        seed: of the batch order and, separately, of the augmentation's random numbers, so that
            the order does not depend on the augmentation.
        augmentation: applied to every training batch (None: no augmentation).
        on_epoch: called with ``(epoch, test accuracy)`` after each epoch.
    """
    steps_per_epoch = -(-len(splits.y_train) // config.batch_size)
    scheduler = lr_scheduler(update.optimizer, config, steps_per_epoch)
    device = splits.x_train.device
    order_generator = torch.Generator(device=device).manual_seed(seed)
    augment_generator = torch.Generator(device=device).manual_seed(seed + _AUGMENT_SEED_OFFSET)
    history = History()
    recorded: dict[str, tuple[list[int], list[torch.Tensor]]] = {}
    step = 0
    start = time.perf_counter()
    for epoch in range(config.epochs):
        model.train()
        order = torch.randperm(len(splits.y_train), generator=order_generator, device=device)
        for index in order.split(config.batch_size):
            inputs = splits.x_train[index]
            if augmentation is not None:
                inputs = augmentation(inputs, augment_generator)
            output = model(inputs)
            losses = objectives(output, inputs, splits.y_train[index], index)
            stats = update(losses, output)
            scheduler.step()
            _record(recorded, step_statistics(losses, stats), step)
            step += 1
        history.test_errors = errors(model, splits.x_test, splits.y_test)
        history.epoch_errors.append(history.test_errors)
        history.test_accuracy.append(1 - history.test_errors / len(splits.y_test))
        if on_epoch is not None:
            on_epoch(epoch, history.test_accuracy[-1])
    history.seconds = time.perf_counter() - start
    history.steps = {
        name: {"step": steps, "value": torch.stack(values).tolist()}
        for name, (steps, values) in recorded.items()
    }
    return history


def step_statistics(
    losses: list[torch.Tensor], stats: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """The scalars recorded after a step, from its losses and the update's statistics.

    ``loss_task`` (the last loss) always; ``loss_distill`` (the first) when k ≥ 2; and, when the
    update reports them (:attr:`gradbalance.MultiObjectiveOptimizer.stats`), ``pi_distill``
    (π_1), ``conflict`` (GrC), ``cosine`` (cos(g_1, g_2)) and ``dominance`` (GrD); for k ≥ 3 also
    ``conflict_<i>_<j>``, ⟨g_i, g_j⟩ of the other pairs (0-based).
    """
    scalars = {"loss_task": losses[-1]}
    if len(losses) > 1:
        scalars["loss_distill"] = losses[0]
    if "weights" in stats:
        scalars["pi_distill"] = stats["weights"][0]
    if "gram" in stats:
        scalars.update(
            conflict=stats["conflict"], cosine=stats["cosine"][0, 1], dominance=stats["dominance"]
        )
        gram = stats["gram"]
        if len(gram) > 2:  # every other pair too, e.g. [L_kl, L_feat, L_ce]'s feature and task
            for i in range(len(gram)):
                for j in range(max(i + 1, 2), len(gram)):
                    scalars[f"conflict_{i}_{j}"] = gram[i, j]
    return scalars


def _record(
    recorded: dict[str, tuple[list[int], list[torch.Tensor]]],
    scalars: dict[str, torch.Tensor],
    step: int,
) -> None:
    """Append ``scalars`` at ``step`` (kept on the device until the end of training)."""
    for name, value in scalars.items():
        steps, values = recorded.setdefault(name, ([], []))
        steps.append(step)
        values.append(value.detach().double())


@torch.no_grad()
def predict(model: FeatureClassifier, inputs: torch.Tensor) -> Output:
    """The model's features and logits on ``inputs`` in eval mode, computed in chunks."""
    model.eval()
    outputs = [model(chunk) for chunk in inputs.split(_EVAL_BATCH)]
    return Output(
        torch.cat([output.features for output in outputs]),
        torch.cat([output.logits for output in outputs]),
    )


def errors(model: FeatureClassifier, inputs: torch.Tensor, labels: torch.Tensor) -> int:
    """How many of ``inputs`` ``model`` misclassifies (top-1)."""
    logits = predict(model, inputs).logits
    return int((logits.argmax(dim=1) != labels).sum())
