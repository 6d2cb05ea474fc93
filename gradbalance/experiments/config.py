"""The settings of one ``gradbalance distill`` run (no plotting or progress-bar imports here)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from gradbalance.experiments.methods import DEFAULT_METHODS

__all__ = ["DistillConfig"]


@dataclass(frozen=True)
class DistillConfig:
    """Everything ``gradbalance distill`` can be told (see ``gradbalance distill --help``).

    ``batch_size``, ``lr`` and ``weight_decay`` are the students'; the default lr, 1e-2, is the
    best of 3e-3, 6e-3, 1e-2, 2e-2 and 3e-2 for the student alone (see docs/distillation.md).
    """

    dataset: str = "mnist1d"
    methods: tuple[str, ...] = DEFAULT_METHODS
    seeds: int = 3
    epochs: int = 40
    teacher_epochs: int = 30
    batch_size: int = 128
    lr: float = 1e-2
    weight_decay: float = 0.05
    temperature: float = 1.0
    stats_every: int = 10
    normalize: bool | None = None
    train_size: int | None = None
    test_size: int | None = None
    data_dir: Path | None = None
    out: Path = Path("runs/mnist1d")
    device: str = "cpu"
    progress: bool = True
