"""CIFAR-100's official python version, read without running anything in it, and its download.

    Alex Krizhevsky. "Learning Multiple Layers of Features from Tiny Images". 2009.
    https://www.cs.toronto.edu/~kriz/cifar.html

The distribution, ``cifar-100-python.tar.gz``, holds ``cifar-100-python/{train,test,meta}``:
pickles written by Python 2 (``cPickle``, protocol 2). ``train`` and ``test`` are dicts with
``data`` (a numpy uint8 array, N × 3072: the 1024 red, then green, then blue pixels of a 32 × 32
image, row by row), ``fine_labels`` and ``coarse_labels`` (lists of ints), ``filenames`` and
``batch_label``; ``meta`` has ``fine_label_names`` and ``coarse_label_names``.

A pickle can call any function it names, so a plain ``pickle.load`` of a file from outside runs
whatever the file says. :class:`CifarUnpickler` admits only the four globals these files name —
numpy's array reconstruction — and refuses every other before it is called.
"""

from __future__ import annotations

import hashlib
import io
import pickle
import tarfile
import tempfile
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path, PurePosixPath
from typing import IO, Any, Literal

import numpy as np
import torch

__all__ = [
    "CIFAR100_ARCHIVE",
    "CIFAR100_FOLDER",
    "CIFAR100_MD5",
    "CIFAR100_URL",
    "Cifar100",
    "CifarFormatError",
    "CifarSplit",
    "CifarUnpickler",
    "download_cifar100",
    "load_cifar100",
    "read_cifar_pickle",
]

CIFAR100_URL = "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz"
CIFAR100_MD5 = "eb9058c3a382ffc7106e4002c42a8d85"  # published on the page above
CIFAR100_ARCHIVE = "cifar-100-python.tar.gz"
CIFAR100_FOLDER = "cifar-100-python"
NUM_CLASSES = 100
_PIXELS = 3 * 32 * 32
Encoding = Literal["bytes", "latin1"]

# numpy's array reconstruction function, under both of its module names: numpy < 2 and the
# Python-2 files say numpy.core.multiarray, numpy ≥ 2 numpy._core.multiarray. Taken from an
# array's own __reduce__, which returns it, so that no deprecated module has to be imported.
_RECONSTRUCT = np.empty(0).__reduce__()[0]
_ADMITTED = {
    ("numpy.core.multiarray", "_reconstruct"): _RECONSTRUCT,
    ("numpy._core.multiarray", "_reconstruct"): _RECONSTRUCT,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
}


class CifarFormatError(ValueError):
    """A CIFAR-100 file that is missing, truncated, malformed or refused; the message names it."""


@dataclass(frozen=True)
class CifarSplit:
    """Images ``(N, 3, 32, 32)`` uint8 (channels red, green, blue) and fine labels ``(N,)`` int64
    in ``[0, 100)``."""

    images: torch.Tensor
    labels: torch.Tensor


@dataclass(frozen=True)
class Cifar100:
    """The training and test splits and the 100 fine class names, in label order."""

    train: CifarSplit
    test: CifarSplit
    class_names: tuple[str, ...]


class CifarUnpickler(pickle.Unpickler):
    """An unpickler that builds containers, strings, numbers and numpy arrays, and nothing else.

    ``find_class`` is where a pickle gets hold of a callable (opcodes GLOBAL and STACK_GLOBAL);
    it returns only numpy's ``_reconstruct``, ``ndarray`` and ``dtype`` and raises for any other
    name, so a file that names ``os.system`` or ``builtins.eval`` stops there, before the call.
    """

    def __init__(self, file: IO[bytes], source: str, encoding: Encoding = "bytes") -> None:
        super().__init__(file, encoding=encoding)
        self.source = source

    def find_class(self, module: str, name: str) -> Any:
        admitted = _ADMITTED.get((module, name))
        if admitted is None:
            raise CifarFormatError(
                f"{self.source}: refused to load the global {module}.{name}: a CIFAR-100 file "
                "holds only containers, strings, numbers and numpy arrays (a tampered file?)"
            )
        return admitted


def read_cifar_pickle(file: IO[bytes], source: str, encoding: Encoding = "bytes") -> Any:
    """Unpickle ``file`` with :class:`CifarUnpickler`; ``source`` names it in errors.

    ``encoding`` is how Python 2's byte strings come back: ``"bytes"`` as ``bytes`` or
    ``"latin1"`` as ``str``.

    Raises:
        ValueError: another ``encoding`` (it would mangle the arrays' raw bytes).
        CifarFormatError: a refused global, or a truncated or corrupt pickle.
    """
    if encoding not in ("bytes", "latin1"):
        raise ValueError(f"encoding must be 'bytes' or 'latin1', not {encoding!r}")
    try:
        return CifarUnpickler(file, source, encoding).load()
    except CifarFormatError:
        raise
    except Exception as error:  # EOFError, UnpicklingError, ValueError, … of a damaged file
        raise CifarFormatError(
            f"{source}: not a readable CIFAR-100 pickle (truncated or corrupt): "
            f"{type(error).__name__}: {error}"
        ) from error


def load_cifar100(data_dir: str | Path, encoding: Encoding = "bytes") -> Cifar100:
    """CIFAR-100 from ``data_dir``: its ``cifar-100-python/`` folder, ``data_dir`` itself if it
    is that folder, or the archive ``cifar-100-python.tar.gz`` as distributed (``data_dir``'s,
    or ``data_dir`` itself), read in memory without extracting it. Any number of rows.

    Raises:
        FileNotFoundError: none of these exists.
        CifarFormatError: a file is missing from the folder or archive, truncated, malformed, or
            holds anything but the format's data (the message names the file).
    """
    data_dir = Path(data_dir)
    for folder in (data_dir / CIFAR100_FOLDER, data_dir):
        if folder.is_dir() and any((folder / name).exists() for name in ("train", "test")):
            return _parse(partial(_read_file, folder, encoding))
    for archive in (data_dir / CIFAR100_ARCHIVE, data_dir):
        if archive.is_file():
            with _open_archive(archive) as tar:
                return _parse(partial(_read_member, tar, archive, encoding))
    raise FileNotFoundError(
        f"no CIFAR-100 in {data_dir}: expected {CIFAR100_FOLDER}/{{train,test,meta}} or "
        f"{CIFAR100_ARCHIVE} (the python version, {CIFAR100_URL}; --download fetches it)"
    )


def _parse(read: Callable[[str], tuple[Any, str]]) -> Cifar100:
    """The splits and class names from ``read(name)`` → (what the file holds, its name)."""
    meta, meta_source = read("meta")
    names = _field(meta, "fine_label_names", meta_source)
    if not isinstance(names, list) or len(names) != NUM_CLASSES:
        raise CifarFormatError(f"{meta_source}: fine_label_names must be a list of 100 names")
    return Cifar100(
        train=_split(*read("train")),
        test=_split(*read("test")),
        class_names=tuple(_text(name) for name in names),
    )


def _read_file(folder: Path, encoding: Encoding, name: str) -> tuple[Any, str]:
    path = folder / name
    if not path.is_file():
        raise CifarFormatError(f"{path}: missing (CIFAR-100 has train, test and meta)")
    with open(path, "rb") as handle:
        return read_cifar_pickle(handle, str(path), encoding), str(path)


def _open_archive(path: Path) -> tarfile.TarFile:
    try:
        return tarfile.open(path, "r:*")
    except (tarfile.TarError, OSError, EOFError) as error:
        raise CifarFormatError(f"{path}: not a readable tar archive: {error}") from error


def _read_member(
    tar: tarfile.TarFile, archive: Path, encoding: Encoding, name: str
) -> tuple[Any, str]:
    """``cifar-100-python/<name>`` of the archive, read into memory; members are only read, never
    written to disk, but an archive with an absolute or ``..`` path is refused as tampered."""
    source = f"{archive}:{CIFAR100_FOLDER}/{name}"
    try:
        members = {member.name: member for member in tar.getmembers()}
        for member_name in members:
            path = PurePosixPath(member_name)
            if path.is_absolute() or ".." in path.parts:
                raise CifarFormatError(f"{archive}: refused member {member_name!r} (unsafe path)")
        member = members.get(f"{CIFAR100_FOLDER}/{name}")
        if member is None or not member.isfile():
            raise CifarFormatError(f"{source}: missing from the archive")
        data = tar.extractfile(member).read()
    except (tarfile.TarError, OSError, EOFError) as error:  # a truncated or corrupt archive
        raise CifarFormatError(f"{source}: cannot be read: {error}") from error
    return read_cifar_pickle(io.BytesIO(data), source, encoding), source


def _field(entry: Any, key: str, source: str) -> Any:
    """``entry[key]`` whether Python 2's strings came back as bytes or as str."""
    if not isinstance(entry, dict):
        raise CifarFormatError(f"{source}: expected a dict, found {type(entry).__name__}")
    for candidate in (key, key.encode()):
        if candidate in entry:
            return entry[candidate]
    raise CifarFormatError(f"{source}: no {key!r} entry")


def _split(entry: Any, source: str) -> CifarSplit:
    data = _field(entry, "data", source)
    if not (
        isinstance(data, np.ndarray)
        and data.dtype == np.uint8
        and data.ndim == 2
        and data.shape[1] == _PIXELS
    ):
        found = f"{data.dtype} {data.shape}" if isinstance(data, np.ndarray) else type(data)
        raise CifarFormatError(f"{source}: data must be a uint8 array (N, 3072), found {found}")
    labels = _field(entry, "fine_labels", source)
    if not (isinstance(labels, list) and all(type(label) is int for label in labels)):
        raise CifarFormatError(f"{source}: fine_labels must be a list of ints")
    labels = torch.tensor(labels, dtype=torch.int64)
    if labels.shape != (len(data),):
        raise CifarFormatError(f"{source}: {len(labels)} fine_labels for {len(data)} images")
    if len(labels) and not 0 <= int(labels.min()) <= int(labels.max()) < NUM_CLASSES:
        raise CifarFormatError(f"{source}: fine_labels outside [0, {NUM_CLASSES})")
    images = torch.from_numpy(np.ascontiguousarray(data).reshape(-1, 3, 32, 32))
    return CifarSplit(images, labels)


def _text(value: Any) -> str:
    return value.decode("latin1") if isinstance(value, bytes) else str(value)


def download_cifar100(
    data_dir: str | Path,
    url: str = CIFAR100_URL,
    md5: str = CIFAR100_MD5,
    timeout: float = 10.0,
) -> Path:
    """Fetch ``cifar-100-python.tar.gz`` into ``data_dir`` (unless a copy with the right md5 is
    already there), check its md5 and return its path. :func:`load_cifar100` reads it as is.

    ``timeout`` (seconds) bounds the connection and each read, so that without a network this
    fails in seconds instead of hanging.

    Raises:
        ConnectionError: the download failed (no network, refused, timed out, HTTP error).
        CifarFormatError: what came has another md5 than ``md5``.
    """
    data_dir = Path(data_dir)
    target = data_dir / CIFAR100_ARCHIVE
    if target.is_file() and _md5(target) == md5:
        return target
    data_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=data_dir, suffix=".part", delete=False) as part:
        partial = Path(part.name)
        try:
            with urllib.request.urlopen(url, timeout=timeout) as response:
                while chunk := response.read(1 << 20):
                    part.write(chunk)
        except (urllib.error.URLError, OSError) as error:
            partial.unlink()
            raise ConnectionError(
                f"could not download CIFAR-100 from {url}: {error}. Without a network, fetch "
                f"{CIFAR100_ARCHIVE} elsewhere (md5 {md5}) and put it in {data_dir}"
            ) from error
    found = _md5(partial)
    if found != md5:
        partial.unlink()
        raise CifarFormatError(f"{url}: md5 {found}, expected {md5} (a damaged download?)")
    partial.replace(target)
    return target


def _md5(path: Path) -> str:
    digest = hashlib.md5()
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()
