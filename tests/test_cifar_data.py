"""Reading CIFAR-100's official python files: both encodings, the archive, refusals, download."""

import hashlib
import io
import pickle
import socket
import tarfile

import numpy as np
import pytest
import torch
from cifar_files import (
    FOLDER,
    cifar_files,
    code_running_pickle,
    python2_pickle,
    random_split,
    split_dict,
    write_cifar_archive,
    write_cifar_folder,
)

from gradbalance.experiments.cifar import (
    CIFAR100_ARCHIVE,
    CifarFormatError,
    download_cifar100,
    load_cifar100,
)


def assert_is_generated(dataset, train=12, test=5, seed=0):
    for split, count, split_seed in ((dataset.train, train, seed), (dataset.test, test, seed + 1)):
        images, labels = random_split(count, split_seed)
        assert split.images.dtype == torch.uint8 and split.labels.dtype == torch.int64
        assert split.images.shape == (count, 3, 32, 32)
        assert np.array_equal(split.images.numpy(), images)
        assert split.labels.tolist() == labels
    assert dataset.class_names == tuple(f"class{index:02d}" for index in range(100))


@pytest.mark.parametrize("encoding", ["bytes", "latin1"])
def test_the_folder_loads_with_both_encodings(tmp_path, encoding):
    assert_is_generated(load_cifar100(write_cifar_folder(tmp_path), encoding=encoding))


def test_another_encoding_is_refused(tmp_path):
    with pytest.raises(ValueError, match="encoding must be 'bytes' or 'latin1', not 'ascii'"):
        load_cifar100(write_cifar_folder(tmp_path), encoding="ascii")


def test_the_folder_itself_may_be_given(tmp_path):
    assert_is_generated(load_cifar100(write_cifar_folder(tmp_path) / FOLDER))


def test_the_channels_are_the_files_rgb_planes(tmp_path):
    """A row of ``data`` is 1024 red, then green, then blue values, each plane row by row."""
    row = np.zeros((1, 3072), dtype=np.uint8)
    row[0, 1024 + 32 * 5 + 7] = 200  # green, pixel (5, 7)
    files = cifar_files()
    files["test"] = python2_pickle(split_dict(row.reshape(1, 3, 32, 32), [3], b"test"))
    images = load_cifar100(write_cifar_folder(tmp_path, files)).test.images
    assert images[0, 1, 5, 7] == 200 and images.sum() == 200


@pytest.mark.parametrize("given", ["folder", "file"])
@pytest.mark.parametrize("encoding", ["bytes", "latin1"])
def test_the_archive_as_distributed_loads(tmp_path, given, encoding):
    archive = write_cifar_archive(tmp_path / CIFAR100_ARCHIVE)
    dataset = load_cifar100(tmp_path if given == "folder" else archive, encoding=encoding)
    assert_is_generated(dataset)
    assert not (tmp_path / FOLDER).exists()  # read in memory, not extracted


def test_any_number_of_rows(tmp_path):
    files = cifar_files()
    files["train"] = python2_pickle(split_dict(*random_split(300, 7), b"train"))
    files["test"] = python2_pickle(split_dict(*random_split(0, 8), b"test"))
    dataset = load_cifar100(write_cifar_folder(tmp_path, files))
    assert dataset.train.images.shape == (300, 3, 32, 32)
    assert np.array_equal(dataset.train.images.numpy(), random_split(300, 7)[0])
    assert dataset.test.images.shape == (0, 3, 32, 32) and dataset.test.labels.shape == (0,)


@pytest.mark.parametrize(
    ("module", "name", "command"),
    [
        ("os", "system", "touch {marker}"),
        ("posix", "system", "touch {marker}"),
        ("__builtin__", "eval", "open({marker!r}, 'w').close()"),  # Python 2's builtins
        ("builtins", "exec", "open({marker!r}, 'w').close()"),
    ],
)
def test_a_tampered_file_is_refused_and_runs_nothing(tmp_path, module, name, command):
    marker = tmp_path / "ran"
    files = cifar_files()
    files["train"] = code_running_pickle(module, name, command.format(marker=str(marker)))
    root = write_cifar_folder(tmp_path, files)
    with pytest.raises(CifarFormatError) as error:
        load_cifar100(root)
    assert str(root / FOLDER / "train") in str(error.value)
    assert f"refused to load the global {module}.{name}" in str(error.value)
    assert not marker.exists()


def test_the_payload_of_the_refusal_test_does_run_under_plain_pickle(tmp_path):
    """The control: the same bytes, loaded by an unrestricted unpickler, create the marker."""
    marker = tmp_path / "ran"
    payload = code_running_pickle("os", "system", f"touch {marker}")
    pickle.loads(payload, encoding="bytes")
    assert marker.exists()


def test_a_tampered_archive_member_is_refused(tmp_path):
    marker = tmp_path / "ran"
    files = cifar_files()
    files["meta"] = code_running_pickle("os", "system", f"touch {marker}")
    archive = write_cifar_archive(tmp_path / CIFAR100_ARCHIVE, files)
    with pytest.raises(CifarFormatError, match=r"cifar-100-python/meta: refused .* os\.system"):
        load_cifar100(archive)
    assert not marker.exists()


def test_an_archive_with_a_path_outside_is_refused(tmp_path):
    archive = tmp_path / CIFAR100_ARCHIVE
    write_cifar_archive(archive)
    with tarfile.open(archive, "r:gz") as source:
        members = [(m, source.extractfile(m).read()) for m in source.getmembers()]
    with tarfile.open(archive, "w:gz") as tar:
        for member, data in members:
            tar.addfile(member, io.BytesIO(data))
        evil = tarfile.TarInfo("../../escape")
        evil.size = 1
        tar.addfile(evil, io.BytesIO(b"x"))
    with pytest.raises(CifarFormatError, match=r"refused member '\.\./\.\./escape'"):
        load_cifar100(archive)


def test_a_truncated_file_is_named(tmp_path):
    files = cifar_files()
    files["test"] = files["test"][: len(files["test"]) // 2]
    root = write_cifar_folder(tmp_path, files)
    with pytest.raises(CifarFormatError, match="truncated or corrupt") as error:
        load_cifar100(root)
    assert str(root / FOLDER / "test") in str(error.value)


def test_a_truncated_archive_is_named(tmp_path):
    archive = write_cifar_archive(tmp_path / CIFAR100_ARCHIVE)
    archive.write_bytes(archive.read_bytes()[:-200])
    with pytest.raises(CifarFormatError, match=str(archive)):
        load_cifar100(archive)


def test_a_missing_file_is_named(tmp_path):
    root = write_cifar_folder(tmp_path)
    (root / FOLDER / "meta").unlink()
    with pytest.raises(CifarFormatError, match=r"cifar-100-python/meta: missing"):
        load_cifar100(root)


def test_no_data_at_all_says_what_is_expected(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"no CIFAR-100 in .*--download"):
        load_cifar100(tmp_path)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda d: d.update({b"data": d[b"data"][:, :100]}), r"found uint8 \(12, 100\)"),
        (
            lambda d: d.update({b"data": [1, 2]}),
            "data must be a uint8 array .*found <class 'list'>",
        ),
        (lambda d: d.update({b"fine_labels": d[b"fine_labels"][:-1]}), "11 fine_labels for 12"),
        (lambda d: d.update({b"fine_labels": [100] * 12}), r"outside \[0, 100\)"),
        (lambda d: d.pop(b"fine_labels"), "no 'fine_labels' entry"),
    ],
)
def test_malformed_contents_are_named(tmp_path, change, message):
    entry = split_dict(*random_split(12, 0), b"train")
    change(entry)
    files = cifar_files()
    files["train"] = python2_pickle(entry)
    root = write_cifar_folder(tmp_path, files)
    with pytest.raises(CifarFormatError, match=message) as error:
        load_cifar100(root)
    assert str(root / FOLDER / "train") in str(error.value)


def test_download_fails_at_once_without_a_server(tmp_path):
    with socket.socket() as probe:  # a port that was free a moment ago: nothing listens there
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    url = f"http://127.0.0.1:{port}/cifar-100-python.tar.gz"
    with pytest.raises(ConnectionError, match=r"could not download CIFAR-100 from http://127"):
        download_cifar100(tmp_path, url=url, timeout=2.0)
    assert list(tmp_path.iterdir()) == []  # no partial file left


def test_download_checks_the_md5_and_the_result_loads(tmp_path):
    source = write_cifar_archive(tmp_path / "served.tar.gz")
    md5 = hashlib.md5(source.read_bytes()).hexdigest()
    target = tmp_path / "data"
    with pytest.raises(
        CifarFormatError, match=r"md5 .*, expected eb9058c3a382ffc7106e4002c42a8d85"
    ):
        download_cifar100(target, url=source.as_uri())
    assert list(target.iterdir()) == []
    path = download_cifar100(target, url=source.as_uri(), md5=md5)
    assert path == target / CIFAR100_ARCHIVE
    assert_is_generated(load_cifar100(target))
    source.unlink()  # a copy with the right md5 is not fetched again
    assert download_cifar100(target, url=source.as_uri(), md5=md5) == path
