"""The main job: train a teacher, then every method for every seed, and write the results.

Each seed fixes the student's initialisation (and the projector's), the batch order and the
augmentation, identically for every method; all methods train for the same epochs with the same
optimizer settings. The reported accuracy and errors are those on the test set after the last
epoch. Runs (method × seed) are independent, so ``jobs`` processes train them side by side; each
run seeds itself, so the results do not depend on ``jobs``.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import multiprocessing
import os
import subprocess
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from gradbalance.experiments.cifar_models import load_teacher_checkpoint
from gradbalance.experiments.config import DistillConfig
from gradbalance.experiments.data import Splits, with_label_noise
from gradbalance.experiments.datasets import dataset, load_dataset, make_student, make_teacher
from gradbalance.experiments.methods import MethodSettings, TeacherTargets, build, parse_method
from gradbalance.experiments.models import FeatureClassifier
from gradbalance.experiments.plots import write_plots
from gradbalance.experiments.report import history_document, summarize, write_json
from gradbalance.experiments.teacher import (
    load_or_train_teacher,
    teacher_schedule,
)
from gradbalance.experiments.training import History, TrainConfig, errors, train

__all__ = ["Outcome", "RunStore", "run_distill"]

_MAX_DEFAULT_JOBS = 8


@dataclass(frozen=True)
class Outcome:
    """What a run wrote: the ``results.json`` document and the paths of its files."""

    results: dict[str, Any]
    files: list[Path]


def run_distill(config: DistillConfig, command: str) -> Outcome:
    """Run the experiment of ``config`` and write ``results.json``, ``history.json`` and plots.

    Args:
        config: the experiment (``None`` fields take the dataset's defaults).
        command: the command line that started it, stored in ``results.json``.
    """
    start = time.perf_counter()
    config = config.resolved()
    config.out.mkdir(parents=True, exist_ok=True)
    selection = _select(config, command)
    config = dataclasses.replace(config, methods=selection.methods, seeds_for=selection.seeds_for)
    splits = _load(config)
    torch.set_num_threads(config.threads * _jobs(config))  # the teacher gets all the jobs' cores
    teacher, cached = _teacher(config, splits)
    torch.set_num_threads(config.threads)
    most = max(config.seed_count(name) for name in config.methods)
    runs = [
        (name, seed)
        for seed in range(most)
        for name in config.methods
        if seed < config.seed_count(name)
    ]
    store = RunStore(config, _commit())
    histories = _train_runs(config, runs, splits, teacher, store)
    teacher_errors = errors(teacher, splits.x_test, splits.y_test)
    header = {
        "dataset": config.dataset,
        "command": command,
        "seeds": list(range(most)),
        "evaluated_on": "validation" if config.validation else "test",
        "commit": store.commit,
        "epochs": config.epochs,
        "test_size": len(splits.y_test),
        "teacher_cached": cached,
        "teacher_errors": teacher_errors,
        "networks": _networks(config, splits, teacher),
        "config": _jsonable(config),
    }
    preset = config.preset_spec
    rival = None if preset is None else preset.rival
    results = summarize(histories, header, 1 - teacher_errors / len(splits.y_test), rival)
    if selection.record:
        results["selection"] = selection.record
    if preset is not None and preset.published is not None:
        results["published"] = preset.published
    results["wall_time_s"] = time.perf_counter() - start
    history = history_document(histories)
    files = [config.out / "results.json", config.out / "history.json"]
    write_json(results, files[0])
    write_json(history, files[1])
    caption = f"{command} (commit {results['commit']})"
    files += write_plots(history, results, config.out, caption)
    return Outcome(results, files)


def _networks(
    config: DistillConfig, splits: Splits, teacher: FeatureClassifier
) -> dict[str, dict[str, Any]]:
    """The teacher's and the student's names and parameter counts."""
    student = make_student(
        config.dataset, splits.input_shape, splits.num_classes, config.student_width, config.student
    )
    return {
        kind: {"name": name, "parameters": sum(p.numel() for p in network.parameters())}
        for kind, name, network in (
            ("teacher", config.teacher, teacher),
            ("student", config.student, student),
        )
    }


def _commit() -> str:
    """The checkout's ``git describe --always --dirty``, or ``"unknown"`` outside a checkout."""
    try:
        done = subprocess.run(
            ["git", "describe", "--always", "--dirty"],
            cwd=Path(__file__).parent,
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return done.stdout.strip() or "unknown"


def _load(config: DistillConfig) -> Splits:
    splits = load_dataset(config.dataset, config.data_dir)
    if config.validation is not None:
        splits = splits.validation(config.validation)
    return splits.subset(config.train_size, config.test_size).to(config.device)


@dataclass(frozen=True)
class _Chosen:
    """The methods and the per-method seeds with every selection slot replaced by its chosen
    candidate, and what ``results.json`` records of each choice (``"selection"``)."""

    methods: tuple[str, ...]
    seeds_for: tuple[tuple[str, int], ...]
    record: dict[str, Any]


def _select(config: DistillConfig, command: str) -> _Chosen:
    """Run the preset's selections: every candidate on the held-out end of the training set
    (a study of its own in ``<out>/selection``, its runs stored and reused), and each slot's
    candidate with the fewest mean validation errors in the slot's place."""
    selections = config.selections
    if not selections:
        return _Chosen(config.methods, config.seeds_for, {})
    preset = config.preset_spec
    study = dataclasses.replace(
        config,
        preset=None,
        methods=tuple(name for names in selections.values() for name in names),
        seeds=preset.selection_seeds,
        seeds_for=(),
        validation=preset.validation,
        out=config.out / "selection",
    )
    scores = run_distill(study, f"{command} (selection)").results["methods"]
    chosen, record = {}, {}
    for slot, candidates in selections.items():
        errors = {name: scores[name]["errors_mean"] for name in candidates}
        chosen[slot] = min(candidates, key=errors.__getitem__)  # min keeps the first of ties
        record[slot] = {"chosen": chosen[slot], "validation_errors": errors}
    record.update(
        validation=preset.validation,
        seeds=preset.selection_seeds,
        results=str(study.out / "results.json"),
    )
    return _Chosen(
        tuple(chosen.get(name, name) for name in config.methods),
        tuple((chosen.get(name, name), count) for name, count in config.seeds_for),
        record,
    )


def _teacher_cache(config: DistillConfig) -> Path:
    return config.out / f"teacher-{config.dataset}-{config.teacher}.pt"


def _teacher(config: DistillConfig, splits: Splits) -> tuple[FeatureClassifier, bool]:
    """The teacher: from ``--teacher-checkpoint``, else from the cache, else trained (and
    cached); and whether it was not trained here."""
    spec = dataset(config.dataset)
    network = spec.teachers[config.teacher]
    if config.teacher_checkpoint is not None:
        teacher = make_teacher(
            config.dataset, splits.input_shape, splits.num_classes, config.teacher
        )
        load_teacher_checkpoint(teacher, config.teacher_checkpoint)
        return teacher.to(config.device).eval().requires_grad_(False), True
    with _bar(config, config.teacher_epochs, "teacher") as bar:
        teacher, cached = load_or_train_teacher(
            config.teacher,
            network,
            splits,
            teacher_schedule(network, config.teacher_epochs),
            spec.teacher_augmentation,
            _teacher_cache(config),
            on_epoch=lambda _, accuracy: _advance(bar, accuracy),
        )
        if cached:
            bar.set_description("teacher loaded from cache")
    return teacher, cached


class _Trainer:
    """Trains one (method, seed) run at a time on the students' data (``splits`` with the label
    noise) against ``teacher``."""

    def __init__(self, config: DistillConfig, splits: Splits, teacher: FeatureClassifier) -> None:
        self.config = config
        self.augmentation = dataset(config.dataset).augmentation
        self.splits = with_label_noise(splits, config.label_noise)  # the teacher's were clean
        unaugmented = self.augmentation is None
        self.targets = TeacherTargets(teacher, self.splits.x_train if unaugmented else None)
        self.settings = MethodSettings(
            config.lr,
            config.weight_decay,
            config.temperature,
            config.stats_every,
            config.normalize,
            config.features,
            config.optimizer,
        )
        self.schedule = TrainConfig(
            config.epochs,
            config.batch_size,
            config.lr,
            config.weight_decay,
            config.optimizer,
            config.milestones,
        )

    def __call__(self, name: str, seed: int) -> History:
        config, splits = self.config, self.splits
        torch.manual_seed(seed)
        student = make_student(
            config.dataset,
            splits.input_shape,
            splits.num_classes,
            config.student_width,
            config.student,
        ).to(config.device)
        objectives, update = build(parse_method(name), student, self.targets, self.settings)
        return train(student, objectives, update, splits, self.schedule, seed, self.augmentation)


_worker: _Trainer | None = None  # the trainer of a worker process


def _start_worker(config: DistillConfig) -> None:
    """A worker's trainer, with the data loaded again and the teacher from its cache."""
    global _worker
    torch.set_num_threads(config.threads)
    quiet = dataclasses.replace(config, progress=False)
    splits = _load(quiet)
    _worker = _Trainer(quiet, splits, _teacher(quiet, splits)[0])


def _run_in_worker(name: str, seed: int) -> History:
    assert _worker is not None, "the worker's initializer did not run"
    return _worker(name, seed)


def _train_runs(
    config: DistillConfig,
    runs: Sequence[tuple[str, int]],
    splits: Splits,
    teacher: FeatureClassifier,
    store: RunStore,
) -> dict[str, list[History]]:
    """Every run, here or in ``jobs`` processes, or from ``store`` when it already finished
    with the same settings; histories by method, in seed order."""
    finished = {run: store.load(*run) for run in runs}
    finished = {run: history for run, history in finished.items() if history is not None}
    todo = [run for run in runs if run not in finished]
    with _bar(config, len(todo), "distill", unit="run") as bar:
        for (name, seed), history in _finished_runs(config, todo, splits, teacher):
            store.save(name, seed, history)
            finished[name, seed] = history
            bar.set_postfix(last=f"{name} seed {seed}: {history.final_accuracy:.4f}", refresh=False)
            bar.update()
    return {
        name: [finished[name, seed] for seed in range(config.seed_count(name))]
        for name in config.methods
    }


# Settings that do not change a run's result: where it is written, how runs are scheduled, and
# which other runs the command asks for.
_NOT_IN_RUN_KEY = (
    "methods",
    "seeds",
    "seeds_for",
    "preset",
    "out",
    "jobs",
    "progress",
    "download",
)


class RunStore:
    """Finished runs, one JSON file each in ``<out>/runs/``, so that an interrupted or extended
    study (more methods, more seeds) trains only what is missing.

    A file is reused only when its key — every setting that can change the run (all of
    :class:`DistillConfig` but :data:`_NOT_IN_RUN_KEY`), the method and the seed — is this
    config's; the code's commit is recorded, not keyed: delete the folder after changing what a
    run computes.
    """

    def __init__(self, config: DistillConfig, commit: str) -> None:
        self.folder = config.out / "runs"
        self.commit = commit  # recorded in every run saved
        settings = _jsonable(config)
        self.settings = {k: v for k, v in settings.items() if k not in _NOT_IN_RUN_KEY}

    def _path(self, name: str, seed: int) -> Path:
        return self.folder / f"{name}-seed{seed}.json"

    def _key(self, name: str, seed: int) -> dict[str, Any]:
        return {**self.settings, "method": name, "seed": seed}

    def load(self, name: str, seed: int) -> History | None:
        path = self._path(name, seed)
        if not path.exists():
            return None
        record = json.loads(path.read_text())
        if record.get("key") != self._key(name, seed):
            return None
        return History(**record["history"])

    def save(self, name: str, seed: int, history: History) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        record = {
            "key": self._key(name, seed),
            "commit": self.commit,
            "history": dataclasses.asdict(history),
        }
        self._path(name, seed).write_text(json.dumps(record) + "\n")


def _finished_runs(
    config: DistillConfig,
    runs: Sequence[tuple[str, int]],
    splits: Splits,
    teacher: FeatureClassifier,
) -> Iterator[tuple[tuple[str, int], History]]:
    jobs = min(_jobs(config), len(runs))
    if jobs <= 1:  # also when every run was stored: nothing to start processes for
        trainer = _Trainer(config, splits, teacher)
        for run in runs:
            yield run, trainer(*run)
        return
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(
        jobs, mp_context=context, initializer=_start_worker, initargs=(config,)
    ) as pool:
        futures = {pool.submit(_run_in_worker, *run): run for run in runs}
        for future in concurrent.futures.as_completed(futures):
            yield futures[future], future.result()


def _jobs(config: DistillConfig) -> int:
    if config.jobs is not None:
        return config.jobs
    if torch.device(config.device).type == "cuda":
        return 1
    return max(1, min(len(os.sched_getaffinity(0)) // config.threads, _MAX_DEFAULT_JOBS))


def _bar(config: DistillConfig, total: int, description: str, unit: str = "epoch") -> tqdm:
    return tqdm(total=total, desc=description, unit=unit, disable=not config.progress)


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
