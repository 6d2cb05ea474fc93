"""Datasets that need no download: MNIST-1D (generated), scikit-learn digits, a local CIFAR-100.

Every loader returns a :class:`Splits` of in-memory tensors: the experiments are small enough to
keep a whole dataset on the device and index batches directly, without a ``DataLoader``.
"""

from __future__ import annotations

import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

__all__ = ["DATASETS", "Splits", "find_cifar100", "load_dataset"]

DATASETS = ("mnist1d", "digits", "cifar100")

# Seed of the deterministic train/test split of the digits dataset (it ships unsplit).
_DIGITS_SPLIT_SEED = 0
_DIGITS_TEST_FRACTION = 0.2
_CIFAR_FOLDER = "cifar-100-python"


@dataclass(frozen=True)
class Splits:
    """A classification dataset as float inputs and integer labels, already standardised.

    Inputs are ``(N, C, L)`` signals or ``(N, C, H, W)`` images; labels are ``(N,)`` int64.
    """

    name: str
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    num_classes: int

    @property
    def input_shape(self) -> tuple[int, ...]:
        """Shape of one input, without the batch dimension."""
        return tuple(self.x_train.shape[1:])

    def subset(self, train_size: int | None, test_size: int | None) -> Splits:
        """The first ``train_size`` training and ``test_size`` test examples (``None``: all)."""
        return Splits(
            name=self.name,
            x_train=self.x_train[:train_size],
            y_train=self.y_train[:train_size],
            x_test=self.x_test[:test_size],
            y_test=self.y_test[:test_size],
            num_classes=self.num_classes,
        )

    def to(self, device: torch.device | str) -> Splits:
        """The same splits on ``device``."""
        return Splits(
            name=self.name,
            x_train=self.x_train.to(device),
            y_train=self.y_train.to(device),
            x_test=self.x_test.to(device),
            y_test=self.y_test.to(device),
            num_classes=self.num_classes,
        )


def load_dataset(name: str, data_dir: Path | None = None) -> Splits:
    """Load one of :data:`DATASETS`; ``cifar100`` reads :func:`find_cifar100` of ``data_dir``."""
    if name == "mnist1d":
        return load_mnist1d()
    if name == "digits":
        return load_digits()
    if name == "cifar100":
        if data_dir is None:
            raise ValueError("the cifar100 dataset needs a data directory")
        return load_cifar100(find_cifar100(data_dir))
    raise ValueError(f"unknown dataset {name!r}; choose from {', '.join(DATASETS)}")


def load_mnist1d() -> Splits:
    """MNIST-1D with the package's default arguments: 4000/1000 signals of length 40, 10 classes.

    The generator is deterministic (its own seed, 42) and already centres and scales the signals.
    It reseeds NumPy's global generator, so the global state is restored afterwards.
    """
    from mnist1d.data import get_dataset_args, make_dataset

    state = np.random.get_state()
    try:
        data = make_dataset(get_dataset_args())
    finally:
        np.random.set_state(state)
    return Splits(
        name="mnist1d",
        x_train=_as_float(data["x"])[:, None, :],
        y_train=torch.as_tensor(data["y"], dtype=torch.int64),
        x_test=_as_float(data["x_test"])[:, None, :],
        y_test=torch.as_tensor(data["y_test"], dtype=torch.int64),
        num_classes=10,
    )


def load_digits() -> Splits:
    """scikit-learn's bundled 8×8 digits, split 80/20 (stratified, fixed seed), standardised."""
    from sklearn.datasets import load_digits as sklearn_digits
    from sklearn.model_selection import train_test_split

    bunch = sklearn_digits()
    x_train, x_test, y_train, y_test = train_test_split(
        bunch.images,
        bunch.target,
        test_size=_DIGITS_TEST_FRACTION,
        random_state=_DIGITS_SPLIT_SEED,
        stratify=bunch.target,
    )
    x_train, x_test = _standardise(_as_float(x_train)[:, None], _as_float(x_test)[:, None])
    return Splits(
        name="digits",
        x_train=x_train,
        y_train=torch.as_tensor(y_train, dtype=torch.int64),
        x_test=x_test,
        y_test=torch.as_tensor(y_test, dtype=torch.int64),
        num_classes=10,
    )


def find_cifar100(data_dir: Path) -> Path:
    """The ``cifar-100-python`` folder: ``data_dir`` itself or its child of that name.

    Raises:
        FileNotFoundError: neither holds both the ``train`` and ``test`` files.
    """
    for folder in (Path(data_dir) / _CIFAR_FOLDER, Path(data_dir)):
        if (folder / "train").is_file() and (folder / "test").is_file():
            return folder
    raise FileNotFoundError(
        f"no CIFAR-100 in {data_dir}: expected {_CIFAR_FOLDER}/train and {_CIFAR_FOLDER}/test "
        "(torchvision's python format)"
    )


def load_cifar100(folder: Path) -> Splits:
    """CIFAR-100 in torchvision's python format.

    ``folder`` holds the pickled dicts ``train`` and ``test`` with ``b"data"`` (uint8, N × 3072)
    and ``b"fine_labels"``. Images are standardised per channel with the training-set statistics.
    """
    x_train, y_train = _read_cifar_file(folder / "train")
    x_test, y_test = _read_cifar_file(folder / "test")
    x_train, x_test = _standardise(x_train, x_test, dims=(0, 2, 3))
    return Splits("cifar100", x_train, y_train, x_test, y_test, num_classes=100)


def _read_cifar_file(path: Path) -> tuple[torch.Tensor, torch.Tensor]:
    with open(path, "rb") as handle:
        entry = pickle.load(handle, encoding="bytes")
    data = np.asarray(entry[b"data"], dtype=np.uint8)
    if data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise ValueError(f"{path}: b'data' must be uint8 of shape (N, 3072), got {data.shape}")
    images = _as_float(data.reshape(-1, 3, 32, 32)) / 255.0
    labels = torch.as_tensor(np.asarray(entry[b"fine_labels"]), dtype=torch.int64)
    if labels.shape != (images.shape[0],):
        raise ValueError(f"{path}: {labels.numel()} labels for {images.shape[0]} images")
    return images, labels


def _as_float(array: np.ndarray) -> torch.Tensor:
    return torch.as_tensor(np.ascontiguousarray(array), dtype=torch.float32)


def _standardise(
    train: torch.Tensor, test: torch.Tensor, dims: tuple[int, ...] | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Centre and scale both splits with the training mean and std (over ``dims``; all if None)."""
    dims = tuple(range(train.ndim)) if dims is None else dims
    mean = train.mean(dim=dims, keepdim=True)
    std = train.std(dim=dims, keepdim=True).clamp_min(1e-8)
    return (train - mean) / std, (test - mean) / std
