"""The main job: train a teacher, then every method for every seed, and write the results.

Each seed fixes the student's initialisation (and the projector's), the batch order and the
augmentation, identically for every method; all methods train for the same epochs with the same
optimizer settings. The reported accuracy is the test accuracy after the last epoch.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from gradbalance.experiments.augment import default_augmentation
from gradbalance.experiments.config import DistillConfig
from gradbalance.experiments.data import Splits, load_dataset
from gradbalance.experiments.methods import MethodSettings, build, parse_method
from gradbalance.experiments.models import FeatureClassifier, make_student
from gradbalance.experiments.plots import write_plots
from gradbalance.experiments.report import history_document, summarize, write_json
from gradbalance.experiments.teacher import (
    load_or_train_teacher,
    teacher_accuracy,
    teacher_schedule,
)
from gradbalance.experiments.training import History, TrainConfig, train

__all__ = ["Outcome", "run_distill"]


@dataclass(frozen=True)
class Outcome:
    """What a run wrote: the ``results.json`` document and the paths of its files."""

    results: dict[str, Any]
    files: list[Path]


def run_distill(config: DistillConfig, command: str) -> Outcome:
    """Run the experiment of ``config`` and write ``results.json``, ``history.json`` and plots.

    Args:
        config: the experiment.
        command: the command line that started it, stored in ``results.json``.
    """
    start = time.perf_counter()
    splits = _load(config)
    config.out.mkdir(parents=True, exist_ok=True)
    teacher, cached = _teacher(config, splits)
    histories = _train_methods(config, splits, teacher)
    header = {
        "dataset": config.dataset,
        "command": command,
        "seeds": list(range(config.seeds)),
        "epochs": config.epochs,
        "teacher_cached": cached,
        "config": _jsonable(config),
    }
    results = summarize(histories, header, teacher_accuracy(teacher, splits))
    results["wall_time_s"] = time.perf_counter() - start
    history = history_document(histories)
    files = [config.out / "results.json", config.out / "history.json"]
    write_json(results, files[0])
    write_json(history, files[1])
    files += write_plots(history, results["teacher_accuracy"], config.out)
    return Outcome(results, files)


def _load(config: DistillConfig) -> Splits:
    splits = load_dataset(config.dataset, config.data_dir)
    return splits.subset(config.train_size, config.test_size).to(config.device)


def _teacher(config: DistillConfig, splits: Splits) -> tuple[FeatureClassifier, bool]:
    schedule = teacher_schedule(config.teacher_epochs)
    with _bar(config, config.teacher_epochs, "teacher") as bar:
        teacher, cached = load_or_train_teacher(
            splits,
            schedule,
            default_augmentation(config.dataset),
            config.out / f"teacher-{config.dataset}.pt",
            on_epoch=lambda _, accuracy: _advance(bar, accuracy),
        )
        if cached:
            bar.set_description("teacher loaded from cache")
    return teacher, cached


def _train_methods(
    config: DistillConfig, splits: Splits, teacher: FeatureClassifier
) -> dict[str, list[History]]:
    """Every method for every seed; the seed loop is outside, so partial runs cover all methods."""
    methods = [parse_method(name) for name in config.methods]
    schedule = TrainConfig(config.epochs, config.batch_size, config.lr, config.weight_decay)
    settings = MethodSettings(
        config.lr, config.weight_decay, config.temperature, config.stats_every, config.normalize
    )
    augmentation = default_augmentation(config.dataset)
    histories: dict[str, list[History]] = {method.name: [] for method in methods}
    total = config.seeds * len(methods) * config.epochs
    with _bar(config, total, "distill") as bar:
        for seed in range(config.seeds):
            for method in methods:
                bar.set_description(f"{method.name} seed {seed}")
                torch.manual_seed(seed)
                student = make_student(splits.input_shape, splits.num_classes).to(config.device)
                objectives, update = build(method, student, teacher, settings)
                history = train(
                    student,
                    objectives,
                    update,
                    splits,
                    schedule,
                    seed,
                    augmentation,
                    on_epoch=lambda _, accuracy: _advance(bar, accuracy),
                )
                histories[method.name].append(history)
    return histories


def _bar(config: DistillConfig, total: int, description: str) -> tqdm:
    return tqdm(total=total, desc=description, unit="epoch", disable=not config.progress)


def _advance(bar: tqdm, accuracy: float) -> None:
    bar.set_postfix(test_acc=f"{accuracy:.3f}", refresh=False)
    bar.update()


def _jsonable(config: DistillConfig) -> dict[str, Any]:
    fields = dataclasses.asdict(config)
    return {name: _plain(value) for name, value in fields.items()}


def _plain(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, Sequence) and not isinstance(value, str):
        return list(value)
    return value
