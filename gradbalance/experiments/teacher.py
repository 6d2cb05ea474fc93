"""Train the teacher once and cache it in the output folder, so that reruns skip it."""

from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path
from typing import Any

import torch
from torch import nn

from gradbalance.experiments.augment import Augmentation
from gradbalance.experiments.data import Splits
from gradbalance.experiments.datasets import Network
from gradbalance.experiments.methods import FixedSum, TaskObjective
from gradbalance.experiments.models import FeatureClassifier
from gradbalance.experiments.training import EpochCallback, TrainConfig, train

__all__ = [
    "TEACHER_SEED",
    "cache_key",
    "load_or_train_teacher",
    "teacher_schedule",
]

TEACHER_SEED = 0
# Bump when a teacher's architecture changes, so that old caches are not loaded.
_ARCHITECTURE_VERSION = 2


def teacher_schedule(network: Network, epochs: int) -> TrainConfig:
    """The teacher's schedule, independent of the students': its network's AdamW settings and
    batch size, cosine decay over ``epochs``."""
    return TrainConfig(epochs, network.batch_size, network.lr, network.weight_decay)


def cache_key(
    name: str,
    network: Network,
    splits: Splits,
    config: TrainConfig,
    augmentation: Augmentation | None,
) -> dict[str, Any]:
    """Everything the teacher's weights depend on; a cache with another key is retrained."""
    return {
        "teacher": name,
        "width": network.width,
        "max_norm": network.max_norm,
        "dataset": splits.name,
        "train_size": len(splits.y_train),
        "data": _fingerprint(splits),
        "input_shape": list(splits.input_shape),
        "num_classes": splits.num_classes,
        "config": dataclasses.asdict(config),
        "augmentation": None if augmentation is None else dataclasses.asdict(augmentation),
        "seed": TEACHER_SEED,
        "architecture": _ARCHITECTURE_VERSION,
    }


def _fingerprint(splits: Splits) -> str:
    """SHA-256 of the training labels and of every 997th input value: tells datasets apart."""
    digest = hashlib.sha256(splits.y_train.cpu().numpy().tobytes())
    digest.update(splits.x_train.flatten()[::997].cpu().numpy().tobytes())
    return digest.hexdigest()


def load_or_train_teacher(
    name: str,
    network: Network,
    splits: Splits,
    config: TrainConfig,
    augmentation: Augmentation | None,
    cache: Path,
    on_epoch: EpochCallback | None = None,
) -> tuple[FeatureClassifier, bool]:
    """The teacher ``network`` (called ``name``) for ``splits``, from ``cache`` when it was
    trained with the same key.

    Otherwise a fresh teacher is trained with cross-entropy (seed :data:`TEACHER_SEED`) and saved
    to ``cache``. Returns the teacher (in eval mode, frozen, on the data's device) and whether it
    came from the cache.
    """
    device = splits.x_train.device
    key = cache_key(name, network, splits, config, augmentation)
    torch.manual_seed(TEACHER_SEED)
    teacher = network.build(splits.input_shape, splits.num_classes, network.width).to(device)
    saved = torch.load(cache, map_location=device, weights_only=True) if cache.is_file() else None
    cached = saved is not None and saved["key"] == key
    if cached:
        teacher.load_state_dict(saved["state_dict"])
    else:
        _fit(teacher, network.max_norm, splits, config, augmentation, on_epoch)
        cache.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"key": key, "state_dict": teacher.state_dict()}, cache)
    teacher.eval().requires_grad_(False)
    return teacher, cached


def _fit(
    teacher: FeatureClassifier,
    max_norm: float | None,
    splits: Splits,
    config: TrainConfig,
    augmentation: Augmentation | None,
    on_epoch: EpochCallback | None,
) -> None:
    optimizer = torch.optim.AdamW(
        teacher.parameters(), lr=config.lr, weight_decay=config.weight_decay
    )
    if max_norm is not None:
        layers = [module for module in teacher.modules() if isinstance(module, nn.Linear)]
        optimizer.register_step_post_hook(lambda *_: _clip_rows(layers, max_norm))
    train(
        teacher,
        TaskObjective(),
        FixedSum(optimizer, [1.0]),
        splits,
        config,
        TEACHER_SEED,
        augmentation,
        on_epoch,
    )


@torch.no_grad()
def _clip_rows(layers: list[nn.Linear], max_norm: float) -> None:
    """The max-norm constraint (Srivastava et al. 2014, §5.1): every unit's incoming weight
    vector w (a row of the weight) is scaled back onto the ball ‖w‖₂ ≤ ``max_norm``."""
    for layer in layers:
        norms = layer.weight.norm(dim=1, keepdim=True)
        layer.weight.mul_(norms.clamp(max=max_norm) / norms.clamp_min(1e-12))
