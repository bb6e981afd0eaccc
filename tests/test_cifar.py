"""CIFAR-10 in torchvision's on-disk format: reading the pickled batches safely, and a CLI run on it."""

import codecs
import json
import os
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from conftest import write_cifar_like
from kdrun.data.sources import check_split_files, load_split, locate, split_fingerprint
from kdrun.errors import KdrunError

CIFAR = OmegaConf.create({"name": "cifar10", "format": "cifar", "torchvision_class": "CIFAR10",
                         "fallback_hint": "dataset=fashion_mnist"})


def test_load_split_round_trips_pixels_and_labels(tmp_path):
    written = write_cifar_like(tmp_path / "cifar-10-batches-py", n_per_batch=20)
    raw = locate(CIFAR, tmp_path, download=False)
    assert raw == tmp_path / "cifar-10-batches-py"
    train = load_split(raw, "train", "cifar")
    assert train.images.shape == (100, 3, 32, 32) and train.images.dtype == torch.uint8
    assert train.labels.dtype == torch.int64
    data = np.concatenate([written[f"data_batch_{i}"][0] for i in range(1, 6)])
    labels = sum((written[f"data_batch_{i}"][1] for i in range(1, 6)), [])
    assert train.labels.tolist() == labels
    assert np.array_equal(train.images.numpy(), data.reshape(100, 3, 32, 32))
    # a row is all of red, then green, then blue, each row-major: pixel (c, y, x) is at c*1024 + y*32 + x
    for k, c, y, x in [(0, 0, 0, 1), (37, 1, 5, 30), (99, 2, 31, 0)]:
        assert train.images[k, c, y, x] == data[k, c * 1024 + y * 32 + x]
    test = load_split(raw, "test", "cifar")
    assert test.images.shape == (20, 3, 32, 32) and test.labels.tolist() == written["test_batch"][1]
    assert check_split_files(raw, "train", "cifar") == 100 and check_split_files(raw, "test", "cifar") == 20
    assert sorted(split_fingerprint(raw, "train", "cifar")) == [f"data_batch_{i}" for i in range(1, 6)]


class _Python2Pickler(pickle._Pickler):
    """Writes bytes and str with Python 2's string opcodes, as cPickle wrote the real CIFAR-10 files."""

    def save_bytes(self, obj):
        if len(obj) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(obj)]) + obj)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(obj)) + obj)
        self.memoize(obj)

    def save_str(self, obj):
        self.save_bytes(obj.encode("latin1"))

    dispatch = {**pickle._Pickler.dispatch, bytes: save_bytes, str: save_str}


def test_reads_a_python2_pickle_like_the_real_files(tmp_path):
    data = np.arange(4 * 3072, dtype=np.int64).astype(np.uint8).reshape(4, 3072)
    path = tmp_path / "data_batch_1"
    with open(path, "wb") as f:
        _Python2Pickler(f, protocol=2).dump({b"data": data, b"labels": [3, 1, 4, 1]})
    # the real files name numpy 1's module
    path.write_bytes(path.read_bytes().replace(b"numpy._core.multiarray\n", b"numpy.core.multiarray\n"))
    from kdrun.data.cifar import read_batch

    images, labels = read_batch(path)
    assert np.array_equal(images.numpy(), data.reshape(4, 3, 32, 32)) and labels.tolist() == [3, 1, 4, 1]


class _RunsACommand:
    def __init__(self, command):
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


def test_a_pickle_that_asks_for_os_system_is_refused_and_runs_nothing(tmp_path):
    raw = tmp_path / "cifar-10-batches-py"
    write_cifar_like(raw, n_per_batch=2)
    marker = tmp_path / "pwned"
    payload = {b"data": _RunsACommand(f"touch {marker}"), b"labels": [0, 1]}
    (raw / "test_batch").write_bytes(pickle.dumps(payload, protocol=2))
    with pytest.raises(KdrunError) as e:
        load_split(raw, "test", "cifar")
    assert str(e.value) == (f"{raw / 'test_batch'} is not a CIFAR-10 batch file "
                            f"(it asks to load {os.system.__module__}.system)")
    assert not marker.exists()


class _Rot13:
    def __reduce__(self):
        return codecs.encode, ("abc", "rot13")


def test_codecs_encode_is_allowed_for_latin1_only(tmp_path):
    path = tmp_path / "data_batch_1"
    path.write_bytes(pickle.dumps({b"data": _Rot13(), b"labels": []}, protocol=2))
    from kdrun.data.cifar import read_batch

    with pytest.raises(KdrunError) as e:
        read_batch(path)
    assert str(e.value) == f"{path} is not a CIFAR-10 batch file: unexpected codec 'rot13'"


def test_truncated_batch_file_is_refused(tmp_path):
    raw = tmp_path / "cifar-10-batches-py"
    write_cifar_like(raw, n_per_batch=5)
    path = raw / "data_batch_3"
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(KdrunError) as e:
        check_split_files(raw, "train", "cifar")
    assert str(e.value) == f"{path} is not a CIFAR-10 batch file: pickle data was truncated"


@pytest.mark.parametrize("batch, message", [
    ({b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]}, "data is uint8 [2, 100], expected uint8 [n, 3072]"),
    ({b"data": np.zeros((2, 3072), np.float32), b"labels": [0, 1]},
     "data is float32 [2, 3072], expected uint8 [n, 3072]"),
    ({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0]}, "1 labels for 2 images"),
    ({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, -1]}, "labels must be >= 0, found -1"),
])
def test_malformed_batch_is_refused_naming_the_file(tmp_path, batch, message):
    raw = tmp_path / "cifar-10-batches-py"
    write_cifar_like(raw, n_per_batch=2)
    (raw / "test_batch").write_bytes(pickle.dumps(batch, protocol=2))
    with pytest.raises(KdrunError) as e:
        load_split(raw, "test", "cifar")
    assert str(e.value) == f"{raw / 'test_batch'}: {message}"


def test_check_split_files_sees_a_changed_file(tmp_path):
    raw = tmp_path / "cifar-10-batches-py"
    write_cifar_like(raw, n_per_batch=4)
    assert check_split_files(raw, "test", "cifar") == 4
    batch = {b"data": np.zeros((7, 3072), np.uint8), b"labels": [0] * 7}
    (raw / "test_batch").write_bytes(pickle.dumps(batch, protocol=2))
    assert check_split_files(raw, "test", "cifar") == 7


def test_failed_download_names_the_places_and_leaves_no_empty_folders(tmp_path, monkeypatch):
    import torchvision.datasets

    def offline(root, train, download):
        (Path(root) / "cifar-10-batches-py").mkdir(parents=True)
        raise RuntimeError("no network")

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", offline)
    data_dir = tmp_path / "data"
    with pytest.raises(KdrunError) as e:
        locate(CIFAR, data_dir)
    assert str(e.value) == (f"dataset cifar10 not found in {data_dir / 'cifar-10-batches-py'}, torchvision download "
                            "(failed or offline); try dataset=fashion_mnist")
    assert not data_dir.exists()


def test_unknown_format_is_refused(tmp_path):
    with pytest.raises(KdrunError) as e:
        locate(OmegaConf.create({**CIFAR, "format": "hdf5"}), tmp_path, download=False)
    assert str(e.value) == "dataset.format must be one of idx, cifar, got 'hdf5'"


def test_cli_trains_a_resnet_on_cifar10(kdrun, workdir, cifar_dir):
    kdrun("train", "teacher=resnet20", "teacher.model.depth=8", "dataset=cifar10", f"data_dir={cifar_dir}",
          "epochs=1", "batch_size=32", "device=cpu", "progress=false")
    run = next((workdir / "runs" / "train").iterdir())
    res = json.loads((run / "results.json").read_text())
    assert (res["status"], res["dataset"], res["n_train"], res["n_test"]) == ("completed", "cifar10", 100, 20)
    assert 0 <= res["test_errors"] <= 20
    assert res["n_params"] == 78042  # ResNet-8: see test_models.py for the count
