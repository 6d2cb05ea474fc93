"""CIFAR-100 files in the official format, generated: what the CIFAR tests read.

The official files are Python 2 ``cPickle`` dumps at protocol 2. Python 3's pickler cannot write
them as they are (it writes ``bytes`` through ``_codecs.encode`` below protocol 3, and numpy ≥ 2
names ``numpy._core``), so :func:`python2_pickle` writes the opcodes Python 2 wrote, as in the
distributed files: ``SHORT_BINSTRING`` / ``BINSTRING`` strings, ``BININT*`` ints, and an array as
``numpy.core.multiarray._reconstruct(numpy.ndarray, (0,), 'b')`` then ``BUILD`` with
``(1, shape, dtype('u1'), False, raw bytes)``, the dtype as ``numpy.dtype('u1', 0, 1)`` then
``BUILD`` with ``(3, '|', None, None, None, -1, -1, 0)``.
"""

from __future__ import annotations

import io
import pickle
import struct
import tarfile
from pathlib import Path

import numpy as np

FOLDER = "cifar-100-python"


def python2_pickle(value: object) -> bytes:
    """``value`` (dicts, lists, tuples, ints, bytes as Python 2 ``str``, uint8 arrays) pickled as
    Python 2's ``cPickle.dumps(value, 2)`` pickles it (without memo opcodes)."""
    return pickle.PROTO + b"\x02" + _save(value) + pickle.STOP


def _save(value: object) -> bytes:
    if isinstance(value, dict):
        items = b"".join(_save(key) + _save(item) for key, item in value.items())
        return pickle.EMPTY_DICT + pickle.MARK + items + pickle.SETITEMS
    if isinstance(value, list):
        return pickle.EMPTY_LIST + pickle.MARK + b"".join(map(_save, value)) + pickle.APPENDS
    if isinstance(value, tuple):  # protocol 2 writes tuples of up to 3 items with TUPLE1-3
        items = b"".join(map(_save, value))
        if len(value) <= 3:
            return (
                items
                + (pickle.EMPTY_TUPLE, pickle.TUPLE1, pickle.TUPLE2, pickle.TUPLE3)[len(value)]
            )
        return pickle.MARK + items + pickle.TUPLE
    if value is None:
        return pickle.NONE
    if isinstance(value, bool):
        return pickle.NEWTRUE if value else pickle.NEWFALSE
    if isinstance(value, int):
        return _int(value)
    if isinstance(value, bytes):
        if len(value) < 256:
            return pickle.SHORT_BINSTRING + bytes([len(value)]) + value
        return pickle.BINSTRING + struct.pack("<i", len(value)) + value
    if isinstance(value, np.ndarray):
        return _array(value)
    raise TypeError(f"cannot write {type(value).__name__}")


def _int(value: int) -> bytes:
    if 0 <= value < 256:
        return pickle.BININT1 + bytes([value])
    if 0 <= value < 65536:
        return pickle.BININT2 + struct.pack("<H", value)
    return pickle.BININT + struct.pack("<i", value)


def _global(module: str, name: str) -> bytes:
    return pickle.GLOBAL + f"{module}\n{name}\n".encode()


def _array(array: np.ndarray) -> bytes:
    assert array.dtype == np.uint8
    dtype = (
        _global("numpy", "dtype")
        + _save((b"u1", 0, 1))
        + pickle.REDUCE
        + _save((3, b"|", None, None, None, -1, -1, 0))
        + pickle.BUILD
    )
    state = pickle.MARK + _int(1) + _save(array.shape) + dtype + pickle.NEWFALSE
    state += _save(np.ascontiguousarray(array).tobytes()) + pickle.TUPLE
    return (
        _global("numpy.core.multiarray", "_reconstruct")
        + _global("numpy", "ndarray")
        + _save((0,))
        + _save(b"b")
        + pickle.TUPLE3  # the arguments (ndarray, (0,), 'b')
        + pickle.REDUCE
        + state
        + pickle.BUILD
    )


def fine_names() -> list[bytes]:
    return [f"class{index:02d}".encode() for index in range(100)]


def split_dict(images: np.ndarray, labels: list[int], name: bytes) -> dict:
    """A ``train`` or ``test`` file's dict: images ``(N, 3, 32, 32)`` uint8 flattened to
    ``(N, 3072)`` in channel-major order, as the official files lay them out."""
    count = len(labels)
    return {
        b"filenames": [f"image_{index}.png".encode() for index in range(count)],
        b"batch_label": b"training batch 1 of 1" if name == b"train" else b"testing batch 1 of 1",
        b"fine_labels": list(labels),
        b"coarse_labels": [label // 5 for label in labels],
        b"data": images.reshape(count, 3 * 32 * 32),
    }


def random_split(count: int, seed: int) -> tuple[np.ndarray, list[int]]:
    generator = np.random.default_rng(seed)
    images = generator.integers(0, 256, size=(count, 3, 32, 32), dtype=np.uint8)
    return images, [int(label) for label in generator.integers(0, 100, size=count)]


def cifar_files(train: int = 12, test: int = 5, seed: int = 0) -> dict[str, bytes]:
    """The three files' bytes by name, with random images and labels."""
    meta = {b"fine_label_names": fine_names(), b"coarse_label_names": [b"s"] * 20}
    return {
        "train": python2_pickle(split_dict(*random_split(train, seed), b"train")),
        "test": python2_pickle(split_dict(*random_split(test, seed + 1), b"test")),
        "meta": python2_pickle(meta),
    }


def write_cifar_folder(root: Path, files: dict[str, bytes] | None = None) -> Path:
    """``root/cifar-100-python/{train,test,meta}``; returns ``root``."""
    folder = root / FOLDER
    folder.mkdir(parents=True, exist_ok=True)
    for name, data in (cifar_files() if files is None else files).items():
        (folder / name).write_bytes(data)
    return root


def write_cifar_archive(path: Path, files: dict[str, bytes] | None = None) -> Path:
    """``cifar-100-python.tar.gz`` at ``path``, laid out as the distributed one."""
    with tarfile.open(path, "w:gz") as tar:
        for name, data in (cifar_files() if files is None else files).items():
            info = tarfile.TarInfo(f"{FOLDER}/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def code_running_pickle(module: str, name: str, argument: str) -> bytes:
    """A protocol-2 pickle that calls ``module.name(argument)`` when loaded, inside the dict a
    CIFAR-100 file holds."""
    call = _global(module, name) + _save((argument.encode(),)) + pickle.REDUCE
    return (
        pickle.PROTO + b"\x02" + pickle.EMPTY_DICT + _save(b"data") + call + pickle.SETITEM + b"."
    )
